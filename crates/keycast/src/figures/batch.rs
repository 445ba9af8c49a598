//! Batch rekeying: Mukkamalla and Katz's figures 7 to 11 (many leavers in one epoch), wraps
//! by scheme against batch size, and the GSM paper's rekey-per-request against per-interval.

use keycast_core::wire::Placement;
use keycast_core::{Batch, BatchSeed, KeyGraph, MemberId, Scheme, Strategy};
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};
use rayon::prelude::*;

use super::{mean, y_at, Figure, Progress, Scale, Series};
use crate::measure::{full_group, micros, random_leavers, rekey, sim_signer, Cost, Finish};

/// Mukkamalla and Katz's group size.
const MK_GROUP: u64 = 2000;
const MK_DEGREES: [u32; 3] = [2, 3, 4];

/// One batch of `leavers` leaving a fresh full group.
fn leave_batch(scheme: Scheme, n: u64, leavers: Vec<MemberId>, finish: Finish) -> Cost {
    let mut graph = full_group(scheme, n, 11);
    rekey(graph.as_mut(), &Batch { joins: vec![], leaves: leavers }, &BatchSeed::from_u64(12), finish, &sim_signer())
}

fn thin(values: Vec<u64>, every: usize) -> Vec<u64> {
    let last = *values.last().expect("non-empty");
    let mut kept: Vec<u64> = values.into_iter().step_by(every).collect();
    if kept.last() != Some(&last) {
        kept.push(last);
    }
    kept
}

/// Mukkamalla and Katz 5.1: worst-case entries for k evenly spread leavers (k <= N/d).
pub fn closed_form(d: f64, n: f64, k: f64) -> f64 {
    let b = (k.ln() / d.ln() + 1e-9).floor();
    d / (d - 1.0) * (d * d.powf(b) - 1.0) + d * k * (n.ln() / d.ln() - b - 2.0) + k * (d - 1.0)
}

/// Means over random batches of one degree and batch size.
#[derive(Clone, Copy)]
struct Means {
    entries: f64,
    bytes: f64,
    micros: f64,
    packets: f64,
}

/// Mean costs of random batches, per degree and batch size.
struct Sweep {
    ks: Vec<u64>,
    /// [degree index][k index]
    means: Vec<Vec<Means>>,
}

fn mk_sweep(scale: Scale, progress: &Progress) -> Sweep {
    let mut ks: Vec<u64> = (1..10).chain((10..200).step_by(10)).chain((200..=1950).step_by(50)).collect();
    ks.push(1990);
    let mut ks = thin(ks, scale.thin);
    // The papers quote 100 leavers (5%); k = 2 is where the closed form is furthest from
    // evenly spread leavers at this n. Always measure both.
    for k in [2, 100] {
        if let Err(at) = ks.binary_search(&k) {
            ks.insert(at, k);
        }
    }
    let jobs: Vec<(usize, usize)> = (0..MK_DEGREES.len()).flat_map(|d| (0..ks.len()).map(move |k| (d, k))).collect();
    progress.stage("Mukkamalla and Katz: leavers per epoch", jobs.len());
    let results: Vec<Means> = jobs
        .par_iter()
        .map(|&(d, k)| {
            let scheme = Scheme::Tree { degree: MK_DEGREES[d] };
            let costs: Vec<Cost> = (0..scale.runs as u64)
                .map(|run| leave_batch(scheme, MK_GROUP, random_leavers(MK_GROUP, ks[k], run * 7919 + ks[k]), Finish::Wire(Placement::Auto)))
                .collect();
            progress.tick();
            let of = |f: fn(&Cost) -> f64| mean(&costs.iter().map(f).collect::<Vec<_>>());
            Means { entries: of(|c| c.wraps as f64), bytes: of(|c| c.bytes as f64), micros: of(|c| micros(c.time)), packets: of(|c| c.packets as f64) }
        })
        .collect();
    let means = results.chunks(ks.len()).map(<[_]>::to_vec).collect();
    Sweep { ks, means }
}

fn sweep_series(sweep: &Sweep, pick: fn(&Means) -> f64, up_to: u64) -> Vec<Series> {
    MK_DEGREES
        .iter()
        .zip(&sweep.means)
        .map(|(d, means)| {
            let points = sweep.ks.iter().zip(means).filter(|(k, _)| **k <= up_to).map(|(k, m)| (*k as f64, pick(m))).collect();
            Series::new(format!("d = {d}, random leavers (mean of runs)"), points)
        })
        .collect()
}

/// The degree-2 worst case: the closed form, and keycast's wraps for evenly spread leavers.
fn worst_case(ks: &[u64], up_to: u64) -> Vec<Series> {
    let ks: Vec<u64> = ks.iter().copied().filter(|&k| k <= (MK_GROUP / 2).min(up_to)).collect();
    let even: Vec<(f64, f64)> = ks
        .par_iter()
        .map(|&k| {
            let leavers = (0..k).map(|i| MemberId(i * MK_GROUP / k)).collect();
            (k as f64, leave_batch(Scheme::Tree { degree: 2 }, MK_GROUP, leavers, Finish::Package(Strategy::GroupOriented)).wraps as f64)
        })
        .collect();
    vec![
        Series::reference("d = 2, worst-case closed form (5.1)", ks.iter().map(|&k| (k as f64, closed_form(2.0, MK_GROUP as f64, k as f64))).collect()),
        Series::new("d = 2, evenly spread leavers (measured)", even),
    ]
}

/// Figures 3a-3d and 4: Mukkamalla and Katz's figures 7 to 11 at n = 2000.
pub fn mukkamalla(scale: Scale, progress: &Progress) -> Vec<Figure> {
    let sweep = mk_sweep(scale, progress);
    let tenth = MK_GROUP / 10;
    let mut entries = sweep_series(&sweep, |m| m.entries, MK_GROUP);
    entries.extend(worst_case(&sweep.ks, MK_GROUP));
    let mut zoom = sweep_series(&sweep, |m| m.entries, tenth);
    zoom.extend(worst_case(&sweep.ks, tenth));
    let at = |series: &Series, k: u64| y_at(series, k as f64);
    let mut fig_entries = Figure::new("fig3a_mk_entries", "3a. Rekey entries vs members leaving in one epoch (n = 2000)", "members leaving", "entries (wraps)", entries);
    let peak = fig_entries.series[0].points.iter().max_by(|a, b| a.1.total_cmp(&b.1)).copied().unwrap_or_default();
    fig_entries.paper = "Mukkamalla and Katz figs. 7 and 9: almost linear while under ~5% leave, then slower growth, then smaller as whole subtrees empty; random leavers stay below the evenly spread worst case.".into();
    fig_entries.measured = format!(
        "d = 2: {:.0} entries for 100 leavers, peak {:.0} at {} leavers, {}; {}; {}.",
        at(&fig_entries.series[0], 100), peak.1, peak.0, after_peak(&fig_entries.series[0], peak),
        random_against_even(&fig_entries.series[0], &fig_entries.series[4]),
        closed_form_gap(&fig_entries.series[4], &fig_entries.series[3])
    );
    let mut fig_zoom = Figure::new("fig3b_mk_entries_10pct", "3b. Rekey entries, up to 10% leaving (n = 2000)", "members leaving", "entries (wraps)", zoom);
    fig_zoom.paper = "Mukkamalla and Katz figs. 8 and 10: the same up to 10% of the group; nearly linear.".into();
    fig_zoom.measured = format!(
        "d = 2/3/4 at 100 leavers: {:.0} / {:.0} / {:.0} entries (worst case d = 2: {:.0}).",
        at(&fig_zoom.series[0], 100), at(&fig_zoom.series[1], 100), at(&fig_zoom.series[2], 100), at(&fig_zoom.series[3], 100)
    );
    let bytes = sweep_series(&sweep, |m| m.bytes, MK_GROUP);
    let mut fig_bytes = Figure::new("fig3c_mk_bytes", "3c. Rekey bytes on the wire vs members leaving (n = 2000, signed packets)", "members leaving", "bytes", bytes);
    fig_bytes.paper = "Mukkamalla and Katz 5.2: 5% of 2000 leaving gives rekeys of about 20 KB (24-byte DES entries, one RSA signature).".into();
    fig_bytes.measured = format!(
        "100 leavers: {:.1} / {:.1} / {:.1} KB for d = 2/3/4 (73-byte AES-GCM entries, 64-byte signature and hash path per packet); {}.",
        at(&fig_bytes.series[0], 100) / 1e3, at(&fig_bytes.series[1], 100) / 1e3, at(&fig_bytes.series[2], 100) / 1e3,
        placement_switch(&sweep)
    );
    let times = sweep_series(&sweep, |m| m.micros, MK_GROUP);
    let mut fig_time = Figure::new("fig4_mk_time", "4. Controller time to build the rekey vs members leaving (n = 2000; plan, packetise, sign)", "members leaving", "µs per rekey (mean of runs)", times);
    fig_time.paper = "Mukkamalla and Katz fig. 11: roughly linear in the number leaving for small numbers; under 100 ms for 100 of 2000 (Pentium 200, RSA-512).".into();
    fig_time.measured = format!(
        "100 leavers: {:.0} / {:.0} / {:.0} µs for d = 2/3/4 (points measured {threads} at a time on {threads} threads: expect noise).",
        at(&fig_time.series[0], 100), at(&fig_time.series[1], 100), at(&fig_time.series[2], 100), threads = rayon::current_num_threads()
    );
    vec![fig_entries, fig_zoom, fig_bytes, fig_time]
}

/// What the series does after its peak.
fn after_peak(series: &Series, peak: (f64, f64)) -> String {
    let last = series.points.last().copied().unwrap_or(peak);
    if last.1 < peak.1 {
        format!("then falling to {:.0} at {} leavers", last.1, last.0)
    } else {
        "not falling after it".into()
    }
}

/// How often random leavers (mean of draws) cost more than evenly spread ones.
fn random_against_even(random: &Series, even: &Series) -> String {
    let compared: Vec<(f64, f64)> = even.points.iter().map(|&(k, e)| (y_at(random, k), e)).collect();
    let above = compared.iter().filter(|(r, e)| r > e).count();
    format!("random leavers cost more than evenly spread ones at {above} of the {} batch sizes compared", compared.len())
}

/// The largest relative gap between evenly spread leavers and the closed form.
fn closed_form_gap(even: &Series, closed: &Series) -> String {
    let gaps = even.points.iter().zip(&closed.points).map(|(&(k, e), &(_, c))| (k, (e - c).abs() / c));
    let (k, gap) = gaps.max_by(|a, b| a.1.total_cmp(&b.1)).unwrap_or_default();
    let exact = if (MK_GROUP as f64).log2().fract() == 0.0 { "a full tree" } else { "not a full tree, so the form is not exact here" };
    format!("evenly spread leavers are within {:.1}% of the closed form (largest gap at k = {k}; n = {MK_GROUP} is {exact})", 100.0 * gap)
}

/// Where d = 2's bytes first fall while its entries rise: auto placement leaving one packet
/// per member (up to 64 packets) for tiered placement.
fn placement_switch(sweep: &Sweep) -> String {
    let (ks, means) = (&sweep.ks, &sweep.means[0]);
    let peak = means.iter().zip(ks).max_by(|a, b| a.0.bytes.total_cmp(&b.0.bytes)).map(|(m, k)| (m.bytes, *k)).unwrap_or_default();
    let peak_text = format!("d = 2 peaks at {:.1} KB at {} leavers", peak.0 / 1e3, peak.1);
    let dip = (1..means.len()).find(|&i| means[i].bytes < means[i - 1].bytes && means[i].entries > means[i - 1].entries);
    match dip {
        Some(i) => format!(
            "{peak_text}; from {} to {} leavers its bytes fall from {:.1} to {:.1} KB while its entries rise, as its mean packets go from {:.0} to {:.0} and placement from one packet per member (up to 64 packets) to tiered",
            ks[i - 1], ks[i], means[i - 1].bytes / 1e3, means[i].bytes / 1e3, means[i - 1].packets, means[i].packets
        ),
        None => format!("{peak_text}; its bytes never fall while its entries rise"),
    }
}

/// Figure 6: wraps against batch size for n = 4096, degrees 2, 4, 16 and a star.
pub fn wraps_by_scheme(scale: Scale, progress: &Progress) -> Figure {
    const N: u64 = 4096;
    let schemes = [("d = 2", Scheme::Tree { degree: 2 }), ("d = 4", Scheme::Tree { degree: 4 }), ("d = 16", Scheme::Tree { degree: 16 }), ("star", Scheme::Star)];
    let mut ks: Vec<u64> = (0..12).map(|b| 1u64 << b).collect();
    ks.extend([3072, 3584, 3840, 3968, 4032, 4064, 4080, 4088, 4092, 4095]);
    let ks = thin(ks, scale.thin.min(2));
    let runs = scale.runs.min(5) as u64;
    let jobs: Vec<(usize, u64)> = (0..schemes.len()).flat_map(|s| ks.iter().map(move |&k| (s, k))).collect();
    progress.stage("batch rekeying by scheme", jobs.len());
    let wraps: Vec<f64> = jobs
        .par_iter()
        .map(|&(s, k)| {
            let finish = Finish::Package(Strategy::GroupOriented);
            let total: f64 = (0..runs).map(|run| leave_batch(schemes[s].1, N, random_leavers(N, k, run * 31 + k), finish).wraps as f64).sum();
            progress.tick();
            total / runs as f64
        })
        .collect();
    let series: Vec<Series> = schemes
        .iter()
        .zip(wraps.chunks(ks.len()))
        .map(|((name, _), w)| Series::new(*name, ks.iter().zip(w).map(|(k, w)| (*k as f64, w.max(0.5))).collect()))
        .collect();
    let star_fewest = |i: usize| series[..3].iter().all(|s| series[3].points[i].1 < s.points[i].1);
    // The first batch size from which the star needs the fewest wraps at every larger one.
    let star_wins = (0..ks.len()).rev().take_while(|&i| star_fewest(i)).last().map(|i| ks[i]);
    let mut fig = Figure::new("fig6_batch_wraps_by_scheme", "6. Wraps vs members leaving in one batch (n = 4096)", "members leaving (k)", "wraps (mean of random draws)", series);
    fig.log_x = true;
    fig.log_y = true;
    fig.paper = "Batch rekeying (Mukkamalla and Katz 5.1; Wong's star): a tree costs about d·k·log_d(n/k), a star n - k; for large batches the star wins.".into();
    fig.measured = match star_wins {
        Some(k) => format!("the star needs the fewest wraps from k = {k} of {N} leaving on; single leave: d = 2/4/16/star = {:.0}/{:.0}/{:.0}/{:.0} wraps.", fig.series[0].points[0].1, fig.series[1].points[0].1, fig.series[2].points[0].1, fig.series[3].points[0].1),
        None => "the star does not need the fewest wraps at the largest batch of this sweep.".into(),
    };
    fig
}

/// One interval's requests: leavers from the current members, then fresh joiners.
fn requests(members: &mut Vec<MemberId>, next_id: &mut u64, count: usize, rng: &mut ChaCha8Rng) -> Vec<Batch> {
    let mut batches = Vec::with_capacity(count);
    let mut joined = Vec::new();
    for i in 0..count {
        if i % 2 == 0 {
            let index = (rng.next_u64() % members.len() as u64) as usize;
            batches.push(Batch { joins: vec![], leaves: vec![members.swap_remove(index)] });
        } else {
            batches.push(Batch { joins: vec![MemberId(*next_id)], leaves: vec![] });
            joined.push(MemberId(*next_id));
            *next_id += 1;
        }
    }
    // Joiners of this interval can leave from the next one on.
    members.extend(joined);
    batches
}

/// Controller µs and wraps per request over `intervals` intervals of `count` requests.
fn per_request(scheme: Scheme, n: u64, count: usize, intervals: usize, batched: bool) -> (f64, f64) {
    let mut graph: Box<dyn KeyGraph> = full_group(scheme, n, 21);
    let mut members: Vec<MemberId> = (0..n).map(MemberId).collect();
    let (mut next_id, mut rng, mut seed) = (n, ChaCha8Rng::seed_from_u64(count as u64), BatchSeed::from_u64(22));
    let (mut time, mut wraps, signer) = (0.0, 0.0, sim_signer());
    for _ in 0..intervals {
        let singles = requests(&mut members, &mut next_id, count, &mut rng);
        let batches = if batched {
            vec![Batch { joins: singles.iter().flat_map(|b| b.joins.clone()).collect(), leaves: singles.iter().flat_map(|b| b.leaves.clone()).collect() }]
        } else {
            singles
        };
        for batch in batches {
            seed = seed.next();
            let cost = rekey(graph.as_mut(), &batch, &seed, Finish::Wire(Placement::Auto), &signer);
            time += micros(cost.time);
            wraps += cost.wraps as f64;
        }
    }
    let requests = (count * intervals) as f64;
    (time / requests, wraps / requests)
}

/// Figure 7: the GSM paper's individual rekeying (Iolus) against batch rekeying per interval.
pub fn gsm(scale: Scale, progress: &Progress) -> Vec<Figure> {
    const INTERVAL_S: f64 = 20.0;
    let groups = [("star, 30 members", Scheme::Star, 30u64), ("tree d = 4, 4096 members", Scheme::Tree { degree: 4 }, 4096)];
    let counts: Vec<u64> = thin((1..=15).map(|i| 4 * i).collect(), scale.thin);
    let intervals = scale.runs;
    let jobs: Vec<(usize, u64, bool)> =
        (0..groups.len()).flat_map(|g| counts.iter().flat_map(move |&c| [(g, c, false), (g, c, true)])).collect();
    progress.stage("GSM: rekey per request vs per interval", jobs.len());
    let results: Vec<(f64, f64)> = jobs
        .par_iter()
        .map(|&(g, count, batched)| {
            let result = per_request(groups[g].1, groups[g].2, count as usize, intervals, batched);
            progress.tick();
            result
        })
        .collect();
    let mut time_series = Vec::new();
    let mut wrap_series = Vec::new();
    for (job, result) in jobs.iter().zip(&results) {
        let name = format!("{}, {}", groups[job.0].0, if job.2 { "batched per 20 s interval" } else { "rekey per request" });
        let x = job.1 as f64 / INTERVAL_S;
        push_point(&mut time_series, &name, (x, result.0));
        push_point(&mut wrap_series, &name, (x, result.1));
    }
    let last = counts.last().copied().unwrap_or(0) as f64 / INTERVAL_S;
    let ratio = y_at(&time_series[0], last) / y_at(&time_series[1], last);
    let mut time = Figure::new("fig7a_gsm_time_per_request", "7a. Controller time per request vs request rate (GSM: per request vs per interval)", "requests per second (half joins, half leaves)", "µs per request", time_series);
    time.paper = "GSM paper fig. 6 (30 remaining members, 20 s interval, 3DES): batching a local group's requests over the rekey interval costs the manager less per request than Iolus's rekey per request, more so as requests grow.".into();
    time.measured = format!("at {last} requests/s the 30-member star costs {ratio:.1}x more per request when rekeyed per request than batched.");
    let mut wraps = Figure::new("fig7b_gsm_wraps_per_request", "7b. Wraps per request vs request rate (GSM: per request vs per interval)", "requests per second (half joins, half leaves)", "wraps per request", wrap_series);
    wraps.paper = "GSM paper 4: the advantage of batch rekeying is fewer rekeys for the same membership changes.".into();
    wraps.measured = format!(
        "at {last} requests/s: star {:.1} wraps per request individually vs {:.1} batched; tree {:.1} vs {:.1}.",
        y_at(&wraps.series[0], last), y_at(&wraps.series[1], last), y_at(&wraps.series[2], last), y_at(&wraps.series[3], last)
    );
    vec![time, wraps]
}

fn push_point(series: &mut Vec<Series>, name: &str, point: (f64, f64)) {
    match series.iter_mut().find(|s| s.name == name) {
        Some(s) => s.points.push(point),
        None => series.push(Series::new(name, vec![point])),
    }
}
