//! Iolus (and Mukkamalla and Katz 6.1): one tree against a hierarchy of S subgroups under
//! relays. A leave rekeys only its subgroup, so its rekey shrinks with n/S; the price is relay
//! work, one re-wrap of the message key per subgroup a data packet enters.

use keycast_core::wire::Placement;
use keycast_core::{Batch, BatchSeed, Scheme};
use rayon::prelude::*;

use super::{Figure, Progress, Scale, Series};
use crate::measure::{full_group, random_leavers, rekey, sim_signer, Finish};

const LEAVES: u64 = 3;
const SUBGROUPS: [u64; 2] = [16, 256];

/// Mean signed rekey bytes of one leave from a tree (d = 4) of `n` members.
fn leave_bytes(n: u64) -> f64 {
    let mut graph = full_group(Scheme::Tree { degree: 4 }, n, 47);
    let mut total = 0.0;
    for (i, leaver) in random_leavers(n, LEAVES, n).into_iter().enumerate() {
        let seed = BatchSeed::from_u64(300 + 2 * i as u64);
        total += rekey(graph.as_mut(), &Batch { joins: vec![], leaves: vec![leaver] }, &seed, Finish::Wire(Placement::Auto), &sim_signer()).bytes as f64;
        graph.apply(&Batch { joins: vec![leaver], leaves: vec![] }, &BatchSeed::from_u64(301 + 2 * i as u64)).expect("rejoin");
    }
    total / LEAVES as f64
}

/// Figures: rekey bytes per leave, and what each member receives per leave beside the relay
/// work per data packet, against group size.
pub fn hierarchy(scale: Scale, progress: &Progress) -> Vec<Figure> {
    let sizes: Vec<u64> = (scale.max_log2.saturating_sub(10).max(6)..=scale.max_log2).step_by(2).map(|b| 1u64 << b).collect();
    // Every group size the figure needs: n for the single tree, n / S for each hierarchy.
    let mut groups: Vec<u64> = sizes.iter().flat_map(|&n| std::iter::once(n).chain(SUBGROUPS.iter().map(move |s| n / s))).filter(|&m| m >= 4).collect();
    groups.sort_unstable();
    groups.dedup();
    progress.stage("Iolus: one tree against subgroups under relays", groups.len());
    let bytes: Vec<(u64, f64)> = groups
        .par_iter()
        .map(|&m| {
            let b = leave_bytes(m);
            progress.tick();
            (m, b)
        })
        .collect();
    let at = |m: u64| bytes.iter().find(|(g, _)| *g == m).map(|(_, b)| *b);
    let mut per_leave = vec![Series::new("one tree", sizes.iter().filter_map(|&n| Some((n as f64, at(n)?))).collect())];
    let mut per_member = vec![Series::new("one tree: bytes each member receives per leave", per_leave[0].points.clone())];
    for s in SUBGROUPS {
        let points: Vec<(f64, f64)> = sizes.iter().filter_map(|&n| Some((n as f64, at(n / s)?))).collect();
        // Only the leaver's subgroup (n / S of the n members) receives the rekey.
        per_member.push(Series::new(format!("S = {s}: bytes each member receives per leave (mean)"), points.iter().map(|&(n, b)| (n, b / s as f64)).collect()));
        per_member.push(Series { reference: true, ..Series::new(format!("S = {s}: relay re-wraps per data packet"), sizes.iter().map(|&n| (n as f64, s as f64)).collect()) });
        per_leave.push(Series::new(format!("S = {s} subgroups of n / {s}"), points));
    }
    let largest = *sizes.last().expect("sizes");
    let mut leave = Figure { log_x: true, log_y: true, ..Figure::new("iolus_leave_bytes", "Iolus: rekey bytes per leave, one tree against S subgroups under relays", "group size n", "signed rekey bytes per leave", per_leave) };
    leave.paper = "Iolus (Mittra 1997): a leave rekeys only its subgroup, so its cost depends on the subgroup's size, not the group's (the \"1 affects n\" problem).".into();
    leave.measured = format!(
        "at n = {largest}: one tree {:.0} bytes, S = 16 {:.0} bytes, S = 256 {:.0} bytes (trees of degree 4, signed packets).",
        at(largest).unwrap_or(f64::NAN), at(largest / 16).unwrap_or(f64::NAN), at(largest / 256).unwrap_or(f64::NAN)
    );
    let mut traffic = Figure { log_x: true, log_y: true, ..Figure::new("iolus_member_traffic", "Iolus trade-off: rekey bytes a member receives per leave, and relay re-wraps per data packet", "group size n", "bytes per member per leave; re-wraps per packet", per_member) };
    traffic.paper = "Iolus: local rekeys cut what every member receives; each data packet pays one re-wrap per subgroup it enters (Iolus measured about 450 µs a hop; keycast re-wraps the 32-byte message key only, about 0.4 µs).".into();
    traffic.measured = format!(
        "at n = {largest} a member receives {:.0} bytes per leave under one tree, {:.1} with S = 16, {:.2} with S = 256, against 16 and 256 re-wraps per data packet sent to the whole group.",
        at(largest).unwrap_or(f64::NAN), at(largest / 16).unwrap_or(f64::NAN) / 16.0, at(largest / 256).unwrap_or(f64::NAN) / 256.0
    );
    vec![leave, traffic]
}
