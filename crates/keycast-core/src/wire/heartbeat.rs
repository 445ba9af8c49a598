//! Heartbeats: the controller's signed announcement, every interval, of the epoch, the key in
//! force, the next key and when it activates, and the group size (Mukkamalla 3.2, GSM). A
//! member that sees a `rekey_seq` or key it lacks knows it missed a rekey.

use crate::key::KeyRef;
use crate::wrap::{KeyCheck, CHECK_LEN};

use super::auth::{Signature, Signer, HEARTBEAT_DOMAIN, SIGNATURE_LEN};
use super::codec::{Reader, Writer};
use super::guard::Reject;
use super::{open, start, DecodeError, GroupId, MessageType, VerifyingKey};

/// A group key that has been delivered but is not yet in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingKey {
    pub key: KeyRef,
    /// The epoch in which it replaces the active key.
    pub activation: u64,
}

impl PendingKey {
    pub(crate) fn put(out: &mut Vec<u8>, pending: Option<PendingKey>) {
        match pending {
            None => out.put_u8(0),
            Some(p) => {
                out.put_u8(1);
                out.put_ref(p.key);
                out.put_u64(p.activation);
            }
        }
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Option<PendingKey>, DecodeError> {
        Ok(match r.flag("pending flag")? {
            false => None,
            true => Some(PendingKey { key: r.key_ref("pending key")?, activation: r.u64("activation epoch")? }),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    pub group: GroupId,
    pub epoch: u64,
    /// Heartbeat sequence number, for replay rejection.
    pub seq: u64,
    /// Sequence number of the last rekey sent (0: none yet).
    pub rekey_seq: u64,
    pub active: KeyRef,
    /// Key check value of the active key: a member holding another key under the same ref
    /// (a controller restarted from an older log) sees the contradiction and resyncs.
    pub active_check: KeyCheck,
    pub pending: Option<PendingKey>,
    /// Key check value of the pending key (zero when there is none).
    pub pending_check: KeyCheck,
    pub group_size: u64,
    /// The controller's clock, in milliseconds since the Unix epoch.
    pub sent_ms: u64,
    /// Milliseconds from `sent_ms` until the pending key activates (0 without one): a member
    /// still lacking that key resyncs before then, whatever else it lost.
    pub activates_in_ms: u32,
}

/// A heartbeat with the controller's signature over its encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SignedHeartbeat {
    pub heartbeat: Heartbeat,
    pub signature: Signature,
}

impl Heartbeat {
    fn body(&self) -> Vec<u8> {
        let mut out = start(MessageType::Heartbeat, 160);
        out.put_u64(self.group.0);
        out.put_u64(self.epoch);
        out.put_u64(self.seq);
        out.put_u64(self.rekey_seq);
        out.put_ref(self.active);
        out.extend_from_slice(&self.active_check);
        PendingKey::put(&mut out, self.pending);
        if self.pending.is_some() {
            out.extend_from_slice(&self.pending_check);
        }
        out.put_u64(self.group_size);
        out.put_u64(self.sent_ms);
        out.put_u32(self.activates_in_ms);
        out
    }

    pub fn sign(self, signer: &Signer) -> SignedHeartbeat {
        SignedHeartbeat { signature: signer.sign(HEARTBEAT_DOMAIN, &self.body()), heartbeat: self }
    }
}

impl SignedHeartbeat {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.heartbeat.body();
        out.extend_from_slice(&self.signature);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = open(bytes, MessageType::Heartbeat)?;
        let (group, epoch, seq, rekey_seq) = (r.group()?, r.u64("epoch")?, r.u64("heartbeat seq")?, r.u64("rekey seq")?);
        let (active, active_check) = (r.key_ref("active key")?, r.array("active key check")?);
        let pending = PendingKey::read(&mut r)?;
        let pending_check = match pending {
            Some(_) => r.array("pending key check")?,
            None => [0; CHECK_LEN],
        };
        let (group_size, sent_ms, activates_in_ms) = (r.u64("group size")?, r.u64("sent at")?, r.u32("activates in")?);
        let heartbeat = Heartbeat { group, epoch, seq, rekey_seq, active, active_check, pending, pending_check, group_size, sent_ms, activates_in_ms };
        let signature = r.array::<SIGNATURE_LEN>("signature")?;
        r.finish()?;
        Ok(SignedHeartbeat { heartbeat, signature })
    }

    /// Decodes `bytes` and checks the signature.
    pub fn verify(bytes: &[u8], signer: &VerifyingKey) -> Result<Heartbeat, Reject> {
        let signed = SignedHeartbeat::decode(bytes)?;
        signer.verify_signed_message(HEARTBEAT_DOMAIN, bytes, &signed.signature)?;
        Ok(signed.heartbeat)
    }
}
