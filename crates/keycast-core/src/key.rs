//! Keys and key references (Caronni et al. 3.1.2).
//!
//! A [`Key`] is 256 bits of secret material that is zeroized on drop and never printed.
//! A [`KeyRef`] names one value of a key: the key id, its version (bumped when the key is
//! replaced by fresh material) and its revision (bumped when the key is passed through the
//! one-way function, which lets a joiner receive revision r+1 without learning revision r).

use core::fmt;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Length of every key in bytes.
pub const KEY_LEN: usize = 32;

/// 256 bits of secret key material.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Key([u8; KEY_LEN]);

impl Key {
    /// Wraps raw bytes; the caller's copy should be zeroized by the caller.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Key(bytes)
    }

    /// The all-zero placeholder for a slot that holds no key (never used to wrap).
    pub(crate) fn empty() -> Self {
        Key([0; KEY_LEN])
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    pub(crate) fn as_mut_bytes(&mut self) -> &mut [u8; KEY_LEN] {
        &mut self.0
    }
}

impl ConstantTimeEq for Key {
    fn ct_eq(&self, other: &Self) -> subtle::Choice {
        self.0.ct_eq(&other.0)
    }
}

/// Constant-time equality, so that comparing secrets leaks no timing.
impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.ct_eq(other).into()
    }
}
impl Eq for Key {}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

/// Identifies a key slot in a key graph. Stable for the life of the slot.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct KeyId(pub u32);

/// One value of a key: (id, version, revision), 32 bits each as in Caronni et al.
///
/// A ref names exactly one key value for the life of a group: the controller never issues
/// two different keys under one ref. Key wrapping relies on this (see [`crate::wrap`]).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct KeyRef {
    pub id: KeyId,
    pub version: u32,
    pub revision: u32,
}

impl KeyRef {
    pub const ENCODED_LEN: usize = 12;

    pub fn new(id: KeyId, version: u32, revision: u32) -> Self {
        KeyRef { id, version, revision }
    }

    /// Canonical big-endian encoding: id, version, revision.
    pub fn to_bytes(self) -> [u8; Self::ENCODED_LEN] {
        let mut out = [0u8; Self::ENCODED_LEN];
        out[0..4].copy_from_slice(&self.id.0.to_be_bytes());
        out[4..8].copy_from_slice(&self.version.to_be_bytes());
        out[8..12].copy_from_slice(&self.revision.to_be_bytes());
        out
    }

    pub fn from_bytes(bytes: [u8; Self::ENCODED_LEN]) -> Self {
        let word = |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        KeyRef { id: KeyId(word(0)), version: word(4), revision: word(8) }
    }

    /// The ref of this key passed once more through the one-way function.
    pub fn next_revision(self) -> Option<Self> {
        Some(KeyRef { revision: self.revision.checked_add(1)?, ..self })
    }

    /// True when `later` is this key advanced by zero or more revisions.
    pub fn precedes_revision_of(self, later: KeyRef) -> bool {
        self.id == later.id && self.version == later.version && self.revision <= later.revision
    }
}

impl fmt::Display for KeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#010x}v{}r{}", self.id.0, self.version, self.revision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_key_material() {
        let key = Key::from_bytes([0xAB; KEY_LEN]);
        let shown = format!("{key:?}");
        assert!(!shown.to_lowercase().contains("ab"), "{shown}");
    }

    #[test]
    fn key_ref_round_trips() {
        let r = KeyRef::new(KeyId(0xDEAD_BEEF), 7, 3);
        assert_eq!(KeyRef::from_bytes(r.to_bytes()), r);
    }
}
