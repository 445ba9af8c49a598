//! The wire format: round trips of every message, rekey packets a member verifies and uses
//! alone, and rejection of tampered, replayed, stale, misdirected and forged messages.

use std::collections::BTreeMap;

use keycast_core::protocol::reflector::joiners_key_ref;
use keycast_core::wire::auth::{path_len, Node, NODE_LEN};
use keycast_core::wire::guard::Offer;
use keycast_core::wire::rekey::{PacketiseError, RekeyContext};
use keycast_core::wire::*;
use keycast_core::{
    new_graph, Batch, BatchSeed, FlatIds, GraphConfig, JoinPolicy, Key, KeyGraph, KeyId, KeyRef, MemberError, MemberId, MemberKeys,
    Position, RekeyPlan, Scheme, Wrap, Wrapper,
};
use proptest::prelude::*;

// ---- round trips ----------------------------------------------------------------------

fn key_ref() -> impl Strategy<Value = KeyRef> {
    (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(i, v, r)| KeyRef::new(KeyId(i), v, r))
}

fn wrap() -> impl Strategy<Value = Wrap> {
    let under = prop_oneof![
        key_ref().prop_map(Wrapper::Key),
        (key_ref(), key_ref()).prop_map(|(kek, tek)| Wrapper::KekAndTek { kek, tek })
    ];
    (key_ref(), under, prop::array::uniform32(any::<u8>()), prop::array::uniform16(any::<u8>())).prop_map(
        |(key, under, a, b)| {
            let mut sealed = [0u8; 48];
            sealed[..32].copy_from_slice(&a);
            sealed[32..].copy_from_slice(&b);
            // Decoding gives every wrap its packet's salt: rekey_packet() sets it.
            Wrap { key, under, sealed, salt: [0; 12] }
        },
    )
}

fn position() -> impl Strategy<Value = Position> {
    prop_oneof![
        (any::<u32>(), 2u32..).prop_map(|(leaf, degree)| Position::Tree { leaf, degree }),
        (1u8..=64, any::<u64>()).prop_map(|(id_bits, id)| Position::Flat {
            id: if id_bits == 64 { id } else { id & ((1u64 << id_bits) - 1) },
            id_bits
        }),
    ]
}

fn key() -> impl Strategy<Value = Key> {
    prop::array::uniform32(any::<u8>()).prop_map(Key::from_bytes)
}

fn pending() -> impl Strategy<Value = Option<PendingKey>> {
    prop::option::of((key_ref(), any::<u64>()).prop_map(|(key, activation)| PendingKey { key, activation }))
}

fn signature() -> impl Strategy<Value = [u8; 64]> {
    (prop::array::uniform32(any::<u8>()), prop::array::uniform32(any::<u8>())).prop_map(|(a, b)| {
        let mut s = [0u8; 64];
        s[..32].copy_from_slice(&a);
        s[32..].copy_from_slice(&b);
        s
    })
}

fn rekey_packet() -> impl Strategy<Value = RekeyPacket> {
    (any::<[u64; 4]>(), key_ref(), any::<[u8; 12]>(), 1u32..5000, 0u8..=10, prop::collection::vec(wrap(), 0..14), signature())
        .prop_flat_map(|(fields, group_key, salt, count, block_bits, wraps, signature)| {
            let wraps: Vec<Wrap> = wraps.into_iter().map(|w| Wrap { salt, ..w }).collect();
            (0..count).prop_flat_map(move |index| {
                let header = RekeyHeader {
                    group: GroupId(fields[0]),
                    epoch: fields[1],
                    seq: fields[2],
                    activation: fields[3],
                    group_key,
                    salt,
                    index,
                    count,
                    block_bits,
                };
                let (first, size) = header.block();
                let nodes = path_len((index - first) as usize, size as usize);
                let wraps = wraps.clone();
                prop::collection::vec(prop::array::uniform16(any::<u8>()), nodes)
                    .prop_map(move |path: Vec<Node>| RekeyPacket { header, wraps: wraps.clone(), signature, path })
            })
        })
}

fn heartbeat() -> impl Strategy<Value = SignedHeartbeat> {
    (any::<[u64; 6]>(), key_ref(), pending(), any::<[[u8; 8]; 2]>(), signature()).prop_map(|(f, active, pending, checks, signature)| SignedHeartbeat {
        heartbeat: Heartbeat {
            group: GroupId(f[0]),
            epoch: f[1],
            seq: f[2],
            rekey_seq: f[3],
            active,
            active_check: checks[0],
            // Carried only with a pending key.
            pending_check: if pending.is_some() { checks[1] } else { [0; 8] },
            pending,
            group_size: f[4],
            sent_ms: f[5],
            activates_in_ms: f[0] as u32,
        },
        signature,
    })
}

fn data() -> impl Strategy<Value = Data> {
    (any::<[u64; 4]>(), key_ref(), 0..=keycast_core::wire::control::MAX_HOPS, prop::array::uniform12(any::<u8>()), prop::array::uniform32(any::<u8>()), prop::collection::vec(any::<u8>(), 16..300))
        .prop_map(|(f, key, hops, nonce, wrapped, ciphertext)| {
            let mut wrapped_key = [0x77; 48];
            wrapped_key[..32].copy_from_slice(&wrapped);
            Data { group: GroupId(f[0]), key, origin: GroupId(f[1]), sender: MemberId(f[2]), seq: f[3], hops, nonce, wrapped_key, ciphertext }
        })
}

fn message() -> impl Strategy<Value = Message> {
    let reason = prop_oneof![
        Just(RefusalReason::NotInAcl),
        Just(RefusalReason::UnknownGroup),
        Just(RefusalReason::AlreadyMember),
        Just(RefusalReason::GroupFull),
        Just(RefusalReason::Unavailable),
    ];
    prop_oneof![
        rekey_packet().prop_map(Message::Rekey),
        heartbeat().prop_map(Message::Heartbeat),
        any::<u64>().prop_map(|g| Message::JoinRequest(JoinRequest { group: GroupId(g) })),
        (any::<[u64; 3]>(), position(), key_ref(), key(), prop::array::uniform32(any::<u8>()), prop::option::of((any::<u32>(), key()))).prop_map(
            |(f, position, individual, individual_key, signer, joiners)| Message::JoinAnswer(JoinAnswer::Accepted(JoinAccepted {
                group: GroupId(f[0]),
                member: MemberId(f[1]),
                position,
                individual,
                individual_key,
                signer: VerifyingKey(signer),
                rekey_seq: f[2],
                joiners_key: joiners.map(|(batch, key)| Box::new((joiners_key_ref(batch.into()), key))),
            }))
        ),
        (reason, "\\PC{0,60}").prop_map(|(reason, detail)| Message::JoinAnswer(JoinAnswer::Refused { reason, detail })),
        any::<[u64; 2]>().prop_map(|f| Message::Leave(Leave { group: GroupId(f[0]), member: MemberId(f[1]) })),
        any::<[u64; 3]>().prop_map(|f| Message::Refresh(Refresh { group: GroupId(f[0]), member: MemberId(f[1]), rekey_seq: f[2] })),
        (any::<[u64; 4]>(), prop::collection::btree_map(any::<u32>(), 1..=u16::MAX, 0..64), any::<[u8; 32]>()).prop_map(|(f, needs, tag)| {
            Message::Nak(Nak { group: GroupId(f[0]), member: MemberId(f[1]), counter: f[2], seq: f[3], needs: needs.into_iter().collect(), tag })
        }),
        any::<[u64; 3]>()
            .prop_map(|f| Message::ResyncRequest(ResyncRequest { group: GroupId(f[0]), member: MemberId(f[1]), rekey_seq: f[2] })),
        (any::<[u64; 4]>(), position(), key_ref(), pending(), prop::collection::vec((key_ref(), key()), 0..30), any::<[u8; 32]>()).prop_map(
            |(f, position, active, pending, keys, signer)| Message::ResyncAnswer(ResyncAnswer {
                group: GroupId(f[0]),
                member: MemberId(f[1]),
                position,
                epoch: f[2],
                rekey_seq: f[3],
                active,
                pending,
                keys,
                signer: VerifyingKey(signer),
            })
        ),
        (any::<[u64; 2]>(), any::<[u8; 32]>(), signature()).prop_map(|(f, next, signature)| Message::SignerChange(SignedSignerChange {
            change: SignerChange { group: GroupId(f[0]), change: f[1], next: VerifyingKey(next) },
            signature,
        })),
        data().prop_map(Message::Data),
        (any::<[u64; 2]>(), prop::collection::btree_set(any::<u64>(), 0..60), prop::collection::btree_set(any::<u64>(), 0..60), signature())
            .prop_map(|(f, joined, left, signature)| Message::MembershipDelta(SignedDelta {
                delta: MembershipDelta {
                    group: GroupId(f[0]),
                    seq: f[1],
                    part: 0,
                    parts: 1,
                    joined: joined.into_iter().map(MemberId).collect(),
                    left: left.into_iter().map(MemberId).collect(),
                },
                signature,
            })),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Every message decodes to itself, re-encodes to the same bytes, and every proper prefix
    /// and every extension (a zero, an 0xff, and a random tail of 1 to 16 bytes) is refused.
    #[test]
    fn every_message_round_trips(message in message(), tail in prop::collection::vec(any::<u8>(), 1..=16)) {
        let bytes = message.encode();
        let decoded = Message::decode(&bytes).expect("decodes");
        prop_assert_eq!(&decoded, &message);
        prop_assert_eq!(decoded.encode(), bytes.clone());
        for cut in 0..bytes.len() {
            prop_assert!(Message::decode(&bytes[..cut]).is_err(), "the first {} of {} bytes decoded", cut, bytes.len());
        }
        for extra in [&[0u8][..], &[0xff], &tail] {
            let longer = [&bytes[..], extra].concat();
            prop_assert!(Message::decode(&longer).is_err(), "{} extra bytes {:02x?} decoded", extra.len(), extra);
        }
    }

    /// Arbitrary bytes, or a valid message with one byte changed, never make a decoder panic.
    #[test]
    fn decoding_garbage_is_an_error_not_a_panic(
        message in message(),
        noise in prop::collection::vec(any::<u8>(), 0..200),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let _ = Message::decode(&noise);
        let mut bytes = message.encode();
        let i = at.index(bytes.len());
        bytes[i] = byte;
        if let Ok(decoded) = Message::decode(&bytes) {
            prop_assert_eq!(decoded.encode(), bytes, "a decoded message has one encoding");
        }
    }
}

#[test]
fn each_malformation_has_its_own_error() {
    let leave = Leave { group: GroupId(1), member: MemberId(2) }.encode();
    assert_eq!(Message::decode(&[]), Err(DecodeError::Truncated { field: "version", needed: 1, available: 0 }));
    let mut v1 = leave.clone();
    v1[0] = 1;
    assert_eq!(Message::decode(&v1), Err(DecodeError::UnknownVersion(1)), "version 1 is no longer read");
    let mut unknown = leave.clone();
    unknown[1] = 99;
    assert_eq!(Message::decode(&unknown), Err(DecodeError::UnknownType(99)));
    let mut trailing = leave.clone();
    trailing.extend_from_slice(&[0, 0]);
    assert_eq!(Message::decode(&trailing), Err(DecodeError::TrailingBytes(2)));
    assert!(matches!(Message::decode(&leave[..10]), Err(DecodeError::Truncated { field: "member", .. })));
    assert!(matches!(Refresh::decode(&leave), Err(DecodeError::WrongType { .. })));
    assert_eq!(Message::decode(&vec![1; MAX_MESSAGE_LEN + 1]), Err(DecodeError::Oversized(MAX_MESSAGE_LEN + 1)));

    let nak = |needs: Vec<(u32, u16)>| Nak { group: GroupId(1), member: MemberId(2), counter: 9, seq: 3, needs, tag: [7; 32] }.encode();
    assert_eq!(Message::decode(&nak(vec![(20, 1), (10, 2)])), Err(DecodeError::NotAscending("NAK blocks")));
    assert_eq!(Message::decode(&nak(vec![(10, 0)])), Err(DecodeError::BadValue { field: "needed", value: 0 }));
    let mut huge = nak(vec![]);
    let at = huge.len() - 34;
    huge[at..at + 2].copy_from_slice(&u16::MAX.to_be_bytes());
    assert!(matches!(Message::decode(&huge), Err(DecodeError::TooLong { field: "blocks", .. })));

    let refused = JoinAnswer::Refused { reason: RefusalReason::NotInAcl, detail: "é".into() }.encode();
    let mut bad_text = refused.clone();
    *bad_text.last_mut().unwrap() = 0xff;
    assert_eq!(Message::decode(&bad_text), Err(DecodeError::BadText));
    let mut bad_reason = refused;
    bad_reason[3] = 77;
    assert_eq!(Message::decode(&bad_reason), Err(DecodeError::BadValue { field: "refusal reason", value: 77 }));
}

// ---- rekeys on the wire ---------------------------------------------------------------

struct Group {
    graph: Box<dyn KeyGraph>,
    members: BTreeMap<MemberId, MemberKeys>,
}

/// A populated group whose members hold their keys.
fn group(scheme: Scheme, n: u64) -> Group {
    group_with(scheme, n, JoinPolicy::NewVersion)
}

fn group_with(scheme: Scheme, n: u64, join_policy: JoinPolicy) -> Group {
    let seed = BatchSeed::from_u64(n);
    let mut graph = new_graph(GraphConfig { scheme, join_policy }, &seed).unwrap();
    graph.apply(&Batch { joins: (0..n).map(MemberId).collect(), leaves: vec![] }, &seed.next()).unwrap();
    let group_key = graph.group_key().0;
    let members = (0..n)
        .map(MemberId)
        .map(|m| {
            let (position, keys) = graph.member_keys(m).unwrap();
            (m, MemberKeys::from_snapshot(position, keys, group_key))
        })
        .collect();
    Group { graph, members }
}

/// Every tenth member leaves.
fn tenth_leaves(g: &mut Group) -> RekeyPlan {
    let leaves: Vec<MemberId> = g.members.keys().copied().filter(|m| m.0 % 10 == 3).collect();
    for m in &leaves {
        g.members.remove(m);
    }
    let plan = g.graph.apply(&Batch { joins: vec![], leaves }, &BatchSeed::from_u64(99)).unwrap();
    for m in &plan.excluded {
        g.members.remove(m);
    }
    plan
}

fn context(seq: u64) -> RekeyContext {
    RekeyContext { group: GroupId(7), epoch: 3, seq, activation: 4 }
}

fn signer() -> Signer {
    Signer::from_seed(&[42; 32])
}

/// Every member finds its entries in at most `most` packets (those it picks out by
/// `has_entry`) and gets the new group key from those alone, in either order. Returns the
/// most packets any member needed, per scheme.
fn each_member_needs_at_most(placement: Placement, most: usize) -> Vec<usize> {
    let mut most_needed = Vec::new();
    for scheme in [Scheme::Tree { degree: 4 }, Scheme::Tree { degree: 2 }, Scheme::Star] {
        let mut g = group(scheme, 4096);
        let plan = tenth_leaves(&mut g);
        let config = PacketConfig { placement, ..PacketConfig::default() };
        let rekey = encode_rekey(&plan, context(1), config, &signer()).unwrap();
        assert!(rekey.packets.iter().all(|p| p.len() <= DEFAULT_MTU));
        let key = signer().verifying_key();
        let packets: Vec<RekeyPacket> = rekey.packets.iter().map(|p| RekeyPacket::verify(p, &key).unwrap()).collect();
        let (_, group_key) = g.graph.group_key();
        let mut needed = 0;
        for (id, member) in &mut g.members {
            let mut mine: Vec<_> = packets.iter().filter(|p| member.has_entry(&p.message())).map(RekeyPacket::message).collect();
            assert!((1..=most).contains(&mine.len()), "{scheme:?} {id:?} needs {} packets", mine.len());
            needed = needed.max(mine.len());
            mine.reverse();
            member.apply(&mine).unwrap_or_else(|e| panic!("{scheme:?} {id:?}: {e}"));
            assert!(member.group_key().unwrap().1 == *group_key);
        }
        most_needed.push(needed);
    }
    most_needed
}

#[test]
fn under_user_oriented_placement_each_member_needs_only_the_one_packet_holding_its_entry() {
    assert_eq!(each_member_needs_at_most(Placement::UserOriented, 1), [1, 1, 1]);
}

#[test]
fn under_tiered_placement_each_tree_member_needs_at_most_two_packets() {
    // A star has one level: nothing to cut.
    assert_eq!(each_member_needs_at_most(Placement::Tiered, 2), [2, 2, 1]);
}

#[test]
fn a_tree_member_holding_only_one_of_its_two_tiered_packets_applies_nothing() {
    // New versions for joiners re-wrap each changed key under its old version, so a member
    // can open every upper key from its upper packet alone; it must still wait for its lower
    // packet, whose keys the upper wraps are sealed under, or its next rekey fails.
    for (join_policy, leaving) in [(JoinPolicy::NewVersion, 0), (JoinPolicy::NewVersion, 10), (JoinPolicy::Revision, 10)] {
        let mut g = group_with(Scheme::Tree { degree: 4 }, 1000, join_policy);
        let leaves: Vec<MemberId> = g.members.keys().copied().filter(|m| leaving > 0 && m.0 % leaving == 3).collect();
        for m in &leaves {
            g.members.remove(m);
        }
        let joins = (10_000..11_000).map(MemberId).collect();
        let plan = g.graph.apply(&Batch { joins, leaves }, &BatchSeed::from_u64(5)).unwrap();
        let packets = verified_packets(&plan, Placement::Tiered);
        let mut members_with_two = 0;
        for (id, member) in &g.members {
            let mine: Vec<_> = packets.iter().filter(|p| member.has_entry(&p.message())).map(RekeyPacket::message).collect();
            if mine.len() < 2 {
                continue;
            }
            members_with_two += 1;
            for alone in &mine {
                let result = member.clone().apply(std::slice::from_ref(alone));
                assert!(matches!(result, Err(MemberError::MissingKey(_))), "{id:?} applied one of its two packets: {result:?}");
            }
            let mut whole = member.clone();
            whole.apply(&mine).unwrap();
            assert_eq!(whole.refs(), path_refs(&*g.graph, *id), "{id:?}");
        }
        assert!(members_with_two > 10, "{join_policy:?}, 1 in {leaving} leaving: {members_with_two}");
    }
}

#[test]
fn after_joins_alone_under_revisions_any_packet_of_the_rekey_brings_a_member_up_to_date() {
    // Existing members get no wrap: each derives the group key's new revision from the header
    // of whichever packet it hears, and every key below it when a later rekey names one.
    let mut g = group_with(Scheme::Tree { degree: 4 }, 1000, JoinPolicy::Revision);
    // 20 joins fill free leaves: the tree keeps its height, so its root only advances a revision.
    let plan = g.graph.apply(&Batch { joins: (10_000..10_020).map(MemberId).collect(), leaves: vec![] }, &BatchSeed::from_u64(5)).unwrap();
    let packets = verified_packets(&plan, Placement::Auto);
    assert!(packets.len() > 1);
    let (_, group_key) = g.graph.group_key();
    for (id, member) in &g.members {
        for packet in [&packets[0], &packets[packets.len() - 1]] {
            assert!(member.has_entry(&packet.message()), "{id:?} {:?} {:?}", member.group_key().map(|g| g.0), packet.header.group_key);
            let mut updated = member.clone();
            updated.apply(&[packet.message()]).unwrap_or_else(|e| panic!("{id:?}: {e}"));
            assert!(updated.group_key().unwrap().1 == *group_key);
            assert_eq!(updated.refs().last(), path_refs(&*g.graph, *id).last());
        }
    }
}

fn verified_packets(plan: &RekeyPlan, placement: Placement) -> Vec<RekeyPacket> {
    let config = PacketConfig { placement, ..PacketConfig::default() };
    let rekey = encode_rekey(plan, context(1), config, &signer()).unwrap();
    let key = signer().verifying_key();
    rekey.packets.iter().map(|p| RekeyPacket::verify(p, &key).unwrap()).collect()
}

/// The refs of the keys on `member`'s path, sorted.
fn path_refs(graph: &dyn KeyGraph, member: MemberId) -> Vec<KeyRef> {
    let (_, keys) = graph.member_keys(member).unwrap();
    let mut refs: Vec<KeyRef> = keys.iter().map(|(r, _)| *r).collect();
    refs.sort();
    refs
}

#[test]
fn auto_placement_is_user_oriented_for_one_block_and_tiered_beyond() {
    let mut g = group(Scheme::Tree { degree: 4 }, 4096);
    let one = g.graph.apply(&Batch { joins: vec![], leaves: vec![MemberId(5)] }, &BatchSeed::from_u64(3)).unwrap();
    let plan = tenth_leaves(&mut g);
    for (plan, placement) in [(&one, Placement::UserOriented), (&plan, Placement::Tiered)] {
        let auto = encode_rekey(plan, context(1), PacketConfig::default(), &signer()).unwrap();
        let chosen = encode_rekey(plan, context(1), PacketConfig { placement, ..PacketConfig::default() }, &signer()).unwrap();
        assert_eq!(auto.packets, chosen.packets);
    }
    let user = PacketConfig { placement: Placement::UserOriented, ..PacketConfig::default() };
    let (tiered, user) = (encode_rekey(&plan, context(1), PacketConfig::default(), &signer()).unwrap(), encode_rekey(&plan, context(1), user, &signer()).unwrap());
    assert!(user.stats.packets > 64 && tiered.stats.bytes < user.stats.bytes, "{:?} {:?}", tiered.stats, user.stats);
}

#[test]
fn compact_placement_sends_each_wrap_once_and_still_serves_everyone() {
    for (scheme, n) in [(Scheme::Tree { degree: 4 }, 2048), (Scheme::Flat { id_bits: 16, ids: FlatIds::Sequential }, 40)] {
        let mut g = group(scheme, n);
        let plan = tenth_leaves(&mut g);
        let compact = PacketConfig { placement: Placement::Compact, ..PacketConfig::default() };
        let small = encode_rekey(&plan, context(1), compact, &signer()).unwrap();
        let user = encode_rekey(&plan, context(1), PacketConfig::default(), &signer()).unwrap();
        assert_eq!(small.stats.entries, plan.wraps.len());
        assert!(small.stats.bytes <= user.stats.bytes);
        let key = signer().verifying_key();
        let packets: Vec<RekeyPacket> = small.packets.iter().map(|p| RekeyPacket::verify(p, &key).unwrap()).collect();
        let messages: Vec<_> = packets.iter().map(RekeyPacket::message).collect();
        let (_, group_key) = g.graph.group_key();
        for member in g.members.values_mut() {
            member.apply(&messages).unwrap();
            assert!(member.group_key().unwrap().1 == *group_key);
        }
    }
}

#[test]
fn signing_is_per_block_and_authentication_is_a_small_share_of_the_bytes() {
    let mut g = group(Scheme::Tree { degree: 4 }, 16384);
    let plan = tenth_leaves(&mut g);
    let rekey = encode_rekey(&plan, context(1), PacketConfig::default(), &signer()).unwrap();
    let s = rekey.stats;
    assert_eq!(s.signatures, s.packets.div_ceil(64));
    assert!(s.auth_bytes * 100 < s.bytes * 15, "{s:?}");
    let one = encode_rekey(&plan, context(1), PacketConfig { block_bits: 10, ..Default::default() }, &signer()).unwrap();
    assert_eq!(one.stats.signatures, one.stats.packets.div_ceil(1024));
    let tiny = PacketConfig { mtu: 200, ..Default::default() };
    assert!(matches!(encode_rekey(&plan, context(1), tiny, &signer()), Err(PacketiseError::MtuTooSmall { .. })));
}

#[test]
fn an_empty_rekey_is_one_signed_packet() {
    let mut g = group(Scheme::Tree { degree: 4 }, 16);
    let plan = g.graph.apply(&Batch::default(), &BatchSeed::from_u64(5)).unwrap();
    let rekey = encode_rekey(&plan, context(1), PacketConfig::default(), &signer()).unwrap();
    assert_eq!(rekey.packets.len(), 1);
    RekeyPacket::verify(&rekey.packets[0], &signer().verifying_key()).unwrap();
}

fn sample_packets() -> Vec<Vec<u8>> {
    let mut g = group(Scheme::Tree { degree: 4 }, 1024);
    let plan = tenth_leaves(&mut g);
    encode_rekey(&plan, context(5), PacketConfig::default(), &signer()).unwrap().packets
}

#[test]
fn changing_any_byte_of_a_packet_is_detected() {
    let packets = sample_packets();
    let key = signer().verifying_key();
    for packet in [&packets[0], &packets[packets.len() / 2], packets.last().unwrap()] {
        for i in 0..packet.len() {
            let mut bad = packet.clone();
            bad[i] ^= 0x01;
            let result = RekeyPacket::verify(&bad, &key);
            assert!(result.is_err(), "byte {i} of {} changed unnoticed", packet.len());
        }
    }
    // A wrap re-sealed under the right key but not signed still fails the hash path.
    let mut decoded = RekeyPacket::decode(&packets[1]).unwrap();
    decoded.wraps.swap(0, 1);
    assert_eq!(RekeyPacket::verify(&decoded.encode(), &key).unwrap_err(), Reject::BadSignature);
    // A path node swapped between two packets of one block fails too.
    let mut other = RekeyPacket::decode(&packets[2]).unwrap();
    other.path[0] = [0; NODE_LEN];
    assert_eq!(RekeyPacket::verify(&other.encode(), &key).unwrap_err(), Reject::BadSignature);
}

#[test]
fn a_packet_signed_by_another_key_is_rejected() {
    let packets = sample_packets();
    let stranger = Signer::from_seed(&[1; 32]).verifying_key();
    assert_eq!(RekeyPacket::verify(&packets[0], &stranger).unwrap_err(), Reject::BadSignature);
}

#[test]
fn replayed_rekeys_and_other_groups_are_rejected_with_their_reason_and_a_late_next_rekey_is_taken() {
    let key = signer().verifying_key();
    let packet = RekeyPacket::verify(&sample_packets()[0], &key).unwrap();
    let mut guard = ReplayGuard::new(GroupId(7), 3, 4);
    guard.check_rekey(&packet.header).unwrap();
    guard.rekey_applied(&packet.header);
    assert_eq!(guard.check_rekey(&packet.header), Err(Reject::Replay { kind: "rekey", seq: 5, last: 5 }));
    // The next rekey is taken even after a heartbeat of a later epoch (it came late or was
    // rebuilt from a repair round): rekeys are ordered by seq, not epoch.
    let later_epoch = ReplayGuard::new(GroupId(7), 4, 4);
    assert_eq!(later_epoch.check_rekey(&packet.header), Ok(()));
    let elsewhere = ReplayGuard::new(GroupId(8), 0, 0);
    assert_eq!(elsewhere.check_rekey(&packet.header), Err(Reject::WrongGroup { expected: GroupId(8), got: GroupId(7) }));
}

#[test]
fn heartbeats_verify_and_replays_are_refused() {
    let beat = Heartbeat {
        group: GroupId(7),
        epoch: 3,
        seq: 10,
        rekey_seq: 5,
        active: KeyRef::new(KeyId(1), 2, 0),
        active_check: [1, 2, 3, 4, 5, 6, 7, 8],
        pending: Some(PendingKey { key: KeyRef::new(KeyId(1), 3, 0), activation: 4 }),
        pending_check: [9; 8],
        group_size: 1000,
        sent_ms: 1_790_000_000_000,
        activates_in_ms: 0,
    };
    let bytes = beat.sign(&signer()).encode();
    let key = signer().verifying_key();
    assert_eq!(SignedHeartbeat::verify(&bytes, &key).unwrap(), beat);
    for i in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[i] ^= 0x80;
        assert!(SignedHeartbeat::verify(&bad, &key).is_err(), "byte {i}");
    }
    assert_eq!(SignedHeartbeat::verify(&bytes, &Signer::from_seed(&[2; 32]).verifying_key()), Err(Reject::BadSignature));
    let mut guard = ReplayGuard::new(GroupId(7), 3, 5);
    guard.accept_heartbeat(&beat).unwrap();
    assert_eq!(guard.accept_heartbeat(&beat), Err(Reject::Replay { kind: "heartbeat", seq: 10, last: 10 }));
    let old = Heartbeat { seq: 11, epoch: 2, ..beat };
    assert_eq!(guard.accept_heartbeat(&old), Err(Reject::StaleEpoch { current: 3, got: 2 }));
}

#[test]
fn assembly_collects_one_rekey_and_names_what_is_missing() {
    let key = signer().verifying_key();
    let packets: Vec<RekeyPacket> = sample_packets().iter().map(|p| RekeyPacket::verify(p, &key).unwrap()).collect();
    let n = packets.len() as u32;
    assert!(n >= 4, "{n} packets");
    let mut assembly = RekeyAssembly::new(packets[0].clone());
    assert_eq!(assembly.offer(packets[0].clone()), Ok(Offer::Duplicate));
    assembly.offer(packets[2].clone()).unwrap();
    let mut missing = vec![1];
    missing.extend(3..n);
    assert_eq!(assembly.missing(usize::MAX), missing);
    let mut forged = packets[1].clone();
    forged.header.group_key = KeyRef::new(KeyId(0), 0, 0);
    assert!(matches!(assembly.offer(forged), Err(Reject::Inconsistent { .. })));
    for p in &packets[1..] {
        assembly.offer(p.clone()).unwrap();
    }
    assert!(assembly.is_complete());
    assert_eq!(assembly.messages().len(), packets.len());
}

#[test]
fn data_decoding_refuses_too_many_hops_a_ciphertext_shorter_than_its_tag_and_the_retired_relayed_type() {
    let data = Data {
        group: GroupId(1),
        key: KeyRef::new(KeyId(1), 1, 0),
        origin: GroupId(2),
        sender: MemberId(3),
        seq: 4,
        hops: keycast_core::wire::control::MAX_HOPS,
        nonce: [0; 12],
        wrapped_key: [0; 48],
        ciphertext: vec![0; 16],
    };
    assert_eq!(Data::decode(&data.encode()), Ok(data.clone()));
    let too_far = Data { hops: data.hops + 1, ..data.clone() };
    assert!(matches!(Data::decode(&too_far.encode()), Err(DecodeError::BadValue { field: "hops", .. })));
    let short = Data { ciphertext: vec![0; 15], ..data.clone() };
    assert!(matches!(Data::decode(&short.encode()), Err(DecodeError::BadValue { field: "ciphertext length", .. })));
    let mut retired = data.encode();
    retired[1] = 11;
    assert_eq!(Message::decode(&retired), Err(DecodeError::UnknownType(11)));
}
