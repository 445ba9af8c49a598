//! The member library under faults (issues 11 and 12): a frozen controller, connections reset
//! or stalled, a member started before its controller, and a flood of forged data.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keycast_core::protocol::{GroupPolicy, MemberEvent};
use keycast_core::wire::{Data, GroupId};
use keycast_core::MemberId;
use keycast_net::client::{ClientError, ClientEvent, MemberClient, MemberSetup};
use keycast_net::config::RequestPolicy;
use keycast_net::local::{loopback_policy, Events, LocalGroup};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant};

const HEARTBEAT_MS: u64 = 100;

fn policy() -> GroupPolicy {
    GroupPolicy {
        heartbeat_ms: HEARTBEAT_MS,
        ..loopback_policy(GroupId(7))
    }
}

async fn group(acl: usize) -> (LocalGroup, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (LocalGroup::start(policy(), acl, dir.path().to_path_buf()).await.unwrap(), dir)
}

/// Short timeouts and backoffs, so faults cost tenths of a second.
fn quick(mut setup: MemberSetup) -> MemberSetup {
    setup.requests = RequestPolicy {
        connect_timeout_ms: 500,
        handshake_timeout_ms: 500,
        answer_timeout_ms: 1_500,
        deadline_ms: 10_000,
        join_deadline_ms: 10_000,
        backoff_min_ms: 50,
        backoff_max_ms: 300,
        hedge_after_ms: 300,
    };
    setup
}

/// What the proxy does with the next connection.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Accept, then reset (RST).
    Reset,
    /// Accept and hold, forwarding nothing.
    Stall,
}

/// A TCP proxy in front of the controller that injects faults.
struct Proxy {
    addr: SocketAddr,
    /// Faults for the next connections, in order; then connections are forwarded.
    faults: Arc<Mutex<VecDeque<Fault>>>,
    /// Stall every connection from now on.
    stall_all: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    stalled: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        Proxy::start_on(TcpListener::bind("127.0.0.1:0").await.unwrap(), target)
    }

    fn start_on(listener: TcpListener, target: SocketAddr) -> Proxy {
        let addr = listener.local_addr().unwrap();
        let faults = Arc::new(Mutex::new(VecDeque::new()));
        let stall_all = Arc::new(AtomicBool::new(false));
        let (accepted, stalled) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let task = tokio::spawn(Proxy::serve(listener, target, faults.clone(), stall_all.clone(), accepted.clone(), stalled.clone()));
        Proxy { addr, faults, stall_all, accepted, stalled, task }
    }

    async fn serve(
        listener: TcpListener,
        target: SocketAddr,
        faults: Arc<Mutex<VecDeque<Fault>>>,
        stall_all: Arc<AtomicBool>,
        accepted: Arc<AtomicUsize>,
        stalled: Arc<AtomicUsize>,
    ) {
        // Stalled connections stay open until the proxy stops.
        let mut held = Vec::new();
        loop {
            let Ok((client, _)) = listener.accept().await else { continue };
            accepted.fetch_add(1, Ordering::SeqCst);
            let fault = if stall_all.load(Ordering::SeqCst) { Some(Fault::Stall) } else { faults.lock().unwrap().pop_front() };
            match fault {
                Some(Fault::Reset) => {
                    let _ = client.set_zero_linger();
                    drop(client);
                }
                Some(Fault::Stall) => {
                    stalled.fetch_add(1, Ordering::SeqCst);
                    held.push(client);
                }
                None => {
                    tokio::spawn(async move {
                        let Ok(mut server) = TcpStream::connect(target).await else { return };
                        let mut client = client;
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    });
                }
            }
        }
    }

    fn inject(&self, faults: &[Fault]) {
        self.faults.lock().unwrap().extend(faults);
    }
}

/// Waits (bounded) until `done` holds.
async fn until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(10)).await;
    }
}

async fn in_sync(members: &[&MemberClient], group: &LocalGroup) {
    let seq = group.server().stats().rekeys;
    until("members in sync", Duration::from_secs(5), || {
        let first = members[0].getkey().map(|k| k.0);
        members.iter().all(|m| m.rekey_seq() >= seq && m.getkey().map(|k| k.0) == first && first.is_some())
    })
    .await;
}

/// Issue 12, finding 2: a request stuck on a frozen controller must not stop the member from
/// delivering data or noticing that heartbeats stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_does_not_freeze_data_or_controller_loss() {
    let (mut group, _dir) = group(2).await;
    let proxy = Proxy::start(group.server().addr).await;
    let (talker, _talker_events) = group.join("member-1").await.unwrap();
    let mut setup = group.member_setup("member-2").unwrap();
    setup.server = proxy.addr;
    setup.refresh_ms = 150;
    // Long timeouts: a loop that waited on its request would wait seconds.
    setup.requests = RequestPolicy { connect_timeout_ms: 10_000, handshake_timeout_ms: 10_000, answer_timeout_ms: 10_000, deadline_ms: 30_000, ..RequestPolicy::default() };
    let (listener, mut events) = MemberClient::join(setup).await.unwrap();
    in_sync(&[&talker, &listener], &group).await;

    // The controller freezes for this member: its next refresh hangs in the handshake.
    proxy.stall_all.store(true, Ordering::SeqCst);
    until("a refresh stuck in the stalled proxy", Duration::from_secs(3), || proxy.stalled.load(Ordering::SeqCst) >= 1).await;
    while events.try_recv().is_ok() {}
    let killed = Instant::now();
    group.kill_server().await;

    const TICKS: usize = 12;
    let sending = tokio::spawn(async move {
        let mut sent = Vec::new();
        for i in 0..TICKS {
            sent.push(Instant::now());
            talker.send(format!("tick {i}").as_bytes()).await.unwrap();
            sleep(Duration::from_millis(100)).await;
        }
        sent
    });
    let mut delivered = vec![None; TICKS];
    let mut lost = None;
    let collect = async {
        while let Some(event) = events.recv().await {
            let now = Instant::now();
            match event {
                ClientEvent::Data(d) => {
                    let i: usize = String::from_utf8(d).unwrap().strip_prefix("tick ").unwrap().parse().unwrap();
                    delivered[i].get_or_insert(now);
                }
                ClientEvent::Member(MemberEvent::ControllerLost) => {
                    lost.get_or_insert(now);
                }
                ClientEvent::Member(MemberEvent::Evicted) => panic!("a controller that does not answer was taken for an eviction"),
                _ => {}
            }
            if lost.is_some() && delivered.iter().all(Option::is_some) {
                return;
            }
        }
    };
    let _ = timeout(Duration::from_secs(3), collect).await;
    let sent = sending.await.unwrap();
    for (i, (at, got)) in sent.iter().zip(&delivered).enumerate() {
        let got = got.unwrap_or_else(|| panic!("tick {i} never delivered while a refresh was stuck"));
        assert!(got.duration_since(*at) < Duration::from_millis(500), "tick {i} delivered {:?} after it was sent", got.duration_since(*at));
    }
    let lost = lost.expect("no ControllerLost while a refresh was stuck");
    // Three intervals of silence, checked every half interval; ten is generous.
    assert!(lost.duration_since(killed) < Duration::from_millis(10 * HEARTBEAT_MS), "ControllerLost came {:?} after the kill", lost.duration_since(killed));
}

/// Issue 12, finding 3: resets and a stalled handshake do not end a join or a leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_and_leaves_retry_through_resets_and_a_stalled_handshake() {
    let (group, _dir) = group(2).await;
    let proxy = Proxy::start(group.server().addr).await;
    proxy.inject(&[Fault::Reset, Fault::Reset, Fault::Stall, Fault::Reset]);
    let mut setup = quick(group.member_setup("member-1").unwrap());
    setup.server = proxy.addr;
    let (member, _events) = timeout(Duration::from_secs(10), MemberClient::join(setup)).await.expect("join hung").expect("join gave up");
    assert!(proxy.accepted.load(Ordering::SeqCst) >= 5, "the join got through every fault");
    until("the member's first key", Duration::from_secs(5), || member.getkey().is_some()).await;
    let id = member.member();
    assert!(group.server().members().await.iter().any(|r| r.member == id.0));

    let before = proxy.accepted.load(Ordering::SeqCst);
    proxy.inject(&[Fault::Reset, Fault::Stall, Fault::Reset]);
    timeout(Duration::from_secs(10), member.leave()).await.expect("leave hung").expect("leave gave up");
    assert!(proxy.accepted.load(Ordering::SeqCst) >= before + 4, "the leave got through every fault");
    let deadline = Instant::now() + Duration::from_secs(5);
    while group.server().members().await.iter().any(|r| r.member == id.0) {
        assert!(Instant::now() < deadline, "the leave was never applied");
        sleep(Duration::from_millis(20)).await;
    }
}

/// Issue 12, finding 3: a member started before its controller waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_started_before_its_controller_joins_once_it_is_up() {
    let (group, _dir) = group(1).await;
    // Reserve a port that nothing listens on yet; the controller appears there later.
    let reserved = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = reserved.local_addr().unwrap();
    drop(reserved);
    let mut setup = quick(group.member_setup("member-1").unwrap());
    setup.server = port;
    let join = tokio::spawn(MemberClient::join(setup));
    sleep(Duration::from_millis(800)).await;
    assert!(!join.is_finished(), "the join ended before any controller listened: {:?}", join.await.unwrap().map(|_| ()));
    let _proxy = Proxy::start_on(TcpListener::bind(port).await.unwrap(), group.server().addr);
    let (member, _events) = timeout(Duration::from_secs(10), join).await.expect("join hung").unwrap().expect("join gave up");
    until("the member's first key", Duration::from_secs(5), || member.getkey().is_some()).await;
}

/// Issue 11, finding 1: forged data cannot grow the event queue past its capacity nor push
/// out member events, and every dropped event is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_forged_data_is_bounded_counted_and_rekeys_still_arrive() {
    const CAPACITY: usize = 256;
    const FORGED: usize = 20_000;
    let (group, _dir) = group(2).await;
    let mut setup = group.member_setup("member-1").unwrap();
    setup.event_capacity = CAPACITY;
    let (member, mut events): (MemberClient, Events) = MemberClient::join(setup).await.unwrap();
    in_sync(&[&member], &group).await;
    let (key, _) = member.getkey().unwrap();
    let seq = member.rekey_seq();

    // The application reads nothing while the flood lasts.
    let socket = keycast_net::multicast::sender(&group.multicast).unwrap();
    let mut longest = 0;
    for i in 0..FORGED {
        let mut nonce = [0u8; 12];
        nonce[..8].copy_from_slice(&(i as u64).to_be_bytes());
        let (origin, sender, seq, hops, wrapped_key, ciphertext) = (GroupId(7), MemberId(999), i as u64, 0, [0x5a; 48], vec![0x5a; 64]);
        let forged = Data { group: GroupId(7), key, origin, sender, seq, hops, nonce, wrapped_key, ciphertext }.encode();
        socket.send_to(&forged, group.multicast.address).await.unwrap();
        if i % 200 == 0 {
            longest = longest.max(events.len());
            tokio::task::yield_now().await;
        }
    }
    let mut settled = member.stats();
    for _ in 0..100 {
        sleep(Duration::from_millis(30)).await;
        longest = longest.max(events.len());
        let now = member.stats();
        if now == settled {
            break;
        }
        settled = now;
    }
    assert!(longest <= CAPACITY, "queue held {longest} events, capacity {CAPACITY}");
    let stats = member.stats();
    assert!(stats.unreadable > CAPACITY as u64, "the flood reached the member: {stats:?}");
    assert!(stats.events_dropped > 0 && stats.member_events_dropped == 0, "{stats:?}");

    // A real rekey still gets through to the application.
    let (_other, _other_events) = group.join("member-2").await.unwrap();
    until("the member to apply the join's rekey", Duration::from_secs(5), || member.rekey_seq() > seq).await;
    sleep(Duration::from_millis(100)).await;
    let mut queued_unreadable = 0u64;
    let mut rekeyed = false;
    while let Ok(event) = events.try_recv() {
        match event {
            ClientEvent::Unreadable(_) => queued_unreadable += 1,
            ClientEvent::Member(MemberEvent::Rekeyed { seq: s, .. }) if s > seq => rekeyed = true,
            _ => {}
        }
    }
    assert!(rekeyed, "the rekey's event was pushed out by the flood");
    let stats = member.stats();
    assert_eq!(queued_unreadable + stats.events_dropped - stats.member_events_dropped, stats.unreadable, "every unreadable message is queued or counted as dropped: {stats:?}");
}

/// Issue 12, finding 3: with `rejoin` set, a member the controller expired (its refreshes
/// were lost) joins again by itself, as a new member that shares the group's key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_member_set_to_rejoin_joins_again() {
    let dir = tempfile::tempdir().unwrap();
    // Long epochs: the rejoin waits for the epoch's end while the second refusal comes in.
    let group = LocalGroup::start(GroupPolicy { refresh_timeout_ms: 800, epoch_ms: 1000, ..policy() }, 2, dir.path().to_path_buf())
        .await
        .unwrap();
    let (stayer, _stayer_events) = group.join("member-2").await.unwrap();
    let proxy = Proxy::start(group.server().addr).await;
    let mut setup = quick(group.member_setup("member-1").unwrap());
    setup.server = proxy.addr;
    setup.rejoin = true;
    let (member, mut events) = MemberClient::join(setup).await.unwrap();
    in_sync(&[&stayer, &member], &group).await;
    let first = member.member();

    // Its refreshes stall until the controller expires it.
    proxy.stall_all.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(5);
    while group.server().members().await.iter().any(|r| r.member == first.0) {
        assert!(Instant::now() < deadline, "the controller never expired the silent member");
        sleep(Duration::from_millis(20)).await;
    }
    proxy.stall_all.store(false, Ordering::SeqCst);

    // Its refresh and its resync (it missed the rekey that removed it) are both refused: one
    // eviction, one rejoin.
    let (mut evicted, mut rejoins) = (0, Vec::new());
    let mut count = |event| match event {
        ClientEvent::Member(MemberEvent::Evicted) => evicted += 1,
        ClientEvent::Rejoined { member } => rejoins.push(member),
        _ => {}
    };
    let first_rejoin = async {
        while let Some(event) = events.recv().await {
            let rejoined = matches!(event, ClientEvent::Rejoined { .. });
            count(event);
            if rejoined {
                return;
            }
        }
    };
    timeout(Duration::from_secs(10), first_rejoin).await.expect("no rejoin within 10 s");
    // A second rejoin would be answered at the next epoch's end.
    let _ = timeout(Duration::from_millis(1500), async {
        while let Some(event) = events.recv().await {
            count(event);
        }
    })
    .await;
    assert_eq!((evicted, rejoins.len()), (1, 1), "evictions and rejoins: {rejoins:?}");
    let rejoined = rejoins[0];
    assert_ne!(rejoined, first);
    assert!(member.seal(b"after the rejoin").is_ok(), "a rejoined member seals again");
    assert_eq!(member.member(), rejoined);
    in_sync(&[&stayer, &member], &group).await;
    let message = stayer.seal(b"welcome back").unwrap();
    assert_eq!(member.open(&message).unwrap(), b"welcome back");
}

/// A member the controller removed stops sealing: its key is one that members evicted before
/// it still hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicted_member_refuses_to_seal() {
    let (group, _dir) = group(2).await;
    let mut setup = quick(group.member_setup("member-1").unwrap());
    setup.refresh_ms = 100;
    let (member, mut events) = MemberClient::join(setup).await.unwrap();
    in_sync(&[&member], &group).await;
    assert!(member.seal(b"while a member").is_ok());
    assert!(group.server().evict(member.member()).await);
    let told = timeout(Duration::from_secs(5), async {
        while let Some(event) = events.recv().await {
            if event == ClientEvent::Member(MemberEvent::Evicted) {
                return;
            }
        }
    })
    .await;
    assert!(told.is_ok(), "never told of the eviction");
    match member.seal(b"after the eviction") {
        Err(ClientError::NotAMember) => {}
        other => panic!("an evicted member sealed: {:?}", other.map(|m| m.len())),
    }
}

/// A refresh whose connection stalls gets a hedged sibling that answers long before the
/// stalled attempt's own timeouts (10 s here) would give up on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_refresh_is_answered_through_a_hedged_attempt() {
    let (group, _dir) = group(1).await;
    let proxy = Proxy::start(group.server().addr).await;
    let mut setup = group.member_setup("member-1").unwrap();
    setup.server = proxy.addr;
    setup.refresh_ms = 150;
    setup.requests = RequestPolicy { connect_timeout_ms: 10_000, handshake_timeout_ms: 10_000, answer_timeout_ms: 10_000, hedge_after_ms: 200, ..RequestPolicy::default() };
    let (member, _events) = MemberClient::join(setup).await.unwrap();
    let last_seen = || async { group.server().members().await.iter().find(|r| r.member == member.member().0).map(|r| r.last_seen_ms) };
    proxy.inject(&[Fault::Stall]);
    until("a refresh stuck in the stalled proxy", Duration::from_secs(3), || proxy.stalled.load(Ordering::SeqCst) >= 1).await;
    let stalled_at = last_seen().await.expect("a member");
    let deadline = Instant::now() + Duration::from_secs(3);
    while last_seen().await.expect("still a member") <= stalled_at {
        assert!(Instant::now() < deadline, "no refresh reached the controller while one attempt was stalled");
        sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(proxy.stalled.load(Ordering::SeqCst), 1, "only the injected connection stalled");
}
