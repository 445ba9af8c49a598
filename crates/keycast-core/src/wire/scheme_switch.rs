//! Scheme switch notice (type 21): the controller tells its members that the group's key graph
//! moved between centralized flat and centralized tree (Caronni et al. 3.5, figure 6;
//! [`crate::graph::transition`]). Public and signed by the key the members trust; no key
//! travels in it. To a tree, each member derives its path from the flat keys it holds; to a
//! flat table, each member takes its new keys from a resync (its keys sealed to it alone).

use super::auth::{Signature, Signer, SIGNATURE_LEN};
use super::codec::Writer;
use super::guard::Reject;
use super::{open, start, DecodeError, GroupId, MessageType, VerifyingKey};

pub(crate) const SCHEME_SWITCH_DOMAIN: &[u8] = b"keycast/v2 scheme switch";

/// The graph the group runs after the switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwitchTarget {
    /// A binary tree over the flat table's ID bits, every key at `version`.
    Tree { id_bits: u8, version: u32 },
    /// A fresh flat table of `id_bits`.
    Flat { id_bits: u8 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchemeSwitch {
    pub group: GroupId,
    /// The switch's rekey seq (one above the last rekey): a member takes it once it holds every
    /// rekey before it, and refuses it (a replay) once it holds this seq.
    pub seq: u64,
    /// The epoch the switch was made in: its group key is in force from then.
    pub epoch: u64,
    pub target: SwitchTarget,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SignedSchemeSwitch {
    pub switch: SchemeSwitch,
    pub signature: Signature,
}

impl SchemeSwitch {
    fn body(&self) -> Vec<u8> {
        let mut out = start(MessageType::SchemeSwitch, 2 + 8 + 8 + 8 + 1 + 1 + 4 + SIGNATURE_LEN);
        out.put_u64(self.group.0);
        out.put_u64(self.seq);
        out.put_u64(self.epoch);
        match self.target {
            SwitchTarget::Tree { id_bits, version } => {
                out.put_u8(1);
                out.put_u8(id_bits);
                out.put_u32(version);
            }
            SwitchTarget::Flat { id_bits } => {
                out.put_u8(2);
                out.put_u8(id_bits);
            }
        }
        out
    }

    pub fn sign(self, signer: &Signer) -> SignedSchemeSwitch {
        SignedSchemeSwitch { signature: signer.sign(SCHEME_SWITCH_DOMAIN, &self.body()), switch: self }
    }
}

impl SignedSchemeSwitch {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.switch.body();
        out.extend_from_slice(&self.signature);
        out
    }

    /// Strict: a known target, nothing after the signature.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = open(bytes, MessageType::SchemeSwitch)?;
        let (group, seq, epoch) = (r.group()?, r.u64("switch seq")?, r.u64("switch epoch")?);
        let target = match r.u8("switch target")? {
            1 => SwitchTarget::Tree { id_bits: r.u8("id bits")?, version: r.u32("tree version")? },
            2 => SwitchTarget::Flat { id_bits: r.u8("id bits")? },
            value => return Err(DecodeError::BadValue { field: "switch target", value: value.into() }),
        };
        let signature = r.array::<SIGNATURE_LEN>("signature")?;
        r.finish()?;
        Ok(SignedSchemeSwitch { switch: SchemeSwitch { group, seq, epoch, target }, signature })
    }

    /// Decodes and checks the signature of the members' controller.
    pub fn verify(bytes: &[u8], signer: &VerifyingKey) -> Result<SchemeSwitch, Reject> {
        let signed = SignedSchemeSwitch::decode(bytes)?;
        signer.verify_signed_message(SCHEME_SWITCH_DOMAIN, bytes, &signed.signature)?;
        Ok(signed.switch)
    }
}
