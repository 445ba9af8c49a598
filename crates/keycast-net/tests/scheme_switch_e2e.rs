//! Over real sockets on loopback: `keycast admin transition` moves a running flat group to a
//! tree and back to a fresh flat table (Caronni et al. figure 6); member clients follow each
//! switch without rejoining (to the tree by deriving their path from the signed notice, to the
//! flat table by resync), a member joins the tree, and a restart keeps the keys.

use std::time::Duration;

use keycast_core::protocol::GroupPolicy;
use keycast_core::wire::GroupId;
use keycast_core::{FlatIds, Scheme};
use keycast_net::admin::{AdminRequest, AdminResponse};
use keycast_net::client::MemberClient;
use keycast_net::local::{loopback_policy, LocalGroup};
use tokio::time::{sleep, Instant};

fn policy() -> GroupPolicy {
    let mut policy = loopback_policy(GroupId(78));
    policy.graph.scheme = Scheme::Flat { id_bits: 4, ids: FlatIds::Sequential };
    policy
}

/// Waits until every member holds the controller's active key; returns it.
async fn until_in_sync(group: &LocalGroup, members: &[&MemberClient]) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let wanted = group.server().stats().active_key;
        let keys: Vec<_> = members.iter().map(|m| m.getkey().map(|(r, _)| r.to_string())).collect();
        if keys.iter().all(|k| k.as_deref() == Some(wanted.as_str())) {
            return wanted;
        }
        assert!(Instant::now() < deadline, "members never reached {wanted}: {keys:?}");
        sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_transition_moves_a_running_group_to_a_tree_and_back_and_members_follow() {
    let dir = tempfile::tempdir().unwrap();
    let mut group = LocalGroup::start(policy(), 4, dir.path().to_path_buf()).await.unwrap();
    let (a, _ea) = group.join("member-1").await.unwrap();
    let (b, _eb) = group.join("member-2").await.unwrap();
    let flat = until_in_sync(&group, &[&a, &b]).await;

    let response = group.admin_request(&group.admin, &AdminRequest::Transition { flat_id_bits: None }).await.unwrap();
    assert!(matches!(&response, AdminResponse::Transitioned { scheme, .. } if scheme.starts_with("Tree")), "{response:?}");
    let tree = until_in_sync(&group, &[&a, &b]).await;
    assert_ne!(tree, flat, "the tree's root is a new key");
    let (c, _ec) = group.join("member-3").await.unwrap();
    let tree_after_join = until_in_sync(&group, &[&a, &b, &c]).await;

    let response = group.admin_request(&group.admin, &AdminRequest::Transition { flat_id_bits: Some(3) }).await.unwrap();
    assert!(matches!(&response, AdminResponse::Transitioned { scheme, .. } if scheme.starts_with("Flat")), "{response:?}");
    let flat_again = until_in_sync(&group, &[&a, &b, &c]).await;
    assert_ne!(flat_again, tree_after_join, "the fresh table's TEK is a new key");

    // A restart replays the switches from the log: members stay in sync with no rekey.
    group.kill_server().await;
    group.start_server().await.unwrap();
    assert_eq!(until_in_sync(&group, &[&a, &b, &c]).await, flat_again, "the restart rebuilt another key");
}
