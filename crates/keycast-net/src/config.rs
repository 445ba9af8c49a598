//! Configuration files (TOML). Relative paths are relative to the file's folder.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

use keycast_core::wire::rekey::{FecConfig, PacketConfig, Placement, DEFAULT_BLOCK_BITS};
use keycast_core::wire::{GroupId, TlsServerName, DEFAULT_MTU};
use keycast_core::{protocol::GroupPolicy, GraphConfig, JoinPolicy, Scheme};
use serde::{Deserialize, Serialize};

use crate::pki::Fingerprint;
use crate::server::Limits;
use crate::store::DatabaseKey;

/// The environment variable that holds the database key (64 hex digits).
pub const DATABASE_KEY_VARIABLE: &str = "KEYCAST_DATABASE_KEY";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("{0}")]
    Invalid(String),
}

/// The multicast channel: group address and port, the interface to send and join on, TTL.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MulticastConfig {
    pub address: SocketAddrV4,
    #[serde(default = "loopback")]
    pub interface: Ipv4Addr,
    #[serde(default = "one")]
    pub ttl: u32,
}

fn loopback() -> Ipv4Addr {
    Ipv4Addr::LOCALHOST
}

fn one() -> u32 {
    1
}

/// Certificate, key and the CA that signs every peer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    fn resolve(&mut self, base: &Path) {
        for p in [&mut self.ca, &mut self.cert, &mut self.key] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub group: u64,
    /// TLS address for joins, resyncs and administration.
    pub listen: SocketAddr,
    /// The name in this controller's certificate that members use (merge and split notices
    /// give it to the members that move here, docs/merge.md).
    #[serde(default = "localhost")]
    pub server_name: String,
    pub multicast: MulticastConfig,
    pub tls: TlsFiles,
    /// The controller's log (redb).
    pub database: PathBuf,
    /// A file holding the key that seals the log's secrets (64 hex digits); keep it apart from
    /// the database. `KEYCAST_DATABASE_KEY` (the hex key itself) takes precedence.
    #[serde(default)]
    pub database_key: Option<PathBuf>,
    /// Batches between two snapshots of the log (older records, and their seeds, are dropped).
    #[serde(default)]
    pub snapshot_interval: Option<u64>,
    /// Identities that may join: a certificate's first URI, else DNS, subject alternative name.
    pub acl: Vec<String>,
    /// SHA-256 fingerprints ("sha256:<hex>") of the certificates that may use `keycast admin`.
    pub admins: Vec<String>,
    /// SHA-256 fingerprints of the controllers that may absorb this group or hand it back
    /// (`keycast admin merge`/`split`, docs/merge.md): they are given this group's state, keys
    /// included. None by default: the group cannot be merged into another.
    #[serde(default)]
    pub merge_peers: Vec<String>,
    /// Fall back to the subject's common name for certificates without a URI or DNS SAN.
    #[serde(default)]
    pub identity_from_common_name: bool,
    #[serde(default)]
    pub policy: PolicyConfig,
    #[serde(default)]
    pub connections: ConnectionsConfig,
    /// Prometheus text endpoint, e.g. "127.0.0.1:9464"; off when absent.
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
}

/// Deadlines and caps of the TLS listener; absent entries take `Limits::for_policy`'s defaults.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionsConfig {
    pub handshake_timeout_ms: Option<u64>,
    pub request_timeout_ms: Option<u64>,
    /// How long a request may wait for the controller's answer (a join: its epoch's rekey).
    pub answer_timeout_ms: Option<u64>,
    pub max_connections: Option<usize>,
    pub max_per_address: Option<usize>,
    pub max_per_identity: Option<usize>,
}

impl ConnectionsConfig {
    pub fn limits(&self, policy: &GroupPolicy) -> Result<Limits, ConfigError> {
        let defaults = Limits::for_policy(policy);
        let ms = |value: Option<u64>, default: Duration, name: &str| match value {
            Some(0) => Err(ConfigError::Invalid(format!("[connections] {name} must be positive"))),
            Some(ms) => Ok(Duration::from_millis(ms)),
            None => Ok(default),
        };
        let cap = |value: Option<usize>, default: usize, name: &str| match value {
            Some(0) => Err(ConfigError::Invalid(format!("[connections] {name} must be at least 1"))),
            other => Ok(other.unwrap_or(default)),
        };
        Ok(Limits {
            handshake_timeout: ms(self.handshake_timeout_ms, defaults.handshake_timeout, "handshake_timeout_ms")?,
            request_timeout: ms(self.request_timeout_ms, defaults.request_timeout, "request_timeout_ms")?,
            answer_timeout: ms(self.answer_timeout_ms, defaults.answer_timeout, "answer_timeout_ms")?,
            max_connections: cap(self.max_connections, defaults.max_connections, "max_connections")?,
            max_per_address: cap(self.max_per_address, defaults.max_per_address, "max_per_address")?,
            max_per_identity: cap(self.max_per_identity, defaults.max_per_identity, "max_per_identity")?,
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    pub epoch_ms: u64,
    pub activation_delay: u64,
    pub heartbeat_ms: u64,
    pub refresh_timeout_ms: u64,
    /// "tree", "star" or "flat".
    pub scheme: String,
    pub degree: u32,
    pub flat_id_bits: u8,
    /// "revision" (default: one-way revisions, no wrap for existing members) or "version"
    /// (new key versions for joiners, Wong's join).
    pub join_policy: String,
    pub immediate_eviction: bool,
    /// Multicast who joined and left after each rekey (conferencing groups).
    pub membership_deltas: bool,
    /// The joiners' reflector (docs/hierarchy.md): joiners read the group's data from their
    /// acceptance, at the cost of a second copy of each data packet while they wait. Off by
    /// default: it doubles the channel's data in every epoch with joins.
    pub reflector: bool,
    pub mtu: usize,
    /// Proactive FEC: rekey packets in blocks of `fec_block`, each sent with
    /// ceil(k · proactivity_pct / 100) − k parity packets (100: none).
    pub fec_block: u16,
    pub proactivity_pct: u16,
    /// NAKs per rekey the proactivity adapts toward.
    pub target_naks: u16,
    /// The most the proactivity may rise to (100: never any proactive parity).
    pub max_proactivity_pct: u16,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            epoch_ms: 1000,
            activation_delay: 1,
            heartbeat_ms: 500,
            refresh_timeout_ms: 10_000,
            scheme: "tree".into(),
            degree: 4,
            flat_id_bits: 20,
            join_policy: "revision".into(),
            immediate_eviction: true,
            membership_deltas: false,
            reflector: false,
            mtu: DEFAULT_MTU,
            fec_block: FecConfig::default().block,
            proactivity_pct: FecConfig::default().proactivity_pct,
            target_naks: FecConfig::default().target_naks,
            max_proactivity_pct: FecConfig::default().max_proactivity_pct,
        }
    }
}

impl PolicyConfig {
    pub fn group_policy(&self, group: u64) -> Result<GroupPolicy, ConfigError> {
        let scheme = match self.scheme.as_str() {
            "tree" if self.degree >= 2 => Scheme::Tree { degree: self.degree },
            "star" => Scheme::Star,
            "flat" if (1..=27).contains(&self.flat_id_bits) => {
                Scheme::Flat { id_bits: self.flat_id_bits, ids: keycast_core::FlatIds::Sequential }
            }
            other => return Err(ConfigError::Invalid(format!("scheme {other:?} (degree {}, flat id bits {}) is not valid", self.degree, self.flat_id_bits))),
        };
        let join_policy = JoinPolicy::from_name(&self.join_policy)
            .ok_or_else(|| ConfigError::Invalid(format!("join policy {:?}: expected version or revision", self.join_policy)))?;
        if self.epoch_ms == 0 || self.heartbeat_ms == 0 {
            return Err(ConfigError::Invalid("epoch_ms and heartbeat_ms must be positive".into()));
        }
        let packets = PacketConfig {
            mtu: self.mtu,
            block_bits: DEFAULT_BLOCK_BITS,
            placement: Placement::default(),
            fec: FecConfig {
                block: self.fec_block,
                proactivity_pct: self.proactivity_pct,
                target_naks: self.target_naks,
                max_proactivity_pct: self.max_proactivity_pct,
            },
        };
        packets.check().map_err(|e| ConfigError::Invalid(format!("[policy]: {e}")))?;
        Ok(GroupPolicy {
            group: GroupId(group),
            graph: GraphConfig { scheme, join_policy },
            epoch_ms: self.epoch_ms,
            activation_delay: self.activation_delay,
            heartbeat_ms: self.heartbeat_ms,
            refresh_timeout_ms: self.refresh_timeout_ms,
            immediate_eviction: self.immediate_eviction,
            membership_deltas: self.membership_deltas,
            reflector: self.reflector,
            packets,
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MemberConfig {
    pub group: u64,
    /// The controller's TLS address, and the name its certificate carries.
    pub server: SocketAddr,
    #[serde(default = "localhost")]
    pub server_name: String,
    pub multicast: MulticastConfig,
    pub tls: TlsFiles,
    /// How often to refresh (soft state); the controller's timeout must be several times this.
    #[serde(default = "refresh_ms")]
    pub refresh_ms: u64,
    #[serde(default = "heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// Refresh by a liveness datagram over UDP (one packet, no handshake); every
    /// `tls_refresh_every`-th refresh also goes over TLS, whose answer tells an evicted or
    /// expired member so. `tls_refresh_every = 1` with `udp_refresh = false` is TLS only.
    #[serde(default = "yes")]
    pub udp_refresh: bool,
    #[serde(default = "tls_refresh_every")]
    pub tls_refresh_every: u32,
    /// Join again by itself after being evicted or expired (default: stop).
    #[serde(default)]
    pub rejoin: bool,
    /// Events the application has not read yet, at most (see `client::ClientEvent`).
    #[serde(default = "event_capacity")]
    pub event_capacity: usize,
    #[serde(default)]
    pub requests: RequestPolicy,
    /// The subgroup's standby relays, by registration number (`[[standbys]]` with `server`
    /// and `server_name`): the member joins them when its controller goes silent.
    #[serde(default)]
    pub standbys: Vec<crate::client::ControllerAddr>,
    /// Caronni et al.'s figure 6 (docs/distributed-flat.md): with this section a member of a
    /// flat group continues as a distributed flat participant when its controller is lost for
    /// good, and joins a controller-less group through a participant.
    #[serde(default)]
    pub distributed: Option<DistributedConfig>,
}

/// How a member continues without a controller (`MemberConfig::distributed`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DistributedConfig {
    /// Where the participants multicast their announcements and presences (not the group's
    /// rekey channel).
    pub multicast: MulticastConfig,
    /// The certificates of every identity that may be a participant (Ed25519, as `keycast
    /// init` issues them): an announcement signed by anyone else is refused.
    pub participants: Vec<PathBuf>,
    /// The flat table's ID bits (the controller's `flat_id_bits`).
    pub id_bits: u8,
    /// How long the controller must stay silent before this member continues as a
    /// participant: long enough that a paused or restarting controller is not mistaken for a
    /// lost one (a member that converts does not go back to it).
    #[serde(default = "after_silence_ms")]
    pub after_silence_ms: u64,
    /// How long a change settles before the next one (announcements of a change arrive
    /// within it).
    #[serde(default = "settle_ms")]
    pub settle_ms: u64,
    /// Pause between two presences (how participants and joiners find each other).
    #[serde(default = "presence_ms")]
    pub presence_ms: u64,
    /// How long a private message, a join or a handback request is retried.
    #[serde(default = "deadline_ms")]
    pub deadline_ms: u64,
    /// How long the handover waits for every member of the group to continue too, and how
    /// long a participant appointed to take the group back waits for the handbacks.
    #[serde(default = "handover_within_ms")]
    pub handover_within_ms: u64,
}

fn after_silence_ms() -> u64 {
    30_000
}

fn settle_ms() -> u64 {
    1_000
}

fn presence_ms() -> u64 {
    500
}

fn deadline_ms() -> u64 {
    10_000
}

fn handover_within_ms() -> u64 {
    20_000
}

/// How a member's requests to the controller (join, leave, refresh, resync) are bounded:
/// each attempt has a connect, TLS handshake and answer timeout; failed attempts are retried
/// with jittered exponential backoff until the request's deadline.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RequestPolicy {
    pub connect_timeout_ms: u64,
    pub handshake_timeout_ms: u64,
    /// From sending a request to its whole answer. A join is answered at the end of the
    /// controller's epoch, so keep this above the epoch length.
    pub answer_timeout_ms: u64,
    /// Leave, refresh and resync give up after this long.
    pub deadline_ms: u64,
    /// A join gives up after this long (a member started before its controller waits for it).
    pub join_deadline_ms: u64,
    /// First pause between attempts; it doubles up to `backoff_max_ms`, each drawn at random
    /// between half and all of it so that members do not retry in step.
    pub backoff_min_ms: u64,
    pub backoff_max_ms: u64,
    /// Refreshes and resyncs (which may be sent twice) start another attempt beside one that
    /// has not answered after this long, up to three at once: on a lossy link a fresh
    /// connection often finishes before one whose packets TCP is still retransmitting.
    pub hedge_after_ms: u64,
}

impl Default for RequestPolicy {
    fn default() -> Self {
        RequestPolicy {
            connect_timeout_ms: 3_000,
            handshake_timeout_ms: 3_000,
            answer_timeout_ms: 5_000,
            deadline_ms: 30_000,
            join_deadline_ms: 60_000,
            backoff_min_ms: 100,
            backoff_max_ms: 5_000,
            hedge_after_ms: 1_000,
        }
    }
}

/// Bounds of `MemberConfig::event_capacity`.
pub const EVENT_CAPACITY: std::ops::RangeInclusive<usize> = 16..=1 << 20;

impl RequestPolicy {
    /// Every timeout and deadline at least 1 ms, and backoffs in order.
    pub fn check(&self) -> Result<(), String> {
        let named = [
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("handshake_timeout_ms", self.handshake_timeout_ms),
            ("answer_timeout_ms", self.answer_timeout_ms),
            ("deadline_ms", self.deadline_ms),
            ("join_deadline_ms", self.join_deadline_ms),
            ("backoff_min_ms", self.backoff_min_ms),
            ("hedge_after_ms", self.hedge_after_ms),
        ];
        if let Some((name, _)) = named.iter().find(|(_, v)| *v == 0) {
            return Err(format!("[requests] {name} must be at least 1"));
        }
        if self.backoff_max_ms < self.backoff_min_ms {
            return Err("[requests] backoff_max_ms must be at least backoff_min_ms".into());
        }
        Ok(())
    }
}

/// A relay: the member config it joins its parent group with, and the server config of the
/// subgroup it controls (paths relative to the relay config's folder).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    pub parent: PathBuf,
    pub subgroup: PathBuf,
    /// Present for a standby relay: it watches the active relay and takes over when it goes
    /// silent, then runs as `parent` and `subgroup` say.
    #[serde(default)]
    pub standby: Option<StandbyConfig>,
}

/// A standby relay's place in line and how it watches the active relay.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StandbyConfig {
    /// Registration number: 1 takes over first.
    pub registration: u32,
    /// Wait per place in line after the alive alarm.
    #[serde(default = "back_off_ms")]
    pub back_off_ms: u64,
    /// The member config it joins the subgroup with to hear the active relay.
    pub watch: PathBuf,
}

fn back_off_ms() -> u64 {
    3000
}

/// A relay config with its parts loaded; `standby` with the config of its watch.
pub struct LoadedRelay {
    pub parent: MemberConfig,
    pub subgroup: ServerConfig,
    pub standby: Option<(StandbyConfig, MemberConfig)>,
}

impl RelayConfig {
    /// Every config it names, checked: the subgroup needs a group id of its own, and a
    /// standby watches that subgroup.
    pub fn load(path: &Path) -> Result<LoadedRelay, ConfigError> {
        let (c, base): (RelayConfig, _) = read(path)?;
        let (parent, subgroup) = (MemberConfig::load(&base.join(&c.parent))?, ServerConfig::load(&base.join(&c.subgroup))?);
        let invalid = |what: String| ConfigError::Invalid(format!("{}: {what}", path.display()));
        if parent.group == subgroup.group {
            return Err(invalid(format!("the subgroup's group id must differ from the parent's ({})", parent.group)));
        }
        let standby = match c.standby {
            Some(standby) => {
                let watch = MemberConfig::load(&base.join(&standby.watch))?;
                if watch.group != subgroup.group || standby.registration == 0 {
                    return Err(invalid("a standby watches its own subgroup (watch's group) and is registered from 1".into()));
                }
                Some((standby, watch))
            }
            None => None,
        };
        Ok(LoadedRelay { parent, subgroup, standby })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub server: SocketAddr,
    #[serde(default = "localhost")]
    pub server_name: String,
    pub tls: TlsFiles,
    /// Subgroup controllers (relays and their standbys) that `keycast admin tree` asks too.
    #[serde(default)]
    pub relays: Vec<SubgroupAddress>,
}

/// Where a relay's subgroup controller (or a standby's, once it took over) answers admins.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SubgroupAddress {
    pub name: String,
    pub server: SocketAddr,
    #[serde(default = "localhost")]
    pub server_name: String,
}

pub(crate) fn localhost() -> String {
    "localhost".into()
}

fn refresh_ms() -> u64 {
    2000
}

fn heartbeat_ms() -> u64 {
    500
}

fn yes() -> bool {
    true
}

fn tls_refresh_every() -> u32 {
    DEFAULT_TLS_REFRESH_EVERY
}

/// With UDP refreshes, one refresh in this many also goes over TLS. Two keeps a member whose
/// UDP is blocked alive on TLS alone while refresh_ms is under a quarter of the controller's
/// timeout; raise it (fewer handshakes) once UDP is known to pass.
pub const DEFAULT_TLS_REFRESH_EVERY: u32 = 2;

fn event_capacity() -> usize {
    1024
}

fn read<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<(T, PathBuf), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    let value = toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.into(), source })?;
    Ok((value, path.parent().unwrap_or(Path::new(".")).to_path_buf()))
}

impl ServerConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let (mut c, base): (ServerConfig, _) = read(path)?;
        c.tls.resolve(&base);
        if c.database.is_relative() {
            c.database = base.join(&c.database);
        }
        if let Some(key) = c.database_key.as_mut().filter(|k| k.is_relative()) {
            *key = base.join(&*key);
        }
        if c.snapshot_interval == Some(0) {
            return Err(ConfigError::Invalid(format!("{}: snapshot_interval must be at least 1 batch", path.display())));
        }
        c.admin_fingerprints().map_err(|e| ConfigError::Invalid(format!("{}: {e}", path.display())))?;
        c.merge_peer_fingerprints().map_err(|e| ConfigError::Invalid(format!("{}: {e}", path.display())))?;
        c.tls_server_name().map_err(|e| ConfigError::Invalid(format!("{}: {e}", path.display())))?;
        Ok(c)
    }

    /// The key that seals the log's secrets: `KEYCAST_DATABASE_KEY` if set, else the
    /// `database_key` file, else none (secrets stored as the file's permissions allow).
    pub fn load_database_key(&self) -> Result<Option<DatabaseKey>, ConfigError> {
        if let Ok(hex) = std::env::var(DATABASE_KEY_VARIABLE) {
            let hex = zeroize::Zeroizing::new(hex);
            return DatabaseKey::from_hex(&hex).map(Some).map_err(|e| ConfigError::Invalid(format!("{DATABASE_KEY_VARIABLE}: {e}")));
        }
        self.database_key.as_deref().map(DatabaseKey::load).transpose().map_err(|e| ConfigError::Invalid(e.to_string()))
    }

    /// `server_name`, checked as merge notices carry it: 1 to 253 printable ASCII bytes.
    pub fn tls_server_name(&self) -> Result<TlsServerName, ConfigError> {
        TlsServerName::new(&self.server_name).map_err(|e| ConfigError::Invalid(format!("server_name {:?}: {e}", self.server_name)))
    }

    /// `admins`, parsed; an entry that is not a fingerprint (an identity, say) is an error.
    pub fn admin_fingerprints(&self) -> Result<Vec<Fingerprint>, ConfigError> {
        fingerprints(&self.admins, "admins", "admin.pem")
    }

    /// `merge_peers`, parsed like `admins`.
    pub fn merge_peer_fingerprints(&self) -> Result<Vec<Fingerprint>, ConfigError> {
        fingerprints(&self.merge_peers, "merge_peers", "controller.pem")
    }
}

/// Certificate fingerprints of the config entry `field`; an entry that is not one is an error
/// that says how to make one (from `example`).
fn fingerprints(entries: &[String], field: &str, example: &str) -> Result<Vec<Fingerprint>, ConfigError> {
    entries
        .iter()
        .map(|entry| {
            Fingerprint::parse(entry).map_err(|e| {
                ConfigError::Invalid(format!(
                    "{field}: {e}. Certificates are named by fingerprint, e.g. `openssl x509 -in {example} -outform der | sha256sum` prefixed with \"sha256:\""
                ))
            })
        })
        .collect()
}

impl MemberConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let (mut c, base): (MemberConfig, _) = read(path)?;
        c.tls.resolve(&base);
        let invalid = |what: String| ConfigError::Invalid(format!("{}: {what}", path.display()));
        c.requests.check().map_err(invalid)?;
        if !EVENT_CAPACITY.contains(&c.event_capacity) {
            return Err(invalid(format!("event_capacity must be between {} and {}", EVENT_CAPACITY.start(), EVENT_CAPACITY.end())));
        }
        if c.refresh_ms == 0 || c.heartbeat_ms == 0 {
            return Err(invalid("refresh_ms and heartbeat_ms must be at least 1".into()));
        }
        if let Some(d) = c.distributed.as_mut() {
            d.participants.iter_mut().filter(|p| p.is_relative()).for_each(|p| *p = base.join(&*p));
            if !(1..=64).contains(&d.id_bits) || d.participants.is_empty() || d.settle_ms == 0 || d.presence_ms == 0 {
                return Err(invalid("[distributed] needs id_bits from 1 to 64, at least one participant certificate, and settle_ms and presence_ms of at least 1".into()));
            }
        }
        Ok(c)
    }
}

impl AdminConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let (mut c, base): (AdminConfig, _) = read(path)?;
        c.tls.resolve(&base);
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_limits_default_from_the_epoch_and_refuse_zero() {
        let policy = PolicyConfig { epoch_ms: 4000, ..PolicyConfig::default() }.group_policy(1).unwrap();
        let defaults = ConnectionsConfig::default().limits(&policy).unwrap();
        assert_eq!(defaults.answer_timeout, Duration::from_secs(12));
        assert_eq!((defaults.max_connections, defaults.max_per_address, defaults.max_per_identity), (1024, 64, 4));
        let set: ConnectionsConfig = toml::from_str("answer_timeout_ms = 700\nmax_per_identity = 2").unwrap();
        let limits = set.limits(&policy).unwrap();
        assert_eq!((limits.answer_timeout, limits.max_per_identity), (Duration::from_millis(700), 2));
        for zero in ["max_connections = 0", "handshake_timeout_ms = 0"] {
            let config: ConnectionsConfig = toml::from_str(zero).unwrap();
            assert!(config.limits(&policy).is_err(), "{zero} was accepted");
        }
        assert!(toml::from_str::<ConnectionsConfig>("max_conections = 5").is_err(), "a misspelt setting was ignored");
    }

    const MEMBER: &str = "group = 1\nserver = \"127.0.0.1:7400\"\n[multicast]\naddress = \"239.255.42.1:7401\"\n[tls]\nca = \"ca.pem\"\ncert = \"m.pem\"\nkey = \"m.key\"\n";

    fn load(extra: &str) -> Result<MemberConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("member.toml");
        std::fs::write(&path, format!("{MEMBER}{extra}")).unwrap();
        MemberConfig::load(&path)
    }

    #[test]
    fn member_standbys_are_listed_in_order_and_none_by_default() {
        assert!(load("").unwrap().standbys.is_empty());
        let listed = load("[[standbys]]\nserver = \"127.0.0.1:7404\"\n[[standbys]]\nserver = \"127.0.0.1:7405\"\nserver_name = \"standby-2\"\n").unwrap();
        let servers: Vec<_> = listed.standbys.iter().map(|s| (s.server.port(), s.server_name.as_str())).collect();
        assert_eq!(servers, [(7404, "localhost"), (7405, "standby-2")]);
        assert!(load("[[standbys]]\nserver = \"127.0.0.1:7404\"\nname = \"x\"\n").is_err(), "a misspelt field was ignored");
    }

    const SERVER: &str = "group = 1\nlisten = \"127.0.0.1:7400\"\ndatabase = \"c.redb\"\nacl = []\nadmins = []\n";
    const SERVER_TABLES: &str = "[multicast]\naddress = \"239.255.42.1:7401\"\n[tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"c.key\"\n";

    fn load_server(extra: &str) -> Result<ServerConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.toml");
        std::fs::write(&path, format!("{SERVER}{extra}{SERVER_TABLES}")).unwrap();
        ServerConfig::load(&path)
    }

    #[test]
    fn the_controllers_server_name_defaults_to_localhost_and_must_fit_a_merge_notice() {
        assert_eq!(load_server("").unwrap().tls_server_name().unwrap().as_str(), "localhost");
        assert_eq!(load_server("server_name = \"keycast.example.org\"\n").unwrap().server_name, "keycast.example.org");
        for bad in ["", "two words", &"a".repeat(254)] {
            let error = load_server(&format!("server_name = \"{bad}\"\n")).unwrap_err().to_string();
            assert!(error.contains("server.toml") && error.contains("server_name"), "{error}");
        }
    }

    #[test]
    fn member_requests_default_and_bad_values_are_refused_with_the_file_named() {
        let config = load("").unwrap();
        assert_eq!(config.requests, RequestPolicy::default());
        assert!(!config.rejoin);
        let partial = load("[requests]\njoin_deadline_ms = 1500\n").unwrap();
        assert_eq!(partial.requests, RequestPolicy { join_deadline_ms: 1500, ..RequestPolicy::default() });
        let zero = load("[requests]\nanswer_timeout_ms = 0\n").unwrap_err().to_string();
        assert!(zero.contains("member.toml") && zero.contains("answer_timeout_ms"), "{zero}");
        let backwards = load("[requests]\nbackoff_min_ms = 500\nbackoff_max_ms = 100\n").unwrap_err().to_string();
        assert!(backwards.contains("backoff_max_ms"), "{backwards}");
        let unbounded = load("event_capacity = 0\n[requests]\n").unwrap_err().to_string();
        assert!(unbounded.contains("event_capacity"), "{unbounded}");
    }
}
