//! Centralized flat to distributed flat over real sockets on loopback (Caronni et al.,
//! figure 6): members of a flat group whose controller is killed continue as distributed flat
//! participants from the keys they hold (`MemberClient::flat_shares`), and back: a participant
//! appointed controller collects the table and a new controller starts from it.

use std::time::Duration;

use keycast_core::protocol::controller::handback_record;
use keycast_core::protocol::distributed_flat::Config;
use keycast_core::protocol::member::FlatShares;
use keycast_core::wire::GroupId;
use keycast_core::{FlatIds, GraphConfig, JoinPolicy, KeyRing, MemberId, Scheme};
use keycast_net::client::MemberClient;
use keycast_net::distributed::{setups_of, wait_agreed, DistributedParticipant};
use keycast_net::local::{loopback_policy, LocalGroup};
use keycast_net::store::Store;
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

/// The way back (figure 6): three members of a killed controller's flat group continue as
/// participants; participant 0 is appointed and collects the table, participant 1 hands its
/// keys back over the mutual TLS channel, participant 2 does not (and a handback to a
/// participant that is not collecting, or a second one, is refused). A new controller starts
/// from the collected table: the two members rejoin it and hold exactly their keys of its
/// table, participant 2 is out (its keys and the removal rekey do not open the new TEK), and
/// when it joins anew the members follow the new controller's rekey.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_appointed_participant_takes_the_group_back_to_a_controller() {
    let dir = tempfile::tempdir().unwrap();
    let mut policy = loopback_policy(GroupId(8));
    policy.graph = GraphConfig { scheme: Scheme::Flat { id_bits: ID_BITS, ids: FlatIds::Sequential }, join_policy: JoinPolicy::Revision };
    let mut group = LocalGroup::start(policy, 3, dir.path().to_path_buf()).await.unwrap();
    let names: Vec<String> = (1..=3).map(|i| format!("member-{i}")).collect();
    let clients: Vec<MemberClient> = group.join_all(names.clone()).await.unwrap().into_iter().map(|(c, _)| c).collect();
    let shares = one_tek(&clients).await;
    group.kill_server().await;
    drop(clients);
    let config = Config { group: GroupId(8), id_bits: ID_BITS, settle_ms: 1_000 };
    let setups = setups_of(&group.authority, &names, config, 2_000, 3_000).unwrap();
    let mut participants = Vec::new();
    for (setup, share) in setups.iter().zip(shares) {
        participants.push(DistributedParticipant::from_centralized(setup.clone(), share.id, share.keys).await.unwrap());
    }
    let all: Vec<&DistributedParticipant> = participants.iter().collect();
    assert!(wait_agreed(&all, Duration::from_secs(10)).await, "the handover did not settle");
    let (appointed, handing, holdout) = (&participants[0], &participants[1], &participants[2]);

    appointed.collect_table().await.unwrap();
    assert!(!holdout.hand_back(handing.identity()).await.unwrap(), "a participant that does not collect took a handback");
    assert!(handing.hand_back(appointed.identity()).await.unwrap(), "the appointed participant refused a handback");
    assert!(!handing.hand_back(appointed.identity()).await.unwrap(), "a second handback was taken");
    let handback = appointed.finish_collection(JoinPolicy::Revision).await.unwrap();
    assert_eq!(handback.members.len(), 2);
    assert_eq!(handback.removed.values().map(|who| who.as_str()).collect::<Vec<_>>(), ["member-3"]);

    let mut ring = KeyRing::new();
    holdout.ever_held().into_iter().for_each(|(r, k)| ring.insert(r, k));
    ring.absorb(handback.rekeys.iter().flat_map(|plan| plan.wraps.iter())).unwrap();
    assert!(!ring.holds(handback.graph.group_key().0), "the participant that did not hand back reads the new controller's TEK");

    group.policy.graph = GraphConfig { scheme: Scheme::Flat { id_bits: ID_BITS, ids: FlatIds::FromMemberId }, join_policy: JoinPolicy::Revision };
    group.database = dir.path().join("taken-back.redb");
    let members: Vec<(MemberId, String)> = handback.members.iter().map(|(who, (m, _))| (*m, who.as_str().to_owned())).collect();
    let record = handback_record(&group.policy, &*handback.graph, &members, keycast_net::now_ms(), [9; 32]);
    Store::open_sealed(&group.database, group.database_key.clone()).unwrap().0.append(&[record]).unwrap();
    drop(participants);
    group.start_server().await.unwrap();
    let mut clients = Vec::new();
    for (member, who) in &members {
        let (client, _) = group.join(who).await.unwrap();
        let shares = client.flat_shares().expect("a flat member");
        let (_, table_keys) = handback.graph.member_keys(*member).unwrap();
        assert_eq!(shares.id, member.0, "{who} keeps its ID");
        for key in &shares.keys {
            assert!(table_keys.contains(key), "{who} holds {} that the new table does not give it", key.0);
        }
        clients.push(client);
    }
    let start = handback.graph.group_key().0;
    let (newcomer, _) = group.join("member-3").await.unwrap();
    clients.push(newcomer);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let teks: Vec<_> = clients.iter().map(|c| c.getkey().map(|(r, _)| r)).collect();
        if teks.iter().all(|t| t.is_some() && *t == teks[0] && t.is_some_and(|r| (r.version, r.revision) > (start.version, start.revision))) {
            break;
        }
        assert!(Instant::now() < deadline, "the members did not follow the new controller's rekey: {teks:?}");
        sleep(Duration::from_millis(20)).await;
    }
}
