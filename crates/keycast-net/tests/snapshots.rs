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
