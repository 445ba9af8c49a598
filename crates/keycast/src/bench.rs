#[cfg(feature = "mls-peer")]
mod mls;
mod floor;
mod load;
mod net;
mod restart;
pub mod simulated;

use std::hint::black_box;
use std::time::Duration;

use clap::Args;
use indicatif::ProgressBar;
use keycast_core::wire::{encode_rekey, PacketConfig, Placement, RekeyPacket};
use keycast_core::{Batch, BatchSeed, GraphConfig, JoinPolicy, KeyGraph, MemberId, MemberKeys, Scheme};
use serde_json::{json, Map, Value};

use crate::measure::{full_group, micros, middle, random_leavers, rekey, sim_signer, Cost, Finish, CONTEXT};
use floor::Floor;

#[derive(Args)]
pub struct BenchArgs {
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Small groups and few repetitions, for tests (not a measurement).
    #[arg(long, hide = true)]
    quick: bool,
    /// Profiling aid (mls-peer feature): only build the MLS peer's group of this many members
    /// and its remove commit many times, on a thread named `mls-remove`.
    #[arg(long = "mls-profile", hide = true, conflicts_with_all = ["net", "restart"])]
    mls_profile: Option<u64>,
    /// Measure the networked system on loopback instead: joins per second over TLS 1.3, and
    /// eviction-to-rekey latency in a group of 100,000.
    #[arg(long)]
    net: bool,
    /// Measure instead the controller's restart from its database: a group of 2^20 members
    /// after 1,000 epochs of churn (with --quick: 4,096 members, 100 epochs).
    #[arg(long, conflicts_with = "net")]
    restart: bool,
    /// With --net: a real controller process carrying this many members simulated by another
    /// process (refreshes and resyncs over UDP, joins and leaves over TLS, expiries, a restart).
    #[arg(long, requires = "net", value_parser = clap::value_parser!(u64).range(1..=(1 << 24)))]
    members: Option<u64>,
    /// With --members: each member refreshes once in this many seconds, spread evenly.
    #[arg(long = "refresh-s", default_value_t = 30, requires = "members")]
    refresh_s: u64,
    /// With --members: the controller's heartbeat interval.
    #[arg(long = "heartbeat-ms", default_value_t = 100, requires = "members")]
    heartbeat_ms: u64,
    /// With --members: forged refreshes a second sent beside the load for one refresh interval
    /// (0: none).
    #[arg(long = "flood-per-s", default_value_t = 0, requires = "members")]
    flood_per_s: u64,
}

const DEGREE: u32 = 4;

struct Sizes {
    big_log2: u32,
    leave_reps: usize,
    batch_reps: usize,
    peer_sizes: &'static [u64],
}

fn big_group(n: u64, quiet: bool) -> Result<Box<dyn KeyGraph>, String> {
    let config = GraphConfig { scheme: Scheme::Tree { degree: DEGREE }, join_policy: JoinPolicy::NewVersion };
    crate::sim::build_group(config, n, &mut BatchSeed::from_u64(1), quiet)
}

/// A rekey's median cost beside the median of its floors and of hashing its packets alone.
struct Measured {
    cost: Cost,
    floor: Duration,
    hashing: Duration,
    /// SHA-256 of every byte sent (bodies, signatures and paths), timed like `hashing`.
    wire_hashing: Duration,
}

impl Measured {
    fn ratio(&self) -> f64 {
        self.cost.time.as_secs_f64() / self.floor.as_secs_f64()
    }

    /// The authenticated floor: the wraps and signatures plus SHA-256 of every byte sent,
    /// which a design whose packets each verify alone cannot avoid.
    fn auth_floor(&self) -> Duration {
        self.floor + self.wire_hashing
    }

    fn auth_ratio(&self) -> f64 {
        self.cost.time.as_secs_f64() / self.auth_floor().as_secs_f64()
    }

    /// Hashing the packets alone, as a share of the floor.
    fn hashing_share(&self) -> f64 {
        self.hashing.as_secs_f64() / self.floor.as_secs_f64()
    }
}

/// `reps` times: `leavers` leave (timed, with the rekey packetised and signed as `placement`
/// says), then the floor of that rekey is timed (on every core if `parallel`), then the
/// leavers rejoin (untimed).
fn leave_against_floor(
    graph: &mut dyn KeyGraph,
    leavers: &[MemberId],
    reps: usize,
    placement: Placement,
    parallel: bool,
    seed: &mut BatchSeed,
    floor: &Floor,
) -> Measured {
    let signer = sim_signer();
    let mut costs = Vec::with_capacity(reps);
    let mut floors = Vec::with_capacity(reps);
    let mut hashing = Vec::with_capacity(reps);
    let mut wire_hashing = Vec::with_capacity(reps);
    for _ in 0..reps {
        *seed = seed.next();
        let cost = rekey(graph, &Batch { joins: vec![], leaves: leavers.to_vec() }, seed, Finish::Wire(placement), &signer);
        floors.push(if parallel { floor.time_parallel(cost.wraps, cost.signatures) } else { floor.time(cost.wraps, cost.signatures) });
        hashing.push(floor.hashing(cost.bytes - cost.auth_bytes, cost.packets, parallel));
        wire_hashing.push(floor.hashing(cost.bytes, cost.packets, parallel));
        costs.push(cost);
        *seed = seed.next();
        graph.apply(&Batch { joins: leavers.to_vec(), leaves: vec![] }, seed).expect("rejoin");
    }
    Measured { cost: crate::measure::median(costs), floor: middle(floors), hashing: middle(hashing), wire_hashing: middle(wire_hashing) }
}

/// A member verifying its packets of the batch and unwrapping its new keys.
/// Returns the median time and how many packets the member needed.
fn time_member(graph: &mut dyn KeyGraph, leavers: &[MemberId], reps: usize) -> (Duration, usize) {
    let stay = (0..).map(MemberId).find(|m| leavers.binary_search(m).is_err()).expect("a member stays");
    let (position, keys) = graph.member_keys(stay).expect("member");
    let before = MemberKeys::from_snapshot(position, keys, graph.group_key().0);
    let plan = graph.apply(&Batch { joins: vec![], leaves: leavers.to_vec() }, &BatchSeed::from_u64(77)).expect("leave");
    let signer = sim_signer();
    let rekey = encode_rekey(&plan, CONTEXT, PacketConfig::default(), &signer).expect("encode");
    // Tiered placement (the default at this size) puts a member's entries in at most two packets.
    let mine: Vec<&Vec<u8>> = rekey
        .packets
        .iter()
        .filter(|bytes| RekeyPacket::decode(bytes).is_ok_and(|p| before.has_entry(&p.message())))
        .collect();
    assert!((1..=2).contains(&mine.len()), "a member's entries are in one or two packets");
    let key = signer.verifying_key();
    let time = crate::measure::median_time(reps, || {
        let packets: Vec<RekeyPacket> = mine.iter().map(|bytes| RekeyPacket::verify(bytes, &key).expect("valid packet")).collect();
        let messages: Vec<_> = packets.iter().map(RekeyPacket::message).collect();
        let mut member = before.clone();
        black_box(member.apply(&messages).expect("member catches up"));
    });
    graph.apply(&Batch { joins: leavers.to_vec(), leaves: vec![] }, &BatchSeed::from_u64(78)).expect("rejoin");
    (time, mine.len())
}

fn mb(bytes: usize) -> f64 {
    bytes as f64 / 1e6
}

pub fn run(args: &BenchArgs) -> Result<(), String> {
    if let Some(members) = args.members {
        return load::run(&load::LoadOptions { members, refresh_s: args.refresh_s, heartbeat_ms: args.heartbeat_ms, flood_per_s: args.flood_per_s, json: args.json });
    }
    if args.net {
        return net::run(args.json, args.quick);
    }
    if let Some(n) = args.mls_profile {
        return mls_profile(n);
    }
    if args.restart {
        let sizes = match args.quick {
            true => restart::RestartSizes { members: 1 << 12, epochs: 100, churn: 4 },
            false => restart::RestartSizes { members: 1 << 20, epochs: 1_000, churn: 64 },
        };
        let report = restart::run(&sizes, args.json)?;
        println!("{}", if args.json { report.to_string() } else { restart::describe(&report) });
        return Ok(());
    }
    let sizes = if args.quick {
        Sizes { big_log2: 14, leave_reps: 21, batch_reps: 3, peer_sizes: &[100, 1000] }
    } else {
        Sizes { big_log2: 20, leave_reps: 401, batch_reps: 7, peer_sizes: &[100, 1000, 10_000] }
    };
    let quiet = args.json;
    let say = |line: String| {
        if !quiet {
            println!("{line}");
        }
    };
    let floor = Floor::new();
    let (wrap_ns, sign_us) = floor.unit_costs(if args.quick { 5 } else { 51 });
    let cores = rayon::current_num_threads();
    say(format!("floor            one wrap (AES-256-GCM, aws-lc-rs) {wrap_ns:.0} ns; one Ed25519 signature {sign_us:.1} us; {cores} threads"));
    say("                 (each floor below is those wraps and signatures alone, timed between the rekeys it is compared with)".into());
    let n = 1u64 << sizes.big_log2;
    let mut graph = big_group(n, quiet)?;
    let mut seed = BatchSeed::from_u64(5);
    let auto = Placement::Auto;
    let leave = leave_against_floor(graph.as_mut(), &[MemberId(n / 3)], sizes.leave_reps, auto, false, &mut seed, &floor);
    say(format!(
        "single leave     n = 2^{}, d = {DEGREE}: {:.1} us for {} wraps + {} signature, user-oriented in {} packets ({} bytes); floor {:.1} us; ratio {:.2}",
        sizes.big_log2, micros(leave.cost.time), leave.cost.wraps, leave.cost.signatures, leave.cost.packets, leave.cost.bytes, micros(leave.floor), leave.ratio()
    ));
    say(format!(
        "                 hashing those packets for their hash tree, alone: {:.1} us ({:.2} of the floor)",
        micros(leave.hashing), leave.hashing_share()
    ));
    say(format!(
        "                 authenticated floor (+ SHA-256 of all {} bytes sent): {:.1} us; ratio {:.2}",
        leave.cost.bytes, micros(leave.auth_floor()), leave.auth_ratio()
    ));
    let leavers = random_leavers(n, n / 10, 4);
    let batch = leave_against_floor(graph.as_mut(), &leavers, sizes.batch_reps, auto, true, &mut seed, &floor);
    say(format!(
        "10% batch        {} random leavers of 2^{}: {:.1} ms for {} wraps + {} signatures, tiered in {} packets ({:.1} MB); floor on {cores} cores {:.1} ms; ratio {:.2}",
        leavers.len(), sizes.big_log2, micros(batch.cost.time) / 1e3, batch.cost.wraps, batch.cost.signatures, batch.cost.packets, mb(batch.cost.bytes), micros(batch.floor) / 1e3, batch.ratio()
    ));
    say(format!(
        "                 hashing those packets for their hash trees, alone, on {cores} cores: {:.1} ms ({:.2} of the floor)",
        micros(batch.hashing) / 1e3, batch.hashing_share()
    ));
    say(format!(
        "                 authenticated floor (+ SHA-256 of all {:.1} MB sent) on {cores} cores: {:.1} ms; ratio {:.2}",
        mb(batch.cost.bytes), micros(batch.auth_floor()) / 1e3, batch.auth_ratio()
    ));
    let mut placements = Map::new();
    for (name, placement) in [("user-oriented", Placement::UserOriented), ("compact", Placement::Compact)] {
        let other = leave_against_floor(graph.as_mut(), &leavers, sizes.batch_reps.min(3), placement, true, &mut seed, &floor);
        say(format!(
            "  {name:<14} the same batch {}: {:.1} ms, {} packets ({:.1} MB), {} signatures; ratio {:.2}",
            if placement == Placement::Compact { "with each wrap once" } else { "with one packet per member" },
            micros(other.cost.time) / 1e3, other.cost.packets, mb(other.cost.bytes), other.cost.signatures, other.ratio()
        ));
        placements.insert(name.into(), json!({ "ms": micros(other.cost.time) / 1e3, "bytes": other.cost.bytes, "packets": other.cost.packets, "floor_ratio": other.ratio() }));
    }
    let member = time_member(graph.as_mut(), &leavers, if args.quick { 51 } else { 2001 });
    say(format!("member           verify its packets of that batch ({}) and unwrap its keys: {:.1} us", member.1, micros(member.0)));
    drop(graph);
    let peer = peer(&sizes, &floor, args.quick, quiet, &say)?;
    if args.json {
        let report = json!({
            "n": n, "degree": DEGREE, "threads": cores, "allocator_purge_delay_ms": crate::allocator::purge_delay_ms(),
            "wrap_ns": wrap_ns, "sign_us": sign_us,
            "leave_us": micros(leave.cost.time), "leave_wraps": leave.cost.wraps, "leave_packets": leave.cost.packets,
            "leave_floor_us": micros(leave.floor), "leave_floor_ratio": leave.ratio(), "leave_hashing_us": micros(leave.hashing),
            "leave_auth_floor_us": micros(leave.auth_floor()), "leave_auth_floor_ratio": leave.auth_ratio(),
            "batch_leavers": leavers.len(), "batch_ms": micros(batch.cost.time) / 1e3, "batch_wraps": batch.cost.wraps,
            "batch_signatures": batch.cost.signatures, "batch_packets": batch.cost.packets, "batch_bytes": batch.cost.bytes,
            "batch_floor_ms": micros(batch.floor) / 1e3, "batch_floor_ratio": batch.ratio(), "batch_hashing_ms": micros(batch.hashing) / 1e3,
            "batch_auth_floor_ms": micros(batch.auth_floor()) / 1e3, "batch_auth_floor_ratio": batch.auth_ratio(),
            "batch_other_placements": placements,
            "member_us": micros(member.0), "member_packets": member.1,
            "keycast_remove_us": peer.keycast, "mls_remove_us": peer.mls, "mls_setup_s": peer.setup, "mls_ratio": peer.ratio,
            "mls_peer": peer.note,
        });
        println!("{report}");
    }
    Ok(())
}

/// keycast and MLS removing one member at the same n, keyed by n.
struct Peer {
    keycast: Map<String, Value>,
    mls: Map<String, Value>,
    setup: Map<String, Value>,
    ratio: Map<String, Value>,
    note: String,
}

fn peer(sizes: &Sizes, floor: &Floor, quick: bool, quiet: bool, say: &dyn Fn(String)) -> Result<Peer, String> {
    let mut out = Peer { keycast: Map::new(), mls: Map::new(), setup: Map::new(), ratio: Map::new(), note: String::new() };
    let bar = if quiet { ProgressBar::hidden() } else { ProgressBar::new_spinner() };
    bar.enable_steady_tick(Duration::from_millis(200));
    for &n in sizes.peer_sizes {
        let mut graph = full_group(Scheme::Tree { degree: DEGREE }, n, n);
        let leave = leave_against_floor(graph.as_mut(), &[MemberId(n * 2 / 3)], sizes.leave_reps, Placement::Auto, false, &mut BatchSeed::from_u64(n), floor);
        let keycast_us = micros(leave.cost.time);
        out.keycast.insert(n.to_string(), json!(keycast_us));
        let line = format!(
            "remove one       n = {n}: keycast {keycast_us:.1} us ({} wraps, {} signature, floor {:.1} us)",
            leave.cost.wraps, leave.cost.signatures, micros(leave.floor)
        );
        match mls_remove(n, quick, &bar)? {
            Some((setup, mls_us, detail)) => {
                bar.suspend(|| say(format!("{line}; mls-rs {mls_us:.1} us ({detail}; setup {setup:.1} s); ratio {:.0}x", mls_us / keycast_us)));
                out.mls.insert(n.to_string(), json!(mls_us));
                out.setup.insert(n.to_string(), json!(setup));
                out.ratio.insert(n.to_string(), json!(mls_us / keycast_us));
            }
            None => {
                bar.suspend(|| say(line));
                out.ratio.insert(n.to_string(), Value::Null);
            }
        }
    }
    bar.finish_and_clear();
    out.note = if cfg!(feature = "mls-peer") {
        "mls-rs with aws-lc-rs, suite CURVE25519_AES128; remove commit built from a group whose nodes on both paths are populated".into()
    } else {
        "not built: cargo run --release -p keycast --features mls-peer -- bench".into()
    };
    if !cfg!(feature = "mls-peer") {
        say(format!("mls-rs peer      {}", out.note));
    }
    Ok(out)
}

#[cfg(feature = "mls-peer")]
fn mls_remove(n: u64, quick: bool, bar: &ProgressBar) -> Result<Option<(f64, f64, String)>, String> {
    let result = mls::remove_one(n, if quick { 3 } else { 21 }, bar)?;
    let detail = format!("{} updates to populate the tree, commit {} bytes", result.committers, result.commit_bytes);
    Ok(Some((result.setup.as_secs_f64(), micros(result.remove), detail)))
}

/// The removes of `--mls-profile` (about 10 s at n = 10,000 beside its setup).
#[cfg(feature = "mls-peer")]
fn mls_profile(n: u64) -> Result<(), String> {
    const REPS: usize = 500;
    let median = mls::profile_remove(n, REPS)?;
    println!("mls-rs n = {n}: {REPS} removes built on thread mls-remove, median {:.1} us", micros(median));
    Ok(())
}

#[cfg(not(feature = "mls-peer"))]
fn mls_profile(_: u64) -> Result<(), String> {
    Err("--mls-profile needs the mls-peer feature".into())
}

#[cfg(not(feature = "mls-peer"))]
fn mls_remove(_: u64, _: bool, _: &ProgressBar) -> Result<Option<(f64, f64, String)>, String> {
    Ok(None)
}
