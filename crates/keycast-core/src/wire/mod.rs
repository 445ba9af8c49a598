//! The wire format, version 2 (specified in `docs/wire.md`).
//!
//! Every message starts with a version byte and a type byte. Encoding is canonical: a value
//! has exactly one encoding (big-endian integers, no optional padding, counts that must match
//! the bytes that follow, flags that are exactly 0 or 1), so signatures cover well-defined
//! bytes. Decoding checks every length before allocating and returns a [`DecodeError`] for
//! anything else.

pub(crate) mod codec;
mod placement;

pub mod auth;
pub mod control;
pub mod guard;
pub mod heartbeat;
pub mod liveness;
pub mod merge_notice;
pub mod parity;
pub mod refusal;
pub mod rekey;
pub mod roster;
pub mod scheme_switch;
pub mod signer;

pub use auth::{Signer, VerifiedRoots, VerifyingKey};
pub use control::{Data, JoinAccepted, JoinAnswer, JoinRequest, Leave, Nak, Refresh, RefusalReason, ResyncAnswer, ResyncRequest};
pub use guard::{Reject, RekeyAssembly, ReplayGuard};
pub use heartbeat::{Heartbeat, PendingKey, SignedHeartbeat};
pub use merge_notice::{MergeNotice, Move, SignedMergeNotice, TlsServerName};
pub use liveness::{open_resync_answer, peek_resync_answer, seal_resync_answer, Liveness, LivenessKey, ResyncAnswerKey, LIVENESS_LEN, LIVENESS_TAG_LEN};
pub use refusal::{DatagramRefusal, SignedDatagramRefusal, DATAGRAM_REFUSAL_LEN};
pub use parity::{encode_parity, ParityHeader, ParityPacket, ParityRound, ParityShard};
pub use roster::{MembershipDelta, SignedDelta};
pub use scheme_switch::{SchemeSwitch, SignedSchemeSwitch, SwitchTarget};
pub use signer::{SignedSignerChange, SignerChange};
pub use rekey::{encode_rekey, EncodedRekey, PacketConfig, Placement, RekeyHeader, RekeyPacket, RekeyWireStats};

/// The version byte this implementation writes and reads.
pub const WIRE_VERSION: u8 = 2;
/// Default payload size of one multicast packet (fits a 1280-byte IPv6 minimum MTU).
pub const DEFAULT_MTU: usize = 1200;
/// Largest message any decoder accepts (the largest UDP payload).
pub const MAX_MESSAGE_LEN: usize = 65_507;

/// A group's identity, the same for its controller and every member.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct GroupId(pub u64);

/// The second byte of every message.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum MessageType {
    Rekey = 1,
    Heartbeat = 2,
    JoinRequest = 3,
    JoinAnswer = 4,
    Leave = 5,
    Refresh = 6,
    Nak = 7,
    ResyncRequest = 8,
    ResyncAnswer = 9,
    Data = 10,
    // 11 was data relayed by an intermediary: data messages now carry their origin and hops.
    MembershipDelta = 12,
    SignerChange = 13,
    RekeyParity = 14,
    Liveness = 15,
    ResyncProbe = 16,
    SealedResync = 17,
    DatagramRefusal = 18,
    MergeNotice = 19,
    // 20 is taken elsewhere in the workspace.
    SchemeSwitch = 21,
}

impl MessageType {
    pub fn of(message: &Message) -> MessageType {
        match message {
            Message::Rekey(_) => MessageType::Rekey,
            Message::Heartbeat(_) => MessageType::Heartbeat,
            Message::JoinRequest(_) => MessageType::JoinRequest,
            Message::JoinAnswer(_) => MessageType::JoinAnswer,
            Message::Leave(_) => MessageType::Leave,
            Message::Refresh(_) => MessageType::Refresh,
            Message::Nak(_) => MessageType::Nak,
            Message::ResyncRequest(_) => MessageType::ResyncRequest,
            Message::ResyncAnswer(_) => MessageType::ResyncAnswer,
            Message::Data(_) => MessageType::Data,
            Message::MembershipDelta(_) => MessageType::MembershipDelta,
            Message::SignerChange(_) => MessageType::SignerChange,
            Message::RekeyParity(_) => MessageType::RekeyParity,
            Message::Liveness(l, _) if l.resync => MessageType::ResyncProbe,
            Message::Liveness(..) => MessageType::Liveness,
            Message::SealedResync(_) => MessageType::SealedResync,
            Message::DatagramRefusal(_) => MessageType::DatagramRefusal,
            Message::MergeNotice(_) => MessageType::MergeNotice,
            Message::SchemeSwitch(_) => MessageType::SchemeSwitch,
        }
    }

    fn from_byte(byte: u8) -> Option<Self> {
        use MessageType::*;
        [Rekey, Heartbeat, JoinRequest, JoinAnswer, Leave, Refresh, Nak, ResyncRequest, ResyncAnswer, Data, MembershipDelta, SignerChange, RekeyParity, Liveness, ResyncProbe, SealedResync, DatagramRefusal, MergeNotice, SchemeSwitch]
            .into_iter()
            .find(|t| *t as u8 == byte)
    }
}

/// Why bytes are not a valid message. Receivers drop the message and count the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message of {0} bytes is longer than any message ({MAX_MESSAGE_LEN})")]
    Oversized(usize),
    #[error("wire version {0} is not supported (this is version {WIRE_VERSION})")]
    UnknownVersion(u8),
    #[error("unknown message type {0}")]
    UnknownType(u8),
    #[error("expected a {expected:?} message, got {got:?}")]
    WrongType { expected: MessageType, got: MessageType },
    #[error("truncated at {field}: {needed} bytes needed, {available} left")]
    Truncated { field: &'static str, needed: usize, available: usize },
    #[error("{0} bytes after the end of the message")]
    TrailingBytes(usize),
    #[error("{field} is {len}, more than the limit of {max}")]
    TooLong { field: &'static str, len: usize, max: usize },
    #[error("{field} has the invalid value {value}")]
    BadValue { field: &'static str, value: u64 },
    #[error("{0} are not in strictly ascending order")]
    NotAscending(&'static str),
    #[error("text is not UTF-8")]
    BadText,
}

/// Reads the version and type bytes.
pub(crate) fn read_header(reader: &mut codec::Reader<'_>) -> Result<MessageType, DecodeError> {
    let version = reader.u8("version")?;
    if version != WIRE_VERSION {
        return Err(DecodeError::UnknownVersion(version));
    }
    let byte = reader.u8("type")?;
    MessageType::from_byte(byte).ok_or(DecodeError::UnknownType(byte))
}

/// The type of a message, from its first two bytes only: receivers dispatch on it and then
/// decode (and verify) once with the decoder of that type.
pub fn message_type(bytes: &[u8]) -> Result<MessageType, DecodeError> {
    if bytes.len() > MAX_MESSAGE_LEN {
        return Err(DecodeError::Oversized(bytes.len()));
    }
    read_header(&mut codec::Reader::new(bytes))
}

/// Starts a message of type `kind` in a new buffer.
pub(crate) fn start(kind: MessageType, capacity: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(capacity);
    out.push(WIRE_VERSION);
    out.push(kind as u8);
    out
}

/// Opens a message that must be of type `expected` and returns its reader past the header.
pub(crate) fn open(bytes: &[u8], expected: MessageType) -> Result<codec::Reader<'_>, DecodeError> {
    if bytes.len() > MAX_MESSAGE_LEN {
        return Err(DecodeError::Oversized(bytes.len()));
    }
    let mut reader = codec::Reader::new(bytes);
    let got = read_header(&mut reader)?;
    if got != expected {
        return Err(DecodeError::WrongType { expected, got });
    }
    Ok(reader)
}

/// Any message, as read off a socket whose traffic mixes types.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Rekey(RekeyPacket),
    Heartbeat(SignedHeartbeat),
    JoinRequest(JoinRequest),
    JoinAnswer(JoinAnswer),
    Leave(Leave),
    Refresh(Refresh),
    Nak(Nak),
    ResyncRequest(ResyncRequest),
    ResyncAnswer(ResyncAnswer),
    Data(Data),
    MembershipDelta(SignedDelta),
    SignerChange(SignedSignerChange),
    RekeyParity(ParityPacket),
    /// Fields of a liveness datagram (its tag is checked by [`Liveness::open`]) and the tag.
    Liveness(Liveness, [u8; LIVENESS_TAG_LEN]),
    /// A resync answer sealed to one member (opened by [`open_resync_answer`]), as bytes.
    SealedResync(Vec<u8>),
    /// A controller's signed refusal of a resync request over UDP.
    DatagramRefusal(SignedDatagramRefusal),
    /// A controller's signed notice that its members move to another controller.
    MergeNotice(SignedMergeNotice),
    /// A controller's signed notice that the group's key graph moved between flat and tree.
    SchemeSwitch(SignedSchemeSwitch),
}

impl Message {
    /// Decodes one message of any type. Signatures are not checked here: see
    /// [`RekeyPacket::verify`] and [`SignedHeartbeat::verify`].
    pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
        Ok(match message_type(bytes)? {
            MessageType::Rekey => Message::Rekey(RekeyPacket::decode(bytes)?),
            MessageType::Heartbeat => Message::Heartbeat(SignedHeartbeat::decode(bytes)?),
            MessageType::JoinRequest => Message::JoinRequest(JoinRequest::decode(bytes)?),
            MessageType::JoinAnswer => Message::JoinAnswer(JoinAnswer::decode(bytes)?),
            MessageType::Leave => Message::Leave(Leave::decode(bytes)?),
            MessageType::Refresh => Message::Refresh(Refresh::decode(bytes)?),
            MessageType::Nak => Message::Nak(Nak::decode(bytes)?),
            MessageType::ResyncRequest => Message::ResyncRequest(ResyncRequest::decode(bytes)?),
            MessageType::ResyncAnswer => Message::ResyncAnswer(ResyncAnswer::decode(bytes)?),
            MessageType::Data => Message::Data(Data::decode(bytes)?),
            MessageType::MembershipDelta => Message::MembershipDelta(SignedDelta::decode(bytes)?),
            MessageType::SignerChange => Message::SignerChange(SignedSignerChange::decode(bytes)?),
            MessageType::RekeyParity => Message::RekeyParity(ParityPacket::decode(bytes)?),
            MessageType::SealedResync => {
                peek_resync_answer(bytes)?;
                Message::SealedResync(bytes.to_vec())
            }
            MessageType::Liveness | MessageType::ResyncProbe => {
                let mut tag = [0u8; LIVENESS_TAG_LEN];
                let liveness = Liveness::peek(bytes)?;
                tag.copy_from_slice(&bytes[LIVENESS_LEN - LIVENESS_TAG_LEN..]);
                Message::Liveness(liveness, tag)
            }
            MessageType::DatagramRefusal => Message::DatagramRefusal(SignedDatagramRefusal::decode(bytes)?),
            MessageType::MergeNotice => Message::MergeNotice(SignedMergeNotice::decode(bytes)?),
            MessageType::SchemeSwitch => Message::SchemeSwitch(SignedSchemeSwitch::decode(bytes)?),
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        match self {
            Message::Rekey(m) => m.encode(),
            Message::Heartbeat(m) => m.encode(),
            Message::JoinRequest(m) => m.encode(),
            Message::JoinAnswer(m) => m.encode(),
            Message::Leave(m) => m.encode(),
            Message::Refresh(m) => m.encode(),
            Message::Nak(m) => m.encode(),
            Message::ResyncRequest(m) => m.encode(),
            Message::ResyncAnswer(m) => m.encode(),
            Message::Data(m) => m.encode(),
            Message::MembershipDelta(m) => m.encode(),
            Message::SignerChange(m) => m.encode(),
            Message::RekeyParity(m) => m.encode(),
            Message::Liveness(m, tag) => liveness::encode_with_tag(m, tag),
            Message::SealedResync(bytes) => bytes.clone(),
            Message::DatagramRefusal(m) => {
                let mut out = m.refusal.body();
                out.extend_from_slice(&m.signature);
                out
            }
            Message::MergeNotice(m) => m.encode(),
            Message::SchemeSwitch(m) => m.encode(),
        }
    }
}
