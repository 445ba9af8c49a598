//! `keycast bench --restart`: how long a controller takes to come back from its database when
//! the group is large and old. A group of 2^20 members lives through 1,000 epochs of churn
//! (with the default snapshot interval), then the database is opened and the controller
//! restored from it, timed; the restored controller must give every sampled member the same
//! keys as before, so no member has to rejoin.

use std::collections::BTreeSet;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use keycast_core::protocol::{Controller, GroupPolicy, Output};
use keycast_core::wire::GroupId;
use keycast_core::MemberId;
use keycast_net::local::loopback_policy;
use keycast_net::store::{DatabaseKey, Store};
use serde_json::{json, Value};

pub struct RestartSizes {
    pub members: u64,
    pub epochs: u64,
    /// Members leaving and joining in every epoch.
    pub churn: u64,
}

fn policy() -> GroupPolicy {
    GroupPolicy { epoch_ms: 1_000, refresh_timeout_ms: u64::MAX / 4, ..loopback_policy(GroupId(1)) }
}

fn entropy(n: u64) -> [u8; 32] {
    let mut e = [0x6b; 32];
    e[..8].copy_from_slice(&n.to_be_bytes());
    e
}

fn persist(store: &mut Store, outputs: Vec<Output>) -> Result<(), String> {
    let records: Vec<_> = outputs.into_iter().filter_map(|o| if let Output::Persist(r) = o { Some(r) } else { None }).collect();
    store.append(&records).map_err(|e| e.to_string())
}

/// Builds the old group in a sealed database at `path`; returns the controller as it was.
fn age_group(path: &std::path::Path, key: [u8; 32], sizes: &RestartSizes, acl: &BTreeSet<String>, bar: &ProgressBar) -> Result<Controller, String> {
    let (mut store, _) = Store::open_sealed(path, Some(DatabaseKey::from_bytes(&key))).map_err(|e| e.to_string())?;
    let (mut controller, genesis) = Controller::create(policy(), acl.clone(), 0, entropy(1), entropy(2)).map_err(|e| e.to_string())?;
    persist(&mut store, vec![genesis])?;
    let mut next = 0u64;
    let mut join = |controller: &mut Controller, now: u64| {
        let identity = format!("member-{next}");
        next += 1;
        controller.join(next, &identity, policy().group, now).map(drop).map_err(|e| format!("{e:?}"))
    };
    for _ in 0..sizes.members {
        join(&mut controller, 0)?;
    }
    let mut now = policy().epoch_ms;
    persist(&mut store, controller.tick(now, entropy(3)).map_err(|e| e.to_string())?)?;
    bar.set_length(sizes.epochs);
    for epoch in 0..sizes.epochs {
        let leaving: Vec<(MemberId, String)> =
            controller.members().iter().step_by(997).take(sizes.churn as usize).map(|(m, r)| (*m, r.identity.clone())).collect();
        // One transaction an epoch (a busy server commits its requests in groups too).
        let mut outputs = Vec::new();
        for (member, identity) in leaving {
            outputs.extend(controller.leave(&identity, member).map_err(|e| format!("{e:?}"))?);
        }
        for _ in 0..sizes.churn {
            join(&mut controller, now)?;
        }
        now += policy().epoch_ms;
        outputs.extend(controller.tick(now, entropy(epoch << 8)).map_err(|e| e.to_string())?);
        persist(&mut store, outputs)?;
        bar.inc(1);
    }
    Ok(controller)
}

pub fn run(sizes: &RestartSizes, quiet: bool) -> Result<Value, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let path = dir.path().join("controller.redb");
    let key = entropy(4);
    let acl: BTreeSet<String> = (0..sizes.members + sizes.epochs * sizes.churn).map(|i| format!("member-{i}")).collect();
    let bar = if quiet { ProgressBar::hidden() } else { ProgressBar::new(sizes.epochs) };
    bar.set_style(ProgressStyle::with_template("aging the group {bar:30} {pos}/{len} epochs {elapsed}").map_err(|e| e.to_string())?);
    let built = Instant::now();
    let mut before = age_group(&path, key, sizes, &acl, &bar)?;
    bar.finish_and_clear();
    let aging = built.elapsed();
    let now = (sizes.epochs + 1) * policy().epoch_ms;

    let started = Instant::now();
    let (_store, log) = Store::open_sealed(&path, Some(DatabaseKey::from_bytes(&key))).map_err(|e| e.to_string())?;
    let opened = started.elapsed();
    let mut after = Controller::restore(policy(), acl, &log, now).map_err(|e| e.to_string())?;
    let restart = started.elapsed();

    let same_keys = same_keys(&mut before, &mut after, now)?;
    let database_bytes = std::fs::metadata(&path).map_err(|e| e.to_string())?.len();
    Ok(json!({
        "members": after.members().len(),
        "epochs": sizes.epochs,
        "churn_per_epoch": sizes.churn,
        "rekey_seq": after.rekey_seq(),
        "log_records": log.len(),
        "database_bytes": database_bytes,
        "aging_s": aging.as_secs_f64(),
        "open_s": opened.as_secs_f64(),
        "restart_s": restart.as_secs_f64(),
        "same_keys": same_keys,
    }))
}

/// Whether every 1,024th member (and the last) gets the same keys from both controllers.
fn same_keys(before: &mut Controller, after: &mut Controller, now: u64) -> Result<bool, String> {
    if before.members().len() != after.members().len() || before.rekey_seq() != after.rekey_seq() {
        return Ok(false);
    }
    let sample: Vec<(MemberId, String)> = before.members().iter().step_by(1024).chain(before.members().iter().last()).map(|(m, r)| (*m, r.identity.clone())).collect();
    for (member, identity) in sample {
        let (a, b) = (before.resync(&identity, member, 0, now), after.resync(&identity, member, 0, now));
        match (a, b) {
            (Ok(a), Ok(b)) if a == b => {}
            _ => return Ok(false),
        }
    }
    Ok(true)
}

pub fn describe(report: &Value) -> String {
    format!(
        "restart          {} members after {} epochs of churn ({} leave and {} join each): database {:.1} MB, {} records; open {:.2} s, restart {:.2} s; same keys: {}",
        report["members"], report["epochs"], report["churn_per_epoch"], report["churn_per_epoch"],
        report["database_bytes"].as_f64().unwrap_or(0.0) / 1e6, report["log_records"],
        report["open_s"].as_f64().unwrap_or(0.0), report["restart_s"].as_f64().unwrap_or(0.0), report["same_keys"],
    )
}
