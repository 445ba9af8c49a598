//! Merge notice (type 19): a controller tells its members that their group moves under another
//! controller (a merge, [`crate::graph::merge`]) or becomes a group of its own again (a split).
//! It names the controller to follow (group, signing key, TLS address and server name,
//! multicast address) and the members' side of the merged tree, and is signed by the key the
//! members already trust, so they switch without rejoining.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use super::auth::{Signature, Signer, PUBLIC_KEY_LEN, SIGNATURE_LEN};
use super::codec::{Reader, Writer};
use super::guard::Reject;
use super::{open, start, DecodeError, GroupId, MessageType, VerifyingKey};
use crate::graph::merge::Subtree;

pub(crate) const MERGE_NOTICE_DOMAIN: &[u8] = b"keycast/v2 merge notice";

/// What a member does on a notice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Move {
    /// Join the merged group on this side of its root (rename keys, then apply its rekey).
    Merge(Subtree),
    /// The merged group splits: follow this side's own controller again.
    Split,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MergeNotice {
    /// The group the members are in now.
    pub group: GroupId,
    /// The seq of the last rekey the members' current controller sent: the notice comes after it.
    pub after_seq: u64,
    pub change: Move,
    /// What a right-side member's id becomes in the next group: its id plus this on a merge,
    /// minus this on a split (two controllers number their members alike). 0 on the left side.
    pub member_offset: u64,
    /// The group to follow from now on, its epoch in force and its last rekey (the next one
    /// the members take is the merge's or split's), its controller's signing key and addresses.
    pub next_group: GroupId,
    pub next_epoch: u64,
    pub next_seq: u64,
    pub next_signer: VerifyingKey,
    pub controller: SocketAddr,
    /// The name in the next controller's TLS certificate: members connect under it.
    pub server_name: TlsServerName,
    pub multicast: SocketAddr,
}

/// Longest server name: a DNS name's limit (an IP literal is shorter).
pub const MAX_SERVER_NAME_LEN: usize = 253;

/// A controller's TLS server name (a DNS name or IP literal, as in its certificate): 1 to 253
/// bytes of printable ASCII without spaces. Checked when made, so every one encodes.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TlsServerName(Arc<str>);

impl TlsServerName {
    pub fn new(name: &str) -> Result<Self, DecodeError> {
        let field = "server name";
        if name.is_empty() {
            return Err(DecodeError::BadValue { field, value: 0 });
        }
        if name.len() > MAX_SERVER_NAME_LEN {
            return Err(DecodeError::TooLong { field, len: name.len(), max: MAX_SERVER_NAME_LEN });
        }
        if let Some(byte) = name.bytes().find(|b| !b.is_ascii_graphic()) {
            return Err(DecodeError::BadValue { field, value: byte.into() });
        }
        Ok(TlsServerName(name.into()))
    }

    /// The name of a controller on loopback, and of one whose configuration predates names.
    pub fn localhost() -> Self {
        TlsServerName("localhost".into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl core::fmt::Debug for TlsServerName {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl core::fmt::Display for TlsServerName {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TlsServerName {
    type Err = DecodeError;
    fn from_str(name: &str) -> Result<Self, DecodeError> {
        TlsServerName::new(name)
    }
}

/// One length byte, then the name.
pub(crate) fn put_server_name(out: &mut Vec<u8>, name: &TlsServerName) {
    // At most 253 bytes (checked in `TlsServerName::new`).
    out.put_u8(name.as_str().len() as u8);
    out.extend_from_slice(name.as_str().as_bytes());
}

/// Strict: a length of 1 to 253, printable ASCII without spaces.
pub(crate) fn read_server_name(r: &mut Reader<'_>, field: &'static str) -> Result<TlsServerName, DecodeError> {
    let len = usize::from(r.u8(field)?);
    if len == 0 || len > MAX_SERVER_NAME_LEN {
        return Err(DecodeError::BadValue { field, value: len as u64 });
    }
    let name = std::str::from_utf8(r.take(len, field)?).map_err(|_| DecodeError::BadText)?;
    TlsServerName::new(name)
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedMergeNotice {
    pub notice: MergeNotice,
    /// By the members' current controller.
    pub signature: Signature,
}

fn move_byte(change: Move) -> u8 {
    match change {
        Move::Split => 0,
        Move::Merge(Subtree::Left) => 1,
        Move::Merge(Subtree::Right) => 2,
    }
}

pub(crate) fn put_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.put_u8(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.put_u8(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.put_u16(addr.port());
}

pub(crate) fn read_addr(r: &mut Reader<'_>, field: &'static str) -> Result<SocketAddr, DecodeError> {
    let ip = match r.u8(field)? {
        4 => IpAddr::V4(Ipv4Addr::from(r.array::<4>(field)?)),
        6 => IpAddr::V6(Ipv6Addr::from(r.array::<16>(field)?)),
        kind => return Err(DecodeError::BadValue { field, value: kind.into() }),
    };
    Ok(SocketAddr::new(ip, r.u16(field)?))
}

impl MergeNotice {
    fn body(&self) -> Vec<u8> {
        let mut out = start(MessageType::MergeNotice, 2 + 8 + 8 + 1 + 8 + 8 + 16 + PUBLIC_KEY_LEN + 2 * 19 + 1 + self.server_name.as_str().len() + SIGNATURE_LEN);
        out.put_u64(self.group.0);
        out.put_u64(self.after_seq);
        out.put_u8(move_byte(self.change));
        out.put_u64(self.member_offset);
        out.put_u64(self.next_group.0);
        out.put_u64(self.next_epoch);
        out.put_u64(self.next_seq);
        out.extend_from_slice(&self.next_signer.0);
        put_addr(&mut out, self.controller);
        put_server_name(&mut out, &self.server_name);
        put_addr(&mut out, self.multicast);
        out
    }

    /// Signed by the members' current controller.
    pub fn sign(self, current: &Signer) -> SignedMergeNotice {
        SignedMergeNotice { signature: current.sign(MERGE_NOTICE_DOMAIN, &self.body()), notice: self }
    }
}

impl SignedMergeNotice {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.notice.body();
        out.extend_from_slice(&self.signature);
        out
    }

    /// Strict: a known move, address kinds 4 or 6, a server name of 1 to 253 printable ASCII
    /// bytes, nothing after the signature.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = open(bytes, MessageType::MergeNotice)?;
        let (group, after_seq) = (r.group()?, r.u64("after seq")?);
        let change = match r.u8("move")? {
            0 => Move::Split,
            1 => Move::Merge(Subtree::Left),
            2 => Move::Merge(Subtree::Right),
            value => return Err(DecodeError::BadValue { field: "move", value: value.into() }),
        };
        let member_offset = r.u64("member offset")?;
        let next_group = r.group()?;
        let (next_epoch, next_seq) = (r.u64("next epoch")?, r.u64("next seq")?);
        let next_signer = VerifyingKey(r.array("next signer")?);
        let controller = read_addr(&mut r, "controller address")?;
        let server_name = read_server_name(&mut r, "server name")?;
        let multicast = read_addr(&mut r, "multicast address")?;
        let signature = r.array::<SIGNATURE_LEN>("signature")?;
        r.finish()?;
        let notice = MergeNotice { group, after_seq, change, member_offset, next_group, next_epoch, next_seq, next_signer, controller, server_name, multicast };
        Ok(SignedMergeNotice { notice, signature })
    }

    /// Decodes and checks the signature of the members' current controller.
    pub fn verify(bytes: &[u8], current: &VerifyingKey) -> Result<MergeNotice, Reject> {
        let signed = SignedMergeNotice::decode(bytes)?;
        current.verify_signed_message(MERGE_NOTICE_DOMAIN, bytes, &signed.signature)?;
        Ok(signed.notice)
    }
}
