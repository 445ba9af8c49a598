//! Centralized flat to distributed flat over real sockets on loopback (Caronni et al.,
//! figure 6): members of a flat group whose controller is killed continue as distributed flat
//! participants from the keys they hold (`MemberClient::flat_shares`).

use std::time::Duration;

use keycast_core::protocol::distributed_flat::Config;
use keycast_core::protocol::member::FlatShares;
use keycast_core::wire::GroupId;
use keycast_core::{FlatIds, GraphConfig, JoinPolicy, Scheme};
use keycast_net::client::MemberClient;
use keycast_net::distributed::{setups_of, wait_agreed, DistributedParticipant};
use keycast_net::local::{loopback_policy, LocalGroup};
use tokio::time::{sleep, Instant};

const ID_BITS: u8 = 8;

/// Every member's shares once all hold one TEK.
async fn one_tek(clients: &[MemberClient]) -> Vec<FlatShares> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let shares: Option<Vec<FlatShares>> = clients.iter().map(MemberClient::flat_shares).collect();
        if let Some(shares) = shares.filter(|s| s.iter().all(|one| one.keys[0] == s[0].keys[0])) {
            return shares;
        }
        assert!(Instant::now() < deadline, "the members did not reach one TEK");
        sleep(Duration::from_millis(20)).await;
    }
}

/// One member converts at once, the others 400 ms later (within its 1 s handover window, after
/// its first handover went out): its repeated handover reaches them, so all list each other and
/// hold the controller's last TEK. Without the repeats the late members never list the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_that_convert_late_still_hear_an_early_handover() {
    let dir = tempfile::tempdir().unwrap();
    let mut policy = loopback_policy(GroupId(7));
    policy.graph = GraphConfig { scheme: Scheme::Flat { id_bits: ID_BITS, ids: FlatIds::Sequential }, join_policy: JoinPolicy::Revision };
    let mut group = LocalGroup::start(policy, 3, dir.path().to_path_buf()).await.unwrap();
    let names: Vec<String> = (1..=3).map(|i| format!("member-{i}")).collect();
    let clients: Vec<MemberClient> = group.join_all(names.clone()).await.unwrap().into_iter().map(|(c, _)| c).collect();
    let shares = one_tek(&clients).await;
    let tek = shares[0].keys[0].clone();
    group.kill_server().await;
    drop(clients);

    let config = Config { group: GroupId(7), id_bits: ID_BITS, settle_ms: 1_000 };
    let setups = setups_of(&group.authority, &names, config, 2_000, 10_000).unwrap();
    let mut shares = shares.into_iter();
    let first = shares.next().unwrap();
    let mut participants = vec![DistributedParticipant::from_centralized(setups[0].clone(), first.id, first.keys).await.unwrap()];
    sleep(Duration::from_millis(400)).await;
    for (setup, late) in setups[1..].iter().zip(shares) {
        participants.push(DistributedParticipant::from_centralized(setup.clone(), late.id, late.keys).await.unwrap());
    }
    let all: Vec<&DistributedParticipant> = participants.iter().collect();
    assert!(wait_agreed(&all, Duration::from_secs(10)).await, "rosters: {:?}", all.iter().map(|p| p.status().roster.len()).collect::<Vec<_>>());
    for p in &all {
        assert_eq!(p.tek().map(|(r, _)| r.version), Some(tek.0.version), "the controller's last TEK version goes on");
    }
}
