//! `keycast demo --controller-dies`: Caronni et al.'s transition from centralized flat to
//! distributed flat (figure 6) over real sockets on loopback. A controller runs a flat table
//! (16-bit IDs) for its members (MemberClients over TLS and multicast); after some traffic the
//! controller is killed for good, and every member continues as a distributed flat
//! participant from the TEK and KEKs it holds and its flat ID. The group then admits a
//! newcomer, evicts one participant and lets one leave, with no controller. Last, the way back
//! (figure 6 again): one participant is appointed controller and collects the table; every
//! other participant but one hands its keys back over the mutual TLS channel, a new controller
//! starts from the collected table, the one that did not hand back is out, and the members
//! follow the new controller's rekeys as centralized flat members.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use keycast_core::key::{Key, KeyRef};
use keycast_core::protocol::distributed_flat::handback::Handback;
use keycast_core::protocol::distributed_flat::{audit, Config};
use keycast_core::protocol::member::FlatShares;
use keycast_core::wire::GroupId;
use keycast_core::{FlatIds, GraphConfig, JoinPolicy, KeyRing, Scheme};
use keycast_net::client::MemberClient;
use keycast_net::distributed::{setups_of, start_log_from, DistributedParticipant, Recorder, Traffic};
use keycast_net::local::{loopback_policy, LocalGroup};
use serde::Serialize;

use crate::demo::DemoArgs;
use crate::demo_distributed::{agree, in_sync, AGREE_WITHIN, DEADLINE_MS, ID_BITS, PRESENCE_MS};

const EPOCH_MS: u64 = 200;
/// Longest a handover waits for the whole group's handovers.
const HANDOVER_WITHIN: Duration = Duration::from_secs(20);

#[derive(Serialize)]
struct Summary {
    /// Members of the centralized group when its controller was killed (one of those that
    /// joined left before).
    centralized_members: usize,
    /// The TEK version the members held then, and the one in force at the end.
    tek_version_at_handover: u32,
    tek_version_at_end: u32,
    /// Participants every participant listed after the handover.
    handed_over: usize,
    /// The step after which the participants did not agree in time (the demo stopped there).
    stopped: Option<String>,
    /// Live participants at the end, and how many are settled at the TEK most of them hold.
    members: usize,
    members_in_sync: usize,
    /// Whether the evicted participant, or the one that left, derives a TEK made after its
    /// removal from every key it held as a participant and every recorded announcement.
    evicted_can_decrypt: bool,
    left_can_decrypt: bool,
    /// Whether the killed controller's table (every member's keys at the handover) derives
    /// the TEK in force at the end: it cannot be expelled (figure 6's consequence).
    old_controller_reads_later_tek: bool,
    /// What the handover sent (signed announcements, each sent four times), and the three
    /// operations after it. The handover ends once a participant lists the whole group (or
    /// after `HANDOVER_WITHIN`): `handover_seconds` is how long that took.
    handover: Cost,
    join: Cost,
    eviction: Cost,
    leave: Cost,
    /// The way back: participants whose handback the appointed one took (itself included),
    /// and what their handbacks sent.
    handed_back: usize,
    handback: Cost,
    /// Whether the participant that did not hand back holds, or derives with the new
    /// controller's removal rekeys, the TEK the new controller starts with.
    holdout_reads_controller_tek: bool,
    /// Members of the new controller's group at the end (after one left and one joined under
    /// it), and how many hold its TEK; the TEK versions it started at and ended at.
    recentralized_members: usize,
    recentralized_in_sync: usize,
    recentralized_tek_versions: (u32, u32),
    handover_seconds: f64,
    /// How long the members took to start as participants (each handover window opens then).
    conversion_seconds: f64,
    seconds: f64,
}

#[derive(Serialize, Default, Clone, Copy)]
struct Cost {
    announcements: u64,
    announcement_bytes: u64,
    private_messages: u64,
    private_bytes: u64,
}

fn cost(before: Traffic, after: Traffic) -> Cost {
    Cost {
        announcements: after.announcements - before.announcements,
        announcement_bytes: after.announcement_bytes - before.announcement_bytes,
        private_messages: after.private - before.private,
        private_bytes: after.private_bytes - before.private_bytes,
    }
}

pub fn run(args: &DemoArgs) -> Result<(), String> {
    if let Some(s) = crate::demo::run_quietly(args, demo(args))? {
        if let Some(reason) = &s.stopped {
            println!("stopped early: {reason}");
        }
        println!(
            "controller killed with {} members at TEK version {}; {} handed over as distributed flat participants in {:.1} s ({} announcements, {} bytes)",
            s.centralized_members, s.tek_version_at_handover, s.handed_over, s.handover_seconds, s.handover.announcements, s.handover.announcement_bytes
        );
        println!(
            "then a join, an eviction and a leave with no controller: {}/{} live participants at the common TEK (version {})",
            s.members_in_sync, s.members, s.tek_version_at_end
        );
        println!(
            "evicted participant derives a later TEK: {}; the one that left: {}; the killed controller's table: {} (it cannot be expelled)",
            s.evicted_can_decrypt, s.left_can_decrypt, s.old_controller_reads_later_tek
        );
        println!(
            "back to a controller: {} participants handed back ({} private messages, {} bytes); the one that did not reads the new controller's TEK: {}",
            s.handed_back, s.handback.private_messages, s.handback.private_bytes, s.holdout_reads_controller_tek
        );
        println!(
            "under the new controller, after a leave and a join: {}/{} members at its TEK (versions {} to {})",
            s.recentralized_in_sync, s.recentralized_members, s.recentralized_tek_versions.0, s.recentralized_tek_versions.1
        );
        println!("{:.1} s in all", s.seconds);
    }
    Ok(())
}

async fn demo(args: &DemoArgs) -> Result<Summary, String> {
    let started = Instant::now();
    let count = args.members() as usize;
    if count < 4 {
        return Err("--controller-dies needs at least 4 members (one is evicted, one leaves)".into());
    }
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut policy = loopback_policy(GroupId(1));
    policy.graph = GraphConfig { scheme: Scheme::Flat { id_bits: ID_BITS, ids: FlatIds::Sequential }, join_policy: JoinPolicy::Revision };
    policy.epoch_ms = EPOCH_MS;
    policy.heartbeat_ms = EPOCH_MS / 4;
    let mut group = LocalGroup::start(policy, count, dir.path().to_path_buf()).await.map_err(|e| e.to_string())?;
    let names: Vec<String> = (1..=count).map(|i| format!("member-{i}")).collect();
    let members = group.join_all(names.clone()).await.map_err(|e| e.to_string())?;
    let mut clients: Vec<MemberClient> = members.into_iter().map(|(client, _)| client).collect();
    // An epoch or two of traffic under the controller, and one leave (a new TEK version and
    // replaced KEKs), then every member at one TEK.
    let leaver = clients.pop().expect("members");
    leaver.leave().await.map_err(|e| e.to_string())?;
    let count = clients.len();
    for n in 0..2 {
        let _ = clients[n % count].send(format!("before the controller dies {n}").as_bytes()).await;
        tokio::time::sleep(Duration::from_millis(EPOCH_MS)).await;
    }
    let shares = one_tek(&clients).await?;
    let sizes: Vec<usize> = clients.iter().map(|c| c.group_size() as usize).collect();
    group.kill_server().await;
    drop(clients);

    let tek_version_at_handover = shares[0].keys[0].0.version;
    let controller_table: BTreeMap<KeyRef, Key> = shares.iter().flat_map(|s| s.keys.iter().cloned()).collect();
    let config = Config { group: GroupId(1), id_bits: ID_BITS, settle_ms: args.settle_ms };
    let mut all_names = names[..count].to_vec();
    all_names.push("newcomer".into());
    let setups = setups_of(&group.authority, &all_names, config, PRESENCE_MS, DEADLINE_MS).map_err(|e| e.to_string())?;
    let recorder = Recorder::start(&setups[0].multicast).map_err(|e| e.to_string())?;
    // All at once: a member's handover window opens when it converts, and one that converts
    // after another's window closed is not listed by it.
    let handover_started = Instant::now();
    // Each member's handover ends once it lists the whole group (by the controller's last
    // heartbeat), or after the bound.
    let within_ms = HANDOVER_WITHIN.as_millis() as u64;
    let conversions: Vec<_> = shares
        .into_iter()
        .enumerate()
        .map(|(i, s)| tokio::spawn(DistributedParticipant::from_centralized_group(setups[i].clone(), s.id, s.keys, sizes[i], within_ms)))
        .collect();
    let mut live = BTreeMap::new();
    for (i, conversion) in conversions.into_iter().enumerate() {
        live.insert(i, conversion.await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?);
    }
    let conversion_seconds = handover_started.elapsed().as_secs_f64();
    let mut run = Run { live, removed: BTreeMap::new(), before: Traffic::default() };
    let mut costs = [Cost::default(); 4];
    let mut handed_over = 0;
    let steps = async {
        run.agree("the handover").await?;
        handed_over = run.live[&0].status().roster.len();
        let handover_seconds = handover_started.elapsed().as_secs_f64();
        // Each handover goes out again at a quarter, half and three quarters of the settle
        // time (for members that convert late): counted with the handover, not the next step.
        tokio::time::sleep_until((handover_started + Duration::from_millis(args.settle_ms * 3 / 4 + 50)).into()).await;
        costs[0] = run.step_cost();
        let introducer = run.live[&0].introducer();
        let newcomer = DistributedParticipant::join(setups[count].clone(), &introducer).await.map_err(|e| e.to_string())?;
        run.live.insert(count, newcomer);
        run.agree("the newcomer joined").await?;
        costs[1] = run.step_cost();
        let evicted = run.live.remove(&(count / 2)).expect("a member");
        run.live[&1].evict(evicted.status().id).await.map_err(|e| e.to_string())?;
        run.removed.insert("evicted", evicted);
        run.agree("the eviction").await?;
        costs[2] = run.step_cost();
        let leaver = run.live.remove(&2).expect("a member");
        leaver.leave().await.map_err(|e| e.to_string())?;
        run.removed.insert("left", leaver);
        run.agree("the leave").await?;
        costs[3] = run.step_cost();
        Ok::<f64, String>(handover_seconds)
    };
    let (handover_seconds, stopped) = match steps.await {
        Ok(seconds) => (seconds, None),
        Err(reason) => (handover_started.elapsed().as_secs_f64(), Some(reason)),
    };
    let recorded = recorder.announcements();
    let group_teks: BTreeMap<KeyRef, Key> = run.live.values().flat_map(|p| p.ever_held()).filter(|(r, _)| r.id.0 == 0).collect();
    let removed_reads = |which: &str| run.removed.get(which).is_some_and(|gone| audit::derives_later_tek(&gone.ever_held(), &group_teks, &recorded));
    let in_force = run.live.values().find_map(|p| p.tek()).map_or(0, |(r, _)| r.version);
    let (evicted_can_decrypt, left_can_decrypt) = (removed_reads("evicted"), removed_reads("left"));
    let old_controller_reads_later_tek = audit::derives_later_tek(&controller_table, &group_teks, &recorded);
    let (members, members_in_sync) = (run.live.len(), in_sync(run.live.values()));
    let back = match &stopped {
        None => hand_back(&mut group, &mut run, dir.path(), &names[count]).await?,
        Some(_) => Back::default(),
    };
    Ok(Summary {
        handed_back: back.handed_back,
        handback: back.cost,
        holdout_reads_controller_tek: back.holdout_reads_controller_tek,
        recentralized_members: back.members,
        recentralized_in_sync: back.in_sync,
        recentralized_tek_versions: back.tek_versions,
        centralized_members: count,
        tek_version_at_handover,
        tek_version_at_end: in_force,
        handed_over,
        stopped,
        members,
        members_in_sync,
        evicted_can_decrypt,
        left_can_decrypt,
        old_controller_reads_later_tek,
        handover: costs[0],
        join: costs[1],
        eviction: costs[2],
        leave: costs[3],
        handover_seconds,
        conversion_seconds,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Participants by index, the removed ones by what removed them, and the traffic at the last step.
struct Run {
    live: BTreeMap<usize, DistributedParticipant>,
    removed: BTreeMap<&'static str, DistributedParticipant>,
    before: Traffic,
}

impl Run {
    async fn agree(&self, after: &str) -> Result<(), String> {
        agree(self.live.values(), after).await
    }

    /// What every participant sent since the last step.
    fn step_cost(&mut self) -> Cost {
        let total: Traffic = self.live.values().chain(self.removed.values()).map(DistributedParticipant::traffic).sum();
        let step = cost(self.before, total);
        self.before = total;
        step
    }
}

/// What the way back to a controller gave.
#[derive(Default)]
struct Back {
    handed_back: usize,
    cost: Cost,
    holdout_reads_controller_tek: bool,
    members: usize,
    in_sync: usize,
    tek_versions: (u32, u32),
}

/// Participant 0 is appointed and collects the table; every other live participant but the
/// last hands back; a new controller starts from the table on the old one's address; the
/// members that handed back join it (it knows them: they get their keys at once); then one
/// of them leaves and a former member joins, and every member must follow those rekeys.
async fn hand_back(group: &mut LocalGroup, run: &mut Run, dir: &std::path::Path, former: &str) -> Result<Back, String> {
    let appointed = run.live.values().next().ok_or("no participant left")?;
    appointed.collect_table().await.map_err(|e| e.to_string())?;
    let (_, holdout) = run.live.iter().next_back().ok_or("no participant left")?;
    for participant in run.live.values().filter(|p| p.identity() != appointed.identity() && p.identity() != holdout.identity()) {
        if !participant.hand_back(appointed.identity()).await.map_err(|e| e.to_string())? {
            return Err(format!("{}'s handback was not taken", participant.identity()));
        }
    }
    let sent: Traffic = run.live.values().chain(run.removed.values()).map(DistributedParticipant::traffic).sum();
    let cost = cost(run.before, sent);
    let handback = appointed.finish_collection(JoinPolicy::Revision).await.map_err(|e| e.to_string())?;
    let holdout_reads_controller_tek = reads_controller_tek(&holdout.ever_held(), &handback);
    let start_tek = handback.graph.group_key().0;
    group.kill_server().await;
    group.policy.graph = GraphConfig { scheme: Scheme::Flat { id_bits: ID_BITS, ids: FlatIds::FromMemberId }, join_policy: JoinPolicy::Revision };
    group.database = dir.join("taken-back.redb");
    let members = start_log_from(&handback, &group.policy, &group.database, group.database_key.clone()).map_err(|e| e.to_string())?;
    group.acl.extend(members.iter().map(|(_, who)| who.clone()));
    group.start_server().await.map_err(|e| e.to_string())?;
    run.live.clear();
    let mut clients = Vec::with_capacity(members.len());
    for (_, who) in &members {
        clients.push(group.join(who).await.map_err(|e| format!("{who} rejoining the new controller: {e}"))?.0);
    }
    let leaver = clients.pop().ok_or("no member handed back")?;
    leaver.leave().await.map_err(|e| e.to_string())?;
    let (former, _) = group.join(former).await.map_err(|e| e.to_string())?;
    clients.push(former);
    let end_tek = one_tek_after(&clients, start_tek.version).await?;
    let in_sync = clients.iter().filter(|c| c.getkey().map(|(r, _)| r) == Some(end_tek)).count();
    Ok(Back { handed_back: handback.members.len(), cost, holdout_reads_controller_tek, members: clients.len(), in_sync, tek_versions: (start_tek.version, end_tek.version) })
}

/// The TEK every member holds once all hold one of a version above `version`, waiting for it.
async fn one_tek_after(clients: &[MemberClient], version: u32) -> Result<KeyRef, String> {
    let deadline = Instant::now() + AGREE_WITHIN;
    loop {
        let teks: Option<Vec<KeyRef>> = clients.iter().map(|c| c.getkey().map(|(r, _)| r)).collect();
        if let Some(tek) = teks.filter(|t| t.iter().all(|r| *r == t[0] && r.version > version)).map(|t| t[0]) {
            return Ok(tek);
        }
        if Instant::now() > deadline {
            return Err(format!("the members did not follow the new controller's rekeys within {} s", AGREE_WITHIN.as_secs()));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Whether `keys` (everything a participant held) open the new controller's TEK, with the
/// wraps of the rekeys that removed the participants that did not hand back.
fn reads_controller_tek(keys: &BTreeMap<KeyRef, Key>, handback: &Handback) -> bool {
    let mut ring = KeyRing::new();
    keys.iter().for_each(|(r, k)| ring.insert(*r, k.clone()));
    let wraps: Vec<_> = handback.rekeys.iter().flat_map(|plan| plan.wraps.iter()).collect();
    let _ = ring.absorb(wraps.iter().copied());
    ring.holds(handback.graph.group_key().0)
}

/// Every member's flat ID, ID bits and keys once all hold the same TEK, waiting for it.
async fn one_tek(clients: &[MemberClient]) -> Result<Vec<FlatShares>, String> {
    let deadline = Instant::now() + AGREE_WITHIN;
    loop {
        let shares: Option<Vec<_>> = clients.iter().map(MemberClient::flat_shares).collect();
        if let Some(shares) = shares.filter(|s| s.iter().all(|one| one.id_bits == ID_BITS && one.keys[0] == s[0].keys[0])) {
            return Ok(shares);
        }
        if Instant::now() > deadline {
            return Err(format!("the members did not reach one TEK within {} s under the controller", AGREE_WITHIN.as_secs()));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

