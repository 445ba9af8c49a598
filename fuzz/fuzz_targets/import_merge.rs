//! The merge's decoders: `MergeRecord`, `MergeSide`, `MergeTicket` and `Handback` (the merge's
//! log record and the states two controllers hand each other) on raw bytes, and
//! `MergedTrees::import` (a merged group's snapshot graph) and `Handback::decode` on real
//! encodings damaged by the input. The first byte selects: below 0x40 the rest is raw bytes,
//! 0x40..0x80 edits a real handback, 0x80 and up edits a real merged group's export.
//! Whatever decodes re-encodes to the same bytes (one encoding; a merge record of the format
//! before server names re-encodes in today's, to the same record), and an imported merged
//! group's next batch succeeds or returns an error: never a panic.
#![no_main]

use keycast_core::graph::merge::{merge_trees, MergedTrees};
use keycast_core::protocol::merge::Contact;
use keycast_core::protocol::merge_state::{Handback, MergeRecord, MergeSide, MergeTicket, RightGroup};
use keycast_core::protocol::FixedPolicy;
use keycast_core::wire::{GroupId, VerifyingKey};
use keycast_core::{new_graph, Batch, BatchSeed, GraphConfig, JoinPolicy, KeyGraph, MemberId, Scheme};
use libfuzzer_sys::fuzz_target;

#[path = "shared/edits.rs"]
mod edits;
use edits::edited;

const OFFSET: u64 = 1000;
/// Merge records of this format (before server names) still read, and are written anew.
const RECORD_FORMAT_BEFORE_NAMES: u8 = 1;

/// A merged group of a degree-`degree` tree of `left` members and a star of `right`.
fn merged(degree: u32, left: u64, right: u64) -> MergedTrees {
    let tree = GraphConfig { scheme: Scheme::Tree { degree }, join_policy: JoinPolicy::NewVersion };
    let mut l = new_graph(tree, &BatchSeed::from_u64(1)).expect("a valid config");
    let mut r = new_graph(star(), &BatchSeed::from_u64(2)).expect("a valid config");
    l.apply(&Batch { joins: (0..left).map(MemberId).collect(), leaves: vec![] }, &BatchSeed::from_u64(3)).expect("joins");
    r.apply(&Batch { joins: (0..right).map(MemberId).collect(), leaves: vec![] }, &BatchSeed::from_u64(4)).expect("joins");
    merge_trees(&*l, &*r, OFFSET, &BatchSeed::from_u64(5)).expect("disjoint ids").graph
}

fn star() -> GraphConfig {
    GraphConfig { scheme: Scheme::Star, join_policy: JoinPolicy::Revision }
}

/// The handback of a merged group's split, encoded.
fn handback(right: u64) -> Vec<u8> {
    let split = merged(3, 5, right).split(&BatchSeed::from_u64(6)).expect("splits");
    let right_group = RightGroup {
        fixed: FixedPolicy { group: GroupId(2), graph: star(), epoch_ms: 100 },
        signer: VerifyingKey([9; 32]),
        created_ms: 1,
        rekey_seq: 3,
        next_member: right,
        contact: Contact {
            controller: "127.0.0.1:7000".parse().expect("an address"),
            server_name: "right.keycast.test".parse().expect("a name"),
            multicast: "239.255.0.9:7001".parse().expect("an address"),
        },
    };
    let members = (0..right).map(|i| (MemberId(i), format!("right-{i}"))).collect();
    Handback { right: right_group, graph: split.right, rekey: split.right_rekey, members, next_member: right }.encode().to_vec()
}


fn merged_import(bytes: &[u8]) {
    if let Ok(mut graph) = MergedTrees::import(bytes) {
        assert_eq!(&graph.export()[..], bytes, "an imported merged group exports other bytes");
        let leaves = (0..64).map(MemberId).filter(|&m| graph.contains(m)).collect();
        let _ = graph.apply(&Batch { joins: vec![MemberId(5000), MemberId(5001)], leaves }, &BatchSeed::from_u64(6));
        if graph.can_split().is_ok() {
            let _ = graph.split(&BatchSeed::from_u64(7));
        }
    }
}

fn handback_decode(bytes: &[u8]) {
    if let Ok(handback) = Handback::decode(bytes) {
        assert_eq!(&handback.encode()[..], bytes, "a decoded handback encodes to other bytes");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    match selector {
        0x00..=0x3f => {
            if let Ok(record) = MergeRecord::decode(rest) {
                let encoded = record.encode();
                if rest.first() == Some(&RECORD_FORMAT_BEFORE_NAMES) {
                    // Read with "localhost", written in today's format: the same record.
                    assert_eq!(MergeRecord::decode(&encoded).as_ref(), Ok(&record), "an old merge record reads back otherwise");
                } else {
                    assert_eq!(&encoded[..], rest, "a decoded merge record encodes to other bytes");
                }
            }
            if let Ok(side) = MergeSide::decode(rest) {
                assert_eq!(&side.encode()[..], rest, "a decoded merge side encodes to other bytes");
            }
            if let Ok(ticket) = MergeTicket::decode(rest) {
                assert_eq!(&ticket.encode()[..], rest, "a decoded ticket encodes to other bytes");
            }
            handback_decode(rest);
            merged_import(rest);
        }
        0x40..=0x7f => {
            let [right, edits @ ..] = rest else { return };
            handback_decode(&edited(handback(u64::from(*right % 40)), edits));
        }
        _ => {
            let [left, right, edits @ ..] = rest else { return };
            let graph = merged(2 + u32::from(selector & 3), u64::from(*left % 40), u64::from(*right % 40));
            merged_import(&edited(graph.export().to_vec(), edits));
        }
    }
});
