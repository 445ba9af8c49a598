//! The controller driver: a TLS listener for joins, leaves, refreshes, resyncs and admin; a
//! multicast sender for rekeys and heartbeats; the redb log; a clock. One task owns the
//! `Controller` and processes its outputs in order, persisting before it sends.

use std::collections::{BTreeSet, HashMap};
use std::net::{SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keycast_core::protocol::{Controller, ControllerError, GroupPolicy, JoinStatus, Output, Refusal};
use keycast_core::wire::{GroupId, JoinAnswer, Message, MessageType, VerifyingKey};
use keycast_core::MemberId;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::admin::{self, AdminRequest, AdminResponse, MemberRow, Stats};
use crate::config::MulticastConfig;
use crate::store::{Store, StoreError};
use crate::tls::{peer_identity, read_frame, write_frame};
use crate::{entropy, multicast, now_ms};

/// Time allowed for a handshake and for the one request of a connection.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

pub struct ServerSetup {
    pub policy: GroupPolicy,
    pub acl: BTreeSet<String>,
    pub admins: BTreeSet<String>,
    pub listen: SocketAddr,
    pub multicast: MulticastConfig,
    pub tls: Arc<rustls::ServerConfig>,
    pub database: PathBuf,
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

type Frames = Vec<Vec<u8>>;

enum Command {
    Join { identity: String, group: GroupId, reply: oneshot::Sender<Frames> },
    Leave { identity: String, member: MemberId, reply: oneshot::Sender<Frames> },
    Refresh { identity: String, member: MemberId, rekey_seq: u64, reply: oneshot::Sender<Frames> },
    Resync { identity: String, member: MemberId, rekey_seq: u64, reply: oneshot::Sender<Frames> },
    Admin { request: AdminRequest, reply: oneshot::Sender<AdminResponse> },
}

/// A running controller. Dropping it stops every task at once (as a crash would).
pub struct Server {
    pub addr: SocketAddr,
    pub verifying_key: VerifyingKey,
    commands: mpsc::Sender<Command>,
    stats: Arc<Mutex<Stats>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Server {
    /// Opens the log (restoring the group if it exists), binds the sockets and starts.
    pub async fn start(setup: ServerSetup) -> Result<Server, ServerError> {
        let (mut store, log) = Store::open(&setup.database)?;
        let now = now_ms();
        let controller = if log.is_empty() {
            let (controller, genesis) = Controller::create(setup.policy, setup.acl.clone(), now, entropy(), entropy())?;
            if let Output::Persist(record) = genesis {
                store.append(&[record])?;
            }
            controller
        } else {
            tracing::info!(records = log.len(), "restoring the group from its log");
            Controller::restore(setup.policy, setup.acl.clone(), &log, now)?
        };
        let listener = TcpListener::bind(setup.listen).await?;
        let addr = listener.local_addr()?;
        let socket = multicast::sender(&setup.multicast)?;
        // After a restart, send the last rekey again: members that missed it catch up.
        for packet in controller.last_rekey() {
            socket.send_to(packet, setup.multicast.address).await?;
        }
        let verifying_key = controller.verifying_key();
        let stats = Arc::new(Mutex::new(Stats { group: setup.policy.group.0, ..Stats::default() }));
        let (commands, rx) = mpsc::channel(1024);
        let tick = (setup.policy.epoch_ms.min(setup.policy.heartbeat_ms) / 5).clamp(2, 100);
        let driver = ControllerTask { controller, store, socket, group: setup.multicast.address, stats: stats.clone(), joins: HashMap::new() };
        let mut tasks = vec![tokio::spawn(driver.run(rx, Duration::from_millis(tick)))];
        let acceptor = TlsAcceptor::from(setup.tls.clone());
        tasks.push(tokio::spawn(accept_loop(listener, acceptor, commands.clone(), Arc::new(setup.admins))));
        if let Some(metrics) = setup.metrics {
            tasks.push(tokio::spawn(serve_metrics(metrics, stats.clone())));
        }
        tracing::info!(%addr, group = setup.policy.group.0, "controller listening");
        Ok(Server { addr, verifying_key, commands, stats, tasks })
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

    pub fn stats(&self) -> Stats {
        self.stats.lock().expect("stats lock").clone()
    }

    /// Evicts `member` (as `keycast admin evict` does).
    pub async fn evict(&self, member: MemberId) -> bool {
        let (reply, answer) = oneshot::channel();
        let _ = self.commands.send(Command::Admin { request: AdminRequest::Evict { member: member.0 }, reply }).await;
        matches!(answer.await, Ok(AdminResponse::Evicted { found: true, .. }))
    }

    /// The controller's members, by id and identity.
    pub async fn members(&self) -> Vec<MemberRow> {
        let (reply, answer) = oneshot::channel();
        let _ = self.commands.send(Command::Admin { request: AdminRequest::List, reply }).await;
        match answer.await {
            Ok(AdminResponse::Members(rows)) => rows,
            _ => Vec::new(),
        }
    }
}

struct ControllerTask {
    controller: Controller,
    store: Store,
    socket: UdpSocket,
    group: SocketAddrV4,
    stats: Arc<Mutex<Stats>>,
    /// Joins waiting for the end of the epoch: reply and arrival time.
    joins: HashMap<u64, (oneshot::Sender<Frames>, Instant)>,
}

impl ControllerTask {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>, tick: Duration) {
        let mut interval = tokio::time::interval(tick);
        let mut next_conn = 0u64;
        loop {
            let result = tokio::select! {
                command = commands.recv() => match command {
                    None => return,
                    Some(command) => {
                        next_conn += 1;
                        self.handle(command, next_conn).await
                    }
                },
                _ = interval.tick() => {
                    let outputs = self.controller.tick(now_ms(), entropy());
                    match outputs {
                        Ok(outputs) => self.deliver(outputs).await,
                        Err(e) => Err(e.to_string()),
                    }
                }
            };
            if let Err(reason) = result {
                // A controller that cannot persist must not send anything more.
                tracing::error!(%reason, "controller stopped");
                return;
            }
            self.publish_stats();
        }
    }

    fn publish_stats(&self) {
        let mut stats = self.stats.lock().expect("stats lock");
        stats.members = self.controller.members().len();
        stats.epoch = self.controller.epoch_at(now_ms());
        stats.rekeys = self.controller.rekey_seq();
        stats.active_key = self.controller.active_key(stats.epoch).to_string();
    }

    async fn handle(&mut self, command: Command, conn: u64) -> Result<(), String> {
        let now = now_ms();
        match command {
            Command::Join { identity, group, reply } => match self.controller.join(conn, &identity, group, now) {
                Ok(JoinStatus::Queued(member)) => {
                    tracing::info!(%identity, member = member.0, "join accepted, waiting for the epoch's rekey");
                    self.joins.insert(conn, (reply, Instant::now()));
                }
                Ok(JoinStatus::Admitted(answer)) => {
                    tracing::info!(%identity, "already a member: keys sent again");
                    let (answer, keys) = *answer;
                    let _ = reply.send(vec![answer.encode(), keys.encode()]);
                }
                Err(refusal) => refuse(&identity, refusal, reply),
            },
            Command::Leave { identity, member, reply } => match self.controller.leave(&identity, member) {
                Ok(outputs) => {
                    self.deliver(outputs).await?;
                    let _ = reply.send(vec![keycast_core::wire::Leave { group: self.controller.policy().group, member }.encode()]);
                }
                Err(refusal) => refuse(&identity, refusal, reply),
            },
            Command::Refresh { identity, member, rekey_seq, reply } => match self.controller.refresh(&identity, member, rekey_seq, now) {
                Ok(()) => {
                    let refresh = keycast_core::wire::Refresh { group: self.controller.policy().group, member, rekey_seq: self.controller.rekey_seq() };
                    let _ = reply.send(vec![refresh.encode()]);
                }
                Err(refusal) => refuse(&identity, refusal, reply),
            },
            Command::Resync { identity, member, rekey_seq, reply } => match self.controller.resync(&identity, member, rekey_seq, now) {
                Ok(answer) => {
                    tracing::info!(%identity, member = member.0, "resync");
                    let _ = reply.send(vec![answer.encode()]);
                }
                Err(refusal) => refuse(&identity, refusal, reply),
            },
            Command::Admin { request, reply } => {
                let response = self.admin(request).await?;
                let _ = reply.send(response);
            }
        }
        Ok(())
    }

    async fn admin(&mut self, request: AdminRequest) -> Result<AdminResponse, String> {
        Ok(match request {
            AdminRequest::List => AdminResponse::Members(
                self.controller
                    .members()
                    .iter()
                    .map(|(m, r)| MemberRow { member: m.0, identity: r.identity.clone(), last_seen_ms: r.last_seen_ms })
                    .collect(),
            ),
            AdminRequest::Evict { member } => {
                let found = self.controller.members().contains_key(&MemberId(member));
                let outputs = self.controller.evict(MemberId(member), now_ms(), entropy()).map_err(|e| e.to_string())?;
                self.deliver(outputs).await?;
                tracing::info!(member, found, "eviction ordered");
                AdminResponse::Evicted { member, found }
            }
            AdminRequest::Stats => AdminResponse::Stats(self.stats.lock().expect("stats lock").clone()),
        })
    }

    /// Carries out outputs in order; records are made durable before anything after them.
    async fn deliver(&mut self, outputs: Vec<Output>) -> Result<(), String> {
        let mut records = Vec::new();
        for output in outputs {
            if let Output::Persist(record) = output {
                records.push(record);
                continue;
            }
            self.store.append(&std::mem::take(&mut records)).map_err(|e| e.to_string())?;
            match output {
                Output::Persist(_) => unreachable!("handled above"),
                Output::Multicast(bytes) => {
                    if let Err(e) = self.socket.send_to(&bytes, self.group).await {
                        tracing::warn!(error = %e, "multicast send failed");
                    }
                }
                Output::JoinAnswer { conn, answer, keys } => {
                    if let Some((reply, since)) = self.joins.remove(&conn) {
                        let mut frames = vec![answer.encode()];
                        frames.extend(keys.map(|k| k.encode()));
                        let mut stats = self.stats.lock().expect("stats lock");
                        let latency = since.elapsed().as_secs_f64() * 1000.0;
                        stats.mean_join_latency_ms = (stats.mean_join_latency_ms * stats.joins as f64 + latency) / (stats.joins + 1) as f64;
                        stats.joins += 1;
                        let _ = reply.send(frames);
                    }
                }
                Output::Departed { member, identity, why } => tracing::info!(member = member.0, %identity, ?why, "member removed"),
                Output::Rekeyed { seq, epoch, wraps, packets, bytes } => {
                    tracing::info!(seq, epoch, wraps, packets, bytes, "rekey sent");
                    self.stats.lock().expect("stats lock").rekey_bytes += bytes as u64;
                }
            }
        }
        self.store.append(&records).map_err(|e| e.to_string())
    }
}

fn refuse(identity: &str, refusal: Refusal, reply: oneshot::Sender<Frames>) {
    tracing::warn!(%identity, reason = %refusal, "request refused");
    let _ = reply.send(vec![JoinAnswer::Refused { reason: refusal.reason, detail: refusal.detail }.encode()]);
}

async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, commands: mpsc::Sender<Command>, admins: Arc<BTreeSet<String>>) {
    loop {
        let Ok((tcp, peer)) = listener.accept().await else { continue };
        let (acceptor, commands, admins) = (acceptor.clone(), commands.clone(), admins.clone());
        tokio::spawn(async move {
            if let Err(reason) = serve_connection(tcp, acceptor, commands, &admins).await {
                tracing::warn!(%peer, %reason, "connection refused");
            }
        });
    }
}

async fn serve_connection(tcp: TcpStream, acceptor: TlsAcceptor, commands: mpsc::Sender<Command>, admins: &BTreeSet<String>) -> Result<(), String> {
    let mut tls = match tokio::time::timeout(IO_TIMEOUT, acceptor.accept(tcp).into_fallible()).await {
        Err(_) => return Err("TLS handshake timed out".to_string()),
        Ok(Err((e, tcp))) => {
            close_after_alert(tcp).await;
            return Err(format!("TLS handshake failed: {e}"));
        }
        Ok(Ok(tls)) => tls,
    };
    let identity = peer_identity(tls.get_ref().1).ok_or("client certificate has no common name")?;
    let frame = tokio::time::timeout(IO_TIMEOUT, read_frame(&mut tls))
        .await
        .map_err(|_| format!("{identity}: no request in time"))?
        .map_err(|e| format!("{identity}: {e}"))?;
    if admin::is_admin_frame(&frame) {
        if !admins.contains(&identity) {
            return Err(format!("{identity} is not an administrator"));
        }
        let request: AdminRequest = admin::decode(&frame).map_err(|e| format!("{identity}: {e}"))?;
        let (reply, answer) = oneshot::channel();
        commands.send(Command::Admin { request, reply }).await.map_err(|_| "controller stopped")?;
        let response = answer.await.map_err(|_| "controller stopped")?;
        return write_frame(&mut tls, &admin::encode(&response)).await.map_err(|e| e.to_string());
    }
    let message = Message::decode(&frame).map_err(|e| format!("{identity}: {e}"))?;
    let (reply, answer) = oneshot::channel();
    let command = match message {
        Message::JoinRequest(r) => Command::Join { identity: identity.clone(), group: r.group, reply },
        Message::Leave(l) => Command::Leave { identity: identity.clone(), member: l.member, reply },
        Message::Refresh(r) => Command::Refresh { identity: identity.clone(), member: r.member, rekey_seq: r.rekey_seq, reply },
        Message::ResyncRequest(r) => Command::Resync { identity: identity.clone(), member: r.member, rekey_seq: r.rekey_seq, reply },
        other => return Err(format!("{identity}: unexpected {:?} on the TLS channel", MessageType::of(&other))),
    };
    commands.send(command).await.map_err(|_| "controller stopped")?;
    let frames = answer.await.map_err(|_| format!("{identity}: controller stopped before answering"))?;
    for frame in frames {
        write_frame(&mut tls, &frame).await.map_err(|e| format!("{identity}: {e}"))?;
    }
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
    Ok(())
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
async fn serve_metrics(addr: SocketAddr, stats: Arc<Mutex<Stats>>) {
    let Ok(listener) = TcpListener::bind(addr).await else {
        tracing::error!(%addr, "cannot bind the metrics endpoint");
        return;
    };
    loop {
        let Ok((mut tcp, _)) = listener.accept().await else { continue };
        let s = stats.lock().expect("stats lock").clone();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut request = [0u8; 1024];
            let _ = tokio::time::timeout(IO_TIMEOUT, tcp.read(&mut request)).await;
            let body = format!(
                "# TYPE keycast_members gauge\nkeycast_members {}\n# TYPE keycast_epoch gauge\nkeycast_epoch {}\n\
                 # TYPE keycast_rekeys_total counter\nkeycast_rekeys_total {}\n# TYPE keycast_rekey_bytes_total counter\n\
                 keycast_rekey_bytes_total {}\n# TYPE keycast_joins_total counter\nkeycast_joins_total {}\n\
                 # TYPE keycast_join_latency_ms gauge\nkeycast_join_latency_ms {}\n",
                s.members, s.epoch, s.rekeys, s.rekey_bytes, s.joins, s.mean_join_latency_ms
            );
            let response = format!("HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}", body.len());
            let _ = tcp.write_all(response.as_bytes()).await;
        });
    }
}
