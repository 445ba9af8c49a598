//! The controller's driver under abuse (issue 11): many joins from one identity, idle
//! connections from an outsider, certificates that name themselves "admin" or carry no
//! subject alternative name, and a request that makes the core fail.

use std::time::Duration;

use keycast_core::protocol::GroupPolicy;
use keycast_core::wire::rekey::PacketConfig;
use keycast_core::wire::{message_type, GroupId, MessageType};
use keycast_core::{GraphConfig, JoinPolicy, Scheme};
use keycast_net::admin::{AdminRequest, AdminResponse, Stats};
use keycast_net::client::{join_once, ClientError, MemberClient};
use keycast_net::local::{LocalError, LocalGroup};
use tokio::io::AsyncReadExt;
use tokio::time::{sleep, timeout, Instant};

fn policy(scheme: Scheme) -> GroupPolicy {
    GroupPolicy {
        group: GroupId(11),
        graph: GraphConfig { scheme, join_policy: JoinPolicy::NewVersion },
        epoch_ms: 300,
        activation_delay: 1,
        heartbeat_ms: 50,
        refresh_timeout_ms: 10_000,
        immediate_eviction: true,
        membership_deltas: false,
        reflector: false,
        packets: PacketConfig::default(),
    }
}

fn tree() -> Scheme {
    Scheme::Tree { degree: 4 }
}

async fn admin_stats(group: &LocalGroup) -> Stats {
    match group.admin_request(&group.admin, &AdminRequest::Stats).await {
        Ok(AdminResponse::Stats(stats)) => stats,
        other => panic!("the administrator was not served: {other:?}"),
    }
}

/// Waits (at most `within`) until the controller holds no connection open.
async fn until_no_connection_is_open(group: &LocalGroup, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let open = group.server().stats().connections_open;
        if open == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{open} connections still open after {within:?}");
        sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_joins_from_one_identity_are_all_answered_or_closed() {
    let dir = tempfile::tempdir().unwrap();
    let group = LocalGroup::start(policy(tree()), 4, dir.path().to_path_buf()).await.unwrap();
    let limits = group.limits;
    // Each connection ends within its handshake, its epoch, the answer deadline and a margin.
    let bound = limits.handshake_timeout + limits.answer_timeout + Duration::from_secs(3);
    let setup = group.member_setup("member-1").unwrap();
    let joins: Vec<_> = (0..50)
        .map(|_| {
            let setup = setup.clone();
            tokio::spawn(async move { timeout(bound, join_once(&setup)).await })
        })
        .collect();
    let (mut accepted, mut refused, mut closed) = (Vec::new(), Vec::new(), 0);
    for (i, join) in joins.into_iter().enumerate() {
        match join.await.unwrap() {
            Err(_) => panic!("join {i} from member-1 got neither an answer nor a close within {bound:?}"),
            Ok(Ok((answer, _))) => accepted.push(answer.member),
            Ok(Err(ClientError::Refused(reason, detail))) => refused.push(format!("{reason}: {detail}")),
            Ok(Err(_)) => closed += 1,
        }
    }
    println!("accepted {}, refused {}, closed {closed}", accepted.len(), refused.len());
    assert!(!accepted.is_empty(), "no join was accepted");
    // Every connection that waited for the epoch got the acceptance: the only refusals are
    // those over the per-identity cap, at once (none timed out waiting).
    assert!(refused.iter().all(|r| r.contains("connections open")), "{refused:?}");
    assert_eq!(closed, 0, "connections closed without an answer");
    assert!(accepted.iter().all(|m| *m == accepted[0]), "one identity became several members: {accepted:?}");
    until_no_connection_is_open(&group, Duration::from_secs(5)).await;
    assert_eq!(group.server().members().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_waits_no_longer_than_the_answer_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let mut slow = policy(tree());
    slow.epoch_ms = 4_000;
    let mut group = LocalGroup::prepare(slow, 2, dir.path().to_path_buf()).unwrap();
    group.limits.answer_timeout = Duration::from_millis(500);
    group.start_server().await.unwrap();
    let bound = Duration::from_millis(2_500);
    match timeout(bound, join_once(&group.member_setup("member-1").unwrap())).await {
        Ok(Err(ClientError::Refused(reason, detail))) => {
            assert_eq!(reason.describe(), "controller unavailable");
            assert!(detail.contains("timed out waiting for the epoch's rekey"), "{detail}");
        }
        Err(_) => panic!("a join waited for its four-second epoch past a 500 ms answer deadline"),
        Ok(other) => panic!("a join was answered before its epoch ended: {:?}", other.map(|(a, _)| a.member)),
    }
    assert_eq!(group.server().stats().answers_timed_out, 1);
    until_no_connection_is_open(&group, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_from_an_outsider_are_closed_and_the_admin_is_served_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let mut group = LocalGroup::prepare(policy(tree()), 2, dir.path().to_path_buf()).unwrap();
    group.limits.handshake_timeout = Duration::from_secs(4);
    group.limits.max_per_address = 64;
    group.start_server().await.unwrap();
    let per_address = group.limits.max_per_address;

    // The outsider connects from another loopback address and never says a word.
    let mut idle = Vec::new();
    for _ in 0..100 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        idle.push((socket.connect(group.addr()).await.unwrap(), Instant::now()));
    }
    let waits: Vec<_> = idle
        .into_iter()
        .map(|(mut tcp, since)| {
            tokio::spawn(async move {
                let mut buf = [0u8; 16];
                // Some(lifetime) once the server closed it; None if it was still open after 10 s.
                timeout(Duration::from_secs(10), tcp.read(&mut buf)).await.ok().map(|_| since.elapsed())
            })
        })
        .collect();

    // Meanwhile the administrator, from 127.0.0.1, is served.
    let stats = admin_stats(&group).await;
    assert!(stats.connections_open >= per_address as u64, "the idle connections were not held: {stats:?}");
    assert_eq!(stats.connections_over_cap, 100 - per_address as u64, "{stats:?}");

    let mut lifetimes = Vec::new();
    for wait in waits {
        lifetimes.push(wait.await.unwrap().expect("the server never closed an idle connection"));
    }
    let at_once = lifetimes.iter().filter(|t| **t < group.limits.handshake_timeout / 2).count();
    assert_eq!(at_once, 100 - per_address, "connections over the per-address cap must be closed at once: {lifetimes:?}");
    until_no_connection_is_open(&group, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_certificate_named_admin_is_not_an_administrator() {
    let dir = tempfile::tempdir().unwrap();
    let group = LocalGroup::start(policy(tree()), 2, dir.path().to_path_buf()).await.unwrap();
    // Same CA, common name and DNS name "admin": only the fingerprint differs.
    let impostor = group.authority.issue("admin", false).unwrap();
    for request in [AdminRequest::Stats, AdminRequest::List, AdminRequest::Evict { member: 1 }] {
        match group.admin_request(&impostor, &request).await {
            Ok(AdminResponse::Error(refusal)) => assert!(refusal.contains("not an administrator"), "{refusal}"),
            answer => panic!("a member certificate named admin got {answer:?} to {request:?}"),
        }
    }
    admin_stats(&group).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_without_san_is_refused_unless_common_name_fallback_is_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut group = LocalGroup::start(policy(tree()), 2, dir.path().to_path_buf()).await.unwrap();
    let cn_only = group.authority.issue_common_name_only("member-1").unwrap();
    match join_once(&group.setup_with(&cn_only).unwrap()).await {
        Err(ClientError::Refused(_, detail)) => assert!(detail.contains("no URI or DNS subject alternative name"), "{detail}"),
        other => panic!("a certificate without SAN was not refused: {:?}", other.map(|(a, _)| a.member)),
    }
    group.kill_server().await;
    group.identity_from_common_name = true;
    group.start_server().await.unwrap();
    let (accepted, _) = join_once(&group.setup_with(&cn_only).unwrap()).await.unwrap();
    let rows = group.server().members().await;
    assert!(rows.iter().any(|r| r.member == accepted.member.0 && r.identity == "member-1"), "{rows:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_group_refuses_a_join_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    // One-bit flat IDs: room for two members.
    let flat = Scheme::Flat { id_bits: 1, ids: keycast_core::FlatIds::Sequential };
    let mut group = LocalGroup::prepare(policy(flat), 3, dir.path().to_path_buf()).unwrap();
    group.limits.answer_timeout = Duration::from_secs(2);
    group.start_server().await.unwrap();
    let (first, _first_events) = group.join("member-1").await.unwrap();
    let (second, _second_events) = group.join("member-2").await.unwrap();

    let bound = group.limits.answer_timeout + Duration::from_secs(5);
    match timeout(bound, group.join("member-3")).await {
        Ok(Err(LocalError::Client(ClientError::Refused(..)))) => {}
        Err(_) => panic!("a join to a full group got no answer within {bound:?}"),
        Ok(other) => panic!("a join to a full group was not refused: {:?}", other.map(|(m, _)| m.member())),
    }
    // The controller goes on: it serves the admin, applies a leave and admits the third.
    assert_eq!(admin_stats(&group).await.members, 2);
    second.leave().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while group.server().members().await.len() != 1 {
        assert!(Instant::now() < deadline, "the leave was never applied");
        sleep(Duration::from_millis(50)).await;
    }
    let (third, _third_events) = group.join("member-3").await.unwrap();
    let seq = group.server().stats().rekeys;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(first.rekey_seq() >= seq && third.rekey_seq() >= seq && first.getkey().map(|k| k.0) == third.getkey().map(|k| k.0)) {
        assert!(Instant::now() < deadline, "the members never shared a key after the refusal");
        sleep(Duration::from_millis(20)).await;
    }
    let message = first.seal(b"after the refusal").unwrap();
    assert_eq!(third.open(&message).unwrap(), b"after the refusal");
}

/// Heartbeats heard on the group's channel within `within` (at most 1,000 datagrams read).
async fn heartbeats_heard(group: &LocalGroup, within: Duration) -> usize {
    let socket = keycast_net::multicast::receiver(&group.multicast).unwrap();
    let deadline = Instant::now() + within;
    let mut buf = vec![0u8; 65_536];
    let mut heard = 0;
    for _ in 0..1_000 {
        match tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await {
            Ok(Ok((len, _))) => heard += usize::from(message_type(&buf[..len]) == Ok(MessageType::Heartbeat)),
            _ => break,
        }
    }
    heard
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_error_during_a_request_does_not_stop_the_controller() {
    let dir = tempfile::tempdir().unwrap();
    // No rekey entry fits a 100-byte MTU: the core fails to close the epoch of the first join.
    let mut policy = policy(tree());
    policy.packets.mtu = 100;
    let mut group = LocalGroup::prepare(policy, 3, dir.path().to_path_buf()).unwrap();
    group.limits.answer_timeout = Duration::from_secs(2);
    group.start_server().await.unwrap();
    let bound = group.limits.answer_timeout + Duration::from_secs(5);
    // The member retries an unavailable controller until its join deadline, then gives up.
    let mut setup = group.member_setup("member-1").unwrap();
    setup.requests.join_deadline_ms = 3_000;
    match timeout(bound, MemberClient::join(setup)).await {
        // Refused ("the controller failed while ..."), or the deadline came first mid-retry.
        Ok(Err(e)) => assert!(e.to_string().contains("failed") || e.to_string().contains("gave up the join"), "{e}"),
        Err(_) => panic!("a join whose rekey failed got no answer within {bound:?}"),
        Ok(Ok((member, _))) => panic!("a join whose rekey cannot be sent was admitted as {:?}", member.member()),
    }
    let stats = admin_stats(&group).await;
    assert!(stats.controller_errors >= 1, "the core never failed: {stats:?}");
    // The controller goes on: heartbeats, and answers to later requests.
    let heard = heartbeats_heard(&group, Duration::from_millis(policy.heartbeat_ms * 10)).await;
    assert!(heard >= 2, "{heard} heartbeats in ten intervals after the error");
    match timeout(bound, group.join("mallory")).await {
        Ok(Err(LocalError::Client(ClientError::Refused(reason, _)))) => assert_eq!(reason.describe(), "not in the ACL"),
        Err(_) => panic!("a later request got no answer within {bound:?}"),
        Ok(other) => panic!("mallory joined: {:?}", other.map(|(m, _)| m.member())),
    }
    admin_stats(&group).await;
}

async fn order(group: &LocalGroup, request: AdminRequest) -> AdminResponse {
    let answer = group.admin_request(&group.admin, &request).await;
    answer.unwrap_or_else(|e| panic!("{request:?}: {e}"))
}

async fn refused_join(group: &LocalGroup, identity: &str) -> String {
    match group.join(identity).await {
        Err(LocalError::Client(ClientError::Refused(reason, detail))) => format!("{reason}: {detail}"),
        other => panic!("{identity} was not refused: {:?}", other.map(|(m, _)| m.member())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_orders_revoke_readmit_and_change_the_acl() {
    let dir = tempfile::tempdir().unwrap();
    let group = LocalGroup::start(policy(tree()), 2, dir.path().to_path_buf()).await.unwrap();
    let (_first, _first_events) = group.join("member-1").await.unwrap();
    let (second, _second_events) = group.join("member-2").await.unwrap();
    let identities = |rows: Vec<keycast_net::admin::MemberRow>| rows.into_iter().map(|r| r.identity).collect::<Vec<_>>();

    // Evicting by identity removes the member at once and keeps the identity out.
    let revoked = order(&group, AdminRequest::Revoke { identity: "member-2".into() }).await;
    assert_eq!(revoked, AdminResponse::Revoked { identity: "member-2".into(), member: Some(second.member().0) });
    assert_eq!(identities(group.server().members().await), ["member-1"]);
    assert!(refused_join(&group, "member-2").await.contains("re-admits"));
    match order(&group, AdminRequest::AclList).await {
        AdminResponse::Acl { acl, revoked } => {
            assert_eq!(acl, ["member-1", "member-2"]);
            assert_eq!(revoked, ["member-2"]);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(order(&group, AdminRequest::Readmit { identity: "member-2".into() }).await, AdminResponse::Readmitted { identity: "member-2".into(), changed: true });
    let (_again, _again_events) = group.join("member-2").await.unwrap();

    // The ACL changes at run time: a new identity joins, and leaves the group with its entry.
    assert!(refused_join(&group, "guest").await.contains("not in the ACL"));
    order(&group, AdminRequest::AclAdd { identity: "guest".into() }).await;
    let (guest, _guest_events) = group.join("guest").await.unwrap();
    let removed = order(&group, AdminRequest::AclRemove { identity: "guest".into() }).await;
    assert_eq!(removed, AdminResponse::AclChanged { identity: "guest".into(), added: false, changed: true, evicted: Some(guest.member().0) });
    assert!(!identities(group.server().members().await).contains(&"guest".to_string()));
    assert!(refused_join(&group, "guest").await.contains("not in the ACL"));

    // Identities from the admin are bounded like those of certificates.
    let long = AdminRequest::AclAdd { identity: "x".repeat(300) };
    assert!(matches!(order(&group, long).await, AdminResponse::Error(e) if e.contains("longer than 255 bytes")));
    match order(&group, AdminRequest::List).await {
        AdminResponse::Members(rows) => assert!(rows.iter().all(|r| r.idle_ms < 60_000), "{rows:?}"),
        other => panic!("{other:?}"),
    }
}
