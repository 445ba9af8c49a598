//! The merge's decoders: `MergeRecord::decode` (the merge's log record, with the absorbed
//! group's state) on raw bytes, and `MergedTrees::import` (a merged group's snapshot graph) on
//! a real merged group's export damaged by the input (a first byte below 0x80 takes the rest as
//! raw bytes instead). Whatever decodes re-encodes to the same bytes (one encoding), and an
//! imported merged group's next batch succeeds or returns an error: never a panic.
#![no_main]

use keycast_core::graph::merge::{merge_trees, MergedTrees};
use keycast_core::protocol::merge_state::MergeRecord;
use keycast_core::{new_graph, Batch, BatchSeed, GraphConfig, JoinPolicy, KeyGraph, MemberId, Scheme};
use libfuzzer_sys::fuzz_target;

/// A merged group of a degree-`degree` tree of `left` members and a star of `right`, exported.
fn exported(degree: u32, left: u64, right: u64) -> Vec<u8> {
    let tree = GraphConfig { scheme: Scheme::Tree { degree }, join_policy: JoinPolicy::NewVersion };
    let star = GraphConfig { scheme: Scheme::Star, join_policy: JoinPolicy::Revision };
    let mut l = new_graph(tree, &BatchSeed::from_u64(1)).expect("a valid config");
    let mut r = new_graph(star, &BatchSeed::from_u64(2)).expect("a valid config");
    l.apply(&Batch { joins: (0..left).map(MemberId).collect(), leaves: vec![] }, &BatchSeed::from_u64(3)).expect("joins");
    r.apply(&Batch { joins: (0..right).map(MemberId).collect(), leaves: vec![] }, &BatchSeed::from_u64(4)).expect("joins");
    let merge = merge_trees(&*l, &*r, 1000, &BatchSeed::from_u64(5)).expect("disjoint ids");
    merge.graph.export().to_vec()
}

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = MergeRecord::decode(data) {
        assert_eq!(&record.encode()[..], data, "a decoded merge record encodes to other bytes");
    }
    let Some((&selector, rest)) = data.split_first() else { return };
    let bytes = if selector < 0x80 {
        rest.to_vec()
    } else {
        // Structured: member counts, then (offset u16, xor u8) edits of a real export.
        let [left, right, edits @ ..] = rest else { return };
        let mut bytes = exported(2 + u32::from(selector & 3), u64::from(*left % 40), u64::from(*right % 40));
        for edit in edits.chunks_exact(3) {
            let at = usize::from(u16::from_be_bytes([edit[0], edit[1]]));
            match bytes.len() {
                0 => break,
                len if edit[2] == 0 => bytes.truncate(at % len),
                len => bytes[at % len] ^= edit[2],
            }
        }
        bytes
    };
    if let Ok(mut graph) = MergedTrees::import(&bytes) {
        assert_eq!(&graph.export()[..], &bytes[..], "an imported merged group exports other bytes");
        let leaves = (0..64).map(MemberId).filter(|&m| graph.contains(m)).collect();
        let _ = graph.apply(&Batch { joins: vec![MemberId(5000), MemberId(5001)], leaves }, &BatchSeed::from_u64(6));
        if graph.can_split().is_ok() {
            let _ = graph.split(&BatchSeed::from_u64(7));
        }
    }
});
