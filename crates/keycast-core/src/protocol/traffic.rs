//! Application data under the group key (the Iolus client library's seal/open): each message
//! gets its own AES-256-GCM key, HKDF(salt = a fresh 16-byte nonce, ikm = group key), so the
//! GCM nonce can be fixed and no nonce is ever reused under one key.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use aws_lc_rs::hkdf;

use crate::key::{Key, KeyRef};
use crate::wire::control::{Data, DATA_NONCE_LEN, MAX_DATA_LEN};
use crate::wire::GroupId;

const DATA_LABEL: &[u8] = b"keycast/v1 data";
const TAG_LEN: usize = 16;
/// Largest plaintext one data message carries.
pub const MAX_PLAINTEXT: usize = MAX_DATA_LEN - TAG_LEN;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrafficError {
    #[error("plaintext of {0} bytes exceeds {MAX_PLAINTEXT}")]
    TooLong(usize),
    #[error("data for group {0:?}, not this group")]
    WrongGroup(GroupId),
    #[error("sealed under {0}, a key this member does not hold")]
    UnknownKey(KeyRef),
    #[error("data failed authentication")]
    Forged,
    #[error("no group key is in force yet (a joiner waits for its activation epoch)")]
    NoActiveKey,
}

fn message_key(group: GroupId, key_ref: KeyRef, key: &Key, nonce: &[u8; DATA_NONCE_LEN]) -> LessSafeKey {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, nonce).extract(key.as_bytes());
    let group_bytes = group.0.to_be_bytes();
    let ref_bytes = key_ref.to_bytes();
    let info = [DATA_LABEL, &group_bytes[..], &ref_bytes[..]];
    let mut bytes = [0u8; 32];
    prk.expand(&info, hkdf::HKDF_SHA256).and_then(|okm| okm.fill(&mut bytes)).expect("HKDF-SHA256 yields 32 bytes");
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &bytes).expect("32-byte key"));
    zeroize::Zeroize::zeroize(&mut bytes);
    key
}

fn aad(group: GroupId, key_ref: KeyRef, nonce: &[u8; DATA_NONCE_LEN]) -> [u8; 36] {
    let mut out = [0u8; 36];
    out[..8].copy_from_slice(&group.0.to_be_bytes());
    out[8..20].copy_from_slice(&key_ref.to_bytes());
    out[20..].copy_from_slice(nonce);
    out
}

/// Seals `plaintext` under group key `key_ref`; `nonce` must be fresh random bytes.
pub fn seal(group: GroupId, key_ref: KeyRef, key: &Key, nonce: [u8; DATA_NONCE_LEN], plaintext: &[u8]) -> Result<Data, TrafficError> {
    if plaintext.len() > MAX_PLAINTEXT {
        return Err(TrafficError::TooLong(plaintext.len()));
    }
    let mut ciphertext = plaintext.to_vec();
    message_key(group, key_ref, key, &nonce)
        .seal_in_place_append_tag(Nonce::assume_unique_for_key([0; 12]), Aad::from(aad(group, key_ref, &nonce)), &mut ciphertext)
        .expect("AES-GCM seals any length below the limit");
    Ok(Data { group, key: key_ref, nonce, ciphertext })
}

/// Opens `data` with the group key it names.
pub fn open(data: &Data, key: &Key) -> Result<Vec<u8>, TrafficError> {
    let mut buffer = data.ciphertext.clone();
    let plain = message_key(data.group, data.key, key, &data.nonce)
        .open_in_place(Nonce::assume_unique_for_key([0; 12]), Aad::from(aad(data.group, data.key, &data.nonce)), &mut buffer)
        .map_err(|_| TrafficError::Forged)?;
    Ok(plain.to_vec())
}
