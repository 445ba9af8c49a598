//! Two running controllers merge and split (Caronni et al. 3.5, docs/merge.md), over the
//! sans-IO layer: the left controller absorbs the right one's group, runs the merged group
//! (joins and leaves, a restart from its log and from a snapshot), then splits it and the
//! right controller resumes. Members of both groups are `MemberSession`s that only ever take
//! the multicast of the channel they follow: nobody rejoins, data crosses the two former
//! groups exactly while they are merged, and members who left read nothing after.

use std::net::SocketAddr;

use keycast_core::protocol::merge::Contact;
use keycast_core::protocol::{ControllerError, MemberEvent, Output, Record};
use keycast_core::wire::{GroupId, MessageType};
use keycast_core::{GraphConfig, JoinPolicy, MemberId, Scheme};

mod common;

use common::{departed_read, names, policy, reach, Pair, Side, T0};

const LEFT: GroupId = GroupId(1);
const RIGHT: GroupId = GroupId(2);

type World = common::World<Pair>;

/// Where members reach a controller: TLS at `port`, multicast at the next port, and the
/// server name of its certificate, each controller's own.
fn addresses(port: u16) -> Contact {
    Contact {
        controller: SocketAddr::from(([127, 0, 0, 1], port)),
        server_name: format!("controller-{port}.keycast.test").parse().unwrap(),
        multicast: SocketAddr::from(([239, 255, 0, 9], port + 1)),
    }
}

/// The events `member` reports for the merge or split notice among `sent`.
fn moved_by_notice(world: &mut World, member: &str, sent: &[Vec<u8>]) -> Vec<MemberEvent> {
    let notice = sent.iter().find(|d| d.get(1) == Some(&(MessageType::MergeNotice as u8))).expect("a notice was sent");
    world.members.get_mut(member).unwrap().receive(notice, world.now).unwrap()
}

/// Two groups' controllers at [`T0`], no member yet.
fn two_groups(left: Side, right: Side) -> World {
    World::new(Pair { left, right }, 0xa5, 100)
}

/// The left controller absorbs the right one's group and the right one hands off (nothing
/// delivered yet); the ticket.
fn merge(world: &mut World) -> keycast_core::protocol::merge_state::MergeTicket {
    let side = world.sides.right.controller.merge_side(addresses(7000)).unwrap();
    let (now, entropy) = (world.now, world.entropy());
    let (out, ticket) = world.sides.left.controller.absorb(side, addresses(7100), now, entropy).unwrap();
    world.sides.left.take(out);
    let out = world.sides.right.controller.hand_off(&ticket).unwrap();
    world.sides.right.take(out);
    ticket
}

#[test]
fn two_live_groups_merge_run_restart_and_split_without_rejoining() {
    let (lefts, rights) = (names("left", 4), names("right", 3));
    let left_acl: Vec<String> = lefts.iter().cloned().chain(["joiner-a".into(), "joiner-b".into()]).collect();
    // The joiners are in the right group's ACL too: the one placed on the right stays there
    // after the split (one the right ACL does not list is removed, see below).
    let right_acl: Vec<String> = rights.iter().cloned().chain(["joiner-a".into(), "joiner-b".into()]).collect();
    let mut world = two_groups(Side::new(policy(LEFT, Scheme::Tree { degree: 3 }), &left_acl, 1), Side::new(policy(RIGHT, Scheme::Tree { degree: 2 }), &right_acl, 11));
    for name in &lefts {
        world.join(name, LEFT);
    }
    for name in &rights {
        world.join(name, RIGHT);
    }
    world.tick(300);
    let (l, r): (Vec<&str>, Vec<&str>) = (lefts.iter().map(String::as_str).collect(), rights.iter().map(String::as_str).collect());
    assert_eq!(reach(&mut world.members, &l, &r, 1), 0, "two groups, two keys");

    // The merge: the right controller's state into the left one, then the right's notice.
    let side = world.sides.right.controller.merge_side(addresses(7000)).unwrap();
    let (now, entropy) = (world.now, world.entropy());
    let (out, ticket) = world.sides.left.controller.absorb(side, addresses(7100), now, entropy).unwrap();
    assert!(matches!(&out[0], Output::Persist(Record::Merged(_))), "the merge is logged before it is sent");
    world.sides.left.take(out);
    let out = world.sides.right.controller.hand_off(&ticket).unwrap();
    world.sides.right.take(out);
    let merge_notice = world.sides.right.sent[0].clone();
    let sizes: Vec<usize> = world.sides.right.sent.iter().map(Vec::len).collect();
    // A right member is sent to the left controller under the name in that one's certificate.
    let sent = world.sides.right.sent.clone();
    let events = moved_by_notice(&mut world, "right-0", &sent);
    assert!(
        matches!(&events[..], [MemberEvent::Moved { group: LEFT, controller, server_name, .. }] if *controller == addresses(7100).controller && *server_name == addresses(7100).server_name),
        "{events:?}"
    );
    println!("merge: {} datagrams on the left channel, {:?} bytes on the right channel (notice, then rekey)", world.sides.left.sent.len(), sizes);
    // right-2 misses the notice and the rekey: the right controller's heartbeats repeat the
    // notice, and the merged group's heartbeats then tell it to resync with the left controller.
    world.deliver_except(&["right-2"]);
    assert_eq!(world.members["right-2"].group(), RIGHT);
    world.tick(200);
    let merged_key = world.sides.left.controller.active_key(world.sides.left.controller.epoch_at(world.now));
    assert!(world.keys().values().all(|k| *k == merged_key), "every member holds the merged key: {:?}", world.keys());
    assert!(world.members.values().all(|s| s.group() == LEFT), "the right members follow the merged group");
    assert!(rights.iter().all(|n| world.members[n].member().0 >= ticket.offset), "right ids moved past the left's");
    assert_eq!(reach(&mut world.members, &l, &r, 2), 12, "left to right");
    assert_eq!(reach(&mut world.members, &r, &l, 3), 12, "right to left");
    // The absorbed controller serves its group no more.
    assert!(world.sides.right.controller.join(99, "right-0", RIGHT, world.now).is_err());

    // Churn in the merged group: a leave on each side, two joiners (one lands on each side).
    world.sides.left.controller.set_snapshot_interval(2);
    world.leave("left-3");
    world.leave("right-2");
    world.tick(300);
    world.join("joiner-a", LEFT);
    world.join("joiner-b", LEFT);
    world.tick(300);
    let merged_key = world.sides.left.controller.active_key(world.sides.left.controller.epoch_at(world.now));
    assert!(world.keys().values().all(|k| *k == merged_key), "{:?} vs {merged_key}", world.keys());
    assert_eq!(world.sides.left.controller.members().len(), 7);
    assert_eq!(departed_read(&mut world, 4), 0, "members who left read nothing");
    assert!(matches!(world.sides.left.log[0], Record::Snapshot(_)), "a snapshot was taken while merged");

    // A restart from the log (a snapshot while merged, and the batches after it), or from the
    // whole history (the merge replayed from its record), holds the same keys.
    let now = world.now;
    for log in [world.sides.left.log.clone(), world.sides.left.history.clone()] {
        let mut restarted = world.sides.left.restarted(&log, now);
        assert!(restarted.is_merged());
        assert_eq!(restarted.traffic_keys(now).keys, world.sides.left.controller.traffic_keys(now).keys);
        for (name, session) in &world.members {
            let theirs = world.sides.left.controller.resync(name, session.member(), 0, now).unwrap();
            let ours = restarted.resync(name, session.member(), 0, now).unwrap();
            assert_eq!(theirs.keys.len(), ours.keys.len());
            assert!(theirs.keys.iter().zip(&ours.keys).all(|(a, b)| a.0 == b.0 && a.1 == b.1), "{name}'s keys after the restart");
        }
        world.sides.left.controller = restarted;
    }

    // The split: the right side goes back to its controller, each side takes a new key.
    let (now, entropy) = (world.now, world.entropy());
    let (out, handback) = world.sides.left.controller.split(now, entropy).unwrap();
    world.sides.left.take(out);
    let split_sizes: Vec<usize> = world.sides.left.sent.iter().map(Vec::len).collect();
    // The split sends the right members back under the right controller's own name.
    let sent = world.sides.left.sent.clone();
    let events = moved_by_notice(&mut world, "right-0", &sent);
    assert!(
        matches!(&events[..], [MemberEvent::Moved { group: RIGHT, controller, server_name, .. }] if *controller == addresses(7000).controller && *server_name == addresses(7000).server_name),
        "{events:?}"
    );
    assert_eq!(handback.members.len(), 3, "right-0, right-1 and the joiner on the right");
    let out = world.sides.right.controller.resume(handback, now, [5; 32]).unwrap();
    assert!(matches!(&out[0], Output::Persist(Record::Snapshot(_))));
    world.sides.right.take(out);
    println!("split: {split_sizes:?} bytes on the merged channel (notice, then the left rekey), {:?} on the right channel", world.sides.right.sent.iter().map(Vec::len).collect::<Vec<_>>());
    let right_rekey = std::mem::take(&mut world.sides.right.sent);
    world.deliver();
    // Back on the right channel before the split's rekey, the right members refuse the merge
    // notice again (a replay, or a late repeat with the right controller's old heartbeats).
    for name in ["right-0", "right-1", "joiner-a", "joiner-b"] {
        let session = world.members.get_mut(name).unwrap();
        if session.group() == RIGHT {
            assert!(session.receive(&merge_notice, world.now).is_err(), "{name} took a stale merge notice");
        }
    }
    world.sides.right.sent = right_rekey;
    world.deliver();
    let epoch = |side: &Side, now| side.controller.active_key(side.controller.epoch_at(now));
    let (left_key, right_key) = (epoch(&world.sides.left, world.now), epoch(&world.sides.right, world.now));
    let on = |world: &World, g| world.members.iter().filter(|(_, s)| s.group() == g).map(|(n, _)| n.clone()).collect::<Vec<_>>();
    let (now_left, now_right) = (on(&world, LEFT), on(&world, RIGHT));
    assert_eq!((now_left.len(), now_right.len()), (4, 3));
    for name in &now_left {
        assert_eq!(world.members[name].active_key().unwrap().0, left_key, "{name}");
    }
    for name in &now_right {
        let session = &world.members[name];
        assert_eq!(session.active_key().unwrap().0, right_key, "{name}");
        assert_eq!(world.sides.right.controller.member_by_identity(name), Some(session.member()), "{name} has its right id back");
    }
    let (nl, nr): (Vec<&str>, Vec<&str>) = (now_left.iter().map(String::as_str).collect(), now_right.iter().map(String::as_str).collect());
    assert_eq!(reach(&mut world.members, &nl, &nr, 5), 0, "two groups again");
    assert_eq!(reach(&mut world.members, &nr, &nl, 6), 0);
    assert_eq!(reach(&mut world.members, &nl, &nl, 7), 12, "each side reads itself");
    assert_eq!(reach(&mut world.members, &nr, &nr, 8), 6);
    assert_eq!(departed_read(&mut world, 9), 0);

    // Both controllers go on: a leave on the right, a restart of the right from its snapshot.
    world.leave(&now_right[0]);
    world.tick(300);
    let right_key = epoch(&world.sides.right, world.now);
    assert!(now_right[1..].iter().all(|n| world.members[n].active_key().unwrap().0 == right_key));
    assert_eq!(departed_read(&mut world, 10), 0);
    let restarted = world.sides.right.restarted(&world.sides.right.log, world.now);
    assert_eq!(restarted.traffic_keys(world.now).keys, world.sides.right.controller.traffic_keys(world.now).keys);
    assert!(world.sides.left.controller.split(world.now, [7; 32]).is_err(), "split once");
}

#[test]
fn merges_that_would_confuse_the_groups_are_refused() {
    let both = vec!["same".to_string()];
    let mut left = Side::new(policy(LEFT, Scheme::Star), &both, 1);
    let mut right = Side::new(policy(RIGHT, Scheme::Tree { degree: 2 }), &both, 5);
    for side in [&mut left, &mut right] {
        let group = side.policy.group;
        side.controller.join(1, "same", group, T0).unwrap();
        let out = side.controller.tick(T0 + 500, [3; 32]).unwrap();
        side.take(out);
    }
    let side = right.controller.merge_side(addresses(7000)).unwrap();
    let refused = left.controller.absorb(side.clone(), addresses(7100), T0 + 600, [4; 32]);
    assert!(matches!(refused, Err(ControllerError::Merge(_))), "one identity in both groups");
    assert!(!left.controller.is_merged());
    let flat = policy(GroupId(3), Scheme::Flat { id_bits: 8, ids: keycast_core::FlatIds::Sequential });
    let mut flat = Side::new(flat, &[], 21);
    assert!(matches!(flat.controller.absorb(side, addresses(7200), T0 + 600, [4; 32]), Err(ControllerError::Merge(_))), "a flat group absorbs nothing");
    assert!(left.controller.split(T0 + 700, [5; 32]).is_err(), "not merged");
    // The right side changed after its state was taken: its hand-off is refused.
    let out = right.controller.leave("same", MemberId(1)).unwrap();
    right.take(out);
    let side = right.controller.merge_side(addresses(7000)).unwrap();
    let mut other = Side::new(policy(GroupId(4), Scheme::Tree { degree: 2 }), &[], 31);
    let (_, ticket) = other.controller.absorb(side, addresses(7300), T0 + 700, [6; 32]).unwrap();
    let out = right.controller.tick(T0 + 900, [7; 32]).unwrap();
    right.take(out);
    assert!(matches!(right.controller.hand_off(&ticket), Err(ControllerError::Merge(_))));
}

/// A world of two groups of three members each, configured with `left` and `right`.
fn world_of(left: Scheme, right: Scheme) -> (World, Vec<String>, Vec<String>) {
    let (lefts, rights) = (names("left", 3), names("right", 3));
    let mut world = two_groups(Side::new(policy(LEFT, left), &lefts, 1), Side::new(policy(RIGHT, right), &rights, 11));
    for name in &lefts {
        world.join(name, LEFT);
    }
    for name in &rights {
        world.join(name, RIGHT);
    }
    world.tick(300);
    (world, lefts, rights)
}

/// Every member holds the key in force of the controller it follows.
fn assert_members_hold_their_keys(world: &World, step: &str) {
    for (name, session) in &world.members {
        let side = if session.group() == LEFT { &world.sides.left } else { &world.sides.right };
        let key = side.controller.active_key(side.controller.epoch_at(world.now));
        assert_eq!(session.active_key().map(|k| k.0), Some(key), "{step}: {name}");
    }
}

const TREE_OF_SWITCH: Scheme = Scheme::Tree { degree: 2 };

#[test]
fn groups_that_switched_to_a_tree_merge_run_restart_and_split() {
    // Left: configured flat, switched to a tree. Right: configured a degree-3 tree, switched to
    // a flat table and back to a (binary) tree, so its tree is not its configured one either.
    let flat = Scheme::Flat { id_bits: 3, ids: keycast_core::FlatIds::Sequential };
    let (mut world, lefts, rights) = world_of(flat, Scheme::Tree { degree: 3 });
    let out = world.sides.left.controller.switch_to_tree(world.now).unwrap();
    world.sides.left.take(out);
    let (now, entropy) = (world.now, world.entropy());
    let out = world.sides.right.controller.switch_to_flat(3, now, entropy).unwrap();
    world.sides.right.take(out);
    world.tick(300);
    assert_members_hold_their_keys(&world, "after the switches");
    let refused = world.sides.right.controller.merge_side(addresses(7000));
    assert!(matches!(refused, Err(ControllerError::Merge(_))), "a group running a flat table does not merge");
    let out = world.sides.right.controller.switch_to_tree(world.now).unwrap();
    world.sides.right.take(out);
    world.tick(300);
    assert_members_hold_their_keys(&world, "right back on a tree");
    assert_eq!(world.sides.left.controller.scheme().scheme, TREE_OF_SWITCH);
    assert_eq!(world.sides.right.controller.scheme().scheme, TREE_OF_SWITCH);

    // The merge, as between two configured trees.
    merge(&mut world);
    world.tick(200);
    assert!(world.members.values().all(|s| s.group() == LEFT), "the right members follow the merged group");
    assert_members_hold_their_keys(&world, "merged");
    let (l, r): (Vec<&str>, Vec<&str>) = (lefts.iter().map(String::as_str).collect(), rights.iter().map(String::as_str).collect());
    assert_eq!(reach(&mut world.members, &l, &r, 1), 9, "left to right");
    assert_eq!(reach(&mut world.members, &r, &l, 2), 9, "right to left");
    // A switch while merged (or handed off) stays refused: the merged tree is kept until the split.
    assert!(matches!(world.sides.left.controller.switch_to_flat(3, world.now, [1; 32]), Err(ControllerError::Switch(_))));
    assert!(matches!(world.sides.left.controller.switch_to_tree(world.now), Err(ControllerError::Switch(_))));
    assert!(matches!(world.sides.right.controller.switch_to_flat(3, world.now, [1; 32]), Err(ControllerError::Switch(_))));

    // A leave on each side while merged; restarts from the log (a snapshot taken while merged)
    // and from the whole history (both switches and the merge replayed) hold the same keys.
    world.sides.left.controller.set_snapshot_interval(1);
    world.leave("left-2");
    world.leave("right-2");
    world.tick(300);
    assert_members_hold_their_keys(&world, "after the leaves");
    assert_eq!(departed_read(&mut world, 3), 0, "members who left read nothing");
    assert!(matches!(world.sides.left.log[0], Record::Snapshot(_)), "a snapshot was taken while merged");
    let now = world.now;
    for log in [world.sides.left.log.clone(), world.sides.left.history.clone()] {
        let mut restarted = world.sides.left.restarted(&log, now);
        assert!(restarted.is_merged());
        assert_eq!(restarted.scheme(), world.sides.left.controller.scheme());
        assert_eq!(restarted.traffic_keys(now).keys, world.sides.left.controller.traffic_keys(now).keys);
        for (name, session) in &world.members {
            let theirs = world.sides.left.controller.resync(name, session.member(), 0, now).unwrap();
            let ours = restarted.resync(name, session.member(), 0, now).unwrap();
            assert!(theirs.keys.len() == ours.keys.len() && theirs.keys.iter().zip(&ours.keys).all(|(a, b)| a.0 == b.0 && a.1 == b.1), "{name}'s keys after the restart");
        }
        world.sides.left.controller = restarted;
    }

    // The split: the right side goes back to its controller with the tree it switched to.
    let (now, entropy) = (world.now, world.entropy());
    let (out, handback) = world.sides.left.controller.split(now, entropy).unwrap();
    world.sides.left.take(out);
    let handback = keycast_core::protocol::merge_state::Handback::decode(&handback.encode()).expect("through the admin channel's encoding");
    let out = world.sides.right.controller.resume(handback, now, [5; 32]).unwrap();
    world.sides.right.take(out);
    world.tick(200);
    assert_members_hold_their_keys(&world, "after the split");
    let (left_now, right_now) = (["left-0", "left-1"], ["right-0", "right-1"]);
    assert!(right_now.iter().all(|n| world.members[*n].group() == RIGHT && world.sides.right.controller.member_by_identity(n) == Some(world.members[*n].member())));
    assert_eq!(reach(&mut world.members, &left_now, &right_now, 4), 0, "two groups again");
    assert_eq!(reach(&mut world.members, &right_now, &left_now, 5), 0);
    assert_eq!(reach(&mut world.members, &right_now, &right_now, 6), 2, "the right side reads itself");
    assert_eq!(world.sides.right.controller.scheme().scheme, TREE_OF_SWITCH);
    let restarted = world.sides.right.restarted(&world.sides.right.log, world.now);
    assert_eq!(restarted.scheme(), world.sides.right.controller.scheme());
    assert_eq!(restarted.traffic_keys(world.now).keys, world.sides.right.controller.traffic_keys(world.now).keys);
}

#[test]
fn groups_running_a_flat_table_neither_absorb_nor_are_absorbed() {
    // Left: configured a tree, switched to a flat table. Right: configured flat.
    let flat = Scheme::Flat { id_bits: 3, ids: keycast_core::FlatIds::Sequential };
    let (mut world, _, _) = world_of(Scheme::Tree { degree: 2 }, flat);
    let (now, entropy) = (world.now, world.entropy());
    let out = world.sides.left.controller.switch_to_flat(3, now, entropy).unwrap();
    world.sides.left.take(out);
    world.tick(300);
    assert!(matches!(world.sides.right.controller.merge_side(addresses(7000)), Err(ControllerError::Merge(_))), "a configured flat group");
    let tree = Side::new(policy(GroupId(3), Scheme::Tree { degree: 2 }), &[], 21);
    let side = tree.controller.merge_side(addresses(7200)).unwrap();
    let refused = world.sides.left.controller.absorb(side.clone(), addresses(7100), world.now, [4; 32]);
    assert!(matches!(refused, Err(ControllerError::Merge(_))), "a tree group switched to a flat table: {refused:?}");
    assert!(!world.sides.left.controller.is_merged());
    // A side whose graph is a flat table is refused too, whatever it claims to be.
    let mut forged = side;
    let config = GraphConfig { scheme: flat, join_policy: JoinPolicy::NewVersion };
    forged.graph = keycast_core::new_graph(config, &keycast_core::BatchSeed::from_u64(1)).unwrap().export();
    let mut other = Side::new(policy(GroupId(4), Scheme::Tree { degree: 2 }), &[], 31);
    let refused = other.controller.absorb(forged, addresses(7300), world.now, [5; 32]);
    assert!(matches!(refused, Err(ControllerError::Merge(_))), "a flat graph in a merge side: {refused:?}");
    assert!(!other.controller.is_merged());
}

/// A right member away (every datagram lost) for longer than the merge notice's 16 repeats
/// finds its group when it comes back: the absorbed controller's heartbeats carry the notice
/// for as long as its group is merged, so the member follows it to the merged group and
/// resyncs there, instead of following a controller that serves it no more.
#[test]
fn a_member_away_through_the_whole_merge_finds_the_merged_group_when_it_returns() {
    let (lefts, rights) = (names("left", 2), names("right", 2));
    let tree = Scheme::Tree { degree: 2 };
    let mut world = two_groups(Side::new(policy(LEFT, tree), &lefts, 3), Side::new(policy(RIGHT, tree), &rights, 13));
    world.join_all(&lefts, LEFT);
    world.join_all(&rights, RIGHT);
    world.tick(300);
    let away = world.members.remove("right-1").unwrap();
    merge(&mut world);
    // Twenty heartbeat intervals: every repeat of the notice goes by.
    world.tick(20 * policy(RIGHT, tree).heartbeat_ms);
    assert_eq!(world.members["right-0"].group(), LEFT, "the member that stayed followed at once");
    world.members.insert("right-1".into(), away);
    world.tick(500);
    let merged_key = world.sides.left.controller.active_key(world.sides.left.controller.epoch_at(world.now));
    assert_eq!(world.members["right-1"].group(), LEFT, "the member back from away follows the merged group");
    assert!(world.keys().values().all(|k| *k == merged_key), "every member holds the merged key: {:?}", world.keys());
    assert_eq!(reach(&mut world.members, &["right-1"], &["left-0", "left-1", "right-0"], 9), 3, "its data reaches the merged group");
}

/// While merged the merged controller's ACL decides joins, and a joiner it places on the right
/// goes back with the right group at the split. The right controller keeps only members its
/// own ACL lists: one it does not list is removed at once when it resumes (one batch), holds no
/// key of the right group after, and reads none of its data.
#[test]
fn at_the_split_the_right_controller_removes_joiners_its_acl_does_not_list() {
    let (lefts, rights) = (names("left", 3), names("right", 1));
    let left_acl: Vec<String> = lefts.iter().cloned().chain(["outsider".into()]).collect();
    let tree = Scheme::Tree { degree: 2 };
    let mut world = two_groups(Side::new(policy(LEFT, tree), &left_acl, 5), Side::new(policy(RIGHT, tree), &rights, 15));
    world.join_all(&lefts, LEFT);
    world.join_all(&rights, RIGHT);
    world.tick(300);
    merge(&mut world);
    world.tick(300);
    // The right side is the smaller one: the joiner lands there.
    world.join("outsider", LEFT);
    world.tick(300);
    let (now, entropy) = (world.now, world.entropy());
    let (out, handback) = world.sides.left.controller.split(now, entropy).unwrap();
    world.sides.left.take(out);
    assert!(handback.members.iter().any(|(_, identity)| identity == "outsider"), "the joiner was placed on the right");
    let out = world.sides.right.controller.resume(handback, now, [6; 32]).unwrap();
    world.sides.right.take(out);
    world.tick(300);
    assert_eq!(world.sides.right.controller.member_by_identity("outsider"), None, "removed at the resume");
    assert_eq!(world.sides.right.controller.members().len(), 1);
    let right_key = world.sides.right.controller.active_key(world.sides.right.controller.epoch_at(world.now));
    assert_eq!(world.members["right-0"].active_key().unwrap().0, right_key);
    assert_ne!(world.members["outsider"].active_key().map(|(r, _)| r), Some(right_key), "the outsider holds the right key");
    assert_eq!(reach(&mut world.members, &["right-0"], &["outsider"], 11), 0, "the outsider reads the right group");
    let restarted = world.sides.right.restarted(&world.sides.right.log, world.now);
    assert_eq!(restarted.traffic_keys(world.now).keys, world.sides.right.controller.traffic_keys(world.now).keys, "the removal replays from the log");
}
