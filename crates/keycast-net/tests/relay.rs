//! Relays end to end over real sockets on loopback: a top group, a relay whose subgroup holds
//! members and a second relay, and that relay's own subgroup (two nested levels). Data crosses
//! every level each way, once; churn in a subgroup rekeys only that subgroup; an evicted
//! subgroup member opens nothing sent after its eviction, from either side.

use std::collections::BTreeMap;
use std::time::Duration;

use keycast_core::wire::{Data, GroupId};
use keycast_core::protocol::traffic::TrafficError;
use keycast_net::client::{ClientError, ClientEvent, MemberClient};
use keycast_net::local::{loopback_policy, Events, LocalGroup};
use keycast_net::relay::Relay;
use keycast_net::now_ms;
use keycast_net::server::Server;
use tokio::net::UdpSocket;
use tokio::time::{sleep, timeout, Instant};

const TOP: GroupId = GroupId(42);
const MIDDLE: GroupId = GroupId(43);
const BOTTOM: GroupId = GroupId(44);
const WAIT: Duration = Duration::from_secs(10);

/// A group not started yet, admitting member-1..=members and `relay` (a relay of the level below).
fn prepare(group: GroupId, members: usize, relay: Option<&str>, dir: &tempfile::TempDir) -> LocalGroup {
    let folder = dir.path().join(group.0.to_string());
    std::fs::create_dir_all(&folder).unwrap();
    let mut local = LocalGroup::prepare(loopback_policy(group), members, folder).unwrap();
    local.acl.extend(relay.map(str::to_owned));
    local
}

struct Hierarchy {
    top: LocalGroup,
    middle: LocalGroup,
    bottom: LocalGroup,
    relay_middle: Relay,
    relay_bottom: Relay,
    _dir: tempfile::TempDir,
}

impl Hierarchy {
    /// top (42) <- relay "relay-43" <- middle (43) <- relay "relay-44" <- bottom (44).
    async fn start() -> Hierarchy {
        let dir = tempfile::tempdir().unwrap();
        let mut top = prepare(TOP, 4, Some("relay-43"), &dir);
        top.start_server().await.unwrap();
        let mut middle = prepare(MIDDLE, 6, Some("relay-44"), &dir);
        let relay_middle = middle.start_relay(top.member_setup("relay-43").unwrap()).await.unwrap();
        let mut bottom = prepare(BOTTOM, 4, None, &dir);
        let relay_bottom = bottom.start_relay(middle.member_setup("relay-44").unwrap()).await.unwrap();
        Hierarchy { top, middle, bottom, relay_middle, relay_bottom, _dir: dir }
    }
}

/// Waits until every member holds, in force, the key its controller has in force.
async fn until_keyed(groups: &[(&Server, Vec<&MemberClient>)]) {
    let deadline = Instant::now() + WAIT;
    loop {
        let agreed = groups.iter().all(|(server, members)| {
            let wanted = server.stats().active_key;
            members.iter().all(|m| m.getkey().map(|k| k.0.to_string()) == Some(wanted.clone()))
        });
        if agreed {
            // Relays take their subgroup's keys every 50 ms.
            sleep(Duration::from_millis(120)).await;
            return;
        }
        assert!(Instant::now() < deadline, "the members never held their controllers' keys in force");
        sleep(Duration::from_millis(10)).await;
    }
}

/// When every one of `members` first held `server`'s key in force (polled every 5 ms).
async fn until_in_force(server: &Server, members: &[(MemberClient, Events)]) -> Instant {
    let deadline = Instant::now() + WAIT;
    loop {
        let wanted = Some(server.stats().active_key);
        if members.iter().all(|(m, _)| m.getkey().map(|k| k.0.to_string()) == wanted) {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "the members never held the new relay's key in force");
        sleep(Duration::from_millis(5)).await;
    }
}

/// The data payloads a member receives until every one of `expected` came (or the wait ends),
/// and a little longer so that duplicates would show: payload -> times received.
async fn received(events: &mut Events, expected: &[&[u8]]) -> BTreeMap<Vec<u8>, usize> {
    let mut counts = BTreeMap::new();
    let deadline = Instant::now() + WAIT;
    let mut settle: Option<Instant> = None;
    loop {
        let until = settle.unwrap_or(deadline).min(deadline);
        match timeout(until.saturating_duration_since(Instant::now()), events.recv()).await {
            Ok(Some(ClientEvent::Data(d))) => *counts.entry(d).or_insert(0) += 1,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return counts,
        }
        if settle.is_none() && expected.iter().all(|e| counts.contains_key(*e)) {
            settle = Some(Instant::now() + Duration::from_millis(400));
        }
    }
}

fn once(payloads: &[&[u8]]) -> BTreeMap<Vec<u8>, usize> {
    payloads.iter().map(|p| (p.to_vec(), 1)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_crosses_two_nested_relays_each_way_and_every_member_receives_it_once() {
    let h = Hierarchy::start().await;
    let mut top = h.top.join_all(["member-1", "member-2"]).await.unwrap();
    let mut middle = h.middle.join_all(["member-1", "member-2"]).await.unwrap();
    let mut bottom = h.bottom.join_all(["member-1"]).await.unwrap();
    until_keyed(&[
        (h.top.server(), top.iter().map(|(m, _)| m).chain([h.relay_middle.parent()]).collect()),
        (&h.relay_middle.server, middle.iter().map(|(m, _)| m).chain([h.relay_bottom.parent()]).collect()),
        (&h.relay_bottom.server, bottom.iter().map(|(m, _)| m).collect()),
    ])
    .await;

    top[0].0.send(b"from the top").await.unwrap();
    middle[0].0.send(b"from the middle").await.unwrap();
    bottom[0].0.send(b"from the bottom").await.unwrap();
    let all: [&[u8]; 3] = [b"from the top", b"from the middle", b"from the bottom"];
    let (sender, others) = top.split_at_mut(1);
    for (name, events) in [("top 1", &mut others[0].1), ("middle 1", &mut middle[1].1), ("bottom 1", &mut bottom[0].1), ("top 0, a sender", &mut sender[0].1)] {
        assert_eq!(received(events, &all).await, once(&all), "{name}: each message once, from every level");
    }
    let (upper, lower) = (h.relay_middle.stats(), h.relay_bottom.stats());
    assert_eq!((upper.up, upper.down), (2, 1), "the upper relay carried the middle's and bottom's message up, the top's down: {upper:?}");
    assert_eq!((lower.up, lower.down), (1, 2), "{lower:?}");
    assert_eq!(upper.dropped + lower.dropped, 0);
}

/// Waits until `count` passes `floor`; returns it.
async fn until_above(count: impl Fn() -> u64, floor: u64) -> u64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = count();
        if now > floor {
            return now;
        }
        assert!(Instant::now() < deadline, "no rekey after {floor}");
        sleep(Duration::from_millis(10)).await;
    }
}

/// The first data message that `socket` hears from `origin`, as bytes.
async fn next_data_from(socket: &UdpSocket, origin: GroupId) -> Vec<u8> {
    let mut buf = vec![0u8; 65_536];
    timeout(WAIT, async {
        loop {
            let (len, _) = socket.recv_from(&mut buf).await.unwrap();
            if Data::decode(&buf[..len]).is_ok_and(|d| d.origin == origin) {
                return buf[..len].to_vec();
            }
        }
    })
    .await
    .expect("no data from that group came")
}

/// The top group and the middle subgroup, each with the members that must hold its key.
fn keyed<'a>(h: &'a Hierarchy, top: &'a [(MemberClient, Events)], middle: &'a [(MemberClient, Events)]) -> [(&'a Server, Vec<&'a MemberClient>); 2] {
    [
        (h.top.server(), top.iter().map(|(m, _)| m).chain([h.relay_middle.parent()]).collect()),
        (&h.relay_middle.server, middle.iter().map(|(m, _)| m).collect()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_in_a_subgroup_rekeys_only_it_and_an_evicted_member_opens_nothing_sent_after_from_either_side() {
    let h = Hierarchy::start().await;
    let top = h.top.join_all(["member-1"]).await.unwrap();
    let mut middle = h.middle.join_all(["member-1", "member-2", "member-3", "member-4"]).await.unwrap();
    until_keyed(&keyed(&h, &top, &middle)).await;
    let top_rekeys = h.top.server().stats().rekeys;
    let bottom_rekeys = h.relay_bottom.server.stats().rekeys;
    let middle_rekeys = h.relay_middle.server.stats().rekeys;

    // A join, a leave and an eviction in the middle subgroup, each rekeying it.
    let rekeys = || h.relay_middle.server.stats().rekeys;
    middle.extend(h.middle.join_all(["member-5"]).await.unwrap());
    let after_join = until_above(rekeys, middle_rekeys).await;
    let (leaver, _) = middle.remove(3);
    leaver.leave().await.unwrap();
    let after_leave = until_above(rekeys, after_join).await;
    let (evicted, _) = middle.remove(2);
    assert!(h.relay_middle.server.evict(evicted.member()).await);
    until_above(rekeys, after_leave).await;
    until_keyed(&keyed(&h, &top, &middle)).await;
    assert_eq!(h.top.server().stats().rekeys, top_rekeys, "the top group saw nothing");
    assert_eq!(h.relay_bottom.server.stats().rekeys, bottom_rekeys, "nor did the sibling level below");

    // What the evicted member would hear on the subgroup's channel, from above and from within.
    let channel = keycast_net::multicast::receiver(&h.middle.multicast).unwrap();
    top[0].0.send(b"from the top, after").await.unwrap();
    let from_top = next_data_from(&channel, TOP).await;
    middle[0].0.send(b"from the middle, after").await.unwrap();
    let from_middle = next_data_from(&channel, MIDDLE).await;
    for bytes in [&from_top, &from_middle] {
        match evicted.open(bytes) {
            Err(ClientError::Traffic(TrafficError::UnknownKey(_))) => {}
            other => panic!("the evicted member holds the key of data sent after its eviction: {other:?}"),
        }
    }
    let after: [&[u8]; 2] = [b"from the top, after", b"from the middle, after"];
    assert_eq!(received(&mut middle[1].1, &after).await, once(&after), "a remaining member opens both");
}

const SUB_A: GroupId = GroupId(43);
const SUB_B: GroupId = GroupId(45);
/// A standby's wait per place in line after the alarm.
const BACK_OFF_MS: u64 = 2_000;

/// Each expected payload's count among what `events` brings (older payloads still queued are
/// left out): each must be 1.
async fn each_once(events: &mut Events, expected: &[&[u8]]) -> BTreeMap<Vec<u8>, usize> {
    let counts = received(events, expected).await;
    expected.iter().map(|e| (e.to_vec(), counts.get(*e).copied().unwrap_or(0))).collect()
}

/// The clients of `members` and the relays' memberships.
fn with_relays<'a>(members: &'a [(MemberClient, Events)], relays: [&'a MemberClient; 2]) -> Vec<&'a MemberClient> {
    members.iter().map(|(m, _)| m).chain(relays).collect()
}

/// A two-level group: top (42) with subgroups A (43, relay-43 and two standbys) and B (45,
/// relay-45). Relay-43 is dropped (as killed); standby 1 takes over with new keys, A's
/// members follow it by themselves within three heartbeat intervals plus one epoch, data
/// crosses subgroups again, standby 2 stands down, B sees nothing and the top only the dead
/// relay's expiry (the standbys joined it in advance), and the dead relay's keys open nothing
/// sent after the take-over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_relay_is_replaced_by_its_first_standby_and_its_subgroup_comes_back_under_new_keys() {
    let dir = tempfile::tempdir().unwrap();
    let mut top = prepare(TOP, 2, None, &dir);
    // The dead relay's membership of the top group expires quickly.
    top.policy.refresh_timeout_ms = 1_500;
    top.acl.extend(["relay-43", "relay-45", "relay-43-standby-1", "relay-43-standby-2"].map(String::from));
    top.start_server().await.unwrap();
    // member-4 joins only after the take-over.
    let mut a = prepare(SUB_A, 4, None, &dir);
    // The alive alarm at 300 ms: a loaded machine's scheduling gaps must not look like a death.
    a.policy.heartbeat_ms = 100;
    a.add_standby().unwrap();
    a.add_standby().unwrap();
    let relay_a = a.start_relay(top.member_setup("relay-43").unwrap()).await.unwrap();
    let mut b = prepare(SUB_B, 2, None, &dir);
    let relay_b = b.start_relay(top.member_setup("relay-45").unwrap()).await.unwrap();
    let first = a.start_standby(1, top.member_setup("relay-43-standby-1").unwrap(), BACK_OFF_MS).await.unwrap();
    let second = a.start_standby(2, top.member_setup("relay-43-standby-2").unwrap(), BACK_OFF_MS).await.unwrap();
    let mut top_members = top.join_all(["member-1", "member-2"]).await.unwrap();
    let mut a_members = a.join_all(["member-1", "member-2", "member-3"]).await.unwrap();
    let mut b_members = b.join_all(["member-1", "member-2"]).await.unwrap();
    until_keyed(&[
        (top.server(), with_relays(&top_members, [relay_a.parent(), relay_b.parent()])),
        (&relay_a.server, a_members.iter().map(|(m, _)| m).collect()),
        (&relay_b.server, b_members.iter().map(|(m, _)| m).collect()),
    ])
    .await;
    a_members[0].0.send(b"from A, before").await.unwrap();
    assert_eq!(each_once(&mut b_members[1].1, &[b"from A, before"]).await, once(&[b"from A, before"]), "data crosses subgroups before the kill");

    let (top_rekeys, b_rekeys, top_size) = (top.server().stats().rekeys, relay_b.server.stats().rekeys, top.server().stats().members);
    let dead_keys = relay_a.server.keys().get().expect("relay-43's subgroup keys");
    let killed = Instant::now();
    drop(relay_a);

    let took_over = timeout(WAIT, first.until_active()).await.expect("standby 1 never took over");
    let relay = took_over.relay;
    let in_sync = until_in_force(&relay.server, &a_members).await;
    let failover_ms = in_sync.duration_since(killed).as_millis() as u64;
    let after_alarm_ms = (now_ms() - in_sync.elapsed().as_millis() as u64).saturating_sub(took_over.at_ms);
    eprintln!("fail-over: every member of the subgroup holds the new relay's key in force {failover_ms} ms after the kill, {after_alarm_ms} ms after the standby's alarm");
    // The goal: three heartbeat intervals (the alive alarm) plus one epoch, from the
    // kill. The margin (one heartbeat interval) covers the alarm's polling (a quarter interval
    // at the standby, half at members) and a loaded CI host's scheduling.
    let goal_ms = 3 * a.policy.heartbeat_ms + a.policy.epoch_ms;
    assert!(failover_ms <= goal_ms + a.policy.heartbeat_ms, "fail-over took {failover_ms} ms: goal {goal_ms} ms + {} ms margin", a.policy.heartbeat_ms);
    until_keyed(&[(&relay.server, a_members.iter().map(|(m, _)| m).collect())]).await;
    for (member, _) in &a_members {
        assert_eq!(member.controller(), a.standbys[0].server, "every member of A follows standby 1");
    }
    // A member joining now with the config it would have had before (the dead relay first)
    // finds the standby by itself.
    let (late, _late_events) = a.join("member-4").await.expect("a first join after the take-over");
    assert_eq!(late.controller(), a.standbys[0].server, "the first join went to the standby");
    until_keyed(&[(top.server(), with_relays(&top_members, [relay.parent(), relay_b.parent()]))]).await;

    // Data across subgroups again, each way; the bytes on A's channel for the dead keys.
    let channel = keycast_net::multicast::receiver(&a.multicast).unwrap();
    top_members[0].0.send(b"from the top, after").await.unwrap();
    b_members[0].0.send(b"from B, after").await.unwrap();
    let from_top = next_data_from(&channel, TOP).await;
    a_members[0].0.send(b"from A, after").await.unwrap();
    let from_a = next_data_from(&channel, SUB_A).await;
    let into_a: [&[u8]; 2] = [b"from the top, after", b"from B, after"];
    for (i, (_, events)) in a_members.iter_mut().enumerate() {
        assert_eq!(each_once(events, &into_a).await, once(&into_a), "member {i} of A after the take-over");
    }
    assert_eq!(each_once(&mut top_members[1].1, &[b"from A, after"]).await, once(&[b"from A, after"]));
    assert_eq!(each_once(&mut b_members[1].1, &[b"from A, after"]).await, once(&[b"from A, after"]));
    for bytes in [&from_top, &from_a] {
        let data = Data::decode(bytes).unwrap();
        for (key_ref, key) in &dead_keys.keys {
            let opened = keycast_core::protocol::traffic::open(&data, &keycast_core::protocol::traffic::WrapKey::derive(SUB_A, *key_ref, key));
            assert!(opened.is_err(), "the dead relay's key {key_ref} opens data sent after the take-over");
        }
    }

    // The standbys joined the parent before the kill: it saw only the dead relay expire; B saw nothing.
    let deadline = Instant::now() + WAIT;
    while top.server().stats().members != top_size - 1 {
        assert!(Instant::now() < deadline, "the dead relay never expired from the top group");
        sleep(Duration::from_millis(20)).await;
    }
    let top_added = top.server().stats().rekeys - top_rekeys;
    assert_eq!(top_added, 1, "the top group rekeyed {top_added} times: only for the dead relay's expiry");
    assert_eq!(relay_b.server.stats().rekeys, b_rekeys, "subgroup B saw no rekey");
    // Standby 2 backed off and, hearing standby 1, stood down: past its own take-over time.
    let past_back_off = killed + Duration::from_millis(BACK_OFF_MS + 500);
    tokio::time::sleep_until(past_back_off).await;
    assert!(second.active().is_none(), "standby 2 took over although standby 1 was active");
}

/// A relay that crashes (killed) and is started again from its own log, at the same address:
/// its subgroup's members keep their member ids and keys (no rejoin), the restarted relay
/// joins the parent again, and data crosses between the levels again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_restarted_from_its_log_keeps_its_subgroup_without_rejoins() {
    let dir = tempfile::tempdir().unwrap();
    let mut top = prepare(TOP, 2, Some("relay-43"), &dir);
    top.start_server().await.unwrap();
    let mut a = prepare(SUB_A, 2, None, &dir);
    let relay = a.start_relay(top.member_setup("relay-43").unwrap()).await.unwrap();
    let mut top_members = top.join_all(["member-1", "member-2"]).await.unwrap();
    let mut a_members = a.join_all(["member-1", "member-2"]).await.unwrap();
    until_keyed(&[
        (top.server(), with_relays(&top_members, [relay.parent(), &top_members[0].0])),
        (&relay.server, a_members.iter().map(|(m, _)| m).collect()),
    ])
    .await;
    let (ids, key) = (a_members.iter().map(|(m, _)| m.member()).collect::<Vec<_>>(), relay.server.stats().active_key);
    let rekeys = relay.server.stats().rekeys;

    relay.kill().await;
    let relay = a.start_relay(top.member_setup("relay-43").unwrap()).await.unwrap();
    assert_eq!((relay.server.stats().active_key, relay.server.stats().rekeys), (key, rekeys), "restored from its log: same key in force, same rekeys");
    until_keyed(&[
        (top.server(), with_relays(&top_members, [relay.parent(), &top_members[0].0])),
        (&relay.server, a_members.iter().map(|(m, _)| m).collect()),
    ])
    .await;
    top_members[0].0.send(b"from the top, after the restart").await.unwrap();
    a_members[0].0.send(b"from A, after the restart").await.unwrap();
    let expected: [&[u8]; 1] = [b"from the top, after the restart"];
    assert_eq!(each_once(&mut a_members[1].1, &expected).await, once(&expected));
    let expected: [&[u8]; 1] = [b"from A, after the restart"];
    assert_eq!(each_once(&mut top_members[1].1, &expected).await, once(&expected));
    assert_eq!(a_members.iter().map(|(m, _)| m.member()).collect::<Vec<_>>(), ids, "no member of the subgroup rejoined");
    while let Ok(event) = a_members[1].1.try_recv() {
        assert!(!matches!(event, ClientEvent::Rejoined { .. } | ClientEvent::FailedOver { .. }), "{event:?}");
    }
}

/// A relay paused (as by SIGSTOP) for longer than the alive alarm: its standby takes over and
/// the members follow it. When the old relay runs again it hears the new controller's
/// heartbeats, steps down (its controller stops, it leaves the parent group), and the members
/// stay with the standby: never two controllers of one subgroup for longer than that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_relay_that_comes_back_after_its_standby_took_over_steps_down() {
    let dir = tempfile::tempdir().unwrap();
    let mut top = prepare(TOP, 1, None, &dir);
    top.acl.extend(["relay-43", "relay-43-standby-1"].map(String::from));
    top.start_server().await.unwrap();
    let mut a = prepare(SUB_A, 2, None, &dir);
    a.policy.heartbeat_ms = 100;
    a.add_standby().unwrap();
    let parent = top.member_setup("relay-43").unwrap();
    // The relay runs on a runtime of its own, on a thread of its own: blocking that thread
    // freezes all of the relay's tasks (controller, forwarding, parent membership) at once.
    let (pause, mut pauses) = tokio::sync::mpsc::unbounded_channel::<Duration>();
    let (started, relay) = tokio::sync::oneshot::channel();
    let relay_thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            let relay = a.start_relay(parent).await.unwrap();
            let _ = started.send((a, std::sync::Arc::new(relay)));
            while let Some(pause) = pauses.recv().await {
                std::thread::sleep(pause);
            }
        });
    });
    let (a, relay) = relay.await.unwrap();
    let standby = a.start_standby(1, top.member_setup("relay-43-standby-1").unwrap(), BACK_OFF_MS).await.unwrap();
    let a_members = a.join_all(["member-1", "member-2"]).await.unwrap();
    until_keyed(&[(&relay.server, a_members.iter().map(|(m, _)| m).collect())]).await;
    let top_size = top.server().stats().members;

    let paused = Instant::now();
    pause.send(Duration::from_millis(1_500)).unwrap();
    let took_over = timeout(WAIT, standby.until_active()).await.expect("the standby never took over");
    until_in_force(&took_over.relay.server, &a_members).await;
    assert!(paused.elapsed() < Duration::from_millis(1_500), "the members followed the standby only after the pause");
    assert!(!relay.stepped_down(), "stepped down while paused");

    timeout(WAIT, relay.until_stepped_down()).await.expect("the old relay never stepped down");
    let stepped_down_ms = paused.elapsed().as_millis();
    eprintln!("the paused relay stepped down {stepped_down_ms} ms after its pause began (1500 ms pause)");
    timeout(Duration::from_secs(1), relay.server.stopped()).await.expect("the old relay's controller still runs");
    let deadline = Instant::now() + WAIT;
    while top.server().stats().members != top_size - 1 {
        assert!(Instant::now() < deadline, "the old relay never left the parent group");
        sleep(Duration::from_millis(20)).await;
    }
    until_in_force(&took_over.relay.server, &a_members).await;
    for (member, _) in &a_members {
        assert_eq!(member.controller(), a.standbys[0].server, "a member went back to the old relay");
    }
    assert!(!took_over.relay.stepped_down(), "the standby that took over stepped down");
    drop(pause);
    relay_thread.join().unwrap();
}
