//! `keycast demo`: a controller and its members in one process, under churn.
//!
//! Until the networked system exists, the rekeys travel in memory: every member applies the
//! same group-oriented messages a multicast would carry, and an evicted member is watched to
//! show it cannot derive any group key made after its eviction.

use std::collections::BTreeMap;

use clap::Args;
use keycast_core::strategy::{package, package_size};
use keycast_core::{
    Batch, BatchSeed, GraphConfig, RekeyPlan, JoinPolicy, KeyGraph, KeyRing, MemberId, MemberKeys, Scheme, Strategy,
};
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

#[derive(Args)]
pub struct DemoArgs {
    /// Members at the start.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(2..=100_000))]
    members: u64,
    /// Epochs of churn after the group is built.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(1..=1000))]
    epochs: u32,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

struct Demo {
    graph: Box<dyn KeyGraph>,
    members: BTreeMap<MemberId, MemberKeys>,
    next_member: u64,
    seed: BatchSeed,
    rekey_bytes: usize,
    joins: usize,
    leaves: usize,
}

impl Demo {
    /// Runs one epoch's batch and delivers its rekey to every member.
    fn epoch(&mut self, joins: usize, leaves: Vec<MemberId>) -> Result<(RekeyPlan, usize), String> {
        let joins: Vec<MemberId> = (self.next_member..self.next_member + joins as u64).map(MemberId).collect();
        self.next_member += joins.len() as u64;
        self.joins += joins.len();
        self.leaves += leaves.len();
        for m in &leaves {
            self.members.remove(m);
        }
        self.seed = self.seed.next();
        let plan = self.graph.apply(&Batch { joins, leaves }, &self.seed).map_err(|e| e.to_string())?;
        for welcome in &plan.welcomes {
            self.members.insert(welcome.member, MemberKeys::from_welcome(welcome));
        }
        let messages = package(&plan, Strategy::GroupOriented);
        let bytes = package_size(&messages).bytes;
        self.rekey_bytes += bytes;
        for state in self.members.values_mut() {
            // A member that cannot follow would resync over the unicast channel; here it
            // keeps its old keys and shows as out of sync in the report.
            let _ = state.apply(&messages);
        }
        Ok((plan, bytes))
    }

    fn in_sync(&self) -> usize {
        let (group_ref, group_key) = self.graph.group_key();
        self.members
            .values()
            .filter(|m| m.group_key().is_some_and(|(r, k)| r == group_ref && k == *group_key))
            .count()
    }
}

pub fn run(args: &DemoArgs) -> Result<(), String> {
    let config = GraphConfig { scheme: Scheme::Tree { degree: 4 }, join_policy: JoinPolicy::NewVersion };
    let mut seed = BatchSeed::from_u64(args.seed);
    let graph = keycast_core::new_graph(config, &seed).map_err(|e| e.to_string())?;
    seed = seed.next();
    let mut demo = Demo { graph, members: BTreeMap::new(), next_member: 0, seed, rekey_bytes: 0, joins: 0, leaves: 0 };
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let say = |line: String| if !args.json { println!("{line}") };

    let (plan, bytes) = demo.epoch(args.members as usize, vec![])?;
    say(format!("epoch 0: {} members joined; rekey of {} wraps, {bytes} bytes", args.members, plan.wraps.len()));

    let evict_at = args.epochs.div_ceil(2);
    let mut evicted: Option<(MemberId, KeyRing)> = None;
    let mut evicted_can_decrypt = false;
    for epoch in 1..=args.epochs {
        let current: Vec<MemberId> = demo.members.keys().copied().collect();
        let churn = (current.len() / 20).max(1);
        let mut leaves: Vec<MemberId> = Vec::new();
        for _ in 0..rng.next_u64() as usize % (churn + 1) {
            let m = current[rng.next_u64() as usize % current.len()];
            if !leaves.contains(&m) {
                leaves.push(m);
            }
        }
        let mut eviction = String::new();
        if epoch == evict_at {
            let victim = *current.iter().find(|m| !leaves.contains(m)).ok_or("no member to evict")?;
            evicted = Some((victim, demo.members[&victim].keyring().clone()));
            leaves.push(victim);
            eviction = format!(", evicted {victim:?}");
        }
        let joins = rng.next_u64() as usize % (churn + 1);
        let n_leaves = leaves.len();
        let (plan, bytes) = demo.epoch(joins, leaves)?;
        // The evicted member hears every rekey after its eviction and tries every wrap.
        if let Some((_, ring)) = evicted.as_mut() {
            ring.absorb(&plan.wraps).map_err(|e| e.to_string())?;
            evicted_can_decrypt |= ring.holds(plan.group_key);
        }
        let wraps = plan.wraps.len();
        say(format!(
            "epoch {epoch}: +{joins} -{n_leaves}{eviction}; rekey of {wraps} wraps, {bytes} bytes; {}/{} members in sync",
            demo.in_sync(),
            demo.members.len()
        ));
    }
    let summary = serde_json::json!({
        "members": demo.members.len(),
        "epochs": args.epochs,
        "joins": demo.joins,
        "leaves": demo.leaves,
        "members_in_sync": demo.in_sync(),
        "evicted": evicted.as_ref().map(|(m, _)| m.0),
        "evicted_can_decrypt": evicted_can_decrypt,
        "rekey_bytes": demo.rekey_bytes,
    });
    if args.json {
        println!("{summary}");
    } else {
        println!(
            "summary: {} members, {} epochs, {} in sync, evicted member can decrypt: {}, {} rekey bytes",
            demo.members.len(),
            args.epochs,
            demo.in_sync(),
            evicted_can_decrypt,
            demo.rekey_bytes
        );
    }
    Ok(())
}
