//! Messages of the unicast channels (join, leave, refresh, repair, resync; TLS protects them)
//! and application data (sealed under a group key; relayed by intermediaries).

use crate::graph::{MemberId, Position};
use crate::key::{Key, KeyId, KeyRef};

use super::auth::PUBLIC_KEY_LEN;
use super::codec::Writer;
use super::heartbeat::PendingKey;
use super::{open, start, DecodeError, GroupId, MessageType, VerifyingKey};

/// Most FEC blocks one NAK may name.
pub const MAX_NAK_BLOCKS: usize = 64;
/// Most keys a resync answer may carry (a 64-bit flat table needs 65, a deep tree fewer).
pub const MAX_RESYNC_KEYS: usize = 128;
/// Most bytes of a refusal's text.
pub const MAX_REFUSAL_TEXT: usize = 256;
/// Most bytes of sealed application data in one message.
pub const MAX_DATA_LEN: usize = 65_000;
/// Most intermediaries a data message may cross.
pub const MAX_HOPS: u8 = 16;
/// Key id of the joiners' keys (Mukkamalla and Katz 4.4): no key graph issues it (tree ids stay
/// below 28 << 27, flat ids below 2^31), so data wrapped under one is known as reflected.
pub const JOINERS_KEY_ID: KeyId = KeyId(u32::MAX);

/// A member asks to join `group`; its identity is its TLS client certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JoinRequest {
    pub group: GroupId,
}

impl JoinRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = start(MessageType::JoinRequest, 10);
        out.put_u64(self.group.0);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = open(bytes, MessageType::JoinRequest)?;
        let group = r.group()?;
        r.finish()?;
        Ok(JoinRequest { group })
    }
}

/// What an admitted member receives: its place, its individual key, the controller's
/// signing key, and the rekey that will carry its path keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinAccepted {
    pub group: GroupId,
    pub member: MemberId,
    pub position: Position,
    pub individual: KeyRef,
    pub individual_key: Key,
    pub signer: VerifyingKey,
    /// Sequence number of the rekey that delivers this member's path keys.
    pub rekey_seq: u64,
    /// With the reflector on: the key shared by the joiners of this member's batch, under
    /// which the controller re-wraps the group's data until their group key is in force.
    /// Its ref is (`JOINERS_KEY_ID`, the batch's rekey seq, 0). Boxed: most acceptances
    /// carry none, and they travel in the controller's outputs.
    pub joiners_key: Option<Box<(KeyRef, Key)>>,
}

/// Why a join was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RefusalReason {
    NotInAcl = 1,
    UnknownGroup = 2,
    AlreadyMember = 3,
    GroupFull = 4,
    Unavailable = 5,
    /// The identity was evicted and stays out until an administrator re-admits it.
    Revoked = 6,
    /// The member id is not (or no longer) in the group: it left, expired or was removed.
    NotMember = 7,
}

impl RefusalReason {
    pub(crate) fn from_byte(byte: u8) -> Option<Self> {
        use RefusalReason::*;
        [NotInAcl, UnknownGroup, AlreadyMember, GroupFull, Unavailable, Revoked, NotMember].into_iter().find(|r| *r as u8 == byte)
    }

    /// The reason in words, for logs and users.
    pub fn describe(self) -> &'static str {
        match self {
            RefusalReason::NotInAcl => "not in the ACL",
            RefusalReason::UnknownGroup => "unknown group",
            RefusalReason::AlreadyMember => "already a member",
            RefusalReason::GroupFull => "group full",
            RefusalReason::Unavailable => "controller unavailable",
            RefusalReason::Revoked => "evicted (revoked until an administrator re-admits it)",
            RefusalReason::NotMember => "not a member (left, expired or removed)",
        }
    }
}

impl core::fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.describe())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JoinAnswer {
    Accepted(JoinAccepted),
    Refused { reason: RefusalReason, detail: String },
}

impl JoinAnswer {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = start(MessageType::JoinAnswer, 128);
        match self {
            JoinAnswer::Accepted(a) => {
                out.put_u8(0);
                out.put_u64(a.group.0);
                out.put_u64(a.member.0);
                out.put_position(a.position);
                out.put_ref(a.individual);
                out.extend_from_slice(a.individual_key.as_bytes());
                out.extend_from_slice(&a.signer.0);
                out.put_u64(a.rekey_seq);
                match a.joiners_key.as_deref() {
                    None => out.put_u8(0),
                    Some((key_ref, key)) => {
                        out.put_u8(1);
                        out.put_ref(*key_ref);
                        out.extend_from_slice(key.as_bytes());
                    }
                }
            }
            JoinAnswer::Refused { reason, detail } => {
                out.put_u8(1);
                out.put_u8(*reason as u8);
                let text = truncate_utf8(detail, MAX_REFUSAL_TEXT);
                out.put_u16(text.len() as u16);
                out.extend_from_slice(text.as_bytes());
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = open(bytes, MessageType::JoinAnswer)?;
        let answer = match r.u8("answer kind")? {
            0 => JoinAnswer::Accepted(JoinAccepted {
                group: r.group()?,
                member: r.member()?,
                position: r.member_position()?,
                individual: r.key_ref("individual key ref")?,
                individual_key: r.key("individual key")?,
                signer: VerifyingKey(r.array::<PUBLIC_KEY_LEN>("signer")?),
                rekey_seq: r.u64("rekey seq")?,
                joiners_key: read_joiners_key(&mut r)?,
            }),
            1 => {
                let code = r.u8("refusal reason")?;
                let reason =
                    RefusalReason::from_byte(code).ok_or(DecodeError::BadValue { field: "refusal reason", value: code.into() })?;
                let len = r.count(2, MAX_REFUSAL_TEXT, 1, "refusal text")?;
                let detail = core::str::from_utf8(r.take(len, "refusal text")?).map_err(|_| DecodeError::BadText)?;
                JoinAnswer::Refused { reason, detail: detail.to_owned() }
            }
            kind => return Err(DecodeError::BadValue { field: "answer kind", value: kind.into() }),
        };
        r.finish()?;
        Ok(answer)
    }
}

/// The optional joiners' key of an acceptance: its ref must name a joiners' key.
fn read_joiners_key(r: &mut super::codec::Reader<'_>) -> Result<Option<Box<(KeyRef, Key)>>, DecodeError> {
    if !r.flag("joiners key flag")? {
        return Ok(None);
    }
    let key_ref = r.key_ref("joiners key ref")?;
    if key_ref.id != JOINERS_KEY_ID || key_ref.revision != 0 {
        return Err(DecodeError::BadValue { field: "joiners key ref", value: key_ref.id.0.into() });
    }
    Ok(Some(Box::new((key_ref, r.key("joiners key")?))))
}

/// At most `max` bytes of `text`, cut at a character boundary.
fn truncate_utf8(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// A member leaves (its TLS identity must match `member`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leave {
    pub group: GroupId,
    pub member: MemberId,
}

impl Leave {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = start(MessageType::Leave, 18);
        out.put_u64(self.group.0);
        out.put_u64(self.member.0);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = open(bytes, MessageType::Leave)?;
        let leave = Leave { group: r.group()?, member: r.member()? };
        r.finish()?;
        Ok(leave)
    }
}

/// Soft-state liveness: a member that stops refreshing is removed like a leave. Carries the
/// last rekey the member applied, so the controller sees members that fell behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refresh {
    pub group: GroupId,
    pub member: MemberId,
    pub rekey_seq: u64,
}

impl Refresh {
    pub fn encode(&self) -> Vec<u8> {
        encode_member_seq(MessageType::Refresh, self.group, self.member, self.rekey_seq)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let (group, member, rekey_seq) = decode_member_seq(bytes, MessageType::Refresh)?;
        Ok(Refresh { group, member, rekey_seq })
    }
}

/// A member lost its place (gap, restart): asks for its current keys over TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResyncRequest {
    pub group: GroupId,
    pub member: MemberId,
    /// The last rekey the member applied.
    pub rekey_seq: u64,
}

impl ResyncRequest {
    pub fn encode(&self) -> Vec<u8> {
        encode_member_seq(MessageType::ResyncRequest, self.group, self.member, self.rekey_seq)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let (group, member, rekey_seq) = decode_member_seq(bytes, MessageType::ResyncRequest)?;
        Ok(ResyncRequest { group, member, rekey_seq })
    }
}

fn encode_member_seq(kind: MessageType, group: GroupId, member: MemberId, seq: u64) -> Vec<u8> {
    let mut out = start(kind, 26);
    out.put_u64(group.0);
    out.put_u64(member.0);
    out.put_u64(seq);
    out
}

fn decode_member_seq(bytes: &[u8], kind: MessageType) -> Result<(GroupId, MemberId, u64), DecodeError> {
    let mut r = open(bytes, kind)?;
    let fields = (r.group()?, r.member()?, r.u64("rekey seq")?);
    r.finish()?;
    Ok(fields)
}

/// A member's request for more parity of rekey `seq` (sent to the controller over UDP): per
/// FEC block, named by its first packet, how many more shards the member needs. Tagged like
/// liveness datagrams (HMAC-SHA256 under the member's liveness key, see
/// [`super::liveness::LivenessKey`]), and its counter shares their sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nak {
    pub group: GroupId,
    pub member: MemberId,
    pub counter: u64,
    pub seq: u64,
    /// (block's first packet, shards needed), strictly ascending by block, each need at least 1.
    /// Empty: the member heard of no block of this rekey and needs one more shard of each.
    pub needs: Vec<(u32, u16)>,
    pub tag: [u8; 32],
}

impl Nak {
    /// Everything before the tag (what the tag covers).
    pub(crate) fn body(&self) -> Vec<u8> {
        let needs = &self.needs[..self.needs.len().min(MAX_NAK_BLOCKS)];
        let mut out = start(MessageType::Nak, 44 + 6 * needs.len() + 32);
        out.put_u64(self.group.0);
        out.put_u64(self.member.0);
        out.put_u64(self.counter);
        out.put_u64(self.seq);
        out.put_u16(needs.len() as u16);
        for &(first, needed) in needs {
            out.put_u32(first);
            out.put_u16(needed);
        }
        out
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.body();
        out.extend_from_slice(&self.tag);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = open(bytes, MessageType::Nak)?;
        let (group, member, counter, seq) = (r.group()?, r.member()?, r.u64("counter")?, r.u64("rekey seq")?);
        let count = r.count(2, MAX_NAK_BLOCKS, 6, "blocks")?;
        let mut needs: Vec<(u32, u16)> = Vec::with_capacity(count);
        for _ in 0..count {
            let (first, needed) = (r.u32("block")?, r.u16("needed")?);
            if needs.last().is_some_and(|&(last, _)| last >= first) {
                return Err(DecodeError::NotAscending("NAK blocks"));
            }
            if needed == 0 {
                return Err(DecodeError::BadValue { field: "needed", value: 0 });
            }
            needs.push((first, needed));
        }
        let tag = r.array::<32>("tag")?;
        r.finish()?;
        Ok(Nak { group, member, counter, seq, needs, tag })
    }
}

/// Everything a member needs to continue: sent over TLS after a gap it cannot repair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResyncAnswer {
    pub group: GroupId,
    pub member: MemberId,
    pub position: Position,
    pub epoch: u64,
    /// The last rekey these keys reflect; the member continues from the next.
    pub rekey_seq: u64,
    /// The group key in force, and the next one if it is not active yet.
    pub active: KeyRef,
    pub pending: Option<PendingKey>,
    /// Individual key first, then the path keys.
    pub keys: Vec<(KeyRef, Key)>,
    /// The controller's signing key now (it may have rotated since the member joined).
    pub signer: VerifyingKey,
}

impl ResyncAnswer {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = start(MessageType::ResyncAnswer, 128 + 44 * self.keys.len());
        out.put_u64(self.group.0);
        out.put_u64(self.member.0);
        out.put_position(self.position);
        out.put_u64(self.epoch);
        out.put_u64(self.rekey_seq);
        out.put_ref(self.active);
        PendingKey::put(&mut out, self.pending);
        out.put_u8(self.keys.len() as u8);
        for (r, k) in &self.keys {
            out.put_ref(*r);
            out.extend_from_slice(k.as_bytes());
        }
        out.extend_from_slice(&self.signer.0);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = open(bytes, MessageType::ResyncAnswer)?;
        let (group, member, position) = (r.group()?, r.member()?, r.member_position()?);
        let (epoch, rekey_seq) = (r.u64("epoch")?, r.u64("rekey seq")?);
        let active = r.key_ref("active key")?;
        let pending = PendingKey::read(&mut r)?;
        let count = r.count(1, MAX_RESYNC_KEYS, KeyRef::ENCODED_LEN + 32, "keys")?;
        let mut keys = Vec::with_capacity(count);
        for _ in 0..count {
            keys.push((r.key_ref("key ref")?, r.key("key")?));
        }
        let signer = VerifyingKey(r.array::<PUBLIC_KEY_LEN>("signer")?);
        r.finish()?;
        Ok(ResyncAnswer { group, member, position, epoch, rekey_seq, active, pending, keys, signer })
    }
}

/// Bytes of a data message's wrap nonce (AES-GCM).
pub const DATA_NONCE_LEN: usize = 12;
/// Bytes of a wrapped message key: the 32-byte key and its 16-byte AES-GCM tag.
pub const WRAPPED_MESSAGE_KEY_LEN: usize = 48;
/// Bytes of a payload's AES-GCM tag: no ciphertext is shorter.
pub const DATA_TAG_LEN: usize = 16;

/// Application data with message-key indirection (Iolus): the payload is sealed under a fresh
/// random message key, and that key is wrapped under the group key `key` of `group`, the group
/// whose channel carries the message now. An intermediary re-wraps only the message key for the
/// next group and counts the hop; `origin`, `sender` and `seq` name the message end to end (the
/// payload authenticates them) and receivers refuse one they have already opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Data {
    pub group: GroupId,
    pub key: KeyRef,
    /// The group of the sending member.
    pub origin: GroupId,
    /// The sending member's id in `origin`.
    pub sender: MemberId,
    /// The sender's sequence number: increasing for each message it seals.
    pub seq: u64,
    /// Intermediaries crossed so far (0 from the sender), at most [`MAX_HOPS`].
    pub hops: u8,
    pub nonce: [u8; DATA_NONCE_LEN],
    pub wrapped_key: [u8; WRAPPED_MESSAGE_KEY_LEN],
    pub ciphertext: Vec<u8>,
}

impl Data {
    /// Bytes of everything but the ciphertext.
    pub const OVERHEAD: usize = 2 + 8 + KeyRef::ENCODED_LEN + 8 + 8 + 8 + 1 + DATA_NONCE_LEN + WRAPPED_MESSAGE_KEY_LEN + 4;

    pub fn encode(&self) -> Vec<u8> {
        let mut out = start(MessageType::Data, Data::OVERHEAD + self.ciphertext.len());
        out.put_u64(self.group.0);
        out.put_ref(self.key);
        out.put_u64(self.origin.0);
        out.put_u64(self.sender.0);
        out.put_u64(self.seq);
        out.put_u8(self.hops);
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&self.wrapped_key);
        out.put_u32(self.ciphertext.len() as u32);
        out.extend_from_slice(&self.ciphertext);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = open(bytes, MessageType::Data)?;
        let (group, key) = (r.group()?, r.key_ref("data key")?);
        let (origin, sender, seq) = (r.group()?, r.member()?, r.u64("data seq")?);
        let hops = r.u8("hops")?;
        if hops > MAX_HOPS {
            return Err(DecodeError::BadValue { field: "hops", value: hops.into() });
        }
        let nonce = r.array("nonce")?;
        let wrapped_key = r.array("wrapped message key")?;
        let len = r.count(4, MAX_DATA_LEN, 1, "ciphertext")?;
        if len < DATA_TAG_LEN {
            return Err(DecodeError::BadValue { field: "ciphertext length", value: len as u64 });
        }
        let ciphertext = r.take(len, "ciphertext")?.to_vec();
        r.finish()?;
        Ok(Data { group, key, origin, sender, seq, hops, nonce, wrapped_key, ciphertext })
    }
}
