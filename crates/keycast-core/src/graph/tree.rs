//! Wong/Gouda/Lam key trees of any degree, and the star as a tree of height 1.
//!
//! Storage is array-indexed by level: `levels[0]` are the leaves (individual keys),
//! `levels[height]` holds the root (the group key). A node is named by (height above the
//! leaves, position in its level), so growing the tree by a new root or dropping an empty
//! one never renumbers a key: parent(h, p) = (h + 1, p / d).
//!
//! Batch rekeying follows the marking approach: every key above a leaver or joiner changes
//! once, and is wrapped once under each child that still has members. Joins alone can be
//! cheaper: under [`JoinPolicy::NewVersion`] the new key is wrapped under its own previous
//! version (Wong's join) plus each changed child; under [`JoinPolicy::Revision`] existing
//! members derive it and only joiners get wraps.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rustc_hash::FxHashMap;

use rayon::prelude::*;
use zeroize::Zeroize;

use super::{
    TreeRuns, validate_joins, BatchCounter, PARALLEL_LOOKUPS, Batch, GraphConfig, GraphError, GraphStats, JoinPolicy, KeyGraph, MemberId,
    Position, RekeyPlan, Scheme, Welcome,
};
use crate::key::{Key, KeyId, KeyRef, KEY_LEN};
use crate::wire::codec::{Reader, Writer};
use crate::wire::DecodeError;
use crate::keygen::{nonce_salt, BatchSeed, KeyGen};
use crate::wrap::{next_revision, NonceSalt, Wrap, Wrapper};

/// Bits of a key id that hold the position within a level; the rest hold the height.
const POSITION_BITS: u32 = 27;
/// Most members a tree or star can hold.
pub const MAX_LEAVES: u64 = 1 << POSITION_BITS;
/// A star is a tree whose root has room for every member as a direct child.
pub const STAR_DEGREE: u32 = 1 << POSITION_BITS;
/// Largest degree accepted for a tree.
pub const MAX_TREE_DEGREE: u32 = 1 << 16;

/// Levels with fewer changed nodes than this are rekeyed on the calling thread.
const PARALLEL_THRESHOLD: usize = 512;
const CHUNK: usize = 256;
/// Slots per task when a large batch updates a level on every core.
const SLOT_CHUNK: usize = 16 * 1024;

pub const fn tree_key_id(height: u32, position: u32) -> KeyId {
    KeyId((height << POSITION_BITS) | position)
}

/// (height, position) of a tree key id.
pub fn tree_key_position(id: KeyId) -> (u32, u32) {
    (id.0 >> POSITION_BITS, id.0 & ((1 << POSITION_BITS) - 1))
}

/// The position at `levels_up` above `position` in a tree of `degree`.
pub fn ancestor(position: u32, degree: u32, levels_up: u32) -> u32 {
    match (degree as u64).checked_pow(levels_up) {
        Some(div) => (position as u64 / div) as u32,
        None => 0,
    }
}

struct Node {
    key: Key,
    /// 0 while the slot has never held a key.
    version: u32,
    revision: u32,
}

impl Node {
    fn empty() -> Self {
        Node { key: Key::empty(), version: 0, revision: 0 }
    }
}

/// One level of the tree: its nodes, and apart from them their member counts, so that finding
/// which children of a changed node still have members reads 4 bytes a child, not 44 (at 2^20
/// members the counts of a level fit in cache; the nodes do not).
#[derive(Default)]
struct Level {
    nodes: Vec<Node>,
    /// Members in each node's subtree.
    members: Vec<u32>,
}

impl Level {
    fn single(node: Node, members: u32) -> Self {
        Level { nodes: vec![node], members: vec![members] }
    }

    fn len(&self) -> usize {
        self.nodes.len()
    }

    fn push_empty(&mut self) {
        self.nodes.push(Node::empty());
        self.members.push(0);
    }

    fn truncate(&mut self, len: usize) {
        self.nodes.truncate(len);
        self.members.truncate(len);
    }
}

/// A node touched by the batch, with the leavers and joiners below it.
#[derive(Clone, Copy, Default)]
struct Touch {
    position: u32,
    leaves: u32,
    joins: u32,
    /// Range of this node's touched children in the level below.
    children: (u32, u32),
}

/// Touched nodes of every level in one list: level h is `nodes[ranges[h].0..ranges[h].1]`.
struct TouchedLevels {
    nodes: Vec<Touch>,
    ranges: Vec<(usize, usize)>,
}

impl TouchedLevels {
    fn with_capacity(nodes: usize, levels: usize) -> Self {
        TouchedLevels { nodes: Vec::with_capacity(nodes), ranges: Vec::with_capacity(levels) }
    }

    /// Starts from the leaves' touches (sorted, one per leaf), with room for the levels above,
    /// which shrink geometrically.
    fn from_leaves(mut leaves: Vec<Touch>, levels: usize) -> Self {
        let count = leaves.len();
        leaves.reserve(count + levels);
        let mut ranges = Vec::with_capacity(levels + 1);
        ranges.push((0, count));
        TouchedLevels { nodes: leaves, ranges }
    }

    fn level(&self, h: usize) -> &[Touch] {
        &self.nodes[self.ranges[h].0..self.ranges[h].1]
    }
}

/// Builds a plan's [`TreeRuns`] level by level from the wrap jobs, beside the sealing.
#[derive(Default)]
struct RunsBuilder {
    runs: TreeRuns,
    /// The level below's runs as (position, run, revised), by position.
    below: Vec<(u32, u32, bool)>,
}

impl RunsBuilder {
    /// Records one level's jobs, sealed from wrap `first_wrap` on. Jobs are grouped by node
    /// and their children ascend, so each lookup in the level below moves forward only.
    fn level(&mut self, first_wrap: usize, plans: &[NodePlan], jobs: &[WrapJob]) {
        let mut level = Vec::with_capacity(plans.len());
        let mut next = 0;
        self.runs.below.reserve(jobs.len());
        for (j, &(node, under)) in jobs.iter().enumerate() {
            if j == 0 || jobs[j - 1].0 != node {
                let plan = &plans[node as usize];
                level.push((plan.position, self.runs.starts.len() as u32, plan.new_ref.revision > 0));
                self.runs.starts.push((first_wrap + j) as u32);
            }
            let mut link = (u32::MAX, true);
            if under != OWN_PREVIOUS {
                while next < self.below.len() && self.below[next].0 < under {
                    next += 1;
                }
                if let Some(&(_, run, revised)) = self.below.get(next).filter(|b| b.0 == under) {
                    link = (run, revised);
                }
            }
            self.runs.below.push(link);
        }
        self.below = level;
    }

    fn finish(mut self, wraps: usize) -> TreeRuns {
        self.runs.starts.push(wraps as u32);
        self.runs
    }
}

/// What a changed node becomes, decided (and its new key drawn) before any wrap is sealed.
struct NodePlan {
    position: u32,
    new_ref: KeyRef,
    key: Key,
    /// Only joiners below it: existing members keep its key (or derive its revision).
    join_only: bool,
}

/// Calls `f(slot, item)` for each of `items`, whose slot positions ascend. Long lists run on
/// every core: each task takes one fixed chunk of `slots` and the items that fall in it.
fn update_sorted<T: Send, I: Sync>(
    slots: &mut [T],
    items: &[I],
    position: impl Fn(&I) -> usize + Sync,
    f: impl Fn(&mut T, &I) + Sync,
) {
    if items.len() < PARALLEL_THRESHOLD {
        for item in items {
            f(&mut slots[position(item)], item);
        }
        return;
    }
    debug_assert!(items.windows(2).all(|pair| position(&pair[0]) < position(&pair[1])), "positions ascend");
    slots.par_chunks_mut(SLOT_CHUNK).enumerate().for_each(|(c, chunk)| {
        let first = c * SLOT_CHUNK;
        let start = items.partition_point(|i| position(i) < first);
        let end = start + items[start..].partition_point(|i| position(i) < first + SLOT_CHUNK);
        for item in &items[start..end] {
            f(&mut chunk[position(item) - first], item);
        }
    });
}

/// The wrap of a node's new key under its own previous version (Wong's join).
const OWN_PREVIOUS: u32 = u32::MAX;

/// One wrap to seal at a level: (index of the node's plan, child position or OWN_PREVIOUS).
type WrapJob = (u32, u32);

pub struct Tree {
    degree: u32,
    star: bool,
    policy: JoinPolicy,
    levels: Vec<Level>,
    /// Member ids are assigned by the controller, never chosen by a peer: a fast unkeyed hash is safe.
    leaf_of: FxHashMap<MemberId, u32>,
    free_leaves: BinaryHeap<Reverse<u32>>,
    batches: BatchCounter,
    /// ORed into every key id: 0 for a group of its own, a subtree's prefix inside a merged
    /// group ([`super::merge`]), so the two subtrees' ids never collide.
    id_prefix: u32,
}

impl Tree {
    pub fn new(degree: u32, policy: JoinPolicy, seed: &BatchSeed) -> Result<Self, GraphError> {
        if !(2..=MAX_TREE_DEGREE).contains(&degree) {
            return Err(GraphError::Config("tree degree must be between 2 and 65536"));
        }
        Ok(Self::build(degree, false, policy, seed))
    }

    pub fn star(policy: JoinPolicy, seed: &BatchSeed) -> Self {
        Self::build(STAR_DEGREE, true, policy, seed)
    }

    fn build(degree: u32, star: bool, policy: JoinPolicy, seed: &BatchSeed) -> Self {
        let root = Node { key: KeyGen::new(seed, super::CREATION_STREAM).next_key(), version: 1, revision: 0 };
        Tree {
            degree,
            star,
            policy,
            levels: vec![Level::default(), Level::single(root, 0)],
            leaf_of: FxHashMap::default(),
            free_leaves: BinaryHeap::new(),
            batches: BatchCounter::new(),
            id_prefix: 0,
        }
    }

    fn height(&self) -> u32 {
        (self.levels.len() - 1) as u32
    }

    fn capacity(&self) -> u64 {
        (self.degree as u64).checked_pow(self.height()).map_or(MAX_LEAVES, |c| c.min(MAX_LEAVES))
    }

    fn node_ref(&self, height: u32, position: u32) -> KeyRef {
        let node = &self.levels[height as usize].nodes[position as usize];
        KeyRef::new(KeyId(tree_key_id(height, position).0 | self.id_prefix), node.version, node.revision)
    }

    /// The leaves of `leavers`, in order, or an error naming one that is not a member. Large
    /// batches look them up on every core (each lookup is a cache miss).
    fn leaves_of(&self, leavers: &[MemberId]) -> Result<Vec<u32>, GraphError> {
        let position = |&m: &MemberId| self.leaf_of.get(&m).copied().ok_or(GraphError::NotMember(m));
        leavers.par_iter().with_min_len(PARALLEL_LOOKUPS).map(position).collect()
    }

    /// Empties the leaves at `positions` and returns them, sorted. (The member index forgets
    /// the leavers later, in [`Tree::with_index_updated`].)
    fn empty_leaves(&mut self, mut positions: Vec<u32>) -> Vec<u32> {
        positions.sort_unstable();
        let leaves = &mut self.levels[0];
        update_sorted(&mut leaves.nodes, &positions, |&p| p as usize, |node, _| node.key.zeroize());
        update_sorted(&mut leaves.members, &positions, |&p| p as usize, |members, _| *members = 0);
        self.free_leaves.extend(positions.iter().map(|&p| Reverse(p)));
        positions
    }

    /// Runs `rekey` while the member index forgets `leavers` and learns `joined` (member,
    /// leaf): for a large batch on another core, since each update is a cache miss and the
    /// rekey needs only the levels. A batch never has a member both leave and join.
    fn with_index_updated<R: Send>(&mut self, leavers: &[MemberId], joined: &[(MemberId, u32)], rekey: impl FnOnce(&mut Self) -> R + Send) -> R {
        let mut index = std::mem::take(&mut self.leaf_of);
        let update = |index: &mut FxHashMap<MemberId, u32>| {
            for member in leavers {
                index.remove(member);
            }
            index.extend(joined.iter().copied());
        };
        let out = if leavers.len() + joined.len() < PARALLEL_LOOKUPS {
            update(&mut index);
            rekey(self)
        } else {
            rayon::join(|| rekey(self), || update(&mut index)).0
        };
        self.leaf_of = index;
        out
    }

    /// Takes the leftmost free leaf (keeping the tree compact and shallow), growing if full.
    fn take_leaf(&mut self) -> u32 {
        if let Some(Reverse(position)) = self.free_leaves.pop() {
            return position;
        }
        let position = self.levels[0].len() as u32;
        if position as u64 >= self.capacity() {
            // The old root becomes child 0 of a new root; no existing key is renumbered.
            let members = self.levels.last().expect("root").members[0];
            self.levels.push(Level::single(Node::empty(), members));
        }
        for height in 0..self.levels.len() {
            let at = ancestor(position, self.degree, height as u32) as usize;
            while self.levels[height].len() <= at {
                self.levels[height].push_empty();
            }
        }
        position
    }

    fn add_leaf(&mut self, member: MemberId, version: u32, keys: &mut KeyGen) -> Welcome {
        let position = self.take_leaf();
        let leaf = &mut self.levels[0].nodes[position as usize];
        leaf.version = version;
        leaf.revision = 0;
        leaf.key = keys.next_key();
        let individual_key = leaf.key.clone();
        self.levels[0].members[position as usize] = 1;
        let individual = self.node_ref(0, position);
        Welcome { member, position: Position::Tree { leaf: position, degree: self.degree }, individual, individual_key }
    }

    /// Drops roots whose only populated child is child 0 (never for a star). True if it did.
    fn shrink(&mut self) -> bool {
        let mut shrunk = false;
        while !self.star && self.levels.len() > 2 {
            let top = self.levels.len() - 1;
            if self.levels[top - 1].members[0] != self.levels[top].members[0] {
                break;
            }
            self.levels.pop();
            shrunk = true;
        }
        if shrunk {
            let capacity = self.capacity();
            for (height, level) in self.levels.iter_mut().enumerate() {
                let keep = (capacity / (self.degree as u64).pow(height as u32)).max(1) as usize;
                level.truncate(keep);
            }
            self.free_leaves.retain(|Reverse(p)| (*p as u64) < capacity);
        }
        shrunk
    }

    /// Appends the touched nodes of the level above `below` (a range of `nodes`), each with
    /// the range of its touched children relative to `below`'s start.
    fn push_touched_parents(&self, nodes: &mut Vec<Touch>, below: (usize, usize)) {
        let first = nodes.len();
        for i in below.0..below.1 {
            let child = nodes[i];
            let position = child.position / self.degree;
            let index = (i - below.0) as u32;
            if nodes.len() > first && nodes[nodes.len() - 1].position == position {
                let last = nodes.last_mut().expect("a parent");
                last.leaves += child.leaves;
                last.joins += child.joins;
                last.children.1 = index + 1;
            } else {
                nodes.push(Touch { position, leaves: child.leaves, joins: child.joins, children: (index, index + 1) });
            }
        }
    }

    /// Decides what one touched node at `height` becomes and draws its new key.
    fn plan_node(&self, height: u32, version: u32, touch: &Touch, force: bool, keys: &mut KeyGen) -> NodePlan {
        let level = &self.levels[height as usize];
        let node = &level.nodes[touch.position as usize];
        let members_before = level.members[touch.position as usize] + touch.leaves - touch.joins;
        let had_key = node.version > 0 && members_before > 0;
        let old_ref = self.node_ref(height, touch.position);
        let join_only = touch.leaves == 0 && !force && had_key;
        let (new_ref, key) = if join_only && self.policy == JoinPolicy::Revision {
            next_revision(&node.key, old_ref).expect("revision space")
        } else {
            (KeyRef::new(old_ref.id, version, 0), keys.next_key())
        };
        NodePlan { position: touch.position, new_ref, key, join_only }
    }

    /// The wraps node `index` (planned as `plan`) needs: under each child that still has
    /// members, or after joins alone only under the joiners' changed children (and, for a
    /// new version, under its own previous version).
    fn wrap_jobs(&self, height: u32, index: u32, touch: &Touch, plan: &NodePlan, below: &[Touch], jobs: &mut Vec<WrapJob>) {
        let children = &self.levels[height as usize - 1].members;
        if plan.join_only {
            if self.policy == JoinPolicy::NewVersion {
                jobs.push((index, OWN_PREVIOUS));
            }
            let changed = &below[touch.children.0 as usize..touch.children.1 as usize];
            jobs.extend(changed.iter().filter(|c| children[c.position as usize] > 0).map(|c| (index, c.position)));
        } else {
            let first = touch.position as u64 * self.degree as u64;
            let last = (first + self.degree as u64).min(children.len() as u64);
            jobs.extend((first as u32..last as u32).filter(|&p| children[p as usize] > 0).map(|p| (index, p)));
        }
    }

    fn seal(&self, height: u32, plan: &NodePlan, under: u32, salt: &NonceSalt) -> Wrap {
        let (height, position) = if under == OWN_PREVIOUS { (height, plan.position) } else { (height - 1, under) };
        let wrapping = &self.levels[height as usize].nodes[position as usize];
        Wrap::seal(&wrapping.key, Wrapper::Key(self.node_ref(height, position)), plan.new_ref, &plan.key, salt)
    }

    /// Plans every live touched node of one level and appends its wraps to `wraps`, on all
    /// cores when the level is large. Keys come from `keys` for small levels and from one
    /// stream per chunk of nodes otherwise, so a batch's keys depend only on its seed.
    #[allow(clippy::too_many_arguments)]
    fn rekey_level(
        &self,
        height: u32,
        version: u32,
        live: &[Touch],
        below: &[Touch],
        force: bool,
        seed: &BatchSeed,
        keys: &mut KeyGen,
        (wraps, wraps_salt, runs): (&mut Vec<Wrap>, NonceSalt, &mut RunsBuilder),
        (plans, jobs): &mut (Vec<NodePlan>, Vec<WrapJob>),
    ) {
        let plan_nodes = |nodes: &[Touch], first: usize, keys: &mut KeyGen, plans: &mut Vec<NodePlan>, jobs: &mut Vec<WrapJob>| {
            for (i, touch) in nodes.iter().enumerate() {
                let plan = self.plan_node(height, version, touch, force, keys);
                self.wrap_jobs(height, (first + i) as u32, touch, &plan, below, jobs);
                plans.push(plan);
            }
        };
        plans.clear();
        jobs.clear();
        if live.len() < PARALLEL_THRESHOLD {
            plan_nodes(live, 0, keys, plans, jobs);
        } else {
            let parts: Vec<(Vec<NodePlan>, Vec<WrapJob>)> = live
                .par_chunks(CHUNK)
                .enumerate()
                .map(|(chunk, nodes)| {
                    let mut keys = KeyGen::new(seed, ((height as u64) << 40) | (chunk as u64 + 1));
                    let mut part = (Vec::with_capacity(nodes.len()), Vec::with_capacity(nodes.len() * (self.degree.min(8) as usize + 1)));
                    plan_nodes(nodes, chunk * CHUNK, &mut keys, &mut part.0, &mut part.1);
                    part
                })
                .collect();
            for (p, j) in parts {
                plans.extend(p);
                jobs.extend(j);
            }
        }
        let plans = &*plans;
        let salt = &wraps_salt;
        let seal = |&(node, under): &WrapJob| self.seal(height, &plans[node as usize], under, salt);
        let first_wrap = wraps.len();
        // Sealed straight into the plan's list: no per-chunk lists to copy.
        if jobs.len() < PARALLEL_THRESHOLD {
            wraps.extend(jobs.iter().map(seal));
            runs.level(first_wrap, plans, jobs);
        } else {
            rayon::join(|| wraps.par_extend(jobs.par_iter().map(seal)), || runs.level(first_wrap, plans, jobs));
        }
    }

    /// Installs the new keys of one level and records their refs in `plan`.
    fn install(&mut self, height: u32, plans: &mut Vec<NodePlan>, plan: &mut RekeyPlan) {
        update_sorted(&mut self.levels[height as usize].nodes, plans, |update| update.position as usize, |node, update| {
            node.key = update.key.clone();
            node.version = update.new_ref.version;
            node.revision = update.new_ref.revision;
        });
        for update in plans.iter() {
            if update.new_ref.revision > 0 {
                plan.revised.push(update.new_ref);
            } else {
                plan.replaced.push(update.new_ref);
            }
        }
        // Dropping the plans zeroizes their copies of the keys.
        plans.clear();
    }

    /// Most wraps a batch can seal at each level: at most one per child with members, plus
    /// one per node for a join's own previous version.
    fn wrap_bound(&self, height: u32, live: usize) -> usize {
        let children = self.levels[height as usize - 1].len();
        (live * (self.degree as usize).saturating_add(1)).min(children + live)
    }
}

impl KeyGraph for Tree {
    fn config(&self) -> GraphConfig {
        let scheme = if self.star { Scheme::Star } else { Scheme::Tree { degree: self.degree } };
        GraphConfig { scheme, join_policy: self.policy }
    }

    fn apply(&mut self, batch: &Batch, seed: &BatchSeed) -> Result<RekeyPlan, GraphError> {
        self.apply_salted(batch, seed, nonce_salt(seed))
    }

    fn group_key(&self) -> (KeyRef, &Key) {
        let height = self.height();
        (self.node_ref(height, 0), &self.levels[height as usize].nodes[0].key)
    }

    fn contains(&self, member: MemberId) -> bool {
        self.leaf_of.contains_key(&member)
    }

    fn member_keys(&self, member: MemberId) -> Option<(Position, Vec<(KeyRef, Key)>)> {
        let &leaf = self.leaf_of.get(&member)?;
        let keys = (0..=self.height())
            .map(|height| {
                let position = ancestor(leaf, self.degree, height);
                (self.node_ref(height, position), self.levels[height as usize].nodes[position as usize].key.clone())
            })
            .collect();
        Some((Position::Tree { leaf, degree: self.degree }, keys))
    }

    fn individual_key(&self, member: MemberId) -> Option<Key> {
        let &leaf = self.leaf_of.get(&member)?;
        Some(self.levels[0].nodes[leaf as usize].key.clone())
    }

    fn export(&self) -> zeroize::Zeroizing<Vec<u8>> {
        let mut out = zeroize::Zeroizing::new(Vec::new());
        Tree::export(self, &mut out);
        out
    }

    fn max_members(&self) -> u64 {
        MAX_LEAVES
    }

    fn stats(&self) -> GraphStats {
        let stored_keys = self.levels.iter().flat_map(|level| &level.members).filter(|&&m| m > 0).count().max(1);
        GraphStats { members: self.leaf_of.len(), stored_keys, height: self.height() }
    }
}

/// A tree built around keys that already exist (Caronni et al.'s flat-to-tree transition,
/// [`super::transition`]).
impl Tree {
    /// A tree of `degree` and `height` whose leaves are `members` (member, leaf, individual
    /// key) and whose every node above a member, the root included, holds `node_key(height,
    /// position)`; every key gets version `version` and later batches versions above it. The
    /// other leaves are free. None if the leaves do not fit or a leaf or member is given twice.
    pub(crate) fn with_keys(
        degree: u32,
        policy: JoinPolicy,
        height: u32,
        version: u32,
        members: Vec<(MemberId, u32, Key)>,
        mut node_key: impl FnMut(u32, u32) -> Key,
    ) -> Option<Tree> {
        let slots = u64::from(degree).checked_pow(height).filter(|&s| (2..=MAX_TREE_DEGREE).contains(&degree) && height >= 1 && s <= MAX_LEAVES)?;
        let mut levels: Vec<Level> = (0..=height)
            .map(|h| {
                let len = (slots / u64::from(degree).pow(h)) as usize;
                Level { nodes: (0..len).map(|_| Node::empty()).collect(), members: vec![0; len] }
            })
            .collect();
        let mut leaf_of = FxHashMap::default();
        for (member, leaf, key) in members {
            if u64::from(leaf) >= slots || levels[0].members[leaf as usize] != 0 || leaf_of.insert(member, leaf).is_some() {
                return None;
            }
            for h in 0..=height {
                levels[h as usize].members[ancestor(leaf, degree, h) as usize] += 1;
            }
            levels[0].nodes[leaf as usize] = Node { key, version, revision: 0 };
        }
        for h in 1..=height {
            for p in 0..levels[h as usize].len() {
                if levels[h as usize].members[p] > 0 || h == height {
                    levels[h as usize].nodes[p] = Node { key: node_key(h, p as u32), version, revision: 0 };
                }
            }
        }
        let free_leaves = (0..slots as u32).filter(|&p| levels[0].members[p as usize] == 0).map(Reverse).collect();
        Some(Tree { degree, star: false, policy, levels, leaf_of, free_leaves, batches: BatchCounter(version), id_prefix: 0 })
    }
}

/// What a merged group ([`super::merge`]) needs of its two subtrees.
impl Tree {
    /// Names every key of this tree with `prefix` ORed into its id from now on.
    pub(crate) fn set_id_prefix(&mut self, prefix: u32) {
        self.id_prefix = prefix;
    }

    /// Leaf slots in use or free: the width the subtree's ids must fit in.
    pub(crate) fn leaf_slots(&self) -> u64 {
        self.levels[0].len() as u64
    }

    pub(crate) fn member_count(&self) -> usize {
        self.leaf_of.len()
    }

    pub(crate) fn members(&self) -> impl Iterator<Item = MemberId> + '_ {
        self.leaf_of.keys().copied()
    }

    /// Adds `offset` to every member id (`None` if one would overflow): two controllers number
    /// their members alike, so the absorbed group's ids move past the other's.
    pub(crate) fn offset_members(&mut self, offset: i128) -> Option<()> {
        let moved = |m: MemberId| u64::try_from(i128::from(m.0) + offset).ok().map(MemberId);
        let leaf_of = self.leaf_of.iter().map(|(&m, &leaf)| Some((moved(m)?, leaf))).collect::<Option<FxHashMap<_, _>>>()?;
        self.leaf_of = leaf_of;
        Some(())
    }

    pub(crate) fn degree(&self) -> u32 {
        self.degree
    }

    /// The version the last batch gave its keys.
    pub(crate) fn batch_count(&self) -> u32 {
        self.batches.0
    }

    /// Makes the next batch's version exceed `version` (a merged root took it).
    pub(crate) fn advance_batches_to(&mut self, version: u32) {
        self.batches.0 = self.batches.0.max(version);
    }

    /// A new version of the root, wrapped once under its previous version: the group key a
    /// subtree takes when it leaves a merged group (nobody outside it ever held its root).
    pub(crate) fn renew_root(&mut self, seed: &BatchSeed, salt: NonceSalt) -> Result<RekeyPlan, GraphError> {
        let version = self.batches.next_version()?;
        let height = self.height();
        let old_ref = self.node_ref(height, 0);
        let key = KeyGen::new(seed, 0).next_key();
        let new_ref = KeyRef::new(old_ref.id, version, 0);
        let root = &mut self.levels[height as usize].nodes[0];
        let wrap = Wrap::seal(&root.key, Wrapper::Key(old_ref), new_ref, &key, &salt);
        root.key = key;
        root.version = version;
        root.revision = 0;
        let wraps = if self.leaf_of.is_empty() { Vec::new() } else { vec![wrap] };
        Ok(RekeyPlan { group_key: new_ref, replaced: vec![new_ref], wraps, salt, ..RekeyPlan::default() })
    }

    /// [`KeyGraph::apply`] with the nonce salt given: a merged group seals both subtrees'
    /// wraps under one salt, the one its rekey packets carry.
    pub(crate) fn apply_salted(&mut self, batch: &Batch, seed: &BatchSeed, salt: NonceSalt) -> Result<RekeyPlan, GraphError> {
        validate_joins(batch, |m| self.leaf_of.contains_key(&m))?;
        let positions = self.leaves_of(&batch.leaves)?;
        let after = self.leaf_of.len() as u64 + batch.joins.len() as u64 - batch.leaves.len() as u64;
        let slots = self.levels[0].len() as u64 + batch.joins.len().saturating_sub(self.free_leaves.len() + batch.leaves.len()) as u64;
        if after > MAX_LEAVES || slots > MAX_LEAVES {
            return Err(GraphError::Full(MAX_LEAVES));
        }

        if batch.is_empty() {
            return Ok(RekeyPlan { group_key: self.group_key().0, ..RekeyPlan::default() });
        }
        let version = self.batches.next_version()?;

        // Leaves first; counts above the leaves are settled from the touched lists below.
        let mut leaf_touches = Vec::with_capacity(batch.joins.len() + batch.leaves.len());
        let removed = self.empty_leaves(positions);
        leaf_touches.extend(removed.into_iter().map(|position| Touch { position, leaves: 1, ..Touch::default() }));
        let mut keys = KeyGen::new(seed, 0);
        let mut welcomes = Vec::with_capacity(batch.joins.len());
        let mut joined = Vec::with_capacity(batch.joins.len());
        for &member in &batch.joins {
            let welcome = self.add_leaf(member, version, &mut keys);
            if let Position::Tree { leaf, .. } = welcome.position {
                leaf_touches.push(Touch { position: leaf, joins: 1, ..Touch::default() });
                joined.push((member, leaf));
            }
            welcomes.push(welcome);
        }
        leaf_touches.sort_unstable_by_key(|t| t.position);
        // A leaver's slot taken by a joiner in the same batch is one touch.
        leaf_touches.dedup_by(|later, kept| {
            let same = later.position == kept.position;
            if same {
                kept.leaves += later.leaves;
                kept.joins += later.joins;
            }
            same
        });
        // Every level's touched nodes in one list (they shrink geometrically going up).
        let mut touched = TouchedLevels::from_leaves(leaf_touches, self.levels.len());
        for level in 1..=self.height() as usize {
            let below = touched.ranges[level - 1];
            let first = touched.nodes.len();
            self.push_touched_parents(&mut touched.nodes, below);
            for t in &touched.nodes[first..] {
                let members = &mut self.levels[level].members[t.position as usize];
                *members = *members + t.joins - t.leaves;
            }
            touched.ranges.push((first, touched.nodes.len()));
        }
        let force_root = self.shrink();
        touched.ranges.truncate(self.levels.len());
        for level in 0..touched.ranges.len() {
            // Sorted by position, so this drops a suffix and keeps child ranges valid.
            let len = self.levels[level].len() as u32;
            let kept = touched.level(level).partition_point(|t| t.position < len);
            touched.ranges[level].1 = touched.ranges[level].0 + kept;
        }

        let mut plan = RekeyPlan { welcomes, departed: batch.leaves.clone(), salt, ..RekeyPlan::default() };
        let height = self.height();
        let mut live = TouchedLevels::with_capacity(touched.nodes.len() + 1, height as usize + 1);
        live.ranges.push((0, 0));
        for level in 1..=height {
            let first = live.nodes.len();
            for i in touched.ranges[level as usize].0..touched.ranges[level as usize].1 {
                let t = touched.nodes[i];
                let at = &mut self.levels[level as usize];
                // Subtrees emptied by this batch keep no key.
                if at.members[t.position as usize] == 0 && level < height {
                    at.nodes[t.position as usize].key.zeroize();
                } else {
                    live.nodes.push(t);
                }
            }
            if level == height && force_root && live.nodes.len() == first {
                live.nodes.push(Touch { position: 0, children: (0, 0), ..Touch::default() });
            }
            live.ranges.push((first, live.nodes.len()));
        }
        plan.wraps.reserve((1..=height).map(|level| self.wrap_bound(level, live.level(level as usize).len())).sum());
        plan.replaced.reserve(live.nodes.len());
        self.with_index_updated(&batch.leaves, &joined, |tree| {
            let mut scratch = (Vec::new(), Vec::new());
            let mut runs = RunsBuilder::default();
            for level in 1..=height {
                let force = force_root && level == height;
                let (nodes, below) = (live.level(level as usize), touched.level(level as usize - 1));
                tree.rekey_level(level, version, nodes, below, force, seed, &mut keys, (&mut plan.wraps, plan.salt, &mut runs), &mut scratch);
                tree.install(level, &mut scratch.0, &mut plan);
            }
            plan.group_key = tree.node_ref(height, 0);
            plan.tree_runs = Some(runs.finish(plan.wraps.len()));
        });
        Ok(plan)
    }
}

/// The tree's whole state, for the controller's snapshots: a restart reads it instead of
/// replaying every batch since the group began.
impl Tree {
    pub(crate) fn export(&self, out: &mut Vec<u8>) {
        // Sized up front: a growing buffer would leave copies of keys in freed memory.
        let nodes: usize = self.levels.iter().map(Level::len).sum();
        out.reserve_exact(14 + 4 * self.levels.len() + (KEY_LEN + 12) * nodes + 4 + 12 * self.leaf_of.len() + 4 + 4 * self.free_leaves.len());
        out.put_u32(self.degree);
        out.put_u8(u8::from(self.star));
        out.put_u8(join_policy_byte(self.policy));
        out.put_u32(self.batches.0);
        out.put_u32(self.levels.len() as u32);
        for level in &self.levels {
            out.put_u32(level.len() as u32);
            for (node, members) in level.nodes.iter().zip(&level.members) {
                out.extend_from_slice(node.key.as_bytes());
                out.put_u32(node.version);
                out.put_u32(node.revision);
                out.put_u32(*members);
            }
        }
        let mut leaves: Vec<(&MemberId, &u32)> = self.leaf_of.iter().collect();
        leaves.sort_unstable();
        out.put_u32(leaves.len() as u32);
        for (member, leaf) in leaves {
            out.put_u64(member.0);
            out.put_u32(*leaf);
        }
        let mut free: Vec<u32> = self.free_leaves.iter().map(|Reverse(p)| *p).collect();
        free.sort_unstable();
        out.put_u32(free.len() as u32);
        free.iter().for_each(|p| out.put_u32(*p));
    }

    pub(crate) fn import(r: &mut Reader<'_>) -> Result<Tree, DecodeError> {
        let degree = r.u32("tree degree")?;
        let star = r.flag("star")?;
        if !star && !(2..=MAX_TREE_DEGREE).contains(&degree) || star && degree != STAR_DEGREE {
            return Err(DecodeError::BadValue { field: "tree degree", value: degree.into() });
        }
        let policy = read_join_policy(r)?;
        let batches = BatchCounter(r.u32("batch counter")?);
        let height = r.count(4, 32, 4, "tree levels")?;
        let mut levels = Vec::with_capacity(height);
        for _ in 0..height {
            let len = r.count(4, MAX_LEAVES as usize, KEY_LEN + 12, "tree level")?;
            let mut level = Level { nodes: Vec::with_capacity(len), members: Vec::with_capacity(len) };
            for _ in 0..len {
                let key = r.key("tree key")?;
                let (version, revision) = (r.u32("key version")?, r.u32("key revision")?);
                level.nodes.push(Node { key, version, revision });
                level.members.push(r.u32("subtree members")?);
            }
            levels.push(level);
        }
        if levels.len() < 2 || levels.last().is_some_and(|root| root.len() != 1) {
            return Err(DecodeError::BadValue { field: "tree levels", value: levels.len() as u64 });
        }
        let count = r.count(4, MAX_LEAVES as usize, 12, "tree members")?;
        // Members and free leaves in ascending order, as `export` writes them: one encoding.
        let mut leaf_of = FxHashMap::default();
        let mut previous = None;
        for _ in 0..count {
            let member = r.member()?;
            let leaf = r.u32("leaf")?;
            if previous.is_some_and(|p| p >= member) || leaf as usize >= levels[0].len() {
                return Err(DecodeError::BadValue { field: "leaf", value: leaf.into() });
            }
            previous = Some(member);
            leaf_of.insert(member, leaf);
        }
        let free_leaves = super::read_ascending(r, "free leaves", MAX_LEAVES as usize, 4, |r| r.u32("free leaf"))?;
        let tree = Tree { degree, star, policy, levels, leaf_of, free_leaves, batches, id_prefix: 0 };
        tree.check_imported()?;
        Ok(tree)
    }

    /// A snapshot's tree must have the shape the tree itself keeps: every level as long as
    /// the leaves below it need, subtree counts that add up, free leaves that are empty, one leaf per member.
    /// Anything else would make later batches index out of bounds or assign a leaf twice.
    fn check_imported(&self) -> Result<(), DecodeError> {
        let bad = |field: &'static str, value: usize| Err(DecodeError::BadValue { field, value: value as u64 });
        let top = self.levels.len() - 1;
        for h in 0..top {
            let parents = self.levels[h].len().div_ceil(self.degree as usize);
            let expected = if h + 1 == top { 1 } else { parents };
            if self.levels[h + 1].len() != expected || parents > expected {
                return bad("tree level length", h + 1);
            }
        }
        let leaves = &self.levels[0];
        let mut assigned: Vec<u32> = self.leaf_of.values().copied().collect();
        assigned.sort_unstable();
        if assigned.windows(2).any(|w| w[0] == w[1]) {
            return bad("leaf", assigned.len());
        }
        let occupied = leaves.members.iter().filter(|&&m| m == 1).count();
        if leaves.members.iter().any(|&m| m > 1) || occupied != self.leaf_of.len() || self.leaf_of.values().any(|&leaf| leaves.members[leaf as usize] != 1) {
            return bad("tree leaf members", occupied);
        }
        for h in 1..=top {
            let mut sums = vec![0u64; self.levels[h].len()];
            for (child, &members) in self.levels[h - 1].members.iter().enumerate() {
                sums[child / self.degree as usize] += u64::from(members);
            }
            if sums.iter().zip(&self.levels[h].members).any(|(&sum, &members)| sum != u64::from(members)) {
                return bad("subtree members", h);
            }
        }
        if self.free_leaves.iter().any(|&Reverse(p)| p as usize >= leaves.len() || leaves.members[p as usize] != 0) {
            return bad("free leaves", self.free_leaves.len());
        }
        Ok(())
    }
}

pub(crate) fn join_policy_byte(policy: JoinPolicy) -> u8 {
    match policy {
        JoinPolicy::NewVersion => 0,
        JoinPolicy::Revision => 1,
    }
}

pub(crate) fn read_join_policy(r: &mut Reader<'_>) -> Result<JoinPolicy, DecodeError> {
    match r.u8("join policy")? {
        0 => Ok(JoinPolicy::NewVersion),
        1 => Ok(JoinPolicy::Revision),
        value => Err(DecodeError::BadValue { field: "join policy", value: value.into() }),
    }
}
