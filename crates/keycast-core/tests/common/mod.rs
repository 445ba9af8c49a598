//! A world of running controllers and the `MemberSession`s that follow them, over the sans-IO
//! layer, shared by the tests of a running group (merge_controller.rs, scheme_switch.rs): time
//! advances in steps of 10 ms, each controller ticks, its multicast reaches the members that
//! follow its group, members tick, and members out of sync resync with their controller (as
//! over TLS). Not every test uses every helper.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

use keycast_core::protocol::merge_state::MergeRecord;
use keycast_core::protocol::traffic::Fresh;
use keycast_core::protocol::{Controller, GroupPolicy, JoinStatus, MemberSession, Output, Record, Snapshot};
use keycast_core::wire::rekey::PacketConfig;
use keycast_core::wire::{GroupId, JoinAnswer};
use keycast_core::{GraphConfig, JoinPolicy, KeyRef, Scheme};

pub const T0: u64 = 1_000_000;
/// The world's step.
const STEP_MS: u64 = 10;

/// Epochs of 100 ms, heartbeats every 50 ms, evictions at once, no silent expiry in a test.
pub fn policy(group: GroupId, scheme: Scheme) -> GroupPolicy {
    GroupPolicy {
        group,
        graph: GraphConfig { scheme, join_policy: JoinPolicy::NewVersion },
        epoch_ms: 100,
        activation_delay: 1,
        heartbeat_ms: 50,
        refresh_timeout_ms: 600_000,
        immediate_eviction: true,
        membership_deltas: false,
        reflector: false,
        packets: PacketConfig::default(),
    }
}

pub fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// One controller, its log and the multicast it sent since last delivered.
pub struct Side {
    pub policy: GroupPolicy,
    pub acl: BTreeSet<String>,
    pub controller: Controller,
    /// Since the last snapshot, as the driver's store keeps it.
    pub log: Vec<Record>,
    /// Every record but snapshots: a restart that replays the whole history.
    pub history: Vec<Record>,
    pub sent: Vec<Vec<u8>>,
    pub answers: BTreeMap<u64, JoinAnswer>,
}

impl Side {
    /// A new group, its keys drawn from `[seed; 32]` and its signing key from `[seed + 1; 32]`.
    pub fn new(policy: GroupPolicy, acl: &[String], seed: u8) -> Side {
        let acl: BTreeSet<String> = acl.iter().cloned().collect();
        let (controller, genesis) = Controller::create(policy, acl.clone(), T0, [seed; 32], [seed + 1; 32]).unwrap();
        let Output::Persist(genesis) = genesis else { panic!("genesis is a record") };
        Side { policy, acl, controller, log: vec![genesis.clone()], history: vec![genesis], sent: Vec::new(), answers: BTreeMap::new() }
    }

    pub fn take(&mut self, outputs: Vec<Output>) {
        for output in outputs {
            match output {
                // A snapshot replaces the log before it, as the driver's store does.
                Output::Persist(Record::Snapshot(s)) => self.log = vec![Record::Snapshot(s)],
                Output::Persist(record) => {
                    self.history.push(record.clone());
                    self.log.push(record);
                }
                Output::Multicast(bytes) => self.sent.push(bytes),
                Output::JoinAnswer { conn, answer, .. } => drop(self.answers.insert(conn, answer)),
                Output::Departed { .. } | Output::Rekeyed { .. } | Output::Repaired { .. } => {}
            }
        }
    }

    /// The controller restarted from `log`, read through the store's encodings.
    pub fn restarted(&self, log: &[Record], now: u64) -> Controller {
        let log: Vec<Record> = log
            .iter()
            .map(|r| match r {
                Record::Merged(m) => Record::Merged(Box::new(MergeRecord::decode(&m.encode()).unwrap())),
                Record::Snapshot(s) => Record::Snapshot(Box::new(Snapshot::decode(&s.encode()).unwrap())),
                other => other.clone(),
            })
            .collect();
        Controller::restore(self.policy, self.acl.clone(), &log, now).unwrap()
    }
}

/// The controllers of a world, in the order their multicast is delivered.
pub trait Sides {
    fn all(&mut self) -> Vec<&mut Side>;
    fn of(&mut self, group: GroupId) -> &mut Side;
}

impl Sides for Side {
    fn all(&mut self) -> Vec<&mut Side> {
        vec![self]
    }

    fn of(&mut self, group: GroupId) -> &mut Side {
        assert_eq!(group, self.policy.group, "a world of one group");
        self
    }
}

/// Two controllers (a merge's left and right groups); the left channel is delivered first.
pub struct Pair {
    pub left: Side,
    pub right: Side,
}

impl Sides for Pair {
    fn all(&mut self) -> Vec<&mut Side> {
        vec![&mut self.left, &mut self.right]
    }

    fn of(&mut self, group: GroupId) -> &mut Side {
        if group == self.left.policy.group {
            &mut self.left
        } else {
            &mut self.right
        }
    }
}

/// Controllers, the members following them, the members who left, and the time.
pub struct World<S> {
    pub sides: S,
    pub members: BTreeMap<String, MemberSession>,
    pub departed: BTreeMap<String, MemberSession>,
    pub now: u64,
    /// Entropy handed to the controllers: `fill` bytes with a counter in front.
    entropy: u64,
    fill: u8,
    conn: u64,
}

impl<S: Sides> World<S> {
    /// A world at [`T0`] whose entropy is `fill` bytes numbered from `entropy_from + 1`.
    pub fn new(sides: S, fill: u8, entropy_from: u64) -> World<S> {
        World { sides, members: BTreeMap::new(), departed: BTreeMap::new(), now: T0, entropy: entropy_from, fill, conn: 0 }
    }

    pub fn entropy(&mut self) -> [u8; 32] {
        self.entropy += 1;
        let mut e = [self.fill; 32];
        e[..8].copy_from_slice(&self.entropy.to_be_bytes());
        e
    }

    /// Delivers what each controller sent to the members following its group when it was
    /// sent (a member moved by a notice hears the rest of that channel's datagrams: it moves
    /// its sockets afterwards), channel by channel.
    pub fn deliver(&mut self) {
        self.deliver_except(&[]);
    }

    /// As `deliver`, but the members named in `deaf` miss everything sent so far.
    pub fn deliver_except(&mut self, deaf: &[&str]) {
        for side in self.sides.all() {
            let (group, sent) = (side.policy.group, std::mem::take(&mut side.sent));
            let listeners: Vec<String> =
                self.members.iter().filter(|(n, s)| s.group() == group && !deaf.contains(&n.as_str())).map(|(n, _)| n.clone()).collect();
            for name in listeners {
                let session = self.members.get_mut(&name).unwrap();
                for datagram in &sent {
                    let _ = session.receive(datagram, self.now);
                }
            }
        }
    }

    /// `ms` of steps, each followed by the resyncs the members ask for.
    pub fn tick(&mut self, ms: u64) {
        for _ in 0..ms / STEP_MS {
            self.step();
            self.resync_lagging();
        }
    }

    /// One step: each controller ticks, its multicast is delivered, the members tick.
    pub fn step(&mut self) {
        self.now += STEP_MS;
        let count = self.sides.all().len();
        let entropy: Vec<[u8; 32]> = (0..count).map(|_| self.entropy()).collect();
        for (side, entropy) in self.sides.all().into_iter().zip(entropy) {
            let out = side.controller.tick(self.now, entropy).unwrap();
            side.take(out);
        }
        self.deliver();
        for session in self.members.values_mut() {
            session.tick(self.now);
        }
    }

    /// Members out of sync ask the controller they follow for their keys (over TLS).
    pub fn resync_lagging(&mut self) {
        let lagging: Vec<String> = self.members.iter().filter(|(_, s)| s.needs_resync()).map(|(n, _)| n.clone()).collect();
        for name in lagging {
            let (group, member, seq) = {
                let s = &self.members[&name];
                (s.group(), s.member(), s.rekey_seq())
            };
            let now = self.now;
            if let Ok(answer) = self.sides.of(group).controller.resync(&name, member, seq, now) {
                self.members.get_mut(&name).unwrap().resynced(answer, now);
            }
        }
    }

    /// `name` joins `group` (in its ACL) and becomes a session with the keys it is handed.
    pub fn join(&mut self, name: &str, group: GroupId) {
        self.join_all(&[name.to_owned()], group);
    }

    /// `names` join `group` in one batch.
    pub fn join_all(&mut self, names: &[String], group: GroupId) {
        let mut conns = Vec::with_capacity(names.len());
        for name in names {
            self.conn += 1;
            let (conn, now) = (self.conn, self.now);
            let status = self.sides.of(group).controller.join(conn, name, group, now).unwrap();
            assert!(matches!(status, JoinStatus::Queued(_)));
            conns.push((name, conn));
        }
        self.tick(300);
        let now = self.now;
        let side = self.sides.of(group);
        for (name, conn) in conns {
            let JoinAnswer::Accepted(accepted) = side.answers[&conn].clone() else { panic!("{name} accepted") };
            let keys = side.controller.resync(name, accepted.member, 0, now).unwrap();
            let session = MemberSession::join(&accepted, keys, side.policy.heartbeat_ms, now).0;
            self.members.insert(name.to_owned(), session);
        }
    }

    /// `name` asks its controller to leave (applied with the next batch).
    pub fn leave(&mut self, name: &str) {
        let session = self.members.remove(name).unwrap();
        let side = self.sides.of(session.group());
        let out = side.controller.leave(name, session.member()).unwrap();
        side.take(out);
        self.departed.insert(name.to_owned(), session);
    }

    /// Active key of every member, by name.
    pub fn keys(&self) -> BTreeMap<String, KeyRef> {
        self.members.iter().map(|(n, s)| (n.clone(), s.active_key().expect("a key in force").0)).collect()
    }
}

/// How many of `readers` open one message from each of `senders` (by name, in `sessions`).
pub fn reach(sessions: &mut BTreeMap<String, MemberSession>, senders: &[&str], readers: &[&str], tag: u8) -> usize {
    let mut opened = 0;
    for (i, sender) in senders.iter().enumerate() {
        let fresh = Fresh { message_key: [tag; 32], nonce: [i as u8; 12] };
        let data = sessions.get_mut(*sender).unwrap().seal(b"hello", fresh).expect("a key in force");
        for reader in readers.iter().filter(|r| *r != sender) {
            if sessions.get_mut(*reader).is_some_and(|s| s.open(&data).is_ok()) {
                opened += 1;
            }
        }
    }
    opened
}

/// Messages sealed by current members that the departed members open (every pair).
pub fn departed_read<S>(world: &mut World<S>, tag: u8) -> usize {
    let mut opened = 0;
    let names: Vec<String> = world.members.keys().cloned().collect();
    for (i, name) in names.iter().enumerate() {
        let fresh = Fresh { message_key: [tag; 32], nonce: [i as u8; 12] };
        let data = world.members.get_mut(name).unwrap().seal(b"secret", fresh).unwrap();
        opened += world.departed.values_mut().map(|s| s.open(&data)).filter(Result::is_ok).count();
    }
    opened
}
