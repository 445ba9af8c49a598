//! Signing-key rotation: the controller announces its next Ed25519 public key in a message
//! signed by its current one, so members follow without rejoining. A member that missed every
//! announcement gets the key in its next resync answer (over TLS).

use super::auth::{Signature, Signer, PUBLIC_KEY_LEN, SIGNATURE_LEN};
use super::codec::Writer;
use super::guard::Reject;
use super::{open, start, DecodeError, GroupId, MessageType, VerifyingKey};

pub(crate) const SIGNER_CHANGE_DOMAIN: &[u8] = b"keycast/v2 signer change";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SignerChange {
    pub group: GroupId,
    /// The rotation's number: 1 for the first, then 2, ... (replays are refused).
    pub change: u64,
    /// The key that signs everything from now on.
    pub next: VerifyingKey,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SignedSignerChange {
    pub change: SignerChange,
    /// By the key being replaced.
    pub signature: Signature,
}

impl SignerChange {
    fn body(&self) -> Vec<u8> {
        let mut out = start(MessageType::SignerChange, 2 + 16 + PUBLIC_KEY_LEN + SIGNATURE_LEN);
        out.put_u64(self.group.0);
        out.put_u64(self.change);
        out.extend_from_slice(&self.next.0);
        out
    }

    /// Signed by `current`, the key it replaces.
    pub fn sign(self, current: &Signer) -> SignedSignerChange {
        SignedSignerChange { signature: current.sign(SIGNER_CHANGE_DOMAIN, &self.body()), change: self }
    }
}

impl SignedSignerChange {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.change.body();
        out.extend_from_slice(&self.signature);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = open(bytes, MessageType::SignerChange)?;
        let change = SignerChange { group: r.group()?, change: r.u64("signer change")?, next: VerifyingKey(r.array("next signer")?) };
        let signature = r.array::<SIGNATURE_LEN>("signature")?;
        r.finish()?;
        Ok(SignedSignerChange { change, signature })
    }

    /// Decodes and checks the signature of the key being replaced.
    pub fn verify(bytes: &[u8], current: &VerifyingKey) -> Result<SignerChange, Reject> {
        let signed = SignedSignerChange::decode(bytes)?;
        current.verify_signed_message(SIGNER_CHANGE_DOMAIN, bytes, &signed.signature)?;
        Ok(signed.change)
    }
}
