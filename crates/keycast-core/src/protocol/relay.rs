//! The forwarding logic of an intermediary (Iolus; Mukkamalla and Katz 6.1), sans-IO: a relay
//! is a member of its parent group and the controller of its subgroup, and carries data from
//! one to the other by re-wrapping only the message key ([`traffic::rewrap`]).
//!
//! Loops: a message is named end to end by (origin, sender, seq). The relay forwards each name
//! once and never towards the group it started in, so its own forwards echoed back by
//! multicast, and a message seen on both sides, stop here. In a tree of relays that is enough
//! for every member to receive each message once.

use crate::key::KeyRef;
use crate::wire::control::{Data, DATA_NONCE_LEN, JOINERS_KEY_ID};
use crate::wire::GroupId;

use super::traffic::{self, ReplayWindow, TrafficError, TrafficKeys, WrapKey};

/// Wrap keys a relay keeps per side: the current keys and, for a grace window, those before.
const KEPT_KEYS: usize = 4;

/// Which channel a message came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The parent group, of which the relay is a member.
    Parent,
    /// The subgroup the relay controls.
    Subgroup,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::Parent => Side::Subgroup,
            Side::Subgroup => Side::Parent,
        }
    }
}

/// Why a message was not forwarded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotForwarded {
    #[error("it started in the group it would go to")]
    BackToOrigin,
    #[error("already forwarded (or too old to tell)")]
    Seen,
    #[error("reflected to its group's joiners: for them only")]
    Reflected,
    #[error("no key to wrap under on that side yet")]
    NoSealingKey,
    #[error(transparent)]
    Traffic(#[from] TrafficError),
}

/// One side's wrap keys: derived once per group key.
#[derive(Debug)]
struct Shelf {
    group: GroupId,
    sealing: Option<KeyRef>,
    /// Newest last.
    keys: Vec<WrapKey>,
}

impl Shelf {
    fn install(&mut self, keys: &TrafficKeys) {
        for (key_ref, key) in &keys.keys {
            if self.find(*key_ref).is_none() {
                self.keys.push(WrapKey::derive(self.group, *key_ref, key));
            }
        }
        let excess = self.keys.len().saturating_sub(KEPT_KEYS.max(keys.keys.len()));
        self.keys.drain(..excess);
        self.sealing = keys.sealing;
    }

    fn find(&self, key_ref: KeyRef) -> Option<&WrapKey> {
        self.keys.iter().find(|k| k.key_ref() == key_ref)
    }
}

/// What a relay forwarded and dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForwardStats {
    pub up: u64,
    pub down: u64,
    /// Echoes of its own forwards, messages heading back where they started, and data
    /// reflected to a group's joiners.
    pub looped: u64,
    /// Unknown key, forged, too many hops, or no key to wrap under yet.
    pub dropped: u64,
}

/// A relay's forwarding state between its parent group and its subgroup.
#[derive(Debug)]
pub struct Forwarder {
    parent: Shelf,
    subgroup: Shelf,
    seen: ReplayWindow,
    stats: ForwardStats,
}

impl Forwarder {
    pub fn new(parent: GroupId, subgroup: GroupId) -> Forwarder {
        let shelf = |group| Shelf { group, sealing: None, keys: Vec::new() };
        Forwarder { parent: shelf(parent), subgroup: shelf(subgroup), seen: ReplayWindow::default(), stats: ForwardStats::default() }
    }

    fn shelf(&self, side: Side) -> &Shelf {
        match side {
            Side::Parent => &self.parent,
            Side::Subgroup => &self.subgroup,
        }
    }

    /// Takes the keys a side holds now; keys already known are not derived again.
    pub fn install(&mut self, side: Side, keys: &TrafficKeys) {
        match side {
            Side::Parent => self.parent.install(keys),
            Side::Subgroup => self.subgroup.install(keys),
        }
    }

    /// Whether a message from `from` names a key the relay does not hold (the driver then
    /// takes that side's keys again and retries once: a rekey may have just arrived).
    pub fn lacks_key(&self, from: Side, data: &Data) -> bool {
        data.group == self.shelf(from).group && data.key.id != JOINERS_KEY_ID && self.shelf(from).find(data.key).is_none()
    }

    /// The message to send on the other side, re-wrapped with `nonce` (fresh random bytes).
    pub fn forward(&mut self, from: Side, data: Data, nonce: [u8; DATA_NONCE_LEN]) -> Result<Data, NotForwarded> {
        let result = self.try_forward(from, data, nonce);
        match &result {
            Ok(_) if from == Side::Parent => self.stats.down += 1,
            Ok(_) => self.stats.up += 1,
            Err(NotForwarded::BackToOrigin | NotForwarded::Seen | NotForwarded::Reflected) => self.stats.looped += 1,
            Err(_) => self.stats.dropped += 1,
        }
        result
    }

    fn try_forward(&mut self, from: Side, data: Data, nonce: [u8; DATA_NONCE_LEN]) -> Result<Data, NotForwarded> {
        let (source, target) = (self.shelf(from), self.shelf(from.other()));
        if data.group != source.group {
            return Err(TrafficError::WrongGroup(data.group).into());
        }
        if data.origin == target.group {
            return Err(NotForwarded::BackToOrigin);
        }
        if data.key.id == JOINERS_KEY_ID {
            return Err(NotForwarded::Reflected);
        }
        self.seen.check(data.origin, data.sender, data.seq).map_err(|_| NotForwarded::Seen)?;
        let from_key = source.find(data.key).ok_or(TrafficError::UnknownKey(data.key))?;
        let to_key = target.sealing.and_then(|r| target.find(r)).ok_or(NotForwarded::NoSealingKey)?;
        let (origin, sender, seq) = (data.origin, data.sender, data.seq);
        // Recorded only once the wrap authenticated it: forged names cannot fill the window.
        let forwarded = traffic::rewrap(data, from_key, to_key, nonce)?;
        self.seen.record(origin, sender, seq);
        Ok(forwarded)
    }

    pub fn stats(&self) -> ForwardStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::MemberId;
    use crate::key::{Key, KeyId};
    use crate::protocol::traffic::{open, seal, Fresh};

    const TOP: GroupId = GroupId(1);
    const SUB: GroupId = GroupId(2);
    const NESTED: GroupId = GroupId(3);

    fn keys(group: GroupId, version: u32) -> TrafficKeys {
        let key_ref = KeyRef::new(KeyId(group.0 as u32), version, 0);
        TrafficKeys { group, sealing: Some(key_ref), keys: vec![(key_ref, Key::from_bytes([group.0 as u8 * 16 + version as u8; 32]))] }
    }

    fn wrap_key(keys: &TrafficKeys) -> WrapKey {
        WrapKey::derive(keys.group, keys.keys[0].0, &keys.keys[0].1)
    }

    fn relay(parent: GroupId, subgroup: GroupId) -> Forwarder {
        let mut relay = Forwarder::new(parent, subgroup);
        relay.install(Side::Parent, &keys(parent, 1));
        relay.install(Side::Subgroup, &keys(subgroup, 1));
        relay
    }

    fn message(group: GroupId, sender: u64, seq: u64, text: &[u8]) -> Data {
        seal((group, MemberId(sender), seq), &wrap_key(&keys(group, 1)), Fresh { message_key: [seq as u8; 32], nonce: [1; 12] }, text).unwrap()
    }

    #[test]
    fn data_goes_up_and_down_once_and_never_back() {
        let mut relay = relay(TOP, SUB);
        let up = relay.forward(Side::Subgroup, message(SUB, 4, 1, b"up"), [2; 12]).unwrap();
        assert_eq!(open(&up, &wrap_key(&keys(TOP, 1))).unwrap(), b"up");
        // Multicast brings the relay its own forward back: it stops there.
        assert_eq!(relay.forward(Side::Parent, up, [3; 12]), Err(NotForwarded::BackToOrigin));
        assert_eq!(relay.forward(Side::Subgroup, message(SUB, 4, 1, b"up"), [2; 12]), Err(NotForwarded::Seen));
        let down = relay.forward(Side::Parent, message(TOP, 4, 1, b"down"), [4; 12]).unwrap();
        assert_eq!(open(&down, &wrap_key(&keys(SUB, 1))).unwrap(), b"down", "same sender id and seq, another origin");
        assert_eq!(relay.forward(Side::Subgroup, down, [5; 12]), Err(NotForwarded::BackToOrigin));
        assert_eq!(relay.stats(), ForwardStats { up: 1, down: 1, looped: 3, dropped: 0 });
    }

    #[test]
    fn a_message_crosses_two_nested_relays_each_way() {
        let (mut upper, mut lower) = (relay(TOP, SUB), relay(SUB, NESTED));
        let in_sub = lower.forward(Side::Subgroup, message(NESTED, 9, 1, b"from below"), [1; 12]).unwrap();
        let at_top = upper.forward(Side::Subgroup, in_sub.clone(), [2; 12]).unwrap();
        assert_eq!((at_top.hops, open(&at_top, &wrap_key(&keys(TOP, 1))).unwrap()), (2, b"from below".to_vec()));
        // The lower relay hears its forward in the subgroup again; the upper one its own at the top.
        assert!(lower.forward(Side::Parent, in_sub, [3; 12]).is_err());
        assert!(upper.forward(Side::Parent, at_top, [4; 12]).is_err());
        let in_sub = upper.forward(Side::Parent, message(TOP, 9, 1, b"from above"), [5; 12]).unwrap();
        let below = lower.forward(Side::Parent, in_sub, [6; 12]).unwrap();
        assert_eq!(open(&below, &wrap_key(&keys(NESTED, 1))).unwrap(), b"from above");
    }

    #[test]
    fn forged_unknown_or_unsealable_messages_are_dropped_and_do_not_mark_names_seen() {
        let mut relay = relay(TOP, SUB);
        let mut forged = message(SUB, 4, 7, b"x");
        forged.wrapped_key[0] ^= 1;
        assert_eq!(relay.forward(Side::Subgroup, forged, [0; 12]), Err(NotForwarded::Traffic(TrafficError::Forged)));
        assert!(relay.forward(Side::Subgroup, message(SUB, 4, 7, b"x"), [0; 12]).is_ok(), "the forgery did not burn the name");
        let next = keys(SUB, 2);
        let under_next = seal((SUB, MemberId(5), 1), &wrap_key(&next), Fresh { message_key: [3; 32], nonce: [1; 12] }, b"y").unwrap();
        assert!(relay.lacks_key(Side::Subgroup, &under_next));
        relay.install(Side::Subgroup, &next);
        assert!(relay.forward(Side::Subgroup, under_next, [0; 12]).is_ok());
        let mut silent = Forwarder::new(TOP, SUB);
        silent.install(Side::Subgroup, &keys(SUB, 1));
        silent.install(Side::Parent, &TrafficKeys { sealing: None, ..keys(TOP, 1) });
        assert_eq!(silent.forward(Side::Subgroup, message(SUB, 4, 1, b"z"), [0; 12]), Err(NotForwarded::NoSealingKey));
    }

    #[test]
    fn data_reflected_to_a_groups_joiners_is_never_forwarded() {
        let mut relay = relay(TOP, SUB);
        let joiners = TrafficKeys { group: SUB, sealing: None, keys: vec![(crate::protocol::reflector::joiners_key_ref(2), Key::from_bytes([9; 32]))] };
        let reflected = traffic::rewrap(message(SUB, 4, 1, b"for joiners"), &wrap_key(&keys(SUB, 1)), &wrap_key(&joiners), [2; 12]).unwrap();
        assert!(!relay.lacks_key(Side::Subgroup, &reflected), "no key to fetch for it");
        assert_eq!(relay.forward(Side::Subgroup, reflected, [3; 12]), Err(NotForwarded::Reflected));
        assert!(relay.forward(Side::Subgroup, message(SUB, 4, 1, b"original"), [3; 12]).is_ok(), "its original still crosses");
    }

    #[test]
    fn a_relay_keeps_a_few_old_keys_for_late_messages_and_forgets_older_ones() {
        let mut relay = relay(TOP, SUB);
        for version in 2..=6 {
            relay.install(Side::Subgroup, &keys(SUB, version));
        }
        assert!(relay.lacks_key(Side::Subgroup, &message(SUB, 1, 1, b"v1")));
        let v3 = keys(SUB, 3);
        let late = seal((SUB, MemberId(1), 2), &wrap_key(&v3), Fresh { message_key: [3; 32], nonce: [1; 12] }, b"v3").unwrap();
        assert!(relay.forward(Side::Subgroup, late, [0; 12]).is_ok());
    }
}
