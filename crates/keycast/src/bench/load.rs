//! `keycast bench --net --members N`: one real controller process (`keycast server`) carrying
//! N members simulated by another process (`keycast load-members`). The group is written into
//! the controller's log before it starts, as if N members had joined over TLS; the bench owns
//! the log's seeds, so it rebuilds the same key graph in process and hands each simulated
//! member its individual key. Phases: refreshes over UDP (each member once per refresh
//! interval, spread evenly), a sample of joins over TLS while they run, resyncs over UDP,
//! churn (the sample leaves over TLS, some members stop refreshing and expire), then the
//! controller is killed (SIGKILL) and restarted from its database.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use keycast_core::protocol::{Controller, Output, Record};
use keycast_core::wire::Message;
use keycast_core::{new_graph, Batch, BatchSeed, MemberId};
use keycast_net::client::{join_once, leave_once, MemberSetup};
use keycast_net::config::{MulticastConfig, RequestPolicy, ServerConfig};
use keycast_net::pki::{Authority, Credentials};
use keycast_net::store::{DatabaseKey, Store};
use keycast_net::tls::client_config;
use keycast_net::{entropy, multicast, now_ms};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};

use super::simulated::{write_keys, MemberKeysFile};

const GROUP: u64 = 1;
const EPOCH_MS: u64 = 1000;
/// Joins over TLS in flight at once, and per batch.
const JOINS_IN_FLIGHT: usize = 64;
const JOIN_BATCH: usize = 1000;
/// Longest wait for a controller to say it is serving (restoring a million members included).
const START_DEADLINE: Duration = Duration::from_secs(300);
/// Longest wait for an answer of the simulator process.
const SIMULATOR_DEADLINE: Duration = Duration::from_secs(120);
/// /proc/<pid>/stat counts CPU time in USER_HZ ticks, 100 a second on Linux.
const CPU_TICK_US: u64 = 10_000;

/// What `bench --net --members` was asked for.
pub struct LoadOptions {
    pub members: u64,
    pub refresh_s: u64,
    pub heartbeat_ms: u64,
    /// Forged refreshes a second for one refresh interval after the refresh phase (0: none).
    pub flood_per_s: u64,
    pub json: bool,
}

impl LoadOptions {
    fn refresh_ms(&self) -> u64 {
        self.refresh_s * 1000
    }

    /// Three refresh intervals, but at least 10 s (the TLS sample must join and leave within
    /// it: its members do not refresh).
    fn refresh_timeout_ms(&self) -> u64 {
        (3 * self.refresh_ms()).max(10_000)
    }

    fn joiners(&self) -> usize {
        (self.members / 10).clamp(10, 1000) as usize
    }

    /// Members that stop refreshing in the churn phase (they must expire, and no one else).
    fn silenced(&self) -> u64 {
        (self.members / 100).clamp(1, 1000)
    }

    fn resyncs(&self) -> usize {
        (self.members / 10).clamp(1, 100) as usize
    }

    /// The controller's tick (server.rs): heartbeats are sent on a tick, so this is their
    /// lateness quantum.
    fn tick_ms(&self) -> u64 {
        (EPOCH_MS.min(self.heartbeat_ms) / 5).clamp(2, 100)
    }
}

/// A child process killed (SIGKILL) and reaped when dropped: the bench leaves none behind on
/// any exit path.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Free loopback port for both TCP and UDP (the controller binds TLS and UDP on one port).
fn free_port() -> Result<u16, String> {
    for _ in 0..50 {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let port = tcp.local_addr().map_err(|e| e.to_string())?.port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err("no free loopback port for TCP and UDP".into())
}

/// The temp dir's files: CA, controller certificate, database key and server.toml.
struct Setup {
    dir: tempfile::TempDir,
    config_path: PathBuf,
    config: ServerConfig,
    authority: Authority,
    metrics: SocketAddr,
}

fn setup(options: &LoadOptions, joiners: &[String]) -> Result<Setup, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let pki = |e: keycast_net::pki::RcgenError| e.to_string();
    let authority = Authority::new("keycast load CA").map_err(pki)?;
    let controller = authority.issue("keycast-controller", true).map_err(pki)?;
    let file = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).map_err(|e| e.to_string());
    file("ca.pem", &authority.ca_pem())?;
    file("controller.pem", &controller.cert_pem)?;
    file("controller.key", &controller.key_pem)?;
    DatabaseKey::create_file(&dir.path().join("database.key")).map_err(|e| e.to_string())?;
    let (port, metrics_port, multicast_port) = (free_port()?, free_port()?, free_port()?);
    let salt = entropy();
    let acl = joiners.iter().map(|n| format!("\"{n}\"")).collect::<Vec<_>>().join(", ");
    let text = format!(
        "group = {GROUP}\nlisten = \"127.0.0.1:{port}\"\ndatabase = \"controller.redb\"\ndatabase_key = \"database.key\"\nacl = [{acl}]\nadmins = []\nmetrics = \"127.0.0.1:{metrics_port}\"\n\n[policy]\nepoch_ms = {EPOCH_MS}\nheartbeat_ms = {}\nrefresh_timeout_ms = {}\n\n[connections]\nmax_connections = 4096\nmax_per_address = 1024\n\n[multicast]\naddress = \"239.255.{}.{}:{multicast_port}\"\ninterface = \"127.0.0.1\"\nttl = 1\n\n[tls]\nca = \"ca.pem\"\ncert = \"controller.pem\"\nkey = \"controller.key\"\n",
        options.heartbeat_ms,
        options.refresh_timeout_ms(),
        100 + salt[0] % 100,
        1 + salt[1] % 250,
    );
    let config_path = dir.path().join("server.toml");
    file("server.toml", &text)?;
    let config = ServerConfig::load(&config_path).map_err(|e| e.to_string())?;
    Ok(Setup { dir, config_path, config, authority, metrics: SocketAddr::from(([127, 0, 0, 1], metrics_port)) })
}

/// Batches the group is written in: the log holds a group built over time, and the restored
/// controller keeps only the last batch's rekey (for retransmission), not one of N joins.
const POPULATE_BATCHES: u64 = 16;

/// Writes a group of `members` (member-1 ..) into the controller's log, as if they had joined
/// over TLS in `POPULATE_BATCHES` epochs just before the server starts, and rebuilds the same
/// key graph here for their individual keys. Returns the keys and when the group was created
/// (its epochs count from then).
fn populate(config: &ServerConfig, members: u64) -> Result<(MemberKeysFile, u64), String> {
    let policy = config.policy.group_policy(config.group).map_err(|e| e.to_string())?;
    let (graph_seed, signing_seed) = (entropy(), entropy());
    let created_ms = now_ms() - (POPULATE_BATCHES + 1) * EPOCH_MS;
    let (_, genesis) = Controller::create(policy, BTreeSet::new(), created_ms, graph_seed, signing_seed).map_err(|e| e.to_string())?;
    let Output::Persist(genesis) = genesis else { return Err("no genesis record".into()) };
    let mut graph = new_graph(policy.graph, &BatchSeed::from_bytes(graph_seed)).map_err(|e| e.to_string())?;
    let mut records = vec![genesis];
    let chunk = members.div_ceil(POPULATE_BATCHES);
    for (seq, first) in (1..).zip((1..=members).step_by(chunk as usize)) {
        let ids: Vec<MemberId> = (first..(first + chunk).min(members + 1)).map(MemberId).collect();
        let seed = entropy();
        graph.apply(&Batch { joins: ids.clone(), leaves: vec![] }, &BatchSeed::from_bytes(seed)).map_err(|e| e.to_string())?;
        let joins = ids.into_iter().map(|m| (m, format!("member-{}", m.0))).collect();
        records.push(Record::Batch { seq, epoch: seq, activation: seq, joins, leaves: vec![], seed });
    }
    let key = config.load_database_key().map_err(|e| e.to_string())?;
    let (mut store, _) = Store::open_sealed(&config.database, key).map_err(|e| e.to_string())?;
    store.append(&records).map_err(|e| e.to_string())?;
    let members = (1..=members).map(MemberId).map(|m| graph.individual_key(m).map(|k| (m, k)).ok_or("a member without an individual key")).collect::<Result<_, _>>()?;
    Ok((MemberKeysFile { group: policy.group, members }, created_ms))
}

/// A running controller process and the "serving" lines of its log.
struct ServerProcess {
    child: Killed,
    serving: mpsc::UnboundedReceiver<()>,
}

/// Starts `keycast server` on the setup; its log goes to server.log in the temp dir.
fn spawn_server(setup: &Setup) -> Result<ServerProcess, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .args(["server", "--config"])
        .arg(&setup.config_path)
        .env("KEYCAST_LOG", "warn,keycast=info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start the controller: {e}"))?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let log_path = setup.dir.path().join("server.log");
    let mut log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).map_err(|e| e.to_string())?;
    let (tx, serving) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = writeln!(log, "{line}");
            if line.contains("serving") {
                let _ = tx.send(());
            }
        }
    });
    Ok(ServerProcess { child: Killed(child), serving })
}

impl ServerProcess {
    fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// Waits for the controller's "serving" line; an exit before it is an error naming its log.
    async fn serving(&mut self, log: &Path) -> Result<(), String> {
        match tokio::time::timeout(START_DEADLINE, self.serving.recv()).await {
            Ok(Some(())) => Ok(()),
            _ => Err(format!("the controller did not start; its log: {}", tail(log))),
        }
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

/// The controller's Prometheus series by name.
async fn metrics(addr: SocketAddr) -> Result<BTreeMap<String, f64>, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await?;
        let mut body = Vec::new();
        tcp.take(1 << 20).read_to_end(&mut body).await?;
        Ok::<_, std::io::Error>(body)
    };
    let body = tokio::time::timeout(Duration::from_secs(10), fetch).await.map_err(|_| "metrics timed out")?.map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&body);
    Ok(text
        .lines()
        .filter(|l| l.starts_with("keycast_"))
        .filter_map(|l| l.split_once(' ').and_then(|(k, v)| Some((k.to_owned(), v.trim().parse().ok()?))))
        .collect())
}

/// Waits until the metrics endpoint answers (it is bound just after the controller says it
/// is serving); returns its series.
async fn answering(addr: SocketAddr) -> Result<BTreeMap<String, f64>, String> {
    let until = Instant::now() + START_DEADLINE;
    loop {
        match metrics(addr).await {
            Ok(series) => return Ok(series),
            Err(error) if Instant::now() >= until => return Err(format!("the controller's metrics never answered: {error}")),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

async fn metric(addr: SocketAddr, name: &str) -> Result<f64, String> {
    metrics(addr).await?.get(name).copied().ok_or(format!("the controller exports no {name}"))
}

/// Polls the metrics until `name` satisfies `done` or the deadline passes; returns the last value.
async fn wait_metric(addr: SocketAddr, name: &str, deadline: Duration, bar: &ProgressBar, done: impl Fn(f64) -> bool) -> Result<f64, String> {
    let until = Instant::now() + deadline;
    loop {
        let value = metric(addr, name).await?;
        bar.set_message(format!("{name} {value}"));
        if done(value) || Instant::now() >= until {
            return Ok(value);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// utime + stime of `pid`, in microseconds.
pub(super) fn cpu_us(pid: u32) -> Result<u64, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| e.to_string())?;
    let fields: Vec<&str> = stat.rsplit_once(')').ok_or("bad /proc stat")?.1.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).ok_or("bad /proc stat");
    // After the command name: state is field 3 of the line, utime 14 and stime 15.
    Ok((ticks(11)? + ticks(12)?) * CPU_TICK_US)
}

/// Resident memory of `pid` in bytes (VmRSS).
fn rss_bytes(pid: u32) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    let kb = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
    kb.map(|kb| kb * 1024).ok_or_else(|| "no VmRSS".into())
}

/// What a multicast listener saw: heartbeats (the controller's send time and the arrival) and
/// each rekey's packets.
#[derive(Default)]
struct Wire {
    heartbeats: Vec<(u64, u64)>,
    rekeys: BTreeMap<u64, RekeySeen>,
}

#[derive(Default)]
struct RekeySeen {
    epoch: u64,
    packets: u32,
    count: u32,
    bytes: u64,
    /// Arrival of the packet that completed it (first time).
    done_ms: Option<u64>,
}

/// A multicast listener on a thread of its own (under real-time priority where allowed), so
/// arrival times are the network's, not this process's scheduling; stops when dropped.
struct Listener(Arc<std::sync::atomic::AtomicBool>);

impl Drop for Listener {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn listen(config: &MulticastConfig, wire: Arc<Mutex<Wire>>) -> Result<Listener, String> {
    let socket = multicast::receiver(config).and_then(|s| s.into_std()).map_err(|e| e.to_string())?;
    socket.set_nonblocking(false).and_then(|()| socket.set_read_timeout(Some(Duration::from_millis(100)))).map_err(|e| e.to_string())?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    std::thread::Builder::new()
        .name("listener".into())
        .spawn(move || {
            keycast_net::priority::run_ahead_of_the_rest("the bench's multicast listener");
            let mut buf = vec![0u8; 65_536];
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok(len) = socket.recv(&mut buf) else { continue };
                let arrival = now_ms();
                let mut wire = wire.lock().unwrap_or_else(|p| p.into_inner());
                match Message::decode(&buf[..len]) {
                    Ok(Message::Heartbeat(h)) => wire.heartbeats.push((h.heartbeat.sent_ms, arrival)),
                    Ok(Message::Rekey(p)) => {
                        let seen = wire.rekeys.entry(p.header.seq).or_default();
                        if seen.done_ms.is_none() {
                            (seen.epoch, seen.count) = (p.header.epoch, p.header.count);
                            seen.packets += 1;
                            seen.bytes += len as u64;
                            if seen.packets >= seen.count {
                                seen.done_ms = Some(arrival);
                            }
                        }
                    }
                    _ => {}
                }
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(Listener(stop))
}

/// The largest lateness of consecutive heartbeats sent in [from, to): by the controller's own
/// send times (its timer), and by their arrival here.
fn heartbeat_lateness(wire: &Wire, heartbeat_ms: u64, from: u64, to: u64) -> (f64, f64, usize) {
    let beats: Vec<&(u64, u64)> = wire.heartbeats.iter().filter(|(sent, _)| (from..to).contains(sent)).collect();
    let late = |gap: u64| gap.saturating_sub(heartbeat_ms) as f64;
    let sent = beats.windows(2).map(|w| late(w[1].0 - w[0].0)).fold(0.0, f64::max);
    let arrived = beats.windows(2).map(|w| late(w[1].1.saturating_sub(w[0].1))).fold(0.0, f64::max);
    (sent, arrived, beats.len())
}

/// The rekeys completed on the wire in [from, to): each one's time from its epoch's start to its
/// last packet (sorted), and their mean bytes.
fn rekey_figures(wire: &Wire, created_ms: u64, from: u64, to: u64) -> (Vec<f64>, f64) {
    let rekeys: Vec<&RekeySeen> = wire.rekeys.values().filter(|r| r.done_ms.is_some_and(|d| (from..to).contains(&d))).collect();
    // A rekey closes the epoch it is numbered with, at that epoch's start.
    let epoch_start = |epoch: u64| created_ms + epoch.saturating_sub(1) * EPOCH_MS;
    let mut times: Vec<f64> = rekeys.iter().filter_map(|r| Some(r.done_ms?.saturating_sub(epoch_start(r.epoch)) as f64)).collect();
    times.sort_by(f64::total_cmp);
    let bytes = rekeys.iter().map(|r| r.bytes).sum::<u64>() as f64 / rekeys.len().max(1) as f64;
    (times, bytes)
}

/// What the controller did over one refresh interval of refreshes alone.
struct RefreshPhase {
    accepted: f64,
    dropped: f64,
    /// Its CPU over the phase per refresh accepted.
    cpu_us_each: f64,
    /// Its CPU over the phase's length (1.0: one core).
    cpu_share: f64,
}

/// One whole refresh interval, in which every member refreshes once.
async fn refresh_phase(o: &LoadOptions, pid: u32, metrics_addr: SocketAddr) -> Result<RefreshPhase, String> {
    let before = metrics(metrics_addr).await?;
    let cpu_before = cpu_us(pid)?;
    run_for(Duration::from_millis(o.refresh_ms()), &progress(o.json, 1, "refresh")).await;
    let cpu = (cpu_us(pid)? - cpu_before) as f64;
    let after = metrics(metrics_addr).await?;
    let delta = |name: &str| after.get(name).copied().unwrap_or(0.0) - before.get(name).copied().unwrap_or(0.0);
    let accepted = delta("keycast_liveness_accepted_total");
    Ok(RefreshPhase {
        accepted,
        dropped: delta("keycast_liveness_dropped_total"),
        cpu_us_each: cpu / accepted.max(1.0),
        cpu_share: cpu / (o.refresh_ms() as f64 * 1000.0),
    })
}

/// What a flood of forged refreshes beside the load did at the controller.
#[derive(Default)]
struct FloodPhase {
    sent: f64,
    refused: f64,
    dropped: f64,
    /// Real refreshes accepted during the flood (about one interval's worth when none is lost).
    accepted: f64,
    cpu_share: f64,
}

/// One refresh interval of forged refreshes at `o.flood_per_s` beside the real ones.
async fn flood_phase(o: &LoadOptions, sim: &mut Simulator, pid: u32, metrics_addr: SocketAddr) -> Result<FloodPhase, String> {
    if o.flood_per_s == 0 {
        return Ok(FloodPhase::default());
    }
    let before = metrics(metrics_addr).await?;
    let cpu_before = cpu_us(pid)?;
    let started = Instant::now();
    let answer = sim.ask(&format!("flood {} {}", o.flood_per_s, o.refresh_s)).await?;
    let cpu = (cpu_us(pid)? - cpu_before) as f64;
    let after = metrics(metrics_addr).await?;
    let delta = |name: &str| after.get(name).copied().unwrap_or(0.0) - before.get(name).copied().unwrap_or(0.0);
    let phase = FloodPhase {
        sent: answer["flood_sent"].as_f64().unwrap_or(0.0),
        refused: delta("keycast_liveness_refused_total"),
        dropped: delta("keycast_liveness_dropped_total"),
        accepted: delta("keycast_liveness_accepted_total"),
        cpu_share: cpu / (started.elapsed().as_secs_f64() * 1e6),
    };
    say(o.json, format!(
        "flood    {:.0} forged refreshes in {} s ({:.0}/s): {:.0} refused, {:.0} dropped by a full queue; {:.0} real refreshes accepted meanwhile; controller at {:.0}% of one core",
        phase.sent, o.refresh_s, phase.sent / o.refresh_s as f64, phase.refused, phase.dropped, phase.accepted, phase.cpu_share * 100.0
    ));
    Ok(phase)
}

/// The simulated members' process and its answers.
struct Simulator {
    /// Killed when the simulator is dropped.
    _process: Killed,
    stdin: ChildStdin,
    lines: mpsc::UnboundedReceiver<Value>,
}

impl Simulator {
    fn spawn(keys: &Path, server: SocketAddr, refresh_ms: u64) -> Result<Simulator, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = Command::new(exe)
            .arg("load-members")
            .arg("--keys")
            .arg(keys)
            .args(["--server", &server.to_string(), "--refresh-ms", &refresh_ms.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start the simulated members: {e}"))?;
        let (stdin, stdout) = (child.stdin.take().ok_or("no stdin")?, child.stdout.take().ok_or("no stdout")?);
        let (tx, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(serde_json::from_str(&line).unwrap_or(Value::Null));
            }
        });
        Ok(Simulator { _process: Killed(child), stdin, lines })
    }

    async fn next(&mut self) -> Result<Value, String> {
        match tokio::time::timeout(SIMULATOR_DEADLINE, self.lines.recv()).await {
            Ok(Some(line)) => Ok(line),
            _ => Err("the simulated members stopped answering".into()),
        }
    }

    async fn ask(&mut self, command: &str) -> Result<Value, String> {
        writeln!(self.stdin, "{command}").and_then(|()| self.stdin.flush()).map_err(|e| format!("the simulated members are gone: {e}"))?;
        self.next().await
    }
}

/// Settings for a TLS member of the sample, presenting `credentials`.
fn member_setup(config: &ServerConfig, credentials: &Credentials) -> Result<MemberSetup, String> {
    Ok(MemberSetup {
        group: keycast_core::wire::GroupId(config.group),
        server: config.listen,
        server_name: "localhost".into(),
        multicast: config.multicast.clone(),
        tls: client_config(credentials).map_err(|e| e.to_string())?,
        refresh_ms: 1000,
        heartbeat_ms: 1000,
        udp_refresh: true,
        tls_refresh_every: 0,
        requests: RequestPolicy { answer_timeout_ms: RequestPolicy::default().answer_timeout_ms.max(3 * EPOCH_MS), ..RequestPolicy::default() },
        rejoin: false,
        event_capacity: 1024,
        loss: None,
        naks: true,
        standbys: Vec::new(),
    })
}

/// Joins every setup over TLS, `JOIN_BATCH` at a time with `JOINS_IN_FLIGHT` in flight;
/// returns each joiner's member id.
async fn join_sample(setups: &[MemberSetup], bar: &ProgressBar) -> Result<Vec<MemberId>, String> {
    let gate = Arc::new(Semaphore::new(JOINS_IN_FLIGHT));
    let mut members = Vec::with_capacity(setups.len());
    for batch in setups.chunks(JOIN_BATCH) {
        let mut tasks = Vec::with_capacity(batch.len());
        for setup in batch {
            let permit = gate.clone().acquire_owned().await.map_err(|e| e.to_string())?;
            let setup = setup.clone();
            tasks.push(tokio::spawn(async move {
                let joined = join_once(&setup).await.map(|(accepted, _)| accepted.member);
                drop(permit);
                joined
            }));
        }
        for task in tasks {
            members.push(task.await.map_err(|e| e.to_string())?.map_err(|e| format!("a join over TLS failed: {e}"))?);
            bar.inc(1);
        }
    }
    Ok(members)
}

async fn leave_sample(setups: &[MemberSetup], members: &[MemberId]) -> Result<(u64, u64), String> {
    let gate = Arc::new(Semaphore::new(JOINS_IN_FLIGHT));
    let mut tasks = Vec::with_capacity(setups.len());
    for (setup, member) in setups.iter().zip(members) {
        let permit = gate.clone().acquire_owned().await.map_err(|e| e.to_string())?;
        let (setup, member) = (setup.clone(), *member);
        tasks.push(tokio::spawn(async move {
            let left = leave_once(&setup, member).await;
            drop(permit);
            left
        }));
    }
    let (mut left, mut refused) = (0, 0);
    for task in tasks {
        match task.await.map_err(|e| e.to_string())? {
            Ok(()) => left += 1,
            Err(_) => refused += 1,
        }
    }
    Ok((left, refused))
}

fn progress(json: bool, len: u64, what: &str) -> ProgressBar {
    let bar = if json { ProgressBar::hidden() } else { ProgressBar::new(len) };
    bar.set_style(ProgressStyle::with_template("{prefix:<8} {bar:40} {pos}/{len} {msg}").expect("valid template"));
    bar.set_prefix(what.to_owned());
    bar
}

/// Lets the load run for `length`, showing its progress (the phase's length is the measurement).
async fn run_for(length: Duration, bar: &ProgressBar) {
    let start = Instant::now();
    bar.set_length(length.as_secs().max(1));
    while start.elapsed() < length {
        tokio::time::sleep(Duration::from_millis(250).min(length - start.elapsed())).await;
        bar.set_position(start.elapsed().as_secs());
    }
    bar.finish_and_clear();
}

fn say(json: bool, line: String) {
    if !json {
        println!("{line}");
    }
}

pub fn run(options: &LoadOptions) -> Result<(), String> {
    if options.members == 0 || options.refresh_s == 0 || options.heartbeat_ms == 0 {
        return Err("--members, --refresh-s and --heartbeat-ms must be positive".into());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    let report = runtime.block_on(load(options))?;
    if options.json {
        println!("{report}");
    }
    Ok(())
}

async fn load(o: &LoadOptions) -> Result<Value, String> {
    let n = o.members;
    let joiner_names: Vec<String> = (1..=o.joiners()).map(|i| format!("joiner-{i}")).collect();
    let setup = setup(o, &joiner_names)?;
    let log = setup.dir.path().join("server.log");
    let config = &setup.config;

    // The same controller with an empty group, for its resident memory.
    let mut empty = spawn_server(&setup)?;
    empty.serving(&log).await?;
    answering(setup.metrics).await?;
    let rss_empty = rss_bytes(empty.pid())?;
    drop(empty);
    std::fs::remove_file(&config.database).map_err(|e| e.to_string())?;

    let started = Instant::now();
    let (keys, created_ms) = tokio::task::block_in_place(|| populate(config, n))?;
    let keys_path = setup.dir.path().join("members.keys");
    write_keys(&keys_path, &keys)?;
    drop(keys);
    let populate_s = started.elapsed().as_secs_f64();
    say(o.json, format!("setup    {n} members written into the controller's log and their keys derived in {populate_s:.1} s"));

    let started = Instant::now();
    let mut server = spawn_server(&setup)?;
    server.serving(&log).await?;
    answering(setup.metrics).await?;
    let first_start_s = started.elapsed().as_secs_f64();
    let wire = Arc::new(Mutex::new(Wire::default()));
    let listener = listen(&config.multicast, wire.clone())?;
    let mut sim = Simulator::spawn(&keys_path, config.listen, o.refresh_ms())?;
    sim.next().await?;

    let load_from_ms = now_ms();
    let refresh = refresh_phase(o, server.pid(), setup.metrics).await?;
    let (accepted, phase_dropped, refresh_cpu_us, cpu_share) = (refresh.accepted, refresh.dropped, refresh.cpu_us_each, refresh.cpu_share);
    let rss_loaded = rss_bytes(server.pid())?;
    let bytes_per_member = (rss_loaded.saturating_sub(rss_empty)) as f64 / n as f64;
    say(o.json, format!("refresh  {accepted} refreshes over UDP accepted in {} s ({:.0}/s), {phase_dropped} dropped by a full queue: {refresh_cpu_us:.1} us of controller CPU each ({:.0}% of one core)", o.refresh_s, accepted / o.refresh_s as f64, cpu_share * 100.0));
    say(o.json, format!("memory   controller RSS {:.1} MB with the group, {:.1} MB empty: {bytes_per_member:.0} bytes per member", rss_loaded as f64 / 1e6, rss_empty as f64 / 1e6));

    let flood = flood_phase(o, &mut sim, server.pid(), setup.metrics).await?;

    // A sample joins over TLS while the refreshes go on.
    let setups: Vec<MemberSetup> = joiner_names
        .iter()
        .map(|name| member_setup(config, &setup.authority.issue(name, false).map_err(|e| e.to_string())?))
        .collect::<Result<_, String>>()?;
    let bar = progress(o.json, setups.len() as u64, "joins");
    let started = Instant::now();
    let joined = join_sample(&setups, &bar).await?;
    let joins_per_second = joined.len() as f64 / started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    say(o.json, format!("joins    {} members joined over TLS during the load, {JOINS_IN_FLIGHT} at a time: {joins_per_second:.0} joins/s", joined.len()));

    let resync = sim.ask(&format!("resync {}", o.resyncs())).await?;
    let (resyncs_answered, resyncs_failed) = (resync["resyncs_answered"].as_u64().unwrap_or(0), resync["resyncs_failed"].as_u64().unwrap_or(0));
    say(o.json, format!("resync   {resyncs_answered} resyncs over UDP answered and opened, {resyncs_failed} not"));

    // Churn: the sample leaves over TLS; some members stop refreshing and must expire.
    let churn_from_ms = now_ms();
    let silenced = o.silenced();
    sim.ask(&format!("silence {silenced}")).await?;
    let (leaves, leaves_refused) = leave_sample(&setups, &joined).await?;
    let expected = n - silenced;
    let bar = progress(o.json, 1, "churn");
    let deadline = Duration::from_millis(o.refresh_timeout_ms() + 5 * EPOCH_MS) + Duration::from_secs(30);
    let members = wait_metric(setup.metrics, "keycast_members", deadline, &bar, |m| m <= expected as f64).await? as u64;
    bar.finish_and_clear();
    // Two more epochs: a member wrongly expired just after the silenced ones would show here.
    tokio::time::sleep(Duration::from_millis(2 * EPOCH_MS)).await;
    let members = members.min(metric(setup.metrics, "keycast_members").await? as u64);
    let stats = metrics(setup.metrics).await?;
    let refused = stats.get("keycast_liveness_refused_total").copied().unwrap_or(0.0);
    let dropped = stats.get("keycast_liveness_dropped_total").copied().unwrap_or(0.0);
    let accepted_total = stats.get("keycast_liveness_accepted_total").copied().unwrap_or(0.0);
    let members_lost = expected.saturating_sub(members);
    let rss_end = rss_bytes(server.pid())?;
    say(o.json, format!("memory   controller RSS {:.1} MB after the churn (its TLS joins and leaves included): {:.0} bytes per member", rss_end as f64 / 1e6, rss_end.saturating_sub(rss_empty) as f64 / expected as f64));
    say(o.json, format!("churn    {leaves} left over TLS ({leaves_refused} refused), {silenced} stopped refreshing: {members} members held, {expected} expected, {members_lost} lost"));

    // Kill -9 and restart from the database.
    let kill_ms = now_ms();
    drop(server);
    let started = Instant::now();
    let mut server = spawn_server(&setup)?;
    server.serving(&log).await?;
    answering(setup.metrics).await?;
    // The count is published after the controller's first step, not when it starts serving.
    let bar = progress(o.json, 1, "restart");
    let members_after_restart = wait_metric(setup.metrics, "keycast_members", START_DEADLINE, &bar, |m| m >= members as f64).await? as u64;
    let restart_s = started.elapsed().as_secs_f64();
    let refreshes_after_restart = wait_metric(setup.metrics, "keycast_liveness_accepted_total", Duration::from_secs(30), &bar, |a| a > 0.0).await?;
    bar.finish_and_clear();
    say(o.json, format!("restart  kill -9 to answering again with its members: {restart_s:.2} s, {members_after_restart} members; {refreshes_after_restart} refreshes accepted since"));
    let sent = sim.ask("stop").await?;
    drop(sim);
    drop(server);
    drop(listener);

    let wire = wire.lock().unwrap_or_else(|p| p.into_inner());
    let (late_ms, arrival_late_ms, heartbeats) = heartbeat_lateness(&wire, o.heartbeat_ms, load_from_ms, kill_ms);
    let (rekey_ms, bytes_per_epoch) = rekey_figures(&wire, created_ms, churn_from_ms, kill_ms);
    say(o.json, format!(
        "rekey    {} rekeys in the churn: epoch start to last packet on the wire {:.0} ms max ({:.0} median), {bytes_per_epoch:.0} bytes per epoch",
        rekey_ms.len(), rekey_ms.last().copied().unwrap_or(0.0), rekey_ms.get(rekey_ms.len() / 2).copied().unwrap_or(0.0)
    ));
    say(o.json, format!("beats    {heartbeats} heartbeats every {} ms (tick {} ms): at most {late_ms:.0} ms late by the controller's clock, {arrival_late_ms:.0} ms by arrival here", o.heartbeat_ms, o.tick_ms()));
    say(o.json, format!("refused  {refused} liveness datagrams refused, {dropped} dropped by a full queue; {} members lost", members_lost));
    let mut report = json!({
        "members": members,
        "members_expected": expected,
        "members_lost": members_lost,
        "joins": joined.len(),
        "joins_per_second": joins_per_second,
        "leaves": leaves,
        "leaves_refused": leaves_refused,
        "expiries": silenced,
        "refresh_s": o.refresh_s,
        "refreshes_accepted": accepted_total,
        "refreshes_refused": refused,
        "refreshes_dropped": dropped,
        "refreshes_sent": sent["refreshes_sent"],
        "refresh_phase_accepted": accepted,
        "refresh_phase_dropped": phase_dropped,
        "refresh_cpu_us": refresh_cpu_us,
        "refresh_cpu_share": cpu_share,
        "resyncs_answered": resyncs_answered,
        "resyncs_failed": resyncs_failed,
        "rss_empty_bytes": rss_empty,
        "rss_bytes": rss_loaded,
        "rss_end_bytes": rss_end,
        "bytes_per_member_end": rss_end.saturating_sub(rss_empty) as f64 / expected as f64,
        "bytes_per_member": bytes_per_member,
        "heartbeat_ms": o.heartbeat_ms,
        "tick_ms": o.tick_ms(),
        "heartbeats": heartbeats,
        "heartbeat_late_ms_max": late_ms,
        "heartbeat_arrival_late_ms_max": arrival_late_ms,
        "rekeys": rekey_ms.len(),
        "rekey_ms": rekey_ms.last().copied().unwrap_or(0.0),
        "rekey_ms_median": rekey_ms.get(rekey_ms.len() / 2).copied().unwrap_or(0.0),
        "rekey_bytes_per_epoch": bytes_per_epoch,
        "populate_s": populate_s,
        "start_s": first_start_s,
        "restart_s": restart_s,
        "members_after_restart": members_after_restart,
        "refreshes_after_restart": refreshes_after_restart,
    });
    let flood = json!({
        "flood_per_s": o.flood_per_s,
        "flood_sent": flood.sent,
        "flood_refused": flood.refused,
        "flood_dropped": flood.dropped,
        "flood_real_accepted": flood.accepted,
        "flood_cpu_share": flood.cpu_share,
    });
    if let (Some(report), Some(flood)) = (report.as_object_mut(), flood.as_object()) {
        report.extend(flood.clone());
    }
    Ok(report)
}
