//! `keycast init`, `server`, `member` and `admin`: the networked system from config files.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use keycast_core::protocol::DEFAULT_SNAPSHOT_EVERY;
use keycast_net::admin::{self, AdminRequest, AdminResponse};
use keycast_net::client::MemberSetup;
use keycast_net::config::{AdminConfig, MemberConfig, RelayConfig, ServerConfig};
use keycast_net::pki::{Authority, Credentials, Fingerprint, RcgenError};
use keycast_net::relay::{Relay, RelaySetup, Standby, StandbySetup};
use keycast_net::server::{Server, ServerError, ServerSetup};
use keycast_net::store::{DatabaseKey, StoreError};
use keycast_net::tls::{client_config, server_config};


#[derive(Args)]
pub struct InitArgs {
    /// Folder to create (must not hold a keycast setup already).
    dir: PathBuf,
    /// Member identities to issue certificates for (member-1 .. member-N).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    members: u32,
    #[arg(long, default_value_t = 1)]
    group: u64,
    /// TLS port of the controller; the multicast channel uses the next port.
    #[arg(long, default_value_t = 7400)]
    port: u16,
    /// Relays under the controller (relay-1 .. relay-R), each the controller of a subgroup
    /// (group id GROUP + r, ports PORT + 2r and the next) with a standby (relay-R-standby-1,
    /// TLS port PORT + 2R + 1 + r once it takes over); members are spread over the top group
    /// and the subgroups.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=100))]
    relays: u16,
    /// The top group's key graph: `tree`, or `flat` (Caronni et al.'s flat table: its members
    /// continue as a distributed flat group if the controller is lost for good, see
    /// docs/distributed-flat.md).
    #[arg(long, default_value = "tree", value_parser = ["tree", "flat"])]
    scheme: String,
    /// ID bits of the flat table (with `--scheme flat`): room for 2^bits members.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u8).range(1..=27))]
    flat_id_bits: u8,
}

#[derive(Args)]
pub struct ConfigArg {
    #[arg(long)]
    config: PathBuf,
}

#[derive(Args)]
pub struct AdminArgs {
    #[arg(long)]
    config: PathBuf,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Subcommand)]
pub enum AdminCommand {
    /// The group's members: id, identity, and how long ago the controller last heard from each.
    List,
    /// Remove a member at once (its keys are replaced immediately) and revoke its identity
    /// until `readmit`. TARGET is a member id (a number) or an identity.
    Evict { target: String },
    /// Let a revoked identity join again.
    Readmit { identity: String },
    /// The ACL: add, remove (removes its member at once) or list (with revoked identities).
    #[command(subcommand)]
    Acl(AclCommand),
    /// Members, epoch, rekeys, bytes, joins, connections.
    Stats {
        /// One JSON object, for programs.
        #[arg(long)]
        json: bool,
    },
    /// Replace the controller's signing key (e.g. after a suspected leak of the database):
    /// members follow the announcement, signed by the old key, without rejoining.
    RotateSigningKey,
    /// Caronni et al.'s flat <-> tree transition (docs/distributed-flat.md): `tree` derives a
    /// binary tree from the flat table (no key travels; colluding old members stay in until the
    /// group goes back to flat); `flat --id-bits I` makes a fresh flat table (perfect forward
    /// secrecy kept; each member resyncs for its keys).
    #[command(subcommand)]
    Transition(TransitionCommand),
    /// The tree of relays: the top group and every subgroup listed under `[[relays]]` in the
    /// admin config, each with its size, placed under the parent its relay reports.
    Tree {
        /// One JSON object, for programs.
        #[arg(long)]
        json: bool,
    },
    /// Merge another running group into this one (docs/merge.md): this controller runs the
    /// merged group, the other group's members follow it without rejoining. Both controllers
    /// must trust one CA, and the other controller must list this one's certificate in its
    /// `merge_peers`: its state (its keys) goes controller to controller, never through this
    /// command.
    Merge {
        /// The admin config of the group to absorb.
        #[arg(long)]
        absorb: PathBuf,
    },
    /// Split the group merged into this one off again: its members go back to its controller.
    Split {
        /// The admin config of the group that was absorbed.
        #[arg(long)]
        right: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum AclCommand {
    Add { identity: String },
    Remove { identity: String },
    List,
}

#[derive(Subcommand)]
pub enum TransitionCommand {
    /// Flat to tree: a binary tree over the flat table's ID bits, derived (no key travels).
    Tree,
    /// Tree to flat: a fresh flat table; each member takes its keys by resync.
    Flat {
        /// The table's ID bits (at least log2 of the members).
        #[arg(long)]
        id_bits: u8,
    },
}

impl AdminCommand {
    fn request(&self) -> AdminRequest {
        match self {
            AdminCommand::List => AdminRequest::List,
            AdminCommand::Evict { target } => match target.parse() {
                Ok(member) => AdminRequest::Evict { member },
                Err(_) => AdminRequest::Revoke { identity: target.clone() },
            },
            AdminCommand::Readmit { identity } => AdminRequest::Readmit { identity: identity.clone() },
            AdminCommand::Acl(AclCommand::Add { identity }) => AdminRequest::AclAdd { identity: identity.clone() },
            AdminCommand::Acl(AclCommand::Remove { identity }) => AdminRequest::AclRemove { identity: identity.clone() },
            AdminCommand::Acl(AclCommand::List) => AdminRequest::AclList,
            AdminCommand::Stats { .. } => AdminRequest::Stats,
            AdminCommand::RotateSigningKey => AdminRequest::RotateSigningKey,
            AdminCommand::Transition(TransitionCommand::Tree) => AdminRequest::Transition { flat_id_bits: None },
            AdminCommand::Transition(TransitionCommand::Flat { id_bits }) => AdminRequest::Transition { flat_id_bits: Some(*id_bits) },
            AdminCommand::Tree { .. } | AdminCommand::Merge { .. } | AdminCommand::Split { .. } => AdminRequest::Stats,
        }
    }
}

fn write(path: &Path, text: &str, private: bool) -> Result<(), String> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, if private { 0o600 } else { 0o644 });
    let mut file = options.open(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    std::io::Write::write_all(&mut file, text.as_bytes()).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn write_credentials(dir: &Path, name: &str, c: &Credentials) -> Result<(), String> {
    write(&dir.join(format!("{name}.pem")), &c.cert_pem, false)?;
    write(&dir.join(format!("{name}.key")), &c.key_pem, true)
}

fn addresses(port: u16) -> String {
    format!("server = \"127.0.0.1:{port}\"\nserver_name = \"localhost\"\n")
}

/// The multicast section of group `level` (0 the top group, r relay r's subgroup).
fn multicast(port: u16, level: u16) -> String {
    format!(
        "[multicast]\n# Group address and port. The interface is where datagrams leave and where members join;\n# TTL 1 keeps them on this host's link. Change both only for a real network.\naddress = \"239.255.42.{}:{}\"\ninterface = \"127.0.0.1\"\nttl = 1\n",
        level + 1,
        port + 1
    )
}

pub fn init(args: &InitArgs) -> Result<(), String> {
    if args.dir.join("server.toml").exists() {
        return Err(format!("{} already holds a keycast setup", args.dir.display()));
    }
    std::fs::create_dir_all(&args.dir).map_err(|e| format!("cannot create {}: {e}", args.dir.display()))?;
    let pki = |e: RcgenError| e.to_string();
    let ca = Authority::new("keycast CA").map_err(pki)?;
    write(&args.dir.join("ca.pem"), &ca.ca_pem(), false)?;
    write_credentials(&args.dir, "controller", &ca.issue("keycast-controller", true).map_err(pki)?)?;
    let admin = ca.issue("admin", false).map_err(pki)?;
    write_credentials(&args.dir, "admin", &admin)?;
    let admin_fingerprint = admin.fingerprint()?;
    let names: Vec<String> = (1..=args.members).map(|i| format!("member-{i}")).collect();
    let levels = args.relays + 1;
    args.port.checked_add(3 * args.relays + 1).ok_or("--port must leave room for the multicast ports (and the relays')")?;
    // member-i belongs to the top group (level 0) or to relay r's subgroup (level r).
    let level_of = |i: u32| (i - 1) % u32::from(levels);
    for (i, name) in (1..).zip(&names) {
        // Ed25519, valid as a TLS client and server: the certificate a member of a flat group
        // signs and listens with as a distributed participant.
        write_credentials(&args.dir, name, &ca.issue_participant(name, &keycast_net::entropy()).map_err(pki)?)?;
        let level = level_of(i) as u16;
        let mut config = member_toml(name, args.group + u64::from(level), args.port + 2 * level, level, name);
        if level > 0 {
            config.push_str(&standbys_toml(standby_port(args, level)));
        } else if args.scheme == "flat" {
            let top: Vec<&String> = (1..).zip(&names).filter(|(i, _)| level_of(*i) == 0).map(|(_, n)| n).collect();
            config.push_str(&distributed_toml(args, &top));
        }
        write(&args.dir.join(format!("{name}.toml")), &config, false)?;
    }
    let acl_of = |level: u16| -> Vec<String> { (1..).zip(&names).filter(|(i, _)| level_of(*i) == u32::from(level)).map(|(_, n)| n.clone()).collect() };
    let mut top_acl = acl_of(0);
    top_acl.extend((1..=args.relays).flat_map(|r| [format!("relay-{r}"), format!("relay-{r}-standby-1")]));
    let server = server_toml(args.group, args.port, 0, &top_acl, &admin_fingerprint, "controller")
        .replace("scheme = \"tree\"\n", &format!("scheme = \"{}\"\n", args.scheme))
        .replace("flat_id_bits = 20\n", &format!("flat_id_bits = {}\n", args.flat_id_bits));
    write(&args.dir.join("server.toml"), &server, false)?;
    for r in 1..=args.relays {
        let name = format!("relay-{r}");
        // Two certificates: the relay's identity in the parent's ACL, and its subgroup's TLS server.
        write_credentials(&args.dir, &name, &ca.issue(&name, false).map_err(pki)?)?;
        let controller = format!("{name}-controller");
        write_credentials(&args.dir, &controller, &ca.issue(&controller, true).map_err(pki)?)?;
        write(&args.dir.join(format!("{name}-parent.toml")), &member_toml(&name, args.group, args.port, 0, &name), false)?;
        let standby = format!("{name}-standby-1");
        let mut subgroup_acl = acl_of(r);
        subgroup_acl.push(standby.clone());
        let subgroup = server_toml(args.group + u64::from(r), args.port + 2 * r, r, &subgroup_acl, &admin_fingerprint, &controller);
        write(&args.dir.join(format!("{name}-subgroup.toml")), &subgroup, false)?;
        let key_file = args.dir.join(format!("{controller}.database.key"));
        DatabaseKey::create_file(&key_file).map_err(|e| format!("cannot create {}: {e}", key_file.display()))?;
        write_standby(args, r, &ca, &subgroup)?;
        let relay = format!("# keycast relay {r}: `keycast relay --config {name}.toml`. It joins the top group as a member\n# (the parent config) and runs the controller of subgroup {} (the subgroup config), carrying\n# data between them by re-wrapping each message's key.\nparent = \"{name}-parent.toml\"\nsubgroup = \"{name}-subgroup.toml\"\n", args.group + u64::from(r));
        write(&args.dir.join(format!("{name}.toml")), &relay, false)?;
    }
    let key_file = args.dir.join("database.key");
    DatabaseKey::create_file(&key_file).map_err(|e| format!("cannot create {}: {e}", key_file.display()))?;
    let addresses = addresses(args.port);
    let admin = format!(
        "# `keycast admin --config admin.toml list|evict ID-OR-IDENTITY|readmit IDENTITY|acl add|remove|list|stats|rotate-signing-key|transition tree|flat --id-bits I|tree`\n{addresses}\n[tls]\nca = \"ca.pem\"\ncert = \"admin.pem\"\nkey = \"admin.key\"\n{}",
        relays_toml(args)
    );
    write(&args.dir.join("admin.toml"), &admin, false)?;
    println!("created {}: ca.pem, server.toml, database.key, admin.toml, {} member configs and {} relay configs", args.dir.display(), names.len(), args.relays);
    println!("next: keycast server --config {}/server.toml", args.dir.display());
    Ok(())
}

/// The admin config's `[[relays]]`: each subgroup's controller and its standby, for `tree`.
fn relays_toml(args: &InitArgs) -> String {
    let mut out = String::new();
    if args.relays > 0 {
        out.push_str("\n# Subgroup controllers `keycast admin tree` asks besides the top one: each relay's, and its\n# standby's (which answers only once it has taken over).\n");
    }
    for r in 1..=args.relays {
        for (name, port) in [(format!("relay-{r}"), args.port + 2 * r), (format!("relay-{r}-standby-1"), standby_port(args, r))] {
            out.push_str(&format!("[[relays]]\nname = \"{name}\"\n{}", addresses(port)));
        }
    }
    out
}

/// The TLS port of relay `r`'s standby (after every group's two ports).
fn standby_port(args: &InitArgs, r: u16) -> u16 {
    args.port + 2 * args.relays + 1 + r
}

/// The `[distributed]` section of a top-group member's config (a flat group): the
/// participants are the top group's members.
fn distributed_toml(args: &InitArgs, participants: &[&String]) -> String {
    let files = participants.iter().map(|n| format!("\"{n}.pem\"")).collect::<Vec<_>>().join(", ");
    format!(
        "\n# Caronni et al.'s figure 6: when the controller stays silent after_silence_ms, this member continues\n# as a distributed flat participant with the keys it holds (admitting, evicting, leaving with no\n# controller); a member that starts while a distributed group runs joins through a participant.\n# Orders on standard input then: status, evict ID-OR-IDENTITY, leave, take-back SERVER-CONFIG (this\n# participant collects everyone's keys and starts a new controller from them; the others rejoin it).\n[distributed]\n# The participants' own channel (announcements and presences), not the group's.\nmulticast = {{ address = \"239.255.43.1:{}\", interface = \"127.0.0.1\", ttl = 1 }}\n# Certificates of the identities that may be participants.\nparticipants = [{files}]\nid_bits = {}\n# Long enough that a paused or restarting controller is not taken for lost.\nafter_silence_ms = 30000\nsettle_ms = 1000\npresence_ms = 500\ndeadline_ms = 10000\nhandover_within_ms = 20000\n",
        args.port + 1,
        args.flat_id_bits
    )
}

/// The `[[standbys]]` of a subgroup member's config: where its relay's standby listens.
fn standbys_toml(port: u16) -> String {
    format!("\n# The subgroup's standby relays, by registration number. When the relay goes silent for three\n# heartbeat intervals, a standby takes over with new keys, and this member joins the first\n# that answers, by itself.\n[[standbys]]\n{}", addresses(port))
}

/// Relay `r`'s standby: its certificate, the member config it watches the subgroup with,
/// the parent config and subgroup config it takes over with (`subgroup` with its own
/// listener and log), and `relay-R-standby-1.toml`.
fn write_standby(args: &InitArgs, r: u16, ca: &Authority, subgroup: &str) -> Result<(), String> {
    let (relay, subgroup_port) = (format!("relay-{r}"), args.port + 2 * r);
    let name = format!("{relay}-standby-1");
    write_credentials(&args.dir, &name, &ca.issue(&name, false).map_err(|e| e.to_string())?)?;
    write(&args.dir.join(format!("{name}-parent.toml")), &member_toml(&name, args.group, args.port, 0, &name), false)?;
    write(&args.dir.join(format!("{name}-watch.toml")), &member_toml(&name, args.group + u64::from(r), subgroup_port, r, &name), false)?;
    let own = subgroup
        .replace(&format!("listen = \"127.0.0.1:{subgroup_port}\""), &format!("listen = \"127.0.0.1:{}\"", standby_port(args, r)))
        .replace(&format!("\"{relay}-controller.redb\""), &format!("\"{name}-controller.redb\""))
        .replace(&format!("\"{relay}-controller.database.key\""), &format!("\"{name}-controller.database.key\""));
    write(&args.dir.join(format!("{name}-subgroup.toml")), &own, false)?;
    let key_file = args.dir.join(format!("{name}-controller.database.key"));
    DatabaseKey::create_file(&key_file).map_err(|e| format!("cannot create {}: {e}", key_file.display()))?;
    let config = format!(
        "# keycast standby of relay {r}: `keycast relay --config {name}.toml`. It joins subgroup {} as a\n# member (the watch config) and listens to the relay's heartbeats. When they stop for three\n# intervals it takes over: joins the top group with its own certificate (the parent config) and\n# runs a fresh controller of the subgroup (new keys; the subgroup config: its own listener and\n# log). The subgroup's members join it by themselves.\nparent = \"{name}-parent.toml\"\nsubgroup = \"{name}-subgroup.toml\"\n\n[standby]\n# Registration number: 1 takes over first; number n waits (n - 1) * back_off_ms after the alarm\n# and stands down if it hears a relay that took over before it.\nregistration = 1\nback_off_ms = 3000\nwatch = \"{name}-watch.toml\"\n",
        args.group + u64::from(r)
    );
    write(&args.dir.join(format!("{name}.toml")), &config, false)
}

/// The config of member `name` of `group` (at level `level`: 0 the top group, r relay r's
/// subgroup), presenting certificate `cert`.
fn member_toml(name: &str, group: u64, port: u16, level: u16, cert: &str) -> String {
    let (addresses, multicast) = (addresses(port), multicast(port, level));
    format!(
        "# keycast member {name}: `keycast member --config {name}.toml`\ngroup = {group}\n{addresses}\n# Soft state: refresh at least this often (the controller's timeout is longer).\nrefresh_ms = 2000\nheartbeat_ms = 500\n# Refresh by one UDP datagram to the controller, tagged with a key derived from this member's\n# individual key; one refresh in tls_refresh_every also goes over TLS (its answer says whether\n# the controller still counts this member). If UDP may be blocked, keep refresh_ms times\n# tls_refresh_every below the controller's refresh_timeout_ms; raise it (fewer handshakes)\n# once UDP is known to pass. udp_refresh = false: every refresh over TLS.\nudp_refresh = true\ntls_refresh_every = 2\n# Join again by itself after an expiry (otherwise it stops, exit status 3; an evicted identity stays out until re-admitted).\nrejoin = false\n# Events the application has not read yet, at most; beyond, data events are dropped and counted.\nevent_capacity = 1024\n\n{multicast}\n[tls]\nca = \"ca.pem\"\ncert = \"{cert}.pem\"\nkey = \"{cert}.key\"\n\n# Requests to the controller: each attempt's timeouts, then retries with jittered backoff\n# until the deadline (a join waits this long for a controller that is not up yet).\n[requests]\nconnect_timeout_ms = 3000\nhandshake_timeout_ms = 3000\n# A join is answered at the end of the controller's epoch: keep this above epoch_ms.\nanswer_timeout_ms = 5000\ndeadline_ms = 30000\njoin_deadline_ms = 60000\nbackoff_min_ms = 100\nbackoff_max_ms = 5000\n# A refresh or resync not answered after this long gets a second (and third) attempt beside\n# it: on a lossy link a fresh connection often wins over one TCP is still retransmitting.\nhedge_after_ms = 1000\n"
    )
}

/// The config of the controller of `group` (at level `level`) with certificate `cert`; a
/// subgroup's log and database key are named after its relay.
fn server_toml(group: u64, port: u16, level: u16, acl: &[String], admin_fingerprint: &Fingerprint, cert: &str) -> String {
    let multicast = multicast(port, level);
    let acl = acl.iter().map(|n| format!("\"{n}\"")).collect::<Vec<_>>().join(", ");
    let (database, database_key) =
        if level == 0 { ("controller.redb".to_owned(), "database.key".to_owned()) } else { (format!("{cert}.redb"), format!("{cert}.database.key")) };
    format!(
        "# keycast controller: `keycast server --config server.toml`\ngroup = {group}\n# TLS 1.3 address for joins, leaves, refreshes, resyncs and admin.\nlisten = \"127.0.0.1:{port}\"\n# The name in this controller's certificate (controller.pem) that members use to reach it;\n# a merge or split gives it to the members it moves here.\nserver_name = \"localhost\"\n# The controller's log (redb); it survives restarts. Its secrets (key seeds) are sealed under\n# database_key: keep that file apart from the database and its backups (another volume, a\n# secrets manager); KEYCAST_DATABASE_KEY (64 hex digits) takes precedence over the file.\ndatabase = \"{database}\"\ndatabase_key = \"{database_key}\"\n# Batches between snapshots: the log before a snapshot, and every older seed, is dropped.\nsnapshot_interval = 64\n# Identities that may join: a certificate's first URI, else DNS, subject alternative name.\nacl = [{acl}]\n# Use the subject's common name when a certificate has no URI or DNS SAN (off: a CN is\n# whatever the certificate's requester chose).\nidentity_from_common_name = false\n# Certificates that may administer, by SHA-256 fingerprint of the DER certificate (only\n# \"sha256:<hex>\" is accepted): `openssl x509 -in admin.pem -outform der | sha256sum`.\nadmins = [\"{admin_fingerprint}\"]\n# Controllers that may absorb this group into theirs or hand it back (`keycast admin merge` /\n# `split`), by fingerprint of their certificate (controller.pem of the other group). They are\n# given this group's state, keys included, controller to controller; an administrator never is.\nmerge_peers = []\n# Prometheus text endpoint, and a status page at / (group, rekeys, members); off unless set.\n# metrics = \"127.0.0.1:9464\"\n\n[policy]\n# Joins and leaves of one epoch become one rekey at the start of the next.\nepoch_ms = 1000\n# Epochs between a rekey and its key taking effect.\nactivation_delay = 1\nheartbeat_ms = 500\n# A member that does not refresh for this long is removed.\nrefresh_timeout_ms = 10000\n# tree (with degree), star or flat (with flat_id_bits).\nscheme = \"tree\"\ndegree = 4\nflat_id_bits = 20\n# revision: joiners' keys advance one-way: no wrap for the others, and a member that hears\n# any packet of a joins-only rekey is up to date. version: they are replaced (Wong's join).\njoin_policy = \"revision\"\n# Evictions rekey at once, and the new key is active at once.\nimmediate_eviction = true\n# Multicast who joined and left after each rekey (conferencing groups).\nmembership_deltas = false\n# Joiners read the group's data from their acceptance: the controller re-wraps each data\n# message to a key of the epoch's joiners until theirs is in force (docs/hierarchy.md). Off:\n# it doubles the channel's data in every epoch with joins.\nreflector = false\nmtu = 1200\n# Proactive FEC: rekey packets in blocks of fec_block, each sent with\n# ceil(k * proactivity_pct / 100) - k signed Reed-Solomon parity packets, so a member that\n# lost a few rebuilds them without asking. proactivity_pct is where it starts (100: no\n# parity); it adapts toward target_naks NAKs per rekey (members that cannot rebuild NAK once\n# over UDP and get a repair round).\nfec_block = 10\nproactivity_pct = 100\ntarget_naks = 20\n# The most it may rise to (100 pins it: repairs answer NAKs alone, no proactive parity).\nmax_proactivity_pct = 400\n\n[connections]\n# Deadlines: TLS handshake, reading a request (and writing its answer), and waiting for\n# the controller's answer (a join waits for its epoch's rekey; default max(3 epochs, 5 s)).\nhandshake_timeout_ms = 5000\nrequest_timeout_ms = 5000\n# answer_timeout_ms = 5000\n# Connections open at once: in total, from one IP address, per identity. Over a cap a\n# connection is closed at once (per identity: refused with a reason).\nmax_connections = 1024\nmax_per_address = 64\nmax_per_identity = 4\n\n{multicast}\n[tls]\nca = \"ca.pem\"\ncert = \"{cert}.pem\"\nkey = \"{cert}.key\"\n"
    )
}

pub fn logging() {
    logging_or("info");
}

/// Logs to stderr at `KEYCAST_LOG`'s level, or at `default` when it is not set.
pub fn logging_or(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEYCAST_LOG").unwrap_or_else(|_| default.into());
    // Colour only on a terminal: a log written to a file or a journal keeps no escape codes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())
}

pub(crate) fn server_setup(config: &ServerConfig) -> Result<ServerSetup, String> {
    let credentials = Credentials::load(&config.tls).map_err(|e| e.to_string())?;
    let policy = config.policy.group_policy(config.group).map_err(|e| e.to_string())?;
    Ok(ServerSetup {
        policy,
        acl: config.acl.iter().cloned().collect(),
        admins: config.admin_fingerprints().map_err(|e| e.to_string())?,
        merge_peers: config.merge_peer_fingerprints().map_err(|e| e.to_string())?,
        peer_tls: client_config(&credentials).map_err(|e| e.to_string())?,
        identity_from_common_name: config.identity_from_common_name,
        limits: config.connections.limits(&policy).map_err(|e| e.to_string())?,
        listen: config.listen,
        server_name: config.tls_server_name().map_err(|e| e.to_string())?,
        multicast: config.multicast.clone(),
        tls: server_config(&credentials).map_err(|e| e.to_string())?,
        database: config.database.clone(),
        database_key: config.load_database_key().map_err(|e| e.to_string())?,
        snapshot_interval: config.snapshot_interval.unwrap_or(DEFAULT_SNAPSHOT_EVERY),
        metrics: config.metrics,
    })
}

pub(crate) fn member_setup(config: &MemberConfig) -> Result<MemberSetup, String> {
    let credentials = Credentials::load(&config.tls).map_err(|e| e.to_string())?;
    Ok(MemberSetup::from_config(config, client_config(&credentials).map_err(|e| e.to_string())?))
}

pub fn server(args: &ConfigArg) -> Result<(), String> {
    logging();
    // Absolute paths, so every message names the files wherever the server was started.
    let config_path = std::fs::canonicalize(&args.config).unwrap_or_else(|_| args.config.clone());
    let config = ServerConfig::load(&config_path).map_err(|e| e.to_string())?;
    let setup = server_setup(&config)?;
    let fresh_database = !config.database.exists();
    runtime()?.block_on(async {
        let server = match Server::start(setup).await {
            Ok(server) => server,
            Err(error) => {
                // A controller that never ran leaves no database behind.
                if fresh_database {
                    let _ = std::fs::remove_file(&config.database);
                }
                return Err(start_failure(&config, &config_path, &error));
            }
        };
        tracing::info!(addr = %server.addr, "serving; Ctrl-C stops");
        tokio::select! {
            reason = server.stopped() => Err(format!("the controller stopped: {reason}")),
            signal = tokio::signal::ctrl_c() => {
                signal.map_err(|e| e.to_string())?;
                tracing::info!("stopping");
                Ok(())
            }
        }
    })
}

/// Why the controller did not start, and what to do about it.
fn start_failure(config: &ServerConfig, path: &Path, error: &ServerError) -> String {
    match error {
        ServerError::Io(e) if e.kind() == std::io::ErrorKind::AddrInUse => format!(
            "cannot start the controller: {} is already in use (another controller or program listens there); stop it, or give this group another port (`listen` in {}, or `keycast init --port` for a new group)",
            config.listen,
            path.display()
        ),
        ServerError::Store(e @ StoreError::AlreadyRunning(_)) => format!("cannot start the controller: {e}"),
        e => format!("cannot start the controller (log {}, TLS on {}): {e}; check that the log is writable and the address free", config.database.display(), config.listen),
    }
}

/// Runs a relay: a member of its parent group and the controller of its subgroup; or, with a
/// `[standby]` section, a standby that takes over when the relay goes silent.
pub fn relay(args: &ConfigArg) -> Result<(), String> {
    logging();
    let loaded = RelayConfig::load(&args.config).map_err(|e| e.to_string())?;
    let (parent, subgroup) = (&loaded.parent, &loaded.subgroup);
    let setup = RelaySetup { parent: member_setup(parent)?, subgroup: server_setup(subgroup)? };
    if let Some((standby, watch)) = &loaded.standby {
        let setup = StandbySetup { registration: standby.registration, back_off_ms: standby.back_off_ms, watch: member_setup(watch)?, relay: setup };
        return run_standby(setup);
    }
    runtime()?.block_on(async {
        let relay = Relay::start(setup).await.map_err(|e| format!("cannot start the relay of group {} under group {}: {e}", subgroup.group, parent.group))?;
        tracing::info!(addr = %relay.server.addr, member = relay.parent().member().0, "relaying; Ctrl-C stops");
        tokio::select! {
            biased;
            _ = relay.until_stepped_down() => Err(STEPPED_DOWN.into()),
            reason = relay.server.stopped() => Err(format!("the subgroup's controller stopped: {reason}")),
            signal = tokio::signal::ctrl_c() => {
                signal.map_err(|e| e.to_string())?;
                tracing::info!(stats = ?relay.stats(), "stopping");
                Ok(())
            }
        }
    })
}

const STEPPED_DOWN: &str = "stepped down: a standby took over the subgroup while this relay was cut off (paused, or not hearing its parent); \
its members follow the standby now. Run this relay again as a standby of that one, if wanted";

/// Runs a standby until Ctrl-C: it watches, and once it has taken over, relays.
fn run_standby(setup: StandbySetup) -> Result<(), String> {
    let registration = setup.registration;
    runtime()?.block_on(async {
        let standby = Standby::start(setup).await.map_err(|e| format!("standby {registration} cannot join the subgroup it watches: {e}"))?;
        tracing::info!(registration, "standing by; Ctrl-C stops");
        let took_over = tokio::select! {
            took_over = standby.until_active() => took_over,
            signal = tokio::signal::ctrl_c() => return signal.map_err(|e| e.to_string()),
        };
        tracing::info!(addr = %took_over.relay.server.addr, "took over; relaying");
        tokio::select! {
            biased;
            _ = took_over.relay.until_stepped_down() => Err(STEPPED_DOWN.into()),
            reason = took_over.relay.server.stopped() => Err(format!("the subgroup's controller stopped: {reason}")),
            signal = tokio::signal::ctrl_c() => {
                signal.map_err(|e| e.to_string())?;
                tracing::info!(stats = ?took_over.relay.stats(), "stopping");
                Ok(())
            }
        }
    })
}

/// How `keycast member` ended (its exit status: see `MEMBER_EXIT_STATUS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberEnd {
    /// `--for-secs` passed or Ctrl-C: the member left the group.
    Left,
    /// The controller removed this member (and it was not set to rejoin, or rejoining failed).
    Evicted,
}

pub const MEMBER_EXIT_STATUS: &str = "Exit status: 0 when the member ends normally (--for-secs or Ctrl-C; it leaves the group first), \
3 when the controller evicted or expired it (with `rejoin = true` in its config an expired member joins again instead; \
an evicted identity stays out until an administrator re-admits it), \
1 on failure (bad config, no controller within [requests] join_deadline_ms, or a leave it could not deliver).";

pub fn admin(args: &AdminArgs) -> Result<(), String> {
    let config = AdminConfig::load(&args.config).map_err(|e| e.to_string())?;
    let credentials = Credentials::load(&config.tls).map_err(|e| e.to_string())?;
    let tls = client_config(&credentials).map_err(|e| e.to_string())?;
    if let AdminCommand::Tree { json } = args.command {
        let answers = runtime()?.block_on(crate::admin_tree::gather(&config, tls));
        match json {
            true => println!("{}", serde_json::to_string_pretty(&crate::admin_tree::to_json(&answers)).expect("plain values")),
            false => println!("{}", crate::admin_tree::describe(&answers)),
        }
        return Ok(());
    }
    if let AdminCommand::Merge { absorb: other } | AdminCommand::Split { right: other } = &args.command {
        let here = admin::AdminTarget { server: config.server, server_name: config.server_name.clone(), tls };
        let other = controller_of(other)?;
        let done = match args.command {
            AdminCommand::Merge { .. } => runtime()?.block_on(admin::merge(&here, other))?,
            _ => runtime()?.block_on(admin::split(&here, other))?,
        };
        println!("{done}");
        return Ok(());
    }
    let request = args.command.request();
    let response = runtime()?.block_on(admin::request(config.server, &config.server_name, tls, &request))?;
    match response {
        AdminResponse::Stats(stats) if matches!(args.command, AdminCommand::Stats { json: true }) => {
            println!("{}", serde_json::to_string_pretty(&stats).expect("plain values"))
        }
        response => println!("{}", describe(response)?),
    }
    Ok(())
}

/// The controller an admin config names, with its credentials.
/// The controller an admin config names: its address and TLS name.
fn controller_of(path: &std::path::Path) -> Result<(std::net::SocketAddr, String), String> {
    let config = AdminConfig::load(path).map_err(|e| e.to_string())?;
    Ok((config.server, config.server_name))
}

/// The controller's answer for the operator; an error answer becomes the command's error.
fn describe(response: AdminResponse) -> Result<String, String> {
    Ok(match response {
        AdminResponse::Members(rows) => {
            let mut table = format!("{:>8}  {:<24}  last seen", "member", "identity");
            for r in rows {
                table += &format!("\n{:>8}  {:<24}  {:.1} s ago", r.member, r.identity, r.idle_ms as f64 / 1000.0);
            }
            table
        }
        AdminResponse::Evicted { member, found: true } => format!("member {member} evicted; its keys are replaced now and its identity is revoked (`readmit` undoes that)"),
        AdminResponse::Evicted { member, found: false } => return Err(format!("no member {member}; `keycast admin list` shows the members")),
        AdminResponse::Revoked { identity, member: Some(member) } => {
            format!("{identity} (member {member}) evicted; its keys are replaced now and the identity is revoked (`readmit` undoes that)")
        }
        AdminResponse::Revoked { identity, member: None } => format!("{identity} is revoked: it had no member; its joins are refused until `readmit`"),
        AdminResponse::Readmitted { identity, changed: true } => format!("{identity} may join again"),
        AdminResponse::Readmitted { identity, changed: false } => format!("{identity} was not revoked; nothing changed"),
        AdminResponse::AclChanged { identity, added: true, changed, .. } => {
            format!("{identity} {} the ACL", if changed { "added to" } else { "was already in" })
        }
        AdminResponse::AclChanged { identity, added: false, changed: false, .. } => format!("{identity} was not in the ACL; nothing changed"),
        AdminResponse::AclChanged { identity, added: false, evicted, .. } => match evicted {
            Some(member) => format!("{identity} removed from the ACL; its member {member} was removed and its keys are replaced now"),
            None => format!("{identity} removed from the ACL"),
        },
        AdminResponse::Acl { acl, revoked } => {
            let list = |names: &[String]| if names.is_empty() { "(none)".to_string() } else { names.join("\n  ") };
            format!("ACL ({}):\n  {}\nrevoked ({}):\n  {}", acl.len(), list(&acl), revoked.len(), list(&revoked))
        }
        AdminResponse::SigningKeyRotated { change, verifying_key } => {
            format!("signing key replaced (rotation {change}); members follow the announcement. New verifying key: {verifying_key}")
        }
        AdminResponse::Transitioned { scheme, seq } => format!("the group's key graph is now {scheme} (rekey {seq}); members follow the signed notice"),
        AdminResponse::Stats(s) => crate::stats_text::describe(&s),
        AdminResponse::MergeDone { detail } => detail,
        AdminResponse::MergeState { frames } => format!("merge state of {frames} frames (not kept)"),
        AdminResponse::Error(e) => return Err(e),
    })
}
