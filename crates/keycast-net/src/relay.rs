//! The relay driver (an intermediary: Iolus's GSI, Mukkamalla and Katz 6.1): one process is a
//! member of its parent group (a `MemberClient`, joined over TLS with its own certificate) and
//! the controller of its subgroup (a `Server`: own key graph, epoch, listener, multicast
//! address and log). A join, leave or eviction in the subgroup rekeys only the subgroup.
//!
//! One task carries data between the two multicast channels by re-wrapping the message key
//! (`keycast_core::protocol::relay::Forwarder` decides, and stops loops). It receives from both
//! channels, takes fresh keys on a timer and on the member's events, and never waits on a
//! request: the member client and the server run their own requests, with deadlines, beside it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use keycast_core::protocol::failover::{IncumbentDecision, IncumbentGuard, StandbyDecision, StandbyPolicy, StandbyWatch, SILENT_INTERVALS};
use keycast_core::protocol::relay::{ForwardStats, Forwarder, Side};
use keycast_core::protocol::MemberEvent;
use keycast_core::wire::heartbeat::SignedHeartbeat;
use keycast_core::wire::{message_type, Data, GroupId, MessageType, VerifyingKey, MAX_MESSAGE_LEN};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::client::{ClientError, ClientEvent, MemberClient, MemberSetup};
use crate::config::MulticastConfig;
use crate::server::{GroupKeys, Server, ServerError, ServerSetup};
use crate::admin::ParentLink;
use crate::{data_nonce, multicast, now_ms};

/// How often the relay takes both sides' keys even without an event (a subgroup key activates
/// with the epoch, which sends no event to the relay).
const KEY_REFRESH: Duration = Duration::from_millis(50);

#[derive(Clone)]
pub struct RelaySetup {
    /// The relay as a member of its parent group.
    pub parent: MemberSetup,
    /// The relay as the controller of its subgroup.
    pub subgroup: ServerSetup,
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("the subgroup's controller: {0}")]
    Subgroup(#[from] ServerError),
    #[error("joining the parent group: {0}")]
    Parent(#[from] ClientError),
    #[error("a multicast socket of {addr}: {source}")]
    Multicast { addr: std::net::SocketAddrV4, source: std::io::Error },
    #[error("the subgroup must have its own group id, not the parent's ({0})")]
    SameGroup(u64),
}

/// A running relay. Dropping it stops it (the subgroup's controller as by a crash).
pub struct Relay {
    pub server: Server,
    parent: Arc<MemberClient>,
    stats: Arc<Mutex<ForwardStats>>,
    forwarding: AbortOnDrop,
    stepped_down: watch::Receiver<bool>,
}

/// A task that stops when its handle is dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A channel's receiving and sending sockets.
struct Channel {
    receiver: UdpSocket,
    sender: UdpSocket,
    config: MulticastConfig,
}

impl Channel {
    fn open(config: &MulticastConfig) -> Result<Channel, RelayError> {
        let failed = |source| RelayError::Multicast { addr: config.address, source };
        Ok(Channel { receiver: multicast::receiver(config).map_err(failed)?, sender: multicast::sender(config).map_err(failed)?, config: config.clone() })
    }
}

impl Relay {
    /// Starts the subgroup's controller, then joins the parent group (retrying until the
    /// member's join deadline), then forwards.
    pub async fn start(setup: RelaySetup) -> Result<Relay, RelayError> {
        let (parent_group, subgroup) = (setup.parent.group, setup.subgroup.policy.group);
        if parent_group == subgroup {
            return Err(RelayError::SameGroup(subgroup.0));
        }
        // Listen on both channels first: nothing sent once the relay is up is missed.
        let channels = [Channel::open(&setup.parent.multicast)?, Channel::open(&setup.subgroup.multicast)?];
        let heartbeat_ms = setup.subgroup.policy.heartbeat_ms;
        let server = Server::start(setup.subgroup).await?;
        let parent = MemberClient::join(setup.parent).await?;
        Ok(Relay::forward(server, parent, channels, (parent_group, subgroup), heartbeat_ms))
    }

    /// A standby's take-over: a fresh controller of the subgroup beside the standby's
    /// membership of the parent (joined while it watched). The subgroup's `rejoining` members
    /// are batched as soon as they are all back.
    async fn take_over(setup: RelaySetup, parent: (MemberClient, mpsc::Receiver<ClientEvent>), rejoining: usize) -> Result<Relay, RelayError> {
        let groups = (setup.parent.group, setup.subgroup.policy.group);
        let channels = [Channel::open(&setup.parent.multicast)?, Channel::open(&setup.subgroup.multicast)?];
        let heartbeat_ms = setup.subgroup.policy.heartbeat_ms;
        let server = Server::start(setup.subgroup).await?;
        server.expect_rejoins(rejoining).await;
        Ok(Relay::forward(server, parent, channels, groups, heartbeat_ms))
    }

    fn forward(
        server: Server,
        (client, events): (MemberClient, mpsc::Receiver<ClientEvent>),
        channels: [Channel; 2],
        (parent_group, subgroup): (GroupId, GroupId),
        heartbeat_ms: u64,
    ) -> Relay {
        let parent = Arc::new(client);
        server.set_parent(ParentLink { group: parent_group.0, member: parent.member().0 });
        let stats = Arc::new(Mutex::new(ForwardStats::default()));
        let (step_down, stepped_down) = watch::channel(false);
        let forwarding = Forwarding {
            forwarder: Forwarder::new(parent_group, subgroup),
            parent: parent.clone(),
            subgroup_keys: server.keys(),
            channels,
            stats: stats.clone(),
            guard: Guard {
                incumbent: IncumbentGuard::new(heartbeat_ms, now_ms()),
                subgroup,
                controller: server.verifying_key,
                controller_tasks: server.abort_handles(),
                step_down,
                own_heard_ms: None,
                own_epoch: 0,
            },
        };
        let task = tokio::spawn(forwarding.run(events));
        tracing::info!(parent = parent_group.0, subgroup = subgroup.0, member = parent.member().0, "relay forwarding");
        Relay { server, parent, stats, forwarding: AbortOnDrop(task), stepped_down }
    }

    /// Resolves once this relay has stepped down (a standby took over while it was cut off):
    /// its subgroup's controller is stopped and it is leaving the parent group.
    pub async fn until_stepped_down(&self) {
        let mut stepped_down = self.stepped_down.clone();
        // The sender lives in the forwarding task, which ends only by stepping down (or with
        // the relay): either way it relays no more.
        let _ = stepped_down.wait_for(|down| *down).await;
    }

    pub fn stepped_down(&self) -> bool {
        *self.stepped_down.borrow()
    }

    /// Stops at once, as a crash would, and waits until the subgroup's controller is gone (so
    /// its log's lock is free for a restart in the same process).
    pub async fn kill(self) {
        let Relay { server, forwarding, .. } = self;
        drop(forwarding);
        server.kill().await;
    }

    /// What was forwarded each way and dropped.
    pub fn stats(&self) -> ForwardStats {
        *self.stats.lock().expect("relay stats lock")
    }

    /// The relay's membership of its parent group.
    pub fn parent(&self) -> &MemberClient {
        &self.parent
    }
}

struct Forwarding {
    forwarder: Forwarder,
    parent: Arc<MemberClient>,
    subgroup_keys: GroupKeys,
    /// Parent's channel, then the subgroup's.
    channels: [Channel; 2],
    stats: Arc<Mutex<ForwardStats>>,
    guard: Guard,
}

/// The relay's side of `IncumbentGuard`: what it needs to tell its own controller's
/// heartbeats from another's, and to step down.
struct Guard {
    incumbent: IncumbentGuard,
    subgroup: GroupId,
    controller: VerifyingKey,
    controller_tasks: Vec<tokio::task::AbortHandle>,
    step_down: watch::Sender<bool>,
    /// When its own controller's last heartbeat came back on the channel, and its epoch.
    own_heard_ms: Option<u64>,
    own_epoch: u64,
}

fn index(side: Side) -> usize {
    match side {
        Side::Parent => 0,
        Side::Subgroup => 1,
    }
}

impl Forwarding {
    async fn run(mut self, mut events: mpsc::Receiver<ClientEvent>) {
        let (mut parent_buf, mut subgroup_buf) = (vec![0u8; MAX_MESSAGE_LEN], vec![0u8; MAX_MESSAGE_LEN]);
        let mut refresh = tokio::time::interval(KEY_REFRESH);
        let mut member_events = true;
        loop {
            self.guard.incumbent.ran(now_ms());
            let go_on = tokio::select! {
                received = self.channels[0].receiver.recv_from(&mut parent_buf) => {
                    if let Ok((len, _)) = received {
                        self.relay(Side::Parent, &parent_buf[..len]);
                    }
                    true
                }
                received = self.channels[1].receiver.recv_from(&mut subgroup_buf) => match received {
                    Ok((len, _)) => self.subgroup_datagram(&subgroup_buf[..len]),
                    Err(_) => true,
                },
                _ = refresh.tick() => {
                    self.install(Side::Parent);
                    self.install(Side::Subgroup);
                    self.parent_silence();
                    true
                }
                event = events.recv(), if member_events => {
                    match event {
                        Some(ClientEvent::Member(event)) => self.member_event(event),
                        Some(_) => {}
                        None => {
                            tracing::error!("the relay's membership of its parent group ended: nothing more goes up or down");
                            member_events = false;
                        }
                    }
                    true
                }
            };
            if !go_on {
                return;
            }
        }
    }

    /// A datagram on the subgroup's channel: data is relayed; a heartbeat for the subgroup
    /// that this relay's controller did not sign goes to the guard. False once it stepped down.
    fn subgroup_datagram(&mut self, bytes: &[u8]) -> bool {
        if message_type(bytes) != Ok(MessageType::Heartbeat) {
            self.relay(Side::Subgroup, bytes);
            return true;
        }
        let Some(beat) = SignedHeartbeat::decode(bytes).ok().filter(|b| b.heartbeat.group == self.guard.subgroup) else { return true };
        let now = now_ms();
        if SignedHeartbeat::verify(bytes, &self.guard.controller).is_ok() {
            // Its own controller's: a gap between them is a silence its members saw too.
            if let Some(last) = self.guard.own_heard_ms.replace(now) {
                self.guard.incumbent.silent(last, now);
            }
            self.guard.own_epoch = beat.heartbeat.epoch;
            return true;
        }
        match self.guard.incumbent.foreign_heartbeat(now, beat.heartbeat.epoch < self.guard.own_epoch) {
            Some(IncumbentDecision::StepDown) => {
                self.step_down();
                false
            }
            Some(IncumbentDecision::Conflict) => {
                tracing::warn!(subgroup = self.guard.subgroup.0, "another controller's heartbeat for this subgroup, though this relay was never cut off: check for a second relay");
                true
            }
            None => true,
        }
    }

    /// Not hearing the parent for as long as the alive alarm cuts this relay off too.
    fn parent_silence(&mut self) {
        let (heard, now) = (self.parent.last_heard_ms(), now_ms());
        if now.saturating_sub(heard) > SILENT_INTERVALS * self.parent.heartbeat_ms() {
            self.guard.incumbent.silent(heard, now);
        }
    }

    /// A standby took over while this relay was cut off: its controller stops at once (the
    /// members have rejoined the standby's), and it leaves the parent group.
    fn step_down(&mut self) {
        tracing::warn!(subgroup = self.guard.subgroup.0, "a standby took over this subgroup while this relay was cut off: stepping down");
        for task in &self.guard.controller_tasks {
            task.abort();
        }
        let parent = self.parent.clone();
        tokio::spawn(async move {
            if let Err(e) = parent.leave_shared().await {
                tracing::warn!("leaving the parent group after stepping down: {e}; the membership expires instead");
            }
        });
        let _ = self.guard.step_down.send(true);
    }

    fn member_event(&mut self, event: MemberEvent) {
        match event {
            MemberEvent::Evicted => tracing::warn!("the parent group evicted this relay"),
            MemberEvent::ControllerLost => tracing::warn!("the parent group's controller went silent"),
            _ => tracing::debug!(?event, "parent group"),
        }
        self.install(Side::Parent);
    }

    fn install(&mut self, side: Side) {
        let keys = match side {
            Side::Parent => Some(self.parent.traffic_keys()),
            Side::Subgroup => self.subgroup_keys.get(),
        };
        if let Some(keys) = keys {
            self.forwarder.install(side, &keys);
        }
    }

    /// One datagram from `from`'s channel: data goes to the other channel re-wrapped, once;
    /// everything else on the channel (rekeys, heartbeats) is not the relay's to forward.
    fn relay(&mut self, from: Side, bytes: &[u8]) {
        if message_type(bytes) != Ok(MessageType::Data) {
            return;
        }
        let data = match Data::decode(bytes) {
            Ok(data) => data,
            Err(e) => return tracing::debug!(reason = %e, ?from, "malformed data not relayed"),
        };
        if self.forwarder.lacks_key(from, &data) {
            // A rekey may have come since the last refresh.
            self.install(from);
        }
        match self.forwarder.forward(from, data, data_nonce()) {
            Ok(forwarded) => {
                let to = &self.channels[index(from.other())];
                if let Err(e) = to.sender.try_send_to(&forwarded.encode(), to.config.address.into()) {
                    tracing::debug!(error = %e, "relayed data not sent");
                }
            }
            Err(why) => tracing::debug!(%why, ?from, "data not relayed"),
        }
        *self.stats.lock().expect("relay stats lock") = self.forwarder.stats();
    }
}

/// A standby relay (GSM fail-over): a member of the subgroup, watching its active relay, and
/// what it runs once it takes over.
#[derive(Clone)]
pub struct StandbySetup {
    /// Registration number: 1 takes over first.
    pub registration: u32,
    /// Wait per place in line after the alive alarm (`StandbyPolicy::back_off_ms`).
    pub back_off_ms: u64,
    /// Its membership of the subgroup, through which it hears the active relay; its
    /// `standbys` are those before it in line, whom it follows when they take over.
    pub watch: MemberSetup,
    /// The relay it becomes: its own certificate for the parent, and a fresh controller of
    /// the subgroup (same group id and multicast channel, its own listener and log).
    pub relay: RelaySetup,
}

/// A running standby. Dropping it stops it, and the relay it became.
pub struct Standby {
    active: watch::Receiver<Option<TookOver>>,
    task: JoinHandle<()>,
}

/// The relay a standby became, and when its alarm let it take over (ms since the Unix epoch).
#[derive(Clone)]
pub struct TookOver {
    pub relay: Arc<Relay>,
    pub at_ms: u64,
}

impl Drop for Standby {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Standby {
    /// Joins the subgroup as a member and the parent group as the relay it may become (each
    /// retrying until its join deadline), then watches. Joined in advance, a take-over needs
    /// no parent epoch: data flows as soon as the fresh controller runs.
    pub async fn start(setup: StandbySetup) -> Result<Standby, RelayError> {
        // Before its memberships bind sockets of their own, one of which could get the port.
        let listen = setup.relay.subgroup.listen;
        let reserved = Reserved::bind(listen).map_err(|e| RelayError::Subgroup(ServerError::Io(e)))?;
        let (client, events) = MemberClient::join(setup.watch.clone()).await?;
        let parent = MemberClient::join(setup.relay.parent.clone()).await?;
        let policy = StandbyPolicy { registration: setup.registration, heartbeat_ms: setup.watch.heartbeat_ms, back_off_ms: setup.back_off_ms };
        let alarm = StandbyWatch::new(policy, client.last_heard_ms());
        let (report, active) = watch::channel(None);
        let task = tokio::spawn(watch_then_take_over(alarm, (client, events), parent, (setup.relay, reserved), report));
        Ok(Standby { active, task })
    }

    /// The relay this standby became, once it took over.
    pub fn active(&self) -> Option<TookOver> {
        self.active.borrow().clone()
    }

    /// Waits until this standby has taken over.
    pub async fn until_active(&self) -> TookOver {
        let mut active = self.active.clone();
        let took_over = active.wait_for(Option::is_some).await.expect("the standby task holds its sender until it ends").clone();
        took_over.expect("waited for Some")
    }
}

type Membership = (MemberClient, mpsc::Receiver<ClientEvent>);

/// A standby's listen address (TCP and UDP), bound until it takes over so that no other
/// socket gets the port meanwhile; not listening, so members' connections are refused at once.
struct Reserved {
    _tcp: Option<tokio::net::TcpSocket>,
    _udp: Option<std::net::UdpSocket>,
}

impl Reserved {
    /// Nothing to hold for a port the system picks (0).
    fn bind(addr: std::net::SocketAddr) -> std::io::Result<Reserved> {
        if addr.port() == 0 {
            return Ok(Reserved { _tcp: None, _udp: None });
        }
        let tcp = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        // As the controller's listener binds: outgoing connections' ports do not conflict.
        tcp.set_reuseaddr(true)?;
        tcp.bind(addr)?;
        Ok(Reserved { _tcp: Some(tcp), _udp: Some(std::net::UdpSocket::bind(addr)?) })
    }
}

/// The standby's one task: polls its membership's last heartbeat into the alarm (a few times
/// a heartbeat interval) and acts on the alarm's decisions; taking over is its last step.
async fn watch_then_take_over(
    mut alarm: StandbyWatch,
    watching: Membership,
    parent: Membership,
    (relay, reserved): (RelaySetup, Reserved),
    report: watch::Sender<Option<TookOver>>,
) {
    let registration = alarm.policy().registration;
    let mut reserved = Some(reserved);
    // Every member the silent relay last counted rejoins, but this standby.
    let mut rejoining = 0;
    let mut tick = tokio::time::interval(Duration::from_millis((alarm.policy().heartbeat_ms / 4).clamp(5, 250)));
    let (client, mut events) = watching;
    let mut client = Some(client);
    let mut parent = Some(parent);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            event = events.recv(), if client.is_some() => match event {
                Some(ClientEvent::FailedOver { server, .. }) => tracing::info!(registration, %server, "standby: following the relay that took over"),
                Some(_) => {}
                None => tracing::warn!(registration, "standby: its membership of the subgroup ended; it takes over when the alarm says"),
            },
            // Nothing to forward yet: the parent's events are read only so they do not pile up.
            Some(_) = async { parent.as_mut()?.1.recv().await }, if parent.is_some() => {}
        }
        let now = now_ms();
        if let Some(client) = &client {
            if alarm.heard_active(client.last_heard_ms()) == Some(StandbyDecision::StandDown) {
                tracing::info!(registration, "standby: another relay is active; standing down");
            }
            rejoining = client.group_size().saturating_sub(1) as usize;
        }
        match alarm.tick(now) {
            Some(StandbyDecision::Alarm { take_over_at_ms }) => {
                tracing::warn!(registration, in_ms = take_over_at_ms.saturating_sub(now), "standby: the active relay is silent (alive alarm)");
            }
            Some(StandbyDecision::TakeOver) => {
                // Its membership would only try to join this standby itself.
                client = None;
                // The controller binds the port now (a failed take-over holds it no more).
                drop(reserved.take());
                let membership = match parent.take() {
                    Some(membership) => Ok(membership),
                    None => MemberClient::join(relay.parent.clone()).await,
                };
                let started = match membership {
                    Ok(membership) => Relay::take_over(relay.clone(), membership, rejoining).await,
                    Err(e) => Err(e.into()),
                };
                match started {
                    Ok(started) => {
                        tracing::warn!(registration, rejoining, listen = %started.server.addr, "standby: took over the subgroup with new keys");
                        let _ = report.send(Some(TookOver { relay: Arc::new(started), at_ms: now }));
                        // The relay lives on in the report (dropped with the `Standby`).
                        return;
                    }
                    Err(e) => {
                        tracing::error!(registration, "standby: taking over failed: {e}; watching again");
                        alarm.take_over_failed(now_ms());
                    }
                }
            }
            Some(StandbyDecision::StandDown) | None => {}
        }
    }
}
