//! Distributed flat key management over real sockets on loopback: announcements and presences
//! on a multicast address, grants and join requests over mutual TLS between participants.
//! A group of 22 participants is built by joins through introducers found from presences,
//! then two leave and one is evicted; every step waits (with a deadline) until the live
//! participants agree, and those removed neither hold nor derive (from every key they held
//! and every announcement recorded) a later TEK. Strangers and hostile datagrams are refused
//! without disturbing the group.

use std::collections::BTreeMap;
use std::net::{SocketAddr, SocketAddrV4};
use std::time::Duration;

use keycast_core::key::{Key, KeyRef};
use keycast_core::protocol::distributed_flat::audit;
use keycast_core::protocol::distributed_flat::{Config, Event, Presence};
use keycast_core::wire::{GroupId, Signer};
use keycast_net::pki::participant_signing_seed;
use keycast_net::distributed::{loopback_setups, wait_agreed, DistributedError, DistributedParticipant, DistributedSetup, Introducer, Recorder};

const PARTICIPANTS: usize = 22;
/// Generous for a loaded 2-core machine: each wait ends as soon as the group agrees.
const STEP: Duration = Duration::from_secs(30);

fn setups(count: usize) -> Vec<DistributedSetup> {
    // Every relay must reach every participant before its round closes, even on a loaded host.
    let config = Config { group: GroupId(41), id_bits: 12, settle_ms: 1_000 };
    loopback_setups(config, count, 200, 20_000).unwrap()
}

fn live<'a>(all: &'a [DistributedParticipant], removed: &[usize]) -> Vec<&'a DistributedParticipant> {
    all.iter().enumerate().filter(|(i, _)| !removed.contains(i)).map(|(_, p)| p).collect()
}

/// Joins participant after participant, each through a live participant whose presence the
/// first one heard (rotating), waiting for agreement after each join.
async fn build_group(setups: &[DistributedSetup]) -> Vec<DistributedParticipant> {
    let mut all = vec![DistributedParticipant::create(setups[0].clone()).await.unwrap()];
    for (i, setup) in setups.iter().enumerate().skip(1) {
        let introducer = if i == 1 { all[0].introducer() } else { heard_introducer(&all[0], i).await };
        all.push(DistributedParticipant::join(setup.clone(), &introducer).await.unwrap());
        assert!(wait_agreed(&live(&all, &[]), STEP).await, "the group did not agree after participant-{i} joined");
    }
    all
}

/// The `i`-th (modulo) live participant whose presence `first` heard, waiting for one.
async fn heard_introducer(first: &DistributedParticipant, i: usize) -> Introducer {
    for _ in 0..3_000 {
        let known = first.known_introducers();
        if !known.is_empty() {
            return known[i % known.len()].clone();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} heard no presence of a live participant", first.identity());
}

/// Whether `removed` holds, or ever held, the TEK `live` agree on.
fn holds_tek_of(removed: &DistributedParticipant, live: &DistributedParticipant) -> bool {
    let (tek_ref, tek) = live.tek().expect("a TEK");
    removed.tek().is_some_and(|(_, k)| k == tek) || removed.ever_held().get(&tek_ref).is_some_and(|k| *k == tek)
}

/// Whether `removed`, with every key it ever held and every announcement recorded, derives a
/// TEK that `live` held after the last one `removed` held.
fn derives_later_tek(removed: &DistributedParticipant, live: &DistributedParticipant, recorded: &[Vec<u8>]) -> bool {
    let group_teks: BTreeMap<KeyRef, Key> = live.ever_held().into_iter().filter(|(r, _)| r.id.0 == 0).collect();
    audit::derives_later_tek(&removed.ever_held(), &group_teks, recorded)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_over_multicast_and_tls_agrees_through_joins_leaves_and_an_eviction() {
    tokio::time::timeout(Duration::from_secs(300), async {
        let setups = setups(PARTICIPANTS);
        let recorder = Recorder::start(&setups[0].multicast).unwrap();
        let mut all = build_group(&setups).await;
        let mut removed = Vec::new();
        let mut departures = all[5].events().unwrap();
        for leaver in [5, 11] {
            all[leaver].leave().await.unwrap();
            removed.push(leaver);
            assert!(wait_agreed(&live(&all, &removed), STEP).await, "no agreement after participant-{leaver} left");
        }
        assert!(
            std::iter::from_fn(|| departures.try_recv().ok()).any(|e| matches!(e, Event::Departed { .. })),
            "participant-5 was not told it departed"
        );
        let target = all[17].status().id;
        all[3].evict(target).await.unwrap();
        removed.push(17);
        let group = live(&all, &removed);
        assert!(wait_agreed(&group, STEP).await, "no agreement after the eviction");
        assert_eq!(group[0].status().roster.len(), PARTICIPANTS - 3);
        for &gone in &removed {
            assert!(!all[gone].status().live, "participant-{gone} is still live");
            assert!(!holds_tek_of(&all[gone], group[0]), "participant-{gone} holds the group's TEK");
            assert!(!derives_later_tek(&all[gone], group[0], &recorder.announcements()), "participant-{gone} derives a later TEK");
        }
        let traffic: u64 = all.iter().map(|p| p.traffic().private_failed).sum();
        assert_eq!(traffic, 0, "private messages were given up");

        // The evicted identity is revoked: no introducer admits it again.
        let mut again = setups[17].clone();
        again.deadline_ms = 3_000;
        let refused = DistributedParticipant::join(again, &all[0].introducer()).await;
        assert!(matches!(refused, Err(DistributedError::Join { .. })), "the evicted identity was admitted again");
    })
    .await
    .expect("the test ran out of time");
}

/// A certificate of the group's CA outside the directory (refused by the introducer's
/// listener) and one of another CA naming the introducer itself (no TLS handshake completes,
/// and its presences do not verify) cannot join: both give up at their deadline; the group
/// stays as it was and admits a participant of its directory next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_are_refused_at_the_listener_and_the_group_goes_on() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let mut setups = setups(3);
        let stranger = setups.pop().unwrap();
        for setup in &mut setups {
            setup.directory.retain(|who, _| who.as_str() != "participant-2");
        }
        let mut other_ca = setups_of_another_group();
        other_ca.multicast = setups[0].multicast.clone();
        let first = DistributedParticipant::create(setups[0].clone()).await.unwrap();
        for mut outsider in [stranger, other_ca] {
            outsider.deadline_ms = 1_500;
            let refused = DistributedParticipant::join(outsider, &first.introducer()).await;
            assert!(matches!(refused, Err(DistributedError::Join { .. })), "an outsider joined");
        }
        assert_eq!(first.status().roster.len(), 1);
        let second = DistributedParticipant::join(setups[1].clone(), &first.introducer()).await.unwrap();
        assert!(wait_agreed(&[&first, &second], STEP).await, "the group did not agree after a legitimate join");
    })
    .await
    .expect("the test ran out of time");
}

/// A participant of another group's CA (named participant-0) whose own directory lists it.
fn setups_of_another_group() -> DistributedSetup {
    setups(1).pop().unwrap()
}

/// Garbage, a presence forged under another participant's key and one of another group, all
/// moving participant-2's listener to a dead address, disturb nobody: a leave after them
/// settles and participant-2's address stays its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_datagrams_on_the_group_address_move_no_listener_and_stop_no_change() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let setups = setups(3);
        let mut all = vec![DistributedParticipant::create(setups[0].clone()).await.unwrap()];
        for setup in &setups[1..] {
            all.push(DistributedParticipant::join(setup.clone(), &all[0].introducer()).await.unwrap());
            assert!(wait_agreed(&live(&all, &[]), STEP).await);
        }
        let victim = all[2].identity().clone();
        let dead: SocketAddrV4 = "127.0.0.1:9".parse().unwrap();
        let signer_of = |i: usize| Signer::from_seed(&participant_signing_seed(&setups[i].credentials).unwrap());
        let presence = |group, at_ms| Presence { group, signer: victim.clone(), at_ms, listener: dead };
        let config = setups[0].config;
        let hostile = [
            vec![0xff; 40],
            presence(config.group, u64::MAX / 2).sign(&signer_of(1)),
            presence(GroupId(config.group.0 + 1), u64::MAX / 2).sign(&signer_of(2)),
        ];
        let socket = keycast_net::multicast::sender(&setups[0].multicast).unwrap();
        for bytes in &hostile {
            socket.send_to(bytes, SocketAddr::V4(setups[0].multicast.address)).await.unwrap();
        }
        // Sent after the hostile datagrams: once it settles, they were read.
        all[1].leave().await.unwrap();
        assert!(wait_agreed(&live(&all, &[1]), STEP).await, "the leave did not settle");
        let heard = all[0].known_introducers().into_iter().find(|i| i.identity == victim).expect("participant-2's presence");
        assert_eq!(heard.addr, all[2].introducer().addr, "a hostile presence moved participant-2's listener");
    })
    .await
    .expect("the test ran out of time");
}
