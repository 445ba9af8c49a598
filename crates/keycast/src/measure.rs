//! What `sim figures` and `bench` measure: a full group, a timed rekey (planned, packaged,
//! optionally packetised and signed) and random leavers.

use std::time::{Duration, Instant};

use keycast_core::strategy::{package, package_size};
use keycast_core::wire::rekey::RekeyContext;
use keycast_core::wire::{encode_rekey, GroupId, PacketConfig, Placement, Signer};
use keycast_core::{new_graph, Batch, BatchSeed, GraphConfig, JoinPolicy, KeyGraph, MemberId, Scheme, Strategy};
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

/// A group of members 0..n, built in one batch (no progress bar: for groups up to ~10^6).
pub fn full_group(scheme: Scheme, n: u64, seed: u64) -> Box<dyn KeyGraph> {
    let config = GraphConfig { scheme, join_policy: JoinPolicy::NewVersion };
    let mut graph = new_graph(config, &BatchSeed::from_u64(seed)).expect("valid scheme");
    let joins = (0..n).map(MemberId).collect();
    graph.apply(&Batch { joins, leaves: vec![] }, &BatchSeed::from_u64(seed ^ 0x6a09)).expect("fresh members");
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
    Signer::from_seed(&[0x5a; 32])
}

pub const CONTEXT: RekeyContext = RekeyContext { group: GroupId(1), epoch: 1, seq: 1, activation: 2 };

/// How far a timed rekey goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// Plan and package with a strategy (Wong's server work without digests or signatures).
    Package(Strategy),
    /// Plan, package, then packetise and sign (one Ed25519 signature per block of packets).
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
            std::hint::black_box(package(&plan, strategy));
            let encoded = wire(Placement::default());
            (encoded.stats.bytes, Some(encoded))
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
