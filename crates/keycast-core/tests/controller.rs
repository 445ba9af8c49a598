//! The controller state machine on its own, step by step: revocation that survives restarts,
//! run-time ACL changes, a full group, a rejoin during a pending leave, a paused controller,
//! a log restored from an older copy and a configuration changed under a log.

use std::collections::BTreeSet;

use keycast_core::protocol::{Controller, ControllerError, Departure, GroupPolicy, JoinStatus, LivenessAnswer, LivenessRefused, MemberEvent, MemberSession, Output, Record};
use keycast_core::protocol::traffic::Fresh;
use keycast_core::wire::rekey::PacketConfig;
use keycast_core::wire::{message_type, GroupId, JoinAnswer, MessageType, RefusalReason};
use keycast_core::{FlatIds, GraphConfig, JoinPolicy, MemberId, Scheme};

const T0: u64 = 1_000_000;

fn policy(scheme: Scheme) -> GroupPolicy {
    GroupPolicy {
        group: GroupId(5),
        graph: GraphConfig { scheme, join_policy: JoinPolicy::NewVersion },
        epoch_ms: 100,
        activation_delay: 1,
        heartbeat_ms: 50,
        refresh_timeout_ms: 10_000,
        immediate_eviction: true,
        membership_deltas: false,
        reflector: false,
        packets: PacketConfig::default(),
    }
}

fn tree() -> Scheme {
    Scheme::Tree { degree: 4 }
}

/// A controller, its log, and the time.
struct Harness {
    policy: GroupPolicy,
    acl: BTreeSet<String>,
    controller: Controller,
    log: Vec<Record>,
    now: u64,
    entropy: u64,
    conn: u64,
    /// Join answers and departures seen, in order.
    answers: Vec<(u64, JoinAnswer)>,
    departed: Vec<(MemberId, Departure)>,
}

impl Harness {
    fn new(policy: GroupPolicy, acl: &[&str]) -> Self {
        let acl: BTreeSet<String> = acl.iter().map(|s| s.to_string()).collect();
        let (controller, genesis) = Controller::create(policy, acl.clone(), T0, [1; 32], [2; 32]).unwrap();
        let Output::Persist(genesis) = genesis else { panic!("genesis is a record") };
        Harness { policy, acl, controller, log: vec![genesis], now: T0, entropy: 0, conn: 0, answers: Vec::new(), departed: Vec::new() }
    }

    fn take(&mut self, outputs: Vec<Output>) {
        for output in outputs {
            match output {
                Output::Persist(record) => self.log.push(record),
                Output::JoinAnswer { conn, answer, .. } => self.answers.push((conn, answer)),
                Output::Departed { member, why, .. } => self.departed.push((member, why)),
                Output::Multicast(_) | Output::Rekeyed { .. } | Output::Repaired { .. } => {}
            }
        }
    }

    fn entropy(&mut self) -> [u8; 32] {
        self.entropy += 1;
        let mut e = [0u8; 32];
        e[..8].copy_from_slice(&self.entropy.to_be_bytes());
        e
    }

    /// Ticks every 10 ms for `ms`.
    fn run(&mut self, ms: u64) {
        for _ in 0..ms / 10 {
            self.now += 10;
            let e = self.entropy();
            let outputs = self.controller.tick(self.now, e).unwrap();
            self.take(outputs);
        }
    }

    fn join(&mut self, identity: &str) -> Result<JoinStatus, RefusalReason> {
        self.conn += 1;
        self.controller.join(self.conn, identity, self.policy.group, self.now).map_err(|r| r.reason)
    }

    /// Joins and waits for the epoch's batch: the member's id.
    fn admit(&mut self, identity: &str) -> MemberId {
        match self.join(identity) {
            Ok(JoinStatus::Queued(member)) => {
                self.run(2 * self.policy.epoch_ms);
                assert!(self.controller.members().contains_key(&member), "{identity} admitted");
                member
            }
            other => panic!("{identity}: {other:?}"),
        }
    }

    fn evict(&mut self, member: MemberId) {
        let e = self.entropy();
        let outputs = self.controller.evict(member, self.now, e).unwrap();
        self.take(outputs);
    }

    /// Admits `identity` and returns its member session, holding the keys the controller gave it.
    fn session(&mut self, identity: &str) -> MemberSession {
        let Ok(JoinStatus::Queued(_)) = self.join(identity) else { panic!("{identity} queued") };
        let conn = self.conn;
        self.run(200);
        let JoinAnswer::Accepted(accepted) = self.answers.iter().find(|(c, _)| *c == conn).unwrap().1.clone() else { panic!("accepted") };
        let keys = self.controller.resync(identity, accepted.member, 0, self.now).unwrap();
        MemberSession::join(&accepted, keys, self.policy.heartbeat_ms, self.now).0
    }

    fn restart(&mut self) {
        self.controller = Controller::restore(self.policy, self.acl.clone(), &self.log, self.now).unwrap();
    }
}

#[test]
fn a_join_before_the_first_tick_waits_for_the_epochs_end_as_after_a_restart() {
    let mut h = Harness::new(policy(tree()), &["a", "b"]);
    // Queued in the first epoch, before any tick: answered at its end, not at the first tick.
    let Ok(JoinStatus::Queued(_)) = h.join("a") else { panic!("a queued") };
    h.run(h.policy.epoch_ms - 10);
    assert!(h.answers.is_empty(), "a join was batched before its epoch ended: {:?}", h.answers);
    h.run(20);
    assert_eq!(h.answers.len(), 1, "the join was not answered when its epoch ended");
    // The same after a restart with nothing pending, in the middle of an epoch.
    h.run(h.policy.epoch_ms / 2 - 10); // 50 ms into the epoch
    h.restart();
    let Ok(JoinStatus::Queued(_)) = h.join("b") else { panic!("b queued") };
    h.run(h.policy.epoch_ms / 2 - 20);
    assert_eq!(h.answers.len(), 1, "a join after a restart was batched before its epoch ended");
    h.run(h.policy.epoch_ms);
    assert_eq!(h.answers.len(), 2);
}

/// Heartbeats handed over to a driver's timer say, byte for byte, what the controller's own
/// would: across joins, an eviction, the activation of each key and a new signing key.
#[test]
fn handed_over_heartbeats_are_the_controllers_own_byte_for_byte() {
    let mut h = Harness::new(policy(tree()), &["a", "b", "c"]);
    let mut twin = Controller::restore(h.policy, h.acl.clone(), &h.log, h.now).unwrap();
    let mut handed = twin.hand_over_heartbeats().expect("heartbeats to hand over");
    let mut generation = twin.heartbeat_generation();
    let (mut own, mut theirs, mut announcements) = (Vec::new(), Vec::new(), 0);
    for step in 0..120u64 {
        h.now += 10;
        let e = h.entropy();
        match step {
            5 | 6 | 40 => {
                let identity = match step {
                    5 => "a",
                    6 => "b",
                    _ => "c",
                };
                drop(h.join(identity));
                twin.join(h.conn, identity, h.policy.group, h.now).unwrap();
            }
            70 => {
                let b = h.controller.member_by_identity("b").unwrap();
                let e = h.entropy();
                let outputs = h.controller.evict(b, h.now, e).unwrap();
                h.take(outputs);
                twin.evict(b, h.now, e).unwrap();
            }
            90 => {
                h.controller.rotate_signing_key([7; 32]);
                twin.rotate_signing_key([7; 32]);
            }
            _ => {}
        }
        let outputs = h.controller.tick(h.now, e).unwrap();
        own.extend(outputs.into_iter().filter_map(|o| match o {
            Output::Multicast(bytes) if matches!(message_type(&bytes), Ok(MessageType::Heartbeat | MessageType::SignerChange)) => Some(bytes),
            _ => None,
        }));
        for output in twin.tick(h.now, e).unwrap() {
            assert!(!matches!(&output, Output::Multicast(bytes) if message_type(bytes) == Ok(MessageType::Heartbeat)), "the twin handed its heartbeats over");
        }
        if twin.heartbeat_generation() != generation {
            generation = twin.heartbeat_generation();
            handed.update(twin.heartbeat_content());
        }
        for bytes in handed.beat(h.now) {
            announcements += usize::from(message_type(&bytes) == Ok(MessageType::SignerChange));
            theirs.push(bytes);
        }
    }
    assert_eq!(h.controller.members().len(), 2, "a and c are members");
    assert!(own.len() > 20, "{} heartbeats", own.len());
    assert!(announcements > 0, "the new signing key was announced with the heartbeats");
    let differ = own.iter().zip(&theirs).position(|(a, b)| a != b);
    assert!(own.len() == theirs.len() && differ.is_none(), "the handed-over heartbeats differ from the controller's own: {} against {}, first at {differ:?}", own.len(), theirs.len());
}

/// While a change's datagrams go out, no heartbeat leaves (neither the state before it nor
/// the change itself); the change's content ends the hold.
#[test]
fn held_heartbeats_wait_for_the_changes_content_and_name_no_epoch_not_yet_closed() {
    let mut h = Harness::new(policy(tree()), &["a"]);
    let mut heartbeats = h.controller.hand_over_heartbeats().unwrap();
    assert!(!heartbeats.beat(h.now).is_empty(), "the first heartbeat is due at once");
    h.admit("a");
    heartbeats.hold();
    assert!(heartbeats.beat(h.now).is_empty(), "a held heartbeat left");
    heartbeats.update(h.controller.heartbeat_content());
    let beat = |heartbeats: &mut keycast_core::protocol::heartbeats::Heartbeats, at: u64| {
        let sent = heartbeats.beat(at);
        assert_eq!(sent.len(), 1, "one heartbeat due at {at}");
        keycast_core::wire::heartbeat::SignedHeartbeat::decode(&sent[0]).unwrap().heartbeat
    };
    let first = beat(&mut heartbeats, h.now);
    assert_eq!((first.rekey_seq, first.group_size), (h.controller.rekey_seq(), 1), "the heartbeat names the change");
    // Past the epoch's end, until the controller closed it, heartbeats name the epoch before:
    // the batch closing it may admit a member that must not take them for a contradiction.
    let next_epoch_ms = T0 + first.epoch * h.policy.epoch_ms;
    assert_eq!(h.controller.epoch_at(next_epoch_ms), first.epoch + 1);
    assert_eq!(beat(&mut heartbeats, next_epoch_ms).epoch, first.epoch, "a heartbeat named an epoch the controller had not closed");
    let e = h.entropy();
    h.controller.tick(next_epoch_ms, e).unwrap();
    heartbeats.update(h.controller.heartbeat_content());
    assert_eq!(beat(&mut heartbeats, next_epoch_ms + h.policy.heartbeat_ms).epoch, first.epoch + 1);
}

/// A standby's fresh controller: the old subgroup's members rejoin at once. Its first batch
/// closes as soon as the expected joins are all in (not at the epoch's end), and its key is
/// in force at once (nobody held the key before it); with one missing, the epoch's end.
#[test]
fn a_take_over_batches_the_rejoins_once_all_are_in_and_puts_their_key_in_force_at_once() {
    let mut h = Harness::new(policy(tree()), &["a", "b", "c"]);
    h.controller.expect_rejoins(3);
    for identity in ["a", "b"] {
        let Ok(JoinStatus::Queued(_)) = h.join(identity) else { panic!("{identity} queued") };
    }
    h.run(30);
    assert!(h.answers.is_empty(), "two of three rejoins were batched");
    let Ok(JoinStatus::Queued(_)) = h.join("c") else { panic!("c queued") };
    h.run(10);
    assert_eq!(h.answers.len(), 3, "the third rejoin did not close the batch at the next tick");
    let epoch = h.controller.epoch_at(h.now);
    assert!(h.now < T0 + h.policy.epoch_ms, "closed at the epoch's end, not early");
    assert_eq!(h.controller.rekey_seq(), 1);
    let JoinAnswer::Accepted(accepted) = &h.answers[0].1 else { panic!("accepted") };
    let keys = h.controller.resync("a", accepted.member, 0, h.now).unwrap();
    assert_eq!(keys.active, h.controller.active_key(epoch), "the joiners' key is not in force at once");
    assert_eq!(keys.pending, None);

    // One of three never comes: the batch waits for the epoch's end, as any other.
    let mut h = Harness::new(policy(tree()), &["a", "b", "c"]);
    h.controller.expect_rejoins(3);
    for identity in ["a", "b"] {
        let Ok(JoinStatus::Queued(_)) = h.join(identity) else { panic!("{identity} queued") };
    }
    h.run(h.policy.epoch_ms - 10);
    assert!(h.answers.is_empty(), "batched before the epoch's end without the third rejoin");
    h.run(20);
    assert_eq!(h.answers.len(), 2);
}

/// Once a group has members, a batch's key waits `activation_delay` epochs, so they receive
/// the rekey before it is in force.
#[test]
fn a_batch_into_a_group_with_members_keeps_the_activation_delay() {
    let mut h = Harness::new(policy(tree()), &["a", "b"]);
    h.admit("a");
    let Ok(JoinStatus::Queued(_)) = h.join("b") else { panic!("b queued") };
    h.run(h.policy.epoch_ms);
    let epoch = h.controller.epoch_at(h.now);
    let JoinAnswer::Accepted(accepted) = &h.answers[1].1 else { panic!("accepted") };
    let keys = h.controller.resync("b", accepted.member, 0, h.now).unwrap();
    assert_eq!(keys.pending.map(|p| p.activation), Some(epoch + h.policy.activation_delay));
}

#[test]
fn an_evicted_identity_is_refused_until_readmitted_across_restarts() {
    let mut h = Harness::new(policy(tree()), &["a", "b"]);
    let a = h.admit("a");
    h.admit("b");
    h.evict(a);
    assert!(!h.controller.members().contains_key(&a));
    assert!(matches!(h.join("a"), Err(RefusalReason::Revoked)), "rejoined at once after its eviction");
    h.run(500);
    h.restart();
    assert!(matches!(h.join("a"), Err(RefusalReason::Revoked)), "rejoined after a restart");
    let readmit = h.controller.readmit("a");
    h.take(readmit);
    h.restart();
    assert!(matches!(h.join("a"), Ok(JoinStatus::Queued(_))), "a re-admitted identity may join again");
}

#[test]
fn acl_changes_at_run_time_take_effect_at_once_and_survive_restarts() {
    let mut h = Harness::new(policy(tree()), &["a", "b"]);
    let b = h.admit("b");
    assert!(matches!(h.join("c"), Err(RefusalReason::NotInAcl)));
    let added = h.controller.acl_add("c");
    h.take(added);
    let e = h.entropy();
    let removed = h.controller.acl_remove("b", h.now, e).unwrap();
    h.take(removed);
    assert!(!h.controller.members().contains_key(&b), "removing a member's identity from the ACL removes the member");
    h.restart();
    assert!(matches!(h.join("c"), Ok(JoinStatus::Queued(_))));
    assert!(matches!(h.join("b"), Err(RefusalReason::NotInAcl)));
}

#[test]
fn a_join_to_a_full_group_is_refused_and_the_controller_goes_on() {
    let flat = Scheme::Flat { id_bits: 1, ids: FlatIds::Sequential };
    let mut h = Harness::new(policy(flat), &["a", "b", "c"]);
    h.admit("a");
    h.admit("b");
    assert!(matches!(h.join("c"), Err(RefusalReason::GroupFull)));
    h.run(1_000);
    assert_eq!(h.controller.members().len(), 2);
    // Room again after a leave.
    let a = h.controller.member_by_identity("a").unwrap();
    let leave = h.controller.leave("a", a).unwrap();
    h.take(leave);
    h.run(200);
    h.admit("c");
}

#[test]
fn a_rejoin_while_the_old_sessions_leave_is_pending_is_a_new_admission() {
    let mut h = Harness::new(policy(tree()), &["a", "b"]);
    h.admit("b");
    let old = h.admit("a");
    let leave = h.controller.leave("a", old).unwrap();
    h.take(leave);
    let Ok(JoinStatus::Queued(new)) = h.join("a") else { panic!("the rejoin must wait for the batch, with fresh keys") };
    assert_ne!(new, old);
    h.run(2 * h.policy.epoch_ms);
    assert!(h.controller.members().contains_key(&new), "the new session was removed with the old one");
    assert!(!h.controller.members().contains_key(&old));
    assert_eq!(h.controller.member_by_identity("a"), Some(new));
    assert!(h.answers.iter().any(|(_, a)| matches!(a, JoinAnswer::Accepted(x) if x.member == new)));
}

#[test]
fn a_paused_controller_does_not_expire_members_for_its_own_silence() {
    let mut h = Harness::new(policy(tree()), &["a", "b"]);
    let a = h.admit("a");
    let b = h.admit("b");
    h.controller.refresh("a", a, 0, h.now).unwrap();
    h.controller.refresh("b", b, 0, h.now).unwrap();
    // 22 s without a tick (SIGSTOP, a VM migration), twice the refresh timeout.
    h.now += 22_000;
    h.run(500);
    assert!(h.departed.is_empty(), "members expired during the controller's own pause: {:?}", h.departed);
    assert_eq!(h.controller.members().len(), 2);
    // Time the controller runs counts: a member silent for the timeout expires.
    h.controller.refresh("b", b, 0, h.now).unwrap();
    for _ in 0..12 {
        h.run(1_000);
        h.controller.refresh("b", b, 0, h.now).unwrap();
    }
    assert_eq!(h.departed, vec![(a, Departure::Expired)]);
}

#[test]
fn a_removed_members_request_is_refused_as_not_a_member() {
    let mut h = Harness::new(policy(tree()), &["a", "b"]);
    let a = h.admit("a");
    h.admit("b");
    let leave = h.controller.leave("a", a).unwrap();
    h.take(leave);
    h.run(200);
    let refusal = h.controller.refresh("a", a, 0, h.now).unwrap_err();
    assert_eq!(refusal.reason, RefusalReason::NotMember, "{refusal}");
}

#[test]
fn a_restart_under_a_changed_fixed_setting_is_refused_naming_it() {
    let mut h = Harness::new(policy(tree()), &["a"]);
    h.admit("a");
    for (changed, setting) in [
        (GroupPolicy { graph: GraphConfig { scheme: Scheme::Tree { degree: 2 }, ..h.policy.graph }, ..h.policy }, "scheme"),
        (GroupPolicy { graph: GraphConfig { join_policy: JoinPolicy::Revision, ..h.policy.graph }, ..h.policy }, "join_policy"),
        (GroupPolicy { group: GroupId(6), ..h.policy }, "group"),
        (GroupPolicy { epoch_ms: 200, ..h.policy }, "epoch_ms"),
    ] {
        match Controller::restore(changed, h.acl.clone(), &h.log, h.now) {
            Err(e @ ControllerError::PolicyChanged { .. }) => assert!(e.to_string().contains(setting), "{e}"),
            other => panic!("restarted under a changed {setting}: {:?}", other.map(|_| ())),
        }
    }
    // Settings that do not shape keys may change.
    let relaxed = GroupPolicy { heartbeat_ms: 70, refresh_timeout_ms: 3_000, ..h.policy };
    assert!(Controller::restore(relaxed, h.acl.clone(), &h.log, h.now).is_ok());
}

#[test]
fn records_never_show_seeds_in_debug_output() {
    let h = Harness::new(policy(tree()), &["a"]);
    let shown = format!("{:?}", h.log);
    assert!(shown.contains("Genesis") && !shown.contains("[1, 1") && !shown.contains("0101"), "{shown}");
}

/// A member that holds keys of a history the controller no longer has (its log was restored
/// from an older copy) raises a contradiction from the next heartbeat and resyncs; the
/// controller's rekeys then continue above the seq the member reports.
#[test]
fn members_of_a_lost_history_raise_a_contradiction_and_move_the_controller_past_it() {
    let mut h = Harness::new(policy(tree()), &["a", "b", "c"]);
    let (conn, keys) = {
        let Ok(JoinStatus::Queued(_)) = h.join("a") else { panic!() };
        let conn = h.conn;
        h.run(200);
        let answer = h.answers.iter().find(|(c, _)| *c == conn).unwrap().1.clone();
        (answer, h.controller.resync("a", h.controller.member_by_identity("a").unwrap(), 0, h.now).unwrap())
    };
    let JoinAnswer::Accepted(accepted) = conn else { panic!("accepted") };
    let (mut session, _) = MemberSession::join(&accepted, keys, h.policy.heartbeat_ms, h.now);
    let backup = h.log.clone();
    // The member follows two more rekeys, then the log is restored from the backup.
    let mut datagrams = Vec::new();
    for identity in ["b", "c"] {
        let _ = h.join(identity);
        for _ in 0..20 {
            h.now += 10;
            let e = h.entropy();
            for output in h.controller.tick(h.now, e).unwrap() {
                match output {
                    Output::Persist(r) => h.log.push(r),
                    Output::Multicast(bytes) => datagrams.push(bytes),
                    _ => {}
                }
            }
        }
    }
    for bytes in datagrams.drain(..) {
        let _ = session.receive(&bytes, h.now);
    }
    let ahead = session.rekey_seq();
    h.log = backup;
    h.restart();
    assert!(h.controller.rekey_seq() < ahead);
    let mut events = Vec::new();
    for _ in 0..10 {
        h.now += 10;
        let e = h.entropy();
        for output in h.controller.tick(h.now, e).unwrap() {
            if let Output::Multicast(bytes) = output {
                events.extend(session.receive(&bytes, h.now).unwrap_or_default());
            }
        }
    }
    assert!(events.iter().any(|e| matches!(e, MemberEvent::Contradiction { .. })), "{events:?}");
    assert!(session.needs_resync());
    let answer = h.controller.resync("a", accepted.member, session.rekey_seq(), h.now).unwrap();
    assert_eq!(answer.rekey_seq, ahead, "the controller continues above the seq the member reported");
    session.resynced(answer, h.now);
    h.run(100);
    assert!(h.log.iter().any(|r| matches!(r, Record::SeqFloor(s) if *s == ahead)), "the floor is persisted");
}

/// A member that lost an eviction's rekey packets must not go on sealing under the key the
/// eviction replaced (the evicted member holds it): from the first heartbeat that names the new
/// key in force, it refuses to seal until it has the new key.
#[test]
fn a_member_that_missed_an_evictions_rekey_refuses_to_seal_under_the_replaced_key() {
    let mut h = Harness::new(policy(tree()), &["a", "b"]);
    let mut sessions: Vec<MemberSession> = ["a", "b"].into_iter().map(|identity| h.session(identity)).collect();
    // Both follow a heartbeat of the active key, then b is evicted; a loses the rekey packets.
    h.run(100);
    let mut a = sessions.remove(0);
    let b = sessions.remove(0).member();
    let e = h.entropy();
    let outputs = h.controller.evict(b, h.now, e).unwrap();
    assert!(outputs.iter().any(|o| matches!(o, Output::Rekeyed { .. })));
    let held = a.active_key().unwrap().0;
    let mut heartbeat = None;
    for _ in 0..10 {
        h.now += 10;
        let e = h.entropy();
        for output in h.controller.tick(h.now, e).unwrap() {
            if let Output::Multicast(bytes) = output {
                if bytes[1] == keycast_core::wire::MessageType::Heartbeat as u8 {
                    heartbeat.get_or_insert(bytes);
                }
            }
        }
    }
    a.receive(&heartbeat.expect("a heartbeat"), h.now).unwrap();
    match a.seal(b"after the eviction", Fresh { message_key: [1; 32], nonce: [1; 12] }) {
        Err(keycast_core::protocol::traffic::TrafficError::StaleKey { held: k, .. }) => assert_eq!(k, held),
        other => panic!("sealed under the replaced key: {other:?}"),
    }
    let answer = h.controller.resync("a", a.member(), a.rekey_seq(), h.now).unwrap();
    a.resynced(answer, h.now);
    assert!(a.seal(b"after the resync", Fresh { message_key: [2; 32], nonce: [2; 12] }).is_ok());
}

/// The signing key rotates without any member rejoining: members follow the announcement
/// signed by the old key; one that missed it gets the key from a resync; replays and
/// announcements signed by anyone else are refused; the new key survives a restart.
#[test]
fn the_signing_key_rotates_and_members_follow_without_rejoining() {
    use keycast_core::wire::{Signer, SignerChange};
    let mut h = Harness::new(policy(tree()), &["a", "b"]);
    let mut sessions: Vec<MemberSession> = ["a", "b"].into_iter().map(|identity| h.session(identity)).collect();
    let old = h.controller.verifying_key();
    let outputs = h.controller.rotate_signing_key([0x42; 32]);
    assert!(matches!(&outputs[0], Output::Persist(Record::SigningKey { change: 1, .. })), "persisted before it is announced");
    let Output::Multicast(announcement) = &outputs[1] else { panic!("announced") };
    let (a, b) = sessions.split_at_mut(1);
    let (a, b) = (&mut a[0], &mut b[0]);
    assert_eq!(a.receive(announcement, h.now).unwrap(), vec![MemberEvent::SignerChanged { change: 1 }]);
    assert!(a.receive(announcement, h.now).is_err(), "a replayed announcement is refused");
    let forged = SignerChange { group: h.policy.group, change: 2, next: Signer::from_seed(&[9; 32]).verifying_key() }
        .sign(&Signer::from_seed(&[8; 32]))
        .encode();
    assert!(a.receive(&forged, h.now).is_err(), "an announcement not signed by the controller is refused");
    // Heartbeats now verify for a (it followed) and not for b (it missed the announcement).
    let mut beats = Vec::new();
    for _ in 0..10 {
        h.now += 10;
        let e = h.entropy();
        for output in h.controller.tick(h.now, e).unwrap() {
            if let Output::Multicast(bytes) = output {
                if bytes[1] == keycast_core::wire::MessageType::Heartbeat as u8 {
                    beats.push(bytes);
                }
            }
        }
    }
    assert!(a.receive(&beats[0], h.now).is_ok());
    assert!(b.receive(&beats[0], h.now).is_err(), "b still holds the old signing key");
    // Heartbeats b cannot verify: once the controller counts as lost, b resyncs.
    for _ in 0..2 {
        b.tick(h.now + 4 * h.policy.heartbeat_ms);
    }
    assert!(b.needs_resync(), "heartbeats b cannot verify send it to resync");
    assert_eq!(b.resync_causes().silence, 1);
    assert_ne!(h.controller.verifying_key(), old);
    let answer = h.controller.resync("b", b.member(), b.rekey_seq(), h.now).unwrap();
    b.resynced(answer, h.now);
    let later = h.controller.tick(h.now + 100, [3; 32]).unwrap();
    let beat = later.iter().find_map(|o| match o {
        Output::Multicast(bytes) if bytes[1] == keycast_core::wire::MessageType::Heartbeat as u8 => Some(bytes.clone()),
        _ => None,
    });
    let result = b.receive(&beat.expect("a heartbeat"), h.now + 100);
    assert!(result.is_ok(), "a resync hands over the signing key in force: {result:?}");
    h.take(outputs);
    h.restart();
    assert_eq!(h.controller.verifying_key(), Signer::from_seed(&[0x42; 32]).verifying_key(), "the new key survives a restart");
}

#[test]
fn plain_silence_resyncs_a_member_only_when_it_lasts_fifty_heartbeat_intervals() {
    let mut h = Harness::new(policy(tree()), &["a"]);
    let mut a = h.session("a");
    let hb = h.policy.heartbeat_ms;
    // Heartbeats lost in a burst: the controller counts as lost, nothing else happens.
    for _ in 0..2 {
        a.tick(h.now + 20 * hb);
    }
    assert!(!a.needs_resync(), "{:?}", a.resync_causes());
    // Fifty intervals: the multicast path may be down, unicast keeps the member's keys.
    a.tick(h.now + 51 * hb);
    assert!(a.needs_resync());
    assert_eq!(a.resync_causes().silence, 1);
}

#[test]
fn liveness_datagrams_keep_a_member_in_and_forged_replayed_or_foreign_ones_do_not() {
    for scheme in [tree(), Scheme::Star, Scheme::Flat { id_bits: 8, ids: FlatIds::Sequential }] {
        let mut h = Harness::new(policy(scheme), &["a", "b"]);
        let mut a = h.session("a");
        let mut b = h.session("b");
        // Only liveness datagrams from `a` for three refresh timeouts: `a` stays, `b` expires.
        let step = h.policy.refresh_timeout_ms / 4;
        let mut replayed = None;
        for _ in 0..12 {
            h.run(step);
            let datagram = a.liveness(h.now, false).expect("a holds its individual key");
            assert!(matches!(h.controller.liveness(&datagram, h.now, [0; 12]), Ok(LivenessAnswer::Refreshed(m)) if m == a.member()));
            replayed = Some(datagram);
        }
        assert!(h.controller.members().contains_key(&a.member()), "{scheme:?}: liveness kept it");
        assert!(!h.controller.members().contains_key(&b.member()), "{scheme:?}: silence expired it");
        let replayed = replayed.unwrap();
        assert!(matches!(h.controller.liveness(&replayed, h.now, [0; 12]), Err(LivenessRefused::Replayed { .. })));
        // A datagram from the expired member, and one claiming to be `a` under another key.
        let from_b = b.liveness(h.now, false).unwrap();
        assert!(matches!(h.controller.liveness(&from_b, h.now, [0; 12]), Err(LivenessRefused::Departed(m)) if m == b.member()));
        let mut forged = a.liveness(h.now + 1, false).unwrap();
        forged[keycast_core::wire::LIVENESS_LEN - 1] ^= 1;
        assert!(matches!(h.controller.liveness(&forged, h.now, [0; 12]), Err(LivenessRefused::BadTag(m)) if m == a.member()));
        assert!(matches!(h.controller.liveness(&forged[..10], h.now, [0; 12]), Err(LivenessRefused::Decode(_))));
    }
}

#[test]
fn a_member_behind_resyncs_over_udp_and_an_old_answer_is_not_taken_again() {
    let mut h = Harness::new(policy(tree()), &["a", "b", "c"]);
    let mut a = h.session("a");
    // `a` misses the rekey that admits `c`: its keys are behind the controller's.
    h.session("c");
    h.run(h.policy.epoch_ms * 3);
    assert!(a.rekey_seq() < h.controller.rekey_seq());
    let probe = a.liveness(h.now, true).unwrap();
    let Ok(LivenessAnswer::Resync(member, sealed)) = h.controller.liveness(&probe, h.now, [9; 12]) else { panic!("no answer") };
    assert_eq!(member, a.member());
    let events = a.sealed_resync(&sealed, h.now).expect("the answer opens under a's key");
    assert!(events.iter().any(|e| matches!(e, MemberEvent::Resynced { .. })), "{events:?}");
    assert_eq!(a.rekey_seq(), h.controller.rekey_seq());
    assert!(a.sealed_resync(&sealed, h.now).is_err(), "the same answer again is a replay");
    // A second probe right away is refused as too soon, and another member cannot open it.
    let again = a.liveness(h.now, true).unwrap();
    assert!(matches!(h.controller.liveness(&again, h.now, [9; 12]), Err(LivenessRefused::TooSoon(_))));
    let mut b = h.session("b");
    assert!(b.sealed_resync(&sealed, h.now).is_err());
}

/// The expiry scan reads a slice of the members per tick, yet every silent member is still
/// removed within the refresh timeout plus a sixteenth of it (and an epoch for the batch), and
/// none before the timeout.
#[test]
fn silent_members_expire_within_a_sixteenth_of_the_timeout_though_each_tick_reads_a_slice() {
    let names: Vec<String> = (0..300).map(|i| format!("m{i}")).collect();
    let acl: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut h = Harness::new(policy(tree()), &acl);
    for name in &names {
        h.join(name).unwrap();
    }
    h.run(h.policy.epoch_ms * 2);
    assert_eq!(h.controller.members().len(), 300);
    let timeout = h.policy.refresh_timeout_ms;
    h.run(timeout - 2 * h.policy.epoch_ms - 50);
    assert_eq!(h.controller.members().len(), 300, "a member expired before the refresh timeout");
    h.run(2 * h.policy.epoch_ms + timeout / 16 + 2 * h.policy.epoch_ms);
    assert!(h.controller.members().is_empty(), "{} silent members still counted", h.controller.members().len());
}

#[test]
fn a_departed_member_learns_over_udp_from_a_signed_refusal_and_nobody_else_takes_it() {
    use keycast_core::protocol::DATAGRAM_REFUSALS_PER_SECOND;
    use keycast_core::wire::{Liveness, LivenessKey};
    let mut h = Harness::new(policy(tree()), &["a", "b", "c"]);
    let (mut a, mut b) = (h.session("a"), h.session("b"));
    h.evict(b.member());
    let probe = b.liveness(h.now, true).unwrap();
    let Ok(LivenessAnswer::Departed(member, refusal)) = h.controller.liveness(&probe, h.now, [0; 12]) else { panic!("no refusal") };
    assert_eq!(member, b.member());
    // Another member, a tampered copy, and the same refusal twice are refused.
    assert!(a.datagram_refusal(&refusal).is_err(), "a took b's refusal");
    let mut tampered = refusal.clone();
    tampered[20] ^= 1;
    assert!(b.datagram_refusal(&tampered).is_err(), "a tampered refusal was taken");
    assert_eq!(b.datagram_refusal(&refusal).unwrap(), RefusalReason::NotMember);
    assert!(b.datagram_refusal(&refusal).is_err(), "the refusal was taken twice");
    // A refusal of an older request is not taken for a newer one.
    b.liveness(h.now + 5, true).unwrap();
    assert!(b.datagram_refusal(&refusal).is_err(), "an old refusal answered a new request");
    // A refresh from the departed member, and probes under ids never issued, get nothing.
    let refresh = b.liveness(h.now + 6, false).unwrap();
    assert!(matches!(h.controller.liveness(&refresh, h.now, [0; 12]), Err(LivenessRefused::Departed(_))));
    for stranger in [MemberId(0), MemberId(1_000)] {
        let key = LivenessKey::derive(&keycast_core::key::Key::from_bytes([7; 32]), h.policy.group, stranger);
        let forged = Liveness { group: h.policy.group, member: stranger, resync: true, counter: 1, rekey_seq: 0 }.seal(&key);
        assert!(matches!(h.controller.liveness(&forged, h.now, [0; 12]), Err(LivenessRefused::Stranger(m)) if m == stranger));
    }
    // Signatures answer at most DATAGRAM_REFUSALS_PER_SECOND requests a second, whoever asks.
    let counted = |h: &mut Harness, b: &mut MemberSession, at: u64| {
        (0..2 * DATAGRAM_REFUSALS_PER_SECOND)
            .filter(|i| {
                let probe = b.liveness(at + u64::from(*i), true).unwrap();
                matches!(h.controller.liveness(&probe, at, [0; 12]), Ok(LivenessAnswer::Departed(..)))
            })
            .count()
    };
    let now = h.now + 10;
    assert_eq!(counted(&mut h, &mut b, now) as u32, DATAGRAM_REFUSALS_PER_SECOND - 1, "budget of this second (one spent above)");
    assert_eq!(counted(&mut h, &mut b, now + 1_000) as u32, DATAGRAM_REFUSALS_PER_SECOND, "a new second, a new budget");
    let c = h.session("c");
    assert!(h.controller.members().contains_key(&c.member()), "the flood cost c nothing");
}

/// A tree group with FEC blocks of four at `proactivity_pct`, never stepping rho down (a
/// target of no NAKs), member `m0` admitted and 23 more waiting for the epoch's rekey, whose
/// packets (MTU 400) then fill several blocks.
fn fec_group(proactivity_pct: u16) -> (Harness, MemberSession) {
    let mut policy = policy(tree());
    policy.packets.fec = keycast_core::wire::rekey::FecConfig { block: 4, proactivity_pct, target_naks: 0, ..Default::default() };
    policy.packets.mtu = 400;
    let names: Vec<String> = (0..24).map(|i| format!("m{i}")).collect();
    let acl: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut h = Harness::new(policy, &acl);
    let a = h.session("m0");
    for name in &names[1..] {
        assert!(matches!(h.join(name), Ok(JoinStatus::Queued(_))));
    }
    (h, a)
}

#[test]
fn a_member_that_loses_every_rekey_packet_rebuilds_them_from_parity() {
    use keycast_core::wire::{message_type, MessageType};
    let (mut h, mut a) = fec_group(200);
    let epoch_ms = h.policy.epoch_ms;
    let datagrams = multicast_for(&mut h, 2 * epoch_ms);
    let kind = |d: &Vec<u8>| message_type(d).unwrap();
    let (rekeys, parity) = (datagrams.iter().filter(|d| kind(d) == MessageType::Rekey).count(), datagrams.iter().filter(|d| kind(d) == MessageType::RekeyParity).count());
    assert!(rekeys >= 2 && parity >= rekeys, "{rekeys} rekey packets, {parity} parity packets");
    // A forged parity packet (one byte changed) of a rekey not applied yet is refused.
    let mut forged = datagrams.iter().find(|d| kind(d) == MessageType::RekeyParity).unwrap().clone();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    assert!(a.receive(&forged, h.now).is_err());
    // Every rekey packet is lost; parity and heartbeats arrive.
    let mut events = Vec::new();
    for d in datagrams.iter().filter(|d| kind(d) != MessageType::Rekey) {
        events.extend(a.receive(d, h.now).unwrap());
    }
    assert!(events.iter().any(|e| matches!(e, MemberEvent::Repaired { .. })), "{events:?}");
    assert!(events.iter().any(|e| matches!(e, MemberEvent::Rekeyed { .. })), "{events:?}");
    assert_eq!(a.rekey_seq(), h.controller.rekey_seq());
    assert!(!a.needs_resync());
    // Once the rekey is applied its parity is passed over unverified, forged or not.
    assert_eq!(a.receive(&forged, h.now), Ok(Vec::new()));
}

/// Ticks for `ms`, returning the datagrams sent (rekeys, parity, heartbeats).
fn multicast_for(h: &mut Harness, ms: u64) -> Vec<Vec<u8>> {
    let mut datagrams = Vec::new();
    for _ in 0..ms / 10 {
        h.now += 10;
        let e = h.entropy();
        for output in h.controller.tick(h.now, e).unwrap() {
            if let Output::Multicast(bytes) = output {
                datagrams.push(bytes);
            }
        }
    }
    datagrams
}

/// A member NAKs once a rekey's round has gone quiet, not half a heartbeat after its first
/// datagram: on a host copying each datagram to thousands of sockets a round lasts long, and
/// a NAK before its end asks for what is on its way.
#[test]
fn a_member_waits_for_the_round_to_go_quiet_before_it_naks() {
    use keycast_core::wire::{message_type, MessageType};
    let (mut h, mut a) = fec_group(150);
    let epoch_ms = h.policy.epoch_ms;
    let half = h.policy.heartbeat_ms / 2;
    let datagrams = multicast_for(&mut h, 2 * epoch_ms);
    let parity: Vec<&Vec<u8>> = datagrams.iter().filter(|d| message_type(d) == Ok(MessageType::RekeyParity)).collect();
    assert!(parity.len() >= 2, "{} parity packets", parity.len());
    // Two shards, a heartbeat interval apart: not enough to rebuild a block of four.
    let first = h.now;
    a.receive(parity[0], first).unwrap();
    let nak_after_first = a.next_nak_ms().expect("behind after a shard of the next rekey");
    assert!(nak_after_first >= first + half);
    let last = first + 2 * half;
    a.receive(parity[1], last).unwrap();
    assert_ne!(a.rekey_seq(), h.controller.rekey_seq(), "two shards rebuild nothing");
    let nak = a.next_nak_ms().expect("still behind");
    assert!(nak >= last + half, "NAK due at {nak} ms, the round's last shard came at {last} ms");
    assert_eq!(a.take_nak(last + half - 1), None, "a NAK before the round has been quiet for half an interval");
}

#[test]
fn a_nak_brings_a_repair_round_that_completes_the_member_and_raises_rho() {
    use keycast_core::wire::{message_type, MessageType};
    // Two parity packets per block of four: not enough for a member that lost every packet.
    let (mut h, mut a) = fec_group(150);
    let rho_before = h.controller.rho();
    let kind = |d: &Vec<u8>| message_type(d).unwrap();
    let epoch_ms = h.policy.epoch_ms;
    let round_one = multicast_for(&mut h, 2 * epoch_ms);
    // `a` hears the parity and the heartbeats, no rekey packet: it cannot rebuild, so it NAKs.
    let mut naks = Vec::new();
    for d in round_one.iter().filter(|d| kind(d) != MessageType::Rekey) {
        a.receive(d, h.now).unwrap();
        // A NAK waits out its spread (a fraction of a heartbeat interval).
        if let Some(at) = a.next_nak_ms() {
            if at > h.now {
                assert_eq!(a.take_nak(h.now), None, "a NAK before its time");
            }
            naks.extend(a.take_nak(at));
        }
    }
    assert_ne!(a.rekey_seq(), h.controller.rekey_seq());
    // A NAK at each of the first two heartbeats naming the rekey, then a resync.
    assert_eq!(naks.len(), 2, "two NAKs per rekey");
    assert_eq!(h.controller.nak(&naks[0], h.now), Ok(a.member()));
    assert!(matches!(h.controller.nak(&naks[0], h.now), Err(LivenessRefused::Replayed { .. })), "a replayed NAK is not counted");
    // A NAK without its member's tag is refused.
    let fresh = keycast_core::wire::Nak { group: h.policy.group, member: a.member(), counter: u64::MAX, seq: h.controller.rekey_seq(), needs: vec![], tag: [0; 32] };
    assert!(matches!(h.controller.nak(&fresh.encode(), h.now), Err(LivenessRefused::BadTag(_))), "an untagged NAK is refused");
    // The repair round answers it; the member rebuilds its packets from round 1 and 2 parity.
    let repair = multicast_for(&mut h, 200);
    let mut events = Vec::new();
    for d in repair.iter().filter(|d| kind(d) == MessageType::RekeyParity) {
        events.extend(a.receive(d, h.now).unwrap());
    }
    assert!(events.iter().any(|e| matches!(e, MemberEvent::Repaired { .. })), "{events:?}");
    assert_eq!(a.rekey_seq(), h.controller.rekey_seq());
    // One NAK against a target of none: the next rekey starts from a higher rho.
    h.evict(MemberId(5));
    assert!(h.controller.rho() > rho_before, "rho {} after a NAK, {rho_before} before", h.controller.rho());
}

/// A NAK flood: every member NAKs every block of the last rekey, asking for all of it, every
/// 10 ms for eight heartbeat intervals, beside forged NAKs from strangers and bad tags. The
/// controller counts one NAK per member per round, sends at most four repair rounds with no
/// more parity than each block's code holds, and never misses a heartbeat.
#[test]
fn a_nak_flood_gets_bounded_repairs_and_heartbeats_stay_on_time() {
    use keycast_core::wire::{message_type, LivenessKey, MessageType, Nak, ParityPacket};
    use keycast_core::Key;
    const MEMBERS: usize = 120;
    let mut p = policy(tree());
    p.packets.fec = keycast_core::wire::rekey::FecConfig { block: 4, proactivity_pct: 150, target_naks: 20, ..Default::default() };
    p.packets.mtu = 400;
    let identities: Vec<String> = (0..MEMBERS).map(|i| format!("m{i}")).collect();
    let mut h = Harness::new(p, &identities.iter().map(String::as_str).collect::<Vec<_>>());
    for identity in &identities {
        assert!(matches!(h.join(identity), Ok(JoinStatus::Queued(_))));
    }
    h.run(2 * p.epoch_ms);
    let keys: Vec<(MemberId, Key)> = h
        .answers
        .iter()
        .filter_map(|(_, answer)| match answer {
            JoinAnswer::Accepted(a) => Some((a.member, a.individual_key.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(keys.len(), MEMBERS);
    // An eviction: an immediate rekey of several blocks, with round-1 parity.
    let (evicted, _) = keys[0].clone();
    let e = h.entropy();
    let outputs = h.controller.evict(evicted, h.now, e).unwrap();
    let mut blocks = BTreeSet::new();
    for output in &outputs {
        if let Output::Multicast(bytes) = output {
            if message_type(bytes) == Ok(MessageType::RekeyParity) {
                let parity = ParityPacket::decode(bytes).unwrap();
                blocks.insert((parity.header.first, parity.header.originals, parity.header.capacity));
            }
        }
    }
    h.take(outputs);
    assert!(blocks.len() >= 2, "a rekey of several FEC blocks: {blocks:?}");
    let seq = h.controller.rekey_seq();
    let needs: Vec<(u32, u16)> = blocks.iter().map(|&(first, originals, _)| (first, originals)).collect();
    let stranger = LivenessKey::derive(&Key::from_bytes([7; 32]), p.group, MemberId(1));
    let (mut heartbeats, mut rounds, mut repair_packets, mut counted) = (0u64, 0, 0usize, 0usize);
    let flood_ms = 8 * p.heartbeat_ms;
    for step in 1..=flood_ms / 10 {
        h.now += 10;
        for (member, key) in &keys[1..] {
            let nak = Nak { group: p.group, member: *member, counter: h.now * 1_000 + step, seq, needs: needs.clone(), tag: [0; 32] };
            counted += usize::from(h.controller.nak(&nak.clone().seal(&LivenessKey::derive(key, p.group, *member)), h.now).is_ok());
            // Forged: an unknown member, and a member's id under a stranger's key.
            for forged_member in [MemberId(10_000 + step), *member] {
                let forged = Nak { member: forged_member, counter: u64::MAX, ..nak.clone() }.seal(&stranger);
                assert!(h.controller.nak(&forged, h.now).is_err());
            }
        }
        let e = h.entropy();
        for output in h.controller.tick(h.now, e).unwrap() {
            match output {
                Output::Multicast(bytes) if message_type(&bytes) == Ok(MessageType::Heartbeat) => heartbeats += 1,
                Output::Repaired { naks, packets, .. } => {
                    assert!(naks < MEMBERS, "one NAK per member per round");
                    rounds += 1;
                    repair_packets += packets;
                }
                other => h.take(vec![other]),
            }
        }
    }
    assert!(heartbeats >= flood_ms / p.heartbeat_ms, "{heartbeats} heartbeats in {flood_ms} ms of flood");
    assert!((1..=4).contains(&rounds), "{rounds} repair rounds");
    let room: usize = blocks.iter().map(|&(_, _, capacity)| usize::from(capacity)).sum();
    assert!(repair_packets <= room, "{repair_packets} repair packets, the codes hold {room}");
    assert!(counted <= rounds * (MEMBERS - 1), "{counted} NAKs counted in {rounds} rounds");
    eprintln!("flood: {counted} NAKs counted, {rounds} repair rounds, {repair_packets} repair packets, {heartbeats} heartbeats");
}
