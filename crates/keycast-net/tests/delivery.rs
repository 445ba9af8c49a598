//! Reliable rekey delivery over real sockets on loopback: members losing a share of the
//! multicast channel (each its own datagrams) rebuild lost rekey packets from FEC parity, NAK
//! what they cannot rebuild, get a repair round, and all end in sync.

use std::time::Duration;

use keycast_core::protocol::GroupPolicy;
use keycast_core::wire::rekey::{FecConfig, PacketConfig};
use keycast_core::wire::GroupId;
use keycast_net::client::MemberClient;
use keycast_net::local::{loopback_policy, Events, LocalGroup};
use keycast_net::loss::LossModel;
use tokio::time::{sleep, Instant};

fn policy() -> GroupPolicy {
    GroupPolicy {
        refresh_timeout_ms: 10_000,
        // No parity at first; any NAK raises rho (a target of none).
        packets: PacketConfig { fec: FecConfig { block: 4, proactivity_pct: 100, target_naks: 0, ..FecConfig::default() }, ..PacketConfig::default() },
        ..loopback_policy(GroupId(41))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_members_repair_rekeys_by_parity_and_naks_and_stay_in_sync() {
    const MEMBERS: usize = 24;
    let dir = tempfile::tempdir().unwrap();
    let group = LocalGroup::start(policy(), MEMBERS + 8, dir.path().to_path_buf()).await.unwrap();
    let mut members: Vec<(MemberClient, Events)> = Vec::new();
    for i in 1..=MEMBERS {
        let mut setup = group.member_setup(&format!("member-{i}")).unwrap();
        setup.loss = Some(LossModel { rate: 0.25, burst: None, seed: i as u64 });
        members.push(MemberClient::join(setup).await.unwrap());
    }
    // Churn: a join and a leave per round, each a rekey of several packets.
    for round in 0..8 {
        let (extra, _events) = group.join(&format!("member-{}", MEMBERS + 1 + round % 4)).await.unwrap();
        sleep(Duration::from_millis(2 * policy().epoch_ms)).await;
        extra.leave().await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let stats = group.server().stats();
        let behind = members.iter().filter(|(m, _)| m.rekey_seq() != stats.rekeys || m.getkey().map(|k| k.0.to_string()) != Some(stats.active_key.clone())).count();
        if behind == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{behind} members never caught up: {stats:?}");
        sleep(Duration::from_millis(50)).await;
    }
    let stats = group.server().stats();
    let repaired: u64 = members.iter().map(|(m, _)| m.stats().fec_recovered + m.stats().repair_recovered).sum();
    let naks: u64 = members.iter().map(|(m, _)| m.stats().naks).sum();
    assert!(stats.naks_received > 0 && naks >= stats.naks_received, "NAKs sent {naks}, counted: {stats:?}");
    assert!(stats.repair_packets > 0 && stats.parity_packets > 0, "{stats:?}");
    assert!(stats.rho > 1.0, "NAKs raised rho: {stats:?}");
    assert!(repaired > 0, "no member rebuilt a rekey from parity: {stats:?}");
    let counted: Vec<u64> = group.server().members().await.iter().map(|r| r.member).collect();
    assert!(members.iter().all(|(m, _)| counted.contains(&m.member().0)), "a member expired or was evicted");
    eprintln!("{MEMBERS} members at 25% loss: {repaired} rekeys repaired, {naks} NAKs, {stats:?}");
}
