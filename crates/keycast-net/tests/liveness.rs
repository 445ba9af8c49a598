//! Refreshes over UDP (liveness datagrams), on loopback: they alone keep members in the group,
//! and a flood of forged ones from a stranger costs no member its place.

use std::time::Duration;

use keycast_core::protocol::GroupPolicy;
use keycast_core::wire::{message_type, GroupId, Liveness, LivenessKey, MessageType, LIVENESS_LEN};
use keycast_core::{Key, MemberId};
use keycast_net::client::MemberClient;
use keycast_net::local::{loopback_policy, Events, LocalGroup};
use tokio::time::{sleep, Instant};

/// Members expire after one second without a refresh.
fn policy() -> GroupPolicy {
    GroupPolicy {
        epoch_ms: 100,
        refresh_timeout_ms: 1_000,
        ..loopback_policy(GroupId(31))
    }
}

/// A member that refreshes every 150 ms over UDP only (never over TLS).
async fn udp_only_member(group: &LocalGroup, identity: &str) -> (MemberClient, Events) {
    let mut setup = group.member_setup(identity).unwrap();
    setup.refresh_ms = 150;
    setup.tls_refresh_every = 0;
    MemberClient::join(setup).await.unwrap()
}

async fn counted(group: &LocalGroup, member: MemberId) -> bool {
    group.server().members().await.iter().any(|r| r.member == member.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveness_datagrams_alone_keep_members_in_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let group = LocalGroup::start(policy(), 3, dir.path().to_path_buf()).await.unwrap();
    let (a, _ea) = udp_only_member(&group, "member-1").await;
    let mut silent = group.member_setup("member-2").unwrap();
    silent.refresh_ms = 60_000;
    let (b, _eb) = MemberClient::join(silent).await.unwrap();
    sleep(Duration::from_millis(3 * policy().refresh_timeout_ms)).await;
    assert!(counted(&group, a.member()).await, "refreshes over UDP did not keep member-1");
    assert!(!counted(&group, b.member()).await, "a member that never refreshes expires");
    let stats = group.server().stats();
    assert!(stats.liveness_accepted >= 10, "{stats:?}");
    assert_eq!(stats.resyncs, 0);
}

/// The longest wait between heartbeats on the group's channel until `until`.
async fn longest_heartbeat_gap(multicast: keycast_net::config::MulticastConfig, until: Instant) -> Duration {
    let socket = keycast_net::multicast::receiver(&multicast).unwrap();
    let mut buf = vec![0u8; 65_536];
    let (mut last, mut longest) = (Instant::now(), Duration::ZERO);
    while let Ok(Ok((len, _))) = tokio::time::timeout_at(until, socket.recv_from(&mut buf)).await {
        if message_type(&buf[..len]) == Ok(MessageType::Heartbeat) {
            longest = longest.max(last.elapsed());
            last = Instant::now();
        }
    }
    longest.max(last.elapsed())
}

/// This process's resident memory in KiB (Linux).
fn resident_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_forged_liveness_datagrams_and_naks_costs_no_member_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let group = LocalGroup::start(policy(), 2, dir.path().to_path_buf()).await.unwrap();
    let (a, _ea) = udp_only_member(&group, "member-1").await;
    let (b, _eb) = udp_only_member(&group, "member-2").await;
    // A stranger who knows the members' ids but not their keys, for two refresh timeouts.
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let wrong = LivenessKey::derive(&Key::from_bytes([7; 32]), policy().group, a.member());
    let (mut sent, deadline) = (0u64, Instant::now() + Duration::from_millis(2 * policy().refresh_timeout_ms));
    let gaps = tokio::spawn(longest_heartbeat_gap(group.multicast.clone(), deadline));
    let resident_before = resident_kib();
    while Instant::now() < deadline {
        for member in [a.member(), b.member(), MemberId(999)] {
            let forged = Liveness { group: policy().group, member, resync: sent % 4 == 0, counter: u64::MAX - sent, rekey_seq: 1 }.seal(&wrong);
            socket.send_to(&forged, group.addr()).await.unwrap();
            socket.send_to(&forged[..LIVENESS_LEN - 1], group.addr()).await.unwrap();
            let nak = keycast_core::wire::Nak { group: policy().group, member, counter: u64::MAX - sent, seq: 1, needs: vec![(0, 1)], tag: [0; 32] };
            socket.send_to(&nak.seal(&wrong), group.addr()).await.unwrap();
            sent += 3;
        }
        if sent % 900 == 0 {
            tokio::task::yield_now().await;
        }
    }
    assert!(counted(&group, a.member()).await && counted(&group, b.member()).await, "a member lost its place under the flood");
    let stats = group.server().stats();
    assert!(stats.liveness_refused + stats.liveness_dropped > 0 && stats.liveness_accepted > 0, "{stats:?}");
    assert!(stats.liveness_refused + stats.liveness_dropped <= sent, "{stats:?}");
    // The controller's heartbeats kept coming, and the flood left no state behind it.
    let gap = gaps.await.unwrap();
    assert!(gap < Duration::from_millis(10 * policy().heartbeat_ms), "a {gap:?} gap between heartbeats under the flood");
    let grown = resident_kib().saturating_sub(resident_before);
    assert!(grown < 64 * 1024, "{grown} KiB more resident memory after {sent} forged datagrams");
    eprintln!("flood: {sent} forged datagrams sent; longest heartbeat gap {gap:?}; {grown} KiB grown; {stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_misses_rekeys_resyncs_over_udp_without_tls() {
    let dir = tempfile::tempdir().unwrap();
    let group = LocalGroup::start(policy(), 4, dir.path().to_path_buf()).await.unwrap();
    let mut lossy = group.member_setup("member-1").unwrap();
    // Loses most of the multicast channel (rekeys and heartbeats), nothing else.
    lossy.loss = Some(keycast_net::loss::LossModel { rate: 0.7, burst: None, seed: 3 });
    let (a, _ea) = MemberClient::join(lossy).await.unwrap();
    for round in 0..4 {
        let (c, _ec) = group.join(if round % 2 == 0 { "member-2" } else { "member-3" }).await.unwrap();
        c.leave().await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = group.server().stats();
        if a.rekey_seq() == stats.rekeys && a.getkey().map(|k| k.0.to_string()) == Some(stats.active_key.clone()) {
            break;
        }
        assert!(Instant::now() < deadline, "member-1 never caught up: {stats:?}");
        sleep(Duration::from_millis(20)).await;
    }
    let (server, client) = (group.server().stats(), a.stats());
    assert!(client.udp_resyncs >= 1 && server.udp_resyncs >= client.udp_resyncs, "{server:?} {client:?}");
    assert_eq!(server.resyncs, 0, "no resync needed TLS: {server:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicted_member_learns_it_over_udp_from_a_signed_refusal() {
    use keycast_core::protocol::MemberEvent;
    use keycast_net::client::ClientEvent;
    let dir = tempfile::tempdir().unwrap();
    let group = LocalGroup::start(policy(), 3, dir.path().to_path_buf()).await.unwrap();
    let (a, mut events) = udp_only_member(&group, "member-1").await;
    let (_b, _eb) = udp_only_member(&group, "member-2").await;
    assert!(group.server().evict(a.member()).await);
    // member-1 cannot open the eviction's rekey, asks for its keys over UDP and is told,
    // signed, that it is no longer counted: no TLS request on either side.
    let told = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(event) = events.recv().await {
            if event == ClientEvent::Member(MemberEvent::Evicted) {
                return;
            }
        }
    })
    .await;
    let (server, client) = (group.server().stats(), a.stats());
    assert!(told.is_ok(), "never told of the eviction: {server:?} {client:?}");
    assert!(server.udp_refusals >= 1, "{server:?}");
    assert_eq!(server.resyncs, 0, "the refusal came over TLS: {server:?}");
    assert!(!counted(&group, a.member()).await);
}
