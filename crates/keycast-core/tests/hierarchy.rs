//! A two-level hierarchy (docs/hierarchy.md) over random histories, entirely sans-IO: a top
//! controller, two or three subgroups each run by a relay (the subgroup's `Controller` and a
//! `MemberSession` of the top group), members joining and leaving, relays dying and standbys
//! taking over with a *fresh* controller for the same subgroup id. Time is a number we advance.
//!
//! Checked:
//! 1. at every tick, no departed party (a member that left any group, a dead relay's top-level
//!    session, a dead relay's subgroup controller) holds, or learned afterwards from the
//!    multicast it kept hearing, the key in force in its group once its departure took effect;
//! 2. after a quiet stretch, every live member is at its group's active key, and the
//!    controllers and the world agree on who is in each group;
//! 3. data sealed in any group and carried by the relays' `Forwarder`s reaches the members of
//!    every group, and no departed party (nor the dead relay) opens any copy of it with any key
//!    it ever held.
//!
//! The test can fail: with the standby restoring the dead relay's log instead of starting
//! fresh, or creating its controller from the dead relay's seeds, property 1 fails at once
//! (and, with 1 switched off, so does 3: the dead relay opens relayed data).
//!
//! Cases: `KEYCAST_HIERARCHY_CASES` (default 48).

use std::collections::{BTreeMap, BTreeSet, HashSet};

use keycast_core::protocol::relay::{Forwarder, NotForwarded, Side};
use keycast_core::protocol::traffic::{self, Fresh, TrafficKeys, WrapKey};
use keycast_core::protocol::{Controller, GroupPolicy, JoinStatus, MemberSession, Output, Record};
use keycast_core::wire::rekey::PacketConfig;
use keycast_core::wire::{Data, GroupId, JoinAnswer};
use keycast_core::{GraphConfig, JoinPolicy, Key, MemberId, Scheme};
use proptest::prelude::*;

const T0: u64 = 1_000_000;
const TICK: u64 = 10;
const TOP: usize = 0;
/// Identities each group's ACL admits per kind (identities are never reused).
const IDENTITIES: usize = 200;

type KeyBytes = [u8; 32];

#[derive(Clone, Debug)]
enum Step {
    /// A new member joins group `g % groups` (top or a subgroup).
    Join(usize),
    /// Member `m` of group `g` leaves.
    Leave(usize, usize),
    Wait(u64),
    /// Subgroup `s`'s relay dies: its controller and its top-level session go silent.
    RelayDies(usize),
    /// Subgroup `s`'s standby takes over (if its relay is dead).
    FailOver(usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => any::<usize>().prop_map(Step::Join),
        2 => (any::<usize>(), any::<usize>()).prop_map(|(g, m)| Step::Leave(g, m)),
        3 => (1u64..300).prop_map(Step::Wait),
        1 => any::<usize>().prop_map(Step::RelayDies),
        1 => any::<usize>().prop_map(Step::FailOver),
    ]
}

fn policy(group: GroupId, scheme: Scheme) -> GroupPolicy {
    GroupPolicy {
        group,
        graph: GraphConfig { scheme, join_policy: JoinPolicy::NewVersion },
        // One epoch length for all groups, so that a quiet instant exists where every group's
        // members have heard the current epoch's first heartbeat (see `World::settle`).
        epoch_ms: 200,
        activation_delay: 1,
        heartbeat_ms: 20,
        refresh_timeout_ms: 400,
        immediate_eviction: false,
        membership_deltas: false,
        reflector: false,
        packets: PacketConfig::default(),
    }
}

/// A live member session and every group key it ever held.
struct Member {
    identity: String,
    session: MemberSession,
    held: HashSet<KeyBytes>,
}

impl Member {
    fn learn(&mut self) {
        learn(&mut self.held, &self.session.traffic_keys());
    }
}

fn learn(held: &mut HashSet<KeyBytes>, keys: &TrafficKeys) {
    held.extend(keys.keys.iter().map(|(_, k)| *k.as_bytes()));
}

/// When a departed party's departure takes effect in its group.
#[derive(Clone, Copy, Debug)]
enum Gone {
    /// Removed by a batch of the controller of `generation` (effective at its activation), or
    /// by that controller's death (effective once a fresh controller took over).
    Member { generation: u32, member: MemberId },
    /// A dead relay's subgroup controller: effective as soon as a standby took over.
    Controller { generation: u32 },
}

/// A departed party: what it ever held, and (for members) its session, still listening to
/// its group's multicast as an eavesdropper with its old keys would.
struct Ghost {
    who: String,
    group: usize,
    gone: Gone,
    held: HashSet<KeyBytes>,
    session: Option<MemberSession>,
}

/// One controller (absent while a subgroup's relay is dead) and its members.
struct Group {
    policy: GroupPolicy,
    controller: Option<Controller>,
    /// The controller's creation time (epochs count from it).
    created: u64,
    /// Bumped at each take-over: a controller of a later generation never knew the old keys.
    generation: u32,
    /// Every key the current controller ever held (a dead relay's loot).
    controller_keys: HashSet<KeyBytes>,
    /// The current controller's log (kept for the mutation check: a standby restoring it).
    log: Vec<Record>,
    members: BTreeMap<MemberId, Member>,
    /// Joins waiting for their batch, by connection.
    joining: BTreeMap<u64, String>,
    /// Members removed by a persisted batch of the current controller, with its activation.
    removed: BTreeMap<MemberId, u64>,
    next_identity: usize,
}

impl Group {
    /// The bytes of the group key in force at `now`.
    fn key_in_force(&self, now: u64) -> Option<KeyBytes> {
        let keys = self.controller.as_ref()?.traffic_keys(now);
        let sealing = keys.sealing?;
        keys.keys.iter().find(|(r, _)| *r == sealing).map(|(_, k)| *k.as_bytes())
    }
}

/// A subgroup's relay: its identity in the top group and its forwarding state.
struct Relay {
    top_identity: String,
    forwarder: Forwarder,
    /// Standbys used so far (the next one's registration number is this plus one).
    standbys: u32,
}

struct World {
    /// groups[0] is the top group; groups[1..] the subgroups, relays[s - 1] their relays.
    groups: Vec<Group>,
    relays: Vec<Option<Relay>>,
    ghosts: Vec<Ghost>,
    now: u64,
    entropy: u64,
    next_conn: u64,
    nonce: u64,
    /// A relay died since the last settle: its top membership must expire first.
    expiring: bool,
    /// Top identities of relays that died (their queued joins may still be answered).
    dead_relays: HashSet<String>,
    messages: u64,
}

fn acl(kinds: &[String]) -> BTreeSet<String> {
    kinds.iter().flat_map(|k| (0..IDENTITIES).map(move |i| format!("{k}{i}"))).collect()
}

impl World {
    fn new(subgroups: usize, scheme: Scheme, seed: u64) -> Self {
        let mut world = World { groups: Vec::new(), relays: Vec::new(), ghosts: Vec::new(), now: T0, entropy: seed << 16, next_conn: 0, nonce: 0, expiring: false, dead_relays: HashSet::new(), messages: 0 };
        for g in 0..=subgroups {
            let policy = policy(GroupId(1 + g as u64), scheme);
            let (seed, signing) = (world.entropy(), world.entropy());
            let (controller, genesis) = Controller::create(policy, world.acl(g), T0, seed, signing).unwrap();
            let Output::Persist(genesis) = genesis else { panic!("genesis is a record") };
            world.groups.push(Group {
                policy,
                controller: Some(controller),
                created: T0,
                generation: 0,
                controller_keys: HashSet::new(),
                log: vec![genesis],
                members: BTreeMap::new(),
                joining: BTreeMap::new(),
                removed: BTreeMap::new(),
                next_identity: 0,
            });
        }
        for s in 1..=subgroups {
            world.relays.push(Some(Relay { top_identity: format!("relay-{s}-"), forwarder: Forwarder::new(GroupId(1), GroupId(1 + s as u64)), standbys: 0 }));
            world.join_top_as_relay(s);
        }
        // One member per group to start with, so every group has a sender.
        for g in 0..=subgroups {
            world.join(g);
        }
        world
    }

    fn acl(&self, g: usize) -> BTreeSet<String> {
        if g == TOP {
            let mut kinds = vec!["top-m".to_string()];
            for s in 1..self.groups.len().max(4) {
                kinds.push(format!("relay-{s}-"));
                kinds.push(format!("relay-{s}-standby-"));
            }
            acl(&kinds)
        } else {
            acl(&[format!("s{g}-m")])
        }
    }

    fn entropy(&mut self) -> [u8; 32] {
        self.entropy += 1;
        let mut e = [0u8; 32];
        e[..8].copy_from_slice(&self.entropy.to_be_bytes());
        e
    }

    fn fresh(&mut self) -> Fresh {
        self.nonce += 1;
        let mut nonce = [0u8; 12];
        nonce[..8].copy_from_slice(&self.nonce.to_be_bytes());
        Fresh { message_key: self.entropy(), nonce }
    }

    fn join_identity(&mut self, g: usize, identity: String) {
        let group = self.groups[g].policy.group;
        let Some(controller) = self.groups[g].controller.as_mut() else { return };
        self.next_conn += 1;
        match controller.join(self.next_conn, &identity, group, self.now) {
            Ok(JoinStatus::Queued(_)) => {
                self.groups[g].joining.insert(self.next_conn, identity);
            }
            Ok(JoinStatus::Admitted(answer)) => {
                let (JoinAnswer::Accepted(accepted), keys) = *answer else { panic!("admitted means accepted") };
                self.admit(g, identity, &accepted, keys);
            }
            Err(refusal) => panic!("{identity} refused by group {g}: {refusal}"),
        }
    }

    fn admit(&mut self, g: usize, identity: String, accepted: &keycast_core::wire::JoinAccepted, keys: keycast_core::wire::ResyncAnswer) {
        let heartbeat = self.groups[g].policy.heartbeat_ms;
        let (session, _) = MemberSession::join(accepted, keys, heartbeat, self.now);
        let mut member = Member { identity, session, held: HashSet::new() };
        member.learn();
        self.groups[g].members.insert(accepted.member, member);
    }

    fn join(&mut self, g: usize) {
        if self.groups[g].controller.is_none() {
            return; // Nobody listens for joins while the relay is dead.
        }
        let n = self.groups[g].next_identity;
        self.groups[g].next_identity += 1;
        let identity = if g == TOP { format!("top-m{n}") } else { format!("s{g}-m{n}") };
        self.join_identity(g, identity);
    }

    fn join_top_as_relay(&mut self, s: usize) {
        let relay = self.relays[s - 1].as_ref().unwrap();
        let identity = if relay.standbys == 0 { format!("relay-{s}-0") } else { format!("relay-{s}-standby-{}", relay.standbys) };
        self.relays[s - 1].as_mut().unwrap().top_identity = identity.clone();
        self.join_identity(TOP, identity);
    }

    /// A member of group `g` departs (its session becomes a ghost).
    fn depart(&mut self, g: usize, member: MemberId) -> Option<Member> {
        let gone = self.groups[g].members.remove(&member)?;
        let generation = self.groups[g].generation;
        self.ghosts.push(Ghost {
            who: format!("{} (member {member:?} of group {g})", gone.identity),
            group: g,
            gone: Gone::Member { generation, member },
            held: gone.held.clone(),
            session: None,
        });
        Some(gone)
    }

    fn depart_keep_listening(&mut self, g: usize, member: MemberId) {
        if let Some(m) = self.depart(g, member) {
            self.ghosts.last_mut().unwrap().session = Some(m.session);
        }
    }

    fn run(&mut self, step: Step) {
        let subgroups = self.groups.len() - 1;
        match step {
            Step::Join(g) => self.join(g % self.groups.len()),
            Step::Leave(g, m) => {
                let g = g % self.groups.len();
                let relays: Vec<String> = self.relays.iter().flatten().map(|r| r.top_identity.clone()).collect();
                // Relays do not leave the top group as members; they die.
                let ids: Vec<MemberId> = self.groups[g].members.iter().filter(|(_, x)| !relays.contains(&x.identity)).map(|(id, _)| *id).collect();
                if ids.is_empty() {
                    return;
                }
                let member = ids[m % ids.len()];
                let identity = self.groups[g].members[&member].identity.clone();
                if let Some(controller) = self.groups[g].controller.as_mut() {
                    let outputs = controller.leave(&identity, member).unwrap();
                    self.deliver(g, outputs);
                }
                self.depart_keep_listening(g, member);
            }
            Step::Wait(ms) => self.advance(ms),
            Step::RelayDies(s) => self.relay_dies(1 + s % subgroups),
            Step::FailOver(s) => self.fail_over(1 + s % subgroups),
        }
    }

    fn relay_dies(&mut self, s: usize) {
        let Some(controller) = self.groups[s].controller.take() else { return };
        // Its subgroup controller's keys, all of them, are the attacker's now.
        learn(&mut self.groups[s].controller_keys, &controller.traffic_keys(self.now));
        let generation = self.groups[s].generation;
        let held = std::mem::take(&mut self.groups[s].controller_keys);
        self.ghosts.push(Ghost { who: format!("dead relay of subgroup {s} (controller, generation {generation})"), group: s, gone: Gone::Controller { generation }, held, session: None });
        // Joins in flight died with their connections; the joiners will try the standby.
        let relay = self.relays[s - 1].as_mut().unwrap();
        relay.forwarder = Forwarder::new(GroupId(1), self.groups[s].policy.group);
        let identity = relay.top_identity.clone();
        // Its top-level session stops refreshing (the top expires it) and keeps listening.
        if let Some(&id) = self.groups[TOP].members.iter().find(|(_, m)| m.identity == identity).map(|(id, _)| id) {
            self.depart_keep_listening(TOP, id);
        }
        // A relay whose top join was still queued is admitted all the same (the top does not
        // know it died): its session becomes a ghost as soon as it exists, and expires.
        self.expiring = true;
        self.dead_relays.insert(identity);
    }

    /// The standby's take-over: a fresh controller (fresh entropy, not a restore) for the same
    /// subgroup id; the surviving members join it anew; the standby joins the top group.
    fn fail_over(&mut self, s: usize) {
        if self.groups[s].controller.is_some() {
            return;
        }
        let (seed, signing) = (self.entropy(), self.entropy());
        let (controller, genesis) = Controller::create(self.groups[s].policy, self.acl(s), self.now, seed, signing).unwrap();
        let Output::Persist(genesis) = genesis else { panic!("genesis is a record") };
        let group = &mut self.groups[s];
        group.controller = Some(controller);
        group.created = self.now;
        group.generation += 1;
        group.log = vec![genesis];
        group.removed.clear();
        let survivors: Vec<String> = std::mem::take(&mut group.members).into_values().map(|m| m.identity).collect();
        let retries: Vec<String> = std::mem::take(&mut group.joining).into_values().collect();
        for identity in survivors.into_iter().chain(retries) {
            self.join_identity(s, identity);
        }
        self.relays[s - 1].as_mut().unwrap().standbys += 1;
        self.join_top_as_relay(s);
    }

    /// Carries out a controller's outputs: multicast reaches every member and every ghost of
    /// the group (eavesdropping), join answers become sessions, batches record removals.
    fn deliver(&mut self, g: usize, outputs: Vec<Output>) {
        for output in outputs {
            match output {
                Output::Persist(record) => {
                    if let Record::Batch { leaves, activation, .. } = &record {
                        self.groups[g].removed.extend(leaves.iter().map(|m| (*m, *activation)));
                    }
                    self.groups[g].log.push(record);
                }
                Output::Multicast(bytes) => {
                    let now = self.now;
                    for m in self.groups[g].members.values_mut() {
                        let _ = m.session.receive(&bytes, now);
                        m.learn();
                    }
                    for ghost in self.ghosts.iter_mut().filter(|x| x.group == g) {
                        if let Some(session) = ghost.session.as_mut() {
                            let _ = session.receive(&bytes, now);
                            learn(&mut ghost.held, &session.traffic_keys());
                        }
                    }
                }
                Output::JoinAnswer { conn, answer, keys } => {
                    let Some(identity) = self.groups[g].joining.remove(&conn) else { continue };
                    let JoinAnswer::Accepted(accepted) = answer else { panic!("{identity} refused after acceptance") };
                    let dead = g == TOP && self.dead_relays.contains(&identity);
                    self.admit(g, identity, &accepted, keys.expect("keys with the answer"));
                    if dead {
                        self.depart_keep_listening(g, accepted.member);
                        self.expiring = true;
                    }
                }
                Output::Departed { member, identity, why } => {
                    // Only the dead relays' top sessions may expire; they are ghosts already.
                    if self.depart(g, member).is_some() {
                        panic!("live member {identity} of group {g} departed: {why:?}");
                    }
                }
                Output::Rekeyed { .. } | Output::Repaired { .. } => {}
            }
        }
    }

    fn advance(&mut self, ms: u64) {
        let end = self.now + ms;
        while self.now < end {
            self.now = (self.now + TICK).min(end);
            for g in 0..self.groups.len() {
                self.refresh_and_resync(g);
                let e = self.entropy();
                let Some(controller) = self.groups[g].controller.as_mut() else { continue };
                let outputs = controller.tick(self.now, e).unwrap();
                let keys = controller.traffic_keys(self.now);
                learn(&mut self.groups[g].controller_keys, &keys);
                self.deliver(g, outputs);
            }
            self.check_no_ghost_holds_a_key_in_force();
        }
    }

    /// What member drivers do each tick: refresh, and resync when out of sync.
    fn refresh_and_resync(&mut self, g: usize) {
        let now = self.now;
        let group = &mut self.groups[g];
        let Some(controller) = group.controller.as_mut() else {
            for m in group.members.values_mut() {
                m.session.tick(now); // Cut off: they notice the silence, nothing else.
            }
            return;
        };
        for (id, m) in &mut group.members {
            m.session.tick(now);
            controller.refresh(&m.identity, *id, m.session.rekey_seq(), now).unwrap_or_else(|r| panic!("{} refused a refresh: {r}", m.identity));
            if m.session.needs_resync() {
                let answer = controller.resync(&m.identity, *id, m.session.rekey_seq(), now).unwrap();
                m.session.resynced(answer, now);
                m.learn();
            }
        }
    }

    /// Whether a ghost's departure has taken effect in its group by now.
    fn effective(&self, ghost: &Ghost) -> bool {
        let group = &self.groups[ghost.group];
        match ghost.gone {
            Gone::Controller { generation } => group.generation > generation,
            Gone::Member { generation, member } => {
                group.generation > generation
                    || group.controller.as_ref().is_some_and(|c| group.removed.get(&member).is_some_and(|a| *a <= c.epoch_at(self.now)))
            }
        }
    }

    /// Property 1, at every tick: a departed party never holds a key in force after its
    /// departure took effect (neither one it had, nor one it learned from later multicast).
    fn check_no_ghost_holds_a_key_in_force(&self) {
        for ghost in &self.ghosts {
            if !self.effective(ghost) {
                continue;
            }
            if let Some(key) = self.groups[ghost.group].key_in_force(self.now) {
                assert!(!ghost.held.contains(&key), "{} holds the key in force in group {} at {}", ghost.who, ghost.group, self.now - T0);
            }
        }
    }

    /// Runs until every rekey is delivered and in force, and every group's members have heard
    /// the current epoch's first heartbeat.
    fn settle(&mut self) {
        let epoch = self.groups[TOP].policy.epoch_ms;
        let heartbeat = self.groups[TOP].policy.heartbeat_ms;
        while std::mem::take(&mut self.expiring) {
            self.advance(self.groups[TOP].policy.refresh_timeout_ms + 2 * epoch);
        }
        self.advance(2 * epoch + 2 * heartbeat);
        for _ in 0..epoch / TICK {
            let heard = self.groups.iter().filter(|g| g.controller.is_some()).all(|g| (self.now - g.created) % epoch > heartbeat + TICK);
            if heard {
                return;
            }
            self.advance(TICK);
        }
        panic!("no instant where every group heard its epoch's heartbeat");
    }

    /// Properties 2 and 3 after a quiet stretch.
    fn check(&mut self) {
        self.settle();
        for (g, group) in self.groups.iter().enumerate() {
            let Some(controller) = group.controller.as_ref() else { continue };
            let counted: BTreeSet<MemberId> = controller.members().keys().copied().collect();
            let ours: BTreeSet<MemberId> = group.members.keys().copied().collect();
            assert_eq!(counted, ours, "group {g}: the controller and the world disagree on who is in it");
            assert!(group.joining.is_empty(), "group {g}: joins still unanswered: {:?}", group.joining);
            let active = controller.active_key(controller.epoch_at(self.now));
            let bytes = group.key_in_force(self.now).unwrap();
            for (id, m) in &group.members {
                let held = m.session.active_key().map(|(r, k)| (r, *k.as_bytes()));
                assert_eq!(held, Some((active, bytes)), "group {g}: {} ({id:?}) is not at the active key", m.identity);
            }
        }
        for ghost in &self.ghosts {
            if self.groups[ghost.group].controller.is_some() {
                assert!(self.effective(ghost), "{}: its departure never took effect", ghost.who);
            }
        }
        self.install_relay_keys();
        for g in 0..self.groups.len() {
            self.send_from(g);
        }
    }

    /// Each live relay takes both sides' keys, as its driver does on its timer.
    fn install_relay_keys(&mut self) {
        for s in 1..self.groups.len() {
            let Some(controller) = self.groups[s].controller.as_ref() else { continue };
            let sub = controller.traffic_keys(self.now);
            let relay = self.relays[s - 1].as_mut().unwrap();
            let top = self.groups[TOP].members.values().find(|m| m.identity == relay.top_identity).expect("a live relay is a top member");
            relay.forwarder.install(Side::Subgroup, &sub);
            relay.forwarder.install(Side::Parent, &top.session.traffic_keys());
        }
    }

    fn relay_of(&self, s: usize) -> Option<&Relay> {
        self.groups[s].controller.as_ref().and(self.relays[s - 1].as_ref())
    }

    /// Property 3: a message from a member of group `g` reaches every member of every group
    /// through the relays, each copy is refused by every ghost of its channel's group, and a
    /// relay drops the echo of its own forward.
    fn send_from(&mut self, g: usize) {
        if self.groups[g].controller.is_none() {
            return; // Its members are cut off until they join the standby: nothing relays them.
        }
        let relays: Vec<String> = self.relays.iter().flatten().map(|r| r.top_identity.clone()).collect();
        let Some((&sender, _)) = self.groups[g].members.iter().find(|(_, m)| !relays.contains(&m.identity)) else { return };
        self.messages += 1;
        let plaintext = format!("message {} from group {g}", self.messages).into_bytes();
        let fresh = self.fresh();
        let sealed = self.groups[g].members.get_mut(&sender).unwrap().session.seal(&plaintext, fresh).unwrap();
        // The copy on each group's channel.
        let mut copies: BTreeMap<usize, Data> = BTreeMap::new();
        if g == TOP {
            copies.insert(TOP, sealed);
        } else {
            let nonce = self.fresh().nonce;
            let up = self.relays[g - 1].as_mut().unwrap().forwarder.forward(Side::Subgroup, sealed.clone(), nonce).unwrap();
            copies.insert(g, sealed);
            // Multicast loops the relay's own forward back to it: it must not go down again.
            let nonce = self.fresh().nonce;
            let echo = self.relays[g - 1].as_mut().unwrap().forwarder.forward(Side::Parent, up.clone(), nonce);
            assert!(matches!(echo, Err(NotForwarded::BackToOrigin)), "relay {g} forwarded its own message back: {echo:?}");
            copies.insert(TOP, up);
        }
        for s in 1..self.groups.len() {
            if s == g || self.relay_of(s).is_none() {
                continue;
            }
            let nonce = self.fresh().nonce;
            let down = self.relays[s - 1].as_mut().unwrap().forwarder.forward(Side::Parent, copies[&TOP].clone(), nonce).unwrap();
            copies.insert(s, down);
        }
        for (&c, data) in &copies {
            for (id, m) in self.groups[c].members.iter_mut() {
                if c == g && *id == sender {
                    continue;
                }
                let opened = m.session.open(data).unwrap_or_else(|e| panic!("{} in group {c} cannot open data from group {g}: {e}", m.identity));
                assert_eq!(opened, plaintext);
            }
        }
        for ghost in self.ghosts.iter_mut() {
            let Some(data) = copies.get(&ghost.group) else { continue };
            // Every ghost here is effective (checked above): the data came after its departure.
            for key in &ghost.held {
                let wrap = WrapKey::derive(data.group, data.key, &Key::from_bytes(*key));
                assert!(traffic::open(data, &wrap).is_err(), "{} opened data sealed in group {g} after its departure", ghost.who);
            }
            if let Some(session) = ghost.session.as_mut() {
                assert!(session.open(data).is_err(), "{}'s session opened data sealed in group {g} after its departure", ghost.who);
            }
        }
    }

    fn finish(&mut self) {
        for s in 1..self.groups.len() {
            self.fail_over(s);
        }
        self.check();
    }
}

fn cases() -> u32 {
    std::env::var("KEYCAST_HIERARCHY_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn departed_parties_read_nothing_after_they_leave_the_hierarchy(
        steps in prop::collection::vec(step(), 1..30),
        subgroups in 2usize..=3,
        tree in any::<bool>(),
        seed in any::<u16>(),
    ) {
        let scheme = if tree { Scheme::Tree { degree: 3 } } else { Scheme::Star };
        let mut world = World::new(subgroups, scheme, seed as u64);
        world.check();
        for (i, step) in steps.into_iter().enumerate() {
            world.run(step);
            if i % 8 == 7 {
                world.check();
            }
        }
        world.finish();
    }
}
