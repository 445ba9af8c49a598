//! Merge and split of two tree groups (Caronni et al. 3.5), at the key graph level.
//!
//! Over random pairs of groups (stars and trees of any degree, both join policies), random
//! histories before the merge, inside the merged group and at the split:
//! 1. after the merge, every member of both groups derives the new group key from its side's
//!    one-wrap rekey, and the coalition of everyone who left before derives nothing new;
//! 2. inside the merged group, every batch reaches every member and no leaver;
//! 3. after the split, each side derives its new group key, and the members of one side,
//!    all together and with every wrap ever sent, cannot derive the other side's.

use std::collections::BTreeMap;

use keycast_core::graph::merge::{merge_trees, MergedTrees, Subtree, MERGED_ROOT_ID};
use keycast_core::strategy::package_size;
use keycast_core::{
    new_graph, package, Batch, BatchSeed, FlatIds, GraphConfig, GraphError, JoinPolicy, KeyGraph, KeyRef, KeyRing, MemberId,
    KeyId, MemberKeys, RekeyPlan, Scheme, Strategy as Packaging, Wrap,
};
use std::net::SocketAddr;

use keycast_core::protocol::merge::{merge_messages, split_messages, Channel, Contact, Destination};
use keycast_core::protocol::traffic::Fresh;
use keycast_core::protocol::{MemberEvent, MemberSession};
use keycast_core::wire::control::{JoinAccepted, ResyncAnswer};
use keycast_core::wire::rekey::RekeyContext;
use keycast_core::wire::{
    encode_rekey, DecodeError, GroupId, MergeNotice, Message, Move, PacketConfig, Reject, RekeyPacket, SignedMergeNotice, Signer, TlsServerName, VerifyingKey,
};
use proptest::prelude::*;

type Members = BTreeMap<MemberId, MemberKeys>;

/// What the right group's member ids take in the merged group.
const OFFSET: u64 = 1 << 32;

/// Everything an eavesdropper and the members who left know.
#[derive(Default)]
struct Audit {
    history: Vec<Wrap>,
    departed: KeyRing,
}

impl Audit {
    fn overhear(&mut self, plan: &RekeyPlan) {
        self.history.extend(plan.wraps.iter().cloned());
    }

    fn leave(&mut self, members: &mut Members, leavers: &[MemberId]) {
        for m in leavers {
            self.departed.extend(members.remove(m).expect("a member").keyring());
        }
    }

    /// The departed members together derive none of `plan`'s new keys.
    fn departed_learn_nothing(&mut self, plan: &RekeyPlan) {
        absorb_what_opens(&mut self.departed, &self.history);
        for r in plan.replaced.iter().chain(&plan.revised).chain([&plan.group_key]) {
            assert!(!self.departed.holds(*r), "members who left derive new key {r}");
        }
    }
}

/// Opens every wrap `ring` can, skipping those that fail: the two groups of a merge named
/// their keys alike before it, so a ring of one group meets wraps under the other's keys.
fn absorb_what_opens(ring: &mut KeyRing, wraps: &[Wrap]) {
    loop {
        let before = ring.len();
        for wrap in wraps {
            let _ = ring.absorb(std::slice::from_ref(wrap));
        }
        if ring.len() == before {
            return;
        }
    }
}

/// `ring` under the key names of `subtree` in a merged group.
fn renamed(ring: &KeyRing, rename: impl Fn(KeyId) -> Option<KeyId>) -> KeyRing {
    let mut out = KeyRing::new();
    for r in ring.refs() {
        if let Some(id) = rename(r.id) {
            out.insert(KeyRef { id, ..r }, ring.get(r).expect("held"));
        }
    }
    out
}

/// Each member applies the whole rekey and must end with `group_key`.
fn deliver(members: &mut Members, plan: &RekeyPlan, group_key: (KeyRef, &keycast_core::Key)) {
    assert_eq!(plan.group_key, group_key.0);
    let messages = package(plan, Packaging::GroupOriented);
    for (m, state) in members.iter_mut() {
        state.apply(&messages).unwrap_or_else(|e| panic!("member {m:?}: {e}"));
        assert!(state.group_key().is_some_and(|(r, k)| r == group_key.0 && k == *group_key.1), "member {m:?} lacks the group key");
    }
}

/// A group of `config` grown by `joins` members from `first`, then left by every `leave_every`-th.
fn group(config: GraphConfig, first: u64, joins: u64, leave_every: u64, seed: &mut BatchSeed, audit: &mut Audit) -> (Box<dyn KeyGraph>, Members) {
    let mut graph = new_graph(config, seed).unwrap();
    let mut members = Members::new();
    *seed = seed.next();
    let plan = graph.apply(&Batch { joins: (first..first + joins).map(MemberId).collect(), leaves: vec![] }, seed).unwrap();
    members.extend(plan.welcomes.iter().map(|w| (w.member, MemberKeys::from_welcome(w))));
    deliver(&mut members, &plan, graph.group_key());
    audit.overhear(&plan);
    let leaves: Vec<MemberId> = members.keys().copied().filter(|m| leave_every > 0 && m.0 % leave_every == 0).collect();
    *seed = seed.next();
    let plan = graph.apply(&Batch { joins: vec![], leaves: leaves.clone() }, seed).unwrap();
    audit.leave(&mut members, &leaves);
    audit.overhear(&plan);
    deliver(&mut members, &plan, graph.group_key());
    audit.departed_learn_nothing(&plan);
    (graph, members)
}

/// One batch of the merged group; joiners learn their side from the graph (the welcome).
fn merged_batch(graph: &mut MergedTrees, members: &mut Members, batch: &Batch, seed: &BatchSeed, audit: &mut Audit) {
    let plan = graph.apply(batch, seed).unwrap();
    audit.leave(members, &batch.leaves);
    audit.overhear(&plan);
    for welcome in &plan.welcomes {
        let mut state = MemberKeys::from_welcome(welcome);
        state.joined_merged(graph.subtree_of(welcome.member).expect("joined"));
        members.insert(welcome.member, state);
    }
    deliver(members, &plan, graph.group_key());
    for (m, state) in members.iter() {
        let (_, expected) = graph.member_keys(*m).expect("a member");
        for (r, key) in &expected {
            assert!(state.key(*r).is_some_and(|k| k == *key), "member {m:?} cannot derive {r}");
        }
        // And it keeps no key off its path (a subtree's dropped root, say).
        let mut expected: Vec<_> = expected.iter().map(|(r, _)| (r.id, r.version)).collect();
        let mut held: Vec<_> = state.refs().into_iter().map(|r| (r.id, r.version)).collect();
        expected.sort();
        held.sort();
        assert_eq!(held, expected, "member {m:?} path differs from the controller's");
    }
    audit.departed_learn_nothing(&plan);
}

fn tree_config() -> impl proptest::strategy::Strategy<Value = GraphConfig> {
    let scheme = prop_oneof![Just(Scheme::Star), (2u32..=5).prop_map(|degree| Scheme::Tree { degree })];
    let policy = prop_oneof![Just(JoinPolicy::NewVersion), Just(JoinPolicy::Revision)];
    (scheme, policy).prop_map(|(scheme, join_policy)| GraphConfig { scheme, join_policy })
}

#[allow(clippy::too_many_arguments)]
fn run(left_config: GraphConfig, right_config: GraphConfig, sizes: (u64, u64), leave_every: u64, steps: &[(u64, u64)], seed: u64) {
    let mut seed = BatchSeed::from_u64(seed);
    let (mut left_audit, mut right_audit) = (Audit::default(), Audit::default());
    let (left, mut left_members) = group(left_config, 0, sizes.0, leave_every, &mut seed, &mut left_audit);
    // Both controllers number their members from 0: the right group's ids move up at the merge.
    let (right, right_members) = group(right_config, 0, sizes.1, leave_every + 1, &mut seed, &mut right_audit);
    let mut right_members: Members = right_members.into_iter().map(|(m, s)| (MemberId(m.0 + OFFSET), s)).collect();
    // From the merge on, everyone who left either group pools what it learnt, under merged names
    // (the wraps sent before are spent: both rings absorbed them all).
    let mut audit = Audit::default();
    audit.departed.extend(&left_audit.departed);
    audit.departed.extend(&renamed(&right_audit.departed, |id| Some(Subtree::Right.merged_id(id))));

    seed = seed.next();
    let merge = merge_trees(&*left, &*right, OFFSET, &seed).unwrap();
    let mut graph = merge.graph;
    for (rekey, side) in [(&merge.left_rekey, &left_members), (&merge.right_rekey, &right_members)] {
        // One short message on each side's channel: the new root under the side's old root.
        assert!(rekey.wraps.len() == usize::from(!side.is_empty()));
    }
    for (members, subtree, rekey) in [(&mut left_members, Subtree::Left, &merge.left_rekey), (&mut right_members, Subtree::Right, &merge.right_rekey)] {
        members.values_mut().for_each(|state| state.merge_into(subtree));
        audit.overhear(rekey);
        deliver(members, rekey, graph.group_key());
        audit.departed_learn_nothing(rekey);
    }
    let mut members: Members = left_members.into_iter().chain(right_members).collect();

    let mut next = OFFSET + 1_000_000;
    for &(joins, leave_every) in steps {
        let leaves: Vec<MemberId> = members.keys().copied().filter(|m| leave_every > 0 && (m.0 + next) % leave_every == 0).collect();
        let batch = Batch { joins: (next..next + joins).map(MemberId).collect(), leaves };
        next += joins;
        seed = seed.next();
        merged_batch(&mut graph, &mut members, &batch, &seed, &mut audit);
    }

    // Why a clean split needs only a new root a side: all the members of one side together,
    // with every wrap of the merged group, derive no key of the other subtree.
    let sides: Vec<Subtree> = members.keys().map(|&m| graph.subtree_of(m).expect("a member")).collect();
    for side in [Subtree::Left, Subtree::Right] {
        let mut pooled = KeyRing::new();
        members.values().zip(&sides).filter(|(_, s)| **s == side).for_each(|(state, _)| pooled.extend(state.keyring()));
        pooled.absorb(&audit.history).expect("merged ids are unique");
        assert!(pooled.refs().all(|r| r.id == MERGED_ROOT_ID || side.own_id(r.id).is_some()), "{side:?} derives a key of the other subtree");
    }

    seed = seed.next();
    let split = graph.split(&seed).unwrap();
    let mut halves = [Members::new(), Members::new()];
    let mut pooled = [KeyRing::new(), KeyRing::new()];
    for ((m, mut state), side) in members.into_iter().zip(sides) {
        let i = usize::from(side == Subtree::Right);
        pooled[i].extend(state.keyring());
        state.split_out();
        halves[i].insert(m, state);
    }
    let [mut left_members, right_members] = halves;
    let mut right_members: Members = right_members.into_iter().map(|(m, s)| (MemberId(m.0 - OFFSET), s)).collect();
    for (members, rekey, graph) in [(&mut left_members, &split.left_rekey, &split.left), (&mut right_members, &split.right_rekey, &split.right)] {
        assert!(rekey.wraps.len() == usize::from(!members.is_empty()));
        deliver(members, rekey, graph.group_key());
        assert!(members.values().all(|s| s.refs().iter().all(|r| r.id != MERGED_ROOT_ID)));
    }
    // Each side's new key reaches neither the other side (everything its members ever held,
    // pooled, under either side's names) nor anyone who left.
    audit.overhear(&split.left_rekey);
    audit.departed_learn_nothing(&split.left_rekey);
    let split_wraps = [split.left_rekey.wraps.clone(), split.right_rekey.wraps.clone()].concat();
    let own_names = |ring: &KeyRing| renamed(ring, |id| Subtree::Right.own_id(id));
    // By value: after the split both sides may name their new keys alike.
    let reads = |ring: &KeyRing, (r, key): (KeyRef, &keycast_core::Key)| ring.get(r).is_some_and(|k| k == *key);
    for (ring, other) in [(&pooled[0], split.right.group_key()), (&pooled[1], split.left.group_key())] {
        for mut ring in [ring.clone(), own_names(ring)] {
            absorb_what_opens(&mut ring, &split_wraps);
            assert!(!reads(&ring, other), "one side reads the other side's new key {}", other.0);
        }
    }
    for mut departed in [audit.departed.clone(), own_names(&audit.departed)] {
        absorb_what_opens(&mut departed, &split_wraps);
        for side in [&split.left, &split.right] {
            assert!(!reads(&departed, side.group_key()), "members who left read a side's new key");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn merged_groups_reach_every_member_of_both_and_no_one_else(
        left in tree_config(),
        right in tree_config(),
        sizes in (0u64..40, 0u64..40),
        leave_every in 2u64..6,
        steps in prop::collection::vec((0u64..8, 0u64..9), 0..4),
        seed: u64,
    ) {
        run(left, right, sizes, leave_every, &steps, seed);
    }
}

#[test]
fn flat_groups_and_shared_members_are_refused() {
    let seed = BatchSeed::from_u64(7);
    let tree = GraphConfig { scheme: Scheme::Tree { degree: 4 }, join_policy: JoinPolicy::NewVersion };
    let flat = GraphConfig { scheme: Scheme::Flat { id_bits: 8, ids: FlatIds::Sequential }, join_policy: JoinPolicy::NewVersion };
    let (a, b) = (new_graph(tree, &seed).unwrap(), new_graph(flat, &seed).unwrap());
    assert!(matches!(merge_trees(&*a, &*b, 100, &seed), Err(GraphError::Config(_))));
    let mut a = new_graph(tree, &seed).unwrap();
    let mut b = new_graph(tree, &seed).unwrap();
    let shared = Batch { joins: vec![MemberId(1), MemberId(2)], leaves: vec![] };
    a.apply(&shared, &seed.next()).unwrap();
    b.apply(&Batch { joins: vec![MemberId(2)], leaves: vec![] }, &seed.next()).unwrap();
    assert_eq!(merge_trees(&*a, &*b, 0, &seed).err(), Some(GraphError::AlreadyMember(MemberId(2))));
    assert!(merge_trees(&*a, &*b, 100, &seed).is_ok());
    assert!(matches!(merge_trees(&*a, &*b, u64::MAX, &seed), Err(GraphError::Config(_))));
    // A right-side joiner numbered below the offset could not take its old numbering back.
    let mut merged = merge_trees(&*a, &*b, 100, &seed).unwrap().graph;
    merged.apply(&Batch { joins: vec![MemberId(50), MemberId(51)], leaves: vec![] }, &seed.next()).unwrap();
    assert!(merged.can_split().is_err() && merged.split(&seed).is_err());
}

/// The figures of docs/merge.md: `cargo test -p keycast-core --test merge sizes -- --nocapture`.
#[test]
fn merge_and_split_cost_one_wrap_a_side_whatever_the_group_sizes() {
    let config = GraphConfig { scheme: Scheme::Tree { degree: 4 }, join_policy: JoinPolicy::NewVersion };
    for members in [1u64, 1_000, 100_000] {
        let mut seed = BatchSeed::from_u64(members);
        let mut graphs = Vec::new();
        for first in [0, members] {
            let mut graph = new_graph(config, &seed).unwrap();
            seed = seed.next();
            graph.apply(&Batch { joins: (first..first + members).map(MemberId).collect(), leaves: vec![] }, &seed).unwrap();
            graphs.push(graph);
        }
        let merge = merge_trees(&*graphs[0], &*graphs[1], 0, &seed.next()).unwrap();
        let sizes = |plan: &RekeyPlan| package_size(&package(plan, Packaging::GroupOriented));
        // On the wire: signed packets of the default configuration.
        let signer = Signer::from_seed(&[1; 32]);
        let context = RekeyContext { group: GroupId(1), epoch: 1, seq: 2, activation: 2 };
        let wire = |plan: &RekeyPlan| encode_rekey(plan, context, PacketConfig::default(), &signer).unwrap().stats;
        let (left, right) = (sizes(&merge.left_rekey), sizes(&merge.right_rekey));
        assert_eq!((left.wraps, right.wraps), (1, 1));
        let merge_wire = wire(&merge.rekey());
        let mut graph = merge.graph;
        let leave = graph.apply(&Batch { joins: vec![], leaves: (1..members).map(|_| MemberId(0)).take(1).collect() }, &seed.next().next()).unwrap();
        let split = graph.split(&seed.next().next().next()).unwrap();
        let (left_split, right_split) = (sizes(&split.left_rekey), sizes(&split.right_rekey));
        assert_eq!((left_split.wraps, right_split.wraps), (1, 1));
        let split_wire = wire(&split.right_rekey);
        assert_eq!((merge_wire.packets, split_wire.packets), (1, 1));
        let notice_bytes = notice(Move::Merge(Subtree::Right)).sign(&signer).encode().len();
        println!(
            "{members} members a side: merge {} + {} wraps ({} + {} bytes before packets; one {}-byte packet with both, on each channel; a {notice_bytes}-byte notice on the right); \
             one leave in the merged group {} wraps; split {} + {} wraps ({} + {} bytes, one {}-byte packet a side)",
            left.wraps, right.wraps, left.bytes, right.bytes, merge_wire.bytes, leave.wraps.len(), left_split.wraps, right_split.wraps,
            left_split.bytes, right_split.bytes, split_wire.bytes
        );
    }
}

fn notice(change: Move) -> MergeNotice {
    MergeNotice {
        group: GroupId(0x6b63),
        after_seq: 7,
        change,
        member_offset: OFFSET,
        next_group: GroupId(0x6b64),
        next_epoch: 12,
        next_seq: 40,
        next_signer: Signer::from_seed(&[2; 32]).verifying_key(),
        controller: "127.0.0.1:7400".parse().unwrap(),
        server_name: "localhost".parse().unwrap(),
        multicast: "[ff15::1]:7401".parse().unwrap(),
    }
}

/// Where the server name's length byte sits in an encoded notice (after the controller's IPv4 address).
const SERVER_NAME_AT: usize = 2 + 8 + 8 + 1 + 8 + 8 + 16 + 32 + 7;

#[test]
fn merge_notices_verify_under_the_current_signer_only_and_decode_strictly() {
    let current = Signer::from_seed(&[1; 32]);
    for change in [Move::Merge(Subtree::Left), Move::Merge(Subtree::Right), Move::Split] {
        let bytes = notice(change).sign(&current).encode();
        assert_eq!(bytes.len(), SERVER_NAME_AT + 1 + "localhost".len() + 19 + 64);
        assert_eq!(SignedMergeNotice::verify(&bytes, &current.verifying_key()), Ok(notice(change)));
        assert_eq!(Message::decode(&bytes).map(|m| m.encode()), Ok(bytes.clone()));
        // Only the controller the members trust now may move them.
        let next = Signer::from_seed(&[2; 32]).verifying_key();
        assert_eq!(SignedMergeNotice::verify(&bytes, &next), Err(Reject::BadSignature));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(SignedMergeNotice::decode(&longer), Err(DecodeError::TrailingBytes(1))));
        assert!(matches!(SignedMergeNotice::decode(&bytes[..bytes.len() - 1]), Err(DecodeError::Truncated { .. })));
    }
    let mut bytes = notice(Move::Split).sign(&current).encode();
    bytes[18] = 3;
    assert!(matches!(SignedMergeNotice::decode(&bytes), Err(DecodeError::BadValue { field: "move", value: 3 })));
    let mut bytes = notice(Move::Split).sign(&current).encode();
    bytes[2 + 8 + 8 + 1 + 8 + 8 + 16 + 32] = 5;
    assert!(matches!(SignedMergeNotice::decode(&bytes), Err(DecodeError::BadValue { field: "controller address", value: 5 })));
}

#[test]
fn merge_notices_with_a_bad_server_name_are_refused_by_decoding() {
    let current = Signer::from_seed(&[1; 32]);
    let good = notice(Move::Split).sign(&current).encode();
    let at = SERVER_NAME_AT;
    assert_eq!(good[at], 9, "the length of \"localhost\"");
    // A space, a control byte, a byte above ASCII: each a typed error, signed or not.
    for (offset, byte) in [(0, b' '), (4, 0x07), (8, 0xc3)] {
        let mut bad = good.clone();
        bad[at + 1 + offset] = byte;
        assert!(matches!(SignedMergeNotice::decode(&bad), Err(DecodeError::BadValue { field: "server name", .. } | DecodeError::BadText)), "byte {byte:#x}");
        assert!(SignedMergeNotice::verify(&bad, &current.verifying_key()).is_err());
    }
    // Empty, and longer than a DNS name.
    let mut empty = good[..at].to_vec();
    empty.push(0);
    empty.extend_from_slice(&good[at + 1 + 9..]);
    assert!(matches!(SignedMergeNotice::decode(&empty), Err(DecodeError::BadValue { field: "server name", value: 0 })));
    let mut long = good[..at].to_vec();
    long.push(254);
    long.extend(std::iter::repeat_n(b'a', 254));
    long.extend_from_slice(&good[at + 1 + 9..]);
    assert!(matches!(SignedMergeNotice::decode(&long), Err(DecodeError::BadValue { field: "server name", value: 254 })));
    // A length running past the message.
    let mut short = good[..at].to_vec();
    short.extend_from_slice(&[200, b'a', b'b']);
    assert!(matches!(SignedMergeNotice::decode(&short), Err(DecodeError::Truncated { field: "server name", .. })));
    // The longest name decodes and re-encodes; a longer one cannot be made.
    let longest = "a".repeat(253);
    let named = MergeNotice { server_name: longest.parse().unwrap(), ..notice(Move::Split) }.sign(&current).encode();
    assert_eq!(SignedMergeNotice::decode(&named).map(|n| n.notice.server_name.as_str().to_owned()), Ok(longest.clone()));
    assert!(TlsServerName::new(&format!("{longest}a")).is_err());
    assert!(TlsServerName::new("").is_err() && TlsServerName::new("a b").is_err() && TlsServerName::new("é").is_err());
    assert_eq!(TlsServerName::new("::1").map(|n| n.to_string()), Ok("::1".into()), "an IP literal");
}

/// A member as far as a merge goes: its keys, and the group and controller key it follows.
struct Follower {
    id: MemberId,
    keys: MemberKeys,
    group: GroupId,
    signer: VerifyingKey,
}

impl Follower {
    /// Takes a notice as a member session would: signed by the controller it follows, for its group.
    fn notice(&mut self, bytes: &[u8]) -> Result<(), String> {
        let notice = SignedMergeNotice::verify(bytes, &self.signer).map_err(|e| e.to_string())?;
        if notice.group != self.group {
            return Err("another group's notice".into());
        }
        match notice.change {
            Move::Merge(subtree) => {
                self.keys.merge_into(subtree);
                self.id = MemberId(self.id.0 + notice.member_offset);
            }
            Move::Split => {
                self.keys.split_out();
                self.id = MemberId(self.id.0 - notice.member_offset);
            }
        }
        (self.group, self.signer) = (notice.next_group, notice.next_signer);
        Ok(())
    }

    fn rekey(&mut self, packets: &[Vec<u8>]) -> Result<KeyRef, String> {
        let packets: Vec<RekeyPacket> = packets.iter().map(|p| RekeyPacket::verify(p, &self.signer).map_err(|e| e.to_string())).collect::<Result<_, _>>()?;
        if packets.iter().any(|p| p.header.group != self.group) {
            return Err("another group's rekey".into());
        }
        let messages: Vec<_> = packets.iter().map(|p| p.message()).collect();
        Ok(self.keys.apply(&messages).map_err(|e| e.to_string())?.group_key)
    }
}

fn followers(graph: &dyn KeyGraph, plan: &RekeyPlan, group: GroupId, signer: &Signer) -> Vec<Follower> {
    plan.welcomes
        .iter()
        .map(|w| {
            let mut keys = MemberKeys::from_welcome(w);
            keys.apply(&package(plan, Packaging::GroupOriented)).unwrap();
            assert_eq!(keys.group_key().unwrap().0, graph.group_key().0);
            Follower { id: w.member, keys, group, signer: signer.verifying_key() }
        })
        .collect()
}

/// Merge and split over the wire, deterministically: signed packets and notices, members that
/// trust only the controller they follow, and no rejoin.
#[test]
fn members_of_both_groups_follow_a_merge_and_a_split_over_the_wire_without_rejoining() {
    let (left_signer, right_signer) = (Signer::from_seed(&[1; 32]), Signer::from_seed(&[2; 32]));
    let (left_group, right_group) = (GroupId(1), GroupId(2));
    let mut seed = BatchSeed::from_u64(99);
    let tree = GraphConfig { scheme: Scheme::Tree { degree: 3 }, join_policy: JoinPolicy::NewVersion };
    let star = GraphConfig { scheme: Scheme::Star, join_policy: JoinPolicy::Revision };
    let mut left = new_graph(tree, &seed).unwrap();
    let mut right = new_graph(star, &seed.next()).unwrap();
    seed = seed.next().next();
    // Both controllers number their members from 0.
    let plan = left.apply(&Batch { joins: (0..9).map(MemberId).collect(), leaves: vec![] }, &seed).unwrap();
    let mut left_members = followers(&*left, &plan, left_group, &left_signer);
    let plan = right.apply(&Batch { joins: (0..6).map(MemberId).collect(), leaves: vec![] }, &seed.next()).unwrap();
    let mut right_members = followers(&*right, &plan, right_group, &right_signer);

    let channel = |group, last_seq, signer| Channel { group, epoch: 4, last_seq, signer, packets: PacketConfig::default() };
    let destination = |group, signer: &Signer, port| Destination {
        group,
        signer: signer.verifying_key(),
        contact: Contact {
            controller: SocketAddr::from(([127, 0, 0, 1], port)),
            server_name: "localhost".parse().unwrap(),
            multicast: SocketAddr::from(([239, 255, 0, 1], port + 1)),
        },
    };
    let merge = merge_trees(&*left, &*right, OFFSET, &seed.next().next()).unwrap();
    let (left_side, right_side) =
        merge_messages(&merge, &channel(left_group, 1, &left_signer), &channel(right_group, 1, &right_signer), OFFSET, destination(left_group, &left_signer, 7400)).unwrap();
    assert_eq!((left_side.rekey.len(), right_side.rekey.len()), (1, 1), "one short packet a side");
    let notice = right_side.notice.as_ref().expect("a notice for the right side");
    // The notice is the right controller's to give: the left side's members and a notice
    // signed by anyone else are refused.
    assert!(left_members[0].notice(notice).is_err());
    let forged = MergeNotice { member_offset: 5, ..SignedMergeNotice::decode(notice).unwrap().notice }.sign(&left_signer).encode();
    assert!(right_members[0].notice(&forged).is_err());
    // Without the notice a right member neither trusts nor can use the merge rekey.
    assert!(right_members[0].rekey(&right_side.rekey).is_err());

    let merged_key = merge.graph.group_key().0;
    for m in &mut left_members {
        assert_eq!(m.rekey(&left_side.rekey), Ok(merged_key));
    }
    for m in &mut right_members {
        m.notice(notice).unwrap();
        assert_eq!(m.rekey(&right_side.rekey), Ok(merged_key));
        assert!(merge.graph.subtree_of(m.id) == Some(Subtree::Right), "member {:?} has its merged id", m.id);
    }
    let all: Vec<_> = left_members.iter().chain(&right_members).map(|m| m.keys.group_key().unwrap()).collect();
    assert!(all.iter().all(|k| *k == all[0]), "every member of both groups holds one group key");

    let graph = merge.graph;
    let split = graph.split(&seed.next().next().next()).unwrap();
    let (left_side, right_side) =
        split_messages(&split, &channel(left_group, 2, &left_signer), &channel(right_group, 1, &right_signer), OFFSET, destination(right_group, &right_signer, 7500)).unwrap();
    let notice = right_side.notice.as_ref().expect("a notice for the right side");
    for m in &mut left_members {
        assert_eq!(m.rekey(&left_side.rekey), Ok(split.left.group_key().0));
        // The right side's rekey now comes from a controller the left side does not follow.
        assert!(m.rekey(&right_side.rekey).is_err());
    }
    for (i, m) in right_members.iter_mut().enumerate() {
        m.notice(notice).unwrap();
        assert_eq!(m.id, MemberId(i as u64), "member ids go back to the right controller's");
        assert_eq!(m.rekey(&right_side.rekey), Ok(split.right.group_key().0));
        assert!(m.rekey(&left_side.rekey).is_err());
    }
    assert!(split.left.group_key().1 != split.right.group_key().1);
}

/// Member sessions of `graph`, as admitted by its controller at rekey 1 of `epoch`.
fn sessions(graph: &dyn KeyGraph, members: &[MemberId], group: GroupId, epoch: u64, signer: &Signer) -> Vec<MemberSession> {
    members
        .iter()
        .map(|&member| {
            let (position, keys) = graph.member_keys(member).expect("a member");
            let (individual, individual_key) = keys[0].clone();
            let accepted = JoinAccepted { group, member, position, individual, individual_key, signer: signer.verifying_key(), rekey_seq: 1, joiners_key: None };
            let answer = ResyncAnswer {
                group, member, position, epoch, rekey_seq: 1, active: graph.group_key().0, pending: None, keys, signer: signer.verifying_key(),
            };
            MemberSession::join(&accepted, answer, 1_000, 0).0
        })
        .collect()
}

/// Every session of `senders` seals one message; the sessions of `readers` open each or not.
fn traffic_reaches(senders: &mut [MemberSession], readers: &mut [MemberSession], tag: u8) -> (usize, usize) {
    let (mut opened, mut refused) = (0, 0);
    for (i, sender) in senders.iter_mut().enumerate() {
        let fresh = Fresh { message_key: [tag; 32], nonce: [i as u8; 12] };
        let data = sender.seal(b"hello", fresh).expect("a key in force");
        for reader in readers.iter_mut() {
            match reader.open(&data) {
                Ok(plain) => {
                    assert_eq!(plain, b"hello");
                    opened += 1;
                }
                Err(_) => refused += 1,
            }
        }
    }
    (opened, refused)
}

/// Member sessions of both groups follow a merge and a split, and their data reaches exactly
/// the members of their group of the moment.
#[test]
fn member_sessions_follow_the_notice_and_traffic_spans_both_groups_until_the_split() {
    let (left_signer, right_signer) = (Signer::from_seed(&[1; 32]), Signer::from_seed(&[2; 32]));
    let (left_group, right_group) = (GroupId(1), GroupId(2));
    let seed = BatchSeed::from_u64(7);
    let tree = GraphConfig { scheme: Scheme::Tree { degree: 2 }, join_policy: JoinPolicy::NewVersion };
    let (mut left, mut right) = (new_graph(tree, &seed).unwrap(), new_graph(tree, &seed.next()).unwrap());
    let ids: Vec<MemberId> = (0..5).map(MemberId).collect();
    left.apply(&Batch { joins: ids.clone(), leaves: vec![] }, &seed.next().next()).unwrap();
    right.apply(&Batch { joins: ids[..4].to_vec(), leaves: vec![] }, &seed.next().next().next()).unwrap();
    let mut lefts = sessions(&*left, &ids, left_group, 4, &left_signer);
    let mut rights = sessions(&*right, &ids[..4], right_group, 9, &right_signer);
    assert_eq!(traffic_reaches(&mut lefts, &mut rights, 1), (0, 20), "two groups, two keys");

    let channel = |group, epoch, last_seq, signer| Channel { group, epoch, last_seq, signer, packets: PacketConfig::default() };
    let to = |group: GroupId, signer: &Signer| Destination {
        group,
        signer: signer.verifying_key(),
        contact: Contact {
            controller: SocketAddr::from(([127, 0, 0, 1], 7400)),
            server_name: format!("group-{}.keycast.test", group.0).parse().unwrap(),
            multicast: SocketAddr::from(([239, 255, 0, 1], 7401)),
        },
    };
    let merge = merge_trees(&*left, &*right, OFFSET, &seed.next().next().next().next()).unwrap();
    let merged = channel(left_group, 4, 1, &left_signer);
    let (left_side, right_side) = merge_messages(&merge, &merged, &channel(right_group, 9, 1, &right_signer), OFFSET, to(left_group, &left_signer)).unwrap();
    let notice = right_side.notice.unwrap();
    for s in &mut rights {
        let events = s.receive(&notice, 10).unwrap();
        assert!(matches!(&events[..], [MemberEvent::Moved { group, member, server_name, .. }] if *group == left_group && member.0 >= OFFSET && *server_name == to(left_group, &left_signer).contact.server_name));
        // Taken once: a replayed notice is refused.
        assert!(s.receive(&notice, 11).is_err());
    }
    for s in lefts.iter_mut().chain(&mut rights) {
        let events: Vec<_> = left_side.rekey.iter().flat_map(|p| s.receive(p, 12).unwrap()).collect();
        assert!(events.iter().any(|e| matches!(e, MemberEvent::KeyActivated { group_key, .. } if *group_key == merge.graph.group_key().0)), "{events:?}");
    }
    // One group now: every member reads every other's data, whichever group it came from.
    assert_eq!(traffic_reaches(&mut lefts, &mut rights, 2), (20, 0));
    assert_eq!(traffic_reaches(&mut rights, &mut lefts, 3), (20, 0));

    let split = merge.graph.split(&seed.next().next().next().next().next()).unwrap();
    let (left_side, right_side) =
        split_messages(&split, &channel(left_group, 4, 2, &left_signer), &channel(right_group, 9, 1, &right_signer), OFFSET, to(right_group, &right_signer)).unwrap();
    let notice = right_side.notice.unwrap();
    for (i, s) in rights.iter_mut().enumerate() {
        let events = s.receive(&notice, 20).unwrap();
        assert!(matches!(&events[..], [MemberEvent::Moved { group, member, server_name, .. }] if *group == right_group && *member == ids[i] && *server_name == to(right_group, &right_signer).contact.server_name));
        for p in &right_side.rekey {
            s.receive(p, 21).unwrap();
        }
        assert_eq!(s.active_key().unwrap().0, split.right.group_key().0);
    }
    for s in &mut lefts {
        for p in &left_side.rekey {
            s.receive(p, 21).unwrap();
        }
        assert_eq!(s.active_key().unwrap().0, split.left.group_key().0);
        // The right side's controller is no longer this member's to follow.
        assert!(s.receive(&right_side.rekey[0], 22).is_err());
    }
    assert_eq!(traffic_reaches(&mut lefts, &mut rights, 4), (0, 20), "two groups again");
    assert_eq!(traffic_reaches(&mut rights, &mut lefts, 5), (0, 20));
    let (first, rest) = rights.split_at_mut(2);
    assert_eq!(traffic_reaches(first, rest, 6), (4, 0), "each side reads itself");
}
