//! `keycast demo --relays R`: a two-level hierarchy in one process over real sockets on
//! loopback: a top group and R subgroups, each under a relay with a standby. Churn in every
//! group, one eviction, relay 1 killed and replaced by its standby, data sent from every
//! group. The summary counts the whole logical group.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use keycast_core::protocol::traffic::{rewrap, seal, Fresh, WrapKey};
use keycast_core::wire::{Data, GroupId};
use keycast_core::{Key, KeyId, KeyRef, MemberId};
use keycast_net::client::{ClientEvent, MemberClient};
use keycast_net::local::{loopback_policy, Events, LocalGroup};
use keycast_net::relay::{Relay, Standby};
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};
use serde::Serialize;

use crate::demo::DemoArgs;

const TOP: u64 = 1;
/// How long members may take to reach their controller's key, and data to arrive.
const SETTLE: Duration = Duration::from_secs(15);
/// The standby's wait per place in line (it is first: it never waits).
const BACK_OFF_MS: u64 = 2_000;

#[derive(Serialize)]
struct Summary {
    subgroups: usize,
    members: usize,
    epochs: u32,
    joins: usize,
    leaves: usize,
    members_in_sync: usize,
    evicted_can_decrypt: bool,
    messages_tried_by_evicted: usize,
    relay_failovers: usize,
    failover_ms: u64,
    messages_lost_in_failover: usize,
    cross_subgroup_delivered: usize,
    cross_subgroup_expected: usize,
    relay_hop_us: f64,
    seconds: f64,
}

type Member = (MemberClient, Events);

/// One group of the hierarchy (level 0: the top) and its members.
struct Level {
    group: LocalGroup,
    members: Vec<Member>,
    next_identity: usize,
    relay: Option<Relay>,
    standby: Option<Standby>,
}

impl Level {
    /// The key in force at this level's controller: the top's, its relay's, or the standby's
    /// that took over (the relay stepped down or was killed).
    fn active_key(&self) -> Option<String> {
        match (&self.relay, &self.standby) {
            (Some(relay), _) if !relay.stepped_down() => Some(relay.server.stats().active_key),
            (Some(_), Some(standby)) => standby.active().map(|t| t.relay.server.stats().active_key),
            (Some(_), None) => None,
            (None, Some(standby)) => standby.active().map(|t| t.relay.server.stats().active_key),
            (None, None) => self.group.server.as_ref().map(|s| s.stats().active_key),
        }
    }

    fn in_sync(&self) -> usize {
        let wanted = self.active_key();
        self.members.iter().filter(|(m, _)| m.getkey().map(|k| k.0.to_string()) == wanted).count()
    }

    async fn join(&mut self, count: usize) -> Result<(), String> {
        // After a take-over (a loaded host may ring a standby's alarm before the kill), new
        // members join the standby.
        if let Some(took_over) = self.standby.as_ref().and_then(Standby::active) {
            self.group.controller_moved_to(took_over.relay.server.addr);
        }
        let names: Vec<String> = (0..count).map(|i| format!("member-{}", self.next_identity + i + 1)).collect();
        self.next_identity += count;
        self.members.extend(self.group.join_all(names).await.map_err(|e| e.to_string())?);
        Ok(())
    }
}

pub fn run(args: &DemoArgs, relays: u16) -> Result<(), String> {
    if let Some(summary) = crate::demo::run_quietly(args, demo(args, relays))? {
        println!(
            "{} members in a top group and {} subgroups after {} epochs ({} joins, {} leaves, 1 eviction); {} at their controller's key",
            summary.members, summary.subgroups, summary.epochs, summary.joins, summary.leaves, summary.members_in_sync
        );
        println!(
            "relay 1 killed: its standby took over and every member of its subgroup held the new key in force after {} ms; {} messages from the top lost in its subgroup meanwhile",
            summary.failover_ms, summary.messages_lost_in_failover
        );
        println!(
            "data from every group: {}/{} deliveries across groups; one relay hop's re-wrap {:.2} µs; the evicted member opened {} of {} messages sealed after its eviction",
            summary.cross_subgroup_delivered,
            summary.cross_subgroup_expected,
            summary.relay_hop_us,
            if summary.evicted_can_decrypt { "some" } else { "none" },
            summary.messages_tried_by_evicted
        );
    }
    Ok(())
}

fn policy(group: u64, epoch_ms: u64) -> keycast_core::protocol::GroupPolicy {
    let mut policy = loopback_policy(GroupId(group));
    // Heartbeats every half epoch, at least 100 ms: the alive alarm (three of them silent) must
    // not ring while hundreds of members in this one process keep a busy host busier.
    (policy.epoch_ms, policy.heartbeat_ms) = (epoch_ms, (epoch_ms / 2).max(100));
    policy
}

/// Starts the top controller, then each relay and its standby.
async fn build(args: &DemoArgs, relays: u16, folder: &std::path::Path) -> Result<Vec<Level>, String> {
    let err = |e: keycast_net::local::LocalError| e.to_string();
    let size = args.members() as usize;
    let mut top = LocalGroup::prepare(policy(TOP, args.epoch_ms()), size, folder.join("top")).map_err(err)?;
    top.policy.refresh_timeout_ms = 8 * args.epoch_ms();
    for r in 1..=relays {
        top.acl.extend([format!("relay-{r}"), format!("relay-{r}-standby-1")]);
    }
    std::fs::create_dir_all(folder.join("top")).map_err(|e| e.to_string())?;
    top.start_server().await.map_err(err)?;
    let mut levels = Vec::new();
    for r in 1..=relays {
        let dir = folder.join(format!("sub-{r}"));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let mut group = LocalGroup::prepare(policy(TOP + u64::from(r), args.epoch_ms()), size, dir).map_err(err)?;
        group.add_standby().map_err(err)?;
        let relay = group.start_relay(top.member_setup(&format!("relay-{r}")).map_err(err)?).await.map_err(err)?;
        let standby = group.start_standby(1, top.member_setup(&format!("relay-{r}-standby-1")).map_err(err)?, BACK_OFF_MS).await.map_err(err)?;
        levels.push(Level { group, members: Vec::new(), next_identity: 0, relay: Some(relay), standby: Some(standby) });
    }
    levels.insert(0, Level { group: top, members: Vec::new(), next_identity: 0, relay: None, standby: None });
    Ok(levels)
}

async fn until_in_sync(levels: &[Level], within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let count: usize = levels.iter().map(Level::in_sync).sum();
        if count == levels.iter().map(|l| l.members.len()).sum::<usize>() || Instant::now() > deadline {
            return count;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Payloads each member has queued, drained.
fn drain(events: &mut Events) -> Vec<Vec<u8>> {
    let mut data = Vec::new();
    while let Ok(event) = events.try_recv() {
        if let ClientEvent::Data(bytes) = event {
            data.push(bytes);
        }
    }
    data
}

async fn demo(args: &DemoArgs, relays: u16) -> Result<Summary, String> {
    let started = Instant::now();
    let folder = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut levels = build(args, relays, folder.path()).await?;
    let per_level = (args.members() as usize / levels.len()).max(3);
    for level in &mut levels {
        level.join(per_level).await?;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let (mut joins, mut leaves) = (per_level * levels.len(), 0);
    for _ in 0..args.epochs {
        for level in &mut levels {
            level.join(1).await?;
            let leaver = 1 + (rng.next_u64() % (level.members.len() as u64 - 1)) as usize;
            let (client, _) = level.members.remove(leaver);
            client.leave().await.map_err(|e| e.to_string())?;
            (joins, leaves) = (joins + 1, leaves + 1);
        }
        tokio::time::sleep(Duration::from_millis(args.epoch_ms())).await;
    }
    // One eviction in the last subgroup; it keeps its client to try what is sent after.
    let last = levels.len() - 1;
    let (evicted, _) = levels[last].members.remove(1);
    let relay = levels[last].relay.as_ref().expect("not killed");
    relay.server.evict(evicted.member()).await;
    let evicted_channel = keycast_net::multicast::receiver(&levels[last].group.multicast).map_err(|e| e.to_string())?;
    until_in_sync(&levels, SETTLE).await;

    let (failover_ms, lost) = fail_over(&mut levels).await?;
    let members_in_sync = until_in_sync(&levels, SETTLE).await;
    tokio::time::sleep(Duration::from_millis(args.epoch_ms())).await;

    // Data from every group: one message from the first member of each level.
    for level in &mut levels {
        level.members.iter_mut().for_each(|(_, events)| drop(drain(events)));
    }
    for (i, level) in levels.iter().enumerate() {
        level.members[0].0.send(format!("from level {i}").as_bytes()).await.map_err(|e| e.to_string())?;
    }
    tokio::time::sleep(Duration::from_millis(500 + 2 * args.epoch_ms())).await;
    let (mut delivered, mut expected) = (0, 0);
    for (i, level) in levels.iter_mut().enumerate() {
        for (_, events) in &mut level.members {
            let got: BTreeSet<Vec<u8>> = drain(events).into_iter().collect();
            let others = (0..=relays as usize).filter(|j| *j != i).map(|j| format!("from level {j}").into_bytes());
            for other in others {
                expected += 1;
                delivered += usize::from(got.contains(&other));
            }
        }
    }
    let tried = evicted_tries(&evicted, &evicted_channel);
    Ok(Summary {
        subgroups: relays as usize,
        members: levels.iter().map(|l| l.members.len()).sum(),
        epochs: args.epochs,
        joins,
        leaves,
        members_in_sync,
        evicted_can_decrypt: tried.1 > 0,
        messages_tried_by_evicted: tried.0,
        relay_failovers: levels.iter().filter(|l| l.standby.as_ref().is_some_and(|s| s.active().is_some())).count(),
        failover_ms,
        messages_lost_in_failover: lost,
        cross_subgroup_delivered: delivered,
        cross_subgroup_expected: expected,
        relay_hop_us: relay_hop_us(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Kills relay 1; a top member sends every 50 ms until every member of relay 1's subgroup
/// holds its new controller's key in force (checked every 10 ms). The time from the kill to
/// that, and the top's messages some member of the subgroup never opened.
async fn fail_over(levels: &mut [Level]) -> Result<(u64, usize), String> {
    for (_, events) in &mut levels[1].members {
        drain(events);
    }
    let killed = Instant::now();
    levels[1].relay.take().expect("relay 1 runs").kill().await;
    let mut sent = Vec::new();
    let deadline = killed + SETTLE;
    let mut next_send = killed;
    loop {
        if Instant::now() >= next_send {
            let message = format!("top during fail-over {}", sent.len()).into_bytes();
            levels[0].members[0].0.send(&message).await.map_err(|e| e.to_string())?;
            sent.push(message);
            next_send += Duration::from_millis(50);
        }
        let level = &levels[1];
        let took_over = level.standby.as_ref().and_then(Standby::active).is_some();
        if took_over && level.in_sync() == level.members.len() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let failover_ms = killed.elapsed().as_millis() as u64;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut missed = BTreeSet::new();
    for (_, events) in &mut levels[1].members {
        let got: BTreeSet<Vec<u8>> = drain(events).into_iter().collect();
        missed.extend(sent.iter().filter(|m| !got.contains(*m)).cloned());
    }
    Ok((failover_ms, missed.len()))
}

/// Data messages heard on the evicted member's channel since its eviction, and how many it
/// opened.
fn evicted_tries(evicted: &MemberClient, channel: &tokio::net::UdpSocket) -> (usize, usize) {
    let mut buf = vec![0u8; 65_536];
    let (mut tried, mut opened) = (0, 0);
    while let Ok((len, _)) = channel.try_recv_from(&mut buf) {
        if Data::decode(&buf[..len]).is_ok() {
            tried += 1;
            opened += usize::from(evicted.open(&buf[..len]).is_ok());
        }
    }
    (tried, opened)
}

/// Mean time of one relay hop's crypto (unwrap and re-wrap of a message key), over 20,000.
fn relay_hop_us() -> f64 {
    let key = |group: u64| WrapKey::derive(GroupId(group), KeyRef::new(KeyId(1), 1, 0), &Key::from_bytes([group as u8; 32]));
    let (from, to) = (key(1), key(2));
    let message = seal((GroupId(1), MemberId(1), 1), &from, Fresh { message_key: [7; 32], nonce: [1; 12] }, &[0u8; 1200]).expect("seal");
    const HOPS: u32 = 20_000;
    let started = Instant::now();
    for _ in 0..HOPS {
        std::hint::black_box(rewrap(message.clone(), &from, &to, [2; 12]).expect("rewrap"));
    }
    started.elapsed().as_secs_f64() * 1e6 / f64::from(HOPS)
}
