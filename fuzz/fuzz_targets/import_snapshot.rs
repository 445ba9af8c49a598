//! The controller's snapshot decoders: `Snapshot::decode` on raw bytes, and `import_graph` on
//! real graph exports damaged by the input (a first byte below 0x80 takes the rest as raw
//! graph bytes instead). Whatever imports re-exports to the same bytes (one encoding), and
//! its next batch succeeds or returns an error: never a panic.
#![no_main]

use keycast_core::protocol::Snapshot;
use keycast_core::{import_graph, new_graph, Batch, BatchSeed, FlatIds, GraphConfig, JoinPolicy, KeyGraph, MemberId, Scheme};
use libfuzzer_sys::fuzz_target;

#[path = "shared/edits.rs"]
mod edits;
use edits::edited;

fn config(selector: u8) -> GraphConfig {
    let scheme = match selector % 4 {
        0 => Scheme::Star,
        1 => Scheme::Tree { degree: 2 },
        2 => Scheme::Tree { degree: 4 },
        _ => Scheme::Flat { id_bits: 10, ids: FlatIds::Sequential },
    };
    let join_policy = if selector & 4 == 0 { JoinPolicy::NewVersion } else { JoinPolicy::Revision };
    GraphConfig { scheme, join_policy }
}

/// A graph of `members` members after some leaves, exported.
fn exported(config: GraphConfig, members: u64) -> Vec<u8> {
    let mut graph = new_graph(config, &BatchSeed::from_u64(1)).expect("a valid config");
    let joins = (0..members).map(MemberId).collect();
    graph.apply(&Batch { joins, leaves: vec![] }, &BatchSeed::from_u64(2)).expect("joins");
    let leaves = (0..members).step_by(3).map(MemberId).collect();
    graph.apply(&Batch { joins: vec![], leaves }, &BatchSeed::from_u64(3)).expect("leaves");
    graph.export().to_vec()
}

fn churn(graph: &mut dyn KeyGraph) {
    let leaves = (0..64).map(MemberId).filter(|&m| graph.contains(m)).collect();
    let _ = graph.apply(&Batch { joins: vec![MemberId(1000), MemberId(1001)], leaves }, &BatchSeed::from_u64(4));
}

fuzz_target!(|data: &[u8]| {
    let _ = Snapshot::decode(data);
    let Some((&selector, rest)) = data.split_first() else { return };
    let config = config(selector);
    let bytes = if selector < 0x80 {
        rest.to_vec()
    } else {
        // Structured: a member count, then (offset u16, xor u8) edits of a real export.
        let Some((&count, edits)) = rest.split_first() else { return };
        edited(exported(config, u64::from(count)), edits)
    };
    if let Ok(mut graph) = import_graph(config, &bytes) {
        assert_eq!(&graph.export()[..], &bytes[..], "an imported graph exports other bytes");
        churn(graph.as_mut());
    }
});
