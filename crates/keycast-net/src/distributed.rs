//! The tokio driver of a distributed flat participant
//! (`keycast_core::protocol::distributed_flat`, docs/distributed-flat.md). One task owns the
//! sans-IO participant and steps it on every input: announcements and presences from the
//! group's multicast address, private messages and join requests from its TLS listener (mutual
//! TLS with the group's participant certificates; the peer is the identity its certificate
//! proves), orders from the application, and its timers. Private messages to peers go out in
//! tasks of their own, each under a deadline with jittered retries: the task never awaits a peer.
//!
//! A participant multicasts a signed [`Presence`] (its identity and listener address) every
//! `presence_ms`: that is how participants find each other's listeners and a joiner finds
//! introducers. A joiner asks an introducer over TLS; the introducer admits it and answers with
//! the join grant on the same connection.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, SocketAddrV4};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keycast_core::key::{Key, KeyRef};
use keycast_core::keygen::BatchSeed;
use keycast_core::graph::{JoinPolicy, MemberId};
use keycast_core::protocol::controller::handback_record;
use keycast_core::protocol::GroupPolicy;
use keycast_core::protocol::distributed_flat::handback::{Handback, HandbackRefused, TableCollector};
use keycast_core::protocol::distributed_flat::{Appointment, ChangeRef, Config, Directory, Event, HandbackKeys, Identity, Output, Participant, Presence, Refused};
use keycast_core::wire::auth::VerifyingKey;
use keycast_core::wire::Signer;
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use zeroize::Zeroizing;

use crate::config::MulticastConfig;
use crate::store::{DatabaseKey, Store, StoreError};
use crate::pki::{participant_public_key, participant_signing_seed, Credentials};
use crate::request::jittered;
use crate::tls::{client_config, peer_certificate, peer_identity, read_frame, server_config, write_frame, TlsSetupError};
use crate::{entropy, lock, multicast, now_ms};

/// First byte of a request on the private channel.
const JOIN_REQUEST: u8 = 1;
const PRIVATE_MESSAGE: u8 = 2;
/// The appointed participant asks for a handback (`Appointment`); the answer carries it.
const APPOINT: u8 = 3;
/// First byte of an answer.
const ANSWER_OK: u8 = 0;
const ANSWER_BUSY: u8 = 1;
const ANSWER_REFUSED: u8 = 2;

/// Longest datagram read from the multicast address (announcements fit in one datagram).
const MAX_DATAGRAM: usize = 65_536;
/// Announcements kept while joining, replayed once the grant is installed.
const MAX_EARLY_ANNOUNCEMENTS: usize = 64;
/// TLS connections served at once by one participant.
const MAX_CONNECTIONS: usize = 64;
/// One attempt of a private exchange: connect, handshake, request and answer.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
const BACKOFF_MIN_MS: u64 = 20;
const BACKOFF_MAX_MS: u64 = 1_000;
const EVENT_CAPACITY: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum DistributedError {
    #[error("certificate: {0}")]
    Certificate(String),
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error("join through {introducer}: {reason}")]
    Join { introducer: Identity, reason: String },
    #[error("the participant's task has stopped")]
    Stopped,
}

/// What one participant needs: the group's settings, its certificate, the ACL's certificates
/// and the multicast address of the group.
#[derive(Clone)]
pub struct DistributedSetup {
    pub config: Config,
    pub credentials: Credentials,
    /// The verifying keys of the ACL's participant certificates (see [`directory_entry`]).
    pub directory: Directory,
    pub multicast: MulticastConfig,
    /// Pause between two presences (jittered).
    pub presence_ms: u64,
    /// How long a private message or a join request is retried.
    pub deadline_ms: u64,
}

/// A participant certificate's entry in the directory: the identity it proves and its key.
pub fn directory_entry(cert_pem: &str) -> Result<(Identity, VerifyingKey), DistributedError> {
    use rustls::pki_types::pem::PemObject;
    let certificate = |e: String| DistributedError::Certificate(e);
    let der = rustls::pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| certificate(e.to_string()))?;
    let name = peer_identity(der.as_ref(), false).map_err(|e| certificate(e.to_string()))?;
    let identity = Identity::new(&name).map_err(|e| certificate(e.to_string()))?;
    Ok((identity, VerifyingKey(participant_public_key(cert_pem).map_err(certificate)?)))
}

/// A participant's listener, as its presences announce it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Introducer {
    pub identity: Identity,
    pub addr: SocketAddr,
}

/// What a participant sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub announcements: u64,
    pub announcement_bytes: u64,
    pub presences: u64,
    pub presence_bytes: u64,
    /// Private messages delivered (acknowledged by their recipient), and their bytes.
    pub private: u64,
    pub private_bytes: u64,
    /// Private messages given up on after their deadline, or refused by their recipient.
    pub private_failed: u64,
}

impl std::iter::Sum for Traffic {
    /// What several participants sent, together.
    fn sum<I: Iterator<Item = Traffic>>(all: I) -> Traffic {
        all.fold(Traffic::default(), |a, b| Traffic {
            announcements: a.announcements + b.announcements,
            announcement_bytes: a.announcement_bytes + b.announcement_bytes,
            presences: a.presences + b.presences,
            presence_bytes: a.presence_bytes + b.presence_bytes,
            private: a.private + b.private,
            private_bytes: a.private_bytes + b.private_bytes,
            private_failed: a.private_failed + b.private_failed,
        })
    }
}

/// A participant's state as its task last published it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub live: bool,
    pub settled: bool,
    pub id: u64,
    pub change: ChangeRef,
    pub tek: Option<KeyRef>,
    pub roster: BTreeMap<u64, Identity>,
    /// Whether an exclusion round is open, and the ID bits whose KEK is awaited.
    pub awaiting: (bool, Vec<u8>),
}

/// What the participant's task shares with the handle and its sending tasks.
struct Shared {
    status: Status,
    /// The TEK and KEKs held now.
    held: Vec<(KeyRef, Key)>,
    /// Every key this participant ever held: what it could still use if it were removed.
    ever_held: BTreeMap<KeyRef, Key>,
    traffic: Traffic,
    /// Each participant's newest presence: (its time, its listener).
    addresses: BTreeMap<Identity, (u64, SocketAddr)>,
}

enum Command {
    Join { from: Identity, reply: oneshot::Sender<Result<Zeroizing<Vec<u8>>, Refused>> },
    Private { from: Identity, bytes: Zeroizing<Vec<u8>>, reply: oneshot::Sender<Result<(), Refused>> },
    Exclude { id: u64, eviction: bool, reply: oneshot::Sender<Result<(), Refused>> },
    Leave { reply: oneshot::Sender<Result<(), Refused>> },
    /// Announcements to multicast again at these times (Unix ms).
    Repeat(Vec<(u64, Vec<u8>)>),
    /// Appointed to take the group back: collect the participants' handbacks, this one's first.
    Collect { reply: oneshot::Sender<Result<(), Refused>> },
    /// Build the controller's table from the handbacks collected.
    FinishCollection { policy: JoinPolicy, reply: oneshot::Sender<Result<Handback, HandbackRefused>> },
    /// This participant's handback (its ID and keys, if it holds all of them).
    Handback { reply: oneshot::Sender<Option<HandbackKeys>> },
    /// `from` was appointed to take the group back and asks for this participant's handback.
    Appointed { from: Identity, request: Zeroizing<Vec<u8>>, reply: oneshot::Sender<Result<Zeroizing<Vec<u8>>, Refused>> },
}

/// This participant handed its keys back to `collector`, appointed to take the group back to
/// the controller `appointment` names: it takes no more orders and should join that controller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandedBack {
    pub collector: Identity,
    pub appointment: Appointment,
}

/// A running participant. Dropping it stops its tasks.
pub struct DistributedParticipant {
    identity: Identity,
    listener: SocketAddr,
    channel: Arc<Channel>,
    setup: DistributedSetup,
    commands: mpsc::Sender<Command>,
    shared: Arc<Mutex<Shared>>,
    events: Option<mpsc::Receiver<Event>>,
    handed_back: watch::Receiver<Option<HandedBack>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for DistributedParticipant {
    fn drop(&mut self) {
        self.tasks.iter().for_each(JoinHandle::abort);
    }
}

impl DistributedParticipant {
    /// The first participant of a new group.
    pub async fn create(setup: DistributedSetup) -> Result<Self, DistributedError> {
        let (identity, signer) = own_identity(&setup)?;
        let seed = BatchSeed::from_bytes(entropy());
        let participant = Participant::create(setup.config, identity, signer, setup.directory.clone(), &seed)?;
        Self::start(setup, participant, Vec::new()).await
    }

    /// A member of a centralized flat group whose controller is lost continues as a
    /// participant (figure 6; `Participant::from_centralized`): `id` is its flat ID and `keys`
    /// its TEK and the KEKs of its ID bits (`MemberClient::flat_shares`). It multicasts its
    /// handover at once and again at a quarter, half and three quarters of the settle time, so
    /// members that bound their sockets a little later hear it (a repeat is a replay to those
    /// that did); after the settle time it admits and excludes as any participant.
    pub async fn from_centralized(setup: DistributedSetup, id: u64, keys: Vec<(KeyRef, Key)>) -> Result<Self, DistributedError> {
        Self::converted(setup, id, keys, None).await
    }

    /// [`Self::from_centralized`], with the handover ending once this participant lists
    /// `members` participants (the group's size by its controller's last heartbeat,
    /// `MemberClient::group_size`) or after `within_ms` (`Participant::end_handover_when`)
    /// instead of after the settle time: it works however long the handovers take to come in.
    pub async fn from_centralized_group(setup: DistributedSetup, id: u64, keys: Vec<(KeyRef, Key)>, members: usize, within_ms: u64) -> Result<Self, DistributedError> {
        Self::converted(setup, id, keys, Some((members, within_ms))).await
    }

    async fn converted(setup: DistributedSetup, id: u64, keys: Vec<(KeyRef, Key)>, until_complete: Option<(usize, u64)>) -> Result<Self, DistributedError> {
        let (identity, signer) = own_identity(&setup)?;
        let now = now_ms();
        let (mut participant, mut outputs) = Participant::from_centralized(setup.config, identity, signer, setup.directory.clone(), id, keys, now)?;
        if let Some((members, within_ms)) = until_complete {
            outputs.extend(participant.end_handover_when(members, now.saturating_add(within_ms)));
        }
        let settle_ms = setup.config.settle_ms;
        let handover = outputs.iter().find_map(|o| match o {
            Output::Multicast(bytes) => Some(bytes.clone()),
            _ => None,
        });
        let repeats = handover.into_iter().flat_map(|bytes| (1..4).map(move |k| (now + settle_ms * k / 4, bytes.clone()))).collect();
        let this = Self::start(setup, participant, outputs).await?;
        this.commands.send(Command::Repeat(repeats)).await.map_err(|_| DistributedError::Stopped)?;
        Ok(this)
    }

    /// Joins through `introducer`: retried while it is busy (an exclusion settling) until the
    /// deadline; returns once the grant is installed.
    pub async fn join(setup: DistributedSetup, introducer: &Introducer) -> Result<Self, DistributedError> {
        let (identity, signer) = own_identity(&setup)?;
        let participant = Participant::joining(setup.config, identity, signer, setup.directory.clone());
        let deadline = Instant::now() + Duration::from_millis(setup.deadline_ms);
        let this = Self::start(setup.clone(), participant, Vec::new()).await?;
        let channel = Channel::new(&setup.credentials)?;
        let join_error = |reason: String| DistributedError::Join { introducer: introducer.identity.clone(), reason };
        let grant = channel.join(introducer, deadline).await.map_err(join_error)?;
        let (reply, answer) = oneshot::channel();
        let command = Command::Private { from: introducer.identity.clone(), bytes: grant, reply };
        this.commands.send(command).await.map_err(|_| DistributedError::Stopped)?;
        answer.await.map_err(|_| DistributedError::Stopped)??;
        Ok(this)
    }

    /// Starts the participant's tasks; its task first sends `initial` (outputs of its creation).
    async fn start(setup: DistributedSetup, participant: Participant, initial: Vec<Output>) -> Result<Self, DistributedError> {
        let identity = participant.identity().clone();
        let tcp = TcpListener::bind((setup.multicast.interface, 0)).await?;
        let listener = tcp.local_addr()?;
        let receiver = multicast::receiver(&setup.multicast)?;
        let sender = multicast::sender(&setup.multicast)?;
        let (commands, inbox) = mpsc::channel(256);
        let (events_out, events) = mpsc::channel(EVENT_CAPACITY);
        let shared = Arc::new(Mutex::new(Shared {
            status: status_of(&participant),
            held: participant.held_keys(),
            ever_held: participant.held_keys().into_iter().collect(),
            traffic: Traffic::default(),
            addresses: BTreeMap::new(),
        }));
        let channel = Arc::new(Channel::new(&setup.credentials)?);
        let acceptor = TlsAcceptor::from(server_config(&setup.credentials)?);
        let (handed_back_out, handed_back) = watch::channel(None);
        let actor = Actor {
            handed_back: handed_back_out,
            collector: None,
            participant,
            sender,
            group_addr: SocketAddr::V4(setup.multicast.address),
            listener,
            shared: shared.clone(),
            channel: channel.clone(),
            timers: BTreeSet::new(),
            early: Vec::new(),
            joined: false,
            initial,
            repeats: Vec::new(),
            events: events_out,
            setup: setup.clone(),
        };
        let serve = serve_listener(tcp, acceptor, commands.clone(), setup.directory.clone());
        let tasks = vec![tokio::spawn(actor.run(inbox, receiver)), tokio::spawn(serve)];
        Ok(DistributedParticipant { identity, listener, channel, setup, commands, shared, events: Some(events), handed_back, tasks })
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// This participant's listener, for joiners that ask it to introduce them.
    pub fn introducer(&self) -> Introducer {
        Introducer { identity: self.identity.clone(), addr: self.listener }
    }

    /// Live participants whose presence this one has heard: introducers for a joiner.
    pub fn known_introducers(&self) -> Vec<Introducer> {
        let shared = lock(&self.shared);
        let live = |who: &Identity| shared.status.roster.values().any(|w| w == who);
        shared.addresses.iter().filter(|(who, _)| live(who)).map(|(who, (_, addr))| Introducer { identity: who.clone(), addr: *addr }).collect()
    }

    pub fn status(&self) -> Status {
        lock(&self.shared).status.clone()
    }

    /// The TEK in force, if held (secret: for sealing data, audits and tests).
    pub fn tek(&self) -> Option<(KeyRef, Key)> {
        let shared = lock(&self.shared);
        shared.held.iter().find(|(r, _)| Some(*r) == shared.status.tek).cloned()
    }

    /// The TEK and KEKs held now (secret: for audits and tests).
    pub fn held_keys(&self) -> Vec<(KeyRef, Key)> {
        lock(&self.shared).held.clone()
    }

    /// The key `key_ref` if this participant ever held it (secret: for opening data), without
    /// copying the others.
    pub fn held_once(&self, key_ref: KeyRef) -> Option<Key> {
        lock(&self.shared).ever_held.get(&key_ref).cloned()
    }

    /// Every key this participant ever held (secret: for audits and tests).
    pub fn ever_held(&self) -> BTreeMap<KeyRef, Key> {
        lock(&self.shared).ever_held.clone()
    }

    pub fn traffic(&self) -> Traffic {
        lock(&self.shared).traffic
    }

    /// The participant's events (once: later calls return None). Events beyond the
    /// channel's capacity are dropped while nobody reads them.
    pub fn events(&mut self) -> Option<mpsc::Receiver<Event>> {
        self.events.take()
    }

    /// Removes participant `id` and revokes its identity, as its excluder.
    pub async fn evict(&self, id: u64) -> Result<(), DistributedError> {
        self.order(|reply| Command::Exclude { id, eviction: true, reply }).await
    }

    /// Asks to leave: the lowest other participant excludes this one.
    pub async fn leave(&self) -> Result<(), DistributedError> {
        self.order(|reply| Command::Leave { reply }).await
    }

    /// Appointed to take the group back to a controller (figure 6): from now on this
    /// participant collects the handbacks of the live participants of its roster, at its TEK,
    /// beginning with its own.
    pub async fn collect_table(&self) -> Result<(), DistributedError> {
        self.order(|reply| Command::Collect { reply }).await
    }

    /// The appointed controller's table from the handbacks collected so far
    /// (`TableCollector::build`): live participants that did not hand back are removed.
    pub async fn finish_collection(&self, policy: JoinPolicy) -> Result<Handback, DistributedError> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(Command::FinishCollection { policy, reply }).await.map_err(|_| DistributedError::Stopped)?;
        Ok(answer.await.map_err(|_| DistributedError::Stopped)?.map_err(Refused::from)?)
    }

    /// Hands this participant's ID, TEK and KEKs to the appointed participant `to`, over the
    /// mutually authenticated channel (retried until the deadline). True once `to` took them.
    pub async fn hand_back(&self, to: &Identity) -> Result<bool, DistributedError> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(Command::Handback { reply }).await.map_err(|_| DistributedError::Stopped)?;
        let Some(handback) = answer.await.map_err(|_| DistributedError::Stopped)? else { return Err(Refused::Busy.into()) };
        let bytes = handback.encode(self.setup.config.group);
        Ok(self.channel.deliver(&self.shared, to.clone(), bytes, self.setup.deadline_ms).await)
    }

    /// Set once this participant handed its keys back to an appointed participant.
    pub fn handed_back(&self) -> watch::Receiver<Option<HandedBack>> {
        self.handed_back.clone()
    }

    /// Appointed to take the group back to the controller `appointment` names (figure 6):
    /// collects this participant's keys and asks every other live participant of its roster
    /// for its handback over the mutually authenticated channel, all at once, each retried
    /// until `within` passes; then builds the controller's table (`finish_collection`).
    /// Participants that did not hand back by then are removed from it.
    pub async fn take_back(&self, appointment: &Appointment, within: Duration, policy: JoinPolicy) -> Result<Handback, DistributedError> {
        self.collect_table().await?;
        let deadline = Instant::now() + within;
        let request = Zeroizing::new([&[APPOINT][..], &appointment.encode()].concat());
        let mut asks = JoinSet::new();
        for who in self.status().roster.into_values().filter(|who| *who != self.identity) {
            let (channel, shared, request) = (self.channel.clone(), self.shared.clone(), request.clone());
            asks.spawn(async move {
                let answer = channel.ask_handback(&shared, &who, &request, deadline).await;
                (who, answer)
            });
        }
        while let Some(done) = asks.join_next().await {
            match done {
                Ok((from, Ok(bytes))) => {
                    let taken = self.order(|reply| Command::Private { from: from.clone(), bytes, reply }).await;
                    if let Err(error) = taken {
                        tracing::warn!(%from, %error, "handback refused");
                    }
                }
                Ok((from, Err(reason))) => tracing::warn!(%from, %reason, "no handback"),
                Err(error) => tracing::error!(%error, "a handback request failed"),
            }
        }
        self.finish_collection(policy).await
    }

    async fn order(&self, command: impl FnOnce(oneshot::Sender<Result<(), Refused>>) -> Command) -> Result<(), DistributedError> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(command(reply)).await.map_err(|_| DistributedError::Stopped)?;
        Ok(answer.await.map_err(|_| DistributedError::Stopped)??)
    }
}

fn own_identity(setup: &DistributedSetup) -> Result<(Identity, Signer), DistributedError> {
    let (identity, key) = directory_entry(&setup.credentials.cert_pem)?;
    let seed = participant_signing_seed(&setup.credentials).map_err(DistributedError::Certificate)?;
    let signer = Signer::from_seed(&seed);
    if signer.verifying_key() != key || setup.directory.get(&identity) != Some(&key) {
        return Err(DistributedError::Certificate(format!("{identity}'s key is not the directory's key of {identity}")));
    }
    Ok((identity, signer))
}

fn status_of(participant: &Participant) -> Status {
    Status {
        live: participant.is_live(),
        settled: participant.is_settled(),
        id: participant.id(),
        change: participant.change(),
        tek: participant.tek().map(|(r, _)| r),
        roster: participant.roster().clone(),
        awaiting: participant.awaiting(),
    }
}

/// The task that owns the participant.
struct Actor {
    participant: Participant,
    /// Set once this participant handed its keys back.
    handed_back: watch::Sender<Option<HandedBack>>,
    /// The handbacks collected, once appointed to take the group back.
    collector: Option<TableCollector>,
    sender: UdpSocket,
    group_addr: SocketAddr,
    listener: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    channel: Arc<Channel>,
    /// When the participant asked to be ticked (Unix ms).
    timers: BTreeSet<u64>,
    /// Announcements heard before the join grant came.
    early: Vec<Vec<u8>>,
    /// Whether the participant has been live (a joiner until its grant is installed).
    joined: bool,
    /// Outputs of the participant's creation, sent when the task starts.
    initial: Vec<Output>,
    /// Announcements to multicast again, at their time (Unix ms).
    repeats: Vec<(u64, Vec<u8>)>,
    events: mpsc::Sender<Event>,
    setup: DistributedSetup,
}

impl Actor {
    async fn run(mut self, mut inbox: mpsc::Receiver<Command>, receiver: UdpSocket) {
        let own = self.sender.local_addr().ok();
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut next_presence = Instant::now();
        self.joined = self.participant.is_live();
        let initial = std::mem::take(&mut self.initial);
        self.dispatch(initial).await;
        loop {
            let timer = self.timers.first().map(|&at| Instant::now() + Duration::from_millis(at.saturating_sub(now_ms())));
            tokio::select! {
                received = receiver.recv_from(&mut buf) => match received {
                    Ok((len, from)) if Some(from) != own => self.on_datagram(&buf[..len]).await,
                    Ok(_) => {}
                    Err(error) => tracing::debug!(%error, "multicast receive failed"),
                },
                command = inbox.recv() => match command {
                    Some(command) => self.on_command(command).await,
                    None => return,
                },
                _ = sleep_until(timer.unwrap_or_else(Instant::now)), if timer.is_some() => self.on_timer().await,
                _ = sleep_until(next_presence) => {
                    self.send_presence().await;
                    next_presence = Instant::now() + Duration::from_millis(jittered(self.setup.presence_ms.max(2)));
                }
            }
        }
    }

    async fn on_datagram(&mut self, bytes: &[u8]) {
        if Presence::is_presence(bytes) {
            self.on_presence(bytes);
        } else if !self.joined {
            if self.early.len() < MAX_EARLY_ANNOUNCEMENTS {
                self.early.push(bytes.to_vec());
            }
        } else {
            let result = self.participant.receive(bytes, &BatchSeed::from_bytes(entropy()), now_ms());
            self.handle(result).await;
        }
    }

    /// A verified presence newer than the signer's last one updates its listener address. One
    /// that repeats the known address changes nothing and is not verified: with N participants
    /// every presence interval brings N² presences.
    fn on_presence(&mut self, bytes: &[u8]) {
        let Ok((presence, signature)) = Presence::decode(bytes) else { return };
        let known = lock(&self.shared).addresses.get(&presence.signer).copied();
        if known.is_some_and(|(at, addr)| addr == SocketAddr::V4(presence.listener) || at >= presence.at_ms) {
            return;
        }
        if verifies(&presence, bytes, &signature, &self.setup) {
            lock(&self.shared).addresses.insert(presence.signer, (presence.at_ms, SocketAddr::V4(presence.listener)));
        }
    }

    async fn on_command(&mut self, command: Command) {
        let seed = BatchSeed::from_bytes(entropy());
        if self.handed_back.borrow().is_some() {
            return self.after_handing_back(command);
        }
        match command {
            Command::Join { from, reply } => match self.participant.admit(&from, &seed, now_ms()) {
                Ok(outputs) => {
                    let (grant, rest): (Vec<_>, Vec<_>) = outputs.into_iter().partition(|o| matches!(o, Output::Private { to, .. } if *to == from));
                    self.dispatch(rest).await;
                    if let Some(Output::Private { bytes, .. }) = grant.into_iter().next() {
                        // Counted when handed to the connection that asked: it answers with it.
                        count_private(&self.shared, true, bytes.len());
                        let _ = reply.send(Ok(bytes));
                    }
                }
                Err(refused) => {
                    let _ = reply.send(Err(refused));
                }
            },
            Command::Private { from, bytes, reply } if HandbackKeys::is_handback(&bytes) => {
                let _ = reply.send(self.take_handback(&from, &bytes));
            }
            Command::Private { from, bytes, reply } => {
                let result = self.participant.receive_private(&from, &bytes, &seed, now_ms());
                let _ = reply.send(result.as_ref().map(|_| ()).map_err(Clone::clone));
                self.handle(result).await;
                self.replay_early().await;
            }
            Command::Exclude { id, eviction, reply } => {
                let result = self.participant.exclude(id, eviction, &seed, now_ms());
                let _ = reply.send(result.as_ref().map(|_| ()).map_err(Clone::clone));
                self.handle(result).await;
            }
            Command::Leave { reply } => {
                let result = self.participant.leave(now_ms());
                let _ = reply.send(result.as_ref().map(|_| ()).map_err(Clone::clone));
                self.handle(result).await;
            }
            Command::Repeat(repeats) => {
                self.timers.extend(repeats.iter().map(|(at, _)| *at));
                self.repeats.extend(repeats);
            }
            Command::Collect { reply } => {
                let _ = reply.send(self.start_collection());
            }
            Command::FinishCollection { policy, reply } => {
                let result = self.collector.take().ok_or(HandbackRefused::Empty).and_then(|c| c.build(policy, &seed));
                let _ = reply.send(result);
            }
            Command::Handback { reply } => {
                let _ = reply.send(self.own_handback());
            }
            Command::Appointed { from, request, reply } => {
                let _ = reply.send(self.hand_back_to(from, &request));
            }
        }
    }

    /// A participant that handed its keys back takes no order that changes the group; a
    /// repeated request of its collector (whose answer was lost) gets the same handback.
    fn after_handing_back(&mut self, command: Command) {
        let refused = || Refused::Invalid("handed back: the group is going back to a controller");
        match command {
            Command::Appointed { from, request, reply } => {
                let same = self.handed_back.borrow().as_ref().is_some_and(|h| h.collector == from);
                let _ = reply.send(if same { self.hand_back_to(from, &request) } else { Err(refused()) });
            }
            Command::Join { reply, .. } => drop(reply.send(Err(refused()))),
            Command::Private { reply, .. } | Command::Exclude { reply, .. } | Command::Leave { reply } | Command::Collect { reply } => drop(reply.send(Err(refused()))),
            Command::FinishCollection { reply, .. } => drop(reply.send(Err(HandbackRefused::Empty))),
            Command::Handback { reply } => drop(reply.send(None)),
            Command::Repeat(_) => {}
        }
    }

    /// `from`'s appointment: this participant's handback, if `from` is another live
    /// participant and this one is settled at its keys.
    fn hand_back_to(&mut self, from: Identity, request: &[u8]) -> Result<Zeroizing<Vec<u8>>, Refused> {
        let appointment = Appointment::decode(request, self.setup.config.group)?;
        if from == *self.participant.identity() || !self.participant.roster().values().any(|who| *who == from) {
            return Err(Refused::NotLive(from));
        }
        let handback = self.own_handback().ok_or(Refused::Busy)?;
        tracing::info!(collector = %from, controller = %appointment.controller, "handing the keys back");
        self.handed_back.send_replace(Some(HandedBack { collector: from, appointment }));
        Ok(handback.encode(self.setup.config.group))
    }

    fn own_handback(&self) -> Option<HandbackKeys> {
        let live = self.participant.is_live() && self.participant.is_settled();
        live.then(|| HandbackKeys::new(self.participant.id(), self.participant.held_keys())).flatten()
    }

    /// A collection for the live participants of this one's roster at its TEK, its own keys first.
    fn start_collection(&mut self) -> Result<(), Refused> {
        let (own, tek) = (self.own_handback().ok_or(Refused::Busy)?, self.participant.tek().ok_or(Refused::Busy)?.0);
        let mut collector = TableCollector::new(self.setup.config.id_bits, self.participant.roster().clone(), tek);
        let keys: Vec<(KeyRef, Key)> = std::iter::once(own.tek).chain(own.keks).collect();
        collector.hand_over(self.participant.identity(), own.id, &keys)?;
        self.collector = Some(collector);
        Ok(())
    }

    /// A handback from `from` (the identity its certificate proved), if this participant collects.
    fn take_handback(&mut self, from: &Identity, bytes: &[u8]) -> Result<(), Refused> {
        let collector = self.collector.as_mut().ok_or(Refused::Invalid("not appointed to collect handbacks"))?;
        let handback = HandbackKeys::decode(bytes, self.setup.config.group)?;
        let keys: Vec<(KeyRef, Key)> = std::iter::once(handback.tek).chain(handback.keks).collect();
        Ok(collector.hand_over(from, handback.id, &keys)?)
    }

    /// Once the grant is installed, the announcements heard while joining are applied.
    async fn replay_early(&mut self) {
        if self.joined || !self.participant.is_live() {
            return;
        }
        self.joined = true;
        for bytes in std::mem::take(&mut self.early) {
            let result = self.participant.receive(&bytes, &BatchSeed::from_bytes(entropy()), now_ms());
            self.handle(result).await;
        }
    }

    async fn on_timer(&mut self) {
        let now = now_ms();
        self.timers.retain(|&at| at > now);
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.repeats).into_iter().partition(|(at, _)| *at <= now);
        self.repeats = later;
        let due = due.into_iter().map(|(_, bytes)| Output::Multicast(bytes)).collect();
        self.dispatch(due).await;
        let outputs = self.participant.tick(&BatchSeed::from_bytes(entropy()), now);
        self.dispatch(outputs).await;
    }

    async fn handle(&mut self, result: Result<Vec<Output>, Refused>) {
        match result {
            Ok(outputs) => self.dispatch(outputs).await,
            Err(refused) => tracing::debug!(identity = %self.participant.identity(), %refused, "input refused"),
        }
    }

    async fn dispatch(&mut self, outputs: Vec<Output>) {
        for output in outputs {
            match output {
                Output::Multicast(bytes) => {
                    tracing::debug!(identity = %self.participant.identity(), kind = bytes[1], len = bytes.len(), "announcement");
                    if self.sender.send_to(&bytes, self.group_addr).await.is_ok() {
                        lock(&self.shared).traffic.announcements += 1;
                        lock(&self.shared).traffic.announcement_bytes += bytes.len() as u64;
                    }
                }
                Output::Private { to, bytes } => {
                    tracing::debug!(identity = %self.participant.identity(), %to, kind = bytes[1], "private message");
                    let (channel, shared, deadline) = (self.channel.clone(), self.shared.clone(), self.setup.deadline_ms);
                    tokio::spawn(async move { channel.deliver(&shared, to, bytes, deadline).await; });
                }
                Output::Timer { at_ms } => {
                    self.timers.insert(at_ms);
                }
                Output::Event(event) => {
                    let _ = self.events.try_send(event);
                }
            }
        }
        self.publish();
    }

    async fn send_presence(&mut self) {
        let SocketAddr::V4(listener) = self.listener else { return };
        let bytes = self.participant.presence(listener, now_ms());
        if self.sender.send_to(&bytes, self.group_addr).await.is_ok() {
            let mut shared = lock(&self.shared);
            shared.traffic.presences += 1;
            shared.traffic.presence_bytes += bytes.len() as u64;
        }
    }

    /// Shares the participant's state after a step (presences change nothing here, and with
    /// N participants they are most of the datagrams).
    fn publish(&self) {
        let mut shared = lock(&self.shared);
        shared.status = status_of(&self.participant);
        shared.held = self.participant.held_keys();
        let held = shared.held.clone();
        shared.ever_held.extend(held);
    }
}

/// Whether `presence` (decoded from `bytes`) is of this group and signed by its signer's key
/// in the directory.
fn verifies(presence: &Presence, bytes: &[u8], signature: &keycast_core::wire::auth::Signature, setup: &DistributedSetup) -> bool {
    let key = setup.directory.get(&presence.signer);
    presence.group == setup.config.group && key.is_some_and(|key| Presence::verify(bytes, signature, key))
}

/// The participants of a running distributed flat group whose presence is heard within
/// `within` on the group's multicast address (verified against the directory), newest
/// address of each, `setup`'s own identity left out: introducers for a joiner. Empty if no
/// group runs there.
pub async fn find_introducers(setup: &DistributedSetup, within: Duration) -> Result<Vec<Introducer>, DistributedError> {
    let receiver = multicast::receiver(&setup.multicast)?;
    let own = directory_entry(&setup.credentials.cert_pem)?.0;
    let mut heard: BTreeMap<Identity, (u64, SocketAddrV4)> = BTreeMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let until = Instant::now() + within;
    while let Ok(Ok((len, _))) = timeout(until.saturating_duration_since(Instant::now()), receiver.recv_from(&mut buf)).await {
        let Ok((presence, signature)) = Presence::decode(&buf[..len]) else { continue };
        let newer = heard.get(&presence.signer).is_none_or(|(at, _)| *at < presence.at_ms);
        if newer && presence.signer != own && verifies(&presence, &buf[..len], &signature, setup) {
            heard.insert(presence.signer.clone(), (presence.at_ms, presence.listener));
        }
    }
    Ok(heard.into_iter().map(|(identity, (_, addr))| Introducer { identity, addr: SocketAddr::V4(addr) }).collect())
}

/// The client side of the private channel: one TLS connection per request.
struct Channel {
    connector: TlsConnector,
}

impl Channel {
    fn new(credentials: &Credentials) -> Result<Channel, DistributedError> {
        Ok(Channel { connector: TlsConnector::from(client_config(credentials)?) })
    }

    /// Delivers a private message to `to` before the deadline, waiting for its address if no
    /// presence of it came yet; counts it as sent or failed.
    async fn deliver(&self, shared: &Mutex<Shared>, to: Identity, bytes: Zeroizing<Vec<u8>>, deadline_ms: u64) -> bool {
        let deadline = Instant::now() + Duration::from_millis(deadline_ms);
        let request = Zeroizing::new([&[PRIVATE_MESSAGE][..], &bytes].concat());
        let mut backoff = BACKOFF_MIN_MS;
        loop {
            let addr = lock(shared).addresses.get(&to).map(|(_, addr)| *addr);
            let answer = match addr {
                Some(addr) => self.exchange(addr, &to, &request).await,
                None => Err(format!("no presence of {to} yet")),
            };
            match answer.as_deref().map(|a| a.first()) {
                Ok(Some(&ANSWER_OK)) => return count_private(shared, true, bytes.len()),
                Ok(Some(&ANSWER_REFUSED)) => {
                    tracing::debug!(%to, reason = %String::from_utf8_lossy(answer.as_deref().map_or(&[][..], |a| &a[1..])), "private message refused");
                    return count_private(shared, false, 0);
                }
                other => tracing::debug!(%to, ?other, "private message not delivered yet"),
            }
            let pause = Duration::from_millis(jittered(backoff));
            if Instant::now() + pause >= deadline {
                tracing::warn!(%to, "private message given up after its deadline");
                return count_private(shared, false, 0);
            }
            sleep(pause).await;
            backoff = (backoff * 2).min(BACKOFF_MAX_MS);
        }
    }

    /// Asks `to` for its handback (`request` is the appointment) until it answers or the
    /// deadline passes, waiting for its address if no presence of it came yet.
    async fn ask_handback(&self, shared: &Mutex<Shared>, to: &Identity, request: &[u8], deadline: Instant) -> Result<Zeroizing<Vec<u8>>, String> {
        self.ask(to, || lock(shared).addresses.get(to).map(|(_, addr)| *addr), request, deadline).await.map_err(|e| format!("no handback: {e}"))
    }

    /// Asks `introducer` to admit this participant until it answers or the deadline passes.
    async fn join(&self, introducer: &Introducer, deadline: Instant) -> Result<Zeroizing<Vec<u8>>, String> {
        self.ask(&introducer.identity, || Some(introducer.addr), &[JOIN_REQUEST], deadline).await.map_err(|e| format!("no grant: {e}"))
    }

    /// Sends `request` to `to` (at `addr_of`'s address) until it answers OK or refuses, with
    /// jittered backoff while it is busy or unreachable, until the deadline.
    async fn ask(&self, to: &Identity, addr_of: impl Fn() -> Option<SocketAddr>, request: &[u8], deadline: Instant) -> Result<Zeroizing<Vec<u8>>, String> {
        let mut backoff = BACKOFF_MIN_MS;
        loop {
            let error = match addr_of() {
                Some(addr) => match self.exchange(addr, to, request).await {
                    Ok(answer) => match answer.split_first() {
                        Some((&ANSWER_OK, payload)) => return Ok(Zeroizing::new(payload.to_vec())),
                        Some((&ANSWER_REFUSED, reason)) => return Err(format!("refused: {}", String::from_utf8_lossy(reason))),
                        Some((&ANSWER_BUSY, _)) => "busy".to_string(),
                        _ => "unknown answer".to_string(),
                    },
                    Err(error) => error,
                },
                None => format!("no presence of {to} yet"),
            };
            let pause = Duration::from_millis(jittered(backoff));
            if Instant::now() + pause >= deadline {
                return Err(format!("nothing before the deadline (last: {error})"));
            }
            sleep(pause).await;
            backoff = (backoff * 2).min(BACKOFF_MAX_MS);
        }
    }

    /// One attempt: connect, TLS handshake (the listener must prove `to`), request, answer.
    async fn exchange(&self, addr: SocketAddr, to: &Identity, request: &[u8]) -> Result<Zeroizing<Vec<u8>>, String> {
        let name = ServerName::try_from(to.as_str().to_owned()).map_err(|e| format!("{to} is not a DNS name: {e}"))?;
        let attempt = async {
            let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            let mut tls = self.connector.connect(name, tcp).await.map_err(|e| e.to_string())?;
            write_frame(&mut tls, request).await.map_err(|e| e.to_string())?;
            let answer = Zeroizing::new(read_frame(&mut tls).await.map_err(|e| e.to_string())?);
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
            Ok(answer)
        };
        timeout(ATTEMPT_TIMEOUT, attempt).await.map_err(|_| "timed out".to_string())?
    }
}

/// Counts a private message as delivered or failed; returns `delivered`.
fn count_private(shared: &Mutex<Shared>, delivered: bool, len: usize) -> bool {
    let traffic = &mut lock(shared).traffic;
    if delivered {
        traffic.private += 1;
        traffic.private_bytes += len as u64;
    } else {
        traffic.private_failed += 1;
    }
    delivered
}

/// Accepts TLS connections (at most `MAX_CONNECTIONS` at once) and serves each in a task.
async fn serve_listener(tcp: TcpListener, acceptor: TlsAcceptor, commands: mpsc::Sender<Command>, directory: Directory) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let directory = Arc::new(directory);
    loop {
        let Ok((stream, peer)) = tcp.accept().await else {
            sleep(Duration::from_millis(10)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else { continue };
        let (acceptor, commands, directory) = (acceptor.clone(), commands.clone(), directory.clone());
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(reason) = timeout(ATTEMPT_TIMEOUT, serve_connection(stream, acceptor, commands, &directory)).await.unwrap_or_else(|_| Err("timed out".into())) {
                tracing::debug!(%peer, %reason, "private connection refused");
            }
        });
    }
}

async fn serve_connection(tcp: TcpStream, acceptor: TlsAcceptor, commands: mpsc::Sender<Command>, directory: &Directory) -> Result<(), String> {
    let mut tls = acceptor.accept(tcp).await.map_err(|e| format!("TLS handshake: {e}"))?;
    let certificate = peer_certificate(tls.get_ref().1).map_err(|e| e.to_string())?;
    let name = peer_identity(certificate, false).map_err(|e| e.to_string())?;
    let from = Identity::new(&name).ok().filter(|who| directory.contains_key(who)).ok_or_else(|| format!("{name} is not in the directory"))?;
    let request = Zeroizing::new(read_frame(&mut tls).await.map_err(|e| e.to_string())?);
    let answer = match request.split_first() {
        Some((&JOIN_REQUEST, [])) => {
            let (reply, answer) = oneshot::channel();
            commands.send(Command::Join { from, reply }).await.map_err(|_| "stopped")?;
            match answer.await.map_err(|_| "stopped")? {
                Ok(grant) => Zeroizing::new([&[ANSWER_OK][..], &grant].concat()),
                Err(refused) => refusal(&refused),
            }
        }
        Some((&APPOINT, bytes)) => {
            let (reply, answer) = oneshot::channel();
            commands.send(Command::Appointed { from, request: Zeroizing::new(bytes.to_vec()), reply }).await.map_err(|_| "stopped")?;
            match answer.await.map_err(|_| "stopped")? {
                Ok(handback) => Zeroizing::new([&[ANSWER_OK][..], &handback].concat()),
                Err(refused) => refusal(&refused),
            }
        }
        Some((&PRIVATE_MESSAGE, bytes)) => {
            let (reply, answer) = oneshot::channel();
            commands.send(Command::Private { from, bytes: Zeroizing::new(bytes.to_vec()), reply }).await.map_err(|_| "stopped")?;
            match answer.await.map_err(|_| "stopped")? {
                Ok(()) => Zeroizing::new(vec![ANSWER_OK]),
                Err(refused) => refusal(&refused),
            }
        }
        _ => return Err("unknown request".into()),
    };
    write_frame(&mut tls, &answer).await.map_err(|e| e.to_string())?;
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
    Ok(())
}

/// Busy (an exclusion settling) is worth retrying; anything else is definite.
fn refusal(refused: &Refused) -> Zeroizing<Vec<u8>> {
    match refused {
        Refused::Busy => Zeroizing::new(vec![ANSWER_BUSY]),
        other => Zeroizing::new([&[ANSWER_REFUSED][..], other.to_string().as_bytes()].concat()),
    }
}

/// Starts the log at `database` of the controller that takes the group back (figure 6) from
/// the table its appointed participant collected: one record (`handback_record`). Returns the
/// members that handed back, by member id and identity: the controller knows them, so their
/// joins are answered at once.
pub fn start_log_from(handback: &Handback, policy: &GroupPolicy, database: &Path, key: Option<DatabaseKey>) -> Result<Vec<(MemberId, String)>, StoreError> {
    let members: Vec<(MemberId, String)> = handback.members.iter().map(|(who, (m, _))| (*m, who.as_str().to_owned())).collect();
    let record = handback_record(policy, &*handback.graph, &members, now_ms(), entropy());
    let (mut store, _) = Store::open_sealed(database, key)?;
    store.append(&[record])?;
    Ok(members)
}

/// Setups of `count` participants `participant-0` .. of one group on loopback: a CA of
/// their own, an Ed25519 certificate each, the directory of all of them and a multicast
/// address of their own. For tests and the demo.
pub fn loopback_setups(config: Config, count: usize, presence_ms: u64, deadline_ms: u64) -> Result<Vec<DistributedSetup>, DistributedError> {
    let pki = |e: rcgen::Error| DistributedError::Certificate(e.to_string());
    let authority = crate::pki::Authority::new("keycast distributed flat CA").map_err(pki)?;
    let names: Vec<String> = (0..count).map(|i| format!("participant-{i}")).collect();
    setups_of(&authority, &names, config, presence_ms, deadline_ms)
}

/// Setups of the participants `names` (the directory is all of them) with certificates of
/// `authority` (e.g. a `LocalGroup`'s, for its members after its controller is lost) and a
/// loopback multicast address of their own. For tests and demos.
pub fn setups_of(authority: &crate::pki::Authority, names: &[String], config: Config, presence_ms: u64, deadline_ms: u64) -> Result<Vec<DistributedSetup>, DistributedError> {
    let pki = |e: rcgen::Error| DistributedError::Certificate(e.to_string());
    let multicast = multicast::loopback_group()?;
    let credentials = names.iter().map(|name| authority.issue_participant(name, &entropy())).collect::<Result<Vec<_>, _>>().map_err(pki)?;
    let directory = credentials.iter().map(|c| directory_entry(&c.cert_pem)).collect::<Result<Directory, _>>()?;
    let setup = |credentials| DistributedSetup { config, credentials, directory: directory.clone(), multicast: multicast.clone(), presence_ms, deadline_ms };
    Ok(credentials.into_iter().map(setup).collect())
}

/// Whether `participants` are live and settled, hold one TEK (same ref and value), each lists
/// exactly them as the roster, and their KEKs agree.
pub fn agreed(participants: &[&DistributedParticipant]) -> bool {
    let Some(first) = participants.first().and_then(|p| p.tek()) else { return false };
    let identities: BTreeSet<&Identity> = participants.iter().map(|p| p.identity()).collect();
    participants.iter().all(|p| {
        let status = p.status();
        let roster: BTreeSet<&Identity> = status.roster.values().collect();
        status.live && status.settled && p.tek().as_ref() == Some(&first) && roster == identities
    }) && keks_agree(participants)
}

/// Whether every KEK has one ref and value among the participants that hold it.
pub fn keks_agree(participants: &[&DistributedParticipant]) -> bool {
    let mut slots: BTreeMap<keycast_core::key::KeyId, (KeyRef, Key)> = BTreeMap::new();
    participants.iter().flat_map(|p| p.held_keys().into_iter().skip(1)).all(|(key_ref, key)| {
        let first = slots.entry(key_ref.id).or_insert_with(|| (key_ref, key.clone()));
        *first == (key_ref, key)
    })
}

/// Waits (polling every 10 ms) until `participants` have [`agreed`], for at most `within`.
pub async fn wait_agreed(participants: &[&DistributedParticipant], within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if agreed(participants) {
            return true;
        }
        sleep(Duration::from_millis(10)).await;
    }
    agreed(participants)
}

/// Records every announcement on a group's multicast address, as an outsider would (for audits
/// of removed participants: tests and the demo). At most `MAX_RECORDED`; stops when dropped.
pub struct Recorder {
    log: Arc<Mutex<Vec<Vec<u8>>>>,
    task: JoinHandle<()>,
}

const MAX_RECORDED: usize = 200_000;

impl Recorder {
    pub fn start(multicast: &MulticastConfig) -> std::io::Result<Recorder> {
        let socket = multicast::receiver(multicast)?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let recording = log.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            while let Ok((len, _)) = socket.recv_from(&mut buf).await {
                let mut log = lock(&recording);
                if !Presence::is_presence(&buf[..len]) && log.len() < MAX_RECORDED {
                    log.push(buf[..len].to_vec());
                }
            }
        });
        Ok(Recorder { log, task })
    }

    /// The announcements recorded so far.
    pub fn announcements(&self) -> Vec<Vec<u8>> {
        lock(&self.log).clone()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}
