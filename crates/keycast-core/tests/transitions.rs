//! Caronni et al.'s transitions between centralized flat and centralized tree (section 3.5,
//! figure 6): flat to tree with no message, tree to flat with the large message that keeps
//! perfect forward secrecy. After each, every member holds exactly the controller's keys for
//! it, the new graph rekeys as any graph of its scheme, and departed members derive nothing
//! later; footnote 1's concession (colluding old participants cannot be expelled from the
//! tree) is shown as a test.

use std::collections::{BTreeMap, BTreeSet};

use keycast_core::graph::transition::{
    flat_from_tree, member_flat_keys, member_tree_keys, tree_from_flat, tree_node_key, TreeSwitch,
};
use keycast_core::strategy::package;
use keycast_core::{
    new_graph, Batch, BatchSeed, FlatIds, GraphConfig, JoinPolicy, Key, KeyGraph, KeyId, KeyRef, KeyRing, MemberId,
    MemberKeys, RekeyPlan, Scheme, Strategy as Packaging, Wrap,
};
use proptest::prelude::*;

/// tree_key_id(height, position), as the tree numbers its keys.
fn tree_id(height: u32, position: u32) -> KeyId {
    KeyId((height << 27) | position)
}

/// A controller and its members, with every wrap an eavesdropper recorded.
struct Group {
    graph: Box<dyn KeyGraph>,
    members: BTreeMap<MemberId, MemberKeys>,
    next_member: u64,
    seed: BatchSeed,
    history: Vec<Wrap>,
}

impl Group {
    fn new(config: GraphConfig, seed: u64) -> Self {
        let seed = BatchSeed::from_u64(seed);
        let graph = new_graph(config, &seed).unwrap();
        Group { graph, members: BTreeMap::new(), next_member: 0, seed: seed.next(), history: Vec::new() }
    }

    fn fresh(&mut self, count: usize) -> Vec<MemberId> {
        let ids = (self.next_member..self.next_member + count as u64).map(MemberId).collect();
        self.next_member += count as u64;
        ids
    }

    /// Applies `batch`, delivers the rekey to every member (each must reach the controller's
    /// group key) and returns the plan and the states of the members it removed.
    fn apply(&mut self, batch: Batch) -> (RekeyPlan, Vec<MemberKeys>) {
        self.seed = self.seed.next();
        let plan = self.graph.apply(&batch, &self.seed).expect("valid batch");
        let removed = plan.departed.iter().chain(&plan.excluded).map(|m| self.members.remove(m).expect("a member")).collect();
        for welcome in &plan.welcomes {
            self.members.insert(welcome.member, MemberKeys::from_welcome(welcome));
        }
        if !batch.is_empty() {
            let messages = package(&plan, Packaging::GroupOriented);
            for (member, state) in self.members.iter_mut() {
                state.apply(&messages).unwrap_or_else(|e| panic!("member {member:?}: {e}"));
            }
        }
        self.history.extend(plan.wraps.iter().cloned());
        self.assert_members_hold_their_keys();
        (plan, removed)
    }

    fn leave(&mut self, members: &[MemberId]) -> (RekeyPlan, Vec<MemberKeys>) {
        self.apply(Batch { joins: Vec::new(), leaves: members.to_vec() })
    }

    fn join(&mut self, count: usize) -> Vec<MemberId> {
        let joins = self.fresh(count);
        self.apply(Batch { joins: joins.clone(), leaves: Vec::new() });
        joins
    }

    /// Every member holds exactly the keys the controller's graph gives it (refs and values).
    fn assert_members_hold_their_keys(&self) {
        for (&member, state) in &self.members {
            let (position, expected) = self.graph.member_keys(member).expect("a member");
            assert_eq!(state.position(), position, "member {member:?}");
            let expected_refs: BTreeSet<KeyRef> = expected.iter().map(|(r, _)| *r).collect();
            let held: BTreeSet<KeyRef> = state.refs().into_iter().collect();
            assert_eq!(held, expected_refs, "member {member:?} holds other refs than the controller gives it");
            for (r, key) in &expected {
                assert!(state.key(*r).is_some_and(|k| k == *key), "member {member:?} holds another value for {r}");
            }
            assert_eq!(state.group_key().map(|(r, _)| r), Some(self.graph.group_key().0));
        }
    }

    fn member_ids(&self) -> Vec<MemberId> {
        self.members.keys().copied().collect()
    }
}

/// What a coalition holding `ring` reads: every node of the transition tree whose bits'
/// KEKs (and the TEK) it holds, then every wrap of `history`.
fn coalition_reads(ring: &mut KeyRing, transition: Option<&Transition>, history: &[Wrap]) {
    if let Some(t) = transition {
        for (node, key) in t.derivable_nodes(ring) {
            ring.insert(node, key);
        }
    }
    ring.absorb(history).expect("authentic wraps");
}

/// The public facts of a flat-to-tree switch that a coalition derives with.
struct Transition {
    switch: TreeSwitch,
    tek: KeyRef,
    /// The refs of the flat table's KEKs at the switch, by (bit, value).
    keks: BTreeMap<(u8, u8), KeyRef>,
}

impl Transition {
    fn of(flat: &dyn KeyGraph, switch: TreeSwitch) -> Self {
        let Scheme::Flat { id_bits, .. } = flat.config().scheme else { panic!("a flat table") };
        let mut keks = BTreeMap::new();
        for m in (0..1u64 << 20).map(MemberId).filter(|&m| flat.contains(m)) {
            for (r, _) in flat.member_keys(m).unwrap().1 {
                if (1..=2 * u32::from(id_bits)).contains(&r.id.0) {
                    keks.insert((((r.id.0 - 1) / 2) as u8, ((r.id.0 - 1) % 2) as u8), r);
                }
            }
        }
        Transition { switch, tek: flat.group_key().0, keks }
    }

    /// Every node key of the switch's tree derivable from the flat keys in `ring`.
    fn derivable_nodes(&self, ring: &KeyRing) -> Vec<(KeyRef, Key)> {
        let bits = u32::from(self.switch.id_bits);
        let Some(tek) = ring.get(self.tek) else { return Vec::new() };
        let mut out = Vec::new();
        for height in 1..=bits {
            for position in 0..1u32 << (bits - height) {
                let keks: Option<Vec<(KeyRef, Key)>> = (height..bits)
                    .map(|bit| {
                        let r = *self.keks.get(&(bit as u8, ((position >> (bit - height)) & 1) as u8))?;
                        Some((r, ring.get(r)?))
                    })
                    .collect();
                if let Some(keks) = keks {
                    let keks: Vec<(KeyRef, &Key)> = keks.iter().map(|(r, k)| (*r, k)).collect();
                    let key = tree_node_key(self.switch, height, position, (self.tek, &tek), &keks);
                    out.push((KeyRef::new(tree_id(height, position), self.switch.version, 0), key));
                }
            }
        }
        out
    }
}

/// Keys made by `plans` (new versions, revisions and the group keys).
fn made_by(plans: &[RekeyPlan]) -> Vec<KeyRef> {
    plans.iter().flat_map(|p| p.replaced.iter().chain(&p.revised).chain([&p.group_key]).copied()).collect()
}

fn flat_config(id_bits: u8, policy: JoinPolicy) -> GraphConfig {
    GraphConfig { scheme: Scheme::Flat { id_bits, ids: FlatIds::Sequential }, join_policy: policy }
}

/// Moves `group` from its flat table to the derived tree: the members derive their paths
/// themselves (no message), and must then hold exactly the controller's tree keys.
fn switch_to_tree(group: &mut Group) -> Transition {
    let moved = tree_from_flat(&*group.graph).expect("a tree");
    let transition = Transition::of(&*group.graph, moved.switch);
    for (member, state) in group.members.iter_mut() {
        *state = member_tree_keys(moved.switch, state).unwrap_or_else(|e| panic!("member {member:?}: {e}"));
    }
    group.graph = moved.graph;
    group.assert_members_hold_their_keys();
    transition
}

#[derive(Clone, Debug)]
enum Change {
    Join(usize),
    Leave(usize),
}

fn changes() -> impl proptest::strategy::Strategy<Value = Vec<Change>> {
    prop::collection::vec(prop_oneof![(1usize..4).prop_map(Change::Join), (0usize..64).prop_map(Change::Leave)], 0..8)
}

/// Applies `change` (a leave picks a member by index) and returns the plan and the removed.
fn run_change(group: &mut Group, change: &Change) -> Option<(RekeyPlan, Vec<MemberKeys>)> {
    match *change {
        Change::Join(count) => {
            let room = group.graph.max_members().saturating_sub(group.members.len() as u64);
            let joins = group.fresh(count.min(room as usize));
            Some(group.apply(Batch { joins, leaves: Vec::new() }))
        }
        Change::Leave(pick) => {
            let members = group.member_ids();
            let leaver = *members.get(pick % members.len().max(1))?;
            Some(group.leave(&[leaver]))
        }
    }
}

/// A flat group after `before` (as single leaves and joins), switched to the tree, then
/// `after`: every member derives exactly its tree path; no one departed before the switch
/// (the cohort of one flat batch) derives a tree key; no one departed after it (each alone,
/// and every joiner after the switch together) derives a key made after its departure.
fn flat_to_tree_case(id_bits: u8, policy: JoinPolicy, initial: usize, before: &[Change], after: &[Change], seed: u64) {
    let mut group = Group::new(flat_config(id_bits, policy), seed);
    group.join(initial);
    let mut flat_cohorts: Vec<KeyRing> = Vec::new();
    for change in before {
        if let Some((_, removed)) = run_change(&mut group, change) {
            let mut cohort = KeyRing::new();
            removed.iter().for_each(|state| cohort.extend(state.keyring()));
            flat_cohorts.push(cohort);
        }
    }
    let old_members: BTreeSet<MemberId> = group.members.keys().copied().collect();
    let transition = switch_to_tree(&mut group);
    let switch_history = group.history.len();

    let mut plans: Vec<RekeyPlan> = Vec::new();
    let mut departed: Vec<(usize, MemberId, KeyRing)> = Vec::new();
    for change in after {
        if let Some((plan, removed)) = run_change(&mut group, change) {
            for (m, state) in plan.departed.iter().zip(removed) {
                departed.push((plans.len(), *m, state.keyring().clone()));
            }
            plans.push(plan);
        }
    }
    for ring in &mut flat_cohorts {
        coalition_reads(ring, Some(&transition), &group.history);
        let tree_keys: Vec<KeyRef> = ring.refs().filter(|r| r.version >= transition.switch.version).collect();
        assert!(tree_keys.is_empty(), "a flat-phase cohort derives tree keys {tree_keys:?}");
    }
    // Tree keys resist any coalition of members that joined after the switch: those departed
    // by a step, pooling everything, derive no key made from that step on.
    let mut newcomers = KeyRing::new();
    for (since, member, ring) in &departed {
        if old_members.contains(member) {
            continue;
        }
        newcomers.extend(ring);
        let mut pooled = newcomers.clone();
        coalition_reads(&mut pooled, None, &group.history[switch_history..]);
        for r in made_by(&plans[*since..]) {
            assert!(!pooled.holds(r), "joiners after the switch, departed by step {since}, derive {r}");
        }
    }
    for (since, member, mut ring) in departed {
        coalition_reads(&mut ring, Some(&transition), &group.history);
        for r in made_by(&plans[since..]) {
            assert!(!ring.holds(r), "member {member:?}, departed after the switch, derives {r}");
        }
    }
}

/// Cases per property: 1,024 in the test profile; `KEYCAST_TRANSITION_CASES` for a longer run.
fn cases() -> u32 {
    std::env::var("KEYCAST_TRANSITION_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1024)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn flat_to_tree_members_derive_exactly_the_controllers_tree_and_departed_ones_nothing_later(
        id_bits in 2u8..=7,
        revision in any::<bool>(),
        initial in 1usize..40,
        before in changes(),
        after in changes(),
        seed: u64,
    ) {
        let policy = if revision { JoinPolicy::Revision } else { JoinPolicy::NewVersion };
        let initial = initial.min((1usize << id_bits) - 1);
        flat_to_tree_case(id_bits, policy, initial, &before, &after, seed);
    }
}

/// Footnote 1 of figure 6, "no security gain for old participants: colluding old participants
/// still cannot be expelled, participants joining after the transition can". Old members 5
/// (0101) and 10 (1010) of a 4-bit table hold between them both KEKs of every bit, so they
/// derive every node key of the derived tree, including nodes of prefixes neither holds; a
/// rekey replaces only the leavers' paths and wraps under the untouched siblings, so after
/// both are removed they still read the group key, and after another leave too. Each alone
/// reads nothing. Two members that joined after the switch, removed the same way, read
/// nothing; and moving back to a fresh flat table (the large message) shuts the pair out.
#[test]
fn colluding_old_members_cannot_be_expelled_from_the_derived_tree_but_later_joiners_can() {
    let mut group = Group::new(flat_config(4, JoinPolicy::NewVersion), 7);
    group.join(12);
    let (a, b) = (MemberId(5), MemberId(10));
    assert_eq!(group.members[&a].position(), keycast_core::Position::Flat { id: 0b0101, id_bits: 4 });
    assert_eq!(group.members[&b].position(), keycast_core::Position::Flat { id: 0b1010, id_bits: 4 });
    let (mut ring_a, mut ring_b) = (group.members[&a].keyring().clone(), group.members[&b].keyring().clone());
    let transition = switch_to_tree(&mut group);
    ring_a.extend(group.members[&a].keyring());
    ring_b.extend(group.members[&b].keyring());
    let mut pair = ring_a.clone();
    pair.extend(&ring_b);

    // Alone, each derives exactly its own path; together, every node of the tree, such as
    // (height 2, prefix 00), which no member of the pair sits under.
    assert_eq!(transition.derivable_nodes(&ring_a).len(), 4);
    let pooled = transition.derivable_nodes(&pair);
    assert_eq!(pooled.len(), 8 + 4 + 2 + 1);
    let (_, path_of_member_0) = group.graph.member_keys(MemberId(0)).unwrap();
    let node = path_of_member_0.iter().find(|(r, _)| r.id == tree_id(2, 0b00)).unwrap();
    assert!(pooled.iter().any(|(r, k)| r == &node.0 && k == &node.1), "the pair derives the controller's key of node (2, 00)");
    assert!(!transition.derivable_nodes(&ring_a).iter().chain(&transition.derivable_nodes(&ring_b)).any(|(r, _)| r.id == tree_id(2, 0b00)));

    // Both removed in one batch, then another old member: the pair reads both group keys.
    let start = group.history.len();
    let (both_out, _) = group.leave(&[a, b]);
    let (next_out, _) = group.leave(&[MemberId(0)]);
    coalition_reads(&mut pair, Some(&transition), &group.history[start..]);
    assert!(pair.holds(both_out.group_key) && pair.holds(next_out.group_key), "footnote 1: colluding old members are not expelled");
    for mut alone in [ring_a, ring_b] {
        coalition_reads(&mut alone, Some(&transition), &group.history);
        assert!(!alone.holds(both_out.group_key) && !alone.holds(next_out.group_key), "one old member alone is expelled");
    }

    // Two members that join after the switch, removed together, read nothing later.
    let newcomers = group.join(2);
    let mut joined = KeyRing::new();
    newcomers.iter().for_each(|m| joined.extend(group.members[m].keyring()));
    let start = group.history.len();
    let (out, _) = group.leave(&newcomers);
    let (after, _) = group.leave(&[MemberId(1)]);
    coalition_reads(&mut joined, None, &group.history[start..]);
    for r in made_by(&[out, after]) {
        assert!(!joined.holds(r), "members that joined after the switch derive {r}");
    }

    // The large message back to a fresh flat table shuts the old pair out as well.
    let start = group.history.len();
    let table_version = switch_to_flat(&mut group, 4);
    let (flat_leave, _) = group.leave(&[MemberId(2)]);
    coalition_reads(&mut pair, Some(&transition), &group.history[start..]);
    let flat_keys: Vec<KeyRef> = pair.refs().filter(|r| r.version >= table_version).collect();
    assert!(flat_keys.is_empty() && !pair.holds(flat_leave.group_key), "the pair derives {flat_keys:?} of the fresh table");
}

/// Moves `group` from its tree to a fresh flat table of `id_bits` (sequential IDs) with the
/// large message, which the eavesdropper records; every member opens its notice and must then
/// hold exactly the controller's flat keys. Returns the table's key version.
fn switch_to_flat(group: &mut Group, id_bits: u8) -> u32 {
    group.seed = group.seed.next();
    let moved = flat_from_tree(&*group.graph, id_bits, FlatIds::Sequential, &group.seed).expect("a flat table");
    let members = group.members.len();
    assert_eq!(moved.notices.len(), members);
    assert_eq!(moved.wraps(), members * (1 + id_bits as usize), "N (I + 1) wraps");
    for notice in &moved.notices {
        let state = group.members.get_mut(&notice.member).expect("a member");
        *state = member_flat_keys(notice, state).unwrap_or_else(|e| panic!("member {:?}: {e}", notice.member));
        group.history.extend(notice.wraps.iter().cloned());
    }
    group.graph = moved.graph;
    group.assert_members_hold_their_keys();
    group.graph.group_key().0.version
}

/// A tree group after `before`, moved to a flat table with the large message, then `after`:
/// every member holds exactly its flat shares; the tree's keys above the leaves derive nothing
/// of the table (perfect forward secrecy: it is not made from them); every member departed before the switch,
/// together, derives no key of the table; each departed after it derives no later key.
fn tree_to_flat_case(degree: u32, policy: JoinPolicy, initial: usize, before: &[Change], extra_bits: u8, after: &[Change], seed: u64) {
    let mut group = Group::new(GraphConfig { scheme: Scheme::Tree { degree }, join_policy: policy }, seed);
    group.join(initial);
    let mut departed_before = KeyRing::new();
    for change in before {
        if let Some((_, removed)) = run_change(&mut group, change) {
            removed.iter().for_each(|state| departed_before.extend(state.keyring()));
        }
    }
    // Every key of the tree above the leaves at the switch: nothing of the new table may
    // follow from them (nothing is derived from a tree key; only individual keys open it).
    let mut tree_keys = KeyRing::new();
    for m in group.member_ids() {
        group.graph.member_keys(m).unwrap().1.into_iter().skip(1).for_each(|(r, k)| tree_keys.insert(r, k));
    }
    let needed = (usize::BITS - group.members.len().saturating_sub(1).leading_zeros()) as u8;
    let version = switch_to_flat(&mut group, needed.max(1) + extra_bits);
    tree_keys.absorb(&group.history).expect("authentic wraps");
    let derived: Vec<KeyRef> = tree_keys.refs().filter(|r| r.version >= version).collect();
    assert!(derived.is_empty(), "the tree's keys above the leaves derive {derived:?} of the table");
    let tree_values: Vec<Key> = tree_keys.refs().filter_map(|r| tree_keys.get(r)).collect();
    for m in group.member_ids() {
        for (r, key) in group.graph.member_keys(m).unwrap().1.into_iter().skip(1) {
            assert!(!tree_values.contains(&key), "{r} of the table is a tree key");
        }
    }
    let mut plans = Vec::new();
    let mut departed = Vec::new();
    for change in after {
        if let Some((plan, removed)) = run_change(&mut group, change) {
            departed.extend(removed.into_iter().map(|state| (plans.len(), state.keyring().clone())));
            plans.push(plan);
        }
    }
    departed_before.absorb(&group.history).expect("authentic wraps");
    let table_keys: Vec<KeyRef> = departed_before.refs().filter(|r| r.version >= version).collect();
    assert!(table_keys.is_empty(), "members departed from the tree derive {table_keys:?} of the table");
    for (since, mut ring) in departed {
        ring.absorb(&group.history).expect("authentic wraps");
        for r in made_by(&plans[since..]) {
            assert!(!ring.holds(r), "a member departed from the flat table derives {r}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn tree_to_flat_members_hold_exactly_their_shares_and_departed_ones_nothing(
        degree in 2u32..=4,
        revision in any::<bool>(),
        initial in 1usize..40,
        before in changes(),
        extra_bits in 0u8..3,
        after in changes(),
        seed: u64,
    ) {
        let policy = if revision { JoinPolicy::Revision } else { JoinPolicy::NewVersion };
        tree_to_flat_case(degree, policy, initial, &before, extra_bits, &after, seed);
    }
}

/// The transitions' costs (print with `-- --nocapture`): flat to tree sends no message; a
/// leave then costs a tree leave; tree to flat sends N (I + 1) wraps (73 bytes each, no
/// packet header) and a leave then costs a flat leave, 2 I wraps.
#[test]
fn transition_message_counts() {
    let wrap_bytes = |plan: &RekeyPlan| plan.wraps.iter().map(Wrap::encoded_len).sum::<usize>();
    println!("| I | members | flat leave: wraps, bytes | flat to tree: messages | tree leave after: wraps, bytes | tree to flat: wraps, bytes |");
    for (id_bits, members) in [(8u8, 16usize), (12, 32), (16, 64), (16, 8)] {
        let mut group = Group::new(flat_config(id_bits, JoinPolicy::Revision), u64::from(id_bits) * 1000 + members as u64);
        group.join(members + 1);
        let (flat_leave, _) = group.leave(&[MemberId(members as u64 / 2)]);
        assert_eq!(flat_leave.wraps.len(), 2 * id_bits as usize);
        let messages_before = group.history.len();
        switch_to_tree(&mut group);
        assert_eq!(group.history.len(), messages_before, "flat to tree sends nothing");
        let (tree_leave, _) = group.leave(&[MemberId(members as u64 / 3)]);
        group.seed = group.seed.next();
        let moved = flat_from_tree(&*group.graph, id_bits, FlatIds::Sequential, &group.seed).unwrap();
        assert_eq!(moved.wraps(), (members - 1) * (id_bits as usize + 1));
        println!(
            "| {id_bits} | {members} | {}, {} | 0 | {}, {} | {}, {} |",
            flat_leave.wraps.len(),
            wrap_bytes(&flat_leave),
            tree_leave.wraps.len(),
            wrap_bytes(&tree_leave),
            moved.wraps(),
            moved.wrap_bytes()
        );
    }
}
