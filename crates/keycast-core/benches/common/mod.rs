//! Helpers shared by the benches: a full group of 2^20 members and random leavers.

use keycast_core::{new_graph, Batch, BatchSeed, GraphConfig, JoinPolicy, KeyGraph, MemberId};
use rand_chacha::ChaCha8Rng;
use rand_core::Rng;

pub const N: u64 = 1 << 20;
pub const DEGREE: u32 = 4;

pub fn full_group() -> Box<dyn KeyGraph> {
    let config = GraphConfig { scheme: keycast_core::Scheme::Tree { degree: DEGREE }, join_policy: JoinPolicy::NewVersion };
    let mut graph = new_graph(config, &BatchSeed::from_u64(1)).unwrap();
    graph.apply(&Batch { joins: (0..N).map(MemberId).collect(), leaves: vec![] }, &BatchSeed::from_u64(2)).unwrap();
    graph
}

pub fn random_leavers(count: usize, rng: &mut ChaCha8Rng) -> Vec<MemberId> {
    let mut chosen = std::collections::HashSet::with_capacity(count);
    while chosen.len() < count {
        chosen.insert(MemberId(rng.next_u64() % N));
    }
    let mut leavers: Vec<MemberId> = chosen.into_iter().collect();
    leavers.sort();
    leavers
}

