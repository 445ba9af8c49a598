//! A whole group on loopback in one process: an in-memory CA, a controller with its log in
//! a folder, and members. Used by `keycast demo` and the end-to-end tests.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;

use keycast_core::protocol::GroupPolicy;

use crate::client::{ClientError, ClientEvent, MemberClient, MemberSetup};
use crate::config::{MulticastConfig, RequestPolicy};
use crate::pki::Authority;
use crate::server::{Server, ServerError, ServerSetup};
use crate::tls::{client_config, server_config};
use crate::multicast::free_port;

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("certificates: {0}")]
    Pki(String),
}

pub struct LocalGroup {
    pub authority: Authority,
    pub policy: GroupPolicy,
    pub acl: BTreeSet<String>,
    pub multicast: MulticastConfig,
    pub database: PathBuf,
    pub server: Option<Server>,
    /// Prometheus endpoint of the controller at its next start (off by default).
    pub metrics: Option<SocketAddr>,
    listen: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
}

pub type Events = tokio::sync::mpsc::Receiver<ClientEvent>;

impl LocalGroup {
    /// A controller for `policy` on loopback that admits `member-1` .. `member-<acl_size>` and
    /// `admin` as administrator; its log lives in `folder`.
    pub async fn start(policy: GroupPolicy, acl_size: usize, folder: PathBuf) -> Result<LocalGroup, LocalError> {
        let pki = |e: rcgen::Error| LocalError::Pki(e.to_string());
        let authority = Authority::new("keycast local CA").map_err(pki)?;
        let credentials = authority.issue("keycast-controller", true).map_err(pki)?;
        let tls = server_config(&credentials).map_err(|e| LocalError::Pki(e.to_string()))?;
        let port = free_port().map_err(ServerError::from)?;
        // A group address per run, so concurrent runs on one host do not hear each other.
        let group_ip = Ipv4Addr::new(239, 255, (port >> 8) as u8, port as u8);
        let multicast = MulticastConfig { address: SocketAddrV4::new(group_ip, port), interface: Ipv4Addr::LOCALHOST, ttl: 1 };
        let acl = (1..=acl_size).map(|i| format!("member-{i}")).collect();
        let mut group = LocalGroup {
            authority,
            policy,
            acl,
            multicast,
            database: folder.join("controller.redb"),
            server: None,
            metrics: None,
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            tls,
        };
        group.start_server().await?;
        Ok(group)
    }

    /// Starts (or restarts, from the same log and address) the controller.
    pub async fn start_server(&mut self) -> Result<&Server, LocalError> {
        let setup = ServerSetup {
            policy: self.policy,
            acl: self.acl.clone(),
            admins: BTreeSet::from(["admin".to_string()]),
            listen: self.listen,
            multicast: self.multicast.clone(),
            tls: self.tls.clone(),
            database: self.database.clone(),
            metrics: self.metrics,
        };
        let server = Server::start(setup).await?;
        self.listen = server.addr;
        Ok(self.server.insert(server))
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

    /// Connection settings for `identity`, with a fresh certificate from this group's CA. A
    /// join is answered at the end of an epoch, so the answer timeout covers two epochs.
    pub fn member_setup(&self, identity: &str) -> Result<MemberSetup, LocalError> {
        let credentials = self.authority.issue(identity, false).map_err(|e| LocalError::Pki(e.to_string()))?;
        Ok(MemberSetup {
            group: self.policy.group,
            server: self.listen,
            server_name: "localhost".into(),
            multicast: self.multicast.clone(),
            tls: client_config(&credentials).map_err(|e| LocalError::Pki(e.to_string()))?,
            refresh_ms: (self.policy.refresh_timeout_ms / 4).max(50),
            heartbeat_ms: self.policy.heartbeat_ms,
            requests: RequestPolicy {
                answer_timeout_ms: RequestPolicy::default().answer_timeout_ms.max(2 * self.policy.epoch_ms + 1000),
                ..RequestPolicy::default()
            },
            rejoin: false,
            event_capacity: 1024,
        })
    }

    pub async fn join(&self, identity: &str) -> Result<(MemberClient, Events), LocalError> {
        Ok(MemberClient::join(self.member_setup(identity)?).await?)
    }
}
