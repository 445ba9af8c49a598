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
    validate_batch, BatchCounter, Batch, GraphConfig, GraphError, GraphStats, JoinPolicy, KeyGraph, MemberId,
    Position, RekeyPlan, Scheme, Welcome,
};
use crate::key::{Key, KeyId, KeyRef};
use crate::keygen::{BatchSeed, KeyGen};
use crate::wrap::{next_revision, Wrap, Wrapper};

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

pub fn tree_key_id(height: u32, position: u32) -> KeyId {
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
    /// Members in this subtree.
    members: u32,
}

impl Node {
    fn empty() -> Self {
        Node { key: Key::empty(), version: 0, revision: 0, members: 0 }
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

/// What a changed node becomes, computed in parallel and applied afterwards.
struct NodeUpdate {
    position: u32,
    key: Key,
    version: u32,
    revision: u32,
}

#[derive(Default)]
struct LevelOutput {
    updates: Vec<NodeUpdate>,
    wraps: Vec<Wrap>,
    replaced: Vec<KeyRef>,
    revised: Vec<KeyRef>,
}

pub struct Tree {
    degree: u32,
    star: bool,
    policy: JoinPolicy,
    levels: Vec<Vec<Node>>,
    leaf_member: Vec<Option<MemberId>>,
    /// Member ids are assigned by the controller, never chosen by a peer: a fast unkeyed hash is safe.
    leaf_of: FxHashMap<MemberId, u32>,
    free_leaves: BinaryHeap<Reverse<u32>>,
    batches: BatchCounter,
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
        let root = Node { key: KeyGen::new(seed, super::CREATION_STREAM).next_key(), version: 1, revision: 0, members: 0 };
        Tree {
            degree,
            star,
            policy,
            levels: vec![Vec::new(), vec![root]],
            leaf_member: Vec::new(),
            leaf_of: FxHashMap::default(),
            free_leaves: BinaryHeap::new(),
            batches: BatchCounter::new(),
        }
    }

    fn height(&self) -> u32 {
        (self.levels.len() - 1) as u32
    }

    fn capacity(&self) -> u64 {
        (self.degree as u64).checked_pow(self.height()).map_or(MAX_LEAVES, |c| c.min(MAX_LEAVES))
    }

    fn node_ref(&self, height: u32, position: u32) -> KeyRef {
        let node = &self.levels[height as usize][position as usize];
        KeyRef::new(tree_key_id(height, position), node.version, node.revision)
    }

    fn remove_leaf(&mut self, member: MemberId) -> u32 {
        let position = self.leaf_of.remove(&member).expect("validated member");
        self.leaf_member[position as usize] = None;
        let leaf = &mut self.levels[0][position as usize];
        leaf.members = 0;
        leaf.key.zeroize();
        self.free_leaves.push(Reverse(position));
        position
    }

    /// Takes the leftmost free leaf (keeping the tree compact and shallow), growing if full.
    fn take_leaf(&mut self) -> u32 {
        if let Some(Reverse(position)) = self.free_leaves.pop() {
            return position;
        }
        let position = self.levels[0].len() as u32;
        if position as u64 >= self.capacity() {
            // The old root becomes child 0 of a new root; no existing key is renumbered.
            let members = self.levels.last().expect("root")[0].members;
            self.levels.push(vec![Node { members, ..Node::empty() }]);
        }
        for height in 0..self.levels.len() {
            let at = ancestor(position, self.degree, height as u32) as usize;
            while self.levels[height].len() <= at {
                self.levels[height].push(Node::empty());
            }
        }
        self.leaf_member.push(None);
        position
    }

    fn add_leaf(&mut self, member: MemberId, version: u32, keys: &mut KeyGen) -> Welcome {
        let position = self.take_leaf();
        let leaf = &mut self.levels[0][position as usize];
        leaf.version = version;
        leaf.revision = 0;
        leaf.key = keys.next_key();
        leaf.members = 1;
        let individual = self.node_ref(0, position);
        let individual_key = self.levels[0][position as usize].key.clone();
        self.leaf_member[position as usize] = Some(member);
        self.leaf_of.insert(member, position);
        Welcome { member, position: Position::Tree { leaf: position, degree: self.degree }, individual, individual_key }
    }

    /// Drops roots whose only populated child is child 0 (never for a star). True if it did.
    fn shrink(&mut self) -> bool {
        let mut shrunk = false;
        while !self.star && self.levels.len() > 2 {
            let top = self.levels.len() - 1;
            if self.levels[top - 1][0].members != self.levels[top][0].members {
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
            self.leaf_member.truncate(capacity as usize);
            self.free_leaves.retain(|Reverse(p)| (*p as u64) < capacity);
        }
        shrunk
    }

    /// The touched nodes of the level above `below`, each with the range of its touched children.
    fn touched_parents(&self, below: &[Touch]) -> Vec<Touch> {
        let mut parents: Vec<Touch> = Vec::new();
        for (i, child) in below.iter().enumerate() {
            let position = child.position / self.degree;
            match parents.last_mut() {
                Some(last) if last.position == position => {
                    last.leaves += child.leaves;
                    last.joins += child.joins;
                    last.children.1 = i as u32 + 1;
                }
                _ => parents.push(Touch {
                    position,
                    leaves: child.leaves,
                    joins: child.joins,
                    children: (i as u32, i as u32 + 1),
                }),
            }
        }
        parents
    }

    /// New key and wraps for one touched node at `height` (its children are already rekeyed).
    #[allow(clippy::too_many_arguments)]
    fn rekey_node(&self, height: u32, version: u32, touch: &Touch, below: &[Touch], force: bool, keys: &mut KeyGen, out: &mut LevelOutput) {
        let node = &self.levels[height as usize][touch.position as usize];
        let members_before = node.members + touch.leaves - touch.joins;
        let had_key = node.version > 0 && members_before > 0;
        let old_ref = self.node_ref(height, touch.position);
        let join_only = touch.leaves == 0 && !force && had_key;

        let (new_ref, new_key) = if join_only && self.policy == JoinPolicy::Revision {
            let (r, k) = next_revision(&node.key, old_ref).expect("revision space");
            out.revised.push(r);
            (r, k)
        } else {
            let r = KeyRef::new(old_ref.id, version, 0);
            out.replaced.push(r);
            (r, keys.next_key())
        };

        let children = &self.levels[height as usize - 1];
        if join_only {
            if self.policy == JoinPolicy::NewVersion {
                out.wraps.push(Wrap::seal(&node.key, Wrapper::Key(old_ref), new_ref, &new_key));
            }
            // Only joiners need more: wrap under each changed child on their paths.
            for child in &below[touch.children.0 as usize..touch.children.1 as usize] {
                if children[child.position as usize].members > 0 {
                    self.wrap_under_child(height - 1, child.position, new_ref, &new_key, out);
                }
            }
        } else {
            let first = touch.position as u64 * self.degree as u64;
            let last = (first + self.degree as u64).min(children.len() as u64);
            for position in first as u32..last as u32 {
                if children[position as usize].members > 0 {
                    self.wrap_under_child(height - 1, position, new_ref, &new_key, out);
                }
            }
        }
        out.updates.push(NodeUpdate {
            position: touch.position,
            key: new_key,
            version: new_ref.version,
            revision: new_ref.revision,
        });
    }

    fn wrap_under_child(&self, height: u32, position: u32, key_ref: KeyRef, key: &Key, out: &mut LevelOutput) {
        let child = &self.levels[height as usize][position as usize];
        out.wraps.push(Wrap::seal(&child.key, Wrapper::Key(self.node_ref(height, position)), key_ref, key));
    }

    /// Rekeys every touched node of one level into `out`, on all cores when the level is large.
    #[allow(clippy::too_many_arguments)]
    fn rekey_level(
        &self,
        height: u32,
        version: u32,
        touched: &[Touch],
        below: &[Touch],
        force_root: bool,
        seed: &BatchSeed,
        keys: &mut KeyGen,
        out: &mut LevelOutput,
    ) {
        if touched.len() < PARALLEL_THRESHOLD {
            for touch in touched {
                self.rekey_node(height, version, touch, below, force_root, keys, out);
            }
            return;
        }
        let parts: Vec<LevelOutput> = touched
            .par_chunks(CHUNK)
            .enumerate()
            .map(|(chunk, nodes)| {
                let mut keys = KeyGen::new(seed, ((height as u64) << 40) | (chunk as u64 + 1));
                let mut part = LevelOutput::default();
                for touch in nodes {
                    self.rekey_node(height, version, touch, below, force_root, &mut keys, &mut part);
                }
                part
            })
            .collect();
        for part in parts {
            out.updates.extend(part.updates);
            out.wraps.extend(part.wraps);
            out.replaced.extend(part.replaced);
            out.revised.extend(part.revised);
        }
    }

    fn apply_updates(&mut self, height: u32, updates: &mut Vec<NodeUpdate>) {
        for update in updates.drain(..) {
            let node = &mut self.levels[height as usize][update.position as usize];
            node.key = update.key;
            node.version = update.version;
            node.revision = update.revision;
        }
    }
}

impl KeyGraph for Tree {
    fn config(&self) -> GraphConfig {
        let scheme = if self.star { Scheme::Star } else { Scheme::Tree { degree: self.degree } };
        GraphConfig { scheme, join_policy: self.policy }
    }

    fn apply(&mut self, batch: &Batch, seed: &BatchSeed) -> Result<RekeyPlan, GraphError> {
        validate_batch(batch, |m| self.leaf_of.contains_key(&m))?;
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
        for &member in &batch.leaves {
            leaf_touches.push(Touch { position: self.remove_leaf(member), leaves: 1, ..Touch::default() });
        }
        let mut keys = KeyGen::new(seed, 0);
        let mut welcomes = Vec::with_capacity(batch.joins.len());
        for &member in &batch.joins {
            let welcome = self.add_leaf(member, version, &mut keys);
            if let Position::Tree { leaf, .. } = welcome.position {
                leaf_touches.push(Touch { position: leaf, joins: 1, ..Touch::default() });
            }
            welcomes.push(welcome);
        }
        leaf_touches.sort_unstable_by_key(|t| t.position);
        let mut touched = vec![merge_same_position(leaf_touches)];
        for level in 1..=self.height() as usize {
            let parents = self.touched_parents(&touched[level - 1]);
            for t in &parents {
                let node = &mut self.levels[level][t.position as usize];
                node.members = node.members + t.joins - t.leaves;
            }
            touched.push(parents);
        }
        let force_root = self.shrink();
        touched.truncate(self.levels.len());
        for (level, list) in touched.iter_mut().enumerate() {
            // Sorted by position, so this drops a suffix and keeps child ranges valid.
            let len = self.levels[level].len() as u32;
            list.retain(|t| t.position < len);
        }

        let mut plan = RekeyPlan { welcomes, departed: batch.leaves.clone(), ..RekeyPlan::default() };
        let mut out = LevelOutput::default();
        let height = self.height();
        for level in 1..=height {
            let list = &mut touched[level as usize];
            if level == height && force_root && list.is_empty() {
                list.push(Touch { position: 0, children: (0, 0), ..Touch::default() });
            }
            // Subtrees emptied by this batch keep no key.
            let mut live = Vec::with_capacity(list.len());
            for t in list.iter() {
                let node = &mut self.levels[level as usize][t.position as usize];
                if node.members == 0 && level < height {
                    node.key.zeroize();
                } else {
                    live.push(*t);
                }
            }
            let force = force_root && level == height;
            self.rekey_level(level, version, &live, &touched[level as usize - 1], force, seed, &mut keys, &mut out);
            self.apply_updates(level, &mut out.updates);
        }
        plan.wraps = out.wraps;
        plan.replaced = out.replaced;
        plan.revised = out.revised;
        plan.group_key = self.node_ref(height, 0);
        Ok(plan)
    }

    fn group_key(&self) -> (KeyRef, &Key) {
        let height = self.height();
        (self.node_ref(height, 0), &self.levels[height as usize][0].key)
    }

    fn contains(&self, member: MemberId) -> bool {
        self.leaf_of.contains_key(&member)
    }

    fn member_keys(&self, member: MemberId) -> Option<(Position, Vec<(KeyRef, Key)>)> {
        let &leaf = self.leaf_of.get(&member)?;
        let keys = (0..=self.height())
            .map(|height| {
                let position = ancestor(leaf, self.degree, height);
                (self.node_ref(height, position), self.levels[height as usize][position as usize].key.clone())
            })
            .collect();
        Some((Position::Tree { leaf, degree: self.degree }, keys))
    }

    fn stats(&self) -> GraphStats {
        let stored_keys = self.levels.iter().flatten().filter(|n| n.members > 0).count().max(1);
        GraphStats { members: self.leaf_of.len(), stored_keys, height: self.height() }
    }
}

/// Merges touches of one leaf (a leaver's slot taken by a joiner in the same batch).
fn merge_same_position(sorted: Vec<Touch>) -> Vec<Touch> {
    let mut merged: Vec<Touch> = Vec::with_capacity(sorted.len());
    for t in sorted {
        match merged.last_mut() {
            Some(last) if last.position == t.position => {
                last.leaves += t.leaves;
                last.joins += t.joins;
            }
            _ => merged.push(t),
        }
    }
    merged
}
