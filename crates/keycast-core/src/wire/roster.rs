//! Membership deltas for conferencing groups (Mukkamalla and Katz 4.3): after a rekey, the
//! controller multicasts who joined and who left in it, signed, in parts of at most
//! [`MAX_DELTA_IDS`] ids so each part fits one packet.

use crate::graph::MemberId;

use super::auth::{Signature, Signer, SIGNATURE_LEN};
use super::codec::{Reader, Writer};
use super::guard::Reject;
use super::{open, start, DecodeError, GroupId, MessageType, VerifyingKey};

/// Most member ids (joined plus left) in one part.
pub const MAX_DELTA_IDS: usize = 128;
pub(crate) const DELTA_DOMAIN: &[u8] = b"keycast/v1 membership";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MembershipDelta {
    pub group: GroupId,
    /// The rekey this delta belongs to.
    pub seq: u64,
    pub part: u16,
    pub parts: u16,
    /// Strictly ascending.
    pub joined: Vec<MemberId>,
    /// Strictly ascending.
    pub left: Vec<MemberId>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedDelta {
    pub delta: MembershipDelta,
    pub signature: Signature,
}

fn put_ids(out: &mut Vec<u8>, ids: &[MemberId]) {
    out.put_u16(ids.len() as u16);
    for id in ids {
        out.put_u64(id.0);
    }
}

fn read_ids(r: &mut Reader<'_>, field: &'static str) -> Result<Vec<MemberId>, DecodeError> {
    let count = r.count(2, MAX_DELTA_IDS, 8, field)?;
    let mut ids: Vec<MemberId> = Vec::with_capacity(count);
    for _ in 0..count {
        let id = r.member()?;
        if ids.last().is_some_and(|last| *last >= id) {
            return Err(DecodeError::NotAscending(field));
        }
        ids.push(id);
    }
    Ok(ids)
}

impl MembershipDelta {
    /// The parts announcing one rekey's joins and leaves (one part if there are none).
    pub fn split(group: GroupId, seq: u64, mut joined: Vec<MemberId>, mut left: Vec<MemberId>) -> Vec<MembershipDelta> {
        joined.sort();
        left.sort();
        let ids: Vec<(bool, MemberId)> = joined.into_iter().map(|m| (true, m)).chain(left.into_iter().map(|m| (false, m))).collect();
        let chunks: Vec<&[(bool, MemberId)]> = if ids.is_empty() { vec![&[]] } else { ids.chunks(MAX_DELTA_IDS).collect() };
        let parts = chunks.len().min(u16::MAX as usize) as u16;
        chunks
            .into_iter()
            .take(parts as usize)
            .enumerate()
            .map(|(i, chunk)| MembershipDelta {
                group,
                seq,
                part: i as u16,
                parts,
                joined: chunk.iter().filter(|(j, _)| *j).map(|(_, m)| *m).collect(),
                left: chunk.iter().filter(|(j, _)| !*j).map(|(_, m)| *m).collect(),
            })
            .collect()
    }

    fn body(&self) -> Vec<u8> {
        let mut out = start(MessageType::MembershipDelta, 32 + 8 * (self.joined.len() + self.left.len()));
        out.put_u64(self.group.0);
        out.put_u64(self.seq);
        out.put_u16(self.part);
        out.put_u16(self.parts);
        put_ids(&mut out, &self.joined);
        put_ids(&mut out, &self.left);
        out
    }

    pub fn sign(self, signer: &Signer) -> SignedDelta {
        SignedDelta { signature: signer.sign(DELTA_DOMAIN, &self.body()), delta: self }
    }
}

impl SignedDelta {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.delta.body();
        out.extend_from_slice(&self.signature);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = open(bytes, MessageType::MembershipDelta)?;
        let (group, seq) = (r.group()?, r.u64("rekey seq")?);
        let (part, parts) = (r.u16("part")?, r.u16("parts")?);
        if parts == 0 || part >= parts {
            return Err(DecodeError::BadValue { field: "part", value: part.into() });
        }
        let joined = read_ids(&mut r, "joined members")?;
        let left = read_ids(&mut r, "left members")?;
        if joined.len() + left.len() > MAX_DELTA_IDS {
            return Err(DecodeError::TooLong { field: "member ids", len: joined.len() + left.len(), max: MAX_DELTA_IDS });
        }
        let signature = r.array::<SIGNATURE_LEN>("signature")?;
        r.finish()?;
        Ok(SignedDelta { delta: MembershipDelta { group, seq, part, parts, joined, left }, signature })
    }

    pub fn verify(bytes: &[u8], signer: &VerifyingKey) -> Result<MembershipDelta, Reject> {
        let signed = SignedDelta::decode(bytes)?;
        signer.verify_signed_message(DELTA_DOMAIN, bytes, &signed.signature)?;
        Ok(signed.delta)
    }
}
