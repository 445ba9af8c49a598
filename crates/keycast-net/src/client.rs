//! The member library (the Iolus client library): joins over TLS, follows the multicast
//! channel, refreshes, resyncs when it falls behind, and gives the application `getkey`,
//! `seal`/`send`, `open` and an event stream.
//!
//! One task follows the group: it receives multicast datagrams, advances time and starts
//! refreshes and resyncs, which run as tasks beside it (at most one of each) and report back;
//! it never waits on the controller. Requests retry under deadlines (`RequestPolicy`); only a
//! definite refusal from the controller means eviction, never a transport failure.

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keycast_core::protocol::traffic::{Fresh, TrafficError, TrafficKeys};
use keycast_core::wire::control::JOINERS_KEY_ID;
use keycast_core::protocol::merge::Contact;
use keycast_core::protocol::{MemberEvent, MemberSession, ResyncCauses};
use keycast_core::wire::{
    message_type, Data, GroupId, JoinAccepted, JoinAnswer, JoinRequest, Leave, MessageType, Refresh, RefusalReason, ResyncAnswer,
    ResyncRequest, MAX_MESSAGE_LEN,
};
use keycast_core::{Key, KeyRef, MemberId};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::config::{MemberConfig, MulticastConfig, RequestPolicy, EVENT_CAPACITY};
use crate::loss::{LossInjector, LossModel};
use crate::request::{self, definite, definite_tls, refusal_or, Frames, RequestKind, Stage};
use crate::{entropy, lock, multicast, now_ms};

#[derive(Clone)]
pub struct MemberSetup {
    pub group: GroupId,
    pub server: SocketAddr,
    pub server_name: String,
    pub multicast: MulticastConfig,
    pub tls: Arc<rustls::ClientConfig>,
    pub refresh_ms: u64,
    pub heartbeat_ms: u64,
    /// Refresh over UDP with a liveness datagram, and over TLS one time in `tls_refresh_every`
    /// (0: never); without UDP, every refresh goes over TLS.
    pub udp_refresh: bool,
    pub tls_refresh_every: u32,
    /// Timeouts, retries and deadlines of requests to the controller.
    pub requests: RequestPolicy,
    /// After an expiry (or an eviction whose identity was re-admitted), join again by itself
    /// (`ClientEvent::Rejoined`) instead of stopping. A revoked identity always stops.
    pub rejoin: bool,
    /// Events the application has not read yet, at most (clamped to `EVENT_CAPACITY`).
    pub event_capacity: usize,
    /// Loss injected on the multicast receive path (tests, `keycast demo --loss`); none by default.
    pub loss: Option<LossModel>,
    /// NAK lost rekey packets (on by default; off only for comparison runs, `keycast demo
    /// --no-naks`: the member then relies on proactive parity and resyncs when that fails).
    pub naks: bool,
    /// The subgroup's standby relays, by registration number: when the controller is lost
    /// (no heartbeat for three intervals) the member joins the first of them that answers,
    /// then `server` (GSM fail-over). Empty: the member only waits for its controller.
    pub standbys: Vec<ControllerAddr>,
}

/// Where a controller listens and the name its certificate carries.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerAddr {
    pub server: SocketAddr,
    #[serde(default = "crate::config::localhost")]
    pub server_name: String,
}

impl MemberSetup {
    /// The setup a member config file describes, with its TLS client configuration.
    pub fn from_config(config: &MemberConfig, tls: Arc<rustls::ClientConfig>) -> MemberSetup {
        MemberSetup {
            group: GroupId(config.group),
            server: config.server,
            server_name: config.server_name.clone(),
            multicast: config.multicast.clone(),
            tls,
            refresh_ms: config.refresh_ms,
            heartbeat_ms: config.heartbeat_ms,
            udp_refresh: config.udp_refresh,
            tls_refresh_every: config.tls_refresh_every,
            requests: config.requests,
            rejoin: config.rejoin,
            event_capacity: config.event_capacity,
            loss: None,
            naks: true,
            standbys: config.standbys.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{stage} the controller at {addr} failed: {source}")]
    Transport { addr: SocketAddr, stage: Stage, source: std::io::Error },
    #[error("{stage} the controller at {addr} timed out after {after_ms} ms")]
    TimedOut { addr: SocketAddr, stage: Stage, after_ms: u64 },
    #[error("TLS with the controller at {addr} failed: {source}; {}", crate::request::tls_advice(source))]
    Tls { addr: SocketAddr, source: std::io::Error },
    #[error("gave up the {request} after {attempts} attempts in {waited_ms} ms (deadline {deadline_ms} ms): {last}; check that the controller runs at that address, or raise [requests] deadlines in the member config")]
    GaveUp { request: RequestKind, attempts: u32, waited_ms: u64, deadline_ms: u64, last: Box<ClientError> },
    #[error("the controller refused: {} ({})", .0.describe(), .1)]
    Refused(RefusalReason, String),
    #[error("unexpected answer from the controller: {0}")]
    Protocol(String),
    #[error("multicast channel {addr} on {interface}: {source}; check the [multicast] address and interface")]
    Multicast { addr: SocketAddrV4, interface: std::net::Ipv4Addr, source: std::io::Error },
    #[error("this member is no longer in the group (evicted or expired); it may not seal: join again")]
    NotAMember,
    #[error(transparent)]
    Traffic(#[from] TrafficError),
}

impl ClientError {
    pub(crate) fn from_io(addr: SocketAddr, stage: Stage, source: std::io::Error) -> ClientError {
        if definite_tls(&source).is_some() {
            ClientError::Tls { addr, source }
        } else {
            ClientError::Transport { addr, stage, source }
        }
    }

    fn multicast(config: &MulticastConfig, source: std::io::Error) -> ClientError {
        ClientError::Multicast { addr: config.address, interface: config.interface, source }
    }

    /// Worth another attempt: the network or a controller that is not ready.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Transport { .. } | ClientError::TimedOut { .. } => true,
            ClientError::Refused(reason, _) => !definite(*reason),
            _ => false,
        }
    }

    /// The controller definitely no longer counts this member.
    fn means_evicted(&self) -> bool {
        matches!(self, ClientError::Refused(reason, _) if definite(*reason))
    }
}

/// What the application receives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientEvent {
    Member(MemberEvent),
    /// Application data from the group, opened.
    Data(Vec<u8>),
    /// Application data this member could not open (a key it does not hold, forged, replayed).
    Unreadable(TrafficError),
    /// Joined again after an eviction or expiry (`MemberSetup::rejoin`), as a new member.
    Rejoined { member: MemberId },
    /// Its controller was lost and this member joined the standby at `server` (a new
    /// controller: new keys, a new member id).
    FailedOver { server: SocketAddr, member: MemberId },
}

/// Counters of what the member received and what it could not queue for the application.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Data messages opened.
    pub data: u64,
    /// Data messages that could not be opened (unknown key, forged or replayed).
    pub unreadable: u64,
    /// Multicast datagrams dropped as malformed, unverified, replayed or stale.
    pub rejected: u64,
    /// Events dropped because the application left the queue full (data and member events).
    pub events_dropped: u64,
    /// Of those, member events (only when even the room kept for them was full).
    pub member_events_dropped: u64,
    /// Multicast datagrams dropped by the injected loss (`MemberSetup::loss`).
    pub lost: u64,
    /// Resyncs answered over UDP (without a TLS connection).
    pub udp_resyncs: u64,
    /// Rekeys this member completed by rebuilding lost packets from round 1's FEC parity.
    pub fec_recovered: u64,
    /// Rekeys this member completed from a repair round it NAKed for.
    pub repair_recovered: u64,
    /// Rekeys this member lacked when a heartbeat first named them (round 1 did not bring
    /// them): recovered by repair or resync.
    pub late_rekeys: u64,
    /// Group keys put in force before this member held them.
    pub keys_late: u64,
    /// Why this member went out of sync, by cause.
    pub resync_causes: ResyncCauses,
    /// NAKs this member sent.
    pub naks: u64,
}

/// What the follow task and the client share besides the session: counters, and whether the
/// controller said this member is out.
#[derive(Default)]
struct Shared {
    /// Set once the controller refused this member, cleared by a rejoin.
    out: std::sync::atomic::AtomicBool,
    /// Where this member's requests and data go when no longer where it joined: the standby
    /// it failed over to, or the group a merge or split moved it to.
    route: Mutex<Option<Route>>,
    data: AtomicU64,
    unreadable: AtomicU64,
    rejected: AtomicU64,
    events_dropped: AtomicU64,
    member_events_dropped: AtomicU64,
    lost: AtomicU64,
    udp_resyncs: AtomicU64,
    fec_recovered: AtomicU64,
    repair_recovered: AtomicU64,
    naks: AtomicU64,
}

/// The group, controller and multicast group a member follows now.
#[derive(Clone, Debug)]
struct Route {
    group: GroupId,
    server: SocketAddr,
    server_name: String,
    multicast: MulticastConfig,
}

impl Route {
    fn of(setup: &MemberSetup) -> Route {
        Route { group: setup.group, server: setup.server, server_name: setup.server_name.clone(), multicast: setup.multicast.clone() }
    }

    fn apply(&self, setup: &mut MemberSetup) {
        (setup.group, setup.server, setup.server_name, setup.multicast) = (self.group, self.server, self.server_name.clone(), self.multicast.clone());
    }
}

/// How long a member that moved to another group (merge or split) still listens on the group
/// it left, in heartbeat intervals: the merge's rekey follows the notice there.
const MOVE_GRACE_HEARTBEATS: u64 = 4;

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The bounded event queue. Data events may fill it only up to `reserve` free places: the
/// rest is kept for member events (joined, rekeyed, evicted, ...), so a flood of data, real or
/// forged, cannot push them out. What does not fit is dropped and counted; the follow loop
/// never waits for the application.
struct EventSink {
    queue: mpsc::Sender<ClientEvent>,
    reserve: usize,
    shared: Arc<Shared>,
}

impl EventSink {
    fn data(&self, event: ClientEvent) {
        if self.queue.capacity() <= self.reserve {
            bump(&self.shared.events_dropped);
        } else if let Err(mpsc::error::TrySendError::Full(_)) = self.queue.try_send(event) {
            bump(&self.shared.events_dropped);
        }
    }

    fn member(&self, event: ClientEvent) {
        if let Err(mpsc::error::TrySendError::Full(event)) = self.queue.try_send(event) {
            bump(&self.shared.events_dropped);
            bump(&self.shared.member_events_dropped);
            tracing::warn!(?event, "event queue full: the application is not reading events");
        }
    }

    fn members(&self, events: Vec<MemberEvent>) {
        for event in events {
            if let MemberEvent::OutOfSync { reason } = &event {
                tracing::debug!(%reason, "out of sync: resyncing");
            }
            self.member(ClientEvent::Member(event));
        }
    }
}

/// A UDP socket for liveness datagrams to `server`, of its address family.
async fn unicast_socket(server: SocketAddr) -> std::io::Result<UdpSocket> {
    let any: SocketAddr = if server.is_ipv4() { (std::net::Ipv4Addr::UNSPECIFIED, 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
    UdpSocket::bind(any).await
}

/// One join with timeouts and no retry (load tests): the acceptance and the keys.
pub async fn join_once(setup: &MemberSetup) -> Result<(JoinAccepted, ResyncAnswer), ClientError> {
    let frames = request::attempt(setup, RequestKind::Join, &JoinRequest { group: setup.group }.encode()).await?;
    join_answer(&frames)
}

/// Joins with retries until the join deadline; only a refusal or a TLS failure ends it early.
async fn join_with_retries(setup: &MemberSetup) -> Result<(JoinAccepted, ResyncAnswer), ClientError> {
    request::request(setup, RequestKind::Join, &JoinRequest { group: setup.group }.encode(), join_answer).await
}

fn join_answer(frames: &Frames) -> Result<(JoinAccepted, ResyncAnswer), ClientError> {
    let accepted = match JoinAnswer::decode(&frames[0]) {
        Ok(JoinAnswer::Accepted(a)) => a,
        _ => return Err(refusal_or(&frames[0], "a join answer")),
    };
    let keys = frames.get(1).and_then(|f| ResyncAnswer::decode(f).ok()).ok_or(ClientError::Protocol("no keys after the join answer".into()))?;
    Ok((accepted, keys))
}

/// A member's first join: its controller; if that cannot be reached and the subgroup has
/// standbys, the standbys (one may have taken over while this member was away), then the
/// controller again, as after a fail-over. Returns where it joined.
async fn first_join(setup: &MemberSetup) -> Result<(ControllerAddr, JoinAccepted, ResyncAnswer), ClientError> {
    let controller = ControllerAddr { server: setup.server, server_name: setup.server_name.clone() };
    if setup.standbys.is_empty() {
        return join_with_retries(setup).await.map(|(accepted, keys)| (controller, accepted, keys));
    }
    match join_once(setup).await {
        Ok((accepted, keys)) => Ok((controller, accepted, keys)),
        Err(e) if e.is_transient() => {
            tracing::info!(controller = %setup.server, "the controller did not answer the join ({e}): trying its standbys");
            let mut candidates = setup.standbys.clone();
            candidates.push(controller);
            join_any(setup, &candidates).await
        }
        Err(e) => Err(e),
    }
}

/// One join attempt at each of `candidates` in turn, round after round with jittered
/// backoff, until one accepts (a standby listens only once it has taken over) or the join
/// deadline passes. A refusal by one candidate moves on to the next. The last candidate, the
/// lost controller itself, is tried only after an alive alarm's time: a paused controller's
/// listener accepts connections and would hold each round until its handshake timeout.
async fn join_any(setup: &MemberSetup, candidates: &[ControllerAddr]) -> Result<(ControllerAddr, JoinAccepted, ResyncAnswer), ClientError> {
    let started = Instant::now();
    let own_after = started + Duration::from_millis(3 * setup.heartbeat_ms);
    let deadline = started + Duration::from_millis(setup.requests.join_deadline_ms);
    // The standby listens tens of ms after its alarm, which rings with this member's: retry
    // within a quarter heartbeat at first, not after the usual backoff (refusals cost nothing).
    let mut backoff = (setup.heartbeat_ms / 4).clamp(1, setup.requests.backoff_min_ms.max(1));
    let (mut last, mut attempts) = (None, 0);
    loop {
        let tried = if Instant::now() < own_after { candidates.len().saturating_sub(1).max(1) } else { candidates.len() };
        for candidate in &candidates[..tried] {
            attempts += 1;
            let attempt_setup = MemberSetup { server: candidate.server, server_name: candidate.server_name.clone(), ..setup.clone() };
            match join_once(&attempt_setup).await {
                Ok((accepted, keys)) => return Ok((candidate.clone(), accepted, keys)),
                Err(e) => {
                    tracing::debug!(server = %candidate.server, "fail-over join: {e}");
                    last = Some(e);
                }
            }
        }
        let pause = Duration::from_millis(request::jittered(backoff));
        if Instant::now() + pause >= deadline {
            let last = last.unwrap_or(ClientError::Protocol("no standby to join".into()));
            return Err(ClientError::GaveUp {
                request: RequestKind::Join,
                attempts,
                waited_ms: started.elapsed().as_millis() as u64,
                deadline_ms: setup.requests.join_deadline_ms,
                last: Box::new(last),
            });
        }
        tokio::time::sleep(pause).await;
        // Until the standby had an alarm's time to take over, at most half a heartbeat apart.
        let most = if Instant::now() < own_after { setup.heartbeat_ms / 2 } else { setup.requests.backoff_max_ms };
        backoff = backoff.saturating_mul(2).min(most.max(1));
    }
}

/// One leave outside a session (load tests), with retries until the deadline: done once the
/// controller acknowledges it.
pub async fn leave_once(setup: &MemberSetup, member: MemberId) -> Result<(), ClientError> {
    let message = Leave { group: setup.group, member }.encode();
    request::request(setup, RequestKind::Leave, &message, |frames| match Leave::decode(&frames[0]) {
        Ok(_) => Ok(()),
        Err(_) => Err(refusal_or(&frames[0], "a leave acknowledgement")),
    })
    .await
}

/// A TLS 1.3 handshake with client certificate and nothing more (the floor of a join).
pub async fn handshake_only(setup: &MemberSetup) -> Result<(), ClientError> {
    let mut tls = request::connect(setup).await?;
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
    Ok(())
}

pub struct MemberClient {
    setup: MemberSetup,
    session: Arc<Mutex<MemberSession>>,
    shared: Arc<Shared>,
    sender: UdpSocket,
    task: JoinHandle<()>,
}

impl Drop for MemberClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MemberClient {
    /// Joins the group, retrying until `requests.join_deadline_ms`; returns once this member
    /// holds its keys (after the epoch's rekey), with the event queue.
    pub async fn join(mut setup: MemberSetup) -> Result<(MemberClient, mpsc::Receiver<ClientEvent>), ClientError> {
        // Listen before asking, so no rekey after the join is missed.
        let receiver = multicast::receiver(&setup.multicast).map_err(|e| ClientError::multicast(&setup.multicast, e))?;
        let sender = multicast::sender(&setup.multicast).map_err(|e| ClientError::multicast(&setup.multicast, e))?;
        let (joined_at, accepted, keys) = first_join(&setup).await?;
        (setup.server, setup.server_name) = (joined_at.server, joined_at.server_name);
        let (session, joined) = MemberSession::join(&accepted, keys, setup.heartbeat_ms, now_ms());
        let capacity = setup.event_capacity.clamp(*EVENT_CAPACITY.start(), *EVENT_CAPACITY.end());
        let (queue, events) = mpsc::channel(capacity);
        let shared = Arc::new(Shared::default());
        let sink = EventSink { queue, reserve: capacity / 8, shared: shared.clone() };
        sink.members(joined);
        let session = Arc::new(Mutex::new(session));
        let unicast = unicast_socket(setup.server).await.map_err(|source| ClientError::Transport { addr: setup.server, stage: Stage::Connect, source })?;
        let follow = Follow {
            setup: setup.clone(),
            session: session.clone(),
            events: sink,
            requests: JoinSet::new(),
            in_flight: InFlight::default(),
            unicast,
            refreshes: 0,
            moved: None,
        };
        let task = tokio::spawn(follow.run(receiver));
        Ok((MemberClient { setup, session, shared, sender, task }, events))
    }

    fn with<T>(&self, f: impl FnOnce(&mut MemberSession) -> T) -> T {
        f(&mut lock(&self.session))
    }

    pub fn member(&self) -> MemberId {
        self.with(|s| s.member())
    }

    /// The traffic key in force (getkey).
    pub fn getkey(&self) -> Option<(KeyRef, Key)> {
        self.with(|s| s.active_key())
    }

    /// A flat member's ID, ID bits, TEK and KEKs, to continue as a distributed flat
    /// participant once the controller is lost (`MemberSession::flat_shares`). Secret.
    pub fn flat_shares(&self) -> Option<keycast_core::protocol::member::FlatShares> {
        self.with(|s| s.flat_shares())
    }

    pub fn rekey_seq(&self) -> u64 {
        self.with(|s| s.rekey_seq())
    }

    /// When this member last heard its controller (milliseconds since the Unix epoch): a
    /// verified heartbeat, a resync answer or its join.
    pub fn last_heard_ms(&self) -> u64 {
        self.with(|s| s.last_heard_ms())
    }

    /// The group's heartbeat interval.
    pub fn heartbeat_ms(&self) -> u64 {
        self.setup.heartbeat_ms
    }

    /// The group's size by the controller's latest heartbeat.
    pub fn group_size(&self) -> u64 {
        self.with(|s| s.group_size())
    }

    /// The controller this member follows now (its own, the standby it failed over to, or the
    /// one a merge or split moved it to).
    pub fn controller(&self) -> SocketAddr {
        self.current_setup().server
    }

    /// The TLS server name this member's requests use now (the one configured, or the one a
    /// merge or split notice gave).
    pub fn server_name(&self) -> String {
        self.current_setup().server_name
    }

    /// The group this member is in now (another after a merge or split moved it).
    pub fn group(&self) -> GroupId {
        self.current_setup().group
    }

    /// The setup with the route in force (after a fail-over or a move).
    fn current_setup(&self) -> MemberSetup {
        let mut setup = self.setup.clone();
        if let Some(route) = self.shared.route.lock().expect("route lock").as_ref() {
            route.apply(&mut setup);
        }
        setup
    }

    /// The controller's epoch as this member last heard it.
    pub fn epoch(&self) -> u64 {
        self.with(|s| s.epoch())
    }

    /// What was received, and what was dropped because the event queue was full.
    pub fn stats(&self) -> ClientStats {
        let c = &self.shared;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ClientStats {
            data: get(&c.data),
            unreadable: get(&c.unreadable),
            rejected: get(&c.rejected),
            events_dropped: get(&c.events_dropped),
            member_events_dropped: get(&c.member_events_dropped),
            lost: get(&c.lost),
            udp_resyncs: get(&c.udp_resyncs),
            fec_recovered: get(&c.fec_recovered),
            repair_recovered: get(&c.repair_recovered),
            late_rekeys: self.with(|s| s.late_rekeys()),
            resync_causes: self.with(|s| s.resync_causes()),
            keys_late: self.with(|s| s.keys_late()),
            naks: get(&c.naks),
        }
    }

    /// Seals `plaintext` as an encoded data message; refused once the controller said this
    /// member is out (its key would still be readable by members evicted before it).
    pub fn seal(&self, plaintext: &[u8]) -> Result<Vec<u8>, ClientError> {
        if self.shared.out.load(Ordering::SeqCst) {
            return Err(ClientError::NotAMember);
        }
        let fresh = Fresh { message_key: entropy(), nonce: crate::data_nonce() };
        Ok(self.with(|s| s.seal(plaintext, fresh))?.encode())
    }

    /// The keys of this member's group as a relay needs them (see `relay`).
    pub fn traffic_keys(&self) -> TrafficKeys {
        self.with(|s| s.traffic_keys())
    }

    /// Opens an encoded data message.
    pub fn open(&self, message: &[u8]) -> Result<Vec<u8>, ClientError> {
        let data = Data::decode(message).map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok(self.with(|s| s.open(&data))?)
    }

    /// Seals and multicasts `plaintext` to the group.
    pub async fn send(&self, plaintext: &[u8]) -> Result<(), ClientError> {
        let message = self.seal(plaintext)?;
        let multicast = self.current_setup().multicast;
        self.sender.send_to(&message, multicast.address).await.map_err(|e| ClientError::multicast(&multicast, e))?;
        Ok(())
    }

    /// Leaves the group, retrying until `requests.deadline_ms`; done once the controller
    /// acknowledges it, or says this member is not in the group anyway.
    pub async fn leave(self) -> Result<(), ClientError> {
        self.leave_shared().await
    }

    /// As `leave`, for a client others hold too (a relay stepping down).
    pub async fn leave_shared(&self) -> Result<(), ClientError> {
        let member = self.member();
        let setup = self.current_setup();
        let message = Leave { group: setup.group, member }.encode();
        let answer = request::request(&setup, RequestKind::Leave, &message, |frames| match Leave::decode(&frames[0]) {
            Ok(_) => Ok(()),
            Err(_) => Err(refusal_or(&frames[0], "a leave acknowledgement")),
        })
        .await;
        match answer {
            Err(ClientError::Refused(RefusalReason::NotMember | RefusalReason::Revoked, detail)) => {
                tracing::info!(member = member.0, %detail, "leave: the controller no longer counts this member");
                Ok(())
            }
            other => other,
        }
    }
}

/// A request's result, for the member it was made for (a rejoin changes the member).
struct Outcome {
    member: MemberId,
    result: Finished,
}

enum Finished {
    Refresh(Result<(), ClientError>),
    Resync(Result<ResyncAnswer, ClientError>),
    Rejoin(Result<(JoinAccepted, ResyncAnswer), ClientError>),
    FailOver(Result<(ControllerAddr, JoinAccepted, ResyncAnswer), ClientError>),
}

#[derive(Default)]
struct InFlight {
    refresh: bool,
    resync: bool,
    rejoin: bool,
    /// After a resync gave up, the next one waits until then.
    resync_not_before: Option<Instant>,
    /// Resync requests sent over UDP for the current gap, and when the last one's answer is
    /// given up on (then another, or TLS).
    udp_probes: u32,
    udp_probe_due: Option<Instant>,
}

/// Resync requests over UDP for one gap before the member asks over TLS, and how long each
/// waits for its answer.
const UDP_PROBES: u32 = 3;
const UDP_PROBE_WAIT: Duration = Duration::from_millis(250);

/// The member's background work: multicast input, time, and the results of requests.
struct Follow {
    setup: MemberSetup,
    session: Arc<Mutex<MemberSession>>,
    events: EventSink,
    /// Refresh, resync and rejoin tasks; dropped (so aborted) with the loop.
    requests: JoinSet<Outcome>,
    in_flight: InFlight,
    /// Sends liveness datagrams to the controller.
    unicast: UdpSocket,
    refreshes: u64,
    /// A merge or split notice moved this member: its sockets follow after the datagram.
    moved: Option<(GroupId, Contact)>,
}

/// The next datagram on the socket of a group this member left, if it still listens there.
async fn recv_left_behind(left_behind: &Option<(UdpSocket, Instant)>, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
    match left_behind {
        Some((socket, _)) => socket.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

/// When a member's first refresh is due: at a random point of its first period, so members
/// that joined in one batch (thousands at once) refresh evenly spread, not together.
fn refresh_phase(period: Duration) -> Duration {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&entropy()[..8]);
    let period_ms = period.as_millis().max(1) as u64;
    Duration::from_millis(1 + u64::from_le_bytes(bytes) % period_ms)
}

/// Datagrams taken from the multicast socket's backlog before a NAK or resync is decided.
const MAX_DRAINED: usize = 256;

impl Follow {
    async fn run(mut self, socket: UdpSocket) {
        let mut buf = vec![0u8; MAX_MESSAGE_LEN];
        let mut loss = self.setup.loss.map(LossInjector::new);
        let mut unicast_buf = vec![0u8; MAX_MESSAGE_LEN];
        // A quarter heartbeat: the lost controller is noticed at most that late (as the standby
        // notices it), for a fail-over within three heartbeat intervals plus an epoch.
        let mut tick = tokio::time::interval(Duration::from_millis(self.setup.heartbeat_ms.clamp(20, 1000) / 4));
        let period = Duration::from_millis(self.setup.refresh_ms.max(10));
        let mut refresh = tokio::time::interval_at(Instant::now() + refresh_phase(period), period);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut socket = socket;
        // The group's socket this member left at a merge or split, and until when it listens there.
        let mut left_behind: Option<(UdpSocket, Instant)> = None;
        let mut left_buf = vec![0u8; MAX_MESSAGE_LEN];
        loop {
            let nak_due = if self.setup.naks { lock(&self.session).next_nak_ms() } else { None };
            let nak_in = nak_due.map(|at| Duration::from_millis(at.saturating_sub(now_ms())));
            let go_on = tokio::select! {
                received = socket.recv_from(&mut buf) => {
                    match received {
                        Ok((len, _)) => self.multicast_datagram(&buf[..len], &mut loss),
                        Err(e) => tracing::debug!(error = %e, "multicast receive failed"),
                    }
                    true
                }
                received = recv_left_behind(&left_behind, &mut left_buf), if left_behind.is_some() => {
                    if let Ok((len, _)) = received {
                        self.multicast_datagram(&left_buf[..len], &mut loss);
                    }
                    true
                }
                answer = self.unicast.recv_from(&mut unicast_buf) => match answer {
                    Ok((len, _)) => self.unicast_datagram(&unicast_buf[..len]),
                    Err(_) => true,
                },
                _ = tokio::time::sleep(nak_in.unwrap_or_default()), if nak_in.is_some() => {
                    self.drain(&socket, &mut buf, &mut loss);
                    self.send_nak();
                    true
                }
                _ = tick.tick() => {
                    self.drain(&socket, &mut buf, &mut loss);
                    let list = lock(&self.session).tick(now_ms());
                    if list.contains(&MemberEvent::ControllerLost) {
                        self.fail_over();
                    }
                    self.events.members(list);
                    true
                }
                _ = refresh.tick() => {
                    self.refresh().await;
                    true
                }
                Some(done) = self.requests.join_next() => match done {
                    Ok(outcome) => self.finished(outcome),
                    Err(e) => {
                        tracing::error!(error = %e, "a request task failed");
                        true
                    }
                },
            };
            if !go_on {
                return;
            }
            if let Some((group, to)) = self.moved.take() {
                match self.follow_move(group, to) {
                    Ok(next) => {
                        let grace = Duration::from_millis(MOVE_GRACE_HEARTBEATS * self.setup.heartbeat_ms.max(10));
                        left_behind = Some((std::mem::replace(&mut socket, next), Instant::now() + grace));
                    }
                    Err(e) => tracing::error!(error = %e, "could not follow the move to group {}: staying on the old sockets", group.0),
                }
            }
            if left_behind.as_ref().is_some_and(|(_, until)| Instant::now() >= *until) {
                left_behind = None;
            }
            self.start_resync_if_needed();
        }
    }

    fn member(&self) -> MemberId {
        lock(&self.session).member()
    }

    /// A notice moved this member to `group` (a merge or a split): requests go to its
    /// controller from now on, under the server name the notice gives (the one in that
    /// controller's certificate), and the multicast socket is the group's. Returns the new
    /// multicast socket; nothing changes on error.
    fn follow_move(&mut self, group: GroupId, to: Contact) -> std::io::Result<UdpSocket> {
        let Contact { controller, server_name, multicast } = to;
        let SocketAddr::V4(address) = multicast else {
            return Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "IPv6 multicast groups are not supported"));
        };
        let config = MulticastConfig { address, ..self.setup.multicast.clone() };
        let receiver = multicast::receiver(&config)?;
        if controller.is_ipv4() != self.setup.server.is_ipv4() {
            let any: SocketAddr = if controller.is_ipv4() { (std::net::Ipv4Addr::UNSPECIFIED, 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
            let socket = std::net::UdpSocket::bind(any)?;
            socket.set_nonblocking(true)?;
            self.unicast = UdpSocket::from_std(socket)?;
        }
        (self.setup.group, self.setup.server, self.setup.multicast) = (group, controller, config);
        self.setup.server_name = server_name.to_string();
        *self.events.shared.route.lock().expect("route lock") = Some(Route::of(&self.setup));
        self.in_flight.udp_probes = 0;
        self.in_flight.udp_probe_due = None;
        tracing::info!(group = group.0, %controller, %server_name, %multicast, member = self.member().0, "moved to another group without rejoining");
        Ok(receiver)
    }

    /// Handles one datagram: data is opened and queued, the rest goes to the session.
    fn receive(&mut self, bytes: &[u8]) {
        let shared = &self.events.shared;
        // Dispatch on the type byte: each message is decoded once, by its own decoder.
        let decoded = message_type(bytes).and_then(|kind| match kind {
            MessageType::Data => Data::decode(bytes).map(Some),
            _ => Ok(None),
        });
        match decoded {
            Ok(Some(data)) => {
                let opened = lock(&self.session).open(&data);
                match opened {
                    Ok(plain) => {
                        bump(&shared.data);
                        self.events.data(ClientEvent::Data(plain));
                    }
                    // Copies the controller reflects to other joiners are not this member's.
                    Err(TrafficError::UnknownKey(key)) if key.id == JOINERS_KEY_ID => {}
                    Err(e) => {
                        bump(&shared.unreadable);
                        self.events.data(ClientEvent::Unreadable(e));
                    }
                }
            }
            Ok(None) => {
                let result = lock(&self.session).receive(bytes, now_ms());
                match result {
                    Ok(list) => {
                        for event in &list {
                            match event {
                                MemberEvent::Repaired { after_nak: false, .. } => bump(&shared.fec_recovered),
                                MemberEvent::Repaired { after_nak: true, .. } => bump(&shared.repair_recovered),
                                MemberEvent::Moved { group, controller, server_name, multicast, .. } => {
                                    self.moved = Some((*group, Contact { controller: *controller, server_name: server_name.clone(), multicast: *multicast }));
                                }
                                _ => {}
                            }
                        }
                        self.events.members(list);
                        self.send_nak();
                    }
                    Err(e) => {
                        bump(&shared.rejected);
                        tracing::debug!(reason = %e, "multicast message dropped");
                    }
                }
            }
            Err(e) => {
                bump(&shared.rejected);
                tracing::debug!(reason = %e, "garbage on the multicast channel dropped");
            }
        }
    }

    /// One refresh: a liveness datagram, and every so often (or always, without UDP) a TLS
    /// refresh whose answer says whether the controller still counts this member.
    async fn refresh(&mut self) {
        self.refreshes += 1;
        let over_tls = !self.setup.udp_refresh || self.setup.tls_refresh_every > 0 && self.refreshes % u64::from(self.setup.tls_refresh_every) == 0;
        if self.setup.udp_refresh {
            let datagram = lock(&self.session).liveness(now_ms(), false);
            if let Some(datagram) = datagram {
                if let Err(e) = self.unicast.send_to(&datagram, self.setup.server).await {
                    tracing::debug!(error = %e, "liveness datagram not sent");
                }
            }
        }
        if over_tls {
            self.start_refresh();
        }
    }

    fn start_refresh(&mut self) {
        if self.in_flight.refresh || self.in_flight.rejoin {
            return;
        }
        self.in_flight.refresh = true;
        let (group, member, rekey_seq) = {
            let s = lock(&self.session);
            (s.group(), s.member(), s.rekey_seq())
        };
        let setup = self.setup.clone();
        self.requests.spawn(async move {
            let message = Refresh { group, member, rekey_seq }.encode();
            let result = request::request(&setup, RequestKind::Refresh, &message, |frames| match Refresh::decode(&frames[0]) {
                Ok(_) => Ok(()),
                Err(_) => Err(refusal_or(&frames[0], "a refresh answer")),
            })
            .await;
            Outcome { member, result: Finished::Refresh(result) }
        });
    }

    fn start_resync_if_needed(&mut self) {
        let waiting = self.in_flight.resync_not_before.is_some_and(|t| Instant::now() < t);
        if self.in_flight.resync || self.in_flight.rejoin || waiting {
            return;
        }
        let (group, member, rekey_seq) = {
            let s = lock(&self.session);
            if !s.needs_resync() {
                (self.in_flight.udp_probes, self.in_flight.udp_probe_due) = (0, None);
                return;
            }
            (s.group(), s.member(), s.rekey_seq())
        };
        if self.setup.udp_refresh && self.udp_probe() {
            return;
        }
        self.in_flight.resync = true;
        let setup = self.setup.clone();
        self.requests.spawn(async move {
            let message = ResyncRequest { group, member, rekey_seq }.encode();
            let result = request::request(&setup, RequestKind::Resync, &message, |frames| {
                ResyncAnswer::decode(&frames[0]).map_err(|_| refusal_or(&frames[0], "a resync answer"))
            })
            .await;
            Outcome { member, result: Finished::Resync(result) }
        });
    }

    /// Asks for a resync over UDP, or keeps waiting for the answer to the last request; false
    /// once the UDP requests for this gap are used up (the member then asks over TLS).
    fn udp_probe(&mut self) -> bool {
        let now = Instant::now();
        if self.in_flight.udp_probe_due.is_some_and(|due| now < due) {
            return true;
        }
        if self.in_flight.udp_probes >= UDP_PROBES {
            return false;
        }
        let Some(datagram) = lock(&self.session).liveness(now_ms(), true) else { return false };
        if self.unicast.try_send_to(&datagram, self.setup.server).is_err() {
            return false;
        }
        self.in_flight.udp_probes += 1;
        self.in_flight.udp_probe_due = Some(now + UDP_PROBE_WAIT);
        true
    }

    /// Sends the session's NAK, if one is due (over UDP, like liveness datagrams).
    fn multicast_datagram(&mut self, bytes: &[u8], loss: &mut Option<LossInjector>) {
        match loss.as_mut().is_some_and(LossInjector::drops) {
            true => bump(&self.events.shared.lost),
            false => self.receive(bytes),
        }
    }

    /// Takes what has already arrived on the multicast socket (at most a bounded number, so a
    /// flood cannot hold the timers off) before a NAK or a resync is decided: on a busy host a
    /// repair may be waiting in the socket buffer when the timer fires.
    fn drain(&mut self, socket: &UdpSocket, buf: &mut [u8], loss: &mut Option<LossInjector>) {
        for _ in 0..MAX_DRAINED {
            match socket.try_recv_from(buf) {
                Ok((len, _)) => self.multicast_datagram(&buf[..len], loss),
                Err(_) => return,
            }
        }
    }

    fn send_nak(&self) {
        if !self.setup.naks {
            return;
        }
        let nak = lock(&self.session).take_nak(now_ms());
        if let Some(nak) = nak {
            bump(&self.events.shared.naks);
            if let Err(e) = self.unicast.try_send_to(&nak, self.setup.server) {
                tracing::debug!(error = %e, "NAK not sent");
            }
        }
    }

    /// A datagram on the unicast socket: a resync answer sealed to this member, or the
    /// controller's signed refusal; anything else is dropped. False when the loop should end.
    fn unicast_datagram(&mut self, bytes: &[u8]) -> bool {
        match message_type(bytes) {
            Ok(MessageType::SealedResync) => self.sealed_resync(bytes),
            Ok(MessageType::DatagramRefusal) => return self.datagram_refusal(bytes),
            _ => bump(&self.events.shared.rejected),
        }
        true
    }

    /// The controller says over UDP, signed, that it no longer counts this member.
    fn datagram_refusal(&mut self, bytes: &[u8]) -> bool {
        let result = lock(&self.session).datagram_refusal(bytes);
        match result {
            Ok(reason) => {
                (self.in_flight.udp_probes, self.in_flight.udp_probe_due) = (0, None);
                self.evicted(&ClientError::Refused(reason, "signed refusal over UDP".into()))
            }
            Err(e) => {
                bump(&self.events.shared.rejected);
                tracing::debug!(reason = %e, "unicast datagram dropped");
                true
            }
        }
    }

    fn sealed_resync(&mut self, bytes: &[u8]) {
        let result = lock(&self.session).sealed_resync(bytes, now_ms());
        match result {
            Ok(list) => {
                bump(&self.events.shared.udp_resyncs);
                (self.in_flight.udp_probes, self.in_flight.udp_probe_due) = (0, None);
                self.events.members(list);
            }
            Err(e) => {
                bump(&self.events.shared.rejected);
                tracing::debug!(reason = %e, "unicast datagram dropped");
            }
        }
    }

    /// A request finished; false when the loop should end (evicted, not rejoining).
    fn finished(&mut self, outcome: Outcome) -> bool {
        // Answers about a member this client no longer is, or is leaving behind, change nothing.
        let stale = outcome.member != self.member() || self.in_flight.rejoin;
        match outcome.result {
            Finished::Refresh(result) => {
                self.in_flight.refresh = false;
                match result {
                    Ok(()) => true,
                    Err(_) if stale => true,
                    Err(e) if e.means_evicted() => self.evicted(&e),
                    Err(e) => {
                        tracing::warn!("refresh failed: {e}; the next refresh tries again");
                        true
                    }
                }
            }
            Finished::Resync(result) => {
                self.in_flight.resync = false;
                match result {
                    _ if stale => true,
                    Ok(answer) => {
                        self.install(answer);
                        true
                    }
                    Err(e) if e.means_evicted() => self.evicted(&e),
                    Err(e) => {
                        let pause = Duration::from_millis(self.setup.requests.backoff_max_ms);
                        tracing::warn!("resync failed: {e}; trying again in {} ms", pause.as_millis());
                        self.in_flight.resync_not_before = Some(Instant::now() + pause);
                        true
                    }
                }
            }
            Finished::FailOver(result) => {
                self.in_flight.rejoin = false;
                match result {
                    Ok((standby, accepted, keys)) => {
                        self.failed_over(standby, accepted, keys);
                        true
                    }
                    Err(e) => {
                        tracing::error!("no standby of the subgroup took this member: {e}; this member stops");
                        false
                    }
                }
            }
            Finished::Rejoin(result) => {
                self.in_flight.rejoin = false;
                match result {
                    Ok((accepted, keys)) => {
                        let (session, joined) = MemberSession::join(&accepted, keys, self.setup.heartbeat_ms, now_ms());
                        *lock(&self.session) = session;
                        self.events.shared.out.store(false, Ordering::SeqCst);
                        tracing::info!(member = accepted.member.0, "rejoined the group");
                        self.events.member(ClientEvent::Rejoined { member: accepted.member });
                        self.events.members(joined);
                        true
                    }
                    Err(e) => {
                        tracing::error!("rejoin failed: {e}; this member stops");
                        false
                    }
                }
            }
        }
    }

    /// The controller went silent: join the subgroup's standbys in order (then the controller
    /// itself, back from a restart), in a task, until one accepts or the join deadline passes.
    fn fail_over(&mut self) {
        if self.setup.standbys.is_empty() || self.in_flight.rejoin {
            return;
        }
        tracing::warn!(controller = %self.setup.server, "the controller went silent: joining its standbys");
        self.in_flight.rejoin = true;
        let mut candidates = self.setup.standbys.clone();
        candidates.push(ControllerAddr { server: self.setup.server, server_name: self.setup.server_name.clone() });
        let (setup, member) = (self.setup.clone(), self.member());
        self.requests.spawn(async move { Outcome { member, result: Finished::FailOver(join_any(&setup, &candidates).await) } });
    }

    /// Joined a standby: a new session under its keys, and every request goes there from now.
    fn failed_over(&mut self, standby: ControllerAddr, accepted: JoinAccepted, keys: ResyncAnswer) {
        let (session, joined) = MemberSession::join(&accepted, keys, self.setup.heartbeat_ms, now_ms());
        *lock(&self.session) = session;
        self.in_flight = InFlight::default();
        tracing::info!(member = accepted.member.0, server = %standby.server, "failed over to a standby");
        self.events.member(ClientEvent::FailedOver { server: standby.server, member: accepted.member });
        self.events.members(joined);
        (self.setup.server, self.setup.server_name) = (standby.server.to_owned(), standby.server_name.clone());
        *self.events.shared.route.lock().expect("route lock") = Some(Route::of(&self.setup));
    }

    /// A resync answer, unless multicast already brought this member further meanwhile.
    fn install(&self, answer: ResyncAnswer) {
        let list = {
            let mut session = lock(&self.session);
            if !session.needs_resync() || answer.rekey_seq < session.rekey_seq() {
                return;
            }
            session.resynced(answer, now_ms())
        };
        self.events.members(list);
    }

    /// The controller refused this member; rejoin if asked to, else false (stop).
    fn evicted(&mut self, why: &ClientError) -> bool {
        tracing::warn!(member = self.member().0, "the controller no longer counts this member: {why}");
        self.events.shared.out.store(true, Ordering::SeqCst);
        self.events.member(ClientEvent::Member(MemberEvent::Evicted));
        // A revoked identity's joins are refused until an administrator re-admits it.
        let revoked = matches!(why, ClientError::Refused(RefusalReason::Revoked, _));
        if !self.setup.rejoin || revoked {
            return false;
        }
        self.in_flight.rejoin = true;
        let (setup, member) = (self.setup.clone(), self.member());
        self.requests.spawn(async move { Outcome { member, result: Finished::Rejoin(join_with_retries(&setup).await) } });
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch of joiners spreads its first refreshes over the whole period: a thousand draws
    /// land in every tenth of it, and none outside it.
    #[test]
    fn first_refreshes_spread_over_the_period() {
        let period = Duration::from_millis(30_000);
        let mut tenths = [0u32; 10];
        for _ in 0..1_000 {
            let phase = refresh_phase(period);
            assert!(phase > Duration::ZERO && phase <= period, "{phase:?}");
            tenths[(phase.as_millis() as usize * 10 / 30_001).min(9)] += 1;
        }
        assert!(tenths.iter().all(|&n| n >= 50), "uneven: {tenths:?}");
    }
}
