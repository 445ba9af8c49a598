//! The controller driver: a TLS listener for joins, leaves, refreshes, resyncs and admin; a
//! multicast sender for rekeys and heartbeats; the redb log; a clock. One task owns the
//! `Controller` and processes its outputs in order, persisting before it sends. Heartbeats
//! leave from a thread of their own, fed with each change before the change's first datagram,
//! so neither a long step of the controller (a rekey at a million members, a slow fsync) nor
//! busy runtime workers (TLS handshakes) delay them.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keycast_core::protocol::traffic::TrafficKeys;
use keycast_core::protocol::heartbeats::{controller_alive, Heartbeats};
use keycast_core::protocol::merge::Contact;
use keycast_core::protocol::merge_state::{Handback, MergeSide, MergeTicket};
use keycast_core::protocol::{Controller, ControllerError, GroupPolicy, JoinStatus, LivenessAnswer, Output, Refusal};
use keycast_core::wire::{GroupId, JoinAnswer, Message, MessageType, RefusalReason, TlsServerName, VerifyingKey, LIVENESS_LEN};
use keycast_core::MemberId;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::admin::{self, AdminRequest, AdminResponse, MemberRow, ParentLink, Stats};
use crate::config::MulticastConfig;
use crate::pki::Fingerprint;
use crate::reflector::{self, ReflectionFeed};
use crate::status::{self, RecentRekeys, RekeyPoint};
use crate::store::{DatabaseKey, Store, StoreError};
use zeroize::Zeroizing;
use crate::tls::{peer_certificate, peer_identity, read_frame, write_frame};
use crate::{entropy, lock, multicast, now_ms};

/// A connection the controller holds open for an answer (the core's `ConnId`).
type ConnId = u64;

/// Deadlines and caps of the TLS listener. Every connection is answered or closed within
/// handshake + request + answer + request deadlines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Time allowed for the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time allowed for reading the connection's one request, and for writing its answer.
    pub request_timeout: Duration,
    /// Time allowed for the controller's answer (a join waits for its epoch's rekey).
    pub answer_timeout: Duration,
    /// Connections open at once, in total, from one IP address, and per identity.
    pub max_connections: usize,
    pub max_per_address: usize,
    pub max_per_identity: usize,
}

impl Limits {
    /// The defaults: 5 s for the handshake and the request, max(3 epochs, 5 s) for the answer,
    /// 1024 connections, 64 per address, 4 per identity.
    pub fn for_policy(policy: &GroupPolicy) -> Limits {
        Limits {
            handshake_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            answer_timeout: Duration::from_millis(policy.epoch_ms.saturating_mul(3).max(5_000)),
            max_connections: 1024,
            max_per_address: 64,
            max_per_identity: 4,
        }
    }
}

#[derive(Clone)]
pub struct ServerSetup {
    pub policy: GroupPolicy,
    pub acl: BTreeSet<String>,
    /// Fingerprints of the certificates that may administer (never an identity: any member
    /// certificate can carry any name its CA agreed to).
    pub admins: Vec<Fingerprint>,
    /// Fingerprints of the controllers that may absorb this group or hand it back (merge
    /// peers, docs/merge.md): only they are given this group's state, never an administrator.
    pub merge_peers: Vec<Fingerprint>,
    /// This controller's certificate as a TLS client: how it reaches the controller it absorbs
    /// or hands a group back to.
    pub peer_tls: Arc<rustls::ClientConfig>,
    /// Take the identity from the subject's common name when a certificate has no URI or DNS
    /// subject alternative name.
    pub identity_from_common_name: bool,
    pub limits: Limits,
    pub listen: SocketAddr,
    /// The name in this controller's certificate, for the members a merge or split moves here.
    pub server_name: TlsServerName,
    pub multicast: MulticastConfig,
    pub tls: Arc<rustls::ServerConfig>,
    pub database: PathBuf,
    /// Seals the log's secret records; without it they are stored in the clear (0600).
    pub database_key: Option<DatabaseKey>,
    /// Batches between snapshots of the log (see `Controller::set_snapshot_interval`).
    pub snapshot_interval: u64,
    pub metrics: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Controller(#[from] ControllerError),
}

/// An answer's encoded frames; those of join and resync answers carry keys: zeroized on drop.
type Frame = Zeroizing<Vec<u8>>;
type Frames = Vec<Frame>;

enum Command {
    Join { identity: String, group: GroupId, reply: oneshot::Sender<Frames> },
    Leave { identity: String, member: MemberId, reply: oneshot::Sender<Frames> },
    Refresh { identity: String, member: MemberId, rekey_seq: u64, reply: oneshot::Sender<Frames> },
    Resync { identity: String, member: MemberId, rekey_seq: u64, reply: oneshot::Sender<Frames> },
    Admin { request: AdminRequest, reply: oneshot::Sender<AdminResponse> },
    /// A standby took over with this controller (`Controller::expect_rejoins`).
    ExpectRejoins(usize),
    /// A step of a merge or split of two groups (docs/merge.md).
    Merge(MergeStep),
}

/// How long a group whose state was taken for a merge holds its batches for the hand-off.
const MERGE_HOLD: Duration = Duration::from_secs(60);

/// The steps of a merge and a split (`keycast admin merge|split`), each answered with its
/// result (errors as text).
enum MergeStep {
    /// This group's state for a merge into another; its batches wait until `HandOff` or `Abort`.
    Side { reply: oneshot::Sender<Result<MergeSide, String>> },
    /// The merge state taken by `Side` was not used: batches go on.
    Abort,
    Absorb { side: Box<MergeSide>, reply: oneshot::Sender<Result<MergeTicket, String>> },
    HandOff { ticket: Box<MergeTicket>, reply: oneshot::Sender<Result<(), String>> },
    Split { reply: oneshot::Sender<Result<Handback, String>> },
    Resume { handback: Box<Handback>, reply: oneshot::Sender<Result<(), String>> },
}

/// A running controller. Dropping it stops every task at once (as a crash would).
pub struct Server {
    pub addr: SocketAddr,
    pub verifying_key: VerifyingKey,
    commands: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    stopped: watch::Receiver<Option<String>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// What the controller task, the connections and the metrics endpoint share.
#[derive(Default)]
struct Shared {
    stats: Mutex<Stats>,
    connections: Arc<Connections>,
    /// For the status page's chart.
    recent_rekeys: RecentRekeys,
    /// The group keys data may be under, for a relay of this group (`Server::keys`).
    traffic: Mutex<Option<TrafficKeys>>,
    /// The keys of the joiners' reflector (with `policy.reflector` on).
    reflection: Arc<ReflectionFeed>,
}

impl Shared {
    fn snapshot(&self) -> Stats {
        let mut stats = self.stats.lock().expect("stats lock").clone();
        self.connections.fill(&mut stats);
        stats
    }

    fn update(&self, change: impl FnOnce(&mut Stats)) {
        change(&mut self.stats.lock().expect("stats lock"));
    }
}

impl Server {
    /// Opens the log (restoring the group if it exists), binds the sockets and starts.
    pub async fn start(setup: ServerSetup) -> Result<Server, ServerError> {
        let (mut store, log) = Store::open_sealed(&setup.database, setup.database_key)?;
        let now = now_ms();
        let mut controller = if log.is_empty() {
            let (controller, genesis) = Controller::create(setup.policy, setup.acl.clone(), now, entropy(), entropy())?;
            if let Output::Persist(record) = genesis {
                store.append(&[record])?;
            }
            controller
        } else {
            tracing::info!(records = log.len(), "restoring the group from its log");
            Controller::restore(setup.policy, setup.acl.clone(), &log, now)?
        };
        controller.set_snapshot_interval(setup.snapshot_interval);
        let (listener, udp_socket) = bind_tcp_and_udp(setup.listen).await?;
        let addr = listener.local_addr()?;
        let socket = multicast::sender(&setup.multicast)?;
        // After a restart, send the last rekey again: members that missed it catch up.
        for packet in controller.last_rekey() {
            socket.send_to(packet, setup.multicast.address).await?;
        }
        let heartbeats = Arc::new(Mutex::new(controller.hand_over_heartbeats().expect("a restored controller sends heartbeats")));
        let steps = Steps::new();
        spawn_heartbeats(&heartbeats, &steps, multicast::blocking_sender(&setup.multicast)?, setup.multicast.address)?;
        let verifying_key = controller.verifying_key();
        let shared = Arc::new(Shared::default());
        shared.update(|s| s.group = setup.policy.group.0);
        let (commands, rx) = mpsc::channel(1024);
        // Liveness datagrams come on the TLS listener's address, over UDP; a queue of their
        // own, so a flood of them never delays a join or an admin order.
        let udp_socket = Arc::new(udp_socket);
        let (udp_queue, udp_requests) = mpsc::channel(UDP_REQUEST_QUEUE);
        let tick = (setup.policy.epoch_ms.min(setup.policy.heartbeat_ms) / 5).clamp(2, 100);
        let driver = ControllerTask {
            heartbeat_generation: controller.heartbeat_generation(),
            heartbeats,
            steps,
            controller,
            store,
            database: setup.database.clone(),
            socket,
            group: setup.multicast.address,
            shared: shared.clone(),
            joins: HashMap::new(),
            join_conns: HashMap::new(),
            error_log: LogLimiter::default(),
            udp_requests,
            unicast: udp_socket.clone(),
            addr,
            server_name: setup.server_name,
            merging: None,
        };
        // Stats and keys from the start: a relay restarted from its log reads them at once.
        driver.publish_stats();
        let (stop, stopped) = watch::channel(None);
        let mut tasks = vec![tokio::spawn(async move {
            let reason = driver.run(rx, Duration::from_millis(tick)).await;
            tracing::error!(%reason, "controller stopped");
            let _ = stop.send(Some(reason));
        })];
        let listener_context = Arc::new(Listener {
            acceptor: TlsAcceptor::from(setup.tls.clone()),
            commands: commands.clone(),
            admins: setup.admins,
            merge_peers: setup.merge_peers,
            peer_tls: setup.peer_tls,
            identity_from_common_name: setup.identity_from_common_name,
            limits: setup.limits,
            shared: shared.clone(),
        });
        tasks.push(tokio::spawn(accept_loop(listener, listener_context)));
        tasks.push(tokio::spawn(receive_udp_requests(udp_socket, udp_queue, shared.clone())));
        if setup.policy.reflector {
            tasks.push(reflector::spawn(&setup.multicast, setup.policy.group, shared.reflection.clone())?);
        }
        if let Some(metrics) = setup.metrics {
            tasks.push(tokio::spawn(serve_metrics(metrics, shared.clone(), commands.clone())));
        }
        tracing::info!(%addr, group = setup.policy.group.0, "controller listening");
        Ok(Server { addr, verifying_key, commands, shared, stopped, tasks })
    }

    /// Stops every task at once, as a crash would, and waits until they are gone (so the
    /// log's lock is free for a restart in the same process).
    pub async fn kill(mut self) {
        let tasks = std::mem::take(&mut self.tasks);
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            let _ = task.await;
        }
    }

    /// Resolves when the controller task has ended (only a failure of its log ends it), with
    /// the reason for the operator.
    pub async fn stopped(&self) -> String {
        let mut stopped = self.stopped.clone();
        let reason = match stopped.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            Err(_) => "the controller task ended".into(),
        };
        reason
    }

    pub fn stats(&self) -> Stats {
        self.shared.snapshot()
    }

    /// Records that this controller runs a relay's subgroup (reported to admins).
    pub fn set_parent(&self, link: ParentLink) {
        self.shared.update(|stats| stats.parent = Some(link));
    }

    /// Handles that stop this controller's tasks (a relay that steps down holds them).
    pub fn abort_handles(&self) -> Vec<tokio::task::AbortHandle> {
        self.tasks.iter().map(JoinHandle::abort_handle).collect()
    }

    /// Where a relay reads this group's traffic keys as the controller task updates them.
    pub fn keys(&self) -> GroupKeys {
        GroupKeys(self.shared.clone())
    }

    /// Evicts `member` (as `keycast admin evict` does).
    pub async fn evict(&self, member: MemberId) -> bool {
        matches!(self.admin(AdminRequest::Evict { member: member.0 }).await, Some(AdminResponse::Evicted { found: true, .. }))
    }

    /// This controller took over a subgroup whose `members` rejoin now: their batch closes
    /// once they are all in (`Controller::expect_rejoins`).
    pub async fn expect_rejoins(&self, members: usize) {
        let _ = self.commands.send(Command::ExpectRejoins(members)).await;
    }

    /// The controller's members, by id and identity.
    pub async fn members(&self) -> Vec<MemberRow> {
        match self.admin(AdminRequest::List).await {
            Some(AdminResponse::Members(rows)) => rows,
            _ => Vec::new(),
        }
    }

    async fn admin(&self, request: AdminRequest) -> Option<AdminResponse> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(Command::Admin { request, reply }).await.ok()?;
        answer.await.ok()
    }
}

/// A running controller's traffic keys (the active one to wrap under, and those members may
/// wrap under now), as of the controller task's last step.
#[derive(Clone)]
pub struct GroupKeys(Arc<Shared>);

impl GroupKeys {
    pub fn get(&self) -> Option<TrafficKeys> {
        self.0.traffic.lock().expect("traffic keys lock").clone()
    }
}

/// A join waiting for its epoch's rekey.
struct WaitingJoin {
    reply: oneshot::Sender<Frames>,
    since: Instant,
}

/// When the controller task last finished a step, and since when it is in one (0: none), for
/// the heartbeat thread: its heartbeats stop when the task stops stepping.
struct Steps {
    last_ms: AtomicU64,
    since_ms: AtomicU64,
}

impl Steps {
    fn new() -> Arc<Steps> {
        Arc::new(Steps { last_ms: AtomicU64::new(now_ms()), since_ms: AtomicU64::new(0) })
    }

    fn begin(&self) {
        self.since_ms.store(now_ms(), Ordering::Relaxed);
    }

    fn end(&self) {
        self.last_ms.store(now_ms(), Ordering::Relaxed);
        self.since_ms.store(0, Ordering::Relaxed);
    }

    fn alive(&self, now_ms: u64, heartbeat_ms: u64) -> bool {
        let since = Some(self.since_ms.load(Ordering::Relaxed)).filter(|s| *s > 0);
        controller_alive(now_ms, heartbeat_ms, self.last_ms.load(Ordering::Relaxed), since)
    }
}

/// Longest sleep of the heartbeat thread: how soon it notices that the controller stopped.
const HEARTBEAT_STOP_CHECK: Duration = Duration::from_millis(50);
/// How often the heartbeat thread looks whether a held change has gone out (or a stalled
/// controller steps again).
const HEARTBEAT_HOLD_CHECK: Duration = Duration::from_millis(1);

/// Starts the thread that sends the heartbeats on time, whatever the runtime's workers are
/// doing. It runs while the controller task holds `heartbeats` (a controller that stopped
/// sends nothing more).
fn spawn_heartbeats(heartbeats: &Arc<Mutex<Heartbeats>>, steps: &Arc<Steps>, socket: std::net::UdpSocket, group: SocketAddrV4) -> std::io::Result<()> {
    let heartbeats = Arc::downgrade(heartbeats);
    let steps = steps.clone();
    std::thread::Builder::new().name("heartbeats".into()).spawn(move || {
        crate::priority::run_ahead_of_the_rest("heartbeats");
        while let Some(heartbeats) = heartbeats.upgrade() {
            // Locked while sending: a change held after this heartbeat left.
            let mut beats = lock(&heartbeats);
            let now = now_ms();
            // A stalled controller's heartbeats are not sent, nor counted as sent.
            let alive = steps.alive(now, beats.interval_ms());
            for bytes in if alive { beats.beat(now) } else { Vec::new() } {
                if let Err(e) = socket.send_to(&bytes, group) {
                    tracing::warn!(error = %e, "heartbeat not sent");
                }
            }
            let wait = match beats.held() || !alive {
                true => HEARTBEAT_HOLD_CHECK,
                false => Duration::from_millis(beats.next_ms().saturating_sub(now_ms())),
            };
            drop(beats);
            drop(heartbeats);
            std::thread::sleep(wait.min(HEARTBEAT_STOP_CHECK));
        }
    })?;
    Ok(())
}

struct ControllerTask {
    controller: Controller,
    /// The heartbeats' state, shared with their thread, and the controller's state they carry.
    heartbeats: Arc<Mutex<Heartbeats>>,
    heartbeat_generation: [u64; 4],
    /// Its steps, as the heartbeat thread sees them.
    steps: Arc<Steps>,
    store: Store,
    database: PathBuf,
    socket: UdpSocket,
    group: SocketAddrV4,
    shared: Arc<Shared>,
    /// Every connection waiting for a member's join answer (one identity may hold several:
    /// the core answers only the newest, the driver answers them all).
    joins: HashMap<MemberId, Vec<WaitingJoin>>,
    /// The member each join connection waits for.
    join_conns: HashMap<ConnId, MemberId>,
    error_log: LogLimiter,
    /// Liveness datagrams, resync requests and NAKs (and their sources) from the UDP task,
    /// checked here (the controller owns the keys); resync answers go back on `unicast`.
    udp_requests: mpsc::Receiver<UdpRequest>,
    unicast: Arc<UdpSocket>,
    /// The TLS address members reach this controller at, and the name in its certificate
    /// (both named in merge notices).
    addr: SocketAddr,
    server_name: TlsServerName,
    /// This group's state was taken for a merge: no batch until it is handed off, the merge
    /// aborted, or this deadline passes (an administrator that went away holds nothing for long).
    merging: Option<Instant>,
}

impl ControllerTask {
    /// Runs until the log fails (or the server is dropped); returns why it stopped.
    async fn run(mut self, mut commands: mpsc::Receiver<Command>, tick: Duration) -> String {
        let mut interval = tokio::time::interval(tick);
        let mut next_conn: ConnId = 0;
        loop {
            let step = tokio::select! {
                command = commands.recv() => match command {
                    None => return "the server was dropped".into(),
                    Some(command) => {
                        next_conn += 1;
                        self.steps.begin();
                        self.handle(command, next_conn).await
                    }
                },
                _ = interval.tick() => {
                    self.steps.begin();
                    self.tick().await
                }
                Some(request) = self.udp_requests.recv() => {
                    // Datagrams change no member, key or epoch: the published state stands
                    // (a million members refresh tens of thousands of times a second).
                    self.udp_request(&request.bytes[..request.len], request.from).await;
                    self.steps.end();
                    continue;
                }
            };
            self.steps.end();
            if let Err(error) = step {
                // A controller that cannot persist must not send anything more.
                return format!(
                    "cannot write the controller's log {}: {error}; nothing more was sent. Fix the disk (space, permissions), then restart: the controller resumes from the log",
                    self.database.display()
                );
            }
            self.publish_stats();
        }
    }

    async fn tick(&mut self) -> Result<(), StoreError> {
        self.forget_abandoned_joins();
        if self.merging.is_some_and(|until| Instant::now() < until) {
            return Ok(());
        }
        self.merging = None;
        match self.controller.tick(now_ms(), entropy()) {
            Ok(outputs) => self.deliver(outputs).await,
            Err(error) => {
                self.controller_failed("closing the epoch", &error);
                Ok(())
            }
        }
    }

    /// Logs an error of the core and goes on: no request may stop the controller. A failed
    /// batch drops its requests, so the joins waiting for it are refused now, not at their
    /// deadline.
    fn controller_failed(&mut self, doing: &str, error: &ControllerError) {
        self.shared.update(|s| s.controller_errors += 1);
        if let Some(suppressed) = self.error_log.ready() {
            tracing::error!(%error, suppressed, "controller error while {doing}; it goes on");
        }
        let refusal = refusal_frame(RefusalReason::Unavailable, format!("the controller failed while {doing} ({error}); try again"));
        self.join_conns.clear();
        for waiting in std::mem::take(&mut self.joins).into_values().flatten() {
            let _ = waiting.reply.send(vec![refusal.clone()]);
        }
    }

    /// A datagram from `from`: a NAK, a refresh, or a resync request answered to `from`.
    async fn udp_request(&mut self, datagram: &[u8], from: SocketAddr) {
        if keycast_core::wire::message_type(datagram) == Ok(MessageType::Nak) {
            match self.controller.nak(datagram, now_ms()) {
                Ok(_) => self.shared.update(|s| s.naks_received += 1),
                Err(refused) => {
                    self.shared.update(|s| s.liveness_refused += 1);
                    tracing::debug!(%refused, "NAK refused");
                }
            }
            return;
        }
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&entropy()[..12]);
        match self.controller.liveness(datagram, now_ms(), nonce) {
            Ok(LivenessAnswer::Refreshed(_)) => self.shared.update(|s| s.liveness_accepted += 1),
            Ok(LivenessAnswer::Resync(member, sealed)) => {
                self.shared.update(|s| {
                    s.liveness_accepted += 1;
                    s.udp_resyncs += 1;
                });
                tracing::debug!(member = member.0, "resync over UDP");
                if let Err(e) = self.unicast.send_to(&sealed, from).await {
                    tracing::debug!(error = %e, "resync answer not sent");
                }
            }
            Ok(LivenessAnswer::Departed(member, refusal)) => {
                self.shared.update(|s| {
                    s.liveness_refused += 1;
                    s.udp_refusals += 1;
                });
                tracing::debug!(member = member.0, "resync over UDP refused: not a member");
                if let Err(e) = self.unicast.send_to(&refusal, from).await {
                    tracing::debug!(error = %e, "refusal not sent");
                }
            }
            Err(refused) => {
                self.shared.update(|s| s.liveness_refused += 1);
                tracing::debug!(%refused, "liveness datagram refused");
            }
        }
    }

    /// Drops the waiting joins whose connection has given up (its answer deadline passed).
    fn forget_abandoned_joins(&mut self) {
        self.joins.retain(|_, waiting| {
            waiting.retain(|w| !w.reply.is_closed());
            !waiting.is_empty()
        });
        let joins = &self.joins;
        self.join_conns.retain(|_, member| joins.contains_key(member));
    }

    fn publish_stats(&self) {
        let now = now_ms();
        self.shared.update(|stats| {
            stats.members = self.controller.members().len();
            stats.epoch = self.controller.epoch_at(now);
            stats.rekeys = self.controller.rekey_seq();
            stats.active_key = self.controller.active_key(stats.epoch).to_string();
            stats.rho = self.controller.rho();
        });
        *self.shared.traffic.lock().expect("traffic keys lock") = Some(self.controller.traffic_keys(now));
        self.shared.reflection.publish(self.controller.reflection_keys(now));
    }

    async fn handle(&mut self, command: Command, conn: ConnId) -> Result<(), StoreError> {
        let now = now_ms();
        match command {
            Command::Join { identity, group, reply } => match self.controller.join(conn, &identity, group, now) {
                Ok(JoinStatus::Queued(member)) => {
                    tracing::info!(%identity, member = member.0, "join accepted, waiting for the epoch's rekey");
                    self.joins.entry(member).or_default().push(WaitingJoin { reply, since: Instant::now() });
                    self.join_conns.insert(conn, member);
                }
                Ok(JoinStatus::Admitted(answer)) => {
                    tracing::info!(%identity, "already a member: keys sent again");
                    let (answer, keys) = *answer;
                    let _ = reply.send(vec![answer.encode().into(), keys.encode().into()]);
                }
                Err(refusal) => refuse(&identity, refusal, reply),
            },
            Command::Leave { identity, member, reply } => match self.controller.leave(&identity, member) {
                Ok(outputs) => {
                    self.deliver(outputs).await?;
                    let _ = reply.send(vec![keycast_core::wire::Leave { group: self.controller.policy().group, member }.encode().into()]);
                }
                Err(refusal) => refuse(&identity, refusal, reply),
            },
            Command::Refresh { identity, member, rekey_seq, reply } => match self.controller.refresh(&identity, member, rekey_seq, now) {
                Ok(()) => {
                    let refresh = keycast_core::wire::Refresh { group: self.controller.policy().group, member, rekey_seq: self.controller.rekey_seq() };
                    let _ = reply.send(vec![refresh.encode().into()]);
                }
                Err(refusal) => refuse(&identity, refusal, reply),
            },
            Command::Resync { identity, member, rekey_seq, reply } => match self.controller.resync(&identity, member, rekey_seq, now) {
                Ok(answer) => {
                    tracing::info!(%identity, member = member.0, "resync");
                    self.shared.update(|s| s.resyncs += 1);
                    let _ = reply.send(vec![answer.encode().into()]);
                }
                Err(refusal) => refuse(&identity, refusal, reply),
            },
            Command::Admin { request, reply } => {
                let response = self.admin(request).await?;
                let _ = reply.send(response);
            }
            Command::ExpectRejoins(members) => self.controller.expect_rejoins(members),
            Command::Merge(step) => self.merge_step(step).await?,
        }
        Ok(())
    }

    /// One step of a merge or split; the controller's refusals go back to the caller.
    async fn merge_step(&mut self, step: MergeStep) -> Result<(), StoreError> {
        let here = Contact { controller: self.addr, server_name: self.server_name.clone(), multicast: SocketAddr::V4(self.group) };
        let now = now_ms();
        let text = |e: ControllerError| e.to_string();
        match step {
            MergeStep::Side { reply } => {
                let side = self.controller.merge_side(here).map_err(text);
                self.merging = side.is_ok().then(|| Instant::now() + MERGE_HOLD);
                let _ = reply.send(side);
            }
            MergeStep::Abort => self.merging = None,
            MergeStep::Absorb { side, reply } => match self.controller.absorb(*side, here, now, entropy()) {
                Ok((outputs, ticket)) => {
                    self.deliver(outputs).await?;
                    tracing::info!(offset = ticket.offset, "absorbed another group: running the merged group");
                    let _ = reply.send(Ok(ticket));
                }
                Err(e) => drop(reply.send(Err(text(e)))),
            },
            MergeStep::HandOff { ticket, reply } => match self.controller.hand_off(&ticket) {
                Ok(outputs) => {
                    self.merging = None;
                    self.deliver(outputs).await?;
                    // The heartbeats repeat the notice from now on (nothing else of theirs changed).
                    lock(&self.heartbeats).update(self.controller.heartbeat_content());
                    tracing::info!(to = ticket.merged.group.0, "handed this group off to the merged group");
                    let _ = reply.send(Ok(()));
                }
                Err(e) => drop(reply.send(Err(text(e)))),
            },
            MergeStep::Split { reply } => match self.controller.split(now, entropy()) {
                Ok((outputs, handback)) => {
                    self.deliver(outputs).await?;
                    tracing::info!(group = handback.right.fixed.group.0, members = handback.members.len(), "split: the absorbed group handed back");
                    let _ = reply.send(Ok(handback));
                }
                Err(e) => drop(reply.send(Err(text(e)))),
            },
            MergeStep::Resume { handback, reply } => match self.controller.resume(*handback, now, entropy()) {
                Ok(outputs) => {
                    self.deliver(outputs).await?;
                    tracing::info!("resumed this group after a split");
                    let _ = reply.send(Ok(()));
                }
                Err(e) => drop(reply.send(Err(text(e)))),
            },
        }
        Ok(())
    }

    async fn admin(&mut self, request: AdminRequest) -> Result<AdminResponse, StoreError> {
        let now = now_ms();
        let order = format!("{request:?}");
        if let Some(identity) = request.identity() {
            if let Err(error) = crate::tls::check_identity(identity) {
                return Ok(AdminResponse::Error(format!("{identity:?}: {error}")));
            }
        }
        let controller = &mut self.controller;
        let (outputs, response) = match request {
            AdminRequest::List => {
                let rows = controller
                    .members()
                    .iter()
                    .map(|(m, r)| MemberRow { member: m.0, identity: r.identity.clone(), last_seen_ms: r.last_seen_ms, idle_ms: now.saturating_sub(r.last_seen_ms) })
                    .collect();
                return Ok(AdminResponse::Members(rows));
            }
            AdminRequest::AclList => {
                return Ok(AdminResponse::Acl { acl: controller.acl().iter().cloned().collect(), revoked: controller.revoked().iter().cloned().collect() })
            }
            AdminRequest::Stats => return Ok(AdminResponse::Stats(self.shared.snapshot())),
            AdminRequest::Evict { member } => {
                let found = controller.members().contains_key(&MemberId(member));
                (controller.evict(MemberId(member), now, entropy()), AdminResponse::Evicted { member, found })
            }
            AdminRequest::Revoke { identity } => {
                let member = controller.member_by_identity(&identity).map(|m| m.0);
                let outputs = controller.revoke(&identity, now, entropy());
                (outputs, AdminResponse::Revoked { identity, member })
            }
            AdminRequest::Readmit { identity } => {
                let outputs = controller.readmit(&identity);
                let changed = !outputs.is_empty();
                (Ok(outputs), AdminResponse::Readmitted { identity, changed })
            }
            AdminRequest::AclAdd { identity } => {
                let outputs = controller.acl_add(&identity);
                let changed = !outputs.is_empty();
                (Ok(outputs), AdminResponse::AclChanged { identity, added: true, changed, evicted: None })
            }
            AdminRequest::AbsorbFrom { .. } | AdminRequest::SplitTo { .. } | AdminRequest::MergeSide | AdminRequest::AbortMerge | AdminRequest::HandOff { .. } | AdminRequest::Resume { .. } => {
                return Ok(AdminResponse::Error("merge steps are served on their connection (serve_merge_step, serve_merge_order)".into()))
            }
            AdminRequest::RotateSigningKey => {
                let outputs = controller.rotate_signing_key(entropy());
                let verifying_key = hex::encode(controller.verifying_key().0);
                (Ok(outputs), AdminResponse::SigningKeyRotated { change: controller.signer_changes(), verifying_key })
            }
            AdminRequest::Transition { flat_id_bits } => {
                let outputs = match flat_id_bits {
                    None => controller.switch_to_tree(now),
                    Some(id_bits) => controller.switch_to_flat(id_bits, now, entropy()),
                };
                (outputs, AdminResponse::Transitioned { scheme: format!("{:?}", controller.scheme().scheme), seq: controller.rekey_seq() })
            }
            AdminRequest::AclRemove { identity } => {
                let changed = controller.acl().contains(&identity);
                let evicted = controller.member_by_identity(&identity).map(|m| m.0);
                let outputs = controller.acl_remove(&identity, now, entropy());
                (outputs, AdminResponse::AclChanged { identity, added: false, changed, evicted })
            }
        };
        match outputs {
            Ok(outputs) => self.deliver(outputs).await?,
            Err(error) => {
                self.controller_failed("serving an admin request", &error);
                return Ok(AdminResponse::Error(format!("{order} failed: {error}; the controller goes on")));
            }
        }
        match &response {
            AdminResponse::Evicted { .. } | AdminResponse::Revoked { .. } => tracing::info!(order, ?response, "eviction ordered"),
            _ => tracing::info!(order, ?response, "admin order carried out"),
        }
        Ok(response)
    }

    /// Carries out outputs in order; records are made durable before anything after them.
    async fn deliver(&mut self, outputs: Vec<Output>) -> Result<(), StoreError> {
        let mut records = Vec::new();
        // A change's heartbeats are held from its first datagram to its last (see
        // `renew_heartbeats`), before anything else reveals it (a join's answer).
        let (mut hold, mut held) = (self.controller.heartbeat_generation() != self.heartbeat_generation, false);
        for output in outputs {
            if let Output::Persist(record) = output {
                records.push(record);
                continue;
            }
            self.store.append(&std::mem::take(&mut records))?;
            if held && !matches!(output, Output::Multicast(_)) {
                held = false;
                self.renew_heartbeats();
            }
            match output {
                Output::Persist(_) => unreachable!("handled above"),
                Output::Multicast(bytes) => {
                    if std::mem::take(&mut hold) {
                        held = true;
                        lock(&self.heartbeats).hold();
                    }
                    if let Err(e) = self.socket.send_to(&bytes, self.group).await {
                        tracing::warn!(error = %e, "multicast send failed");
                    }
                }
                Output::JoinAnswer { conn, answer, keys } => self.answer_join(conn, answer, keys.map(|k| k.encode().into())),
                Output::Repaired { seq, naks, packets, bytes } => {
                    tracing::info!(seq, naks, packets, "repair round sent");
                    self.shared.update(|s| {
                        s.naks += naks as u64;
                        s.repair_packets += packets as u64;
                        s.repair_rounds += 1;
                        s.parity_bytes += bytes as u64;
                    });
                }
                Output::Departed { member, identity, why } => tracing::info!(member = member.0, %identity, ?why, "member removed"),
                Output::Rekeyed { seq, epoch, wraps, packets, bytes, parity, parity_bytes } => {
                    tracing::info!(seq, epoch, wraps, packets, bytes, parity, "rekey sent");
                    let members = self.controller.members().len() as u64;
                    self.shared.recent_rekeys.push(RekeyPoint { seq, epoch, bytes: bytes as u64, members });
                    self.shared.update(|s| {
                        s.rekey_bytes += bytes as u64;
                        s.parity_packets += parity as u64;
                        s.parity_bytes += parity_bytes as u64;
                    });
                }
            }
        }
        self.store.append(&records)?;
        self.renew_heartbeats();
        Ok(())
    }

    /// Gives the heartbeats the controller's changed state (a rekey, a signing key), once the
    /// change is persisted and its datagrams are out (they were held meanwhile): a heartbeat
    /// never names a rekey before its packets, and none naming the state before follows them.
    fn renew_heartbeats(&mut self) {
        let generation = self.controller.heartbeat_generation();
        if generation != self.heartbeat_generation {
            self.heartbeat_generation = generation;
            let content = self.controller.heartbeat_content();
            lock(&self.heartbeats).update(content);
        }
    }

    /// Sends a join's answer to every connection waiting for that member.
    fn answer_join(&mut self, conn: ConnId, answer: JoinAnswer, keys: Option<Frame>) {
        let member = match (&answer, self.join_conns.get(&conn)) {
            (_, Some(member)) => *member,
            (JoinAnswer::Accepted(accepted), None) => accepted.member,
            (JoinAnswer::Refused { .. }, None) => return,
        };
        let Some(waiting) = self.joins.remove(&member) else { return };
        self.join_conns.retain(|_, m| *m != member);
        let mut frames: Frames = vec![answer.encode().into()];
        frames.extend(keys);
        if let Some(first) = waiting.iter().map(|w| w.since).min() {
            let latency = first.elapsed().as_secs_f64() * 1000.0;
            self.shared.update(|stats| {
                stats.mean_join_latency_ms = (stats.mean_join_latency_ms * stats.joins as f64 + latency) / (stats.joins + 1) as f64;
                stats.joins += 1;
            });
        }
        for w in waiting {
            let _ = w.reply.send(frames.clone());
        }
    }
}

fn refuse(identity: &str, refusal: Refusal, reply: oneshot::Sender<Frames>) {
    tracing::warn!(%identity, reason = %refusal, "request refused");
    let _ = reply.send(vec![refusal_frame(refusal.reason, refusal.detail)]);
}

fn refusal_frame(reason: RefusalReason, detail: String) -> Frame {
    JoinAnswer::Refused { reason, detail }.encode().into()
}

/// Counts open connections by source address and identity, against the caps.
#[derive(Default)]
struct Connections {
    open: Mutex<OpenConnections>,
    over_cap: AtomicU64,
    answers_timed_out: AtomicU64,
}

#[derive(Default)]
struct OpenConnections {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
    by_identity: HashMap<String, usize>,
}

impl Connections {
    fn fill(&self, stats: &mut Stats) {
        stats.connections_open = self.open.lock().expect("connections lock").total as u64;
        stats.connections_over_cap = self.over_cap.load(Ordering::Relaxed);
        stats.answers_timed_out = self.answers_timed_out.load(Ordering::Relaxed);
    }

    /// A slot for a new connection from `address`, or None over the total or address cap.
    fn admit(self: &Arc<Self>, address: IpAddr, limits: &Limits) -> Option<AddressSlot> {
        let mut open = self.open.lock().expect("connections lock");
        let from_address = open.by_address.get(&address).copied().unwrap_or(0);
        if open.total >= limits.max_connections || from_address >= limits.max_per_address {
            self.over_cap.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        open.total += 1;
        *open.by_address.entry(address).or_default() += 1;
        Some(AddressSlot { connections: self.clone(), address })
    }

    /// A slot for one more connection of `identity`, or None over its cap.
    fn claim(self: &Arc<Self>, identity: &str, limits: &Limits) -> Option<IdentitySlot> {
        let mut open = self.open.lock().expect("connections lock");
        let count = open.by_identity.entry(identity.to_owned()).or_default();
        if *count >= limits.max_per_identity {
            self.over_cap.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *count += 1;
        Some(IdentitySlot { connections: self.clone(), identity: identity.to_owned() })
    }
}

fn release<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, usize>, key: &K) {
    if let Some(count) = counts.get_mut(key) {
        *count -= 1;
        if *count == 0 {
            counts.remove(key);
        }
    }
}

/// One open connection from an address; released when dropped.
struct AddressSlot {
    connections: Arc<Connections>,
    address: IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.connections.open.lock().expect("connections lock");
        open.total -= 1;
        release(&mut open.by_address, &self.address);
    }
}

/// One open connection of an identity; released when dropped.
struct IdentitySlot {
    connections: Arc<Connections>,
    identity: String,
}

impl Drop for IdentitySlot {
    fn drop(&mut self) {
        release(&mut self.connections.open.lock().expect("connections lock").by_identity, &self.identity);
    }
}

/// Doubles the pause after each failed accept (out of descriptors, say) from 5 ms to 1 s, so
/// a failing listener neither spins nor starves the runtime; a success resets it.
struct AcceptBackoff {
    next: Duration,
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(5);
    const MOST: Duration = Duration::from_secs(1);

    fn new() -> Self {
        AcceptBackoff { next: Self::FIRST }
    }

    fn failed(&mut self) -> Duration {
        let pause = self.next;
        self.next = (self.next * 2).min(Self::MOST);
        pause
    }

    fn succeeded(&mut self) {
        self.next = Self::FIRST;
    }
}

/// Lets a repeated log line through at most once a second, counting the ones it held back.
#[derive(Default)]
struct LogLimiter {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    /// Some(lines held back since the last one) when a line may be logged now.
    fn ready(&mut self) -> Option<u64> {
        if self.last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Accepts with a backoff on errors; `serve` gets each accepted stream.
async fn accept_with_backoff(listener: &TcpListener, what: &str, mut serve: impl FnMut(TcpStream, SocketAddr)) -> ! {
    let mut backoff = AcceptBackoff::new();
    let mut log = LogLimiter::default();
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                backoff.succeeded();
                serve(tcp, peer);
            }
            Err(error) => {
                let pause = backoff.failed();
                if let Some(suppressed) = log.ready() {
                    tracing::warn!(%error, what, pause_ms = pause.as_millis() as u64, suppressed, "accept failed (out of file descriptors? raise `ulimit -n` or lower the connection caps); pausing");
                }
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// What each connection of the TLS listener needs.
struct Listener {
    acceptor: TlsAcceptor,
    commands: mpsc::Sender<Command>,
    admins: Vec<Fingerprint>,
    merge_peers: Vec<Fingerprint>,
    peer_tls: Arc<rustls::ClientConfig>,
    identity_from_common_name: bool,
    limits: Limits,
    shared: Arc<Shared>,
}

impl Listener {
    fn is_admin(&self, fingerprint: &Fingerprint) -> bool {
        listed(&self.admins, fingerprint)
    }

    fn is_merge_peer(&self, fingerprint: &Fingerprint) -> bool {
        listed(&self.merge_peers, fingerprint)
    }
}

/// Whether `fingerprint` is in `list`; every entry is compared, so the time does not tell
/// which one matched.
fn listed(list: &[Fingerprint], fingerprint: &Fingerprint) -> bool {
    list.iter().fold(false, |found, entry| entry.matches(fingerprint) | found)
}

/// The socket for liveness datagrams, resync requests and NAKs, with a receive buffer of 4 MiB
/// (the kernel may cap it): a rekey's NAKs from thousands of members arrive within tens of ms.
fn udp_request_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    socket.set_recv_buffer_size(4 << 20)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// The TLS listener and the UDP socket on the same address. With port 0 the kernel picks the
/// TCP port, and that port may be taken for UDP (another process's ephemeral socket): then
/// another port is tried, a few times.
async fn bind_tcp_and_udp(listen: SocketAddr) -> std::io::Result<(TcpListener, UdpSocket)> {
    let mut tries = if listen.port() == 0 { 16 } else { 1 };
    loop {
        let listener = TcpListener::bind(listen).await?;
        match udp_request_socket(listener.local_addr()?) {
            Ok(udp) => return Ok((listener, udp)),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries > 1 => tries -= 1,
            Err(e) => return Err(e),
        }
    }
}

/// UDP requests waiting for the controller task, at most; more are dropped and counted.
const UDP_REQUEST_QUEUE: usize = 4096;
/// The longest datagram the controller takes over UDP (a NAK naming 64 blocks is 460 bytes).
const MAX_UDP_REQUEST: usize = 512;

/// A datagram for the controller task: a liveness datagram, a resync request or a NAK.
struct UdpRequest {
    bytes: [u8; MAX_UDP_REQUEST],
    len: usize,
    from: SocketAddr,
}

/// Reads datagrams and queues those of a request's type and length for the controller task.
/// Anything else, and whatever does not fit in the queue, is dropped and counted.
async fn receive_udp_requests(socket: Arc<UdpSocket>, queue: mpsc::Sender<UdpRequest>, shared: Arc<Shared>) {
    let mut buf = [0u8; MAX_UDP_REQUEST + 1];
    loop {
        let Ok((len, from)) = socket.recv_from(&mut buf).await else { continue };
        let expected = match keycast_core::wire::message_type(&buf[..len]) {
            Ok(MessageType::Liveness | MessageType::ResyncProbe) => len == LIVENESS_LEN,
            Ok(MessageType::Nak) => len <= MAX_UDP_REQUEST,
            _ => false,
        };
        if !expected {
            shared.update(|s| s.liveness_refused += 1);
            continue;
        }
        let mut request = UdpRequest { bytes: [0u8; MAX_UDP_REQUEST], len, from };
        request.bytes[..len].copy_from_slice(&buf[..len]);
        if queue.try_send(request).is_err() {
            shared.update(|s| s.liveness_dropped += 1);
        }
    }
}

async fn accept_loop(listener: TcpListener, context: Arc<Listener>) {
    accept_with_backoff(&listener, "TLS listener", |tcp, peer| {
        // Over a cap, the connection is closed at once, before any handshake work.
        let Some(slot) = context.shared.connections.admit(peer.ip(), &context.limits) else {
            tracing::debug!(%peer, "connection closed at once: too many connections (in total or from this address)");
            return;
        };
        let context = context.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(reason) = serve_connection(tcp, &context).await {
                // Debug: anyone can open connections, and none may flood the log.
                tracing::debug!(%peer, %reason, "connection refused");
            }
        });
    })
    .await
}

type Tls = TlsStream<TcpStream>;

async fn serve_connection(tcp: TcpStream, context: &Listener) -> Result<(), String> {
    let limits = &context.limits;
    // A refused handshake closes cleanly after its alert, so the client reads the refusal.
    let mut tls = match tokio::time::timeout(limits.handshake_timeout, context.acceptor.accept(tcp).into_fallible()).await {
        Err(_) => return Err("TLS handshake timed out".to_string()),
        Ok(Err((e, tcp))) => {
            close_after_alert(tcp).await;
            return Err(format!("TLS handshake failed: {e}"));
        }
        Ok(Ok(tls)) => tls,
    };
    let certificate = peer_certificate(tls.get_ref().1).map_err(|e| e.to_string())?;
    let fingerprint = Fingerprint::of_der(certificate);
    let identity = peer_identity(certificate, context.identity_from_common_name);
    let frame = tokio::time::timeout(limits.request_timeout, read_frame(&mut tls))
        .await
        .map_err(|_| format!("{fingerprint}: no request in time"))?
        .map_err(|e| format!("{fingerprint}: {e}"))?;
    // Refusals come after the request is read: closing with unread data would reset the
    // connection and lose the refusal.
    let admin_request = admin::is_admin_frame(&frame);
    let identity = match identity {
        Ok(identity) => identity,
        Err(error) => {
            let detail = format!("certificate {fingerprint}: {error}");
            match admin_request {
                true => refuse_admin(&mut tls, limits, detail.clone()).await,
                false => refuse_join(&mut tls, limits, RefusalReason::NotInAcl, detail.clone()).await,
            }
            return Err(detail);
        }
    };
    match admin_request {
        true => serve_admin(tls, context, &identity, &fingerprint, &frame).await,
        false => serve_member(tls, context, &identity, &frame).await,
    }
}

fn over_identity_cap(identity: &str, limits: &Limits) -> String {
    format!("{identity} already has {} connections open, the most allowed; wait for their answers and try again", limits.max_per_identity)
}

async fn serve_member(mut tls: Tls, context: &Listener, identity: &str, frame: &[u8]) -> Result<(), String> {
    let limits = &context.limits;
    let message = Message::decode(frame).map_err(|e| format!("{identity}: {e}"))?;
    let (reply, answer) = oneshot::channel();
    let identity = identity.to_owned();
    let command = match message {
        Message::JoinRequest(r) => Command::Join { identity: identity.clone(), group: r.group, reply },
        Message::Leave(l) => Command::Leave { identity: identity.clone(), member: l.member, reply },
        Message::Refresh(r) => Command::Refresh { identity: identity.clone(), member: r.member, rekey_seq: r.rekey_seq, reply },
        Message::ResyncRequest(r) => Command::Resync { identity: identity.clone(), member: r.member, rekey_seq: r.rekey_seq, reply },
        other => return Err(format!("{identity}: unexpected {:?} on the TLS channel", MessageType::of(&other))),
    };
    // Only a join is answered "unavailable": members take a refused refresh or resync for an
    // eviction, so those connections are closed instead and the member retries.
    let is_join = matches!(command, Command::Join { .. });
    let Some(_identity_slot) = context.shared.connections.claim(&identity, limits) else {
        let detail = over_identity_cap(&identity, limits);
        if is_join {
            refuse_join(&mut tls, limits, RefusalReason::Unavailable, detail.clone()).await;
        }
        return Err(detail);
    };
    let frames = match ask(context, command, answer).await {
        Ok(frames) => frames,
        Err(detail) => {
            if is_join {
                refuse_join(&mut tls, limits, RefusalReason::Unavailable, detail.to_string()).await;
            }
            return Err(format!("{identity}: {detail}"));
        }
    };
    write_frames(&mut tls, limits, &frames).await.map_err(|e| format!("{identity}: {e}"))
}

async fn serve_admin(mut tls: Tls, context: &Listener, identity: &str, fingerprint: &Fingerprint, frame: &[u8]) -> Result<(), String> {
    let limits = &context.limits;
    let Some(_identity_slot) = context.shared.connections.claim(identity, limits) else {
        let detail = over_identity_cap(identity, limits);
        refuse_admin(&mut tls, limits, detail.clone()).await;
        return Err(detail);
    };
    // Checked before the request is parsed: others never reach the JSON decoder.
    let (is_admin, is_peer) = (context.is_admin(fingerprint), context.is_merge_peer(fingerprint));
    if !is_admin && !is_peer {
        let detail = format!("{identity} (certificate {fingerprint}) is not an administrator nor a merge peer: its fingerprint is in neither the controller's `admins` nor its `merge_peers`");
        refuse_admin(&mut tls, limits, detail.clone()).await;
        return Err(detail);
    }
    let request: AdminRequest = match admin::decode(frame) {
        Ok(request) => request,
        Err(error) => {
            refuse_admin(&mut tls, limits, error.clone()).await;
            return Err(format!("{identity}: {error}"));
        }
    };
    // A group's state (its keys) goes only to a merge peer; a peer may ask nothing else.
    let refused = match (request.is_peer_step(), is_peer, is_admin) {
        (true, false, _) => Some(format!("{identity} (certificate {fingerprint}) is not a merge peer: a group's state goes only to the controllers in `merge_peers`")),
        (false, _, false) => Some(format!("{identity} (certificate {fingerprint}) is a merge peer, not an administrator: it may only take merge steps")),
        _ => None,
    };
    if let Some(detail) = refused {
        refuse_admin(&mut tls, limits, detail.clone()).await;
        return Err(detail);
    }
    if request.is_peer_step() {
        return serve_merge_step(tls, context, identity, request).await;
    }
    if let AdminRequest::AbsorbFrom { .. } | AdminRequest::SplitTo { .. } = request {
        let response = match merge_order(context, request).await {
            Ok(detail) => AdminResponse::MergeDone { detail },
            Err(error) => AdminResponse::Error(error),
        };
        return write_frames(&mut tls, limits, &[Frame::new(admin::encode(&response))]).await.map_err(|e| format!("{identity}: {e}"));
    }
    let (reply, answer) = oneshot::channel();
    let response = match ask(context, Command::Admin { request, reply }, answer).await {
        Ok(response) => response,
        Err(detail) => AdminResponse::Error(detail.into()),
    };
    write_frames(&mut tls, limits, &[Frame::new(admin::encode(&response))]).await.map_err(|e| format!("{identity}: {e}"))
}

/// An administrator's merge or split order: this controller asks the other one (as its merge
/// peer, with its own certificate) for the steps on that side, and runs its own; the
/// connection's task waits for them, never the controller's.
async fn merge_order(context: &Listener, request: AdminRequest) -> Result<String, String> {
    let (AdminRequest::AbsorbFrom { server, server_name } | AdminRequest::SplitTo { server, server_name }) = request.clone() else {
        return Err(format!("{request:?} is not a merge order"));
    };
    let peer = admin::AdminTarget { server, server_name, tls: context.peer_tls.clone() };
    tracing::info!(?request, "merge order");
    match request {
        AdminRequest::AbsorbFrom { .. } => {
            let absorb = |side: Zeroizing<Vec<u8>>| async move {
                let side = MergeSide::decode(&side).map_err(|e| format!("the merge side does not decode: {e}"))?;
                let ticket = ask_merge(context, |reply| MergeStep::Absorb { side: Box::new(side), reply }).await?;
                Ok(Zeroizing::new(ticket.encode()))
            };
            admin::absorb_from(&peer, absorb).await
        }
        _ => admin::split_to(&peer, async { Ok(ask_merge(context, |reply| MergeStep::Split { reply }).await?.encode()) }).await,
    }
}

/// A merge or split step asked by a merge peer: the state it carries is read (bounded in
/// frames and time), the step runs in the controller, and the state it gives is written after
/// the answer.
async fn serve_merge_step(mut tls: Tls, context: &Listener, identity: &str, request: AdminRequest) -> Result<(), String> {
    let limits = &context.limits;
    let state = match tokio::time::timeout(limits.request_timeout, admin::read_state(&mut tls, request.state_frames())).await {
        Ok(Ok(state)) => state,
        Ok(Err(e)) => return Err(format!("{identity}: merge state: {e}")),
        Err(_) => return Err(format!("{identity}: merge state not sent in time")),
    };
    tracing::info!(%identity, ?request, "merge step asked by a merge peer");
    let (response, state) = match merge_step(context, request, &state).await {
        Ok((detail, Some(state))) => {
            tracing::info!(%detail, bytes = state.len(), "merge step done");
            (AdminResponse::MergeState { frames: admin::state_frames(&state) }, state)
        }
        Ok((detail, None)) => (AdminResponse::MergeDone { detail }, Zeroizing::new(Vec::new())),
        Err(error) => (AdminResponse::Error(error), Zeroizing::new(Vec::new())),
    };
    let write = async {
        write_frame(&mut tls, &admin::encode(&response)).await?;
        admin::write_state(&mut tls, &state).await?;
        tokio::io::AsyncWriteExt::shutdown(&mut tls).await
    };
    match tokio::time::timeout(limits.request_timeout, write).await {
        Ok(result) => result.map_err(|e| format!("{identity}: cannot send the answer: {e}")),
        Err(_) => Err(format!("{identity}: the peer did not read its answer in time")),
    }
}

/// Runs one merge step: what it did, and the state it gives (for the other controller).
async fn merge_step(context: &Listener, request: AdminRequest, state: &[u8]) -> Result<(String, Option<Zeroizing<Vec<u8>>>), String> {
    let bad = |what: &str, e: keycast_core::wire::DecodeError| format!("the {what} does not decode: {e}");
    Ok(match request {
        AdminRequest::MergeSide => {
            let side = ask_merge(context, |reply| MergeStep::Side { reply }).await?;
            (format!("state of group {} taken for a merge; its batches wait", side.right.fixed.group.0), Some(side.encode()))
        }
        AdminRequest::AbortMerge => {
            context.commands.send(Command::Merge(MergeStep::Abort)).await.map_err(|_| "the controller has stopped".to_owned())?;
            ("merge aborted; batches go on".into(), None)
        }
        AdminRequest::HandOff { .. } => {
            let ticket = MergeTicket::decode(state).map_err(|e| bad("merge ticket", e))?;
            let to = ticket.merged.group.0;
            ask_merge(context, |reply| MergeStep::HandOff { ticket: Box::new(ticket), reply }).await?;
            (format!("handed off: the members follow group {to}"), None)
        }
        AdminRequest::Resume { .. } => {
            let handback = Handback::decode(state).map_err(|e| bad("handback", e))?;
            let members = handback.members.len();
            ask_merge(context, |reply| MergeStep::Resume { handback: Box::new(handback), reply }).await?;
            (format!("split off: this group runs again with {members} members"), None)
        }
        other => return Err(format!("{other:?} is not a merge step")),
    })
}

async fn ask_merge<T>(context: &Listener, step: impl FnOnce(oneshot::Sender<Result<T, String>>) -> MergeStep) -> Result<T, String> {
    let (reply, answer) = oneshot::channel();
    ask(context, Command::Merge(step(reply)), answer).await.map_err(str::to_owned)?
}

/// Sends `command` to the controller and waits, within the answer deadline, for its answer.
async fn ask<T>(context: &Listener, command: Command, answer: oneshot::Receiver<T>) -> Result<T, &'static str> {
    let late = match command {
        Command::Join { .. } => "timed out waiting for the epoch's rekey; try again",
        _ => "timed out waiting for the controller; try again",
    };
    const STOPPED: &str = "the controller has stopped; try again later";
    let asked = async {
        context.commands.send(command).await.map_err(|_| STOPPED)?;
        answer.await.map_err(|_| STOPPED)
    };
    match tokio::time::timeout(context.limits.answer_timeout, asked).await {
        Ok(result) => result,
        Err(_) => {
            context.shared.connections.answers_timed_out.fetch_add(1, Ordering::Relaxed);
            Err(late)
        }
    }
}

async fn refuse_join(tls: &mut Tls, limits: &Limits, reason: RefusalReason, detail: String) {
    let _ = write_frames(tls, limits, &[refusal_frame(reason, detail)]).await;
}

async fn refuse_admin(tls: &mut Tls, limits: &Limits, detail: String) {
    let _ = write_frames(tls, limits, &[Frame::new(admin::encode(&AdminResponse::Error(detail)))]).await;
}

/// Writes the answer and closes, within the request deadline (a peer that stops reading
/// cannot hold the connection).
async fn write_frames(tls: &mut Tls, limits: &Limits, frames: &[Frame]) -> Result<(), String> {
    let write = async {
        for frame in frames {
            write_frame(tls, frame).await?;
        }
        tokio::io::AsyncWriteExt::shutdown(tls).await
    };
    match tokio::time::timeout(limits.request_timeout, write).await {
        Ok(result) => result.map_err(|e| format!("cannot send the answer: {e}")),
        Err(_) => Err("the peer did not read its answer in time".into()),
    }
}

/// Closes a refused handshake gracefully: FIN after the alert, then reads what the client
/// already sent (bounded in time and bytes). Dropping the socket with its request unread would
/// reset the connection, and the client would see a broken pipe instead of the refusal, and
/// retry it as a network failure.
async fn close_after_alert(mut tcp: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tcp.shutdown().await;
    let mut sink = [0u8; 4096];
    let drain = async {
        let mut total = 0;
        while total < 64 * 1024 {
            match tcp.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

/// Prometheus text format on GET (any path); off unless configured.
/// The Prometheus text and the status page (`status`) on the metrics address.
async fn serve_metrics(addr: SocketAddr, shared: Arc<Shared>, commands: mpsc::Sender<Command>) {
    let Ok(listener) = TcpListener::bind(addr).await else {
        tracing::error!(%addr, "cannot bind the metrics endpoint");
        return;
    };
    accept_with_backoff(&listener, "metrics endpoint", |mut tcp, _| {
        let (shared, commands) = (shared.clone(), commands.clone());
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut request = Vec::new();
            let _ = tokio::time::timeout(METRICS_TIMEOUT, status::read_head(&mut tcp, &mut request)).await;
            let members = || async {
                let (reply, answer) = oneshot::channel();
                let asked = commands.send(Command::Admin { request: AdminRequest::List, reply }).await.is_ok();
                match tokio::time::timeout(METRICS_TIMEOUT, answer).await {
                    Ok(Ok(AdminResponse::Members(rows))) if asked => rows,
                    _ => Vec::new(),
                }
            };
            let (content_type, body) = status::answer(&request, shared.snapshot(), &shared.recent_rekeys, members, metrics_text).await;
            let response = format!("HTTP/1.0 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}", body.len());
            let _ = tokio::time::timeout(METRICS_TIMEOUT, tcp.write_all(response.as_bytes())).await;
        });
    })
    .await
}

const METRICS_TIMEOUT: Duration = Duration::from_secs(5);

fn metrics_text(s: &Stats) -> String {
    let series: [(&str, &str, String); 21] = [
        ("keycast_members", "gauge", s.members.to_string()),
        ("keycast_epoch", "gauge", s.epoch.to_string()),
        ("keycast_rekeys_total", "counter", s.rekeys.to_string()),
        ("keycast_rekey_bytes_total", "counter", s.rekey_bytes.to_string()),
        ("keycast_joins_total", "counter", s.joins.to_string()),
        ("keycast_resyncs_total", "counter", s.resyncs.to_string()),
        ("keycast_liveness_accepted_total", "counter", s.liveness_accepted.to_string()),
        ("keycast_liveness_refused_total", "counter", s.liveness_refused.to_string()),
        ("keycast_liveness_dropped_total", "counter", s.liveness_dropped.to_string()),
        ("keycast_udp_resyncs_total", "counter", s.udp_resyncs.to_string()),
        ("keycast_udp_refusals_total", "counter", s.udp_refusals.to_string()),
        ("keycast_parity_packets_total", "counter", s.parity_packets.to_string()),
        ("keycast_naks_total", "counter", s.naks_received.to_string()),
        ("keycast_repair_packets_total", "counter", s.repair_packets.to_string()),
        ("keycast_repair_rounds_total", "counter", s.repair_rounds.to_string()),
        ("keycast_parity_bytes_total", "counter", s.parity_bytes.to_string()),
        ("keycast_join_latency_ms", "gauge", s.mean_join_latency_ms.to_string()),
        ("keycast_connections_open", "gauge", s.connections_open.to_string()),
        ("keycast_connections_over_cap_total", "counter", s.connections_over_cap.to_string()),
        ("keycast_answers_timed_out_total", "counter", s.answers_timed_out.to_string()),
        ("keycast_controller_errors_total", "counter", s.controller_errors.to_string()),
    ];
    series.iter().map(|(name, kind, value)| format!("# TYPE {name} {kind}\n{name} {value}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::sync::atomic::AtomicBool;

    use keycast_core::wire::rekey::PacketConfig;
    use keycast_core::{GraphConfig, JoinPolicy, Scheme};
    use redb::backends::InMemoryBackend;

    /// A disk in memory that refuses every write once `broken` is set, and whose syncs take
    /// `stall_ms` (a slow fsync, blocking the thread as a real one does).
    #[derive(Debug, Default)]
    struct TestDisk {
        memory: InMemoryBackend,
        broken: Arc<AtomicBool>,
        stall_ms: Arc<AtomicU64>,
    }

    impl TestDisk {
        fn check(&self) -> std::io::Result<()> {
            match self.broken.load(Ordering::Relaxed) {
                true => Err(std::io::Error::other("disk unplugged")),
                false => Ok(()),
            }
        }
    }

    impl redb::StorageBackend for TestDisk {
        fn len(&self) -> std::io::Result<u64> {
            self.memory.len()
        }
        fn read(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
            self.memory.read(offset, len)
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.check()?;
            self.memory.set_len(len)
        }
        fn sync_data(&self, eventual: bool) -> std::io::Result<()> {
            self.check()?;
            std::thread::sleep(Duration::from_millis(self.stall_ms.load(Ordering::Relaxed)));
            self.memory.sync_data(eventual)
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.check()?;
            self.memory.write(offset, data)
        }
    }

    async fn join(commands: &mpsc::Sender<Command>, identity: &str) -> Option<Frames> {
        let (reply, answer) = oneshot::channel();
        commands.send(Command::Join { identity: identity.into(), group: GroupId(7), reply }).await.ok()?;
        tokio::time::timeout(Duration::from_secs(5), answer).await.expect("an answer or a stop in time").ok()
    }

    /// A controller of group 7 (epochs of 50 ms, heartbeats every 20 ms) on `disk`, its
    /// heartbeats, and the multicast group they go to.
    async fn controller_on(disk: TestDisk) -> (ControllerTask, MulticastConfig) {
        let policy = GroupPolicy {
            group: GroupId(7),
            graph: GraphConfig { scheme: Scheme::Tree { degree: 4 }, join_policy: JoinPolicy::NewVersion },
            epoch_ms: 50,
            activation_delay: 1,
            heartbeat_ms: 20,
            refresh_timeout_ms: 10_000,
            immediate_eviction: true,
            membership_deltas: false,
            reflector: false,
            packets: PacketConfig::default(),
        };
        let acl = BTreeSet::from(["member-1".to_string(), "member-2".to_string()]);
        let (mut controller, _genesis) = Controller::create(policy, acl, now_ms(), entropy(), entropy()).unwrap();
        let port = multicast::free_port().unwrap();
        let group = SocketAddrV4::new(Ipv4Addr::new(239, 255, (port >> 8) as u8, port as u8), port);
        let config = MulticastConfig { address: group, interface: Ipv4Addr::LOCALHOST, ttl: 1 };
        let heartbeats = Arc::new(Mutex::new(controller.hand_over_heartbeats().unwrap()));
        let steps = Steps::new();
        spawn_heartbeats(&heartbeats, &steps, multicast::blocking_sender(&config).unwrap(), group).unwrap();
        let task = ControllerTask {
            heartbeat_generation: controller.heartbeat_generation(),
            heartbeats,
            steps,
            controller,
            store: Store::with_backend(disk),
            database: PathBuf::from("/srv/keycast/controller.redb"),
            socket: multicast::sender(&config).unwrap(),
            group,
            shared: Arc::new(Shared::default()),
            joins: HashMap::new(),
            join_conns: HashMap::new(),
            error_log: LogLimiter::default(),
            udp_requests: mpsc::channel(1).1,
            unicast: Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap()),
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            server_name: TlsServerName::localhost(),
            merging: None,
        };
        (task, config)
    }

    #[tokio::test]
    async fn only_a_log_failure_stops_the_controller_and_its_reason_names_the_log() {
        let disk = TestDisk::default();
        let broken = disk.broken.clone();
        let (task, _) = controller_on(disk).await;
        let (commands, rx) = mpsc::channel(8);
        let run = tokio::spawn(task.run(rx, Duration::from_millis(5)));

        let admitted = join(&commands, "member-1").await.expect("admitted while the log works");
        assert!(matches!(JoinAnswer::decode(&admitted[0]), Ok(JoinAnswer::Accepted(_))));
        broken.store(true, Ordering::Relaxed);
        // The next batch cannot be recorded: nothing is sent for it and the controller stops.
        assert_eq!(join(&commands, "member-2").await, None, "a batch the log refused was answered");
        let reason = tokio::time::timeout(Duration::from_secs(5), run).await.expect("the controller stopped").unwrap();
        assert!(reason.contains("cannot write the controller's log /srv/keycast/controller.redb") && reason.contains("disk unplugged"), "{reason}");
    }

    /// A step of the controller that takes long (here a batch whose fsync stalls 600 ms) does
    /// not hold the heartbeats back: they leave every 20 ms meanwhile.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn heartbeats_leave_on_time_while_a_stalled_disk_holds_the_controller() {
        const STALL: Duration = Duration::from_millis(600);
        let disk = TestDisk::default();
        let stall_ms = disk.stall_ms.clone();
        let (task, config) = controller_on(disk).await;
        // Heard on a thread of the test's own: the runtime's workers are what the stall blocks.
        let receiver = multicast::receiver(&config).unwrap().into_std().unwrap();
        receiver.set_nonblocking(false).unwrap();
        receiver.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let (commands, rx) = mpsc::channel(8);
        let run = tokio::spawn(task.run(rx, Duration::from_millis(5)));
        assert!(join(&commands, "member-1").await.is_some(), "admitted while the disk is fast");

        stall_ms.store(STALL.as_millis() as u64, Ordering::Relaxed);
        let listen = std::thread::spawn(move || {
            let (mut arrivals, mut buf, until) = (Vec::new(), [0u8; 2048], Instant::now() + 2 * STALL);
            while Instant::now() < until {
                if let Ok(len) = receiver.recv(&mut buf) {
                    if keycast_core::wire::message_type(&buf[..len]) == Ok(MessageType::Heartbeat) {
                        arrivals.push(Instant::now());
                    }
                }
            }
            arrivals
        });
        let stalled = Instant::now();
        assert!(join(&commands, "member-2").await.is_some(), "the join of the stalled batch was answered");
        assert!(stalled.elapsed() >= STALL, "the batch's fsync did not stall");
        let arrivals = listen.join().unwrap();
        let longest = arrivals.windows(2).map(|w| w[1] - w[0]).max().expect("heartbeats were heard");
        // Sent from the controller's own step, heartbeats would pause for the whole stall.
        assert!(longest < STALL / 2, "{} heartbeats, {longest:?} between two of them during a {STALL:?} stall", arrivals.len());
        run.abort();
    }

    #[test]
    fn accept_backoff_doubles_to_one_second_and_resets_on_success() {
        let mut backoff = AcceptBackoff::new();
        let pauses: Vec<u64> = (0..10).map(|_| backoff.failed().as_millis() as u64).collect();
        assert_eq!(pauses, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        backoff.succeeded();
        assert_eq!(backoff.failed(), Duration::from_millis(5));
    }
}
