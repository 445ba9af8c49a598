//! Two running groups merge and split over real sockets on loopback (Caronni et al. 3.5,
//! docs/merge.md), ordered over the admin channel as `keycast admin merge|split` does: members of both groups follow the merge notice to the left controller and
//! its multicast group without rejoining, their data reaches the other group's members, the
//! merged controller restarts from its log, a member leaves while merged, and after the split
//! each side follows its own controller again and reads nothing of the other's.

use std::time::Duration;

use keycast_core::protocol::GroupPolicy;
use keycast_core::wire::GroupId;
use keycast_core::{FlatIds, KeyRef, Scheme};
use keycast_net::admin::{AdminRequest, AdminResponse};
use keycast_net::client::{ClientEvent, MemberClient};
use keycast_net::local::{loopback_policy, Events, LocalGroup};
use tokio::time::{sleep, timeout, Instant};

const LEFT: GroupId = GroupId(61);
const RIGHT: GroupId = GroupId(62);
const LEFT_NAME: &str = "left.keycast.test";
const RIGHT_NAME: &str = "right.keycast.test";

fn policy(group: GroupId) -> GroupPolicy {
    loopback_policy(group)
}

/// Waits until every member of `members` is in `group` with one active key, not `old`.
async fn until_one_key(members: &[&MemberClient], group: GroupId, old: Option<KeyRef>) -> KeyRef {
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let keys: Vec<_> = members.iter().map(|m| (m.group(), m.getkey().map(|(r, _)| r))).collect();
        if keys.iter().all(|k| k.0 == group && k.1.is_some() && k.1 == keys[0].1 && k.1 != old) {
            return keys[0].1.unwrap();
        }
        assert!(Instant::now() < deadline, "members never agreed on one key of group {}: {keys:?}", group.0);
        sleep(Duration::from_millis(20)).await;
    }
}

/// How many of `readers` open a message `from` seals.
fn readers_of(from: &MemberClient, readers: &[&MemberClient]) -> usize {
    let message = from.seal(b"quote").unwrap();
    readers.iter().filter(|m| m.open(&message).ok().as_deref() == Some(&b"quote"[..])).count()
}

/// Waits for `text` among the data events of `events` (skipping member events).
async fn receives(events: &mut Events, text: &[u8]) -> bool {
    timeout(Duration::from_secs(3), async {
        while let Some(event) = events.recv().await {
            if event == ClientEvent::Data(text.to_vec()) {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_live_groups_merge_share_traffic_lose_a_member_and_split() {
    let (left_dir, right_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut left = LocalGroup::prepare(policy(LEFT), 4, left_dir.path().to_path_buf()).unwrap();
    let mut right = LocalGroup::prepare_sharing(policy(RIGHT), 0, right_dir.path().to_path_buf(), left.authority.clone()).unwrap();
    right.acl = (1..=3).map(|i| format!("right-{i}")).collect();
    // Each controller's certificate carries its own name alone, as on two hosts: a member that
    // kept its configured name after a move could not reach the other controller.
    left.name_controller(LEFT_NAME).unwrap();
    right.name_controller(RIGHT_NAME).unwrap();
    right.trust_merge_peer(&left).unwrap();
    left.start_server().await.unwrap();
    right.start_server().await.unwrap();
    let mut lefts = left.join_all((1..=3).map(|i| format!("member-{i}"))).await.unwrap();
    let mut rights = right.join_all((1..=3).map(|i| format!("right-{i}"))).await.unwrap();
    {
        let l: Vec<&MemberClient> = lefts.iter().map(|(m, _)| m).collect();
        let r: Vec<&MemberClient> = rights.iter().map(|(m, _)| m).collect();
        until_one_key(&l, LEFT, None).await;
        until_one_key(&r, RIGHT, None).await;
        assert_eq!(readers_of(l[0], &r), 0, "two groups, two keys");
    }

    let merged = LocalGroup::merge(&left, &right).await.unwrap();
    println!("merge: {merged}");
    let merged_key = {
        let everyone: Vec<&MemberClient> = lefts.iter().chain(&rights).map(|(m, _)| m).collect();
        let key = until_one_key(&everyone, LEFT, None).await;
        let (l, r) = everyone.split_at(3);
        // The right ids moved past the left controller's (it had issued 1..=3).
        assert!(r.iter().all(|m| m.controller() == left.addr() && m.member().0 > 3), "right members follow the left controller");
        assert!(r.iter().all(|m| m.server_name() == LEFT_NAME), "under the name the notice gives");
        assert_eq!(readers_of(l[0], r), 3, "left to right");
        assert_eq!(readers_of(r[1], l), 3, "right to left");
        key
    };
    // Over the merged multicast group: a right member's data reaches a left member.
    rights[0].0.send(b"from the right").await.unwrap();
    assert!(receives(&mut lefts[0].1, b"from the right").await, "a left member received a right member's multicast");

    // The merged group's controller restarts from its log (the merge record replayed).
    left.kill_server().await;
    left.start_server().await.unwrap();
    assert_eq!(left.server().members().await.len(), 6, "the restarted controller runs the merged group");

    // A right member leaves while merged: its request goes to the merged group's controller,
    // under that one's server name.
    let (gone, _) = rights.remove(2);
    let gone_key = gone.getkey().unwrap();
    gone.leave().await.unwrap();
    let after_leave = {
        let everyone: Vec<&MemberClient> = lefts.iter().chain(&rights).map(|(m, _)| m).collect();
        until_one_key(&everyone, LEFT, Some(merged_key)).await
    };
    assert_ne!(after_leave, gone_key.0);
    assert_eq!(left.server().members().await.len(), 5);

    let split = LocalGroup::split(&left, &right).await.unwrap();
    println!("split: {split}");
    let l: Vec<&MemberClient> = lefts.iter().map(|(m, _)| m).collect();
    let r: Vec<&MemberClient> = rights.iter().map(|(m, _)| m).collect();
    until_one_key(&l, LEFT, Some(after_leave)).await;
    until_one_key(&r, RIGHT, Some(after_leave)).await;
    // The two sides' keys may share a name (each group names its keys alone), never a value.
    assert!(l[0].getkey().unwrap().1 != r[0].getkey().unwrap().1);
    assert!(r.iter().all(|m| m.controller() == right.addr() && m.server_name() == RIGHT_NAME), "right members follow their own controller again");
    assert_eq!(right.server().members().await.len(), 2, "right-1 and right-2 are back");
    assert_eq!(readers_of(l[0], &r), 0, "the right side reads nothing of the left's new key");
    assert_eq!(readers_of(r[0], &l), 0, "the left side reads nothing of the right's new key");
    assert_eq!(readers_of(l[0], &l[1..]), 2);
    assert_eq!(readers_of(r[0], &r[1..]), 1);
    rights[0].0.send(b"right again").await.unwrap();
    assert!(receives(&mut rights[1].1, b"right again").await, "the right group's multicast works again");
    // And reach their controller over TLS again, under its name.
    let before = rights[0].0.getkey().unwrap().0;
    let (back, _) = rights.remove(1);
    back.leave().await.unwrap();
    until_one_key(&[&rights[0].0], RIGHT, Some(before)).await;
    assert_eq!(right.server().members().await.len(), 1);
}

/// A merge the absorbing controller refuses (one identity in both groups) leaves both groups
/// as they were: the absorbed one is told to go on, and its next join is served at once (its
/// batches would otherwise wait for the hand-off).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_merge_leaves_both_groups_running() {
    let (left_dir, right_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut left = LocalGroup::prepare(policy(LEFT), 2, left_dir.path().to_path_buf()).unwrap();
    let mut right = LocalGroup::prepare_sharing(policy(RIGHT), 2, right_dir.path().to_path_buf(), left.authority.clone()).unwrap();
    right.trust_merge_peer(&left).unwrap();
    left.start_server().await.unwrap();
    right.start_server().await.unwrap();
    let (left_member, _l) = left.join("member-1").await.unwrap();
    let (right_member, _r) = right.join("member-1").await.unwrap();
    let error = LocalGroup::merge(&left, &right).await.unwrap_err();
    assert!(error.contains("identity"), "{error}");
    let (joiner, _j) = timeout(Duration::from_secs(5), right.join("member-2")).await.expect("the right group batches again").unwrap();
    let r = [&right_member, &joiner];
    until_one_key(&r, RIGHT, None).await;
    until_one_key(&[&left_member], LEFT, None).await;
    assert_eq!(readers_of(&left_member, &r), 0, "still two groups");
}

/// `keycast admin transition tree`.
async fn switch_to_tree(group: &LocalGroup) {
    let response = group.admin_request(&group.admin, &AdminRequest::Transition { flat_id_bits: None }).await.unwrap();
    assert!(matches!(&response, AdminResponse::Transitioned { scheme, .. } if scheme.starts_with("Tree")), "{response:?}");
}

/// Groups configured flat merge once they switched to a tree (`keycast admin transition tree`),
/// as trees, over the admin channel; while either still runs a flat table the merge is refused
/// and both go on. After the split the right controller, back on the tree it switched to,
/// restarts from its snapshot with its members' keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_switched_from_flat_to_a_tree_merge_and_split() {
    let flat = |group| {
        let mut policy = policy(group);
        policy.graph.scheme = Scheme::Flat { id_bits: 4, ids: FlatIds::Sequential };
        policy
    };
    let (left_dir, right_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut left = LocalGroup::prepare(flat(LEFT), 2, left_dir.path().to_path_buf()).unwrap();
    let mut right = LocalGroup::prepare_sharing(flat(RIGHT), 0, right_dir.path().to_path_buf(), left.authority.clone()).unwrap();
    right.acl = (1..=2).map(|i| format!("right-{i}")).collect();
    right.trust_merge_peer(&left).unwrap();
    left.start_server().await.unwrap();
    right.start_server().await.unwrap();
    let lefts = left.join_all((1..=2).map(|i| format!("member-{i}"))).await.unwrap();
    let rights = right.join_all((1..=2).map(|i| format!("right-{i}"))).await.unwrap();
    let l: Vec<&MemberClient> = lefts.iter().map(|(m, _)| m).collect();
    let r: Vec<&MemberClient> = rights.iter().map(|(m, _)| m).collect();
    let left_flat = until_one_key(&l, LEFT, None).await;
    let right_flat = until_one_key(&r, RIGHT, None).await;

    let error = LocalGroup::merge(&left, &right).await.unwrap_err();
    assert!(error.contains("flat"), "the right group runs a flat table: {error}");
    switch_to_tree(&right).await;
    let right_tree = until_one_key(&r, RIGHT, Some(right_flat)).await;
    let error = LocalGroup::merge(&left, &right).await.unwrap_err();
    assert!(error.contains("flat"), "the left group runs a flat table: {error}");
    switch_to_tree(&left).await;
    until_one_key(&l, LEFT, Some(left_flat)).await;

    LocalGroup::merge(&left, &right).await.unwrap();
    let everyone: Vec<&MemberClient> = l.iter().chain(&r).copied().collect();
    let merged = until_one_key(&everyone, LEFT, None).await;
    assert_eq!(readers_of(l[0], &r), 2, "left to right");
    assert_eq!(readers_of(r[1], &l), 2, "right to left");

    LocalGroup::split(&left, &right).await.unwrap();
    until_one_key(&l, LEFT, Some(merged)).await;
    let right_key = until_one_key(&r, RIGHT, Some(merged)).await;
    assert_ne!(right_key, right_tree);
    assert_eq!(readers_of(l[0], &r), 0, "two groups again");
    assert_eq!(readers_of(r[0], &l), 0);
    assert_eq!(readers_of(r[0], &r[1..]), 1, "the right side reads itself");
    right.kill_server().await;
    right.start_server().await.unwrap();
    assert_eq!(right.server().members().await.len(), 2, "the right controller restarted from its snapshot");
    assert_eq!(until_one_key(&r, RIGHT, None).await, right_key, "the restart keeps the right side's key");
}

/// A group's state goes only to the controllers its `merge_peers` lists: an administrator that
/// asks for it directly is refused (it would learn every key of the group), and so is a merge
/// into a controller the group does not list, which leaves both groups running. Listed, the
/// same controller merges it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_groups_keys_go_only_to_its_merge_peers() {
    let (left_dir, right_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut left = LocalGroup::prepare(policy(LEFT), 1, left_dir.path().to_path_buf()).unwrap();
    let mut right = LocalGroup::prepare_sharing(policy(RIGHT), 0, right_dir.path().to_path_buf(), left.authority.clone()).unwrap();
    right.acl = ["right-1".to_owned()].into();
    left.start_server().await.unwrap();
    right.start_server().await.unwrap();
    let (left_member, _l) = left.join("member-1").await.unwrap();
    let (right_member, _r) = right.join("right-1").await.unwrap();
    for step in [AdminRequest::MergeSide, AdminRequest::AbortMerge, AdminRequest::Resume { frames: 0 }, AdminRequest::HandOff { frames: 0 }] {
        let answer = right.admin_request(&right.admin, &step).await;
        assert!(matches!(&answer, Ok(AdminResponse::Error(e)) if e.contains("not a merge peer")), "{step:?} from an administrator: {answer:?}");
    }
    let error = LocalGroup::merge(&left, &right).await.unwrap_err();
    assert!(error.contains("nor a merge peer"), "{error}");
    until_one_key(&[&right_member], RIGHT, None).await;
    assert_eq!(readers_of(&left_member, &[&right_member]), 0, "still two groups");
    right.trust_merge_peer(&left).unwrap();
    right.kill_server().await;
    right.start_server().await.unwrap();
    LocalGroup::merge(&left, &right).await.unwrap();
    until_one_key(&[&left_member, &right_member], LEFT, None).await;
    assert_eq!(readers_of(&left_member, &[&right_member]), 1, "merged");
}
