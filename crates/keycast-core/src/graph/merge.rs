//! Merging two tree groups under one controller, and splitting them again (Caronni,
//! Waldvogel, Sun and Plattner, "Efficient security for large and dynamic multicast groups",
//! 3.5).
//!
//! A merged group is a new root over the two trees: each side's old group key becomes a KEK
//! one level below the new root, and the merge costs one wrap on each side's channel (the new
//! root under that side's old root). Key ids stay unique by a subtree prefix: the left tree
//! (the absorbing group) keeps its ids, the right tree's ids get bit 26 set, and the new root
//! takes height 31, which no tree reaches. Both subtrees must therefore fit in 2^26 leaf
//! slots. A member of the right side learns its side from the merge notice and renames the
//! keys it holds ([`crate::MemberKeys::merge_into`]); nobody's position changes.
//!
//! Split is the inverse: each side takes a new version of its old root as its group key,
//! wrapped once under the previous version. Nobody outside a side ever held that side's root
//! (members of the other side held only the shared root above it), so this is enough after
//! a clean merge. Members that moved between sides are not tracked: splitting them off is a
//! leave of those members, batched before the split.

use super::tree::{tree_key_id, Tree};
use super::{validate_batch, Batch, GraphConfig, GraphError, GraphStats, KeyGraph, MemberId, Position, RekeyPlan, Scheme};
use crate::key::{Key, KeyId, KeyRef, KEY_LEN};
use crate::keygen::{nonce_salt, BatchSeed, KeyGen};
use crate::wire::codec::{Reader, Writer};
use crate::wire::DecodeError;
use crate::wrap::{NonceSalt, Wrap, Wrapper};
use zeroize::{Zeroize, Zeroizing};

/// Height of a merged group's root: above any tree (2^27 leaves need at most 27 levels).
const MERGED_ROOT_HEIGHT: u32 = 31;
/// Key id of a merged group's root (its group key).
pub const MERGED_ROOT_ID: KeyId = tree_key_id(MERGED_ROOT_HEIGHT, 0);
/// Bit ORed into every key id of the right subtree of a merged group.
pub const RIGHT_SUBTREE_PREFIX: u32 = 1 << 26;
/// Leaf slots each subtree of a merged group may use: its positions must leave the prefix bit clear.
pub const MAX_SUBTREE_LEAVES: u64 = RIGHT_SUBTREE_PREFIX as u64;

/// Key streams of a merge's or merged batch's seed, apart from every stream
/// [`crate::keygen`] and the trees draw from one seed.
const LEFT_SEED_STREAM: u64 = u64::MAX - 16;
const RIGHT_SEED_STREAM: u64 = u64::MAX - 17;
const ROOT_STREAM: u64 = u64::MAX - 18;

/// Which subtree of a merged group a member sits in.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Subtree {
    /// The absorbing group: its key ids are unchanged.
    Left,
    /// The absorbed group: its key ids carry [`RIGHT_SUBTREE_PREFIX`].
    Right,
}

impl Subtree {
    /// The id a key of a group of its own takes inside a merged group on this side.
    pub fn merged_id(self, id: KeyId) -> KeyId {
        match self {
            Subtree::Left => id,
            Subtree::Right => KeyId(id.0 | RIGHT_SUBTREE_PREFIX),
        }
    }

    /// The id a key of a merged group had in the group of its own of this side, or `None`
    /// if the key is not of this side (the other subtree's, or the merged root).
    pub fn own_id(self, id: KeyId) -> Option<KeyId> {
        if id == MERGED_ROOT_ID {
            return None;
        }
        let prefixed = id.0 & RIGHT_SUBTREE_PREFIX != 0;
        match self {
            Subtree::Left => (!prefixed).then_some(id),
            Subtree::Right => prefixed.then_some(KeyId(id.0 & !RIGHT_SUBTREE_PREFIX)),
        }
    }
}

/// A group made of two trees under one new root.
pub struct MergedTrees {
    left: Tree,
    right: Tree,
    /// Added to the right group's member ids in the merged group, taken off again at the split.
    right_member_offset: u64,
    root: Key,
    root_ref: KeyRef,
}

/// A merge: the merged group and the rekey each side's members receive on their own channel.
pub struct Merge {
    pub graph: MergedTrees,
    /// The new root wrapped under the left group's old group key.
    pub left_rekey: RekeyPlan,
    /// The new root wrapped under the right group's old group key (prefixed ref).
    pub right_rekey: RekeyPlan,
}

/// A split: the two groups again, each with a new group key wrapped under its previous root.
pub struct Split {
    pub left: Box<dyn KeyGraph>,
    pub right: Box<dyn KeyGraph>,
    pub left_rekey: RekeyPlan,
    pub right_rekey: RekeyPlan,
}

/// The tree behind a star or tree graph (a copy of its state; the caller drops the original).
fn tree_of(graph: &dyn KeyGraph) -> Result<Tree, GraphError> {
    if !matches!(graph.config().scheme, Scheme::Tree { .. } | Scheme::Star) {
        return Err(GraphError::Config("only tree and star groups merge"));
    }
    let bytes = graph.export();
    let mut reader = Reader::new(&bytes);
    let tree = Tree::import(&mut reader).map_err(|_| GraphError::Config("tree state did not read back"))?;
    if tree.leaf_slots() > MAX_SUBTREE_LEAVES {
        return Err(GraphError::Full(MAX_SUBTREE_LEAVES));
    }
    Ok(tree)
}

/// An independent seed drawn from `seed`'s stream `stream`.
fn derived_seed(seed: &BatchSeed, stream: u64) -> BatchSeed {
    let mut bytes = *KeyGen::new(seed, stream).next_key().as_bytes();
    let derived = BatchSeed::from_bytes(bytes);
    bytes.zeroize();
    derived
}

/// The plan of a rekey that delivers `root` (named `root_ref`) in one wrap under `side`'s root.
fn root_under(side: &Tree, root_ref: KeyRef, root: &Key, salt: NonceSalt) -> Option<Wrap> {
    if side.member_count() == 0 {
        return None;
    }
    let (under, key) = side.group_key();
    Some(Wrap::seal(key, Wrapper::Key(under), root_ref, root, &salt))
}

/// Merges `left` and `right` (tree or star groups, any degrees) under a new root drawn from
/// `seed`. The right group's member ids take `right_member_offset` more, and must then differ
/// from the left group's. The graphs are read, not changed: the caller stops using them.
pub fn merge_trees(left: &dyn KeyGraph, right: &dyn KeyGraph, right_member_offset: u64, seed: &BatchSeed) -> Result<Merge, GraphError> {
    let left = tree_of(left)?;
    let mut right = tree_of(right)?;
    right.offset_members(right_member_offset.into()).ok_or(GraphError::Config("member ids overflow with this offset"))?;
    if let Some(both) = right.members().find(|&m| left.contains(m)) {
        return Err(GraphError::AlreadyMember(both));
    }
    right.set_id_prefix(RIGHT_SUBTREE_PREFIX);
    let mut graph = MergedTrees { left, right, right_member_offset, root: Key::empty(), root_ref: KeyRef::default() };
    let version = graph.next_root_version()?;
    graph.root = KeyGen::new(seed, ROOT_STREAM).next_key();
    graph.root_ref = KeyRef::new(MERGED_ROOT_ID, version, 0);
    let salt = nonce_salt(seed);
    let side_rekey = |side: &Tree| RekeyPlan {
        group_key: graph.root_ref,
        replaced: vec![graph.root_ref],
        wraps: root_under(side, graph.root_ref, &graph.root, salt).into_iter().collect(),
        salt,
        ..RekeyPlan::default()
    };
    let (left_rekey, right_rekey) = (side_rekey(&graph.left), side_rekey(&graph.right));
    Ok(Merge { graph, left_rekey, right_rekey })
}

impl Merge {
    /// Both sides' rekeys as the merged group's one rekey: the new root under each old root.
    pub fn rekey(&self) -> RekeyPlan {
        let mut plan = self.left_rekey.clone();
        plan.wraps.extend(self.right_rekey.wraps.iter().cloned());
        plan
    }
}

impl MergedTrees {
    /// Fails unless a batch can take a version in each subtree and then the root: checked
    /// before anything changes, so a failed batch or split leaves the group as it was.
    fn check_version_room(&self) -> Result<(), GraphError> {
        let highest = self.left.batch_count().max(self.right.batch_count()).max(self.root_ref.version);
        highest.checked_add(2).map(|_| ()).ok_or(GraphError::VersionOverflow)
    }

    /// The version of the next root: above every version either subtree has used, which the
    /// subtrees then skip, so a later split and merge never reuse a root ref.
    fn next_root_version(&mut self) -> Result<u32, GraphError> {
        let version = self.left.batch_count().max(self.right.batch_count()).max(self.root_ref.version).checked_add(1).ok_or(GraphError::VersionOverflow)?;
        self.left.advance_batches_to(version);
        self.right.advance_batches_to(version);
        Ok(version)
    }

    /// The side `member` sits on, if it is a member.
    pub fn subtree_of(&self, member: MemberId) -> Option<Subtree> {
        if self.left.contains(member) {
            Some(Subtree::Left)
        } else if self.right.contains(member) {
            Some(Subtree::Right)
        } else {
            None
        }
    }

    pub fn members(&self) -> usize {
        self.left.member_count() + self.right.member_count()
    }

    /// What the right group's member ids took at the merge.
    pub fn right_member_offset(&self) -> u64 {
        self.right_member_offset
    }

    /// One batch of the merged group: leavers leave their side, joiners go to the smaller side,
    /// each side is rekeyed as a tree, and the root is replaced and wrapped under both sides'
    /// roots. Every wrap is sealed under the one nonce salt of `seed`.
    fn apply_merged(&mut self, batch: &Batch, seed: &BatchSeed) -> Result<RekeyPlan, GraphError> {
        validate_batch(batch, |m| self.contains(m))?;
        if batch.is_empty() {
            return Ok(RekeyPlan { group_key: self.root_ref, ..RekeyPlan::default() });
        }
        let mut sides = [Batch::default(), Batch::default()];
        for &m in &batch.leaves {
            sides[usize::from(self.right.contains(m))].leaves.push(m);
        }
        let mut sizes = [self.left.member_count(), self.right.member_count()];
        for i in 0..2 {
            sizes[i] -= sides[i].leaves.len();
        }
        for &m in &batch.joins {
            let side = usize::from(sizes[1] < sizes[0]);
            sizes[side] += 1;
            sides[side].joins.push(m);
        }
        for (tree, side) in [(&self.left, &sides[0]), (&self.right, &sides[1])] {
            if tree.leaf_slots() + side.joins.len() as u64 > MAX_SUBTREE_LEAVES {
                return Err(GraphError::Full(MAX_SUBTREE_LEAVES));
            }
        }
        self.check_version_room()?;
        let salt = nonce_salt(seed);
        let mut plan = RekeyPlan { salt, ..RekeyPlan::default() };
        let streams = [LEFT_SEED_STREAM, RIGHT_SEED_STREAM];
        for (i, tree) in [&mut self.left, &mut self.right].into_iter().enumerate() {
            if sides[i].is_empty() {
                continue;
            }
            let part = tree.apply_salted(&sides[i], &derived_seed(seed, streams[i]), salt)?;
            plan.replaced.extend(part.replaced);
            plan.revised.extend(part.revised);
            plan.wraps.extend(part.wraps);
            plan.welcomes.extend(part.welcomes);
            plan.departed.extend(part.departed);
        }
        let version = self.next_root_version()?;
        self.root = KeyGen::new(seed, ROOT_STREAM).next_key();
        self.root_ref = KeyRef::new(MERGED_ROOT_ID, version, 0);
        plan.wraps.extend(root_under(&self.left, self.root_ref, &self.root, salt));
        plan.wraps.extend(root_under(&self.right, self.root_ref, &self.root, salt));
        plan.replaced.push(self.root_ref);
        plan.group_key = self.root_ref;
        Ok(plan)
    }

    /// Splits the group back into its two sides, each with a new group key (a new version of
    /// its old root, drawn from `seed`) wrapped once under its previous root. The right side's
    /// ids lose their prefix again, and its member ids the offset they took at the merge
    /// (members who joined the merged group on the right must have ids above it).
    /// Call [`Self::can_split`] first to keep the group when a split would fail.
    pub fn split(self, seed: &BatchSeed) -> Result<Split, GraphError> {
        self.can_split()?;
        let MergedTrees { mut left, mut right, right_member_offset, .. } = self;
        right.offset_members(-i128::from(right_member_offset)).ok_or(GraphError::Config("a right member's id is below the merge's offset"))?;
        right.set_id_prefix(0);
        let (left_seed, right_seed) = (derived_seed(seed, LEFT_SEED_STREAM), derived_seed(seed, RIGHT_SEED_STREAM));
        let left_rekey = left.renew_root(&left_seed, nonce_salt(&left_seed))?;
        let right_rekey = right.renew_root(&right_seed, nonce_salt(&right_seed))?;
        Ok(Split { left: Box::new(left), right: Box::new(right), left_rekey, right_rekey })
    }

    /// Why [`Self::split`] would fail, if it would.
    pub fn can_split(&self) -> Result<(), GraphError> {
        self.check_version_room()?;
        if self.right.members().any(|m| m.0 < self.right_member_offset) {
            return Err(GraphError::Config("a right member's id is below the merge's offset"));
        }
        Ok(())
    }

    /// Degree of each side's tree ([`super::tree::STAR_DEGREE`] for a star).
    pub fn degrees(&self) -> (u32, u32) {
        (self.left.degree(), self.right.degree())
    }
}

impl KeyGraph for MergedTrees {
    /// The left group's: the merged group is run by the left group's controller, under its policy.
    fn config(&self) -> GraphConfig {
        self.left.config()
    }

    fn apply(&mut self, batch: &Batch, seed: &BatchSeed) -> Result<RekeyPlan, GraphError> {
        self.apply_merged(batch, seed)
    }

    fn group_key(&self) -> (KeyRef, &Key) {
        (self.root_ref, &self.root)
    }

    fn contains(&self, member: MemberId) -> bool {
        self.left.contains(member) || self.right.contains(member)
    }

    /// Everything `member` holds: its subtree path (merged ids) and the merged root.
    fn member_keys(&self, member: MemberId) -> Option<(Position, Vec<(KeyRef, Key)>)> {
        let side = if self.left.contains(member) { &self.left } else { &self.right };
        let (position, mut keys) = side.member_keys(member)?;
        keys.push((self.root_ref, self.root.clone()));
        Some((position, keys))
    }

    fn individual_key(&self, member: MemberId) -> Option<Key> {
        self.left.individual_key(member).or_else(|| self.right.individual_key(member))
    }

    fn stats(&self) -> GraphStats {
        let (left, right) = (self.left.stats(), self.right.stats());
        GraphStats { members: left.members + right.members, stored_keys: left.stored_keys + right.stored_keys + 1, height: left.height.max(right.height) + 1 }
    }

    fn max_members(&self) -> u64 {
        2 * MAX_SUBTREE_LEAVES
    }

    /// The offset, the root, then each tree's own export (the right one without its prefix,
    /// which [`MergedTrees::import`] sets again).
    fn export(&self) -> Zeroizing<Vec<u8>> {
        let (left, right) = (KeyGraph::export(&self.left), KeyGraph::export(&self.right));
        let mut out = Zeroizing::new(Vec::with_capacity(8 + 12 + KEY_LEN + left.len() + right.len()));
        out.put_u64(self.right_member_offset);
        out.put_ref(self.root_ref);
        out.extend_from_slice(self.root.as_bytes());
        out.extend_from_slice(&left);
        out.extend_from_slice(&right);
        out
    }
}

impl MergedTrees {
    /// A merged group from [`KeyGraph::export`]; strict, as any decoder: the root must be a
    /// merged root whose version neither tree's batches are below, both trees must fit their
    /// slots, and no member may sit on both sides.
    pub fn import(bytes: &[u8]) -> Result<MergedTrees, DecodeError> {
        let mut r = Reader::new(bytes);
        let right_member_offset = r.u64("member offset")?;
        let root_ref = r.key_ref("merged root")?;
        let root = r.key("merged root")?;
        let left = Tree::import(&mut r)?;
        let mut right = Tree::import(&mut r)?;
        r.finish()?;
        let bad = |field, value: u64| Err(DecodeError::BadValue { field, value });
        if root_ref.id != MERGED_ROOT_ID {
            return bad("merged root id", root_ref.id.0.into());
        }
        if left.batch_count() < root_ref.version || right.batch_count() < root_ref.version {
            return bad("merged root version", root_ref.version.into());
        }
        for tree in [&left, &right] {
            if tree.leaf_slots() > MAX_SUBTREE_LEAVES {
                return bad("subtree leaves", tree.leaf_slots());
            }
        }
        if let Some(both) = right.members().find(|&m| left.contains(m)) {
            return bad("member on both sides", both.0);
        }
        right.set_id_prefix(RIGHT_SUBTREE_PREFIX);
        Ok(MergedTrees { left, right, right_member_offset, root, root_ref })
    }
}

impl core::fmt::Debug for MergedTrees {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "MergedTrees {{ root: {}, members: {} }}", self.root_ref, self.members())
    }
}
