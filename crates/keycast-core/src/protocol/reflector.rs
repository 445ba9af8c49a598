//! The joiners' reflector (Mukkamalla and Katz 4.4), sans-IO. A joiner is admitted at the start
//! of an epoch, but its group key comes into force only `activation_delay` epochs later; until
//! then the group's data is wrapped under a key it does not hold. With the reflector on, the
//! controller gives the joiners of each batch a fresh *joiners' key* with their acceptance and
//! re-wraps the message key of every data message under the key in force to it (one hop, the
//! payload untouched), until their key is in force. Then the joiners' key is dropped.
//!
//! Reflected data is wrapped under a ref with [`JOINERS_KEY_ID`]: it is never reflected again,
//! relays do not forward it, and members who hold no joiners' key pass it over.
//!
//! Backward secrecy: a joiners' key wraps only messages the reflector first hears after that key
//! was drawn, and, per sender, only seqs above the newest it had heard from that sender then
//! (seqs grow with each message): a replay of older data into the channel is not reflected.

use std::collections::BTreeMap;

use crate::key::{Key, KeyRef};
use crate::keygen::{joiners_key, BatchSeed};
use crate::wire::control::{Data, DATA_NONCE_LEN, JOINERS_KEY_ID};
use crate::wire::GroupId;

use super::traffic::{self, ReplayWindow, TrafficError, WrapKey};

/// The ref of the joiners' key of the batch with rekey seq `seq`.
pub fn joiners_key_ref(seq: u64) -> KeyRef {
    KeyRef::new(JOINERS_KEY_ID, seq as u32, 0)
}

/// The controller's joiners' keys by the rekey seq of their batch, while their joiners wait.
#[derive(Debug, Default)]
pub struct JoinersKeys {
    keys: BTreeMap<u64, Key>,
}

impl JoinersKeys {
    /// Draws the joiners' key of batch `seq` from the batch's seed.
    pub fn draw(&mut self, seq: u64, seed: &BatchSeed) {
        self.keys.insert(seq, joiners_key(seed));
    }

    /// The key for the joiners of batch `seq`, if it is still in use.
    pub fn of_batch(&self, seq: u64) -> Option<(KeyRef, Key)> {
        self.keys.get(&seq).map(|key| (joiners_key_ref(seq), key.clone()))
    }

    /// Drops (and zeroizes) the keys of the batches whose joiners hold the key in force, that
    /// of rekey `in_force`: their group key activated, or a later rekey in force at once (an
    /// eviction) reached every member.
    pub fn retire(&mut self, in_force: u64) {
        self.keys.retain(|seq, _| *seq > in_force);
    }

    /// The keys still in use, by batch.
    pub fn live(&self) -> impl Iterator<Item = (u64, KeyRef, Key)> + '_ {
        self.keys.iter().map(|(seq, key)| (*seq, joiners_key_ref(*seq), key.clone()))
    }
}

/// What the reflector needs from its controller: the group keys data may be wrapped under and
/// the joiners' keys in use, each with the rekey seq that made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReflectionKeys {
    pub group: GroupId,
    pub group_keys: Vec<(u64, KeyRef, Key)>,
    pub joiners: Vec<(u64, KeyRef, Key)>,
}

/// Why a message was not reflected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotReflected {
    #[error("already reflected (wrapped under a joiners' key)")]
    Reflected,
    #[error("already heard (or too old to tell)")]
    Seen,
    #[error(transparent)]
    Traffic(#[from] TrafficError),
}

/// What a reflector did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReflectStats {
    /// Copies sent under joiners' keys.
    pub reflected: u64,
    /// Authentic messages heard while no joiner lacked their key.
    pub idle: u64,
    /// Its own copies heard back, and replays.
    pub looped: u64,
    /// Unknown key, forged, or too many hops.
    pub dropped: u64,
}

/// A joiners' key as the reflector keeps it: its wrap key, and per sender the newest seq heard
/// when it was drawn (nothing at or below is reflected to it).
#[derive(Debug)]
struct Joiners {
    seq: u64,
    wrap_key: WrapKey,
    floor: ReplayWindow,
}

/// The reflector of one group: hears its channel, re-wraps for the joiners waiting.
#[derive(Debug)]
pub struct Reflector {
    group: GroupId,
    /// Group wrap keys by the rekey seq that made them.
    group_keys: Vec<(u64, WrapKey)>,
    joiners: Vec<Joiners>,
    /// Every authentic message heard, reflected or not.
    heard: ReplayWindow,
    stats: ReflectStats,
}

impl Reflector {
    pub fn new(group: GroupId) -> Reflector {
        Reflector { group, group_keys: Vec::new(), joiners: Vec::new(), heard: ReplayWindow::default(), stats: ReflectStats::default() }
    }

    /// Takes the controller's keys now: new keys are derived once, keys no longer listed are
    /// dropped (a retired joiners' key wraps nothing more).
    pub fn install(&mut self, keys: &ReflectionKeys) {
        let group = self.group;
        self.group_keys.retain(|(seq, _)| keys.group_keys.iter().any(|(s, _, _)| s == seq));
        for (seq, key_ref, key) in &keys.group_keys {
            if !self.group_keys.iter().any(|(s, k)| s == seq && k.key_ref() == *key_ref) {
                self.group_keys.push((*seq, WrapKey::derive(group, *key_ref, key)));
            }
        }
        self.joiners.retain(|j| keys.joiners.iter().any(|(s, _, _)| *s == j.seq));
        for (seq, key_ref, key) in &keys.joiners {
            if !self.joiners.iter().any(|j| j.seq == *seq) {
                let joiners = Joiners { seq: *seq, wrap_key: WrapKey::derive(group, *key_ref, key), floor: self.heard.clone() };
                self.joiners.push(joiners);
            }
        }
    }

    /// Whether a batch of joiners waits for its key (otherwise messages are only heard).
    pub fn active(&self) -> bool {
        !self.joiners.is_empty()
    }

    /// Whether `data` names a group key the reflector does not hold (the driver then takes
    /// the controller's keys again and retries once: a rekey may have just been made).
    pub fn lacks_key(&self, data: &Data) -> bool {
        data.group == self.group && data.key.id != JOINERS_KEY_ID && self.group_key(data.key).is_none()
    }

    fn group_key(&self, key_ref: KeyRef) -> Option<&(u64, WrapKey)> {
        self.group_keys.iter().find(|(_, k)| k.key_ref() == key_ref)
    }

    /// The copies of `data` to multicast, one per batch of joiners that lacks the key it is
    /// under (usually one, none when no joiner waits); `nonce` gives fresh random bytes.
    pub fn reflect(&mut self, data: &Data, nonce: impl FnMut() -> [u8; DATA_NONCE_LEN]) -> Result<Vec<Data>, NotReflected> {
        let result = self.try_reflect(data, nonce);
        match &result {
            Ok(copies) if copies.is_empty() => self.stats.idle += 1,
            Ok(copies) => self.stats.reflected += copies.len() as u64,
            Err(NotReflected::Reflected | NotReflected::Seen) => self.stats.looped += 1,
            Err(_) => self.stats.dropped += 1,
        }
        result
    }

    fn try_reflect(&mut self, data: &Data, nonce: impl FnMut() -> [u8; DATA_NONCE_LEN]) -> Result<Vec<Data>, NotReflected> {
        if data.group != self.group {
            return Err(TrafficError::WrongGroup(data.group).into());
        }
        if data.key.id == JOINERS_KEY_ID {
            return Err(NotReflected::Reflected);
        }
        self.heard.check(data.origin, data.sender, data.seq).map_err(|_| NotReflected::Seen)?;
        let (key_seq, from) = self.group_key(data.key).ok_or(TrafficError::UnknownKey(data.key))?;
        // Joiners of a batch hold the group keys from their batch's on, and only data sent
        // after their key was drawn is theirs to read.
        let targets: Vec<&WrapKey> = self
            .joiners
            .iter()
            .filter(|j| j.seq > *key_seq && j.floor.newest(data.origin, data.sender).is_none_or(|top| data.seq > top))
            .map(|j| &j.wrap_key)
            .collect();
        // Recorded only once the wrap authenticated it: forged names cannot fill the window.
        let copies = traffic::rewrap_to_each(data, from, &targets, nonce)?;
        self.heard.record(data.origin, data.sender, data.seq);
        Ok(copies)
    }

    pub fn stats(&self) -> ReflectStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::MemberId;
    use crate::key::KeyId;
    use crate::protocol::traffic::{open, seal, Fresh};

    const GROUP: GroupId = GroupId(7);

    fn group_key(seq: u64) -> (u64, KeyRef, Key) {
        (seq, KeyRef::new(KeyId(1), seq as u32, 0), Key::from_bytes([seq as u8; 32]))
    }

    fn joiners(seq: u64) -> (u64, KeyRef, Key) {
        (seq, joiners_key_ref(seq), Key::from_bytes([0x80 | seq as u8; 32]))
    }

    fn wrap_key((_, key_ref, key): &(u64, KeyRef, Key)) -> WrapKey {
        WrapKey::derive(GROUP, *key_ref, key)
    }

    fn message(under: u64, sender: u64, seq: u64) -> Data {
        let fresh = Fresh { message_key: [seq as u8; 32], nonce: [1; 12] };
        seal((GROUP, MemberId(sender), seq), &wrap_key(&group_key(under)), fresh, b"news").unwrap()
    }

    fn reflector(group_keys: &[u64], joiner_batches: &[u64]) -> Reflector {
        let mut reflector = Reflector::new(GROUP);
        let keys = ReflectionKeys {
            group: GROUP,
            group_keys: group_keys.iter().map(|s| group_key(*s)).collect(),
            joiners: joiner_batches.iter().map(|s| joiners(*s)).collect(),
        };
        reflector.install(&keys);
        reflector
    }

    #[test]
    fn a_message_under_the_key_in_force_is_rewrapped_once_for_the_joiners_and_never_again() {
        let mut reflector = reflector(&[1, 2], &[2]);
        let original = message(1, 4, 10);
        let copies = reflector.reflect(&original, || [5; 12]).unwrap();
        assert_eq!(copies.len(), 1);
        assert_eq!(copies[0].ciphertext, original.ciphertext, "the payload is not re-encrypted");
        assert_eq!((copies[0].key, copies[0].hops), (joiners_key_ref(2), 1));
        assert_eq!(open(&copies[0], &wrap_key(&joiners(2))).unwrap(), b"news");
        assert_eq!(reflector.reflect(&copies[0], || [6; 12]), Err(NotReflected::Reflected), "its own copy heard back");
        assert_eq!(reflector.reflect(&original, || [6; 12]), Err(NotReflected::Seen), "a replay");
        assert_eq!(reflector.reflect(&message(2, 4, 11), || [6; 12]), Ok(vec![]), "the joiners hold the key of their batch");
        assert_eq!(reflector.stats(), ReflectStats { reflected: 1, idle: 1, looped: 2, dropped: 0 });
    }

    #[test]
    fn data_sent_before_a_joiners_key_was_drawn_is_not_reflected_to_it() {
        let mut reflector = reflector(&[1], &[]);
        let (heard_before, lost_before) = (message(1, 4, 20), message(1, 4, 19));
        assert_eq!(reflector.reflect(&heard_before, || [5; 12]), Ok(vec![]), "no joiner waits yet");
        reflector.install(&ReflectionKeys { group: GROUP, group_keys: vec![group_key(1), group_key(2)], joiners: vec![joiners(2)] });
        assert!(reflector.lacks_key(&message(3, 4, 30)) && !reflector.lacks_key(&message(2, 4, 30)));
        // A message the reflector missed, replayed into the channel after the draw.
        assert_eq!(reflector.reflect(&lost_before, || [5; 12]), Ok(vec![]));
        assert_eq!(reflector.reflect(&message(1, 4, 21), || [5; 12]).unwrap().len(), 1);
        assert_eq!(reflector.reflect(&message(1, 9, 1), || [5; 12]).unwrap().len(), 1, "a sender first heard now");
    }

    #[test]
    fn forgeries_are_dropped_and_a_retired_joiners_key_wraps_nothing_more() {
        let mut reflector = reflector(&[1, 2], &[2]);
        let mut forged = message(1, 4, 10);
        forged.wrapped_key[0] ^= 1;
        assert_eq!(reflector.reflect(&forged, || [5; 12]), Err(NotReflected::Traffic(TrafficError::Forged)));
        assert_eq!(reflector.reflect(&message(1, 4, 10), || [5; 12]).unwrap().len(), 1, "the forgery did not burn the name");
        reflector.install(&ReflectionKeys { group: GROUP, group_keys: vec![group_key(2)], joiners: vec![] });
        assert!(!reflector.active());
        assert_eq!(reflector.reflect(&message(2, 4, 11), || [5; 12]), Ok(vec![]));
    }

    #[test]
    fn the_controller_keeps_a_joiners_key_until_its_batch_holds_the_key_in_force() {
        let mut keys = JoinersKeys::default();
        keys.draw(3, &BatchSeed::from_u64(1));
        keys.draw(4, &BatchSeed::from_u64(2));
        let (first, second) = (keys.of_batch(3).unwrap(), keys.of_batch(4).unwrap());
        assert_eq!(first.0, joiners_key_ref(3));
        assert_ne!(first.1, second.1, "a fresh key per batch");
        assert_eq!(keys.of_batch(3).unwrap().1, joiners_key(&BatchSeed::from_u64(1)), "redrawn from a logged seed");
        keys.retire(3);
        assert!(keys.of_batch(3).is_none() && keys.of_batch(4).is_some());
        assert_eq!(keys.live().count(), 1);
    }
}
