//! A member's collection of one rekey's packets and parity shards: as soon as an FEC block
//! holds as many shards as it has packets, its lost packets are rebuilt (`delivery::fec`).
//! Rebuilt packets are verified by the caller like any rekey packet, so a parity shard that
//! was verified but decodes to garbage (it cannot: each is signed) would still change nothing.

use std::collections::{BTreeMap, BTreeSet};

use crate::delivery::fec::{decode_block, BlockCode, Shard, ShardIndex};
use crate::wire::control::MAX_NAK_BLOCKS;
use crate::wire::ParityHeader;

/// Packets of one rekey a member keeps for repairs; a larger rekey is repaired by resync.
const MAX_KEPT_PACKETS: usize = 4096;

/// One FEC block's parity shards as received.
#[derive(Debug)]
struct ParityBlock {
    originals: u16,
    capacity: u16,
    shards: BTreeMap<u16, Vec<u8>>,
}

#[derive(Debug)]
pub(crate) struct RepairCollector {
    seq: u64,
    /// Verified rekey packets by index.
    packets: BTreeMap<u32, Vec<u8>>,
    /// Parity by the index of its block's first packet.
    blocks: BTreeMap<u32, ParityBlock>,
    /// Blocks already rebuilt (or found not to need it).
    done: BTreeSet<u32>,
}

impl RepairCollector {
    pub(crate) fn new(seq: u64) -> Self {
        RepairCollector { seq, packets: BTreeMap::new(), blocks: BTreeMap::new(), done: BTreeSet::new() }
    }

    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    /// A verified rekey packet of this rekey; returns the packets it lets the member rebuild.
    pub(crate) fn packet(&mut self, index: u32, bytes: &[u8]) -> Vec<Vec<u8>> {
        if self.packets.len() >= MAX_KEPT_PACKETS || self.packets.contains_key(&index) {
            return Vec::new();
        }
        self.packets.insert(index, bytes.to_vec());
        let first = self.blocks.range(..=index).next_back().filter(|(first, b)| index < **first + u32::from(b.originals)).map(|(f, _)| *f);
        first.map_or_else(Vec::new, |first| self.rebuild(first))
    }

    /// A verified parity shard of this rekey; returns the packets it lets the member rebuild.
    pub(crate) fn parity(&mut self, header: &ParityHeader, shard: Vec<u8>) -> Vec<Vec<u8>> {
        let block = self.blocks.entry(header.first).or_insert_with(|| ParityBlock { originals: header.originals, capacity: header.capacity, shards: BTreeMap::new() });
        // Shards of one block must agree on its shape (they are signed: a mismatch is a bug).
        if (block.originals, block.capacity) != (header.originals, header.capacity) || block.shards.len() >= usize::from(block.originals) {
            return Vec::new();
        }
        block.shards.entry(header.parity_index).or_insert(shard);
        self.rebuild(header.first)
    }

    /// Per block this member heard of and cannot rebuild yet, how many more shards it needs
    /// (what a NAK asks for). Blocks whose every shard was lost are not known here.
    pub(crate) fn needs(&self) -> Vec<(u32, u16)> {
        self.blocks
            .iter()
            .filter(|(first, _)| !self.done.contains(first))
            .filter_map(|(&first, block)| {
                let held = self.packets.range(first..first + u32::from(block.originals)).count() + block.shards.len();
                let needed = usize::from(block.originals).saturating_sub(held);
                (needed > 0).then_some((first, needed as u16))
            })
            .take(MAX_NAK_BLOCKS)
            .collect()
    }

    /// The missing packets of the block at `first`, once it has enough shards.
    fn rebuild(&mut self, first: u32) -> Vec<Vec<u8>> {
        let Some(block) = self.blocks.get(&first) else { return Vec::new() };
        if self.done.contains(&first) {
            return Vec::new();
        }
        let k = u32::from(block.originals);
        let held: Vec<(u32, &Vec<u8>)> = self.packets.range(first..first + k).map(|(i, p)| (*i, p)).collect();
        if held.len() == k as usize {
            self.done.insert(first);
            return Vec::new();
        }
        if held.len() + block.shards.len() < k as usize {
            return Vec::new();
        }
        let Some(shard_len) = block.shards.values().next().map(Vec::len) else { return Vec::new() };
        let mut shards: Vec<Shard<'_>> = held.iter().map(|(i, p)| Shard { index: ShardIndex::Original((i - first) as u16), bytes: p }).collect();
        shards.extend(block.shards.iter().map(|(i, s)| Shard { index: ShardIndex::Parity(*i), bytes: s }));
        let rebuilt = BlockCode::new(k as usize, usize::from(block.capacity)).and_then(|code| decode_block(code, shard_len, &shards));
        self.done.insert(first);
        let Ok(originals) = rebuilt else { return Vec::new() };
        originals.into_iter().enumerate().filter(|(i, _)| !self.packets.contains_key(&(first + *i as u32))).map(|(_, p)| p).collect()
    }
}
