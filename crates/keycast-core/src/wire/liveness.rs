//! Liveness datagrams: a member's soft-state refresh (and its resync request) over plain UDP,
//! authenticated with a key only it and the controller hold, derived from its individual key
//! (Mukkamalla and Katz 6.2, 6.3: once a member holds its individual key, liveness and
//! catch-up need no TLS). One fixed-size datagram, checked without allocating; a counter that
//! only grows refuses replays. A resync request is answered by one datagram holding the
//! member's keys, sealed (AES-256-GCM) under another key derived from its individual key.

use aws_lc_rs::{aead, hkdf, hmac};

use super::codec::Writer;
use super::guard::Reject;
use super::control::{Nak, ResyncAnswer};
use super::{message_type, open, start, DecodeError, GroupId, MessageType};
use crate::graph::MemberId;
use crate::key::Key;

/// Bytes of the HMAC-SHA256 tag.
pub const LIVENESS_TAG_LEN: usize = 32;
/// Bytes of a liveness datagram: version, type, group, member, counter, rekey seq, tag.
pub const LIVENESS_LEN: usize = 2 + 8 + 8 + 8 + 8 + LIVENESS_TAG_LEN;
const LIVENESS_KEY_LABEL: &[u8] = b"keycast/v2 liveness key";
const RESYNC_KEY_LABEL: &[u8] = b"keycast/v2 resync answer key";

/// "Member `member` of `group` is alive and has applied rekey `rekey_seq`" (and, with
/// `resync`, "send me my keys").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Liveness {
    pub group: GroupId,
    pub member: MemberId,
    /// A resync request (type 16) rather than a refresh (type 15).
    pub resync: bool,
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

/// HKDF-Expand(individual key, label || group || member) into a key of type `kind`.
fn derive<K: hkdf::KeyType, T: for<'a> From<hkdf::Okm<'a, K>>>(individual: &Key, label: &[u8], group: GroupId, member: MemberId, kind: K) -> T {
    let mut suffix = [0u8; 16];
    suffix[..8].copy_from_slice(&group.0.to_be_bytes());
    suffix[8..].copy_from_slice(&member.0.to_be_bytes());
    let prk = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, individual.as_bytes());
    let info: [&[u8]; 2] = [label, &suffix];
    T::from(prk.expand(&info, kind).expect("HKDF-SHA256 yields a 32-byte key"))
}

impl LivenessKey {
    pub fn derive(individual: &Key, group: GroupId, member: MemberId) -> LivenessKey {
        LivenessKey(derive(individual, LIVENESS_KEY_LABEL, group, member, hmac::HMAC_SHA256))
    }
}

fn kind(resync: bool) -> MessageType {
    if resync {
        MessageType::ResyncProbe
    } else {
        MessageType::Liveness
    }
}

fn body(liveness: &Liveness) -> Vec<u8> {
    let mut body = start(kind(liveness.resync), LIVENESS_LEN);
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
        let resync = message_type(bytes)? == MessageType::ResyncProbe;
        let mut r = open(bytes, kind(resync))?;
        let (group, member) = (r.group()?, r.member()?);
        let liveness = Liveness { group, member, resync, counter: r.u64("counter")?, rekey_seq: r.u64("rekey seq")? };
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

impl Nak {
    /// The NAK with its tag under the member's liveness key, encoded.
    pub fn seal(mut self, key: &LivenessKey) -> Vec<u8> {
        let tag = hmac::sign(&key.0, &self.body());
        self.tag.copy_from_slice(tag.as_ref());
        self.encode()
    }

    /// Decodes `bytes` and checks its tag under `key` (in constant time).
    pub fn open(bytes: &[u8], key: &LivenessKey) -> Result<Nak, Reject> {
        let nak = Nak::decode(bytes)?;
        hmac::verify(&key.0, &bytes[..bytes.len() - LIVENESS_TAG_LEN], &nak.tag).map_err(|_| Reject::BadSignature)?;
        Ok(nak)
    }
}

/// The AES-256-GCM key that seals a resync answer to one member: HKDF-Expand(individual key,
/// "keycast/v2 resync answer key" || group || member).
pub struct ResyncAnswerKey(aead::LessSafeKey);

impl core::fmt::Debug for ResyncAnswerKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("ResyncAnswerKey(<redacted>)")
    }
}

impl ResyncAnswerKey {
    pub fn derive(individual: &Key, group: GroupId, member: MemberId) -> ResyncAnswerKey {
        let key: aead::UnboundKey = derive(individual, RESYNC_KEY_LABEL, group, member, &aead::AES_256_GCM);
        ResyncAnswerKey(aead::LessSafeKey::new(key))
    }
}

/// Bytes of a sealed resync answer before the sealed answer: version, type, group, member,
/// the request's counter, nonce.
pub const SEALED_RESYNC_HEADER_LEN: usize = 2 + 8 + 8 + 8 + 12;

/// A resync answer over UDP (type 17): the encoded [`ResyncAnswer`], sealed under the member's
/// [`ResyncAnswerKey`] with the header as associated data; `counter` names the request it
/// answers, so an old answer replayed is not taken for a new one.
pub fn seal_resync_answer(answer: &ResyncAnswer, counter: u64, key: &ResyncAnswerKey, nonce: [u8; 12]) -> Vec<u8> {
    let plain = zeroize::Zeroizing::new(answer.encode());
    let mut out = start(MessageType::SealedResync, SEALED_RESYNC_HEADER_LEN + plain.len() + aead::AES_256_GCM.tag_len());
    out.put_u64(answer.group.0);
    out.put_u64(answer.member.0);
    out.put_u64(counter);
    out.extend_from_slice(&nonce);
    let header_len = out.len();
    out.extend_from_slice(&plain);
    let (header, body) = out.split_at_mut(header_len);
    let tag = key
        .0
        .seal_in_place_separate_tag(aead::Nonce::assume_unique_for_key(nonce), aead::Aad::from(&*header), body)
        .expect("AES-256-GCM seals any answer");
    out.extend_from_slice(tag.as_ref());
    out
}

/// The header of a sealed resync answer: group, member, counter.
pub fn peek_resync_answer(bytes: &[u8]) -> Result<(GroupId, MemberId, u64), DecodeError> {
    let mut r = open(bytes, MessageType::SealedResync)?;
    let fields = (r.group()?, r.member()?, r.u64("counter")?);
    r.take(12 + aead::AES_256_GCM.tag_len(), "nonce and tag")?;
    Ok(fields)
}

/// Opens a sealed resync answer and decodes the answer in it (strictly, and for the group and
/// member the header names).
pub fn open_resync_answer(bytes: &[u8], key: &ResyncAnswerKey) -> Result<(ResyncAnswer, u64), Reject> {
    let (group, member, counter) = peek_resync_answer(bytes)?;
    let (header, sealed) = bytes.split_at(SEALED_RESYNC_HEADER_LEN);
    let nonce = aead::Nonce::try_assume_unique_for_key(&header[SEALED_RESYNC_HEADER_LEN - 12..]).map_err(|_| Reject::BadSignature)?;
    let mut buffer = zeroize::Zeroizing::new(sealed.to_vec());
    let plain = key.0.open_in_place(nonce, aead::Aad::from(header), &mut buffer[..]).map_err(|_| Reject::BadSignature)?;
    let answer = ResyncAnswer::decode(plain)?;
    if answer.group != group || answer.member != member {
        return Err(Reject::WrongGroup { expected: group, got: answer.group });
    }
    Ok((answer, counter))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8, member: u64) -> LivenessKey {
        LivenessKey::derive(&Key::from_bytes([byte; 32]), GroupId(1), MemberId(member))
    }

    #[test]
    fn a_sealed_datagram_opens_under_its_key_only() {
        let live = Liveness { group: GroupId(1), member: MemberId(7), resync: false, counter: 1_000, rekey_seq: 4 };
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
        let bytes = Liveness { group: GroupId(1), member: MemberId(7), resync: true, counter: 1, rekey_seq: 0 }.seal(&key(3, 7));
        assert!(Liveness::peek(&bytes).unwrap().resync, "a resync request stays one");
        assert!(matches!(Liveness::peek(&bytes[..LIVENESS_LEN - 1]), Err(DecodeError::Truncated { .. })));
        assert!(matches!(Liveness::peek(&[&bytes[..], &[0]].concat()), Err(DecodeError::TrailingBytes(1))));
        assert!(format!("{:?}", key(3, 7)).contains("redacted"));
    }
}
