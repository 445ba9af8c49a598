//! Application data under the group key, with message-key indirection (Iolus): each message
//! gets a fresh random 32-byte message key that seals its payload (AES-256-GCM; the key seals
//! one plaintext, so the GCM nonce can be fixed), and that key is wrapped with AES-256-GCM under
//! a wrap key derived from the group key (HKDF-SHA256, label and the key's group and ref), with
//! a fresh random nonce. An intermediary carries a message into another group by re-wrapping
//! only the 32-byte message key ([`rewrap`]); the payload crosses untouched.
//!
//! The payload authenticates (origin, sender, seq), so receivers can refuse replays
//! ([`ReplayWindow`]); the wrap authenticates the whole header, hops included.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use aws_lc_rs::hkdf;

use std::collections::BTreeMap;

use crate::graph::MemberId;
use crate::key::{Key, KeyRef, KEY_LEN};
use crate::wire::control::{Data, DATA_NONCE_LEN, DATA_TAG_LEN, MAX_DATA_LEN, MAX_HOPS, WRAPPED_MESSAGE_KEY_LEN};
use crate::wire::GroupId;

const WRAP_KEY_LABEL: &[u8] = b"keycast/v2 data wrap key";
/// Largest plaintext one data message carries.
pub const MAX_PLAINTEXT: usize = MAX_DATA_LEN - DATA_TAG_LEN;

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
    #[error("replayed: message {seq} of member {sender} of group {origin:?} was already opened, or is too old to tell")]
    Replayed { origin: GroupId, sender: u64, seq: u64 },
    #[error("data has crossed {MAX_HOPS} intermediaries: not relayed further")]
    TooManyHops,
}

/// The key that wraps message keys under one group key: derived once per group key (a relay
/// keeps it for every message under that key).
pub struct WrapKey {
    group: GroupId,
    key_ref: KeyRef,
    aead: LessSafeKey,
}

impl core::fmt::Debug for WrapKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("WrapKey").field("group", &self.group).field("key_ref", &self.key_ref).finish_non_exhaustive()
    }
}

impl WrapKey {
    /// The wrap key of group key `key` (named `key_ref`) of `group`.
    pub fn derive(group: GroupId, key_ref: KeyRef, key: &Key) -> WrapKey {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &[]).extract(key.as_bytes());
        let group_bytes = group.0.to_be_bytes();
        let ref_bytes = key_ref.to_bytes();
        let info = [WRAP_KEY_LABEL, &group_bytes[..], &ref_bytes[..]];
        let mut bytes = [0u8; KEY_LEN];
        prk.expand(&info, hkdf::HKDF_SHA256).and_then(|okm| okm.fill(&mut bytes)).expect("HKDF-SHA256 yields 32 bytes");
        let aead = aead_key(&bytes);
        zeroize::Zeroize::zeroize(&mut bytes);
        WrapKey { group, key_ref, aead }
    }

    pub fn group(&self) -> GroupId {
        self.group
    }

    pub fn key_ref(&self) -> KeyRef {
        self.key_ref
    }

    fn wrap(&self, data: &mut Data, message_key: &Key) {
        let mut sealed = [0u8; WRAPPED_MESSAGE_KEY_LEN];
        sealed[..KEY_LEN].copy_from_slice(message_key.as_bytes());
        let tag = self
            .aead
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(data.nonce), Aad::from(header(data)), &mut sealed[..KEY_LEN])
            .expect("AES-256-GCM seals 32 bytes");
        sealed[KEY_LEN..].copy_from_slice(tag.as_ref());
        data.wrapped_key = sealed;
    }

    /// The message key of `data`, if it is wrapped under this key and authentic.
    fn unwrap(&self, data: &Data) -> Result<Key, TrafficError> {
        if data.group != self.group {
            return Err(TrafficError::WrongGroup(data.group));
        }
        if data.key != self.key_ref {
            return Err(TrafficError::UnknownKey(data.key));
        }
        let mut buffer = data.wrapped_key;
        let opened = self
            .aead
            .open_in_place(Nonce::assume_unique_for_key(data.nonce), Aad::from(header(data)), &mut buffer)
            .map(|plain| Key::from_bytes(plain.try_into().expect("a 32-byte message key")))
            .map_err(|_| TrafficError::Forged);
        zeroize::Zeroize::zeroize(&mut buffer);
        opened
    }
}

fn aead_key(bytes: &[u8; KEY_LEN]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).expect("32-byte AES-256 key"))
}

/// What the wrap authenticates: every field but the nonce, the wrapped key and the ciphertext.
fn header(data: &Data) -> [u8; 45] {
    let mut out = [0u8; 45];
    out[..8].copy_from_slice(&data.group.0.to_be_bytes());
    out[8..20].copy_from_slice(&data.key.to_bytes());
    out[20..44].copy_from_slice(&end_to_end(data));
    out[44] = data.hops;
    out
}

/// What the payload authenticates: the message's name end to end, which no hop changes.
fn end_to_end(data: &Data) -> [u8; 24] {
    let mut out = [0u8; 24];
    out[..8].copy_from_slice(&data.origin.0.to_be_bytes());
    out[8..16].copy_from_slice(&data.sender.0.to_be_bytes());
    out[16..].copy_from_slice(&data.seq.to_be_bytes());
    out
}

/// One group's keys as a relay sees them: those data may be wrapped under now (previous,
/// active, next) and the one to wrap under (none while the holder may not seal).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrafficKeys {
    pub group: GroupId,
    pub sealing: Option<KeyRef>,
    pub keys: Vec<(KeyRef, Key)>,
}

/// Fresh random bytes for one message: its message key and its wrap nonce.
pub struct Fresh {
    pub message_key: [u8; KEY_LEN],
    pub nonce: [u8; DATA_NONCE_LEN],
}

/// Seals `plaintext` from `sender` of `origin` as its message `seq`, wrapping the message key
/// under `wrap_key` (of the sender's group).
pub fn seal((origin, sender, seq): (GroupId, MemberId, u64), wrap_key: &WrapKey, fresh: Fresh, plaintext: &[u8]) -> Result<Data, TrafficError> {
    if plaintext.len() > MAX_PLAINTEXT {
        return Err(TrafficError::TooLong(plaintext.len()));
    }
    let message_key = Key::from_bytes(fresh.message_key);
    let mut data = Data {
        group: wrap_key.group,
        key: wrap_key.key_ref,
        origin,
        sender,
        seq,
        hops: 0,
        nonce: fresh.nonce,
        wrapped_key: [0; WRAPPED_MESSAGE_KEY_LEN],
        ciphertext: plaintext.to_vec(),
    };
    aead_key(message_key.as_bytes())
        .seal_in_place_append_tag(Nonce::assume_unique_for_key([0; 12]), Aad::from(end_to_end(&data)), &mut data.ciphertext)
        .expect("AES-GCM seals any length below the limit");
    wrap_key.wrap(&mut data, &message_key);
    Ok(data)
}

/// Opens `data` with the wrap key of the group key it names.
pub fn open(data: &Data, wrap_key: &WrapKey) -> Result<Vec<u8>, TrafficError> {
    let message_key = wrap_key.unwrap(data)?;
    let mut buffer = data.ciphertext.clone();
    let plain = aead_key(message_key.as_bytes())
        .open_in_place(Nonce::assume_unique_for_key([0; 12]), Aad::from(end_to_end(data)), &mut buffer)
        .map_err(|_| TrafficError::Forged)?;
    Ok(plain.to_vec())
}

/// What an intermediary does: unwraps the message key of `data` with `from` and wraps it under
/// `to` with a fresh `nonce`, one hop further; the payload is moved, never read.
pub fn rewrap(data: Data, from: &WrapKey, to: &WrapKey, nonce: [u8; DATA_NONCE_LEN]) -> Result<Data, TrafficError> {
    let message_key = next_hop_key(&data, from)?;
    Ok(wrapped_for(data, &message_key, to, nonce))
}

/// What a reflector does: copies of `data` (authenticated under `from`) with the message key
/// re-wrapped under each of `to`, one hop further, each with a nonce from `nonce`. The message
/// key is opened once, also when `to` is empty (the message is then only authenticated).
pub fn rewrap_to_each(
    data: &Data,
    from: &WrapKey,
    to: &[&WrapKey],
    mut nonce: impl FnMut() -> [u8; DATA_NONCE_LEN],
) -> Result<Vec<Data>, TrafficError> {
    let message_key = next_hop_key(data, from)?;
    Ok(to.iter().map(|to| wrapped_for(data.clone(), &message_key, to, nonce())).collect())
}

/// The message key of `data`, if it is authentic under `from` and may cross one more hop.
fn next_hop_key(data: &Data, from: &WrapKey) -> Result<Key, TrafficError> {
    let message_key = from.unwrap(data)?;
    if data.hops >= MAX_HOPS {
        return Err(TrafficError::TooManyHops);
    }
    Ok(message_key)
}

fn wrapped_for(mut data: Data, message_key: &Key, to: &WrapKey, nonce: [u8; DATA_NONCE_LEN]) -> Data {
    (data.group, data.key, data.hops, data.nonce) = (to.group, to.key_ref, data.hops + 1, nonce);
    to.wrap(&mut data, message_key);
    data
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
    senders: BTreeMap<(GroupId, MemberId), (u64, u64)>,
}

impl ReplayWindow {
    /// Refuses an (origin, sender, seq) already opened or too far behind to tell.
    pub fn check(&self, origin: GroupId, sender: MemberId, seq: u64) -> Result<(), TrafficError> {
        let refused = TrafficError::Replayed { origin, sender: sender.0, seq };
        match self.senders.get(&(origin, sender)) {
            None => Ok(()),
            Some(&(top, _)) if seq > top => Ok(()),
            Some(&(top, _)) if top - seq >= WINDOW => Err(refused),
            Some(&(top, seen)) if seen & (1 << (top - seq)) != 0 => Err(refused),
            Some(_) => Ok(()),
        }
    }

    /// The highest seq recorded from (origin, sender), if any.
    pub fn newest(&self, origin: GroupId, sender: MemberId) -> Option<u64> {
        self.senders.get(&(origin, sender)).map(|&(top, _)| top)
    }

    /// Records an opened (origin, sender, seq); call only after [`ReplayWindow::check`] and a
    /// successful open.
    pub fn record(&mut self, origin: GroupId, sender: MemberId, seq: u64) {
        let (top, seen) = self.senders.entry((origin, sender)).or_insert((seq, 0));
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
    use crate::key::KeyId;

    const PARENT: GroupId = GroupId(1);
    const SUBGROUP: GroupId = GroupId(2);

    fn wrap_key(group: GroupId, byte: u8) -> WrapKey {
        WrapKey::derive(group, KeyRef::new(KeyId(byte.into()), 1, 0), &Key::from_bytes([byte; 32]))
    }

    fn sealed(plaintext: &[u8]) -> Data {
        let fresh = Fresh { message_key: [7; 32], nonce: [9; 12] };
        seal((SUBGROUP, MemberId(4), 11), &wrap_key(SUBGROUP, 2), fresh, plaintext).unwrap()
    }

    #[test]
    fn a_rewrap_moves_the_payload_untouched_and_only_the_new_key_opens_it() {
        let (sub, parent) = (wrap_key(SUBGROUP, 2), wrap_key(PARENT, 1));
        let data = sealed(b"across a hop");
        assert_eq!(open(&data, &sub).unwrap(), b"across a hop");
        let relayed = rewrap(data.clone(), &sub, &parent, [3; 12]).unwrap();
        assert_eq!(relayed.ciphertext, data.ciphertext, "the payload is not re-encrypted");
        assert_eq!((relayed.group, relayed.key, relayed.hops), (PARENT, parent.key_ref(), 1));
        assert_eq!((relayed.origin, relayed.sender, relayed.seq), (SUBGROUP, MemberId(4), 11));
        assert_eq!(open(&relayed, &parent).unwrap(), b"across a hop");
        assert_eq!(open(&relayed, &sub), Err(TrafficError::WrongGroup(PARENT)));
        let decoded = Data::decode(&relayed.encode()).unwrap();
        assert_eq!(open(&decoded, &parent).unwrap(), b"across a hop");
    }

    #[test]
    fn every_header_field_and_the_payload_are_authenticated() {
        let key = wrap_key(SUBGROUP, 2);
        let data = sealed(b"x");
        let parent = wrap_key(PARENT, 1);
        let header_changes: [fn(&mut Data); 5] =
            [|d| d.origin = GroupId(9), |d| d.sender = MemberId(5), |d| d.seq += 1, |d| d.hops = 1, |d| d.nonce[0] ^= 1];
        for change in header_changes {
            let mut forged = data.clone();
            change(&mut forged);
            assert_eq!(open(&forged, &key), Err(TrafficError::Forged));
            assert_eq!(rewrap(forged, &key, &parent, [0; 12]).err(), Some(TrafficError::Forged), "a relay checks the wrap");
        }
        let mut forged = data.clone();
        forged.ciphertext[0] ^= 1;
        assert_eq!(open(&forged, &key), Err(TrafficError::Forged));
        let relayed = rewrap(forged, &key, &parent, [0; 12]).expect("a relay never reads the payload");
        assert_eq!(open(&relayed, &parent), Err(TrafficError::Forged), "its receivers refuse it");
        assert_eq!(open(&data, &wrap_key(SUBGROUP, 3)), Err(TrafficError::UnknownKey(data.key)));
    }

    #[test]
    fn a_message_crosses_at_most_max_hops_intermediaries() {
        let (a, b) = (wrap_key(SUBGROUP, 2), wrap_key(PARENT, 1));
        let mut data = sealed(b"far");
        for hop in 0..MAX_HOPS {
            let (from, to) = if hop % 2 == 0 { (&a, &b) } else { (&b, &a) };
            data = rewrap(data, from, to, [hop; 12]).unwrap();
        }
        let last = if MAX_HOPS % 2 == 0 { &a } else { &b };
        assert_eq!(open(&data, last).unwrap(), b"far");
        assert_eq!(rewrap(data, last, last, [0; 12]).err(), Some(TrafficError::TooManyHops));
    }

    #[test]
    fn the_window_accepts_each_seq_once_in_any_order_within_its_width() {
        let mut window = ReplayWindow::default();
        let member = MemberId(4);
        for seq in [10, 12, 11, 75, 20] {
            window.check(SUBGROUP, member, seq).unwrap();
            window.record(SUBGROUP, member, seq);
        }
        for seq in [10, 11, 12, 20, 75] {
            assert!(window.check(SUBGROUP, member, seq).is_err(), "seq {seq} again");
        }
        assert!(window.check(SUBGROUP, member, 11).is_err(), "75 - 11 >= 64: too old to tell");
        assert!(window.check(SUBGROUP, member, 13).is_ok() && window.check(SUBGROUP, member, 76).is_ok());
        assert!(window.check(SUBGROUP, MemberId(5), 10).is_ok(), "windows are per sender");
        assert!(window.check(PARENT, member, 10).is_ok(), "and per origin group");
    }
}
