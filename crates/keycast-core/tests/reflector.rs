//! The joiners' reflector (Mukkamalla and Katz 4.4) with a controller, its members and the
//! reflector on one deterministic clock: a joiner reads the group's data from its acceptance,
//! through copies re-wrapped under its batch's joiners' key, until its own group key is in
//! force; never data sent before its batch; and nobody reads reflected data after leaving.

use std::collections::{BTreeMap, BTreeSet};

use keycast_core::protocol::reflector::Reflector;
use keycast_core::protocol::traffic::{self, Fresh, TrafficError, WrapKey};
use keycast_core::protocol::{Controller, GroupPolicy, JoinStatus, MemberSession, Output, Record};
use keycast_core::wire::rekey::PacketConfig;
use keycast_core::wire::{Data, GroupId, JoinAccepted, JoinAnswer};
use keycast_core::{GraphConfig, JoinPolicy, MemberId, Scheme};

const T0: u64 = 1_000_000;
const EPOCH_MS: u64 = 100;

fn policy() -> GroupPolicy {
    GroupPolicy {
        group: GroupId(5),
        graph: GraphConfig { scheme: Scheme::Tree { degree: 4 }, join_policy: JoinPolicy::NewVersion },
        epoch_ms: EPOCH_MS,
        activation_delay: 1,
        heartbeat_ms: 25,
        refresh_timeout_ms: 10_000,
        immediate_eviction: true,
        membership_deltas: false,
        reflector: true,
        packets: PacketConfig::default(),
    }
}

/// A controller, its members (each hears every multicast datagram) and its reflector.
struct Group {
    controller: Controller,
    reflector: Reflector,
    now: u64,
    counter: u64,
    joining: BTreeMap<u64, String>,
    accepted: BTreeMap<String, JoinAccepted>,
    members: BTreeMap<String, MemberSession>,
    log: Vec<Record>,
}

impl Group {
    fn new(identities: &[&str]) -> Group {
        let acl: BTreeSet<String> = identities.iter().map(|s| s.to_string()).collect();
        let (controller, genesis) = Controller::create(policy(), acl, T0, [1; 32], [2; 32]).unwrap();
        let Output::Persist(genesis) = genesis else { panic!("genesis is a record") };
        let reflector = Reflector::new(policy().group);
        let (joining, accepted, members) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
        Group { controller, reflector, now: T0, counter: 0, joining, accepted, members, log: vec![genesis] }
    }

    fn fresh(&mut self) -> [u8; 32] {
        self.counter += 1;
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&self.counter.to_be_bytes());
        bytes
    }

    fn take(&mut self, outputs: Vec<Output>) {
        for output in outputs {
            match output {
                Output::Persist(record) => self.log.push(record),
                Output::Multicast(bytes) => {
                    for session in self.members.values_mut() {
                        let _ = session.receive(&bytes, self.now);
                    }
                }
                Output::JoinAnswer { conn, answer: JoinAnswer::Accepted(accepted), keys: Some(keys) } => {
                    let identity = self.joining.remove(&conn).expect("a join waited on this connection");
                    let (session, _) = MemberSession::join(&accepted, keys, policy().heartbeat_ms, self.now);
                    self.members.insert(identity.clone(), session);
                    self.accepted.insert(identity, accepted);
                }
                _ => {}
            }
        }
        // The driver hands the reflector the controller's keys after each step.
        self.reflector.install(&self.controller.reflection_keys(self.now).expect("reflector on"));
    }

    /// Ticks every 5 ms for `ms`.
    fn run(&mut self, ms: u64) {
        for _ in 0..ms / 5 {
            self.now += 5;
            let entropy = self.fresh();
            let outputs = self.controller.tick(self.now, entropy).unwrap();
            self.take(outputs);
        }
    }

    /// Queues the joins of `identities` now.
    fn join(&mut self, identities: &[&str]) {
        for identity in identities {
            self.counter += 1;
            let conn = self.counter;
            let Ok(JoinStatus::Queued(_)) = self.controller.join(conn, identity, policy().group, self.now) else { panic!("{identity} queued") };
            self.joining.insert(conn, identity.to_string());
        }
    }

    /// Runs until the epoch after this one has begun (the batch of joins queued now is made).
    fn next_epoch(&mut self) {
        let epoch = self.controller.epoch_at(self.now);
        while self.controller.epoch_at(self.now) <= epoch {
            self.run(5);
        }
    }

    fn member(&mut self, identity: &str) -> &mut MemberSession {
        self.members.get_mut(identity).unwrap()
    }

    fn send(&mut self, identity: &str, text: &str) -> Data {
        let (message_key, nonce) = (self.fresh(), self.fresh());
        let fresh = Fresh { message_key, nonce: nonce[..12].try_into().unwrap() };
        self.member(identity).seal(text.as_bytes(), fresh).unwrap()
    }

    /// The copies the reflector multicasts for `data`, as it hears it on the channel.
    fn reflect(&mut self, data: &Data) -> Vec<Data> {
        let nonce = self.fresh();
        self.reflector.reflect(data, || nonce[..12].try_into().unwrap()).unwrap_or_default()
    }

    fn open(&mut self, identity: &str, data: &Data) -> Result<String, TrafficError> {
        self.member(identity).open(data).map(|plain| String::from_utf8(plain).unwrap())
    }

    fn evict(&mut self, identity: &str) {
        let member: MemberId = self.accepted[identity].member;
        let entropy = self.fresh();
        let outputs = self.controller.evict(member, self.now, entropy).unwrap();
        self.take(outputs);
    }
}

/// A group of a and b with a key in force, and c's join queued.
fn group_with_a_joiner_queued() -> Group {
    let mut g = Group::new(&["a", "b", "c", "d", "e", "f"]);
    g.join(&["a", "b"]);
    g.next_epoch();
    g.run(EPOCH_MS / 2);
    assert!(g.accepted["a"].joiners_key.is_none(), "the first batch's key is in force at once: nothing to reflect");
    assert!(g.member("a").active_key().is_some() && g.member("b").active_key().is_some());
    g.join(&["c"]);
    g
}

#[test]
fn a_joiner_reads_data_sent_after_its_acceptance_through_the_reflector_until_its_key_is_in_force() {
    let mut g = group_with_a_joiner_queued();
    g.next_epoch();
    let accepted = g.accepted["c"].clone();
    let (joiners_ref, _) = accepted.joiners_key.as_deref().cloned().expect("c's acceptance carries its batch's joiners' key");
    assert!(g.member("c").holds_joiners_key() && g.member("c").active_key().is_none(), "c waits for its key");
    assert!(g.reflector.active());

    let news = g.send("a", "right after c joined");
    assert_eq!(g.open("c", &news), Err(TrafficError::UnknownKey(news.key)), "the original is under the key before c's");
    let copies = g.reflect(&news);
    assert_eq!(copies.len(), 1);
    assert_eq!(copies[0].key, joiners_ref);
    assert_eq!(g.open("c", &copies[0]).unwrap(), "right after c joined");
    assert!(matches!(g.open("c", &copies[0]), Err(TrafficError::Replayed { .. })), "delivered once");
    assert_eq!(g.open("b", &news).unwrap(), "right after c joined");
    assert_eq!(g.open("b", &copies[0]), Err(TrafficError::UnknownKey(joiners_ref)), "members without the joiners' key pass copies over");
    assert!(g.reflect(&copies[0]).is_empty(), "a copy is never reflected again");

    // c's key comes into force one epoch later: the joiners' key is gone on both sides.
    g.next_epoch();
    g.run(2 * policy().heartbeat_ms);
    assert!(g.member("c").active_key().is_some());
    assert!(!g.member("c").holds_joiners_key());
    assert!(g.controller.reflection_keys(g.now).unwrap().joiners.is_empty());
    assert!(!g.reflector.active());
    assert_eq!(g.open("c", &copies[0]), Err(TrafficError::UnknownKey(joiners_ref)), "c no longer holds the joiners' key");
    let later = g.send("a", "under c's own key");
    assert!(g.reflect(&later).is_empty(), "nothing is reflected once every joiner holds the key in force");
    assert_eq!(g.open("c", &later).unwrap(), "under c's own key");
}

#[test]
fn a_joiner_cannot_read_data_sent_before_its_epoch_even_replayed_to_the_reflector() {
    let mut g = group_with_a_joiner_queued();
    let (missed, heard) = (g.send("a", "lost on the way to the controller"), g.send("a", "before c joined"));
    assert!(g.reflect(&heard).is_empty(), "no joiner waits yet");
    g.next_epoch();
    assert!(g.member("c").holds_joiners_key());
    // An attacker replays both into the channel once c waits: neither is reflected.
    assert!(g.reflect(&heard).is_empty(), "heard before: a replay");
    assert!(g.reflect(&missed).is_empty(), "below the newest seq of a heard before the joiners' key was drawn");
    for old in [&heard, &missed] {
        assert_eq!(g.open("c", old), Err(TrafficError::UnknownKey(old.key)));
    }
    assert_eq!(g.reflector.stats().reflected, 0);
}

#[test]
fn an_evicted_joiner_reads_no_reflected_data_of_a_later_epoch() {
    let mut g = group_with_a_joiner_queued();
    g.join(&["d"]);
    g.next_epoch();
    let first_batch = g.accepted["c"].joiners_key.as_deref().cloned().unwrap();
    assert_eq!(g.accepted["d"].joiners_key.as_deref(), Some(&first_batch), "one joiners' key per batch");
    // d is evicted while it waits: the eviction's key is in force at once and every remaining
    // member holds it, so the batch's joiners' key is retired at once.
    g.evict("d");
    g.run(policy().heartbeat_ms);
    assert!(g.controller.reflection_keys(g.now).unwrap().joiners.is_empty());
    let after_eviction = g.send("a", "after d's eviction");
    assert!(g.reflect(&after_eviction).is_empty());
    assert_eq!(g.open("c", &after_eviction).unwrap(), "after d's eviction", "c got the eviction's key, in force at once");
    assert!(g.open("d", &after_eviction).is_err());

    // A later epoch's joiners get a fresh key; d, which still holds its old one, reads nothing.
    g.next_epoch();
    g.join(&["e"]);
    g.next_epoch();
    let second_batch = g.accepted["e"].joiners_key.as_deref().cloned().unwrap();
    assert!(second_batch.0 != first_batch.0 && second_batch.1 != first_batch.1);
    let news = g.send("b", "for e");
    let copies = g.reflect(&news);
    assert_eq!(copies.len(), 1);
    assert_eq!(g.open("e", &copies[0]).unwrap(), "for e");
    assert_eq!(g.open("d", &copies[0]), Err(TrafficError::UnknownKey(second_batch.0)));
    assert!(g.open("d", &news).is_err());
    // Nor does the joiners' key d kept from its own batch, whatever ref d claims it under.
    let kept = WrapKey::derive(policy().group, second_batch.0, &first_batch.1);
    assert_eq!(traffic::open(&copies[0], &kept), Err(TrafficError::Forged));
}

#[test]
fn a_controller_restored_from_its_log_reflects_with_the_same_joiners_key() {
    let mut g = group_with_a_joiner_queued();
    g.next_epoch();
    let before = g.controller.reflection_keys(g.now).unwrap();
    assert_eq!(before.joiners.len(), 1);
    let acl = ["a", "b", "c", "d", "e", "f"].iter().map(|s| s.to_string()).collect();
    g.controller = Controller::restore(policy(), acl, &g.log, g.now).unwrap();
    assert_eq!(g.controller.reflection_keys(g.now).unwrap(), before, "the joiners' key comes from the batch's logged seed");
    let news = g.send("a", "after the restart");
    let copies = g.reflect(&news);
    assert_eq!(g.open("c", &copies[0]).unwrap(), "after the restart");
}
