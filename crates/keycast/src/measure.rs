//! What `sim figures` and `bench` measure: a full group, a timed rekey (planned, packaged,
//! optionally packetised and signed) and random leavers.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use aws_lc_rs::digest;
use aws_lc_rs::signature::Ed25519KeyPair;
use keycast_core::strategy::{package, package_size, RekeyMessage};
use keycast_core::wire::auth::{leaf_hash, path_len, Node, NODE_LEN, SIGNATURE_LEN};
use keycast_core::wire::rekey::RekeyContext;
use keycast_core::wire::{encode_rekey, GroupId, PacketConfig, Placement, Signer};
use keycast_core::{new_graph, Batch, BatchSeed, GraphConfig, JoinPolicy, KeyGraph, MemberId, Scheme, Strategy};
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

/// Most members joined in one batch while building a group: a batch's plan holds every
/// joiner's wraps (21 each in a 20-bit flat table, about 1.8 GB for 2^20 joiners at once).
const BUILD_BATCH: u64 = 1 << 17;

/// A group of members 0..n, built in batches of at most `BUILD_BATCH` joiners (no progress
/// bar: for groups up to ~10^6).
pub fn full_group(scheme: Scheme, n: u64, seed: u64) -> Box<dyn KeyGraph> {
    let config = GraphConfig { scheme, join_policy: JoinPolicy::NewVersion };
    let mut graph = new_graph(config, &BatchSeed::from_u64(seed)).expect("valid scheme");
    let mut batch_seed = BatchSeed::from_u64(seed ^ 0x6a09);
    for first in (0..n).step_by(BUILD_BATCH as usize) {
        let joins = (first..(first + BUILD_BATCH).min(n)).map(MemberId).collect();
        graph.apply(&Batch { joins, leaves: vec![] }, &batch_seed).expect("fresh members");
        batch_seed = batch_seed.next();
    }
    graph
}

/// The flat scheme with `id_bits`-bit sequential IDs.
pub fn flat(id_bits: u8) -> Scheme {
    Scheme::Flat { id_bits, ids: keycast_core::FlatIds::Sequential }
}

/// `k` distinct members of 0..n, sorted, drawn with `seed`.
pub fn random_leavers(n: u64, k: u64, seed: u64) -> Vec<MemberId> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut chosen = std::collections::BTreeSet::new();
    while (chosen.len() as u64) < k.min(n) {
        chosen.insert(MemberId(rng.next_u64() % n));
    }
    chosen.into_iter().collect()
}

/// A signer for simulations (its seed is public: never a real controller's key).
pub fn sim_signer() -> Signer {
    Signer::from_seed(&SIM_SEED)
}

const SIM_SEED: [u8; 32] = [0x5a; 32];
/// Prefix of an inner hash-tree node (docs/wire.md).
const INNER_PREFIX: u8 = 1;

pub const CONTEXT: RekeyContext = RekeyContext { group: GroupId(1), epoch: 1, seq: 1, activation: 2 };

/// How far a timed rekey goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// Plan and package with a strategy (Wong's server work without digests or signatures).
    Package(Strategy),
    /// Plan, package, then sign what the strategy sends as Wong, Gouda and Lam did (their
    /// section 5): a digest of each message, one signature over a hash tree of the digests,
    /// and each message carrying that signature and its path.
    Signed(Strategy),
    /// Plan, then packetise with this placement and sign (what a keycast controller sends,
    /// with `Placement::Auto`).
    Wire(Placement),
}

/// What one rekey cost.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cost {
    pub time: Duration,
    pub wraps: usize,
    /// Bytes on the wire (signed packets) or, unsigned, of the packaged messages.
    pub bytes: usize,
    pub signatures: usize,
    /// Packets on the wire (0 unless packetised).
    pub packets: usize,
    /// Signature and path bytes among `bytes` (0 unless packetised).
    pub auth_bytes: usize,
}

/// Applies `batch` and finishes its rekey as asked, timing all of it.
pub fn rekey(graph: &mut dyn KeyGraph, batch: &Batch, seed: &BatchSeed, finish: Finish, signer: &Signer) -> Cost {
    let start = Instant::now();
    let plan = graph.apply(batch, seed).expect("valid batch");
    let wire = |placement| {
        let config = PacketConfig { placement, ..PacketConfig::default() };
        encode_rekey(&plan, CONTEXT, config, signer).expect("valid packet config")
    };
    let (bytes, encoded) = match finish {
        Finish::Package(strategy) => (package_size(&package(&plan, strategy)).bytes, None),
        Finish::Signed(strategy) => {
            let signed = sign_messages(&package(&plan, strategy));
            return Cost { time: start.elapsed(), wraps: plan.wraps.len(), bytes: signed.bytes, signatures: 1, packets: signed.messages, auth_bytes: signed.auth_bytes };
        }
        Finish::Wire(placement) => {
            let encoded = wire(placement);
            (encoded.stats.bytes, Some(encoded))
        }
    };
    let time = start.elapsed();
    let stats = encoded.as_ref().map(|e| e.stats).unwrap_or_default();
    // A controller keeps the packets until the next rekey: freeing them is not this rekey's work.
    drop(encoded);
    Cost { time, wraps: plan.wraps.len(), bytes, signatures: stats.signatures, packets: stats.packets, auth_bytes: stats.auth_bytes }
}

/// Bytes and authentication bytes of a strategy's messages once signed.
struct SignedMessages {
    messages: usize,
    bytes: usize,
    auth_bytes: usize,
}

/// The simulations' signing key (the seed of `sim_signer`) as a plain Ed25519 key pair, for
/// signing hash-tree roots of strategies' messages.
fn message_signer() -> &'static Ed25519KeyPair {
    static SIGNER: OnceLock<Ed25519KeyPair> = OnceLock::new();
    SIGNER.get_or_init(|| Ed25519KeyPair::from_seed_unchecked(&SIM_SEED).expect("any 32 bytes are a seed"))
}

/// Each message encoded (header, then its wraps, as on the wire) and hashed as a leaf of one
/// hash tree, built as keycast's packets' trees are; the root signed once.
fn sign_messages(messages: &[RekeyMessage<'_>]) -> SignedMessages {
    let mut leaves = Vec::with_capacity(messages.len());
    let mut body = Vec::new();
    for message in messages {
        body.clear();
        body.extend_from_slice(&message.group_key.to_bytes());
        body.extend_from_slice(&(message.wraps.len() as u32).to_be_bytes());
        for wrap in &message.wraps {
            body.extend_from_slice(&wrap.key.to_bytes());
            let at = body.len();
            body.resize(at + wrap.under.encoded_len(), 0);
            wrap.under.write_to(&mut body[at..]);
            body.extend_from_slice(&wrap.sealed);
        }
        leaves.push(leaf_hash(&body));
    }
    std::hint::black_box(message_signer().sign(&hash_tree_root(leaves)));
    let path_nodes: usize = (0..messages.len()).map(|i| path_len(i, messages.len())).sum();
    let auth_bytes = messages.len() * SIGNATURE_LEN + path_nodes * NODE_LEN;
    let bytes = messages.iter().map(RekeyMessage::encoded_len).sum::<usize>() + auth_bytes;
    SignedMessages { messages: messages.len(), bytes, auth_bytes }
}

/// The root of the hash tree over `level` (docs/wire.md): pairs left to right, an odd last
/// node moves up.
fn hash_tree_root(mut level: Vec<Node>) -> Node {
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|pair| match pair {
                [left, right] => {
                    let digest = digest::digest(&digest::SHA256, &[&[INNER_PREFIX][..], left, right].concat());
                    digest.as_ref()[..NODE_LEN].try_into().expect("a digest is longer than a node")
                }
                [odd] => *odd,
                _ => unreachable!("chunks of two"),
            })
            .collect();
    }
    level[0]
}

/// Times `reps` leaves of `member` (each followed by its rejoin, timed separately) and
/// returns the median leave and the median join.
pub fn leave_and_rejoin(graph: &mut dyn KeyGraph, member: MemberId, reps: usize, finish: Finish, seed: &mut BatchSeed) -> (Cost, Cost) {
    let signer = sim_signer();
    let mut leaves = Vec::with_capacity(reps);
    let mut joins = Vec::with_capacity(reps);
    for _ in 0..reps {
        *seed = seed.next();
        leaves.push(rekey(graph, &Batch { joins: vec![], leaves: vec![member] }, seed, finish, &signer));
        *seed = seed.next();
        joins.push(rekey(graph, &Batch { joins: vec![member], leaves: vec![] }, seed, finish, &signer));
    }
    (median(leaves), median(joins))
}

/// The cost with the median time.
pub fn median(mut costs: Vec<Cost>) -> Cost {
    costs.sort_by_key(|c| c.time);
    costs[costs.len() / 2]
}

/// Median of `reps` timings of `f`.
pub fn median_time(reps: usize, mut f: impl FnMut()) -> Duration {
    middle(
        (0..reps)
            .map(|_| {
                let start = Instant::now();
                f();
                start.elapsed()
            })
            .collect(),
    )
}

/// The median of some timings (the upper one of an even count).
pub fn middle(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

pub fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
