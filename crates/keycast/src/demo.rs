//! `keycast demo`: a controller and its members in one process, over real sockets on
//! loopback: TLS 1.3 joins with client certificates, rekeys and heartbeats over UDP multicast
//! (interface 127.0.0.1, TTL 1), a few epochs of random joins and leaves and one eviction.
//! The evicted member keeps its client and tries to open every message sealed after its
//! eviction; the summary says whether it ever could (it must not).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use keycast_core::protocol::GroupPolicy;
use keycast_core::delivery::proactivity::Proactivity;
use keycast_core::wire::rekey::{FecConfig, PacketConfig};
use keycast_core::wire::GroupId;
use keycast_core::{GraphConfig, Scheme};
use keycast_net::client::{ClientEvent, ClientStats, MemberClient};
use keycast_net::local::{Events, LocalGroup};
use keycast_net::loss::LossModel;
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

#[derive(Args)]
pub struct DemoArgs {
    /// Members at the start (default 200; 100 participants with --scheme distributed-flat).
    #[arg(long, value_parser = clap::value_parser!(u64).range(2..=2000))]
    members: Option<u64>,
    /// A controller and its members (tree), or a group with no controller whose participants
    /// admit and exclude each other (distributed-flat, Caronni et al.).
    #[arg(long, value_enum, default_value_t = DemoScheme::Tree)]
    pub(crate) scheme: DemoScheme,
    /// Epochs of churn after the group is built (rounds of churn with --scheme distributed-flat).
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(2..=100))]
    pub(crate) epochs: u32,
    /// With --scheme distributed-flat: how long an exclusion round stays open (competing
    /// exclusions are awaited, and every relay must reach every participant meanwhile).
    #[arg(long = "settle-ms", default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(50..=60_000))]
    pub(crate) settle_ms: u64,
    /// Epoch length in milliseconds. Default: 400, or half a millisecond per member above 800
    /// members: every member here shares this machine's cores and checks each heartbeat's
    /// signature (four per epoch), so a longer epoch keeps that load within them.
    #[arg(long = "epoch-ms", value_parser = clap::value_parser!(u64).range(50..=10_000))]
    epoch_ms: Option<u64>,
    #[arg(long, default_value_t = 7)]
    pub(crate) seed: u64,
    /// Loss injected on every member's multicast receive, each member its own (0 to 0.99).
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Mean length of a loss burst in datagrams (Gilbert-Elliott); independent losses without it.
    #[arg(long)]
    burst: Option<f64>,
    /// FEC: rekey packets per block (k).
    #[arg(long = "fec-block", default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=256))]
    fec_block: u16,
    /// FEC proactivity rho at the start: packets sent per block over k (1.0: no parity until
    /// NAKs raise it). Default: the smallest rho whose expected first-round NAKs are within
    /// --target-naks at --loss, as an operator would set it from a measured loss.
    #[arg(long)]
    rho: Option<f64>,
    /// NAKs per rekey the proactivity adapts toward.
    #[arg(long = "target-naks", default_value_t = 2)]
    target_naks: u16,
    /// The most rho may rise to (1.0 pins it: no proactive parity, NAKs and repairs alone).
    #[arg(long = "rho-max", default_value_t = 4.0)]
    rho_max: f64,
    /// Members send no NAKs: proactive parity or a resync (for comparison runs; with --rho 1.0,
    /// the resync-only path).
    #[arg(long = "no-naks")]
    no_naks: bool,
    /// Run a centralized flat group whose controller is killed: its members continue as a
    /// distributed flat group from the keys they hold (Caronni et al., figure 6), admit a
    /// newcomer, evict one and let one leave (default 30 members).
    #[arg(long = "controller-dies")]
    pub(crate) controller_dies: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub(crate) json: bool,
    /// Run a hierarchy instead: a top group and this many subgroups, each under a relay with a
    /// standby; relay 1 is killed and replaced by its standby (default 3 relays).
    #[arg(long, num_args = 0..=1, default_missing_value = "3", value_parser = clap::value_parser!(u16).range(1..=16))]
    relays: Option<u16>,
    /// Turn the joiners' reflector on: joiners read the group's data from their acceptance.
    #[arg(long)]
    reflector: bool,
    /// How joins change the keys above the joiners: revision (one-way, no wrap for the other
    /// members) or version (Wong's new versions, wrapped under the old ones).
    #[arg(long = "join-policy", value_enum, default_value = "revision")]
    join_policy: crate::sim::JoinPolicyArg,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum DemoScheme {
    Tree,
    DistributedFlat,
}

impl DemoArgs {
    pub(crate) fn epoch_ms(&self) -> u64 {
        self.epoch_ms.unwrap_or((self.members() / 2).max(400))
    }

    pub(crate) fn members(&self) -> u64 {
        let default = if self.controller_dies {
            30
        } else if self.scheme == DemoScheme::DistributedFlat {
            100
        } else {
            200
        };
        self.members.unwrap_or(default)
    }
}

type Member = (String, MemberClient, Events);

/// What members counted of the rekeys' delivery, summed.
#[derive(Default, Clone, Copy)]
struct MemberTotals {
    lost: u64,
    late_rekeys: u64,
    keys_late: u64,
    resyncs_repairs_exhausted: u64,
    resyncs_gap: u64,
    resyncs_silence: u64,
    fec_recovered: u64,
    repair_recovered: u64,
    naks: u64,
}

impl MemberTotals {
    fn add(&mut self, stats: &ClientStats) {
        self.lost += stats.lost;
        self.late_rekeys += stats.late_rekeys;
        self.keys_late += stats.keys_late;
        self.resyncs_repairs_exhausted += stats.resync_causes.repairs_exhausted;
        self.resyncs_gap += stats.resync_causes.gap;
        self.resyncs_silence += stats.resync_causes.silence + stats.resync_causes.contradiction;
        self.fec_recovered += stats.fec_recovered;
        self.repair_recovered += stats.repair_recovered;
        self.naks += stats.naks;
    }
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

struct Demo {
    group: LocalGroup,
    members: BTreeMap<u64, Member>,
    next_identity: u64,
    rng: ChaCha8Rng,
    joins: usize,
    leaves: usize,
    loss: Option<LossModel>,
    naks: bool,
    /// Rekeys lived through by members that left (the rest are counted at the end).
    departed_member_rekeys: u64,
    /// Delivery counters of members that left.
    departed: MemberTotals,
    /// The rekey seq each member joined at.
    joined_seq: BTreeMap<u64, u64>,
}

impl Demo {
    /// Joins `count` new members concurrently (they are admitted with the epoch's rekey).
    async fn join(&mut self, count: u64) -> Result<(), String> {
        let mut handles = Vec::new();
        for _ in 0..count {
            self.next_identity += 1;
            let name = format!("member-{}", self.next_identity);
            let mut setup = self.group.member_setup(&name).map_err(|e| e.to_string())?;
            setup.loss = self.loss.map(|model| model.for_receiver(self.next_identity));
            setup.naks = self.naks;
            handles.push(tokio::spawn(async move { MemberClient::join(setup).await.map(|(c, e)| (name, c, e)) }));
        }
        for h in handles {
            let (name, client, events) = h.await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
            self.joined_seq.insert(client.member().0, client.rekey_seq());
            self.members.insert(client.member().0, (name, client, events));
            self.joins += 1;
        }
        Ok(())
    }

    fn pick(&mut self) -> u64 {
        let ids: Vec<u64> = self.members.keys().copied().collect();
        ids[(self.rng.next_u64() % ids.len() as u64) as usize]
    }

    async fn leave(&mut self, count: u64) -> Result<(), String> {
        for _ in 0..count.min(self.members.len() as u64 - 2) {
            let id = self.pick();
            let (_, client, _) = self.members.remove(&id).expect("picked from the map");
            self.departed_member_rekeys += client.rekey_seq().saturating_sub(self.joined_seq[&id]);
            self.departed.add(&client.stats());
            client.leave().await.map_err(|e| e.to_string())?;
            self.leaves += 1;
        }
        Ok(())
    }

    /// Delivery counters summed over every member that ever joined.
    fn totals(&self) -> MemberTotals {
        let mut totals = self.departed;
        for (_, client, _) in self.members.values() {
            totals.add(&client.stats());
        }
        totals
    }

    /// Rekeys each member lived through, summed over every member that ever joined.
    fn member_rekeys(&self) -> u64 {
        let current: u64 = self.members.iter().map(|(id, (_, client, _))| client.rekey_seq().saturating_sub(self.joined_seq[id])).sum();
        current + self.departed_member_rekeys
    }

    /// How soon one more member reads the group's data: from its acceptance, another member
    /// sends every 10 ms for at most three epochs, until the joiner opened one and holds its key.
    async fn joiner_reads(&mut self, epoch_ms: u64) -> Result<JoinerReads, String> {
        self.join(1).await?;
        let accepted = Instant::now();
        let id = *self.members.keys().max().expect("just joined");
        let (name, joiner, mut events) = self.members.remove(&id).expect("just joined");
        let (_, sender, _) = self.members.values().next().ok_or("no member to send")?;
        let mut reads = JoinerReads::default();
        for n in 0..3 * epoch_ms / 10 {
            let since = || Some(accepted.elapsed().as_millis() as u64);
            reads.key_in_force_ms = reads.key_in_force_ms.or_else(|| joiner.getkey().and_then(|_| since()));
            while let Ok(event) = events.try_recv() {
                if matches!(event, ClientEvent::Data(_)) {
                    reads.first_data_ms = reads.first_data_ms.or_else(since);
                }
            }
            if reads.first_data_ms.is_some() && reads.key_in_force_ms.is_some() {
                break;
            }
            // A seal refused (the sender's rekey is late) only skips one tick.
            let _ = sender.send(format!("tick {n}").as_bytes()).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.members.insert(id, (name, joiner, events));
        Ok(reads)
    }

    /// Members holding the controller's active key, after waiting up to `within` for them.
    async fn in_sync(&self, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            let stats = self.group.server().stats();
            let count = self
                .members
                .values()
                .filter(|(_, c, _)| c.getkey().is_some_and(|(r, _)| r.to_string() == stats.active_key) && c.rekey_seq() == stats.rekeys)
                .count();
            if count == self.members.len() || Instant::now() > deadline {
                return count;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

#[derive(Default)]
struct JoinerReads {
    first_data_ms: Option<u64>,
    key_in_force_ms: Option<u64>,
}

#[derive(serde::Serialize)]
struct Summary {
    members: usize,
    epochs: u32,
    epoch_ms: u64,
    join_policy: &'static str,
    members_in_sync: usize,
    /// Members the controller removed although they never left (expired: refreshes lost).
    members_expired: usize,
    evicted_can_decrypt: bool,
    evicted_member: u64,
    messages_tried_by_evicted: usize,
    /// Seals refused by members that had not yet received the rekey in force.
    seals_refused_stale_key: usize,
    rekey_bytes: u64,
    rekeys: u64,
    /// Loss injected on each member's multicast receive, and its mean burst (1: independent).
    loss: f64,
    burst: f64,
    /// Multicast datagrams the injected loss dropped, over all members.
    datagrams_lost: u64,
    /// Rekeys received by members, summed (a member present for 5 rekeys counts 5).
    member_rekeys: u64,
    /// Fraction of member-rekeys complete after the first multicast round (packets and
    /// proactive parity), before any NAK.
    first_round_recovered: f64,
    /// Group keys put in force before a member held them, summed over members (0: every
    /// member held every key before it activated).
    keys_late: u64,
    /// Member-rekeys completed from round 1's parity, and from a repair round after a NAK.
    fec_recovered: u64,
    repair_recovered: u64,
    /// Resyncs (a rekey did not reach a member after the repair rounds): all of them, over
    /// TLS, over UDP (one datagram each way), and all over member-rekeys.
    unicast_resyncs: u64,
    tls_resyncs: u64,
    udp_resyncs: u64,
    unicast_resync_fraction: f64,
    /// Datagrams to the controller (NAKs, resync requests, liveness) its queue had no room for.
    udp_requests_dropped: u64,
    /// Why members resynced: a rekey still missing after the repair rounds, whole rekeys
    /// missed, or the controller not heard for ten heartbeat intervals.
    resyncs_repairs_exhausted: u64,
    resyncs_gap: u64,
    resyncs_silence: u64,
    /// FEC: rho at the start and the end, round-1 parity packets, repair rounds and their packets.
    rho: f64,
    rho_max: f64,
    rho_final: f64,
    parity_packets: u64,
    repair_rounds: u64,
    repair_packets: u64,
    /// Whether members sent NAKs (`--no-naks` turns them off).
    member_naks: bool,
    /// NAKs the controller counted (and per rekey), and NAKs members sent.
    naks: u64,
    naks_per_rekey: f64,
    naks_sent: u64,
    /// Bytes of the rekeys themselves, all rekey bytes sent (with parity and repairs), their
    /// ratio, and the least a perfect erasure code needs at this loss, 1/(1-p).
    rekey_bytes_sent: u64,
    overhead: f64,
    overhead_floor: f64,
    joins: usize,
    leaves: usize,
    mean_join_latency_ms: f64,
    /// Whether the joiners' reflector was on; for one last joiner while a member sends every
    /// 10 ms, ms from its acceptance to the first message it opened and to its key in force.
    reflector: bool,
    joiner_first_data_ms: Option<u64>,
    joiner_key_in_force_ms: Option<u64>,
    seconds: f64,
}

/// A runtime with one worker thread for the controller, shut down without blocking when the
/// demo ends (a runtime may not be dropped inside another's tasks).
struct ControllerRuntime(Option<tokio::runtime::Runtime>);

impl ControllerRuntime {
    fn start() -> Result<ControllerRuntime, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).thread_name("controller").enable_all().build();
        Ok(ControllerRuntime(Some(runtime.map_err(|e| e.to_string())?)))
    }

    fn spawn<F: std::future::Future + Send + 'static>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F::Output: Send + 'static,
    {
        self.0.as_ref().expect("running until dropped").spawn(task)
    }
}

impl Drop for ControllerRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Runs a demo on a runtime of its own, quiet unless asked (`KEYCAST_LOG=warn`): the demo's
/// output is its summary. With --json it is printed here; otherwise returned for the text.
pub(crate) fn run_quietly<S: serde::Serialize>(args: &DemoArgs, demo: impl std::future::Future<Output = Result<S, String>>) -> Result<Option<S>, String> {
    crate::net::logging_or("off");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    let summary = runtime.block_on(demo)?;
    if args.json {
        println!("{}", serde_json::to_string(&summary).expect("plain values"));
        return Ok(None);
    }
    Ok(Some(summary))
}

pub fn run(args: &DemoArgs) -> Result<(), String> {
    if args.relays.is_some() && args.scheme == DemoScheme::DistributedFlat {
        return Err("--relays builds a hierarchy of controllers; distributed flat has none".into());
    }
    if args.controller_dies && (args.relays.is_some() || args.scheme == DemoScheme::DistributedFlat) {
        return Err("--controller-dies starts from one centralized flat group (no --relays, no --scheme distributed-flat)".into());
    }
    if args.controller_dies {
        return crate::demo_controller_dies::run(args);
    }
    if let Some(relays) = args.relays {
        return crate::demo_relays::run(args, relays);
    }
    if args.scheme == DemoScheme::DistributedFlat {
        return crate::demo_distributed::run(args);
    }
    if let Some(summary) = run_quietly(args, demo(args))? {
        println!(
            "{} members after {} epochs of {} ms ({} joins, {} leaves, 1 eviction); {} rekeys, {} bytes on the wire",
            summary.members, summary.epochs, summary.epoch_ms, summary.joins, summary.leaves, summary.rekeys, summary.rekey_bytes
        );
        println!(
            "members at the controller's active key: {}/{} ({} expired by the controller)",
            summary.members_in_sync, summary.members, summary.members_expired
        );
        println!(
            "evicted member {} opened {} of {} messages sealed after its eviction",
            summary.evicted_member,
            if summary.evicted_can_decrypt { "some" } else { "none" },
            summary.messages_tried_by_evicted
        );
        {
            println!(
                "injected loss {} (mean burst {}): {} datagrams dropped; {:.1}% of {} member-rekeys complete after round 1 ({} rebuilt from its parity), {} after a repair round; {} keys in force before a member held them",
                summary.loss,
                summary.burst,
                summary.datagrams_lost,
                100.0 * summary.first_round_recovered,
                summary.member_rekeys,
                summary.fec_recovered,
                summary.repair_recovered,
                summary.keys_late
            );
            println!(
                "resyncs: {} over TLS, {} over UDP ({:.2}% of member-rekeys; {} after repairs, {} for whole rekeys missed, {} for silence); {} NAKs ({:.1} per rekey), {} repair rounds; rho {} -> {:.2}; {:.2}x the rekey bytes sent (a perfect code needs {:.2}x)",
                summary.tls_resyncs,
                summary.udp_resyncs,
                100.0 * summary.unicast_resync_fraction,
                summary.resyncs_repairs_exhausted,
                summary.resyncs_gap,
                summary.resyncs_silence,
                summary.naks,
                summary.naks_per_rekey,
                summary.repair_rounds,
                summary.rho,
                summary.rho_final,
                summary.overhead,
                summary.overhead_floor
            );
        }
        println!("mean join latency {:.0} ms (joins wait for their epoch); {:.1} s in all", summary.mean_join_latency_ms, summary.seconds);
        let ms = |v: Option<u64>| v.map_or("never (within three epochs)".to_string(), |v| format!("{v} ms"));
        println!(
            "a joiner (reflector {}) opened its first message {} after its acceptance; its key came into force after {}",
            if summary.reflector { "on" } else { "off" },
            ms(summary.joiner_first_data_ms),
            ms(summary.joiner_key_in_force_ms)
        );
    }
    Ok(())
}

/// Where rho starts: `--rho`, else the sane start for the injected loss (1.0 without loss).
fn starting_rho(args: &DemoArgs) -> Result<f64, String> {
    match args.rho {
        Some(rho) => Ok(rho),
        None => Proactivity::for_loss(args.fec_block.into(), args.target_naks.into(), args.rho_max, args.loss, args.members())
            .map(|p| p.rho())
            .map_err(|e| format!("--loss/--rho-max/--fec-block: {e}")),
    }
}

fn fec_config(args: &DemoArgs, rho: f64) -> FecConfig {
    let pct = |rho: f64| (rho * 100.0).round() as u16;
    FecConfig { block: args.fec_block, proactivity_pct: pct(rho), target_naks: args.target_naks, max_proactivity_pct: pct(args.rho_max) }
}

async fn demo(args: &DemoArgs) -> Result<Summary, String> {
    if !(1.0..=4.0).contains(&args.rho_max) {
        return Err(format!("--rho-max {} must be between 1.0 (no parity) and 4.0", args.rho_max));
    }
    let rho = starting_rho(args)?;
    if !(1.0..=args.rho_max).contains(&rho) {
        return Err(format!("--rho {rho} must be between 1.0 (no parity) and --rho-max {}", args.rho_max));
    }
    let started = Instant::now();
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let policy = GroupPolicy {
        group: GroupId(1),
        graph: GraphConfig { scheme: Scheme::Tree { degree: 4 }, join_policy: args.join_policy.policy() },
        epoch_ms: args.epoch_ms(),
        activation_delay: 1,
        heartbeat_ms: (args.epoch_ms() / 4).max(20),
        refresh_timeout_ms: 20 * args.epoch_ms(),
        immediate_eviction: true,
        membership_deltas: false,
        reflector: args.reflector,
        packets: PacketConfig { fec: fec_config(args, rho), ..PacketConfig::default() },
    };
    let acl = (args.members() + 10 * args.epochs as u64) as usize;
    // The controller runs on a thread of its own, as on its own machine: the members' thousands
    // of tasks must not queue ahead of its timers and answers.
    let controller = ControllerRuntime::start()?;
    let folder = dir.path().to_path_buf();
    let group = controller.spawn(LocalGroup::start(policy, acl, folder)).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
    let loss = (args.loss > 0.0).then_some(LossModel { rate: args.loss, burst: args.burst, seed: args.seed });
    if let Some(model) = &loss {
        model.check().map_err(|e| format!("--loss/--burst: {e}"))?;
    }
    let mut demo = Demo {
        group,
        members: BTreeMap::new(),
        next_identity: 0,
        rng: ChaCha8Rng::seed_from_u64(args.seed),
        joins: 0,
        leaves: 0,
        loss,
        naks: !args.no_naks,
        departed_member_rekeys: 0,
        departed: MemberTotals::default(),
        joined_seq: BTreeMap::new(),
    };
    let bar = if args.json { ProgressBar::hidden() } else { ProgressBar::new(args.epochs as u64 + 1) };
    // wide_msg is cut to the terminal's width: the line never wraps on 80 columns.
    bar.set_style(ProgressStyle::with_template("{bar:20} {pos}/{len} {wide_msg}").expect("valid template"));
    bar.set_message(format!("{} members joining over TLS 1.3", args.members()));
    demo.join(args.members()).await?;
    let settle = Duration::from_millis(10 * args.epoch_ms());
    // At the end, time for members whose last rekey was lost to resync over a lossy network.
    let final_settle = settle.max(Duration::from_secs(15));
    demo.in_sync(settle).await;
    bar.inc(1);

    let evict_at = args.epochs / 2;
    let mut evicted: Option<(u64, MemberClient)> = None;
    let (mut tried, mut opened, mut stale_refused) = (0, 0, 0);
    for epoch in 1..=args.epochs {
        let (joins, leaves) = (1 + demo.rng.next_u64() % 8, 1 + demo.rng.next_u64() % 8);
        demo.leave(leaves).await?;
        if epoch == evict_at {
            let id = demo.pick();
            let (_, client, _) = demo.members.remove(&id).expect("picked");
            demo.group.server().evict(keycast_core::MemberId(id)).await;
            evicted = Some((id, client));
        }
        demo.join(joins).await?;
        let synced = demo.in_sync(settle).await;
        if let Some((_, spy)) = &evicted {
            // Every member seals one message; the evicted member tries them all.
            for (_, client, _) in demo.members.values() {
                let message = match client.seal(format!("epoch {epoch}").as_bytes()) {
                    Ok(message) => message,
                    // The controller expired it (its refreshes were lost): it knows it is out.
                    Err(keycast_net::client::ClientError::NotAMember) => continue,
                    // Its rekey was lost: it refuses to seal under the replaced key.
                    Err(_) => {
                        stale_refused += 1;
                        continue;
                    }
                };
                tried += 1;
                opened += usize::from(spy.open(&message).is_ok());
            }
        }
        let stats = demo.group.server().stats();
        bar.set_message(format!("epoch {epoch}: {} members, {synced} in sync, {} rekey bytes so far", demo.members.len(), stats.rekey_bytes));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let joiner = demo.joiner_reads(args.epoch_ms()).await?;
    let members_in_sync = demo.in_sync(final_settle).await;
    let counted: Vec<u64> = demo.group.server().members().await.iter().map(|row| row.member).collect();
    let members_expired = demo.members.keys().filter(|id| !counted.contains(id)).count();
    let stats = demo.group.server().stats();
    let (totals, member_rekeys) = (demo.totals(), demo.member_rekeys());
    Ok(Summary {
        members: demo.members.len(),
        epochs: args.epochs,
        epoch_ms: args.epoch_ms(),
        join_policy: args.join_policy.policy().name(),
        members_in_sync,
        members_expired,
        evicted_can_decrypt: opened > 0,
        evicted_member: evicted.as_ref().map_or(0, |(id, _)| *id),
        messages_tried_by_evicted: tried,
        seals_refused_stale_key: stale_refused,
        rekey_bytes: stats.rekey_bytes,
        rekeys: stats.rekeys,
        loss: args.loss,
        burst: args.burst.unwrap_or(1.0),
        datagrams_lost: totals.lost,
        member_rekeys,
        first_round_recovered: 1.0 - ratio(totals.late_rekeys, member_rekeys),
        keys_late: totals.keys_late,
        fec_recovered: totals.fec_recovered,
        repair_recovered: totals.repair_recovered,
        unicast_resyncs: stats.resyncs + stats.udp_resyncs,
        tls_resyncs: stats.resyncs,
        udp_resyncs: stats.udp_resyncs,
        unicast_resync_fraction: ratio(stats.resyncs + stats.udp_resyncs, member_rekeys),
        udp_requests_dropped: stats.liveness_dropped,
        resyncs_repairs_exhausted: totals.resyncs_repairs_exhausted,
        resyncs_gap: totals.resyncs_gap,
        resyncs_silence: totals.resyncs_silence,
        rho,
        rho_max: args.rho_max,
        rho_final: stats.rho,
        parity_packets: stats.parity_packets,
        repair_rounds: stats.repair_rounds,
        repair_packets: stats.repair_packets,
        member_naks: !args.no_naks,
        naks: stats.naks_received,
        naks_per_rekey: ratio(stats.naks_received, stats.rekeys),
        naks_sent: totals.naks,
        rekey_bytes_sent: stats.rekey_bytes + stats.parity_bytes,
        overhead: 1.0 + ratio(stats.parity_bytes, stats.rekey_bytes),
        overhead_floor: 1.0 / (1.0 - args.loss),
        joins: demo.joins,
        leaves: demo.leaves,
        mean_join_latency_ms: stats.mean_join_latency_ms,
        reflector: args.reflector,
        joiner_first_data_ms: joiner.first_data_ms,
        joiner_key_in_force_ms: joiner.key_in_force_ms,
        seconds: started.elapsed().as_secs_f64(),
    })
}
