//! Key wrapping and key derivation.
//!
//! A wrap is AES-256-GCM (aws-lc-rs, the provider rustls uses) keyed by the wrapping key,
//! over the 32-byte wrapped key, with the refs of both keys as associated data.
//! `benches/wrap_candidates.rs` measures the alternatives; see the README for the figures.
//!
//! Nonce: the 12-byte ref of the wrapped key XOR the rekey's 12-byte nonce salt, drawn from
//! the batch's seed. Within one rekey refs are distinct, so nonces are; across rekeys the
//! salts are independent random values. A ref alone would not do: a controller restarted from
//! an older copy of its log reuses refs for new keys, and the same (key, nonce) would then seal
//! two plaintexts. Replaying a logged batch redraws the same salt and the same keys, which
//! re-creates the same ciphertexts and reveals nothing new.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use aws_lc_rs::hkdf;

use crate::key::{Key, KeyRef, KEY_LEN};

/// Bytes of a sealed key: ciphertext plus the 16-byte tag.
pub const SEALED_LEN: usize = KEY_LEN + 16;
/// Bytes of a rekey's nonce salt (one AES-GCM nonce).
pub const SALT_LEN: usize = 12;
/// Bytes of a key check value.
pub const CHECK_LEN: usize = 8;

/// A rekey's nonce salt: every wrap of the rekey is sealed under nonce = wrapped ref XOR salt.
pub type NonceSalt = [u8; SALT_LEN];
/// A key check value: lets a member see that a key it holds is not the one a heartbeat names,
/// without revealing anything of the key (a one-way function of it).
pub type KeyCheck = [u8; CHECK_LEN];

const REVISION_LABEL: &[u8] = b"keycast/v1 revision";
const FLAT_KEK_LABEL: &[u8] = b"keycast/v1 flat kek";
const KEY_CHECK_LABEL: &[u8] = b"keycast/v2 key check";

/// The key a wrap was sealed under.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Wrapper {
    /// An ordinary key (KEK, TEK or individual key).
    Key(KeyRef),
    /// Caronni's flat leave: the one-time key derived from an old KEK and the new TEK, so that
    /// only members who held the KEK *and* can obtain the new TEK can unwrap.
    KekAndTek { kek: KeyRef, tek: KeyRef },
}

impl Wrapper {
    /// Bytes of the canonical encoding: a tag byte then one or two refs.
    pub fn encoded_len(&self) -> usize {
        match self {
            Wrapper::Key(_) => 1 + KeyRef::ENCODED_LEN,
            Wrapper::KekAndTek { .. } => 1 + 2 * KeyRef::ENCODED_LEN,
        }
    }

    /// Writes the canonical encoding into `out`, returning the bytes written.
    pub fn write_to(&self, out: &mut [u8]) -> usize {
        const R: usize = KeyRef::ENCODED_LEN;
        match self {
            Wrapper::Key(r) => {
                out[0] = 0;
                out[1..1 + R].copy_from_slice(&r.to_bytes());
            }
            Wrapper::KekAndTek { kek, tek } => {
                out[0] = 1;
                out[1..1 + R].copy_from_slice(&kek.to_bytes());
                out[1 + R..1 + 2 * R].copy_from_slice(&tek.to_bytes());
            }
        }
        self.encoded_len()
    }
}

/// One key sealed under another: the unit of every rekey.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Wrap {
    /// The key this wrap delivers.
    pub key: KeyRef,
    /// What it is sealed under.
    pub under: Wrapper,
    /// AES-256-GCM ciphertext and tag.
    pub sealed: [u8; SEALED_LEN],
    /// The rekey's nonce salt (carried once per packet on the wire).
    pub salt: NonceSalt,
}

/// Authentication failed: the wrap was tampered with or the wrong key was used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("wrap of {key} under {under:?} failed authentication")]
pub struct UnwrapError {
    pub key: KeyRef,
    pub under: Wrapper,
}

impl Wrap {
    /// Bytes of this wrap on the wire (wrapped ref, wrapper, sealed key).
    pub fn encoded_len(&self) -> usize {
        KeyRef::ENCODED_LEN + self.under.encoded_len() + SEALED_LEN
    }

    /// Seals `key` (named `key_ref`) under `wrapping_key` (named by `under`), with the rekey's
    /// nonce salt.
    pub fn seal(wrapping_key: &Key, under: Wrapper, key_ref: KeyRef, key: &Key, salt: &NonceSalt) -> Wrap {
        let aead = aead_key(wrapping_key);
        let mut sealed = [0u8; SEALED_LEN];
        sealed[..KEY_LEN].copy_from_slice(key.as_bytes());
        let aad = aad_bytes(key_ref, &under);
        let tag = aead
            .seal_in_place_separate_tag(nonce(key_ref, salt), Aad::from(&aad[..]), &mut sealed[..KEY_LEN])
            .expect("AES-256-GCM seals 32 bytes");
        sealed[KEY_LEN..].copy_from_slice(tag.as_ref());
        Wrap { key: key_ref, under, sealed, salt: *salt }
    }

    /// Opens this wrap with the key it claims to be sealed under.
    pub fn open(&self, wrapping_key: &Key) -> Result<Key, UnwrapError> {
        let aead = aead_key(wrapping_key);
        let mut buf = self.sealed;
        let aad = aad_bytes(self.key, &self.under);
        let result = aead
            .open_in_place(nonce(self.key, &self.salt), Aad::from(&aad[..]), &mut buf)
            .map(|plain| {
                let mut bytes = [0u8; KEY_LEN];
                bytes.copy_from_slice(plain);
                Key::from_bytes(bytes)
            })
            .map_err(|_| UnwrapError { key: self.key, under: self.under });
        zeroize::Zeroize::zeroize(&mut buf);
        result
    }
}

fn aead_key(key: &Key) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key.as_bytes()).expect("32-byte AES-256 key"))
}

/// The AES-GCM nonce of a wrap (public so that audits can check nonces are never reused).
pub fn wrap_nonce(key_ref: KeyRef, salt: &NonceSalt) -> [u8; SALT_LEN] {
    let mut nonce = key_ref.to_bytes();
    for (n, s) in nonce.iter_mut().zip(salt) {
        *n ^= s;
    }
    nonce
}

fn nonce(key_ref: KeyRef, salt: &NonceSalt) -> Nonce {
    Nonce::assume_unique_for_key(wrap_nonce(key_ref, salt))
}

/// The key check value of `key` (named `key_ref`): HKDF-Expand(key, label || ref), 8 bytes.
pub fn key_check(key: &Key, key_ref: KeyRef) -> KeyCheck {
    let prk = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, key.as_bytes());
    let mut check = [0u8; CHECK_LEN];
    prk.expand(&[KEY_CHECK_LABEL, &key_ref.to_bytes()], CheckLen)
        .and_then(|okm| okm.fill(&mut check))
        .expect("HKDF-SHA256 yields 8 bytes");
    check
}

struct CheckLen;

impl hkdf::KeyType for CheckLen {
    fn len(&self) -> usize {
        CHECK_LEN
    }
}

const MAX_AAD: usize = 3 * KeyRef::ENCODED_LEN + 1;

/// Associated data: wrapped ref then wrapper, on the stack (this is the hot path).
struct AadBytes([u8; MAX_AAD], usize);

impl core::ops::Deref for AadBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0[..self.1]
    }
}

fn aad_bytes(key_ref: KeyRef, under: &Wrapper) -> AadBytes {
    let mut aad = [0u8; MAX_AAD];
    aad[..KeyRef::ENCODED_LEN].copy_from_slice(&key_ref.to_bytes());
    let len = KeyRef::ENCODED_LEN + under.write_to(&mut aad[KeyRef::ENCODED_LEN..]);
    AadBytes(aad, len)
}

/// The one-way function that advances a key by one revision (Caronni 3.1.2):
/// HKDF-Expand(key, label || new ref). Holders of revision r compute r+1; not the reverse.
pub fn next_revision(key: &Key, current: KeyRef) -> Option<(KeyRef, Key)> {
    let next = current.next_revision()?;
    let prk = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, key.as_bytes());
    let info = next.to_bytes();
    Some((next, expand(&prk, &[REVISION_LABEL, &info])))
}

/// Most revisions a holder derives in one step (about 2 ms of HKDF). A ref further ahead is
/// treated as unknown, so a message naming revision 2^32-1 cannot make a member hash for
/// hours (found by the reassembly fuzz target); a member that far behind resyncs instead.
pub const MAX_REVISION_GAP: u32 = 4096;

/// Advances `key` (at `from`) to revision `to.revision`; None unless `from` precedes `to`
/// by at most [`MAX_REVISION_GAP`].
pub fn derive_revision(key: &Key, from: KeyRef, to: KeyRef) -> Option<Key> {
    if !from.precedes_revision_of(to) || to.revision - from.revision > MAX_REVISION_GAP {
        return None;
    }
    let mut current = (from, key.clone());
    while current.0.revision < to.revision {
        current = next_revision(&current.1, current.0)?;
    }
    Some(current.1)
}

/// Caronni's "function of the old KEK and the new TEK" for flat leaves:
/// HKDF(salt = new TEK, ikm = old KEK, info = label || kek ref || tek ref).
pub fn flat_replacement_wrapping_key(old_kek: &Key, kek: KeyRef, new_tek: &Key, tek: KeyRef) -> Key {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, new_tek.as_bytes()).extract(old_kek.as_bytes());
    expand(&prk, &[FLAT_KEK_LABEL, &kek.to_bytes(), &tek.to_bytes()])
}

fn expand(prk: &hkdf::Prk, info: &[&[u8]]) -> Key {
    let mut out = Key::empty();
    prk.expand(info, hkdf::HKDF_SHA256)
        .and_then(|okm| okm.fill(out.as_mut_bytes()))
        .expect("HKDF-SHA256 yields 32 bytes");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::KeyId;

    fn key(b: u8) -> Key {
        Key::from_bytes([b; KEY_LEN])
    }

    #[test]
    fn wrap_round_trips_and_binds_refs() {
        let kek_ref = KeyRef::new(KeyId(1), 1, 0);
        let key_ref = KeyRef::new(KeyId(2), 5, 0);
        let wrap = Wrap::seal(&key(1), Wrapper::Key(kek_ref), key_ref, &key(9), &[5; SALT_LEN]);
        assert_eq!(wrap.open(&key(1)).unwrap(), key(9));
        assert!(wrap.open(&key(2)).is_err(), "wrong key must fail");
        let mut relabelled = wrap.clone();
        relabelled.key.version = 6;
        assert!(relabelled.open(&key(1)).is_err(), "refs are authenticated");
        let mut flipped = wrap.clone();
        flipped.sealed[3] ^= 1;
        assert!(flipped.open(&key(1)).is_err(), "ciphertext is authenticated");
        let mut resalted = wrap.clone();
        resalted.salt[0] ^= 1;
        assert!(resalted.open(&key(1)).is_err(), "the salt is part of the nonce");
    }

    #[test]
    fn one_ref_under_two_salts_gets_two_nonces_and_checks_tell_keys_apart() {
        let r = KeyRef::new(KeyId(2), 5, 0);
        assert_ne!(wrap_nonce(r, &[1; SALT_LEN]), wrap_nonce(r, &[2; SALT_LEN]));
        assert_eq!(key_check(&key(1), r), key_check(&key(1), r));
        assert_ne!(key_check(&key(1), r), key_check(&key(2), r));
        assert_ne!(key_check(&key(1), r), key_check(&key(1), KeyRef { version: 6, ..r }));
    }

    #[test]
    fn revisions_go_forward_only() {
        let r0 = KeyRef::new(KeyId(7), 2, 0);
        let (r1, k1) = next_revision(&key(3), r0).unwrap();
        assert_eq!(r1.revision, 1);
        assert_ne!(k1, key(3));
        let r3 = KeyRef { revision: 3, ..r0 };
        let k3 = derive_revision(&key(3), r0, r3).unwrap();
        assert_eq!(derive_revision(&k1, r1, r3).unwrap(), k3);
        assert!(derive_revision(&k3, r3, r1).is_none(), "no way back");
        assert!(derive_revision(&key(3), r0, KeyRef { version: 3, ..r1 }).is_none());
    }
}
