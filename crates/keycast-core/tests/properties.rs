//! Security invariants of every scheme over random histories of joins, leaves and batches.
//!
//! After every batch, by computing what sets of keys can unwrap from the messages sent:
//! 1. every current member derives the controller's new group key from the rekey alone;
//! 2. the coalition of every departed (and excluded) member derives no key created since;
//! 3. no joiner, even holding every rekey ever sent together with every other joiner of its
//!    batch, derives a group key from before it joined;
//! 4. flat: the members reported as excluded are exactly those whose KEKs were all tainted.

use std::collections::BTreeMap;

use keycast_core::strategy::package;
use keycast_core::{
    new_graph, Batch, BatchSeed, FlatIds, GraphConfig, JoinPolicy, KeyGraph, KeyRef, KeyRing, MemberId, MemberKeys,
    Position, RekeyPlan, Scheme, Wrap,
};
use keycast_core::Strategy as Packaging;
use proptest::prelude::*;
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

#[derive(Clone, Debug)]
struct Step {
    joins: usize,
    leaves: usize,
    strategy: Packaging,
}

struct World {
    graph: Box<dyn KeyGraph>,
    members: BTreeMap<MemberId, MemberKeys>,
    next_member: u64,
    seed: BatchSeed,
    /// Keys held by departed (and excluded) members. Tree and star: one ring for all of them,
    /// the coalition of every departed member. Flat: one ring per batch, the leavers removed
    /// together (Caronni's flat table does not resist leavers of different batches colluding).
    cohorts: Vec<KeyRing>,
    /// Every wrap ever sent, as recorded by an eavesdropper.
    history: Vec<Wrap>,
    /// Group keys in order of creation.
    group_keys: Vec<KeyRef>,
}

impl World {
    fn new(config: GraphConfig, seed: u64) -> Self {
        let seed = BatchSeed::from_u64(seed);
        let graph = new_graph(config, &seed).unwrap();
        World {
            group_keys: vec![graph.group_key().0],
            graph,
            members: BTreeMap::new(),
            next_member: 0,
            seed: seed.next(),
            cohorts: Vec::new(),
            history: Vec::new(),
        }
    }

    fn fresh_members(&mut self, count: usize) -> Vec<MemberId> {
        let ids = (self.next_member..self.next_member + count as u64).map(MemberId).collect();
        self.next_member += count as u64;
        ids
    }

    fn remember_departed(&mut self, departed: &[MemberId]) {
        if departed.is_empty() {
            return;
        }
        let flat = matches!(self.graph.config().scheme, Scheme::Flat { .. });
        if flat || self.cohorts.is_empty() {
            self.cohorts.push(KeyRing::new());
        }
        let ring = self.cohorts.last_mut().expect("cohort");
        for m in departed {
            ring.extend(self.members.remove(m).expect("current member").keyring());
        }
    }

    fn step(&mut self, step: &Step, rng: &mut ChaCha8Rng) {
        let current: Vec<MemberId> = self.members.keys().copied().collect();
        let mut leaves = Vec::new();
        for _ in 0..step.leaves.min(current.len()) {
            let m = current[(rng.next_u64() % current.len() as u64) as usize];
            if !leaves.contains(&m) {
                leaves.push(m);
            }
        }
        let batch = Batch { joins: self.fresh_members(step.joins), leaves };
        let tainted = self.tainted_flat_bits(&batch.leaves);
        self.seed = self.seed.next();
        let plan = self.graph.apply(&batch, &self.seed).expect("valid batch");
        self.check_exclusions(&batch, &plan, tainted);
        let departed: Vec<MemberId> = batch.leaves.iter().chain(&plan.excluded).copied().collect();
        self.remember_departed(&departed);
        let previous_group_keys = self.group_keys.clone();
        self.group_keys.push(plan.group_key);
        self.deliver(&plan, step.strategy);
        self.history.extend(plan.wraps.iter().cloned());
        self.check_coalition(&plan);
        self.check_joiners(&plan, &previous_group_keys);
    }

    /// Property 1: each member, given the messages it would use, reaches the controller's state.
    fn deliver(&mut self, plan: &RekeyPlan, strategy: Packaging) {
        for welcome in &plan.welcomes {
            self.members.insert(welcome.member, MemberKeys::from_welcome(welcome));
        }
        let messages = package(plan, strategy);
        let (group_ref, group_key) = self.graph.group_key();
        assert_eq!(group_ref, plan.group_key);
        let height = self.graph.stats().height as usize;
        for (&member, state) in self.members.iter_mut() {
            let mine: Vec<_> = match strategy {
                // A member takes only the messages whose entry it can open.
                Packaging::UserOriented => {
                    let picked: Vec<_> = messages
                        .iter()
                        .filter(|m| m.wraps.first().is_some_and(|w| opens(state, w)))
                        .cloned()
                        .collect();
                    if picked.is_empty() { messages[..1].to_vec() } else { picked }
                }
                _ => messages.clone(),
            };
            let update = state.apply(&mine).unwrap_or_else(|e| panic!("member {member:?}: {e}"));
            assert_eq!(update.group_key, plan.group_key);
            assert!(state.group_key().unwrap().1 == *group_key, "member {member:?} holds a different group key");
            // A member may hold an earlier revision of a key no message named: it derives the
            // controller's revision on demand, and holds no key off its path.
            let (_, expected) = self.graph.member_keys(member).expect("member");
            for (r, key) in &expected {
                assert!(state.key(*r).is_some_and(|k| k == *key), "member {member:?} cannot derive {r}");
            }
            let mut expected_ids: Vec<_> = expected.iter().map(|(r, _)| (r.id, r.version)).collect();
            let mut held_ids: Vec<_> = state.refs().into_iter().map(|r| (r.id, r.version)).collect();
            expected_ids.sort();
            held_ids.sort();
            assert_eq!(held_ids, expected_ids, "member {member:?} path differs from the controller's");
            if let Position::Tree { .. } = state.position() {
                assert!(update.unwraps <= height, "{} unwraps in a tree of height {height}", update.unwraps);
            }
        }
    }

    /// Property 2: departed members, alone or in coalition, learn nothing new.
    fn check_coalition(&mut self, plan: &RekeyPlan) {
        for ring in &mut self.cohorts {
            ring.absorb(&self.history).expect("authentic wraps");
            for r in plan.replaced.iter().chain(&plan.revised).chain([&plan.group_key]) {
                assert!(!ring.holds(*r), "departed members derive new key {r}");
            }
        }
    }

    /// Property 3: the joiners of a batch that recorded every rekey cannot reach an earlier
    /// group key. All of them are checked at once, as one coalition: what several keys can
    /// unwrap includes what any one of them can, so this covers every joiner alone as well.
    fn check_joiners(&self, plan: &RekeyPlan, earlier: &[KeyRef]) {
        if plan.welcomes.is_empty() {
            return;
        }
        let mut coalition = KeyRing::new();
        for welcome in &plan.welcomes {
            coalition.insert(welcome.individual, welcome.individual_key.clone());
        }
        coalition.absorb(&self.history).expect("authentic wraps");
        for r in earlier {
            assert!(!coalition.holds(*r), "the {} joiners together derive earlier group key {r}", plan.welcomes.len());
        }
        assert!(coalition.holds(plan.group_key), "joiners cannot derive the current group key");
    }

    /// (bit, value) pairs held by flat leavers, before the batch.
    fn tainted_flat_bits(&self, leaves: &[MemberId]) -> Vec<(u8, u64)> {
        let mut tainted = Vec::new();
        for m in leaves {
            if let Position::Flat { id, id_bits } = self.members[m].position() {
                tainted.extend((0..id_bits).map(|i| (i, (id >> i) & 1)));
            }
        }
        tainted
    }

    /// Property 4: flat exclusions are exactly the members covered by the leavers' bits.
    fn check_exclusions(&self, batch: &Batch, plan: &RekeyPlan, tainted: Vec<(u8, u64)>) {
        let mut expected = Vec::new();
        if !batch.leaves.is_empty() {
            for (m, state) in &self.members {
                if let Position::Flat { id, id_bits } = state.position() {
                    let covered = (0..id_bits).all(|i| tainted.contains(&(i, (id >> i) & 1)));
                    if covered && !batch.leaves.contains(m) {
                        expected.push(*m);
                    }
                }
            }
        }
        let mut reported = plan.excluded.clone();
        reported.sort();
        assert_eq!(reported, expected, "excluded members");
    }
}

fn opens(state: &MemberKeys, wrap: &Wrap) -> bool {
    match wrap.under {
        keycast_core::Wrapper::Key(r) => state.key(r).is_some(),
        keycast_core::Wrapper::KekAndTek { kek, .. } => state.key(kek).is_some(),
    }
}

fn config() -> impl proptest::strategy::Strategy<Value = GraphConfig> {
    let scheme = prop_oneof![
        Just(Scheme::Star),
        (2u32..=8).prop_map(|degree| Scheme::Tree { degree }),
        (12u8..=16).prop_map(|id_bits| Scheme::Flat { id_bits, ids: FlatIds::Sequential }),
    ];
    let policy = prop_oneof![Just(JoinPolicy::NewVersion), Just(JoinPolicy::Revision)];
    (scheme, policy).prop_map(|(scheme, join_policy)| GraphConfig { scheme, join_policy })
}

fn steps(max_joins: usize, max_leaves: usize) -> impl proptest::strategy::Strategy<Value = Vec<Step>> {
    let strategy = prop_oneof![Just(Packaging::GroupOriented), Just(Packaging::KeyOriented), Just(Packaging::UserOriented)];
    prop::collection::vec(
        (0..=max_joins, 0..=max_leaves, strategy).prop_map(|(joins, leaves, strategy)| Step { joins, leaves, strategy }),
        1..8,
    )
}

fn run(config: GraphConfig, initial: usize, steps: &[Step], seed: u64) {
    let mut world = World::new(config, seed);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    world.step(&Step { joins: initial, leaves: 0, strategy: Packaging::GroupOriented }, &mut rng);
    for step in steps {
        world.step(step, &mut rng);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2500, ..ProptestConfig::default() })]

    #[test]
    fn small_groups_keep_every_invariant(config in config(), initial in 0usize..64, steps in steps(12, 12), seed: u64) {
        run(config, initial, &steps, seed);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn groups_of_thousands_keep_every_invariant(config in config(), initial in 1000usize..2500, steps in steps(200, 200), seed: u64) {
        run(config, initial, &steps, seed);
    }
}

/// A batch that every graph must survive: its members all leave and two join.
fn churn(graph: &dyn KeyGraph, first_new: u64) -> Batch {
    let mut leaves: Vec<MemberId> = (0..first_new).map(MemberId).filter(|&m| graph.contains(m)).collect();
    leaves.truncate(64);
    Batch { joins: vec![MemberId(first_new), MemberId(first_new + 1)], leaves }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// A snapshot's graph comes back the same; a damaged one is refused, or is a graph whose
    /// next batch succeeds or fails with an error, never a panic.
    #[test]
    fn snapshots_restore_the_same_graph_and_damaged_ones_never_panic(
        config in config(), initial in 0usize..48, steps in steps(8, 8), seed: u64, at: prop::sample::Index, flip in 1u8..=255, truncate: bool,
    ) {
        let mut world = World::new(config, seed);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        world.step(&Step { joins: initial, leaves: 0, strategy: Packaging::GroupOriented }, &mut rng);
        for step in &steps {
            world.step(step, &mut rng);
        }
        let exported = world.graph.export();
        let mut restored = keycast_core::import_graph(config, &exported).expect("an intact snapshot imports");
        prop_assert_eq!(&restored.export()[..], &exported[..]);
        let batch = churn(world.graph.as_ref(), world.next_member);
        let next = world.seed.next();
        prop_assert_eq!(restored.apply(&batch, &next).unwrap().group_key, world.graph.apply(&batch, &next).unwrap().group_key);

        let mut damaged = exported.to_vec();
        let i = at.index(damaged.len());
        if truncate { damaged.truncate(i) } else { damaged[i] ^= flip }
        if let Ok(mut graph) = keycast_core::import_graph(config, &damaged) {
            let batch = churn(graph.as_ref(), world.next_member + 2);
            let _ = graph.apply(&batch, &next.next());
        }
    }
}

/// Members open about d/(d-1) wraps per single leave on average (Wong et al.).
#[test]
fn members_unwrap_about_d_over_d_minus_one_per_leave() {
    for degree in [2u32, 4, 8] {
        let n = (degree as u64).pow(match degree { 2 => 10, 4 => 5, _ => 4 });
        let mut world = World::new(GraphConfig { scheme: Scheme::Tree { degree }, join_policy: JoinPolicy::NewVersion }, 9);
        world.step(&Step { joins: n as usize, leaves: 0, strategy: Packaging::GroupOriented }, &mut ChaCha8Rng::seed_from_u64(1));
        world.seed = world.seed.next();
        let plan = world.graph.apply(&Batch { joins: vec![], leaves: vec![MemberId(0)] }, &world.seed).unwrap();
        world.members.remove(&MemberId(0));
        let messages = package(&plan, Packaging::GroupOriented);
        let total: usize = world.members.values_mut().map(|m| m.apply(&messages).unwrap().unwraps).sum();
        let mean = total as f64 / world.members.len() as f64;
        let expected = degree as f64 / (degree as f64 - 1.0);
        assert!((mean - expected).abs() < 0.05 * expected, "d={degree}: mean {mean}, expected about {expected}");
    }
}

/// A batch large enough to empty its leavers' leaves on every core (over 512 leavers, spread
/// over more than one 16,384-leaf chunk): no wrap is sealed under a leaver's key, the tree
/// forgets exactly the leavers, and joiners refill exactly their leaves.
#[test]
fn a_large_batch_shuts_out_every_leaver_and_frees_exactly_their_leaves() {
    let n = 40_000u64;
    let config = GraphConfig { scheme: Scheme::Tree { degree: 4 }, join_policy: JoinPolicy::NewVersion };
    let mut graph = new_graph(config, &BatchSeed::from_u64(1)).unwrap();
    graph.apply(&Batch { joins: (0..n).map(MemberId).collect(), leaves: vec![] }, &BatchSeed::from_u64(2)).unwrap();
    let before = graph.stats();
    let leavers: Vec<MemberId> = (0..n).filter(|i| i % 13 == 5).map(MemberId).collect();
    let leaf = |keys: Vec<(KeyRef, keycast_core::Key)>| keys[0].0;
    let leaver_leaves: Vec<KeyRef> = leavers.iter().map(|&m| leaf(graph.member_keys(m).unwrap().1)).collect();
    let plan = graph.apply(&Batch { joins: vec![], leaves: leavers.clone() }, &BatchSeed::from_u64(3)).unwrap();
    for w in &plan.wraps {
        if let keycast_core::Wrapper::Key(under) = w.under {
            assert!(leaver_leaves.binary_search(&under).is_err(), "{} sealed under a leaver's key {under}", w.key);
        }
    }
    assert!(leavers.iter().all(|&m| !graph.contains(m)));
    assert_eq!(graph.stats().members, (n as usize) - leavers.len());
    assert_eq!(graph.stats().stored_keys, before.stored_keys - leavers.len());
    let joiners: Vec<MemberId> = (n..n + leavers.len() as u64).map(MemberId).collect();
    let plan = graph.apply(&Batch { joins: joiners, leaves: vec![] }, &BatchSeed::from_u64(4)).unwrap();
    let mut refilled: Vec<_> = plan.welcomes.iter().map(|w| w.individual.id).collect();
    refilled.sort();
    let freed: Vec<_> = leaver_leaves.iter().map(|r| r.id).collect();
    assert_eq!(refilled, freed);
    assert_eq!((graph.stats().members, graph.stats().height), (n as usize, before.height));
}
