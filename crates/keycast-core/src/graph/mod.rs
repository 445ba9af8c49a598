//! Key graphs (Wong, Gouda and Lam; Caronni et al.): the controller's view of who holds
//! which keys, and batch rekey planning.
//!
//! One interface, [`KeyGraph`], covers the three schemes; a controller holds a
//! `Box<dyn KeyGraph>` built by [`new_graph`] and never needs to know which it has.

pub(crate) mod flat;
pub mod merge;
pub mod transition;
pub(crate) mod tree;

pub use flat::FlatIds;

use rayon::prelude::*;

use crate::key::{Key, KeyRef};
use crate::keygen::BatchSeed;
use zeroize::Zeroizing;

use crate::wire::codec::Reader;
use crate::wire::DecodeError;
use crate::wrap::{NonceSalt, Wrap};

/// A member's identity inside one group (assigned by the controller, e.g. from its certificate).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct MemberId(pub u64);

/// How keys are arranged.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Scheme {
    /// Wong's star: one group key, one individual key per member.
    Star,
    /// Wong's key tree of the given degree (>= 2).
    Tree { degree: u32 },
    /// Caronni's flat table: the TEK plus two KEKs per bit of an `id_bits`-bit member ID.
    Flat { id_bits: u8, ids: FlatIds },
}

/// What joiners receive (Caronni 3.1.2; Wong 3).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum JoinPolicy {
    /// Replace every key a joiner receives with a new version (Wong's join protocol).
    #[default]
    NewVersion,
    /// Advance those keys by one revision: existing members derive it themselves, so a batch
    /// of joins alone costs no wrap for them. The joiner cannot recover the previous revision.
    Revision,
}

impl JoinPolicy {
    /// The policy's name in configuration files, logs and reports.
    pub fn name(self) -> &'static str {
        match self {
            JoinPolicy::NewVersion => "version",
            JoinPolicy::Revision => "revision",
        }
    }

    /// The policy [`JoinPolicy::name`] names.
    pub fn from_name(name: &str) -> Option<JoinPolicy> {
        [JoinPolicy::NewVersion, JoinPolicy::Revision].into_iter().find(|p| p.name() == name)
    }
}

/// Policy fixed for a group's life.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct GraphConfig {
    pub scheme: Scheme,
    pub join_policy: JoinPolicy,
}

/// One batch of membership changes (a single join or leave is a batch of one).
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub joins: Vec<MemberId>,
    pub leaves: Vec<MemberId>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.joins.is_empty() && self.leaves.is_empty()
    }
}

/// Where a member sits in the graph; with it a member knows which key ids are its own.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Position {
    /// Leaf `leaf` of a tree (a star is a tree of height 1 and very large degree).
    Tree { leaf: u32, degree: u32 },
    /// Flat ID `id` of `id_bits` bits.
    Flat { id: u64, id_bits: u8 },
}

/// What a joiner is handed over the secure unicast channel: its individual key and place.
/// Its other keys reach it inside the rekey, wrapped under the individual key.
#[derive(Clone, Debug)]
pub struct Welcome {
    pub member: MemberId,
    pub position: Position,
    pub individual: KeyRef,
    pub individual_key: Key,
}

/// The result of one batch: every new key and the wraps that deliver it to exactly the
/// members who must hold it. Wraps are ordered so that a key's wraps come after the wraps
/// of the keys it is sealed under (bottom-up), so members can process them in one pass.
#[derive(Clone, Debug, Default)]
pub struct RekeyPlan {
    /// The group key (TEK) after this batch.
    pub group_key: KeyRef,
    /// Keys given fresh material (a new version) in this batch.
    pub replaced: Vec<KeyRef>,
    /// Keys advanced by the one-way function; holders of an earlier revision derive these.
    pub revised: Vec<KeyRef>,
    pub wraps: Vec<Wrap>,
    /// Every wrap's nonce salt (drawn from the batch seed).
    pub salt: NonceSalt,
    /// One per joiner, to be sent over the unicast join channel.
    pub welcomes: Vec<Welcome>,
    /// Members that asked to leave.
    pub departed: Vec<MemberId>,
    /// Members removed with a coalition of leavers (flat scheme only): they must rejoin.
    pub excluded: Vec<MemberId>,
    /// A tree's own account of how its wraps link up, so that placement need not rescan
    /// them (tens of MB in a large batch). Valid only while `wraps` is exactly as the tree
    /// produced it: placement checks the count, and in debug builds every link.
    pub tree_runs: Option<TreeRuns>,
}

/// Runs of a tree's plan: the wraps of each new key, contiguous, and for each wrap the run
/// delivering the key it is sealed under when that key is new in the same plan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TreeRuns {
    /// Run r is wraps `starts[r]..starts[r + 1]`; the last entry is the number of wraps.
    pub(crate) starts: Vec<u32>,
    /// For each wrap: the run delivering its wrapping key (`u32::MAX` if that key is not new),
    /// and whether it is an entry (a key its receivers hold or derive).
    pub(crate) below: Vec<(u32, bool)>,
}

impl RekeyPlan {
    /// Keys that changed in any way.
    pub fn changed_keys(&self) -> usize {
        self.replaced.len() + self.revised.len()
    }
}

/// Size and shape of a graph, for reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GraphStats {
    pub members: usize,
    /// Keys the controller stores (including individual keys).
    pub stored_keys: usize,
    /// Tree height (edges from root to leaf); 1 for a star; ID bits for flat.
    pub height: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GraphError {
    #[error("member {0:?} is already in the group")]
    AlreadyMember(MemberId),
    #[error("member {0:?} is not in the group")]
    NotMember(MemberId),
    #[error("member {0:?} appears twice in one batch")]
    DuplicateInBatch(MemberId),
    #[error("the group is full ({0} members at most with this scheme)")]
    Full(u64),
    #[error("flat ID {id:#x} of member {member:?} is already taken")]
    FlatIdTaken { member: MemberId, id: u64 },
    #[error("flat ID {id:#x} of member {member:?} does not fit in {id_bits} bits")]
    FlatIdTooWide { member: MemberId, id: u64, id_bits: u8 },
    #[error("invalid configuration: {0}")]
    Config(&'static str),
    #[error("key version space exhausted")]
    VersionOverflow,
}

/// The controller's key graph, whatever the scheme.
pub trait KeyGraph: Send + Sync {
    fn config(&self) -> GraphConfig;

    /// Applies a batch of joins and leaves and returns the rekey plan. On error the graph is
    /// unchanged. `seed` supplies the entropy for every new key of the batch.
    fn apply(&mut self, batch: &Batch, seed: &BatchSeed) -> Result<RekeyPlan, GraphError>;

    /// The current group key (TEK).
    fn group_key(&self) -> (KeyRef, &Key);

    fn contains(&self, member: MemberId) -> bool;

    /// Everything `member` holds now (for resync over the unicast channel, and for audits).
    fn member_keys(&self, member: MemberId) -> Option<(Position, Vec<(KeyRef, Key)>)>;

    /// A member's individual key alone (no allocation: liveness checks run per datagram).
    fn individual_key(&self, member: MemberId) -> Option<Key>;

    fn stats(&self) -> GraphStats;

    /// Most members this graph can hold.
    fn max_members(&self) -> u64;

    /// The whole state (keys included), for a snapshot; [`import_graph`] reads it back.
    fn export(&self) -> Zeroizing<Vec<u8>>;
}

/// A graph from [`KeyGraph::export`] of a graph of `config`; strict, as any decoder.
pub fn import_graph(config: GraphConfig, bytes: &[u8]) -> Result<Box<dyn KeyGraph>, DecodeError> {
    let mut r = Reader::new(bytes);
    let graph: Box<dyn KeyGraph> = match config.scheme {
        Scheme::Star | Scheme::Tree { .. } => Box::new(tree::Tree::import(&mut r)?),
        Scheme::Flat { .. } => Box::new(flat::Flat::import(&mut r)?),
    };
    r.finish()?;
    if graph.config() != config {
        return Err(DecodeError::BadValue { field: "graph configuration", value: 0 });
    }
    Ok(graph)
}

/// Builds an empty group.
pub fn new_graph(config: GraphConfig, seed: &BatchSeed) -> Result<Box<dyn KeyGraph>, GraphError> {
    Ok(match config.scheme {
        Scheme::Star => Box::new(tree::Tree::star(config.join_policy, seed)),
        Scheme::Tree { degree } => Box::new(tree::Tree::new(degree, config.join_policy, seed)?),
        Scheme::Flat { id_bits, ids } => Box::new(flat::Flat::new(id_bits, ids, config.join_policy, seed)?),
    })
}

/// Rejects batches that name a member twice, join a member twice or remove a stranger.
fn validate_batch(batch: &Batch, contains: impl Fn(MemberId) -> bool + Sync) -> Result<(), GraphError> {
    validate_joins(batch, &contains)?;
    let stranger = batch.leaves.par_iter().with_min_len(PARALLEL_LOOKUPS).find_first(|&&m| !contains(m));
    if let Some(&m) = stranger {
        return Err(GraphError::NotMember(m));
    }
    Ok(())
}

/// [`validate_batch`] but for the leavers' membership, for a caller that looks them up anyway.
fn validate_joins(batch: &Batch, contains: impl Fn(MemberId) -> bool + Sync) -> Result<(), GraphError> {
    let named = || batch.joins.iter().chain(&batch.leaves).copied();
    let total = batch.joins.len() + batch.leaves.len();
    let duplicate = if total <= 16 {
        // A single join or leave: pairwise, without allocating.
        named().enumerate().find(|&(i, m)| named().take(i).any(|earlier| earlier == m)).map(|(_, m)| m)
    } else {
        let mut sorted: Vec<MemberId> = named().collect();
        sorted.par_sort_unstable();
        sorted.windows(2).find(|pair| pair[0] == pair[1]).map(|pair| pair[0])
    };
    if let Some(m) = duplicate {
        return Err(GraphError::DuplicateInBatch(m));
    }
    // Membership lookups are cache misses: large batches make them on every core.
    let joiner = batch.joins.par_iter().with_min_len(PARALLEL_LOOKUPS).find_first(|&&m| contains(m));
    if let Some(&m) = joiner {
        return Err(GraphError::AlreadyMember(m));
    }
    Ok(())
}

/// Fewer lookups than this are made on the calling thread.
pub(crate) const PARALLEL_LOOKUPS: usize = 4096;

/// Key stream used when a graph is created, apart from every stream a batch uses.
const CREATION_STREAM: u64 = u64::MAX - 1;

/// Versions are numbered by batch: every key replaced in batch n gets version n + 1 (keys
/// made when the graph is created have version 1). A ref therefore never names two different
/// keys, however slots are emptied, dropped and reused, which the nonce of every wrap relies on.
#[derive(Clone, Copy, Debug)]
struct BatchCounter(u32);

impl BatchCounter {
    fn new() -> Self {
        BatchCounter(1)
    }

    /// The version of every key replaced by the next batch.
    fn next_version(&mut self) -> Result<u32, GraphError> {
        self.0 = self.0.checked_add(1).ok_or(GraphError::VersionOverflow)?;
        Ok(self.0)
    }
}

/// A count, then that many values in strictly ascending order (so each at most once).
pub(crate) fn read_ascending<T: Ord + Copy + Into<u64>>(
    r: &mut Reader<'_>,
    field: &'static str,
    max: usize,
    width: usize,
    read: impl Fn(&mut Reader<'_>) -> Result<T, DecodeError>,
) -> Result<std::collections::BinaryHeap<std::cmp::Reverse<T>>, DecodeError> {
    let count = r.count(4, max, width, field)?;
    let mut values = std::collections::BinaryHeap::with_capacity(count);
    let mut previous: Option<T> = None;
    for _ in 0..count {
        let value = read(r)?;
        if previous.is_some_and(|p| p >= value) {
            return Err(DecodeError::BadValue { field, value: value.into() });
        }
        previous = Some(value);
        values.push(std::cmp::Reverse(value));
    }
    Ok(values)
}
