//! `keycast bench`: the rekey costs that matter, each beside its floor (what the wraps and
//! signatures alone cost with the chosen primitives, measured in the same run), and beside
//! the peer (MLS, with the `mls-peer` feature).

#[cfg(feature = "mls-peer")]
mod mls;
mod net;

use std::hint::black_box;
use std::time::Duration;

use clap::Args;
use indicatif::ProgressBar;
use keycast_core::key::Key;
use keycast_core::wire::{encode_rekey, GroupId, Heartbeat, PacketConfig, RekeyPacket};
use keycast_core::{Batch, BatchSeed, GraphConfig, JoinPolicy, KeyGraph, KeyId, KeyRef, MemberId, MemberKeys, Scheme, Wrap, Wrapper};
use serde_json::{json, Map, Value};

use crate::measure::{full_group, leave_and_rejoin, median, micros, random_leavers, rekey, sim_signer, Cost, Finish, CONTEXT};

#[derive(Args)]
pub struct BenchArgs {
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Small groups and few repetitions, for tests (not a measurement).
    #[arg(long, hide = true)]
    quick: bool,
    /// Measure the networked system on loopback instead: joins per second over TLS 1.3, and
    /// eviction-to-rekey latency in a group of 100,000.
    #[arg(long)]
    net: bool,
}

const DEGREE: u32 = 4;

struct Sizes {
    big_log2: u32,
    leave_reps: usize,
    batch_reps: usize,
    peer_sizes: &'static [u64],
}

/// The floor: one wrap and one signature.
struct Floor {
    wrap_ns: f64,
    sign_us: f64,
}

impl Floor {
    fn measure(reps: usize) -> Floor {
        let (kek, payload) = (Key::from_bytes([4; 32]), Key::from_bytes([3; 32]));
        let under = Wrapper::Key(KeyRef::new(KeyId(1), 1, 0));
        const WRAPS: u32 = 2000;
        let wraps = crate::measure::median_time(reps, || {
            for i in 0..WRAPS {
                black_box(Wrap::seal(&kek, under, KeyRef::new(KeyId(2), i + 2, 0), &payload));
            }
        });
        let signer = sim_signer();
        let beat = Heartbeat { group: GroupId(1), epoch: 1, seq: 1, rekey_seq: 1, active: KeyRef::new(KeyId(0), 1, 0), pending: None, group_size: 1, sent_ms: 0 };
        const SIGNS: u32 = 200;
        let signs = crate::measure::median_time(reps, || {
            for _ in 0..SIGNS {
                black_box(beat.sign(&signer));
            }
        });
        Floor { wrap_ns: wraps.as_secs_f64() * 1e9 / WRAPS as f64, sign_us: micros(signs) / SIGNS as f64 }
    }

    /// µs the wraps and signatures of `cost` take on one core.
    fn of(&self, cost: &Cost) -> f64 {
        cost.wraps as f64 * self.wrap_ns / 1e3 + cost.signatures as f64 * self.sign_us
    }
}

fn big_group(n: u64, quiet: bool) -> Result<Box<dyn KeyGraph>, String> {
    let config = GraphConfig { scheme: Scheme::Tree { degree: DEGREE }, join_policy: JoinPolicy::NewVersion };
    crate::sim::build_group(config, n, &mut BatchSeed::from_u64(1), quiet)
}

/// Median of `reps` batches of `leavers` leaving (each rejoining, untimed).
fn time_batch(graph: &mut dyn KeyGraph, leavers: &[MemberId], reps: usize, seed: &mut BatchSeed) -> Cost {
    let signer = sim_signer();
    let costs = (0..reps)
        .map(|_| {
            *seed = seed.next();
            let cost = rekey(graph, &Batch { joins: vec![], leaves: leavers.to_vec() }, seed, Finish::Wire, &signer);
            *seed = seed.next();
            graph.apply(&Batch { joins: leavers.to_vec(), leaves: vec![] }, seed).expect("rejoin");
            cost
        })
        .collect();
    median(costs)
}

/// A member verifying its packet of the batch and unwrapping its new keys.
fn time_member(graph: &mut dyn KeyGraph, leavers: &[MemberId], reps: usize) -> Duration {
    let stay = (0..).map(MemberId).find(|m| leavers.binary_search(m).is_err()).expect("a member stays");
    let (position, keys) = graph.member_keys(stay).expect("member");
    let before = MemberKeys::from_snapshot(position, keys, graph.group_key().0);
    let plan = graph.apply(&Batch { joins: vec![], leaves: leavers.to_vec() }, &BatchSeed::from_u64(77)).expect("leave");
    let signer = sim_signer();
    let rekey = encode_rekey(&plan, CONTEXT, PacketConfig::default(), &signer).expect("encode");
    let mine = rekey
        .packets
        .iter()
        .find(|bytes| RekeyPacket::decode(bytes).is_ok_and(|p| p.wraps.iter().any(|w| before.keyring().wrapping_key(&w.under).is_some())))
        .expect("a packet for the member");
    let key = signer.verifying_key();
    let time = crate::measure::median_time(reps, || {
        let packet = RekeyPacket::verify(mine, &key).expect("valid packet");
        let mut member = before.clone();
        black_box(member.apply(&[packet.message()]).expect("member catches up"));
    });
    graph.apply(&Batch { joins: leavers.to_vec(), leaves: vec![] }, &BatchSeed::from_u64(78)).expect("rejoin");
    time
}

pub fn run(args: &BenchArgs) -> Result<(), String> {
    if args.net {
        return net::run(args.json, args.quick);
    }
    let sizes = if args.quick {
        Sizes { big_log2: 14, leave_reps: 21, batch_reps: 2, peer_sizes: &[100, 1000] }
    } else {
        Sizes { big_log2: 20, leave_reps: 401, batch_reps: 7, peer_sizes: &[100, 1000, 10_000] }
    };
    let quiet = args.json;
    let say = |line: String| {
        if !quiet {
            println!("{line}");
        }
    };
    let floor = Floor::measure(if args.quick { 5 } else { 51 });
    let cores = rayon::current_num_threads() as f64;
    say(format!("floor            one wrap (AES-256-GCM, aws-lc-rs) {:.0} ns; one Ed25519 signature {:.1} us; {cores} threads", floor.wrap_ns, floor.sign_us));
    let n = 1u64 << sizes.big_log2;
    let mut graph = big_group(n, quiet)?;
    let mut seed = BatchSeed::from_u64(5);
    let (leave, _) = leave_and_rejoin(graph.as_mut(), MemberId(n / 3), sizes.leave_reps, Finish::Wire, &mut seed);
    let leave_floor = floor.of(&leave);
    let leave_us = micros(leave.time);
    say(format!(
        "single leave     n = 2^{}, d = {DEGREE}: {leave_us:.1} us for {} wraps + {} signature, packetised ({} bytes); floor {leave_floor:.1} us; ratio {:.2}",
        sizes.big_log2, leave.wraps, leave.signatures, leave.bytes, leave_us / leave_floor
    ));
    let leavers = random_leavers(n, n / 10, 4);
    let batch = time_batch(graph.as_mut(), &leavers, sizes.batch_reps, &mut seed);
    let batch_floor = floor.of(&batch) / cores;
    let batch_us = micros(batch.time);
    say(format!(
        "10% batch        {} random leavers of 2^{}: {:.1} ms for {} wraps + {} signatures ({} bytes); floor on {cores} cores {:.1} ms; ratio {:.2}",
        leavers.len(), sizes.big_log2, batch_us / 1e3, batch.wraps, batch.signatures, batch.bytes, batch_floor / 1e3, batch_us / batch_floor
    ));
    let member = time_member(graph.as_mut(), &leavers, if args.quick { 51 } else { 2001 });
    say(format!("member           verify its packet of that batch and unwrap its keys: {:.1} us", micros(member)));
    drop(graph);
    let peer = peer(&sizes, &floor, args.quick, quiet, &say)?;
    if args.json {
        let report = json!({
            "n": n, "degree": DEGREE, "threads": cores,
            "wrap_ns": floor.wrap_ns, "sign_us": floor.sign_us,
            "leave_us": leave_us, "leave_wraps": leave.wraps, "leave_floor_us": leave_floor, "leave_floor_ratio": leave_us / leave_floor,
            "batch_leavers": leavers.len(), "batch_ms": batch_us / 1e3, "batch_wraps": batch.wraps, "batch_signatures": batch.signatures,
            "batch_bytes": batch.bytes, "batch_floor_ms": batch_floor / 1e3, "batch_floor_ratio": batch_us / batch_floor,
            "member_us": micros(member),
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
        let (leave, _) = leave_and_rejoin(graph.as_mut(), MemberId(n * 2 / 3), sizes.leave_reps, Finish::Wire, &mut BatchSeed::from_u64(n));
        let keycast_us = micros(leave.time);
        out.keycast.insert(n.to_string(), json!(keycast_us));
        let line = format!("remove one       n = {n}: keycast {keycast_us:.1} us ({} wraps, {} signature, floor {:.1} us)", leave.wraps, leave.signatures, floor.of(&leave));
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

#[cfg(not(feature = "mls-peer"))]
fn mls_remove(_: u64, _: bool, _: &ProgressBar) -> Result<Option<(f64, f64, String)>, String> {
    Ok(None)
}
