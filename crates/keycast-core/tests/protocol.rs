//! The controller and member state machines over random histories, deterministically: joins,
//! leaves, evictions, expiries, lost datagrams (0 to 75%), a controller that crashes after any
//! prefix of its outputs and restarts from what it had persisted, a controller restarted from
//! an older copy of its log (any earlier point), a restart under a changed configuration, and
//! departed identities that try to rejoin, and signing-key rotations. After every step each member that the controller
//! counts ends with the controller's active group key, an evicted member cannot open data
//! sealed after its eviction nor join again, and no wrapping key ever seals two different
//! plaintexts under one nonce (checked over every wrap multicast).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use keycast_core::protocol::{Controller, ControllerError, Departure, GroupPolicy, JoinStatus, MemberEvent, MemberSession, Output, Record};
use keycast_core::protocol::traffic::Fresh;
use keycast_core::wire::rekey::{PacketConfig, Placement};
use keycast_core::wire::{GroupId, JoinAnswer, Message, RefusalReason};
use keycast_core::wrap::wrap_nonce;
use keycast_core::{GraphConfig, JoinPolicy, KeyRef, MemberId, Scheme, Wrapper};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Step {
    Join,
    Leave(usize),
    Evict(usize),
    /// Time passes (ms); datagrams are lost with probability `loss` quarters (0 to 3).
    Wait { ms: u64, loss: u8 },
    /// The controller dies after delivering `after` (modulo their number plus one) of its next
    /// outputs, then restarts: any prefix, from none to all.
    Crash { after: usize },
    Silence(usize),
    /// The controller restarts from the first `keep` (modulo the log's length) records of its
    /// log: a backup restored, evictions and joins since then forgotten by it.
    Rollback { keep: usize },
    /// A departed identity asks to join again.
    Rejoin(usize),
    /// The controller rotates its signing key.
    RotateSigner,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => Just(Step::Join),
        2 => any::<usize>().prop_map(Step::Leave),
        1 => any::<usize>().prop_map(Step::Evict),
        4 => (1u64..400, 0u8..4).prop_map(|(ms, loss)| Step::Wait { ms, loss }),
        2 => any::<usize>().prop_map(|after| Step::Crash { after }),
        1 => any::<usize>().prop_map(Step::Silence),
        1 => any::<usize>().prop_map(|keep| Step::Rollback { keep }),
        1 => any::<usize>().prop_map(Step::Rejoin),
        1 => Just(Step::RotateSigner),
    ]
}

fn policy(scheme: Scheme, immediate_eviction: bool, placement: Placement, revisions: bool) -> GroupPolicy {
    let join_policy = if revisions { JoinPolicy::Revision } else { JoinPolicy::NewVersion };
    GroupPolicy {
        group: GroupId(9),
        graph: GraphConfig { scheme, join_policy },
        epoch_ms: 100,
        activation_delay: 1,
        heartbeat_ms: 30,
        refresh_timeout_ms: 1_000,
        immediate_eviction,
        membership_deltas: true,
        reflector: false,
        packets: PacketConfig { mtu: 600, placement, ..PacketConfig::default() },
    }
}

const CREATED_MS: u64 = 1_000;
/// Snapshots every few batches, so that histories restart from snapshots too.
const SNAPSHOT_EVERY: u64 = 3;

struct Member {
    identity: String,
    session: MemberSession,
    /// Refreshes stop when the application goes silent.
    silent: bool,
}

struct World {
    policy: GroupPolicy,
    acl: BTreeSet<String>,
    controller: Controller,
    /// The persisted log, compacted at each snapshot as the driver's store does.
    log: Vec<Record>,
    /// Records dropped by snapshots so far (a record's place in the whole history is this plus
    /// its index in `log`).
    compacted: usize,
    /// Every member removed by a persisted batch: (place in the history, member, activation).
    removals: Vec<(usize, MemberId, u64)>,
    now: u64,
    entropy: u64,
    members: BTreeMap<MemberId, Member>,
    evicted: Vec<MemberSession>,
    /// Joins waiting for their epoch, by connection.
    joining: BTreeMap<u64, String>,
    next_identity: usize,
    next_conn: u64,
    rng: u64,
    /// Resyncs answered so far.
    resyncs: usize,
    /// Identities of departed members (left, expired or evicted), for rejoin attempts.
    departed: Vec<String>,
    /// Identities evicted since the last rollback: the controller must refuse their joins.
    revoked: BTreeSet<String>,
    /// Every wrap multicast, by (wrapping key ref, nonce): the wrapped ref and its ciphertext.
    nonces: HashMap<(Wrapper, [u8; 12]), (KeyRef, [u8; 48])>,
    /// Contradictions members raised (after rollbacks).
    contradictions: usize,
    /// A rollback happened since the last check: members it resurrected must expire first.
    rolled_back: bool,
}

impl World {
    fn new(policy: GroupPolicy, seed: u64) -> Self {
        let acl: BTreeSet<String> = (0..200).map(|i| format!("m{i}")).collect();
        let (mut controller, genesis) = Controller::create(policy, acl.clone(), CREATED_MS, [seed as u8; 32], [7; 32]).unwrap();
        controller.set_snapshot_interval(SNAPSHOT_EVERY);
        let Output::Persist(genesis) = genesis else { panic!("genesis is a record") };
        World {
            policy,
            acl,
            controller,
            log: vec![genesis],
            compacted: 0,
            removals: Vec::new(),
            now: CREATED_MS,
            entropy: seed,
            members: BTreeMap::new(),
            evicted: Vec::new(),
            joining: BTreeMap::new(),
            next_identity: 0,
            next_conn: 0,
            rng: seed | 1,
            resyncs: 0,
            departed: Vec::new(),
            revoked: BTreeSet::new(),
            nonces: HashMap::new(),
            contradictions: 0,
            rolled_back: false,
        }
    }

    fn random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn entropy(&mut self) -> [u8; 32] {
        self.entropy += 1;
        let mut e = [0u8; 32];
        e[..8].copy_from_slice(&self.entropy.to_be_bytes());
        e
    }

    /// Carries out outputs; with `crash_after`, stops after that many and restarts.
    fn deliver(&mut self, outputs: Vec<Output>, loss: u8, crash_after: Option<usize>) {
        let cut = crash_after.map_or(usize::MAX, |after| after % (outputs.len() + 1));
        // Consecutive datagrams may arrive in either order (a member may see the upper tier of
        // a rekey before the lower one).
        let mut datagrams: Vec<Vec<u8>> = Vec::new();
        for (i, output) in outputs.into_iter().enumerate() {
            if !matches!(output, Output::Multicast(_)) || i >= cut {
                self.flush(&mut datagrams, loss);
            }
            if i >= cut {
                return self.restart();
            }
            match output {
                Output::Persist(r) => self.persist(r),
                Output::Multicast(bytes) => datagrams.push(bytes),
                Output::JoinAnswer { conn, answer, keys } => {
                    let identity = self.joining.remove(&conn).expect("a waiting joiner");
                    let JoinAnswer::Accepted(accepted) = answer else { panic!("refused after acceptance") };
                    let (session, _) = MemberSession::join(&accepted, keys.unwrap(), self.policy.heartbeat_ms, self.now);
                    self.members.insert(accepted.member, Member { identity, session, silent: false });
                }
                Output::Departed { member, identity, why } => {
                    if why == Departure::Evicted {
                        self.revoked.insert(identity.clone());
                    }
                    self.departed.push(identity);
                    if let Some(m) = self.members.remove(&member) {
                        self.evicted.push(m.session);
                    }
                }
                Output::Rekeyed { .. } | Output::Repaired { .. } => {}
            }
        }
        self.flush(&mut datagrams, loss);
        if crash_after.is_some() {
            self.restart();
        }
    }

    fn flush(&mut self, datagrams: &mut Vec<Vec<u8>>, loss: u8) {
        if self.random() % 2 == 0 {
            datagrams.reverse();
        }
        for bytes in datagrams.drain(..) {
            self.multicast(&bytes, loss);
        }
    }

    fn multicast(&mut self, bytes: &[u8], loss: u8) {
        self.audit_nonces(bytes);
        let now = self.now;
        let ids: Vec<MemberId> = self.members.keys().copied().collect();
        for id in ids {
            if (self.random() % 4) < loss as u64 {
                continue;
            }
            let events = self.members.get_mut(&id).unwrap().session.receive(bytes, now).unwrap_or_default();
            self.contradictions += events.iter().filter(|e| matches!(e, MemberEvent::Contradiction { .. })).count();
        }
        for s in &mut self.evicted {
            let _ = s.receive(bytes, now);
        }
    }

    /// Persists as the driver's store does: a snapshot replaces the log before it.
    fn persist(&mut self, record: Record) {
        match &record {
            Record::Batch { leaves, activation, .. } => {
                let place = self.compacted + self.log.len();
                self.removals.extend(leaves.iter().map(|m| (place, *m, *activation)));
            }
            Record::Snapshot(_) => {
                self.compacted += self.log.len();
                self.log.clear();
            }
            _ => {}
        }
        self.log.push(record);
    }

    /// No wrapping key seals two different plaintexts under one nonce: the same (wrapper,
    /// nonce) always carries the same wrapped ref and ciphertext (a replay of the same wrap).
    fn audit_nonces(&mut self, bytes: &[u8]) {
        let Ok(Message::Rekey(packet)) = Message::decode(bytes) else { return };
        for w in packet.wraps {
            let nonce = wrap_nonce(w.key, &w.salt);
            let sealed = self.nonces.entry((w.under, nonce)).or_insert((w.key, w.sealed));
            assert_eq!(*sealed, (w.key, w.sealed), "under {:?} nonce {} sealed two plaintexts", w.under, hex::encode(nonce));
        }
    }

    fn restart(&mut self) {
        // A configuration that changes what shapes the keys is refused, naming the setting.
        let mut changed = self.policy;
        changed.epoch_ms += 1;
        assert!(matches!(Controller::restore(changed, self.acl.clone(), &self.log, self.now), Err(ControllerError::PolicyChanged { .. })));
        self.controller = Controller::restore(self.policy, self.acl.clone(), &self.log, self.now).unwrap();
        self.controller.set_snapshot_interval(SNAPSHOT_EVERY);
        // Joins in flight died with the connections; their applications try again.
        let retry: Vec<String> = std::mem::take(&mut self.joining).into_values().collect();
        for identity in retry {
            self.join(identity);
        }
        for packet in self.controller.last_rekey().to_vec() {
            self.multicast(&packet, 0);
        }
    }

    fn join(&mut self, identity: String) {
        self.next_conn += 1;
        if let Ok(status) = self.controller.join(self.next_conn, &identity, self.policy.group, self.now) {
            self.admit(status, identity);
        }
    }

    fn admit(&mut self, status: JoinStatus, identity: String) {
        match status {
            JoinStatus::Queued(_) => {
                self.joining.retain(|_, waiting| *waiting != identity);
                self.joining.insert(self.next_conn, identity);
            }
            JoinStatus::Admitted(answer) => {
                let (JoinAnswer::Accepted(accepted), keys) = *answer else { panic!("admitted means accepted") };
                if !self.members.contains_key(&accepted.member) {
                    let (session, _) = MemberSession::join(&accepted, keys, self.policy.heartbeat_ms, self.now);
                    self.members.insert(accepted.member, Member { identity, session, silent: false });
                }
            }
        }
    }

    fn pick(&self, i: usize) -> Option<MemberId> {
        let ids: Vec<MemberId> = self.members.keys().copied().collect();
        (!ids.is_empty()).then(|| ids[i % ids.len()])
    }

    fn run(&mut self, step: Step) {
        match step {
            Step::Join => {
                let identity = format!("m{}", self.next_identity % 200);
                self.next_identity += 1;
                self.join(identity);
            }
            Step::Leave(i) => {
                if let Some(m) = self.pick(i) {
                    // The application leaves once the controller acknowledges (persists) it.
                    let gone = self.members.remove(&m).unwrap();
                    // Refused only if the controller already removed it (its notice was lost).
                    let outputs = self.controller.leave(&gone.identity, m).unwrap_or_default();
                    self.evicted.push(gone.session);
                    self.deliver(outputs, 0, None);
                }
            }
            Step::Evict(i) => {
                if let Some(m) = self.pick(i) {
                    let e = self.entropy();
                    let outputs = self.controller.evict(m, self.now, e).unwrap();
                    self.deliver(outputs, 0, None);
                }
            }
            Step::Wait { ms, loss } => self.advance(ms, loss, None),
            Step::Crash { after } => self.advance(self.policy.epoch_ms, 0, Some(after)),
            Step::Silence(i) => {
                if let Some(m) = self.pick(i) {
                    self.members.get_mut(&m).unwrap().silent = true;
                }
            }
            Step::Rollback { keep } => self.rollback(keep),
            Step::RotateSigner => {
                let seed = self.entropy();
                let outputs = self.controller.rotate_signing_key(seed);
                self.deliver(outputs, 0, None);
            }
            Step::Rejoin(i) => {
                if self.departed.is_empty() {
                    return;
                }
                let identity = self.departed[i % self.departed.len()].clone();
                let revoked = self.revoked.contains(&identity);
                self.next_conn += 1;
                match self.controller.join(self.next_conn, &identity, self.policy.group, self.now) {
                    Err(refusal) if revoked => assert_eq!(refusal.reason, RefusalReason::Revoked, "{refusal}"),
                    Ok(_) if revoked => panic!("evicted {identity} joined again"),
                    Ok(status) => self.admit(status, identity),
                    Err(_) => {}
                }
            }
        }
    }

    /// The controller restarts from a prefix of its log (a restored backup). Members it no
    /// longer counts are gone (their next request is refused); the others detect what
    /// contradicts the keys they hold and resync. Evictions after the prefix are forgotten.
    fn rollback(&mut self, keep: usize) {
        let keep = 1 + keep % self.log.len();
        self.log.truncate(keep);
        let cutoff = self.compacted + keep;
        self.removals.retain(|(place, _, _)| *place < cutoff);
        self.restart();
        self.revoked = self.controller.revoked().clone();
        let counted: BTreeSet<MemberId> = self.controller.members().keys().copied().collect();
        let lost: Vec<MemberId> = self.members.keys().filter(|m| !counted.contains(m)).copied().collect();
        for m in lost {
            let gone = self.members.remove(&m).unwrap();
            self.evicted.push(gone.session);
        }
        // Members it counts that the world lost (departed after the prefix) stay silent and
        // expire; the check waits for that.
        self.rolled_back = true;
    }

    fn advance(&mut self, ms: u64, loss: u8, crash_after: Option<usize>) {
        let end = self.now + ms;
        while self.now < end {
            self.now = (self.now + 10).min(end);
            self.refresh_and_resync();
            let e = self.entropy();
            let outputs = self.controller.tick(self.now, e).unwrap();
            let crash = if outputs.is_empty() { None } else { crash_after };
            self.deliver(outputs, loss, crash);
        }
    }

    /// What member drivers do: refresh (unless silent) and resync when out of sync.
    fn refresh_and_resync(&mut self) {
        let now = self.now;
        let ids: Vec<MemberId> = self.members.keys().copied().collect();
        for id in ids {
            let m = self.members.get_mut(&id).unwrap();
            m.session.tick(now);
            if !m.silent {
                let _ = self.controller.refresh(&m.identity, id, m.session.rekey_seq(), now);
            }
            if m.session.needs_resync() {
                match self.controller.resync(&m.identity, id, m.session.rekey_seq(), now) {
                    Ok(answer) => {
                        m.session.resynced(answer, now);
                        self.resyncs += 1;
                    }
                    Err(_) => {
                        let gone = self.members.remove(&id).unwrap();
                        self.evicted.push(gone.session);
                    }
                }
            }
        }
    }

    /// After a quiet stretch without loss, everyone holds the controller's active key and no
    /// removed member can read new traffic.
    fn check(&mut self) {
        if std::mem::take(&mut self.rolled_back) {
            // Members the restored log still counts but whose applications are gone expire.
            self.advance(self.policy.refresh_timeout_ms + 2 * self.policy.epoch_ms, 0, None);
        }
        self.advance(2 * self.policy.epoch_ms + 2 * self.policy.heartbeat_ms, 0, None);
        // Members learn a new epoch from its first heartbeat: check once one has gone out.
        while (self.now - CREATED_MS) % self.policy.epoch_ms <= self.policy.heartbeat_ms + 10 {
            self.advance(10, 0, None);
        }
        let counted: BTreeSet<MemberId> = self.controller.members().keys().copied().collect();
        let ours: BTreeSet<MemberId> = self.members.keys().copied().collect();
        assert_eq!(counted, ours, "the controller and the members disagree on who is in the group");
        let epoch = self.controller.epoch_at(self.now);
        let active = self.controller.active_key(epoch);
        let mut sealed = None;
        for (id, m) in &mut self.members {
            let held = m.session.active_key().map(|(r, _)| r);
            assert_eq!(held, Some(active), "member {id:?} is not at the active key");
            sealed.get_or_insert_with(|| m.session.seal(b"tick", Fresh { message_key: [3; 32], nonce: [3; 12] }).unwrap());
        }
        if let Some(data) = sealed {
            for m in self.members.values_mut() {
                assert_eq!(m.session.open(&data).unwrap(), b"tick");
            }
            for gone in &mut self.evicted {
                // A removal takes effect at its batch's activation (immediately for evictions).
                let removed_by = self.removals.iter().find(|(_, m, _)| *m == gone.member()).map(|(_, _, activation)| *activation);
                if removed_by.is_some_and(|activation| activation <= epoch) {
                    assert!(gone.open(&data).is_err(), "removed member {:?} opened traffic sealed under {active:?}", gone.member());
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(std::env::var("KEYCAST_PROTOCOL_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(128)))]

    #[test]
    fn members_follow_the_controller_through_loss_and_crashes(
        steps in prop::collection::vec(step(), 1..40),
        seed in any::<u64>(),
        tree in any::<bool>(),
        immediate in any::<bool>(),
        placement in prop_oneof![Just(Placement::Auto), Just(Placement::UserOriented), Just(Placement::Tiered)],
        revisions in any::<bool>(),
    ) {
        let scheme = if tree { Scheme::Tree { degree: 3 } } else { Scheme::Star };
        let mut world = World::new(policy(scheme, immediate, placement, revisions), seed);
        for (i, step) in steps.into_iter().enumerate() {
            world.run(step);
            if i % 8 == 7 {
                world.check();
            }
        }
        world.check();
    }

    /// Without loss or crashes, multicast alone keeps everyone in sync, whatever the placement a
    /// live group may use
    /// and the order in which a rekey's packets arrive: no member ever needs a resync.
    #[test]
    fn without_loss_no_member_needs_a_resync(
        steps in prop::collection::vec(step().prop_filter("lossless, no crash or rollback", |s| !matches!(s, Step::Crash { .. } | Step::Rollback { .. } | Step::Wait { loss: 1.., .. })), 1..40),
        seed in any::<u64>(),
        tree in any::<bool>(),
        placement in prop_oneof![Just(Placement::Auto), Just(Placement::UserOriented), Just(Placement::Tiered)],
        revisions in any::<bool>(),
    ) {
        let scheme = if tree { Scheme::Tree { degree: 3 } } else { Scheme::Star };
        let mut world = World::new(policy(scheme, false, placement, revisions), seed);
        for step in steps {
            world.run(step);
        }
        world.check();
        prop_assert_eq!(world.resyncs, 0);
    }
}




/// A joiner is admitted holding its batch's key, pending: the next batch of joins alone only
/// advances that key's revision, which the joiner must derive from the key it holds.
#[test]
fn a_joiner_derives_the_next_revision_of_the_key_it_was_admitted_with() {
    let mut world = World::new(policy(Scheme::Star, false, Placement::Auto, true), 0);
    for step in [Step::Join, Step::Wait { ms: 100, loss: 0 }, Step::Leave(0), Step::Join, Step::Wait { ms: 100, loss: 0 }, Step::Join] {
        world.run(step);
    }
    world.check();
    assert_eq!(world.resyncs, 0);
}
