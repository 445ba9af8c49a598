//! Caronni et al.'s transitions between centralized flat and centralized tree (section 3.5,
//! figure 6).
//!
//! **Flat to tree, lossless, no message.** "A hierarchy can be generated from the flat table
//! in the way described in Section 3.3's Multiple Leave. Keys derived from this hierarchy are
//! then used to populate the tree data structure held by the Group Manager." The tree is
//! binary over the ID bits: the leaf of flat ID x is x, the node at height h above it stands
//! for the bits h..I of x, and its key is derived (HKDF) from the TEK and the KEKs of exactly
//! those bits. Leaves are the members' individual keys and the root is derived from the TEK
//! alone. A member holds the KEKs of its own bits, so it derives its whole path and no other
//! node; the controller derives every node. Footnote 1: "no security gain for old
//! participants": old participants whose KEKs together cover a node's bits derive it, so
//! colluding old participants cannot be expelled; participants joining after the transition
//! hold only their path and are expelled as in any tree.
//!
//! **Tree to flat, large message, perfect forward secrecy kept.** A fresh flat table (nothing
//! derived from any tree key), and every member's new TEK and KEKs wrapped under its
//! individual key: N · (I + 1) wraps. The paper's other variant, a short message revealing
//! the secrets the tree keys were generated from (losing PFS), is not built.

use aws_lc_rs::hkdf;
use zeroize::Zeroizing;

use super::flat::{flat_kek_id, Flat};
use super::tree::{tree_key_id, Tree};
use super::{FlatIds, KeyGraph, MemberId, Position, Scheme};
use crate::key::{Key, KeyId, KeyRef, KEY_LEN};
use crate::keygen::{nonce_salt, BatchSeed, KeyGen};
use crate::member::MemberKeys;
use crate::wire::codec::Reader;
use crate::wrap::{UnwrapError, Wrap, Wrapper};

/// Most ID bits a flat table may have to become a tree: the tree holds one leaf slot per
/// flat ID (2^20 slots, about 90 MB of nodes); a sparse tree is not built.
pub const MAX_TREE_ID_BITS: u8 = 20;

const NODE_LABEL: &[u8] = b"keycast/v2 flat to tree node";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    #[error("the graph is not a {0}")]
    WrongScheme(&'static str),
    #[error("{0} ID bits: a tree over them would need 2^{0} leaves (at most {MAX_TREE_ID_BITS} bits)")]
    TooManyIdBits(u8),
    #[error("{members} members do not fit in {id_bits} ID bits")]
    TooManyMembers { members: usize, id_bits: u8 },
    #[error("member {0:?} does not fit the new table: {1}")]
    BadMember(MemberId, &'static str),
    #[error("key version space exhausted")]
    VersionOverflow,
    #[error("the member lacks key {0:?}")]
    MissingKey(KeyId),
    #[error("the notice is not for this member's individual key")]
    NotMine,
    #[error(transparent)]
    Unwrap(#[from] UnwrapError),
    #[error("the graph does not reload: {0}")]
    Reload(String),
}

/// What the controller tells the members, in public, when it moves to the tree: with it each
/// member derives its path (no key travels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TreeSwitch {
    pub id_bits: u8,
    /// The version of every key of the new tree: above every version of the flat table, so no
    /// ref names two values.
    pub version: u32,
}

/// The controller's tree after the switch.
pub struct FlatToTree {
    pub graph: Box<dyn KeyGraph>,
    pub switch: TreeSwitch,
}

/// The controller's binary tree derived from its flat table `flat` (same members, same join
/// policy); it rekeys joins and leaves as any tree from then on.
pub fn tree_from_flat(flat: &dyn KeyGraph) -> Result<FlatToTree, TransitionError> {
    let Scheme::Flat { id_bits, .. } = flat.config().scheme else { return Err(TransitionError::WrongScheme("flat table")) };
    if id_bits > MAX_TREE_ID_BITS {
        return Err(TransitionError::TooManyIdBits(id_bits));
    }
    let table = Flat::import(&mut Reader::new(&flat.export())).map_err(|e| TransitionError::Reload(e.to_string()))?;
    let version = table.batch_count().checked_add(1).ok_or(TransitionError::VersionOverflow)?;
    let switch = TreeSwitch { id_bits: table.id_bits(), version };
    let (tek_ref, tek) = flat.group_key();
    let members = table.members_by_id().into_iter().map(|(member, id, key)| (member, id as u32, key)).collect();
    let node_key = |height: u32, position: u32| {
        let keks: Vec<(KeyRef, &Key)> = (height..u32::from(id_bits))
            .map(|bit| table.kek(bit as u8, ((position >> (bit - height)) & 1) as u8))
            .collect();
        tree_node_key(switch, height, position, (tek_ref, tek), &keks)
    };
    let tree = Tree::with_keys(2, table.policy(), u32::from(id_bits), version, members, node_key)
        .ok_or(TransitionError::TooManyIdBits(id_bits))?;
    Ok(FlatToTree { graph: Box::new(tree), switch })
}

/// The key of node (`height`, `position`) of the tree made by `switch`: HKDF with the TEK as
/// salt, the KEKs of bits `height..I` of the node's IDs (`keks`, in bit order) as input and
/// the refs of the node and of every key used as info.
pub fn tree_node_key(switch: TreeSwitch, height: u32, position: u32, tek: (KeyRef, &Key), keks: &[(KeyRef, &Key)]) -> Key {
    let node = KeyRef::new(tree_key_id(height, position), switch.version, 0).to_bytes();
    let mut secret = Zeroizing::new(Vec::with_capacity(KEY_LEN * keks.len()));
    keks.iter().for_each(|(_, key)| secret.extend_from_slice(key.as_bytes()));
    let refs: Vec<[u8; KeyRef::ENCODED_LEN]> = std::iter::once(tek.0).chain(keks.iter().map(|(r, _)| *r)).map(KeyRef::to_bytes).collect();
    let info: Vec<&[u8]> = [NODE_LABEL, &node[..]].into_iter().chain(refs.iter().map(|r| &r[..])).collect();
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, tek.1.as_bytes()).extract(&secret);
    let mut out = [0u8; KEY_LEN];
    prk.expand(&info, hkdf::HKDF_SHA256).and_then(|okm| okm.fill(&mut out)).expect("HKDF-SHA256 yields 32 bytes");
    let key = Key::from_bytes(out);
    zeroize::Zeroize::zeroize(&mut out);
    key
}

/// A flat member's state in the tree of `switch`, derived from the keys it holds (its
/// individual key, the TEK and the KEK of each ID bit, at the table's newest refs): its leaf
/// and every node up to the root, with no message.
pub fn member_tree_keys(switch: TreeSwitch, member: &MemberKeys) -> Result<MemberKeys, TransitionError> {
    let Position::Flat { id, id_bits } = member.position() else { return Err(TransitionError::WrongScheme("flat member")) };
    if id_bits != switch.id_bits || id_bits > MAX_TREE_ID_BITS {
        return Err(TransitionError::TooManyIdBits(id_bits));
    }
    let (tek_ref, tek) = member.group_key().ok_or(TransitionError::MissingKey(KeyId(0)))?;
    let individual = member.individual_key().ok_or(TransitionError::MissingKey(KeyId(u32::MAX)))?;
    let newest = |kek_id: KeyId| {
        let r = member.refs().into_iter().filter(|r| r.id == kek_id).max_by_key(|r| (r.version, r.revision));
        r.and_then(|r| Some((r, member.key(r)?))).ok_or(TransitionError::MissingKey(kek_id))
    };
    let keks = (0..id_bits).map(|bit| newest(flat_kek_id(bit, ((id >> bit) & 1) as u8))).collect::<Result<Vec<_>, _>>()?;
    let leaf = id as u32;
    let mut path = vec![(KeyRef::new(tree_key_id(0, leaf), switch.version, 0), individual)];
    for height in 1..=u32::from(id_bits) {
        let position = leaf >> height;
        let own: Vec<(KeyRef, &Key)> = keks[height as usize..].iter().map(|(r, k)| (*r, k)).collect();
        let key = tree_node_key(switch, height, position, (tek_ref, &tek), &own);
        path.push((KeyRef::new(tree_key_id(height, position), switch.version, 0), key));
    }
    let root = path.last().expect("a root").0;
    Ok(MemberKeys::from_snapshot(Position::Tree { leaf, degree: 2 }, path, root))
}

/// One member's part of the large message: its place in the new table and its TEK and KEKs
/// sealed under its individual key.
#[derive(Clone, Debug)]
pub struct FlatNotice {
    pub member: MemberId,
    pub position: Position,
    /// The ref its individual key (unchanged) goes by in the table.
    pub individual: KeyRef,
    pub group_key: KeyRef,
    /// The TEK then the KEK of each ID bit, under the individual key's tree ref.
    pub wraps: Vec<Wrap>,
}

impl FlatNotice {
    /// Bytes of its wraps on the wire (each wrap's refs and sealed key).
    pub fn wrap_bytes(&self) -> usize {
        self.wraps.iter().map(Wrap::encoded_len).sum()
    }
}

/// The controller's flat table after the switch and the large message that moves the members.
pub struct TreeToFlat {
    pub graph: Box<dyn KeyGraph>,
    /// One per member, in member order.
    pub notices: Vec<FlatNotice>,
}

impl TreeToFlat {
    pub fn wraps(&self) -> usize {
        self.notices.iter().map(|n| n.wraps.len()).sum()
    }

    pub fn wrap_bytes(&self) -> usize {
        self.notices.iter().map(FlatNotice::wrap_bytes).sum()
    }
}

/// A fresh flat table of `id_bits` for the members of `tree` (flat IDs given by `ids`:
/// sequential in member order, or the member id itself), each keeping its individual key, and
/// the notices that carry every member its new keys. `seed` makes every new key: nothing is
/// derived from a tree key, so a tree key that leaks later reveals nothing of the table.
pub fn flat_from_tree(tree: &dyn KeyGraph, id_bits: u8, ids: FlatIds, seed: &BatchSeed) -> Result<TreeToFlat, TransitionError> {
    let config = tree.config();
    if !matches!(config.scheme, Scheme::Tree { .. } | Scheme::Star) {
        return Err(TransitionError::WrongScheme("tree"));
    }
    let old = Tree::import(&mut Reader::new(&tree.export())).map_err(|e| TransitionError::Reload(e.to_string()))?;
    let version = old.batch_count().checked_add(1).ok_or(TransitionError::VersionOverflow)?;
    let mut members: Vec<MemberId> = old.members().collect();
    members.sort_unstable();
    if !(1..=64).contains(&id_bits) || (id_bits < 64 && members.len() as u64 > 1u64 << id_bits) {
        return Err(TransitionError::TooManyMembers { members: members.len(), id_bits });
    }
    let flat_id = |n: usize, member: MemberId| match ids {
        FlatIds::Sequential => Ok(n as u64),
        FlatIds::FromMemberId if id_bits == 64 || member.0 >> id_bits == 0 => Ok(member.0),
        FlatIds::FromMemberId => Err(TransitionError::BadMember(member, "its id does not fit the ID bits")),
    };
    let mut keys = KeyGen::new(seed, 0);
    let tek = (KeyRef::new(KeyId(0), version, 0), keys.next_key());
    let mut fresh = |bit: u8, value: u8| (KeyRef::new(flat_kek_id(bit, value), version, 0), keys.next_key());
    let keks: Vec<[(KeyRef, Key); 2]> = (0..id_bits).map(|bit| [fresh(bit, 0), fresh(bit, 1)]).collect();
    let mut parts = Vec::with_capacity(members.len());
    let mut leaf_refs = Vec::with_capacity(members.len());
    for (n, &member) in members.iter().enumerate() {
        let (_, path) = tree.member_keys(member).ok_or(TransitionError::BadMember(member, "no keys"))?;
        let (leaf_ref, individual) = path.into_iter().next().ok_or(TransitionError::BadMember(member, "no individual key"))?;
        parts.push((member, flat_id(n, member)?, individual));
        leaf_refs.push(leaf_ref);
    }
    let table = Flat::from_parts(id_bits, ids, config.join_policy, version, &tek, keks.clone(), parts)
        .map_err(|e| TransitionError::Reload(e.to_string()))?;
    let salt = nonce_salt(seed);
    let notices = members
        .iter()
        .zip(leaf_refs)
        .map(|(&member, leaf_ref)| {
            let (position, held) = table.member_keys(member).expect("a member of the new table");
            let Position::Flat { id, .. } = position else { unreachable!("a flat position") };
            let individual = &held[0].1;
            let under = Wrapper::Key(leaf_ref);
            let own = std::iter::once(&tek).chain((0..id_bits).map(|bit| &keks[bit as usize][((id >> bit) & 1) as usize]));
            let wraps = own.map(|(r, key)| Wrap::seal(individual, under, *r, key, &salt)).collect();
            FlatNotice { member, position, individual: held[0].0, group_key: tek.0, wraps }
        })
        .collect();
    Ok(TreeToFlat { graph: Box::new(table), notices })
}

/// A tree member's state in the flat table, from its notice: the individual key it holds
/// opens its TEK and KEKs.
pub fn member_flat_keys(notice: &FlatNotice, member: &MemberKeys) -> Result<MemberKeys, TransitionError> {
    let Position::Tree { leaf, .. } = member.position() else { return Err(TransitionError::WrongScheme("tree member")) };
    let individual = member.individual_key().ok_or(TransitionError::MissingKey(tree_key_id(0, leaf)))?;
    let mut keys = vec![(notice.individual, individual.clone())];
    for wrap in &notice.wraps {
        match wrap.under {
            Wrapper::Key(r) if r.id == tree_key_id(0, leaf) && member.key(r).is_some() => keys.push((wrap.key, wrap.open(&individual)?)),
            _ => return Err(TransitionError::NotMine),
        }
    }
    Ok(MemberKeys::from_snapshot(notice.position, keys, notice.group_key))
}
