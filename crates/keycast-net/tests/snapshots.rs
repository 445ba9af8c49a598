//! The controller's log with snapshots, in the real database: after 100 epochs of churn the
//! file holds neither the genesis seed nor any early batch's seed nor any key of the early
//! epochs, and a restart from it continues with the same keys; a crash between a snapshot's
//! records leaves a log that restores.

use std::collections::BTreeSet;

use keycast_core::protocol::{Controller, GroupPolicy, JoinStatus, Output, Record};
use keycast_core::wire::GroupId;
use keycast_core::MemberId;
use keycast_net::local::loopback_policy;
use keycast_net::store::Store;

fn policy() -> GroupPolicy {
    GroupPolicy {
        epoch_ms: 100,
        heartbeat_ms: 50,
        refresh_timeout_ms: 1_000_000,
        ..loopback_policy(GroupId(3))
    }
}

fn entropy(n: u64) -> [u8; 32] {
    let mut e = [0x5a; 32];
    e[..8].copy_from_slice(&n.to_be_bytes());
    e
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn persist(store: &mut Store, outputs: Vec<Output>) {
    let records: Vec<Record> = outputs.into_iter().filter_map(|o| if let Output::Persist(r) = o { Some(r) } else { None }).collect();
    store.append(&records).unwrap();
}

#[test]
fn after_100_epochs_the_database_holds_no_key_of_the_early_epochs_and_restores_the_same_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("controller.redb");
    let (mut store, _) = Store::open(&path).unwrap();
    let acl: BTreeSet<String> = (0..400).map(|i| format!("m{i}")).collect();
    let genesis_seed = entropy(u64::MAX);
    let (mut controller, genesis) = Controller::create(policy(), acl.clone(), 1_000, genesis_seed, entropy(u64::MAX - 1)).unwrap();
    controller.set_snapshot_interval(16);
    persist(&mut store, vec![genesis]);
    let (mut now, mut next) = (1_000u64, 0u64);
    let mut early_secrets: Vec<[u8; 32]> = vec![genesis_seed];
    let mut members: Vec<(MemberId, String)> = Vec::new();
    for epoch in 0..100u64 {
        // From the second epoch on one member leaves; four join.
        if epoch > 0 {
            let (m, identity) = members.remove((epoch as usize * 7) % members.len());
            persist(&mut store, controller.leave(&identity, m).unwrap());
        }
        for _ in 0..4 {
            let identity = format!("m{next}");
            next += 1;
            if let Ok(JoinStatus::Queued(m)) = controller.join(next, &identity, policy().group, now) {
                members.push((m, identity));
            }
        }
        now += policy().epoch_ms;
        persist(&mut store, controller.tick(now, entropy(epoch)).unwrap());
        if epoch < 10 {
            early_secrets.push(entropy(epoch));
            let (member, identity) = &members[members.len() - 1];
            let keys = controller.resync(identity, *member, 0, now).unwrap().keys;
            early_secrets.extend(keys.iter().map(|(_, k)| *k.as_bytes()));
        }
    }
    drop(store);
    let file = std::fs::read(&path).unwrap();
    for (i, secret) in early_secrets.iter().enumerate() {
        assert!(!contains(&file, secret) && !contains(&file, hex::encode(secret).as_bytes()), "secret {i} of the early epochs is still in the database");
    }
    // A restart from the compacted log continues with the same keys.
    let (_, log) = Store::open(&path).unwrap();
    assert!(matches!(log.first(), Some(Record::Snapshot(_))), "the log starts at its snapshot");
    assert!(log.len() < 40, "{} records: the log before the snapshot was dropped", log.len());
    let restored = Controller::restore(policy(), acl, &log, now).unwrap();
    assert_eq!(restored.rekey_seq(), controller.rekey_seq());
    assert_eq!(restored.active_key(controller.epoch_at(now)), controller.active_key(controller.epoch_at(now)));
    let mut restored = restored;
    for (member, identity) in &members {
        let live = controller.resync(identity, *member, 0, now).unwrap();
        assert_eq!(restored.resync(identity, *member, 0, now).unwrap(), live, "{identity}");
    }
}

#[test]
fn a_sealed_database_opens_only_with_its_key_and_holds_no_seed_in_the_clear() {
    use keycast_net::store::{DatabaseKey, StoreError};
    let dir = tempfile::tempdir().unwrap();
    let (path, key_file) = (dir.path().join("controller.redb"), dir.path().join("controller.key"));
    DatabaseKey::create_file(&key_file).unwrap();
    assert!(DatabaseKey::create_file(&key_file).is_err(), "a key file is never overwritten");
    let (mut store, _) = Store::open_sealed(&path, Some(DatabaseKey::load(&key_file).unwrap())).unwrap();
    let acl: BTreeSet<String> = (0..20).map(|i| format!("m{i}")).collect();
    let (graph_seed, signing_seed) = (entropy(1 << 40), entropy(1 << 41));
    let (mut controller, genesis) = Controller::create(policy(), acl.clone(), 1_000, graph_seed, signing_seed).unwrap();
    controller.set_snapshot_interval(4);
    persist(&mut store, vec![genesis]);
    let mut now = 1_000;
    for epoch in 0..10u64 {
        let _ = controller.join(epoch, &format!("m{epoch}"), policy().group, now);
        now += policy().epoch_ms;
        persist(&mut store, controller.tick(now, entropy(epoch)).unwrap());
    }
    drop(store);
    let file = std::fs::read(&path).unwrap();
    for secret in [signing_seed, entropy(9)] {
        assert!(!contains(&file, &secret) && !contains(&file, hex::encode(secret).as_bytes()), "a seed in the clear");
    }
    assert!(matches!(Store::open(&path), Err(StoreError::Sealed)));
    assert!(matches!(Store::open_sealed(&path, Some(DatabaseKey::from_bytes(&[7; 32]))), Err(StoreError::WrongKey(_))));
    let (_, log) = Store::open_sealed(&path, Some(DatabaseKey::load(&key_file).unwrap())).unwrap();
    let restored = Controller::restore(policy(), acl, &log, now).unwrap();
    assert_eq!(restored.active_key(restored.epoch_at(now)), controller.active_key(controller.epoch_at(now)));
    assert_eq!(restored.members().len(), 10);
}

/// The child's side of the kill test: a controller of a few thousand members that snapshots
/// after every batch, churning until killed (at most 20 s). After each durable append it prints
/// the rekey seq and a digest of one member's keys.
#[test]
fn snapshot_writer_for_the_kill_test() {
    let Some(path) = std::env::var_os("KEYCAST_KILL_TEST_DB") else { return };
    let path = std::path::PathBuf::from(path);
    let (mut store, log) = Store::open(&path).unwrap();
    let acl = kill_test_acl();
    let now = |seq: u64| 1_000 + seq * policy().epoch_ms;
    let mut controller = if log.is_empty() {
        let (mut c, genesis) = Controller::create(policy(), acl.clone(), now(0), entropy(1), entropy(2)).unwrap();
        persist(&mut store, vec![genesis]);
        let _ = (0..KILL_TEST_MEMBERS).map(|i| c.join(i, &format!("m{i}"), policy().group, now(0))).count();
        c
    } else {
        Controller::restore(policy(), acl, &log, now(0)).unwrap()
    };
    controller.set_snapshot_interval(1);
    let started = std::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_secs(20) {
        let seq = controller.rekey_seq() + 1;
        let members: Vec<(MemberId, String)> = controller.members().iter().map(|(m, r)| (*m, r.identity.clone())).collect();
        if let Some((m, identity)) = members.get(seq as usize * 7 % members.len().max(1)) {
            persist(&mut store, controller.leave(identity, *m).unwrap());
        }
        let joining = (0..KILL_TEST_ACL).map(|i| format!("m{}", (seq * 13 + i) % KILL_TEST_ACL)).find(|id| !members.iter().any(|(_, m)| m == id));
        if let Some(identity) = joining {
            let _ = controller.join(seq, &identity, policy().group, now(seq));
        }
        println!("snapshot {seq} starts");
        persist(&mut store, controller.tick(now(seq), entropy(seq << 8)).unwrap());
        println!("committed {} {}", controller.rekey_seq(), keys_digest(&mut controller, now(seq)));
    }
}

const KILL_TEST_MEMBERS: u64 = 4_000;
const KILL_TEST_ACL: u64 = 5_000;

fn kill_test_acl() -> BTreeSet<String> {
    (0..KILL_TEST_ACL).map(|i| format!("m{i}")).collect()
}

/// A digest of the keys of the group's lowest member id, at its current rekey.
fn keys_digest(controller: &mut Controller, now: u64) -> String {
    let (member, identity) = controller.members().iter().next().map(|(m, r)| (*m, r.identity.clone())).unwrap();
    let keys = controller.resync(&identity, member, 0, now).unwrap().keys;
    let bytes: Vec<u8> = keys.iter().flat_map(|(r, k)| [r.to_string().into_bytes(), k.as_bytes().to_vec()].concat()).collect();
    hex::encode(&aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes).as_ref()[..8])
}

/// A controller process killed (SIGKILL) again and again, most often while it writes a
/// snapshot and compacts the log: every time the database opens, restores, holds every batch
/// the process reported committed, and gives the same keys for it.
#[test]
fn a_controller_killed_during_snapshots_restores_every_committed_batch() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("controller.redb");
    let (mut kills, mut during_snapshot) = (0, 0);
    let mut committed: Vec<(u64, String)> = Vec::new();
    for round in 0..12u64 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "snapshot_writer_for_the_kill_test", "--nocapture", "--test-threads=1"])
            .env("KEYCAST_KILL_TEST_DB", &path)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        // Let it commit a few batches (more each round), then kill it in the next snapshot.
        let wanted = 2 + round % 4;
        let mut seen = 0;
        let mut last_line = String::new();
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(rest) = line.strip_prefix("committed ") {
                let (seq, digest) = rest.split_once(' ').unwrap();
                committed.push((seq.parse().unwrap(), digest.to_string()));
                seen += 1;
            }
            let starting = line.starts_with("snapshot ");
            last_line = line;
            if seen >= wanted && starting {
                // Into the snapshot's write: its export and sealing take milliseconds.
                std::thread::sleep(std::time::Duration::from_millis(round % 5));
                break;
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
        during_snapshot += usize::from(last_line.starts_with("snapshot "));
        let (_, log) = Store::open(&path).unwrap();
        let restored = Controller::restore(policy(), kill_test_acl(), &log, 1_000);
        let mut restored = restored.unwrap_or_else(|e| panic!("kill {kills}: the log does not restore: {e}"));
        let last_seq = committed.last().expect("the writer committed batches").0;
        assert!(restored.rekey_seq() >= last_seq, "kill {kills}: batch {last_seq} was reported committed, the log ends at {}", restored.rekey_seq());
        let seq = restored.rekey_seq();
        if let Some((_, digest)) = committed.iter().rev().find(|(s, _)| *s == seq) {
            assert_eq!(&keys_digest(&mut restored, 1_000 + seq * policy().epoch_ms), digest, "kill {kills}: other keys for batch {seq}");
        } else {
            assert_eq!(seq, last_seq + 1, "kill {kills}: only the batch being written may be unreported");
        }
    }
    println!("{kills} kills, {during_snapshot} while a snapshot was written; the log ends at batch {}", committed.last().unwrap().0);
    assert!(during_snapshot >= kills / 2, "{during_snapshot} of {kills} kills landed while a snapshot was written");
}
