//! A whole group on loopback in one process: an in-memory CA, a controller with its log in
//! a folder, and members. Used by `keycast demo` and the end-to-end tests.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use keycast_core::protocol::{GroupPolicy, DEFAULT_SNAPSHOT_EVERY};
use keycast_core::wire::rekey::PacketConfig;
use keycast_core::wire::{GroupId, TlsServerName};
use keycast_core::{GraphConfig, JoinPolicy, Scheme};

use crate::admin::{AdminRequest, AdminResponse, AdminTarget};
use crate::client::{ClientError, ClientEvent, ControllerAddr, MemberClient, MemberSetup};
use crate::config::{MulticastConfig, RequestPolicy, DEFAULT_TLS_REFRESH_EVERY};
use crate::pki::{Authority, Credentials, Fingerprint};
use crate::relay::{Relay, RelayError, RelaySetup, Standby, StandbySetup};
use crate::server::{Limits, Server, ServerError, ServerSetup};
use crate::store::DatabaseKey;
use crate::tls::{client_config, server_config};
use crate::multicast::{free_port, loopback_group};

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Relay(#[from] RelayError),
    #[error("certificates: {0}")]
    Pki(String),
}

pub struct LocalGroup {
    /// Shared by groups that merge (`prepare_sharing`): members then reach either controller.
    pub authority: Arc<Authority>,
    pub policy: GroupPolicy,
    pub acl: BTreeSet<String>,
    pub multicast: MulticastConfig,
    pub database: PathBuf,
    /// Seals the log's secrets (a random key per group; `None` stores them in the clear).
    pub database_key: Option<DatabaseKey>,
    /// Batches between snapshots of the log.
    pub snapshot_interval: u64,
    pub server: Option<Server>,
    /// Prometheus endpoint of the controller at its next start (off by default).
    pub metrics: Option<SocketAddr>,
    /// Deadlines and caps of the controller at its next start.
    pub limits: Limits,
    /// Whether the controller at its next start takes identities from common names.
    pub identity_from_common_name: bool,
    /// The administrator's certificate (identity "admin"); its fingerprint is the controller's
    /// only admin entry.
    pub admin: Credentials,
    /// Listen addresses reserved for this group's standby relays, by registration number;
    /// member setups list them.
    pub standbys: Vec<ControllerAddr>,
    /// The controllers that may absorb this group or hand it back (`ServerSetup::merge_peers`):
    /// none until a test lists one ([`LocalGroup::trust_merge_peer`]).
    pub merge_peers: Vec<Fingerprint>,
    /// This group's controller certificate.
    controller: Credentials,
    /// The name in it, which members and administrators connect under ("localhost" unless
    /// [`LocalGroup::name_controller`] gave another).
    server_name: String,
    listen: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
}

pub type Events = tokio::sync::mpsc::Receiver<ClientEvent>;

/// A fast group for loopback tests: 150 ms epochs, keys in force one epoch after their rekey,
/// 40 ms heartbeats, a degree-4 tree whose joins advance revisions (the default policy),
/// immediate eviction, no membership deltas.
pub fn loopback_policy(group: GroupId) -> GroupPolicy {
    GroupPolicy {
        group,
        graph: GraphConfig { scheme: Scheme::Tree { degree: 4 }, join_policy: JoinPolicy::Revision },
        epoch_ms: 150,
        activation_delay: 1,
        heartbeat_ms: 40,
        refresh_timeout_ms: 5_000,
        immediate_eviction: true,
        membership_deltas: false,
        reflector: false,
        packets: PacketConfig::default(),
    }
}

impl LocalGroup {
    /// A controller for `policy` on loopback that admits `member-1` .. `member-<acl_size>` and
    /// the `admin` credentials as administrator; its log lives in `folder`.
    pub async fn start(policy: GroupPolicy, acl_size: usize, folder: PathBuf) -> Result<LocalGroup, LocalError> {
        let mut group = LocalGroup::prepare(policy, acl_size, folder)?;
        group.start_server().await?;
        Ok(group)
    }

    /// As `start`, without starting the controller: change `limits` and the rest first.
    pub fn prepare(policy: GroupPolicy, acl_size: usize, folder: PathBuf) -> Result<LocalGroup, LocalError> {
        let authority = Authority::new("keycast local CA").map_err(|e| LocalError::Pki(e.to_string()))?;
        LocalGroup::prepare_sharing(policy, acl_size, folder, Arc::new(authority))
    }

    /// As `prepare`, under another group's CA: its members and controller trust this group's,
    /// as two groups that merge must (docs/merge.md).
    pub fn prepare_sharing(policy: GroupPolicy, acl_size: usize, folder: PathBuf, authority: Arc<Authority>) -> Result<LocalGroup, LocalError> {
        let pki = |e: rcgen::Error| LocalError::Pki(e.to_string());
        let credentials = authority.issue("keycast-controller", true).map_err(pki)?;
        let admin = authority.issue("admin", false).map_err(pki)?;
        let tls = server_config(&credentials).map_err(|e| LocalError::Pki(e.to_string()))?;
        let multicast = loopback_group().map_err(ServerError::from)?;
        let acl = (1..=acl_size).map(|i| format!("member-{i}")).collect();
        // Every member of a local group connects from 127.0.0.1: only the total caps them.
        let mut limits = Limits::for_policy(&policy);
        limits.max_per_address = limits.max_connections;
        Ok(LocalGroup {
            authority,
            limits,
            policy,
            acl,
            multicast,
            database: folder.join("controller.redb"),
            database_key: Some(DatabaseKey::generate()),
            snapshot_interval: DEFAULT_SNAPSHOT_EVERY,
            server: None,
            metrics: None,
            identity_from_common_name: false,
            admin,
            standbys: Vec::new(),
            merge_peers: Vec::new(),
            controller: credentials,
            server_name: "localhost".into(),
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            tls,
        })
    }

    /// Gives the controller, before its first start, a certificate valid for `server_name`
    /// alone (not localhost), as a controller on another host has: this group's members and
    /// administrator connect under that name. Its merge peers must list it after this.
    pub fn name_controller(&mut self, server_name: &str) -> Result<(), LocalError> {
        let credentials = self.authority.issue_controller_named("keycast-controller", server_name).map_err(|e| LocalError::Pki(e.to_string()))?;
        self.tls = server_config(&credentials).map_err(|e| LocalError::Pki(e.to_string()))?;
        (self.controller, self.server_name) = (credentials, server_name.into());
        Ok(())
    }

    /// Starts (or restarts, from the same log and address) the controller.
    pub async fn start_server(&mut self) -> Result<&Server, LocalError> {
        let server = Server::start(self.server_setup()?).await?;
        self.listen = server.addr;
        Ok(self.server.insert(server))
    }

    /// Starts this group's controller inside a relay that joins a parent group with `parent`
    /// (this group is then a subgroup; the relay owns its controller).
    pub async fn start_relay(&mut self, parent: MemberSetup) -> Result<Relay, LocalError> {
        let relay = Relay::start(RelaySetup { parent, subgroup: self.server_setup()? }).await?;
        self.listen = relay.server.addr;
        Ok(relay)
    }

    /// Reserves an address for this group's next standby relay (`standby-N`, N its
    /// registration number, admitted as a member to watch the active relay).
    pub fn add_standby(&mut self) -> Result<ControllerAddr, LocalError> {
        let port = free_port().map_err(ServerError::from)?;
        let standby = ControllerAddr { server: SocketAddr::from((Ipv4Addr::LOCALHOST, port)), server_name: "localhost".into() };
        self.standbys.push(standby.clone());
        self.acl.insert(format!("standby-{}", self.standbys.len()));
        Ok(standby)
    }

    /// Starts standby `registration` (from 1, reserved by `add_standby`): it joins this group
    /// as `standby-N` to watch the active relay and, on taking over, joins the parent with
    /// `parent` and runs a fresh controller of this group at its reserved address, with a
    /// log of its own.
    pub async fn start_standby(&self, registration: u32, parent: MemberSetup, back_off_ms: u64) -> Result<Standby, LocalError> {
        let place = registration.checked_sub(1).map(|i| i as usize).filter(|i| *i < self.standbys.len());
        let place = place.ok_or_else(|| LocalError::Pki(format!("no standby {registration} reserved")))?;
        let mut watch = self.member_setup(&format!("standby-{registration}"))?;
        watch.standbys.truncate(place);
        let mut subgroup = self.server_setup()?;
        subgroup.listen = self.standbys[place].server;
        subgroup.database = self.database.with_file_name(format!("standby-{registration}.redb"));
        subgroup.database_key = Some(DatabaseKey::generate());
        let setup = StandbySetup { registration, back_off_ms, watch, relay: RelaySetup { parent, subgroup } };
        Ok(Standby::start(setup).await?)
    }

    fn server_setup(&self) -> Result<ServerSetup, LocalError> {
        Ok(ServerSetup {
            policy: self.policy,
            acl: self.acl.clone(),
            admins: vec![self.admin.fingerprint().map_err(LocalError::Pki)?],
            merge_peers: self.merge_peers.clone(),
            peer_tls: client_config(&self.controller).map_err(|e| LocalError::Pki(e.to_string()))?,
            identity_from_common_name: self.identity_from_common_name,
            limits: self.limits,
            listen: self.listen,
            server_name: TlsServerName::new(&self.server_name).map_err(|e| LocalError::Pki(e.to_string()))?,
            multicast: self.multicast.clone(),
            tls: self.tls.clone(),
            database: self.database.clone(),
            database_key: self.database_key.clone(),
            snapshot_interval: self.snapshot_interval,
            metrics: self.metrics,
        })
    }

    /// Stops the controller at once, as a crash would.
    pub async fn kill_server(&mut self) {
        if let Some(server) = self.server.take() {
            server.kill().await;
        }
    }

    pub fn server(&self) -> &Server {
        self.server.as_ref().expect("the controller is running")
    }

    /// The controller's address.
    pub fn addr(&self) -> SocketAddr {
        self.listen
    }

    /// A standby took over at `addr`: members set up from now on join it (a member's first
    /// join goes to its configured controller only).
    pub fn controller_moved_to(&mut self, addr: SocketAddr) {
        self.listen = addr;
    }

    /// Connection settings for `identity`, with a fresh certificate from this group's CA. A
    /// join is answered at the end of an epoch, so the answer timeout covers two epochs.
    pub fn member_setup(&self, identity: &str) -> Result<MemberSetup, LocalError> {
        let credentials = self.authority.issue(identity, false).map_err(|e| LocalError::Pki(e.to_string()))?;
        self.setup_with(&credentials)
    }

    /// Connection settings that present `credentials` (any certificate of any CA).
    pub fn setup_with(&self, credentials: &Credentials) -> Result<MemberSetup, LocalError> {
        Ok(MemberSetup {
            group: self.policy.group,
            server: self.listen,
            server_name: self.server_name.clone(),
            multicast: self.multicast.clone(),
            tls: client_config(credentials).map_err(|e| LocalError::Pki(e.to_string()))?,
            refresh_ms: (self.policy.refresh_timeout_ms / 4).max(50),
            heartbeat_ms: self.policy.heartbeat_ms,
            udp_refresh: true,
            tls_refresh_every: DEFAULT_TLS_REFRESH_EVERY,
            requests: RequestPolicy {
                answer_timeout_ms: RequestPolicy::default().answer_timeout_ms.max(2 * self.policy.epoch_ms + 1000),
                ..RequestPolicy::default()
            },
            rejoin: false,
            event_capacity: 1024,
            loss: None,
            naks: true,
            standbys: self.standbys.clone(),
        })
    }

    pub async fn join(&self, identity: &str) -> Result<(MemberClient, Events), LocalError> {
        Ok(MemberClient::join(self.member_setup(identity)?).await?)
    }

    /// Joins `identities` concurrently, as members of one epoch would; in their order.
    pub async fn join_all(&self, identities: impl IntoIterator<Item = impl Into<String>>) -> Result<Vec<(MemberClient, Events)>, LocalError> {
        let mut joins = Vec::new();
        for identity in identities {
            let setup = self.member_setup(&identity.into())?;
            joins.push(tokio::spawn(MemberClient::join(setup)));
        }
        let mut members = Vec::with_capacity(joins.len());
        for join in joins {
            let joined = join.await.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
            members.push(joined?);
        }
        Ok(members)
    }
}

impl LocalGroup {
    /// Merges the running group `right` into the running group `left` (Caronni et al. 3.5,
    /// docs/merge.md) as `keycast admin merge` does, with each group's admin credentials:
    /// `left`'s controller runs the merged group, `right`'s members follow it without
    /// rejoining. The two must share a CA (`prepare_sharing`).
    pub async fn merge(left: &LocalGroup, right: &LocalGroup) -> Result<String, String> {
        crate::admin::merge(&left.admin_target()?, (right.listen, right.server_name.clone())).await
    }

    /// Lets `peer`'s controller absorb this group or hand it back (from this controller's next
    /// start): `merge_peers` gets its certificate's fingerprint.
    pub fn trust_merge_peer(&mut self, peer: &LocalGroup) -> Result<(), String> {
        self.merge_peers.push(peer.controller.fingerprint()?);
        Ok(())
    }

    /// Splits `right` off the merged group `left` runs (`keycast admin split`).
    pub async fn split(left: &LocalGroup, right: &LocalGroup) -> Result<String, String> {
        crate::admin::split(&left.admin_target()?, (right.listen, right.server_name.clone())).await
    }

    /// This group's controller as its administrator reaches it.
    pub fn admin_target(&self) -> Result<AdminTarget, String> {
        Ok(AdminTarget { server: self.listen, server_name: self.server_name.clone(), tls: client_config(&self.admin).map_err(|e| e.to_string())? })
    }

    /// One admin request over TLS with `credentials` (the group's `admin` ones, or others to
    /// check that they are refused).
    pub async fn admin_request(&self, credentials: &Credentials, request: &AdminRequest) -> Result<AdminResponse, String> {
        let tls = client_config(credentials).map_err(|e| e.to_string())?;
        crate::admin::request(self.listen, &self.server_name, tls, request).await
    }
}
