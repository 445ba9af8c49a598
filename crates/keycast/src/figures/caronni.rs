//! Caronni et al. 3.3: the flat table against a tree, rekey size per leave and controller
//! storage against group size.

use keycast_core::wire::Placement;
use keycast_core::{Batch, BatchSeed, Scheme};
use rayon::prelude::*;

use super::{at_every_n, Figure, Progress, Scale, Series};
use crate::measure::{flat, full_group, random_leavers, rekey, sim_signer, Finish};

/// ID bits of the flat table: room for 2^20 members, the largest group measured.
const ID_BITS: u8 = 20;
const LEAVES: u64 = 3;

/// One scheme at one n: (wire entries per leave, bytes per leave, shared keys, all keys).
type Values = (f64, f64, f64, f64);

struct Point {
    n: f64,
    /// Per scheme (flat, tree).
    values: [Values; 2],
}

fn measure(n: u64) -> Point {
    let schemes = [flat(ID_BITS), Scheme::Tree { degree: 4 }];
    let mut values = [(0.0, 0.0, 0.0, 0.0); 2];
    for (slot, scheme) in values.iter_mut().zip(schemes) {
        let mut graph = full_group(scheme, n, 31);
        let stats = graph.stats();
        let (mut entries, mut bytes) = (0.0, 0.0);
        for (i, leaver) in random_leavers(n, LEAVES, n).into_iter().enumerate() {
            let seed = BatchSeed::from_u64(100 + 2 * i as u64);
            let cost = rekey(graph.as_mut(), &Batch { joins: vec![], leaves: vec![leaver] }, &seed, Finish::Wire(Placement::Compact), &sim_signer());
            entries += cost.wraps as f64;
            bytes += cost.bytes as f64;
            let seed = BatchSeed::from_u64(101 + 2 * i as u64);
            graph.apply(&Batch { joins: vec![leaver], leaves: vec![] }, &seed).expect("rejoin");
        }
        let shared = (stats.stored_keys - stats.members) as f64;
        *slot = (entries / LEAVES as f64, bytes / LEAVES as f64, shared, stats.stored_keys as f64);
    }
    Point { n: n as f64, values }
}

fn series(points: &[Point], pick: fn(&Values) -> f64) -> Vec<Series> {
    ["flat (20-bit IDs)", "tree d = 4"]
        .iter()
        .enumerate()
        .map(|(i, name)| Series::new(*name, points.iter().map(|p| (p.n, pick(&p.values[i]).max(1.0))).collect()))
        .collect()
}

fn figure(stem: &str, title: &str, y_label: &str, series: Vec<Series>) -> Figure {
    Figure { log_x: true, log_y: true, ..Figure::new(stem, title, "group size n", y_label, series) }
}

/// Figures 5a (entries per leave), 5b (bytes per leave) and 5c (storage).
pub fn flat_vs_tree(scale: Scale, progress: &Progress) -> Vec<Figure> {
    let sizes: Vec<u64> = (5..=scale.max_log2).rev().map(|b| 1u64 << b).collect();
    progress.stage("Caronni: flat table against tree", sizes.len());
    let mut points: Vec<Point> = sizes
        .par_iter()
        .map(|&n| {
            let point = measure(n);
            progress.tick();
            point
        })
        .collect();
    points.sort_by(|a, b| a.n.total_cmp(&b.n));
    let (first, last) = (&points[0], &points[points.len() - 1]);
    let flat = |pick: fn(&Values) -> f64| points.iter().map(|p| pick(&p.values[0])).collect::<Vec<f64>>();
    let mut entries = figure("fig5a_caronni_entries_per_leave", "5a. Rekey entries per leave vs group size: flat table vs tree", "entries per leave", series(&points, |v| v.0));
    entries.paper = "Caronni et al. 3.3: a flat leave costs 2·I entries (I ID bits) whatever the group size; a tree leave d·log_d n.".into();
    entries.measured = format!(
        "flat {}; tree {:.0} at n = {} to {:.0} at n = {}.",
        at_every_n(&flat(|v| v.0), "entries"), first.values[1].0, first.n, last.values[1].0, last.n
    );
    let mut bytes = figure("fig5b_caronni_bytes_per_leave", "5b. Rekey bytes per leave vs group size (signed packets, each wrap once)", "bytes per leave", series(&points, |v| v.1));
    bytes.paper = "Caronni et al. 3.3: flat messages are constant in n.".into();
    bytes.measured = format!("flat {}; tree {:.0} to {:.0} bytes.", at_every_n(&flat(|v| v.1), "bytes"), first.values[1].1, last.values[1].1);
    let mut storage = figure("fig5c_caronni_storage", "5c. Controller storage vs group size: shared keys (and all keys)", "keys stored by the controller", {
        let mut s = series(&points, |v| v.2);
        s.iter_mut().for_each(|s| s.name.push_str(", shared keys"));
        s.extend(series(&points, |v| v.3).into_iter().map(|mut s| {
            s.name.push_str(", with individual keys");
            s
        }));
        s
    });
    storage.paper = "Caronni et al. 3.3: the flat table holds 2·I + 1 shared keys whatever n; a tree about n/(d-1) internal keys (both also keep one individual key per member).".into();
    storage.measured = format!(
        "flat {}; tree {:.0} at n = {} to {:.0} at n = {}.",
        at_every_n(&flat(|v| v.2), "shared keys"), first.values[1].2, first.n, last.values[1].2, last.n
    );
    vec![entries, bytes, storage]
}
