//! The joiners' reflector on loopback: a member admitted by an epoch's batch reads the group's
//! data within that epoch, before its own group key is in force, through the copies the
//! controller reflects under its batch's joiners' key; each message once. Without the
//! reflector it reads nothing until its key is in force.

use std::collections::BTreeSet;
use std::time::Duration;

use keycast_core::protocol::GroupPolicy;
use keycast_core::wire::GroupId;
use keycast_net::client::{ClientEvent, MemberClient};
use keycast_net::local::{loopback_policy, Events, LocalGroup};
use tokio::time::{sleep, timeout, Instant};

/// Long enough epochs that a joiner's wait for its key is plain to see.
const EPOCH_MS: u64 = 400;
/// Messages the sender sends at most, one every `SEND_EVERY`.
const MESSAGES: u32 = 150;
const SEND_EVERY: Duration = Duration::from_millis(10);

fn policy(reflector: bool) -> GroupPolicy {
    GroupPolicy { epoch_ms: EPOCH_MS, heartbeat_ms: 50, reflector, ..loopback_policy(GroupId(44)) }
}

async fn until_key_in_force(member: &MemberClient, within: Duration) {
    let deadline = Instant::now() + within;
    while member.getkey().is_none() {
        assert!(Instant::now() < deadline, "the member's key never came into force");
        sleep(Duration::from_millis(5)).await;
    }
}

/// What a joiner read before its key came into force: a member sends numbered messages from
/// the joiner's acceptance on, until the joiner's key is in force.
async fn read_while_waiting(reflector: bool) -> (Vec<String>, u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let group = LocalGroup::start(policy(reflector), 3, dir.path().to_path_buf()).await.unwrap();
    let mut first = group.join_all(["member-1", "member-2"]).await.unwrap();
    let (sender, _) = first.remove(0);
    until_key_in_force(&sender, Duration::from_secs(5)).await;

    let (joiner, mut events): (MemberClient, Events) = group.join("member-3").await.unwrap();
    let joined_epoch = group.server().stats().epoch;
    assert!(joiner.getkey().is_none(), "a joiner waits for its key");
    let mut read = Vec::new();
    for n in 0..MESSAGES {
        if joiner.getkey().is_some() {
            break;
        }
        sender.send(format!("tick {n}").as_bytes()).await.unwrap();
        sleep(SEND_EVERY).await;
        while let Ok(event) = events.try_recv() {
            if let ClientEvent::Data(plain) = event {
                // Opened while the joiner still had no key in force: only a reflected copy could.
                if joiner.getkey().is_none() {
                    read.push(String::from_utf8(plain).unwrap());
                }
            }
        }
    }
    let in_force_epoch = group.server().stats().epoch;
    // Once its key is in force the joiner reads the group's data directly.
    until_key_in_force(&joiner, Duration::from_secs(5)).await;
    sender.send(b"after").await.unwrap();
    let direct = timeout(Duration::from_secs(5), async {
        loop {
            if let Some(ClientEvent::Data(plain)) = events.recv().await {
                if plain == b"after" {
                    return;
                }
            }
        }
    })
    .await;
    assert!(direct.is_ok(), "the joiner did not read data under its own key");
    (read, joined_epoch, in_force_epoch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joiner_reads_the_groups_data_within_the_epoch_of_its_join_through_the_reflector() {
    let (read, joined_epoch, in_force_epoch) = read_while_waiting(true).await;
    assert!(!read.is_empty(), "the joiner read nothing before its key came into force");
    let distinct: BTreeSet<&String> = read.iter().collect();
    assert_eq!(distinct.len(), read.len(), "a message delivered twice: {read:?}");
    assert!(in_force_epoch > joined_epoch, "its key came into force in a later epoch ({joined_epoch} -> {in_force_epoch})");
    eprintln!("read {} messages in epoch {joined_epoch} before its key was in force (epoch {in_force_epoch})", read.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_reflector_a_joiner_reads_nothing_until_its_key_is_in_force() {
    let (read, _, _) = read_while_waiting(false).await;
    assert!(read.is_empty(), "read {read:?} without a key in force");
}
