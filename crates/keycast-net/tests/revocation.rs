//! Over real sockets on loopback: an evicted identity stays out across a controller restart, a
//! member that leaves and rejoins at once keeps its new place, and replayed data datagrams are
//! delivered once.

use std::time::Duration;

use keycast_core::protocol::traffic::TrafficError;
use keycast_core::protocol::GroupPolicy;
use keycast_core::wire::{GroupId, RefusalReason, MAX_MESSAGE_LEN};
use keycast_core::KeyRef;
use keycast_net::client::{ClientError, ClientEvent, MemberClient};
use keycast_net::local::{loopback_policy, Events, LocalError, LocalGroup};
use tokio::time::{sleep, timeout, Instant};

fn policy() -> GroupPolicy {
    loopback_policy(GroupId(77))
}

async fn group(acl: usize) -> (LocalGroup, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (LocalGroup::start(policy(), acl, dir.path().to_path_buf()).await.unwrap(), dir)
}

fn active(member: &MemberClient) -> Option<KeyRef> {
    member.getkey().map(|(r, _)| r)
}

/// Waits until every member holds the controller's active key.
async fn until_in_sync(group: &LocalGroup, members: &[&MemberClient]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let wanted = group.server().stats().active_key;
        let keys: Vec<_> = members.iter().map(|m| active(m).map(|k| k.to_string())).collect();
        if keys.iter().all(|k| k.as_deref() == Some(wanted.as_str())) {
            return;
        }
        assert!(Instant::now() < deadline, "members never reached {wanted}: {keys:?}");
        sleep(Duration::from_millis(20)).await;
    }
}

fn refused_as_revoked(result: Result<(MemberClient, Events), LocalError>) -> bool {
    match result {
        Err(LocalError::Client(ClientError::Refused(reason, detail))) => reason == RefusalReason::Revoked && detail.contains("readmit"),
        Err(other) => panic!("refused for another reason: {other}"),
        Ok(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicted_identity_cannot_rejoin_even_after_a_controller_restart() {
    let (mut group, _dir) = group(4).await;
    let (a, _ea) = group.join("member-1").await.unwrap();
    let (b, _eb) = group.join("member-2").await.unwrap();
    until_in_sync(&group, &[&a, &b]).await;
    assert!(group.server().evict(b.member()).await);
    drop(b);
    assert!(refused_as_revoked(group.join("member-2").await), "the evicted identity joined again at once");
    group.kill_server().await;
    group.start_server().await.unwrap();
    assert!(refused_as_revoked(group.join("member-2").await), "the evicted identity joined again after a restart");
    // Others still join and follow.
    let (c, _ec) = group.join("member-3").await.unwrap();
    until_in_sync(&group, &[&a, &c]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_leaves_and_rejoins_at_once_keeps_its_new_place() {
    let (group, _dir) = group(3).await;
    let (a, _ea) = group.join("member-1").await.unwrap();
    let (b, _eb) = group.join("member-2").await.unwrap();
    until_in_sync(&group, &[&a, &b]).await;
    let old = b.member();
    b.leave().await.unwrap();
    // The same identity joins again before the epoch that applies its leave.
    let (again, mut events) = group.join("member-2").await.unwrap();
    assert_ne!(again.member(), old, "a rejoin during a pending leave is a new admission");
    // Several epochs later it is still in: the old session's leave did not remove it.
    sleep(Duration::from_millis(6 * policy().epoch_ms)).await;
    let ids: Vec<u64> = group.server().members().await.iter().map(|r| r.member).collect();
    assert!(ids.contains(&again.member().0) && !ids.contains(&old.0), "{ids:?}");
    until_in_sync(&group, &[&a, &again]).await;
    while let Ok(event) = events.try_recv() {
        assert!(!matches!(event, ClientEvent::Member(keycast_core::protocol::MemberEvent::Evicted)), "the rejoined member was told it was evicted");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_data_datagrams_are_delivered_once_and_refused_as_replays() {
    let (group, _dir) = group(3).await;
    let (a, _ea) = group.join("member-1").await.unwrap();
    let (b, mut events) = group.join("member-2").await.unwrap();
    until_in_sync(&group, &[&a, &b]).await;
    let tap = keycast_net::multicast::receiver(&group.multicast).unwrap();
    for i in 0..5 {
        a.send(format!("tick {i}").as_bytes()).await.unwrap();
    }
    // An eavesdropper records the data datagrams and sends each again three times.
    let mut captured = Vec::new();
    let mut buf = vec![0u8; MAX_MESSAGE_LEN];
    let deadline = Instant::now() + Duration::from_secs(5);
    while captured.len() < 5 && Instant::now() < deadline {
        if let Ok(Ok((len, _))) = timeout(Duration::from_millis(200), tap.recv_from(&mut buf)).await {
            if buf[1] == keycast_core::wire::MessageType::Data as u8 {
                captured.push(buf[..len].to_vec());
            }
        }
    }
    assert_eq!(captured.len(), 5, "the tap heard the data");
    let socket = keycast_net::multicast::sender(&group.multicast).unwrap();
    for _ in 0..3 {
        for datagram in &captured {
            socket.send_to(datagram, group.multicast.address).await.unwrap();
        }
    }
    let (mut delivered, mut replays) = (Vec::new(), 0);
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match timeout(Duration::from_millis(100), events.recv()).await {
            Ok(Some(ClientEvent::Data(bytes))) => delivered.push(String::from_utf8(bytes).unwrap()),
            Ok(Some(ClientEvent::Unreadable(TrafficError::Replayed { .. }))) => replays += 1,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => {}
        }
    }
    delivered.sort();
    assert_eq!(delivered, (0..5).map(|i| format!("tick {i}")).collect::<Vec<_>>(), "each message once");
    assert_eq!(replays, 15, "every replay refused with its reason");
}

/// Waits for a `SignerChanged` event with rotation number `change`.
async fn until_signer_changed(events: &mut Events, change: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, events.recv()).await {
            Ok(Some(ClientEvent::Member(keycast_core::protocol::MemberEvent::SignerChanged { change: c }))) if c == change => return,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => panic!("the member never followed signing-key rotation {change}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_follow_a_signing_key_rotation_without_rejoining_and_across_a_restart() {
    use keycast_net::admin::{AdminRequest, AdminResponse};
    let (mut group, _dir) = group(4).await;
    let (a, mut ea) = group.join("member-1").await.unwrap();
    let (b, mut eb) = group.join("member-2").await.unwrap();
    until_in_sync(&group, &[&a, &b]).await;
    let before = group.server().verifying_key;
    let response = group.admin_request(&group.admin, &AdminRequest::RotateSigningKey).await.unwrap();
    let AdminResponse::SigningKeyRotated { change: 1, verifying_key } = response else { panic!("{response:?}") };
    assert_ne!(verifying_key, hex::encode(before.0), "a new key");
    until_signer_changed(&mut ea, 1).await;
    until_signer_changed(&mut eb, 1).await;
    // A rekey signed by the new key: the members apply it, the newcomer gets the new key.
    let (c, _ec) = group.join("member-3").await.unwrap();
    until_in_sync(&group, &[&a, &b, &c]).await;
    // After a restart the controller signs with the rotated key (the log holds it).
    group.kill_server().await;
    group.start_server().await.unwrap();
    assert_eq!(hex::encode(group.server().verifying_key.0), verifying_key, "the restart went back to an old signing key");
    let (d, _ed) = group.join("member-4").await.unwrap();
    until_in_sync(&group, &[&a, &b, &c, &d]).await;
    // The local group's log is sealed: without its key it does not open.
    group.kill_server().await;
    assert!(matches!(keycast_net::store::Store::open(&group.database), Err(keycast_net::store::StoreError::Sealed)));
}
