//! Wong, Gouda and Lam, section 6: the controller's time per join and per leave against group
//! size (their figure 10) and against tree degree (their figure 11), for the three rekeying
//! strategies, without and with signatures.

use keycast_core::{BatchSeed, MemberId, Scheme, Strategy};
use rayon::prelude::*;

use super::{Figure, Progress, Scale, Series};
use crate::measure::{full_group, leave_and_rejoin, micros, Finish};

const STRATEGIES: [(Strategy, &str); 3] =
    [(Strategy::GroupOriented, "group"), (Strategy::KeyOriented, "key"), (Strategy::UserOriented, "user")];
/// Wong's group size for the degree experiment.
const DEGREE_GROUP: u64 = 8192;

/// Median join and leave of one group, for each strategy unsigned then signed.
struct Point {
    x: f64,
    /// [signed as usize][strategy]: (leave µs, join µs)
    micros: [[(f64, f64); 3]; 2],
    leave_wraps: f64,
    join_wraps: f64,
}

fn measure(scheme: Scheme, n: u64, x: f64, reps: usize) -> Point {
    let mut graph = full_group(scheme, n, n);
    let member = MemberId(n / 3);
    let mut seed = BatchSeed::from_u64(n ^ 0x77);
    let mut point = Point { x, micros: [[(0.0, 0.0); 3]; 2], leave_wraps: 0.0, join_wraps: 0.0 };
    for signed in [false, true] {
        for (i, (strategy, _)) in STRATEGIES.iter().enumerate() {
            let finish = if signed { Finish::Signed(*strategy) } else { Finish::Package(*strategy) };
            let (leave, join) = leave_and_rejoin(graph.as_mut(), member, reps, finish, &mut seed);
            point.micros[signed as usize][i] = (micros(leave.time), micros(join.time));
            point.leave_wraps = leave.wraps as f64;
            point.join_wraps = join.wraps as f64;
        }
    }
    point
}

fn sweep(points: &[(Scheme, u64, f64)], reps: usize, progress: &Progress) -> Vec<Point> {
    points
        .par_iter()
        .map(|&(scheme, n, x)| {
            let point = measure(scheme, n, x, reps);
            progress.tick();
            point
        })
        .collect()
}

/// Time series per strategy: join and leave separately (`average` false) or their mean.
fn time_series(points: &[Point], signed: bool, average: bool) -> Vec<Series> {
    let mut series = Vec::new();
    for (i, (_, name)) in STRATEGIES.iter().enumerate() {
        let at = |p: &Point| p.micros[signed as usize][i];
        if average {
            series.push(Series::new(format!("{name}-oriented"), points.iter().map(|p| (p.x, (at(p).0 + at(p).1) / 2.0)).collect()));
        } else {
            series.push(Series::new(format!("leave, {name}-oriented"), points.iter().map(|p| (p.x, at(p).0)).collect()));
            series.push(Series::new(format!("join, {name}-oriented"), points.iter().map(|p| (p.x, at(p).1)).collect()));
        }
    }
    series
}

fn wrap_series(points: &[Point]) -> Vec<Series> {
    vec![
        Series::new("leave", points.iter().map(|p| (p.x, p.leave_wraps)).collect()),
        Series::new("join", points.iter().map(|p| (p.x, p.join_wraps)).collect()),
        Series::new("average", points.iter().map(|p| (p.x, (p.leave_wraps + p.join_wraps) / 2.0)).collect()),
    ]
}

fn figure(stem: &str, title: &str, x_label: &str, y_label: &str, log_x: bool, series: Vec<Series>) -> Figure {
    Figure { log_x, ..Figure::new(stem, title, x_label, y_label, series) }
}

/// Figure 1: time per join and leave against group size 2^5..2^max, degree 4.
pub fn by_size(scale: Scale, progress: &Progress) -> Vec<Figure> {
    let sizes: Vec<(Scheme, u64, f64)> =
        (5..=scale.max_log2).rev().map(|b| (Scheme::Tree { degree: 4 }, 1u64 << b, (1u64 << b) as f64)).collect();
    progress.stage("Wong: time against group size", sizes.len());
    let mut points = sweep(&sizes, scale.reps, progress);
    points.sort_by(|a, b| a.x.total_cmp(&b.x));
    let (first, last) = (&points[0], &points[points.len() - 1]);
    let growth = |signed: usize| {
        format!(
            "group-oriented leave {:.1} µs at n = {} to {:.1} µs at n = {} ({:.0} to {:.0} wraps)",
            first.micros[signed][0].0, first.x, last.micros[signed][0].0, last.x, first.leave_wraps, last.leave_wraps
        )
    };
    let mut unsigned = figure(
        "fig1a_wong_time_vs_size",
        "1a. Controller time per join / leave vs group size (d = 4, no signature)",
        "group size n",
        "µs per request (median)",
        true,
        time_series(&points, false, false),
    );
    unsigned.paper = "Wong et al. fig. 10 (left): time per request grows linearly with log n for all three strategies; group-oriented is cheapest.".into();
    unsigned.measured = format!("{}; {}; {}.", growth(0), log_n_growth(first, last), cheapest_strategy(&points));
    let mut signed = figure(
        "fig1b_wong_time_vs_size_signed",
        "1b. Controller time per join / leave vs group size (d = 4, each strategy's messages signed)",
        "group size n",
        "µs per request (median)",
        true,
        time_series(&points, true, false),
    );
    signed.paper = "Wong et al. fig. 10 (right): with MD5 + RSA-512 signing, one signature per request dominates (about 10x the unsigned time), still log n growth.".into();
    signed.measured = format!("{}; {}.", growth(1), signing_cost(&points, "n"));
    let mut wraps = figure(
        "fig1c_wong_wraps_vs_size",
        "1c. Wraps per join / leave vs group size (d = 4)",
        "group size n",
        "wraps",
        true,
        wrap_series(&points),
    );
    wraps.paper = "Wong et al. table 3: a leave costs d(h-1) encryptions, a join 2(h-1); both O(log n).".into();
    wraps.measured = format!(
        "leave {:.0} wraps at n = {} to {:.0} at n = {} ({}); join {:.0} to {:.0}.",
        first.leave_wraps, first.x, last.leave_wraps, last.x, full_tree_leaves(&points), first.join_wraps, last.join_wraps
    );
    vec![unsigned, signed, wraps]
}

/// How leave time grew against members and wraps, and whether that is log n growth: within
/// twice the growth of the wraps (which are d·h - 1) it follows log n, not n.
fn log_n_growth(first: &Point, last: &Point) -> String {
    let (members, time, wraps) = (last.x / first.x, last.micros[0][0].0 / first.micros[0][0].0, last.leave_wraps / first.leave_wraps);
    let trend = if time <= 2.0 * wraps { "it grows with its wraps, as log n" } else { "it grows faster than its wraps (log n)" };
    format!("{members:.0}x the members took {time:.1}x the time for {wraps:.1}x the wraps: {trend}")
}

/// At how many points each strategy is cheapest (unsigned join plus leave).
fn cheapest_strategy(points: &[Point]) -> String {
    let total = |p: &Point, i: usize| p.micros[0][i].0 + p.micros[0][i].1;
    let wins = |i: usize| points.iter().filter(|p| (0..STRATEGIES.len()).all(|j| total(p, i) <= total(p, j))).count();
    let counts: Vec<String> = STRATEGIES.iter().enumerate().map(|(i, (_, name))| format!("{name}-oriented at {}", wins(i))).collect();
    format!("cheapest strategy (join plus leave) at each of the {} sizes: {}", points.len(), counts.join(", "))
}

/// What signing adds to a leave, per strategy, at the first and last point (`x` names the axis).
fn signing_cost(points: &[Point], x: &str) -> String {
    let (first, last) = (&points[0], &points[points.len() - 1]);
    let added = |p: &Point, i: usize| p.micros[1][i].0 - p.micros[0][i].0;
    let parts: Vec<String> = STRATEGIES
        .iter()
        .enumerate()
        .map(|(i, (_, name))| format!("{name}-oriented {:.1} µs at {x} = {} and {:.1} µs at {x} = {}", added(first, i), first.x, added(last, i), last.x))
        .collect();
    let (low, high) = (added(first, 0).min(added(last, 0)), added(first, 0).max(added(last, 0)));
    let trend = if high <= 2.0 * low { "about constant for one message" } else { "not constant even for one message" };
    format!("signing adds to a leave: {} ({trend})", parts.join("; "))
}

/// Whether every full tree (n = 4^h) measured pays d·h - 1 wraps per leave.
fn full_tree_leaves(points: &[Point]) -> String {
    let full: Vec<&Point> = points.iter().filter(|p| (p.x as u64).trailing_zeros() % 2 == 0).collect();
    let height = |p: &Point| f64::from((p.x as u64).trailing_zeros() / 2);
    match full.iter().find(|p| p.leave_wraps != 4.0 * height(p) - 1.0) {
        None => format!("d·h - 1 at each of the {} full trees, n = 4^h", full.len()),
        Some(p) => format!("not d·h - 1 at n = {}: {:.0} wraps", p.x, p.leave_wraps),
    }
}

/// The x (degree) with the least y.
pub fn argmin(series: &Series) -> f64 {
    series.points.iter().min_by(|a, b| a.1.total_cmp(&b.1)).map(|p| p.0).unwrap_or(f64::NAN)
}

/// Figure 2: time per request against tree degree 2..16 at n = 8192.
pub fn by_degree(scale: Scale, progress: &Progress) -> Vec<Figure> {
    let degrees: Vec<(Scheme, u64, f64)> = (2..=16u32).map(|d| (Scheme::Tree { degree: d }, DEGREE_GROUP, d as f64)).collect();
    progress.stage("Wong: time against degree", degrees.len());
    let points = sweep(&degrees, scale.reps, progress);
    let title = |what: &str| format!("2{what} at n = {DEGREE_GROUP}");
    let mut unsigned = figure(
        "fig2a_wong_time_vs_degree",
        &title("a. Average controller time per request vs tree degree (no signature),"),
        "tree degree d",
        "µs per request (mean of join and leave)",
        false,
        time_series(&points, false, true),
    );
    let mut signed = figure(
        "fig2b_wong_time_vs_degree_signed",
        &title("b. Average controller time per request vs tree degree (each strategy's messages signed),"),
        "tree degree d",
        "µs per request (mean of join and leave)",
        false,
        time_series(&points, true, true),
    );
    let mut wraps = figure(
        "fig2c_wong_wraps_vs_degree",
        &title("c. Wraps per request vs tree degree,"),
        "tree degree d",
        "wraps",
        false,
        wrap_series(&points),
    );
    let best_time = argmin(&unsigned.series[0]);
    let best_signed = argmin(&signed.series[0]);
    let best_wraps = argmin(&wraps.series[2]);
    unsigned.paper = "Wong et al. fig. 11: the optimal key tree degree is around four (their analysis of a full balanced tree gives the same).".into();
    unsigned.measured = format!("fastest degree (group-oriented): d = {best_time}.");
    signed.paper = "Wong et al. fig. 11 (right): signing adds an order of magnitude; the optimum stays near 4.".into();
    signed.measured = format!("fastest degree (group-oriented, signed): d = {best_signed}; {}.", signing_cost(&points, "d"));
    wraps.paper = "Wong et al. 4: a leave costs about d·log_d n encryptions and a join about 2·log_d n; the average server cost is least at d = 4.".into();
    wraps.measured = format!("fewest wraps per request (mean of join and leave): d = {best_wraps}.");
    vec![unsigned, signed, wraps]
}
