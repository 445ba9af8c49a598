//! Caronni et al.'s flat <-> tree transitions (section 3.5, figure 6) inside a running
//! controller, over the sans-IO layer: a flat group switches to a tree (a signed public notice,
//! members derive their paths), runs a leave and a join as a tree, switches back to a fresh
//! flat table (members take their new keys by resync, sealed to each), and runs a leave. After
//! each step every live member holds the controller's group key, departed members open nothing,
//! and restarts from the whole log and from a snapshot rebuild the same keys.

use std::collections::{BTreeMap, BTreeSet};

use keycast_core::protocol::member::{FLAT_RESYNCS_PER_INTERVAL, FLAT_RESYNC_WINDOW_INTERVALS};
use keycast_core::protocol::traffic::Fresh;
use keycast_core::protocol::{Controller, GroupPolicy, MemberInputError, Output, Record};
use keycast_core::wire::{GroupId, Reject, SchemeSwitch, Signer, SwitchTarget};
use keycast_core::{FlatIds, GraphConfig, JoinPolicy, KeyRef, Scheme};

mod common;

use common::Side;

const GROUP: GroupId = GroupId(7);
const ID_BITS: u8 = 4;

type World = common::World<Side>;

fn policy() -> GroupPolicy {
    common::policy(GROUP, Scheme::Flat { id_bits: ID_BITS, ids: FlatIds::Sequential })
}

impl World {
    /// A flat group of [`ID_BITS`] whose ACL is `names`, snapshotting after every batch.
    fn of(names: &[String]) -> World {
        World::with_policy(policy(), names)
    }

    fn with_policy(policy: GroupPolicy, names: &[String]) -> World {
        let mut side = Side::new(policy, names, 3);
        side.controller.set_snapshot_interval(1);
        World::new(side, 0x5a, 0)
    }

    /// `name` leaves, and the batch that removes it goes out.
    fn leave_and_batch(&mut self, name: &str) {
        self.leave(name);
        self.tick(300);
    }

    /// Every live member holds the controller's key in force (ref and value); the departed
    /// open nothing the live members seal.
    fn assert_keys_agree(&mut self, step: &str) {
        let (group_ref, group_key) = self.sides.controller.key_in_force(self.sides.controller.epoch_at(self.now));
        for (name, session) in &self.members {
            let (r, key) = session.active_key().unwrap_or_else(|| panic!("{step}: {name} holds no key in force"));
            assert_eq!(r, group_ref, "{step}: {name} holds another key in force");
            assert!(key == group_key, "{step}: {name} holds another value under {r}");
        }
        for (i, (name, session)) in self.members.iter_mut().enumerate() {
            let fresh = Fresh { message_key: [i as u8; 32], nonce: [7; 12] };
            let data = session.seal(b"secret", fresh).unwrap();
            let read = self.departed.values_mut().map(|d| d.open(&data)).filter(Result::is_ok).count();
            assert_eq!(read, 0, "{step}: a departed member reads {name}'s message");
        }
    }

    /// Restarts from the whole history and from the log since the snapshot give the same key
    /// in force and scheme as the running controller.
    fn assert_restarts_agree(&self, step: &str) {
        let side = &self.sides;
        let epoch = side.controller.epoch_at(self.now);
        let expected = side.controller.key_in_force(epoch);
        for (kind, log) in [("history", &side.history), ("snapshot", &side.log)] {
            let restarted: Controller = side.restarted(log, self.now);
            let got = restarted.key_in_force(epoch);
            assert_eq!(got.0, expected.0, "{step}: restart from the {kind} has another key in force");
            assert!(got.1 == expected.1, "{step}: restart from the {kind} has another value under {}", got.0);
            assert_eq!(restarted.scheme(), side.controller.scheme(), "{step}: restart from the {kind} runs another scheme");
        }
    }

    fn active_refs(&self) -> BTreeSet<KeyRef> {
        self.members.values().filter_map(|s| s.active_key().map(|(r, _)| r)).collect()
    }
}

fn names(n: usize) -> Vec<String> {
    common::names("member", n)
}

#[test]
fn a_running_group_switches_flat_to_tree_and_back_with_members_following() {
    let all = names(8);
    let mut world = World::of(&all);
    for name in &all[..6] {
        world.join(name, GROUP);
    }
    world.leave_and_batch("member-5");
    world.assert_keys_agree("flat, before the switch");

    // Flat to tree: one public notice, no key in it.
    let now = world.now;
    let out = world.sides.controller.switch_to_tree(now).unwrap();
    assert!(matches!(&out[0], Output::Persist(Record::Switched { .. })), "the switch is logged before it is sent");
    world.sides.take(out);
    assert!(matches!(world.sides.controller.scheme().scheme, Scheme::Tree { degree: 2 }));
    let notice = world.sides.sent.last().unwrap().clone();
    world.deliver();
    assert!(world.members.values().all(|s| !s.needs_resync()), "flat to tree needs no resync");
    world.assert_keys_agree("just after flat to tree");
    world.assert_restarts_agree("flat to tree");
    // A replayed notice is refused.
    let replay = world.members.get_mut("member-0").unwrap().receive(&notice, now);
    assert!(matches!(replay, Err(MemberInputError::Rejected(Reject::Replay { .. }))), "{replay:?}");

    world.tick(300);
    world.leave_and_batch("member-1");
    world.assert_keys_agree("tree, after a leave");
    world.join("member-6", GROUP);
    world.assert_keys_agree("tree, after a join");
    world.assert_restarts_agree("tree, after a leave and a join");

    // Tree to flat: a fresh table; each member's keys come sealed to it by resync.
    let before = world.active_refs();
    let (now, entropy) = (world.now, world.entropy());
    let out = world.sides.controller.switch_to_flat(ID_BITS, now, entropy).unwrap();
    world.sides.take(out);
    assert!(matches!(world.sides.controller.scheme().scheme, Scheme::Flat { id_bits: ID_BITS, .. }));
    world.deliver();
    world.resync_lagging();
    assert!(world.active_refs().is_disjoint(&before), "the flat table's group key is new");
    world.assert_keys_agree("just after tree to flat");
    world.assert_restarts_agree("tree to flat");

    world.tick(300);
    world.leave_and_batch("member-2");
    world.assert_keys_agree("flat again, after a leave");
    world.assert_restarts_agree("flat again, after a leave");
}

#[test]
fn members_refuse_a_switch_not_signed_by_their_controller_or_for_another_group() {
    let all = names(3);
    let mut world = World::of(&all);
    for name in &all {
        world.join(name, GROUP);
    }
    let session = world.members.get_mut("member-0").unwrap();
    let seq = session.rekey_seq() + 1;
    let target = SwitchTarget::Tree { id_bits: ID_BITS, version: 99 };
    let forged = SchemeSwitch { group: GROUP, seq, epoch: 0, target }.sign(&Signer::from_seed(&[9; 32])).encode();
    assert!(matches!(session.receive(&forged, world.now), Err(MemberInputError::Rejected(Reject::BadSignature))));
    // Another group's switch, under the right key, is not this group's.
    let other = world.sides.controller.switch_to_tree(world.now).unwrap();
    let Some(Output::Multicast(ours)) = other.into_iter().nth(1) else { panic!("a notice") };
    let mut theirs = ours.clone();
    theirs[2..10].copy_from_slice(&8u64.to_be_bytes());
    assert!(session.receive(&theirs, world.now).is_err(), "a notice whose group was changed does not verify");
    assert!(session.receive(&ours, world.now).is_ok());
}

#[test]
fn a_member_that_missed_a_signer_change_and_a_switch_follows_both_from_the_heartbeats() {
    let all = names(4);
    let mut world = World::of(&all);
    for name in &all {
        world.join(name, GROUP);
    }
    world.tick(100);
    // member-3 hears nothing while the signing key changes and, two heartbeats later, the
    // group switches to a tree (well within the signer change's 16 repeats).
    let deaf = world.members.remove("member-3").unwrap();
    let out = world.sides.controller.rotate_signing_key([9; 32]);
    world.sides.take(out);
    world.tick(100);
    let out = world.sides.controller.switch_to_tree(world.now).unwrap();
    world.sides.take(out);
    world.deliver();
    world.members.insert("member-3".into(), deaf);
    // From here on it hears only heartbeats: both notices must come with them, in order.
    world.tick(200);
    let session = &world.members["member-3"];
    assert_eq!(session.resync_causes(), Default::default(), "member-3 followed both from the heartbeats, without a resync");
    assert!(world.now - session.last_heard_ms() <= 50, "member-3 verifies the heartbeats under the new signing key");
    world.assert_keys_agree("after a signer change and a switch heard from the heartbeats only");
}

#[test]
fn after_a_switch_to_flat_a_thousand_members_spread_their_resyncs_over_the_window() {
    const N: u64 = 1_000;
    let tree = GroupPolicy { graph: GraphConfig { scheme: Scheme::Tree { degree: 4 }, join_policy: JoinPolicy::NewVersion }, ..policy() };
    let all = names(N as usize);
    let mut world = World::with_policy(tree, &all);
    world.join_all(&all, GROUP);
    world.tick(100);
    assert!(world.members.values().all(|s| s.group_size() == N), "the heartbeats told every member the group's size");
    let (now, entropy) = (world.now, world.entropy());
    let out = world.sides.controller.switch_to_flat(10, now, entropy).unwrap();
    world.sides.take(out);
    world.deliver();
    let switched_at = world.now;
    let heartbeat_ms = world.sides.policy.heartbeat_ms;
    let window = ((N - FLAT_RESYNCS_PER_INTERVAL) * heartbeat_ms / FLAT_RESYNCS_PER_INTERVAL).min(FLAT_RESYNC_WINDOW_INTERVALS * heartbeat_ms);
    let at_once = world.members.values().filter(|s| s.needs_resync()).count();
    assert!(at_once < 10, "not everyone asks at once: {at_once}");

    // Each member's first request, by the tick it was raised on; the first answer to every
    // tenth member is lost on its way (it asks again).
    let mut asked: BTreeMap<String, u64> = BTreeMap::new();
    let mut lost: BTreeSet<String> = BTreeSet::new();
    while world.now <= switched_at + window + 100 {
        world.step();
        let lagging: Vec<String> = world.members.iter().filter(|(_, s)| s.needs_resync()).map(|(n, _)| n.clone()).collect();
        for name in lagging {
            asked.entry(name.clone()).or_insert(world.now);
            let session = &world.members[&name];
            let answer = world.sides.controller.resync(&name, session.member(), session.rekey_seq(), world.now).unwrap();
            let index: usize = name.trim_start_matches("member-").parse().unwrap();
            if index % 10 == 0 && lost.insert(name.clone()) {
                continue;
            }
            world.members.get_mut(&name).unwrap().resynced(answer, world.now);
        }
    }
    let mut per_tick: BTreeMap<u64, usize> = BTreeMap::new();
    for at in asked.values() {
        *per_tick.entry(at - switched_at).or_default() += 1;
    }
    println!("{N} members, window {window} ms: {at_once} ask at once, resync requests by ms after the switch {per_tick:?}");
    assert_eq!(asked.len() as u64, N, "every member asked for its keys of the table");
    assert!(per_tick.keys().all(|ms| *ms <= window + 10), "every request within the window (and the tick it ends in)");
    assert!(per_tick.len() as u64 >= window / 10 - 1, "spread over the window's ticks, not bunched");
    assert!(per_tick.values().all(|n| *n as u64 <= N / 10), "no tick takes more than a tenth of the group");
    assert_eq!(lost.len(), 100);
    assert!(world.members.values().all(|s| !s.needs_resync()), "members whose answer was lost asked again and got it");
    world.assert_keys_agree("after the spread resyncs");
}
