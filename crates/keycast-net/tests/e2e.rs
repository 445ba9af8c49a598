//! The networked system end to end, over real sockets on loopback: TLS 1.3 joins with client
//! certificates, multicast rekeys and heartbeats, a controller killed and restarted from its
//! log, and hostile input on both channels.

use std::time::Duration;

use keycast_core::protocol::{GroupPolicy, MemberEvent};
use keycast_core::wire::rekey::{self, PacketConfig, RekeyContext};
use keycast_core::wire::{encode_rekey, GroupId, Placement, RefusalReason, RekeyPacket, SignedHeartbeat, Signer, VerifyingKey};
use keycast_core::{GraphConfig, KeyRef, Scheme};
use keycast_net::client::{ClientError, ClientEvent, MemberClient};
use keycast_net::local::{loopback_policy, LocalGroup};
use keycast_net::pki::Authority;
use keycast_net::tls::client_config;
use tokio::time::{sleep, timeout, Instant};

fn policy() -> GroupPolicy {
    GroupPolicy { membership_deltas: true, ..loopback_policy(GroupId(42)) }
}

async fn group(acl: usize) -> (LocalGroup, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (LocalGroup::start(policy(), acl, dir.path().to_path_buf()).await.unwrap(), dir)
}

fn active(member: &MemberClient) -> Option<KeyRef> {
    member.getkey().map(|(r, _)| r)
}

/// Waits until every member has the same active key and has applied `seq` rekeys.
async fn until_in_sync(members: &[&MemberClient], seq: u64, within: Duration) -> KeyRef {
    until_active(members, seq, None, within).await
}

/// As `until_in_sync`, and the active key is no longer `old` (activation came).
async fn until_active(members: &[&MemberClient], seq: u64, old: Option<KeyRef>, within: Duration) -> KeyRef {
    let deadline = Instant::now() + within;
    loop {
        let keys: Vec<_> = members.iter().map(|m| (active(m), m.rekey_seq())).collect();
        if keys.iter().all(|k| k.0.is_some() && k == &keys[0] && k.1 >= seq && k.0 != old) {
            return keys[0].0.unwrap();
        }
        assert!(Instant::now() < deadline, "members never agreed: {keys:?} (want rekey {seq})");
        sleep(Duration::from_millis(20)).await;
    }
}

/// Data sealed by `from` and opened by every member of `to`.
fn everyone_reads(from: &MemberClient, to: &[&MemberClient]) -> bool {
    let message = from.seal(b"market data tick").unwrap();
    to.iter().all(|m| m.open(&message).ok().as_deref() == Some(&b"market data tick"[..]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_join_share_traffic_and_a_leave_rekeys_them() {
    let (group, _dir) = group(8).await;
    let mut members = group.join_all((1..=6).map(|i| format!("member-{i}"))).await.unwrap();
    let seq = group.server().stats().rekeys;
    let refs: Vec<&MemberClient> = members.iter().map(|(m, _)| m).collect();
    let before = until_in_sync(&refs, seq, Duration::from_secs(5)).await;
    assert!(everyone_reads(refs[0], &refs));

    // Multicast data reaches the others through the group address.
    refs[1].send(b"hello group").await.unwrap();
    let (_, events) = &mut members[2];
    let got = timeout(Duration::from_secs(5), async {
        loop {
            if let Some(ClientEvent::Data(d)) = events.recv().await {
                return d;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(got, b"hello group");

    let (leaver, _) = members.remove(5);
    let leaver_key = leaver.getkey().unwrap();
    let leaver_id = leaver.member();
    leaver.leave().await.unwrap();
    // Membership deltas are on in this group: the others hear who left.
    let (_, events) = &mut members[0];
    let heard = timeout(Duration::from_secs(5), async {
        loop {
            if let Some(ClientEvent::Member(MemberEvent::MembershipChanged { left, .. })) = events.recv().await {
                if left.contains(&leaver_id) {
                    return;
                }
            }
        }
    })
    .await;
    assert!(heard.is_ok(), "no membership delta named the leaver");
    let refs: Vec<&MemberClient> = members.iter().map(|(m, _)| m).collect();
    let after = until_active(&refs, seq + 1, Some(before), Duration::from_secs(5)).await;
    assert_ne!(after, leaver_key.0);
    assert!(everyone_reads(refs[0], &refs));
    assert_eq!(group.server().members().await.len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicted_member_cannot_open_traffic_sealed_after_the_eviction() {
    let (group, _dir) = group(4).await;
    let members = group.join_all((1..=4).map(|i| format!("member-{i}"))).await.unwrap();
    let refs: Vec<&MemberClient> = members.iter().map(|(m, _)| m).collect();
    let seq = group.server().stats().rekeys;
    until_in_sync(&refs, seq, Duration::from_secs(5)).await;
    // Let the last join's key come into force everywhere first: the grace window keeps one
    // key before the one in force, so a message sealed under a key already superseded (an
    // epoch boundary between the seal and the eviction) would not be readable, rightly.
    tokio::time::sleep(Duration::from_millis(2 * policy().epoch_ms)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let wanted = group.server().stats().active_key;
        if refs.iter().all(|m| m.getkey().map(|k| k.0.to_string()).as_deref() == Some(wanted.as_str())) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the members never agreed on the key in force");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let evicted = refs[3];
    let old = evicted.seal(b"before").unwrap();
    assert!(group.server().evict(evicted.member()).await);
    let stay = &refs[..3];
    until_in_sync(stay, seq + 1, Duration::from_secs(5)).await;
    let fresh = stay[0].seal(b"after the eviction").unwrap();
    assert!(evicted.open(&fresh).is_err(), "the evicted member opened new traffic");
    assert!(stay.iter().all(|m| m.open(&fresh).is_ok()));
    // Traffic from before stays readable to those who held the key (grace window).
    assert!(stay[0].open(&old).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_at_any_point_restarts_and_members_stay_in_sync() {
    let (mut group, _dir) = group(40).await;
    let mut members = group.join_all((1..=8).map(|i| format!("member-{i}"))).await.unwrap();
    for round in 0..8u64 {
        // Churn, then a crash at a different point of the epoch each round.
        let joiner = format!("member-{}", 9 + round);
        let join = {
            let setup = group.member_setup(&joiner).unwrap();
            tokio::spawn(async move { MemberClient::join(setup).await })
        };
        if round % 2 == 1 {
            let (leaver, _) = members.remove(0);
            let _ = leaver.leave().await;
        }
        sleep(Duration::from_millis(20 + (round * 37) % 150)).await;
        group.kill_server().await;
        sleep(Duration::from_millis(30)).await;
        group.start_server().await.unwrap();
        // A joiner whose connection died with the controller tries again by itself.
        let joined = join.await.unwrap().unwrap();
        members.push(joined);
        let seq = group.server().stats().rekeys;
        let refs: Vec<&MemberClient> = members.iter().map(|(m, _)| m).collect();
        until_in_sync(&refs, seq, Duration::from_secs(10)).await;
        assert!(everyone_reads(refs[0], &refs), "round {round}");
    }
    // Nobody rejoined: the first members are the same clients, with their first member ids.
    let ids: Vec<u64> = members.iter().map(|(m, _)| m.member().0).collect();
    let rows = group.server().members().await;
    assert_eq!(rows.len(), members.len());
    assert!(ids.iter().all(|id| rows.iter().any(|r| r.member == *id)));
}

/// Everything the controller sends back on a TCP connection to its TLS port that starts with
/// `bytes`, until it closes (a reset counts as closing).
async fn reply_to(addr: std::net::SocketAddr, bytes: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    let mut reply = Vec::new();
    match timeout(Duration::from_secs(12), tcp.read_to_end(&mut reply)).await.expect("the controller closes the connection") {
        Ok(_) => {}
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    reply
}

/// One TLS record (RFC 8446 5.1) of type alert holding a fatal alert (level 2).
fn is_fatal_tls_alert(record: &[u8]) -> bool {
    matches!(record, [21, 3, 1..=4, 0, 2, 2, _])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_bad_certificates_and_garbage_are_refused_without_disturbing_members() {
    let (mut group, _dir) = group(3).await;
    let members = group.join_all((1..=2).map(|i| format!("member-{i}"))).await.unwrap();
    let refs: Vec<&MemberClient> = members.iter().map(|(m, _)| m).collect();
    let seq = group.server().stats().rekeys;
    until_in_sync(&refs, seq, Duration::from_secs(5)).await;

    // Not in the ACL.
    match group.join("mallory").await {
        Err(keycast_net::local::LocalError::Client(ClientError::Refused(reason, _))) => assert_eq!(reason, RefusalReason::NotInAcl),
        other => panic!("mallory joined: {:?}", other.map(|_| ())),
    }
    // A certificate from another CA.
    let rogue = Authority::new("rogue CA").unwrap().issue("member-3", false).unwrap();
    let mut setup = group.member_setup("member-3").unwrap();
    setup.tls = client_config(&rogue).unwrap();
    // A certificate problem is not retried: the join fails at once, saying what to check.
    setup.requests.join_deadline_ms = 5_000;
    match MemberClient::join(setup).await {
        Err(e @ ClientError::Tls { .. }) => assert!(e.to_string().contains("not signed by this group's CA"), "{e}"),
        other => panic!("a rogue certificate gave {:?}", other.map(|_| ())),
    }
    // The same client certificate, trusting the right CA: the controller refuses it (an alert).
    let mut setup = group.member_setup("member-3").unwrap();
    setup.tls = client_config(&keycast_net::pki::Credentials { ca_pem: group.authority.ca_pem(), ..rogue }).unwrap();
    setup.requests.join_deadline_ms = 5_000;
    match MemberClient::join(setup).await {
        Err(e @ ClientError::Tls { .. }) => assert!(e.to_string().contains("the controller refused this certificate"), "{e}"),
        other => panic!("a certificate from another CA gave {:?}", other.map(|_| ())),
    }
    // Garbage on the TLS port: the controller answers with at most a fatal TLS alert, then closes.
    for garbage in [&b"GET / HTTP/1.1\r\n\r\n\x00\xff garbage"[..], &[0x16, 3, 1, 0, 4, 1, 0, 0, 0], &[0u8; 300]] {
        let reply = reply_to(group.server().addr, garbage).await;
        assert!(reply.is_empty() || is_fatal_tls_alert(&reply), "the controller answered {garbage:02x?} with {reply:02x?}");
    }
    // Junk on the multicast port.
    let socket = keycast_net::multicast::sender(&group.multicast).unwrap();
    for i in 0..200u32 {
        let mut junk = vec![1u8, (i % 12) as u8];
        junk.extend(i.to_be_bytes().repeat(i as usize % 40));
        socket.send_to(&junk, group.multicast.address).await.unwrap();
    }
    sleep(Duration::from_millis(200)).await;
    // Nothing moved: the members are at the same rekey with the same key.
    assert_eq!(until_in_sync(&refs, seq, Duration::from_secs(1)).await, active(refs[0]).unwrap());
    assert!(refs.iter().all(|m| m.rekey_seq() == seq), "a member moved past rekey {seq} on garbage");
    // The group still works: a member joins, everyone follows the rekey and reads traffic.
    let (third, _events) = group.join("member-3").await.unwrap();
    let mut all = refs.clone();
    all.push(&third);
    until_in_sync(&all, seq + 1, Duration::from_secs(5)).await;
    assert!(everyone_reads(&third, &all));

    // The metrics endpoint is off by default; turned on, it reports the group.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    group.metrics = Some(([127, 0, 0, 1], port).into());
    group.kill_server().await;
    group.start_server().await.unwrap();
    sleep(Duration::from_millis(100)).await;
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut tcp, b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
    let mut page = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut tcp, &mut page).await.unwrap();
    assert!(page.contains("keycast_members 3"), "{page}");
}

/// A group whose rekeys are several small packets in signing blocks of two, so that a rekey
/// spans more than one block: degree 8 keeps every chain one wrap long, and a 250-byte packet
/// holds one wrap.
fn small_packet_policy() -> GroupPolicy {
    let packets = PacketConfig { mtu: 250, block_bits: 1, placement: Placement::UserOriented, ..PacketConfig::default() };
    GroupPolicy { graph: GraphConfig { scheme: Scheme::Tree { degree: 8 }, ..policy().graph }, packets, ..policy() }
}

/// What a listener on the group address heard: rekey packets by seq, and the latest epoch.
#[derive(Default)]
struct Heard {
    rekeys: std::collections::BTreeMap<u64, std::collections::BTreeMap<u32, Vec<u8>>>,
    epoch: u64,
}

/// Listens on the group address until every packet of rekey `seq` and a later heartbeat arrived.
async fn capture_rekey(listener: &tokio::net::UdpSocket, heard: &mut Heard, seq: u64, signer: &VerifyingKey) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 65_536];
    loop {
        let complete = heard.rekeys.get(&seq).is_some_and(|p| p.len() as u32 == RekeyPacket::decode(&p[&0]).unwrap().header.count);
        if complete && heard.epoch > 0 {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let (len, _) = timeout(left, listener.recv_from(&mut buf)).await.expect("rekey heard on the group address").unwrap();
        let bytes = &buf[..len];
        if let Ok(packet) = RekeyPacket::verify(bytes, signer) {
            heard.rekeys.entry(packet.header.seq).or_default().insert(packet.header.index, bytes.to_vec());
        } else if let Ok(heartbeat) = SignedHeartbeat::verify(bytes, signer) {
            heard.epoch = heard.epoch.max(heartbeat.epoch);
        }
    }
}

/// The signature and path of `donor` on the body of `packet` (both of one rekey).
fn with_authentication_of(packet: &[u8], donor: &[u8]) -> Vec<u8> {
    let (p, d) = (RekeyPacket::decode(packet).unwrap(), RekeyPacket::decode(donor).unwrap());
    RekeyPacket { signature: d.signature, path: d.path, ..p }.encode()
}

/// Forgeries that a member must refuse, made from `previous` and `last`, the packets (in index
/// order) of the last two rekeys it applied.
fn forgeries(previous: &[Vec<u8>], last: &[Vec<u8>], epoch: u64, policy: &GroupPolicy) -> Vec<(&'static str, Vec<Vec<u8>>)> {
    let decode = |packets: &[Vec<u8>]| -> Vec<RekeyPacket> { packets.iter().map(|p| RekeyPacket::decode(p).unwrap()).collect() };
    let (previous_packets, last_packets) = (decode(previous), decode(last));
    let header = last_packets[0].header;
    // The last rekey's wraps (which a member can open) as the next rekey of this group, in the
    // current epoch, and an empty next rekey, each signed by a stranger.
    let stranger = Signer::from_seed(&[7; 32]);
    let context = RekeyContext { group: header.group, epoch, seq: header.seq + 1, activation: epoch + 1 };
    let resigned = |wraps: Vec<keycast_core::Wrap>| {
        let plan = keycast_core::RekeyPlan { group_key: header.group_key, wraps, ..Default::default() };
        encode_rekey(&plan, context, policy.packets, &stranger).unwrap().packets
    };
    let stranger_rekey = resigned(last_packets.iter().flat_map(|p| p.wraps.clone()).collect());
    let stranger_empty = resigned(Vec::new());
    // One entry's sealed key changed (its last byte, inside the first wrap).
    let mut changed_entry = previous[0].clone();
    changed_entry[rekey::HEADER_LEN + previous_packets[0].wraps[0].encoded_len() - 1] ^= 1;
    // Packet 0's body with the signature and path of packet 2, which is in the next block.
    assert!(previous.len() >= 4, "the rekey spans two full blocks of two ({} packets)", previous.len());
    let other_block = with_authentication_of(&previous[0], &previous[2]);
    vec![
        ("signed by another key", stranger_rekey),
        ("an empty rekey signed by another key", stranger_empty),
        ("one entry changed", vec![changed_entry]),
        ("the previous rekey re-sent", previous.to_vec()),
        ("a hash path of another block", vec![other_block]),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_rekeys_are_refused_and_members_follow_the_next_real_one() {
    let dir = tempfile::tempdir().unwrap();
    let policy = small_packet_policy();
    let group = LocalGroup::start(policy, 6, dir.path().to_path_buf()).await.unwrap();
    let mut members = group.join_all((1..=5).map(|i| format!("member-{i}"))).await.unwrap();
    let refs: Vec<&MemberClient> = members.iter().map(|(m, _)| m).collect();
    let seq = group.server().stats().rekeys;
    until_in_sync(&refs, seq, Duration::from_secs(5)).await;
    let signer = group.server().verifying_key;

    // Hear two real rekeys: member-5 evicted (four packets, one per member left), then member-4.
    let listener = keycast_net::multicast::receiver(&group.multicast).unwrap();
    let mut heard = Heard::default();
    for rekey in [seq + 1, seq + 2] {
        let evicted = members.pop().unwrap().0;
        assert!(group.server().evict(evicted.member()).await);
        capture_rekey(&listener, &mut heard, rekey, &signer).await;
    }
    let [previous, last] = [seq + 1, seq + 2].map(|rekey| heard.rekeys[&rekey].values().cloned().collect::<Vec<Vec<u8>>>());
    let refs: Vec<&MemberClient> = members.iter().map(|(m, _)| m).collect();
    // Wait for the last rekey's key to come into force, so nothing real changes from here on.
    let key = RekeyPacket::decode(&last[0]).unwrap().header.group_key;
    let mut in_force = until_in_sync(&refs, seq + 2, Duration::from_secs(5)).await;
    if in_force != key {
        in_force = until_active(&refs, seq + 2, Some(in_force), Duration::from_secs(5)).await;
    }
    assert_eq!(in_force, key, "the last rekey's group key is in force");
    for (_, events) in &mut members {
        while events.try_recv().is_ok() {}
    }

    let socket = keycast_net::multicast::sender(&group.multicast).unwrap();
    for (name, packets) in forgeries(&previous, &last, heard.epoch, &policy) {
        for _ in 0..3 {
            for packet in &packets {
                socket.send_to(packet, group.multicast.address).await.unwrap();
            }
        }
        sleep(Duration::from_millis(150)).await;
        for (member, events) in &mut members {
            assert_eq!((member.rekey_seq(), member.getkey().map(|k| k.0)), (seq + 2, Some(key)), "{name}: a member moved");
            while let Ok(event) = events.try_recv() {
                assert!(
                    !matches!(event, ClientEvent::Member(MemberEvent::Rekeyed { .. } | MemberEvent::OutOfSync { .. } | MemberEvent::Resynced { .. })),
                    "{name}: {event:?}"
                );
            }
        }
    }

    // The next real rekey (a join) reaches every member and they read each other.
    let (joiner, _events) = group.join("member-6").await.unwrap();
    let mut all: Vec<&MemberClient> = members.iter().map(|(m, _)| m).collect();
    all.push(&joiner);
    until_in_sync(&all, seq + 3, Duration::from_secs(5)).await;
    assert!(everyone_reads(&joiner, &all));
}
