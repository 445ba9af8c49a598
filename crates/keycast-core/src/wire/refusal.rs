//! A signed refusal over UDP (type 18): the controller's answer to a resync request over UDP
//! from a member id it no longer counts (left, expired or evicted). The request cannot be
//! authenticated (the member's individual key is gone), so the answer is signed instead, and
//! names the request's counter: a member takes it only for the request it last sent, so an old
//! refusal replayed at a later member with the same id is not taken.

use super::auth::{Signature, Signer, SIGNATURE_LEN};
use super::codec::Writer;
use super::control::RefusalReason;
use super::guard::Reject;
use super::{open, start, DecodeError, GroupId, MessageType, VerifyingKey};
use crate::graph::MemberId;

pub(crate) const DATAGRAM_REFUSAL_DOMAIN: &[u8] = b"keycast/v2 datagram refusal";
/// Bytes of a signed datagram refusal: version, type, group, member, counter, reason, signature.
pub const DATAGRAM_REFUSAL_LEN: usize = 2 + 8 + 8 + 8 + 1 + SIGNATURE_LEN;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DatagramRefusal {
    pub group: GroupId,
    pub member: MemberId,
    /// The counter of the resync request refused.
    pub counter: u64,
    pub reason: RefusalReason,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SignedDatagramRefusal {
    pub refusal: DatagramRefusal,
    pub signature: Signature,
}

impl DatagramRefusal {
    pub(crate) fn body(&self) -> Vec<u8> {
        let mut out = start(MessageType::DatagramRefusal, DATAGRAM_REFUSAL_LEN);
        out.put_u64(self.group.0);
        out.put_u64(self.member.0);
        out.put_u64(self.counter);
        out.put_u8(self.reason as u8);
        out
    }

    /// The datagram, signed by the controller's current key.
    pub fn sign(self, signer: &Signer) -> Vec<u8> {
        let mut out = self.body();
        out.extend_from_slice(&signer.sign(DATAGRAM_REFUSAL_DOMAIN, &out));
        out
    }
}

impl SignedDatagramRefusal {
    /// Strict: exactly [`DATAGRAM_REFUSAL_LEN`] bytes, a known reason.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = open(bytes, MessageType::DatagramRefusal)?;
        let (group, member, counter) = (r.group()?, r.member()?, r.u64("counter")?);
        let code = r.u8("refusal reason")?;
        let reason = RefusalReason::from_byte(code).ok_or(DecodeError::BadValue { field: "refusal reason", value: code.into() })?;
        let signature = r.array::<SIGNATURE_LEN>("signature")?;
        r.finish()?;
        Ok(SignedDatagramRefusal { refusal: DatagramRefusal { group, member, counter, reason }, signature })
    }

    /// Decodes and checks the controller's signature.
    pub fn verify(bytes: &[u8], signer: &VerifyingKey) -> Result<DatagramRefusal, Reject> {
        let signed = SignedDatagramRefusal::decode(bytes)?;
        signer.verify_signed_message(DATAGRAM_REFUSAL_DOMAIN, bytes, &signed.signature)?;
        Ok(signed.refusal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal() -> DatagramRefusal {
        DatagramRefusal { group: GroupId(7), member: MemberId(42), counter: 1_000, reason: RefusalReason::NotMember }
    }

    #[test]
    fn a_refusal_verifies_under_its_signer_only_and_every_byte_counts() {
        let (signer, other) = (Signer::from_seed(&[1; 32]), Signer::from_seed(&[2; 32]));
        let bytes = refusal().sign(&signer);
        assert_eq!(bytes.len(), DATAGRAM_REFUSAL_LEN);
        assert_eq!(SignedDatagramRefusal::verify(&bytes, &signer.verifying_key()), Ok(refusal()));
        assert_eq!(SignedDatagramRefusal::verify(&bytes, &other.verifying_key()), Err(Reject::BadSignature));
        for i in 2..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[i] ^= 1;
            assert!(SignedDatagramRefusal::verify(&damaged, &signer.verifying_key()).is_err(), "byte {i} flipped still verifies");
        }
        for len in 0..bytes.len() {
            assert!(SignedDatagramRefusal::decode(&bytes[..len]).is_err(), "truncated to {len} decodes");
        }
    }
}
