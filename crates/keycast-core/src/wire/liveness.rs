//! Liveness datagrams: a member's soft-state refresh over plain UDP, authenticated with a key
//! only it and the controller hold, derived from its individual key (Mukkamalla and Katz 6.2:
//! once a member holds its individual key, liveness needs no TLS). One fixed-size datagram,
//! checked without allocating; a counter that only grows refuses replays.

use aws_lc_rs::{hkdf, hmac};

use super::codec::Writer;
use super::guard::Reject;
use super::{open, start, DecodeError, GroupId, MessageType};
use crate::graph::MemberId;
use crate::key::Key;

/// Bytes of the HMAC-SHA256 tag.
pub const LIVENESS_TAG_LEN: usize = 32;
/// Bytes of a liveness datagram: version, type, group, member, counter, rekey seq, tag.
pub const LIVENESS_LEN: usize = 2 + 8 + 8 + 8 + 8 + LIVENESS_TAG_LEN;
const LIVENESS_KEY_LABEL: &[u8] = b"keycast/v2 liveness key";

/// "Member `member` of `group` is alive and has applied rekey `rekey_seq`."
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Liveness {
    pub group: GroupId,
    pub member: MemberId,
    /// Grows with every datagram the member sends (its clock in ms, or one more than before).
    pub counter: u64,
    pub rekey_seq: u64,
}

/// HMAC-SHA256 key for one member's liveness datagrams: HKDF-Expand(individual key,
/// label || group || member). Debug never shows it.
pub struct LivenessKey(hmac::Key);

impl core::fmt::Debug for LivenessKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("LivenessKey(<redacted>)")
    }
}

impl LivenessKey {
    pub fn derive(individual: &Key, group: GroupId, member: MemberId) -> LivenessKey {
        let mut info = [0u8; LIVENESS_KEY_LABEL.len() + 16];
        info[..LIVENESS_KEY_LABEL.len()].copy_from_slice(LIVENESS_KEY_LABEL);
        info[LIVENESS_KEY_LABEL.len()..][..8].copy_from_slice(&group.0.to_be_bytes());
        info[LIVENESS_KEY_LABEL.len() + 8..].copy_from_slice(&member.0.to_be_bytes());
        let prk = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, individual.as_bytes());
        let info = [&info[..]];
        let okm = prk.expand(&info, hmac::HMAC_SHA256).expect("HKDF-SHA256 yields an HMAC-SHA256 key");
        LivenessKey(hmac::Key::from(okm))
    }
}

fn body(liveness: &Liveness) -> Vec<u8> {
    let mut body = start(MessageType::Liveness, LIVENESS_LEN);
    body.put_u64(liveness.group.0);
    body.put_u64(liveness.member.0);
    body.put_u64(liveness.counter);
    body.put_u64(liveness.rekey_seq);
    body
}

/// The datagram with a given tag (re-encoding a decoded one; the tag is not checked).
pub(crate) fn encode_with_tag(liveness: &Liveness, tag: &[u8; LIVENESS_TAG_LEN]) -> Vec<u8> {
    let mut out = body(liveness);
    out.extend_from_slice(tag);
    out
}

impl Liveness {
    /// The datagram, tagged under `key`.
    pub fn seal(&self, key: &LivenessKey) -> [u8; LIVENESS_LEN] {
        let body = body(self);
        let tag = hmac::sign(&key.0, &body);
        let mut out = [0u8; LIVENESS_LEN];
        out[..LIVENESS_LEN - LIVENESS_TAG_LEN].copy_from_slice(&body);
        out[LIVENESS_LEN - LIVENESS_TAG_LEN..].copy_from_slice(tag.as_ref());
        out
    }

    /// The datagram's fields, before its tag is checked (to find the member's key). Strict:
    /// exactly [`LIVENESS_LEN`] bytes of the right version and type.
    pub fn peek(bytes: &[u8]) -> Result<Liveness, DecodeError> {
        let mut r = open(bytes, MessageType::Liveness)?;
        let liveness = Liveness { group: r.group()?, member: r.member()?, counter: r.u64("counter")?, rekey_seq: r.u64("rekey seq")? };
        r.take(LIVENESS_TAG_LEN, "tag")?;
        r.finish()?;
        Ok(liveness)
    }

    /// Checks the tag under `key` (in constant time) and returns the fields.
    pub fn open(bytes: &[u8], key: &LivenessKey) -> Result<Liveness, Reject> {
        let liveness = Liveness::peek(bytes)?;
        let (body, tag) = bytes.split_at(LIVENESS_LEN - LIVENESS_TAG_LEN);
        hmac::verify(&key.0, body, tag).map_err(|_| Reject::BadSignature)?;
        Ok(liveness)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8, member: u64) -> LivenessKey {
        LivenessKey::derive(&Key::from_bytes([byte; 32]), GroupId(1), MemberId(member))
    }

    #[test]
    fn a_sealed_datagram_opens_under_its_key_only() {
        let live = Liveness { group: GroupId(1), member: MemberId(7), counter: 1_000, rekey_seq: 4 };
        let bytes = live.seal(&key(3, 7));
        assert_eq!(Liveness::open(&bytes, &key(3, 7)), Ok(live));
        assert_eq!(Liveness::open(&bytes, &key(4, 7)), Err(Reject::BadSignature), "another individual key");
        assert_eq!(Liveness::open(&bytes, &key(3, 8)), Err(Reject::BadSignature), "another member's derivation");
        for at in 0..LIVENESS_LEN {
            let mut forged = bytes;
            forged[at] ^= 1;
            assert!(Liveness::open(&forged, &key(3, 7)).is_err(), "byte {at} changed and still opened");
        }
    }

    #[test]
    fn wrong_lengths_are_decode_errors() {
        let bytes = Liveness { group: GroupId(1), member: MemberId(7), counter: 1, rekey_seq: 0 }.seal(&key(3, 7));
        assert!(matches!(Liveness::peek(&bytes[..LIVENESS_LEN - 1]), Err(DecodeError::Truncated { .. })));
        assert!(matches!(Liveness::peek(&[&bytes[..], &[0]].concat()), Err(DecodeError::TrailingBytes(1))));
        assert!(format!("{:?}", key(3, 7)).contains("redacted"));
    }
}
