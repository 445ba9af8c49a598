//! `keycast demo --scheme distributed-flat`: a group with no controller (Caronni et al.'s
//! distributed flat key management) in one process over real sockets on loopback: signed
//! announcements and presences on a multicast address (interface 127.0.0.1, TTL 1), grants and
//! join requests over mutual TLS between participants. The group is built by joins through
//! introducers found from presences, then rounds of churn (leaves, joins, one eviction). An
//! observer records every announcement; the summary says whether any removed participant,
//! with every key it ever held, derives a TEK the group used after its removal.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use keycast_core::key::{Key, KeyRef};
use keycast_core::protocol::distributed_flat::audit;
use keycast_core::protocol::distributed_flat::Config;
use keycast_core::wire::GroupId;
use keycast_net::distributed::{loopback_setups, wait_agreed, DistributedParticipant, DistributedSetup, Recorder, Traffic};
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};
use serde::Serialize;

use crate::demo::DemoArgs;

pub(crate) const ID_BITS: u8 = 16;
pub(crate) const PRESENCE_MS: u64 = 2_000;
pub(crate) const DEADLINE_MS: u64 = 20_000;
/// How long the group may take to agree after one operation.
pub(crate) const AGREE_WITHIN: Duration = Duration::from_secs(30);

#[derive(Serialize)]
struct Summary {
    members: usize,
    rounds: u32,
    /// The step after which the participants did not agree in time (the churn stopped there).
    stopped: Option<String>,
    joins: usize,
    leaves: usize,
    evictions: usize,
    /// Live participants, settled, at the TEK most of them hold (as the other demos count).
    members_in_sync: usize,
    /// Whether a removed participant derives, from every key it ever held and every recorded
    /// announcement, a TEK of a version after the last it held.
    evicted_can_decrypt: bool,
    removed_checked: usize,
    announcements: u64,
    announcement_bytes: u64,
    private_messages: u64,
    private_bytes: u64,
    private_failed: u64,
    presences: u64,
    presence_bytes: u64,
    /// Means per operation (presences left out).
    per_join: PerOperation,
    per_exclusion: PerOperation,
    seconds: f64,
}

#[derive(Serialize, Default, Clone, Copy)]
struct PerOperation {
    announcements: f64,
    announcement_bytes: f64,
    private_messages: f64,
    private_bytes: f64,
}

pub fn run(args: &DemoArgs) -> Result<(), String> {
    if let Some(summary) = crate::demo::run_quietly(args, demo(args))? {
        if let Some(reason) = &summary.stopped {
            println!("stopped early: {reason}");
        }
        println!(
            "{} participants after {} rounds ({} joins, {} leaves, {} eviction), no controller; {}/{} live participants at the common TEK",
            summary.members,
            summary.rounds,
            summary.joins,
            summary.leaves,
            summary.evictions,
            summary.members_in_sync,
            summary.members
        );
        println!(
            "{} announcements ({} bytes), {} private messages over TLS ({} bytes, {} given up), {} presences ({} bytes), {:.1} s",
            summary.announcements,
            summary.announcement_bytes,
            summary.private_messages,
            summary.private_bytes,
            summary.private_failed,
            summary.presences,
            summary.presence_bytes,
            summary.seconds
        );
        println!(
            "per join: {:.1} announcements, {:.1} private messages, {:.0} bytes; per exclusion: {:.1} announcements, {:.1} private messages, {:.0} bytes",
            summary.per_join.announcements,
            summary.per_join.private_messages,
            summary.per_join.announcement_bytes + summary.per_join.private_bytes,
            summary.per_exclusion.announcements,
            summary.per_exclusion.private_messages,
            summary.per_exclusion.announcement_bytes + summary.per_exclusion.private_bytes
        );
        println!(
            "removed participants that derive a later TEK from all they held and every announcement: {} of {}",
            if summary.evicted_can_decrypt { "some" } else { "none" },
            summary.removed_checked
        );
    }
    Ok(())
}

/// The group: participants by index (live or removed) and what operations cost.
struct Group {
    setups: Vec<DistributedSetup>,
    live: BTreeMap<usize, DistributedParticipant>,
    removed: Vec<DistributedParticipant>,
    next: usize,
    rng: ChaCha8Rng,
    joins: (usize, Traffic),
    exclusions: (usize, Traffic),
}

impl Group {
    fn total(&self) -> Traffic {
        self.live.values().chain(&self.removed).map(DistributedParticipant::traffic).sum()
    }

    async fn agree(&self, after: &str) -> Result<(), String> {
        agree(self.live.values(), after).await
    }

    fn pick(&mut self) -> usize {
        let keys: Vec<usize> = self.live.keys().copied().collect();
        keys[(self.rng.next_u64() % keys.len() as u64) as usize]
    }

    /// A new participant joins through a live participant another one heard the presence of.
    async fn join(&mut self) -> Result<(), String> {
        let before = self.total();
        let index = self.next;
        self.next += 1;
        let heard_by = self.pick();
        let known = self.live[&heard_by].known_introducers();
        let introducer = match known.len() {
            0 => self.live[&heard_by].introducer(),
            n => known[(self.rng.next_u64() % n as u64) as usize].clone(),
        };
        let joined = DistributedParticipant::join(self.setups[index].clone(), &introducer).await.map_err(|e| e.to_string())?;
        self.live.insert(index, joined);
        self.agree(&format!("participant-{index} joined")).await?;
        let after = self.total();
        add(&mut self.joins, before, after);
        Ok(())
    }

    async fn leave(&mut self) -> Result<(), String> {
        let before = self.total();
        let index = self.pick();
        let leaver = self.live.remove(&index).expect("picked");
        leaver.leave().await.map_err(|e| e.to_string())?;
        self.removed.push(leaver);
        self.agree(&format!("participant-{index} left")).await?;
        let after = self.total();
        add(&mut self.exclusions, before, after);
        Ok(())
    }

    async fn evict(&mut self) -> Result<(), String> {
        let before = self.total();
        let index = self.pick();
        let evicted = self.live.remove(&index).expect("picked");
        let excluder = self.pick();
        self.live[&excluder].evict(evicted.status().id).await.map_err(|e| e.to_string())?;
        self.removed.push(evicted);
        self.agree(&format!("participant-{index} was evicted")).await?;
        let after = self.total();
        add(&mut self.exclusions, before, after);
        Ok(())
    }
}

/// Who is not live or not settled, and how many TEK refs the live hold.
/// Waits until the `live` participants agree (roster, TEK, KEKs, settled), or says how they
/// disagree after `AGREE_WITHIN`.
pub(crate) async fn agree<'a>(live: impl Iterator<Item = &'a DistributedParticipant>, after: &str) -> Result<(), String> {
    let live: Vec<&DistributedParticipant> = live.collect();
    match wait_agreed(&live, AGREE_WITHIN).await {
        true => Ok(()),
        false => Err(format!("the participants did not agree within {} s after {after}: {}", AGREE_WITHIN.as_secs(), disagreement(&live))),
    }
}

fn disagreement(live: &[&DistributedParticipant]) -> String {
    let statuses: Vec<_> = live.iter().map(|p| (p.identity().to_string(), p.status())).collect();
    let not_live: Vec<&str> = statuses.iter().filter(|(_, s)| !s.live).map(|(w, _)| w.as_str()).collect();
    let unsettled: Vec<String> = statuses.iter().filter(|(_, s)| s.live && !s.settled).map(|(w, s)| format!("{w} (round open: {}, ID bits whose KEK is awaited: {:?})", s.awaiting.0, s.awaiting.1)).collect();
    let teks: std::collections::BTreeSet<_> = statuses.iter().map(|(_, s)| s.tek).collect();
    let rosters: std::collections::BTreeSet<usize> = statuses.iter().map(|(_, s)| s.roster.len()).collect();
    let keks = if keycast_net::distributed::keks_agree(live) { "agree" } else { "disagree" };
    format!("not live {not_live:?}, not settled {unsettled:?}, TEKs {teks:?}, roster sizes {rosters:?}, KEKs {keks}, for {} participants", live.len())
}

/// Adds what one operation sent (`after` - `before`) to `(count, sum)`.
fn add((count, sum): &mut (usize, Traffic), before: Traffic, after: Traffic) {
    *count += 1;
    sum.announcements += after.announcements - before.announcements;
    sum.announcement_bytes += after.announcement_bytes - before.announcement_bytes;
    sum.private += after.private - before.private;
    sum.private_bytes += after.private_bytes - before.private_bytes;
}

fn mean((count, sum): (usize, Traffic)) -> PerOperation {
    let n = count.max(1) as f64;
    PerOperation {
        announcements: sum.announcements as f64 / n,
        announcement_bytes: sum.announcement_bytes as f64 / n,
        private_messages: sum.private as f64 / n,
        private_bytes: sum.private_bytes as f64 / n,
    }
}

async fn demo(args: &DemoArgs) -> Result<Summary, String> {
    let started = Instant::now();
    let members = args.members() as usize;
    let config = Config { group: GroupId(1), id_bits: ID_BITS, settle_ms: args.settle_ms };
    let capacity = members + 3 * args.epochs as usize + 1;
    let setups = loopback_setups(config, capacity, PRESENCE_MS, DEADLINE_MS).map_err(|e| e.to_string())?;
    let recorder = Recorder::start(&setups[0].multicast).map_err(|e| e.to_string())?;
    let first = DistributedParticipant::create(setups[0].clone()).await.map_err(|e| e.to_string())?;
    let mut group = Group {
        setups,
        live: BTreeMap::from([(0, first)]),
        removed: Vec::new(),
        next: 1,
        rng: ChaCha8Rng::seed_from_u64(args.seed),
        joins: (0, Traffic::default()),
        exclusions: (0, Traffic::default()),
    };
    let bar = if args.json { ProgressBar::hidden() } else { ProgressBar::new(members as u64 + args.epochs as u64) };
    bar.set_style(ProgressStyle::with_template("{bar:20} {pos}/{len} {wide_msg}").expect("valid template"));
    bar.set_message(format!("{members} participants joining through each other over TLS 1.3"));
    bar.inc(1);
    // A step the group does not agree after ends the churn: the summary reports it and what
    // the participants hold then.
    let (mut leaves, mut evictions) = (0, 0);
    let churn = async {
        for _ in 1..members {
            group.join().await?;
            bar.inc(1);
        }
        for round in 1..=args.epochs {
            bar.set_message(format!("round {round}: leaves, joins{}", if round == args.epochs / 2 { ", an eviction" } else { "" }));
            for _ in 0..1 + group.rng.next_u64() % 3 {
                if group.live.len() > 2 {
                    leaves += 1;
                    group.leave().await?;
                }
            }
            if round == args.epochs / 2 {
                evictions += 1;
                group.evict().await?;
            }
            for _ in 0..1 + group.rng.next_u64() % 3 {
                group.join().await?;
            }
            bar.inc(1);
        }
        Ok::<(), String>(())
    };
    let stopped = churn.await.err();
    bar.finish_and_clear();
    let recorded = recorder.announcements();
    let total = group.total();
    Ok(Summary {
        members: group.live.len(),
        rounds: args.epochs,
        stopped,
        joins: group.joins.0,
        leaves,
        evictions,
        members_in_sync: in_sync(group.live.values()),
        evicted_can_decrypt: group.removed.iter().any(|gone| derives_later_tek(gone, &group, &recorded)),
        removed_checked: group.removed.len(),
        announcements: total.announcements,
        announcement_bytes: total.announcement_bytes,
        private_messages: total.private,
        private_bytes: total.private_bytes,
        private_failed: total.private_failed,
        presences: total.presences,
        presence_bytes: total.presence_bytes,
        per_join: mean(group.joins),
        per_exclusion: mean(group.exclusions),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Live participants, settled, holding the TEK most of them hold.
pub(crate) fn in_sync<'a>(live: impl Iterator<Item = &'a DistributedParticipant>) -> usize {
    let teks: Vec<Option<(KeyRef, Key)>> = live.map(|p| p.tek().filter(|_| p.status().settled)).collect();
    teks.iter().flatten().map(|t| teks.iter().filter(|o| o.as_ref() == Some(t)).count()).max().unwrap_or(0)
}

/// Whether `gone`, with every key it ever held and the recorded announcements, derives a TEK
/// some live participant held, of a version after the last TEK `gone` held.
fn derives_later_tek(gone: &DistributedParticipant, group: &Group, recorded: &[Vec<u8>]) -> bool {
    let group_teks: BTreeMap<KeyRef, Key> = group.live.values().flat_map(|p| p.ever_held()).filter(|(r, _)| r.id.0 == 0).collect();
    audit::derives_later_tek(&gone.ever_held(), &group_teks, recorded)
}
