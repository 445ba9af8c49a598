//! `keycast bench --net`: the networked system on loopback. Joins per second over TLS 1.3
//! with client certificates (and the bare handshake in the same run, for the ratio), and the
//! time from an eviction request to its rekey on the multicast wire in a group of 100,000.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keycast_core::protocol::{Controller, GroupPolicy, Output, Record};
use keycast_core::wire::rekey::PacketConfig;
use keycast_core::wire::{GroupId, Message};
use keycast_core::{GraphConfig, JoinPolicy, MemberId, Scheme};
use keycast_net::client::{handshake_only, join_once, MemberSetup};
use keycast_net::local::LocalGroup;
use keycast_net::store::Store;
use keycast_net::{entropy, multicast, now_ms};
use serde_json::{json, Value};
use tokio::sync::Semaphore;

fn policy(epoch_ms: u64) -> GroupPolicy {
    GroupPolicy {
        group: GroupId(1),
        graph: GraphConfig { scheme: Scheme::Tree { degree: 4 }, join_policy: JoinPolicy::NewVersion },
        epoch_ms,
        activation_delay: 1,
        heartbeat_ms: 1000,
        refresh_timeout_ms: 3_600_000,
        immediate_eviction: true,
        membership_deltas: false,
        reflector: false,
        packets: PacketConfig::default(),
    }
}

/// Operations per second and CPU time per operation (this process: the controller and the
/// clients, the same clients for every kind of operation).
struct Rate {
    per_second: f64,
    cpu_us: f64,
}

/// Runs `count` operations with at most `parallel` in flight.
async fn rate<F, Fut>(setups: &[MemberSetup], parallel: usize, op: F) -> Result<Rate, String>
where
    F: Fn(MemberSetup) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let gate = Arc::new(Semaphore::new(parallel));
    let (start, cpu) = (Instant::now(), super::load::cpu_us(std::process::id())?);
    let mut tasks = Vec::with_capacity(setups.len());
    for setup in setups {
        let permit = gate.clone().acquire_owned().await.map_err(|e| e.to_string())?;
        let work = op(setup.clone());
        tasks.push(tokio::spawn(async move {
            let result = work.await;
            drop(permit);
            result
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    let n = setups.len() as f64;
    Ok(Rate { per_second: n / start.elapsed().as_secs_f64(), cpu_us: (super::load::cpu_us(std::process::id())? - cpu) as f64 / n })
}

/// Joins and bare handshakes with `parallel` in flight: enough that the cores, not the epoch
/// a join waits for, are the limit.
async fn joins(count: usize, epoch_ms: u64, parallel: usize) -> Result<(Rate, Rate), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let group = LocalGroup::start(policy(epoch_ms), count, dir.path().into()).await.map_err(|e| e.to_string())?;
    // Certificates are issued before the clock starts.
    let setups: Vec<MemberSetup> =
        (1..=count).map(|i| group.member_setup(&format!("member-{i}"))).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
    let handshakes = rate(&setups, parallel, |s| async move { handshake_only(&s).await.map_err(|e| e.to_string()) }).await?;
    let joins = rate(&setups, parallel, |s| async move { join_once(&s).await.map(drop).map_err(|e| e.to_string()) }).await?;
    Ok((joins, handshakes))
}

/// A controller log holding a group of `members` (member-1 ..), written before the server
/// starts, as if they had joined over TLS.
fn populated_log(path: &std::path::Path, policy: GroupPolicy, members: u64) -> Result<(), String> {
    let (_, genesis) = Controller::create(policy, Default::default(), now_ms(), entropy(), entropy()).map_err(|e| e.to_string())?;
    let Output::Persist(genesis) = genesis else { return Err("no genesis record".into()) };
    let joins = (1..=members).map(|i| (MemberId(i), format!("member-{i}"))).collect();
    let batch = Record::Batch { seq: 1, epoch: 1, activation: 1, joins, leaves: vec![], seed: entropy() };
    let (mut store, _) = Store::open(path).map_err(|e| e.to_string())?;
    store.append(&[genesis, batch]).map_err(|e| e.to_string())
}

/// Eviction request to first and last rekey packet on the multicast wire, in milliseconds.
async fn leave_to_wire(members: u64, reps: usize) -> Result<(f64, f64, usize), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let policy = policy(3_600_000);
    // The group is created by LocalGroup; replace its log with the populated one and restart.
    let mut group = LocalGroup::start(policy, 0, dir.path().into()).await.map_err(|e| e.to_string())?;
    group.kill_server().await;
    std::fs::remove_file(&group.database).map_err(|e| e.to_string())?;
    populated_log(&group.database, policy, members)?;
    group.start_server().await.map_err(|e| e.to_string())?;
    let socket = multicast::receiver(&group.multicast).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 65_536];
    let (mut first, mut last, mut packets) = (Vec::new(), Vec::new(), 0);
    for rep in 0..reps {
        while tokio::time::timeout(Duration::from_millis(20), socket.recv_from(&mut buf)).await.is_ok() {}
        let start = Instant::now();
        let server = group.server.as_ref().ok_or("no controller")?;
        let evict = server.evict(MemberId(1 + rep as u64 * 7919 % members));
        let (mut got_first, mut count) = (None, 0);
        let listen = async {
            loop {
                let Ok((len, _)) = socket.recv_from(&mut buf).await else { continue };
                if let Ok(Message::Rekey(p)) = Message::decode(&buf[..len]) {
                    got_first.get_or_insert(start.elapsed());
                    count += 1;
                    if count == p.header.count as usize {
                        return start.elapsed();
                    }
                }
            }
        };
        let (_, done) = tokio::join!(evict, tokio::time::timeout(Duration::from_secs(10), listen));
        let done = done.map_err(|_| "the rekey never arrived whole")?;
        first.push(got_first.unwrap_or(done).as_secs_f64() * 1000.0);
        last.push(done.as_secs_f64() * 1000.0);
        packets = count;
    }
    first.sort_by(f64::total_cmp);
    last.sort_by(f64::total_cmp);
    Ok((first[reps / 2], last[reps / 2], packets))
}

pub fn run(json_out: bool, quick: bool) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    let (count, parallel, members, reps) = if quick { (200, 100, 5_000, 3) } else { (5_000, 512, 100_000, 11) };
    let epoch_ms = 50;
    let (join, handshake) = runtime.block_on(joins(count, epoch_ms, parallel))?;
    let (first_ms, last_ms, packets) = runtime.block_on(leave_to_wire(members, reps))?;
    let report = json!({
        "joins": count,
        "parallel": parallel,
        "epoch_ms": epoch_ms,
        "joins_per_second": join.per_second,
        "handshakes_per_second": handshake.per_second,
        "join_handshake_ratio": handshake.per_second / join.per_second,
        "join_cpu_us": join.cpu_us,
        "handshake_cpu_us": handshake.cpu_us,
        "group_members": members,
        "leave_to_first_packet_ms": first_ms,
        "leave_to_last_packet_ms": last_ms,
        "leave_packets": packets,
    });
    if json_out {
        println!("{report}");
    } else {
        print(&report);
    }
    Ok(())
}

fn print(r: &Value) {
    println!(
        "joins        {} members joined over TLS 1.3 with client certificates, {} at a time, {} ms epochs: {:.0} joins/s",
        r["joins"], r["parallel"], r["epoch_ms"], r["joins_per_second"].as_f64().unwrap_or(0.0)
    );
    println!(
        "handshake    the TLS 1.3 handshake alone, same clients: {:.0} /s; joins/s are {:.2}x handshakes/s",
        r["handshakes_per_second"].as_f64().unwrap_or(0.0),
        1.0 / r["join_handshake_ratio"].as_f64().unwrap_or(f64::INFINITY)
    );
    println!(
        "cpu          this process (controller and clients) per operation: join {:.0} us, handshake {:.0} us",
        r["join_cpu_us"].as_f64().unwrap_or(0.0),
        r["handshake_cpu_us"].as_f64().unwrap_or(0.0)
    );
    println!(
        "leave        eviction request to rekey on the wire, {} members: first packet {:.2} ms, all {} packets {:.2} ms (median)",
        r["group_members"], r["leave_to_first_packet_ms"].as_f64().unwrap_or(0.0), r["leave_packets"], r["leave_to_last_packet_ms"].as_f64().unwrap_or(0.0)
    );
}

