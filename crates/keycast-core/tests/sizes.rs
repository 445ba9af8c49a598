//! Rekey sizes that must match the papers exactly.

use keycast_core::{new_graph, Batch, BatchSeed, FlatIds, GraphConfig, JoinPolicy, KeyGraph, MemberId, Scheme};

fn full_group(scheme: Scheme, members: u64) -> Box<dyn KeyGraph> {
    let config = GraphConfig { scheme, join_policy: JoinPolicy::NewVersion };
    let mut graph = new_graph(config, &BatchSeed::from_u64(1)).unwrap();
    let joins = (0..members).map(MemberId).collect();
    graph.apply(&Batch { joins, leaves: vec![] }, &BatchSeed::from_u64(2)).unwrap();
    graph
}

fn leave(graph: &mut dyn KeyGraph, members: impl IntoIterator<Item = u64>) -> usize {
    let leaves = members.into_iter().map(MemberId).collect();
    graph.apply(&Batch { joins: vec![], leaves }, &BatchSeed::from_u64(3)).unwrap().wraps.len()
}

/// Wong et al.: one leave from a full tree of degree d and height h costs d*h - 1 wraps.
#[test]
fn single_leave_from_full_tree_costs_dh_minus_one() {
    for degree in 2u32..=6 {
        for height in 1u32..=5 {
            let n = (degree as u64).pow(height);
            if n > 20_000 {
                continue;
            }
            for leaver in [0, n / 2, n - 1] {
                let mut graph = full_group(Scheme::Tree { degree }, n);
                assert_eq!(graph.stats().height, height);
                let wraps = leave(graph.as_mut(), [leaver]);
                assert_eq!(wraps as u32, degree * height - 1, "d={degree} h={height} leaver={leaver}");
            }
        }
    }
}

/// Mukkamalla and Katz 5.1: k leavers spread evenly over a full tree (k <= N/d) cost
/// d/(d-1) (d d^b - 1) + d k (log_d N - b - 2) + k (d - 1), with b = floor(log_d k).
fn closed_form(degree: u64, height: u64, k: u64) -> u64 {
    let (d, h, k) = (degree as i64, height as i64, k as i64);
    let b = (0..).take_while(|&e| d.pow(e + 1) <= k).count() as i64;
    let top = d * (d.pow(b as u32 + 1) - 1) / (d - 1);
    (top + d * k * (h - b - 2) + k * (d - 1)) as u64
}

#[test]
fn evenly_spread_leavers_cost_the_closed_form() {
    for (degree, height) in [(2u64, 10u32), (3, 7), (4, 6), (5, 5), (8, 4)] {
        let n = degree.pow(height);
        for k in [1, 2, 3, degree, degree + 1, degree * degree - 1, 2 * degree * degree, n / degree / 2, n / degree] {
            if k == 0 || k > n / degree {
                continue;
            }
            let mut graph = full_group(Scheme::Tree { degree: degree as u32 }, n);
            let wraps = leave(graph.as_mut(), (0..k).map(|i| i * n / k));
            assert_eq!(wraps as u64, closed_form(degree, height as u64, k), "d={degree} h={height} k={k}");
        }
    }
}

/// Caronni et al. 3.3: a flat leave with I-bit IDs costs 2*I entries whatever the group size.
#[test]
fn flat_leave_costs_two_entries_per_id_bit() {
    for id_bits in [4u8, 10, 16, 32] {
        for n in [2u64, 16, 300] {
            if n > 1 << id_bits.min(20) {
                continue;
            }
            let mut graph = full_group(Scheme::Flat { id_bits, ids: FlatIds::Sequential }, n);
            assert_eq!(leave(graph.as_mut(), [n / 2]), 2 * id_bits as usize, "I={id_bits} n={n}");
        }
    }
}

/// A star (Wong) replaces the group key under every remaining individual key.
#[test]
fn star_leave_costs_one_wrap_per_remaining_member() {
    let mut graph = full_group(Scheme::Star, 100);
    assert_eq!(leave(graph.as_mut(), [7, 8, 9]), 97);
}

/// Wong's join: revision-only joins send nothing to existing members; new-version joins
/// cost one wrap per changed key for them, plus the joiner's path.
#[test]
fn join_costs_follow_policy() {
    let degree = 4u32;
    for (policy, expected) in [(JoinPolicy::Revision, 3usize), (JoinPolicy::NewVersion, 6)] {
        let config = GraphConfig { scheme: Scheme::Tree { degree }, join_policy: policy };
        let mut graph = new_graph(config, &BatchSeed::from_u64(1)).unwrap();
        let joins = (0..63).map(MemberId).collect();
        graph.apply(&Batch { joins, leaves: vec![] }, &BatchSeed::from_u64(2)).unwrap();
        let plan = graph.apply(&Batch { joins: vec![MemberId(63)], leaves: vec![] }, &BatchSeed::from_u64(3)).unwrap();
        // Height 3: the joiner needs 3 keys wrapped along its path; NewVersion adds 3 under old keys.
        assert_eq!(plan.wraps.len(), expected, "{policy:?}");
    }
}
