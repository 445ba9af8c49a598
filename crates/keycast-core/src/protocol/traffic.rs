//! Application data under the group key (the Iolus client library's seal/open): each message
//! gets its own AES-256-GCM key, HKDF(salt = a fresh 16-byte nonce, ikm = group key), so the
//! GCM nonce can be fixed and no nonce is ever reused under one key. The sender's id and
//! sequence number are authenticated, so receivers can refuse replays ([`ReplayWindow`]).

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use aws_lc_rs::hkdf;

use std::collections::BTreeMap;

use crate::graph::MemberId;
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
    #[error("the controller has put {announced} in force and this member still holds {held}: it waits for the rekey (or resyncs) before sealing")]
    StaleKey { held: KeyRef, announced: KeyRef },
    #[error("replayed: message {seq} of member {sender} was already opened, or is too old to tell")]
    Replayed { sender: u64, seq: u64 },
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

/// Everything a data message authenticates besides its ciphertext.
fn aad(data: &Data) -> [u8; 52] {
    let mut out = [0u8; 52];
    out[..8].copy_from_slice(&data.group.0.to_be_bytes());
    out[8..16].copy_from_slice(&data.sender.0.to_be_bytes());
    out[16..24].copy_from_slice(&data.seq.to_be_bytes());
    out[24..36].copy_from_slice(&data.key.to_bytes());
    out[36..].copy_from_slice(&data.nonce);
    out
}

/// Seals `plaintext` from `sender` as its message `seq` under group key `key_ref`; `nonce`
/// must be fresh random bytes.
pub fn seal(
    (group, sender, seq): (GroupId, MemberId, u64),
    key_ref: KeyRef,
    key: &Key,
    nonce: [u8; DATA_NONCE_LEN],
    plaintext: &[u8],
) -> Result<Data, TrafficError> {
    if plaintext.len() > MAX_PLAINTEXT {
        return Err(TrafficError::TooLong(plaintext.len()));
    }
    let mut data = Data { group, sender, seq, key: key_ref, nonce, ciphertext: plaintext.to_vec() };
    let aad = aad(&data);
    message_key(group, key_ref, key, &nonce)
        .seal_in_place_append_tag(Nonce::assume_unique_for_key([0; 12]), Aad::from(aad), &mut data.ciphertext)
        .expect("AES-GCM seals any length below the limit");
    Ok(data)
}

/// Opens `data` with the group key it names.
pub fn open(data: &Data, key: &Key) -> Result<Vec<u8>, TrafficError> {
    let mut buffer = data.ciphertext.clone();
    let plain = message_key(data.group, data.key, key, &data.nonce)
        .open_in_place(Nonce::assume_unique_for_key([0; 12]), Aad::from(aad(data)), &mut buffer)
        .map_err(|_| TrafficError::Forged)?;
    Ok(plain.to_vec())
}

/// Senders whose windows a receiver keeps; past this the lowest sender id is forgotten (only
/// authentic messages create windows, so only members can fill it).
const MAX_SENDERS: usize = 1 << 16;
/// Messages a sender may be reordered by and still be accepted (as DTLS and SRTP).
const WINDOW: u64 = 64;

/// The receiver's replay check: per sender, the highest seq opened and which of the
/// [`WINDOW`] before it were seen.
#[derive(Clone, Debug, Default)]
pub struct ReplayWindow {
    senders: BTreeMap<MemberId, (u64, u64)>,
}

impl ReplayWindow {
    /// Refuses a (sender, seq) already opened or too far behind to tell.
    pub fn check(&self, sender: MemberId, seq: u64) -> Result<(), TrafficError> {
        let refused = TrafficError::Replayed { sender: sender.0, seq };
        match self.senders.get(&sender) {
            None => Ok(()),
            Some(&(top, _)) if seq > top => Ok(()),
            Some(&(top, _)) if top - seq >= WINDOW => Err(refused),
            Some(&(top, seen)) if seen & (1 << (top - seq)) != 0 => Err(refused),
            Some(_) => Ok(()),
        }
    }

    /// Records an opened (sender, seq); call only after [`ReplayWindow::check`] and a
    /// successful open.
    pub fn record(&mut self, sender: MemberId, seq: u64) {
        let (top, seen) = self.senders.entry(sender).or_insert((seq, 0));
        if seq > *top {
            let shift = seq - *top;
            *seen = if shift >= WINDOW { 0 } else { *seen << shift };
            *top = seq;
        }
        *seen |= 1 << (*top - seq);
        if self.senders.len() > MAX_SENDERS {
            self.senders.pop_first();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_accepts_each_seq_once_in_any_order_within_its_width() {
        let mut window = ReplayWindow::default();
        let member = MemberId(4);
        for seq in [10, 12, 11, 75, 20] {
            window.check(member, seq).unwrap();
            window.record(member, seq);
        }
        for seq in [10, 11, 12, 20, 75] {
            assert!(window.check(member, seq).is_err(), "seq {seq} again");
        }
        assert!(window.check(member, 11).is_err(), "75 - 11 >= 64: too old to tell");
        assert!(window.check(member, 13).is_ok() && window.check(member, 76).is_ok());
        assert!(window.check(MemberId(5), 10).is_ok(), "windows are per sender");
    }
}
