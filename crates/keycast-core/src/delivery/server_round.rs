//! The server's side of one repair round (sans-IO): collect the NAKs of a rekey, then answer
//! with, per block, as many fresh parity shards as the neediest NAK of that block asked (the
//! ToN 2003 protocol: one repair serves every member of the block, since any k shards decode).
//!
//! Bounded by construction: one NAK per member per round (later ones are duplicates), at most
//! `max_nakers` members tracked (further NAKs are refused as `Full`), each block's answer
//! capped at the fresh parity it has left, and a NAK naming at most
//! [`MAX_WANTED_BLOCKS`] blocks. Output is in block order (no hash-map iteration).

use std::collections::BTreeSet;

use super::recovery::MAX_WANTED_BLOCKS;
use super::{BlockNeed, NakRequest};

/// What became of one NAK.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NakVerdict {
    Accepted,
    /// The member already NAKed this round.
    Duplicate,
    /// For another rekey than this round's.
    WrongRekey,
    /// Names a block the rekey does not have.
    UnknownBlock(u32),
    /// Names no block, too many, or one twice, or asks for nothing.
    Malformed,
    /// `max_nakers` members already NAKed: the member will resync by unicast.
    Full,
}

/// The answer to a round: fresh parity shards per block, and what the NAKs asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepairPlan {
    /// Blocks to repair, ascending, each with the count of fresh parity shards to send.
    pub repairs: Vec<BlockNeed>,
    /// Per accepted NAK, the most shards it asked for any block (input to
    /// [`super::proactivity::Proactivity::update`]).
    pub needed: Vec<u16>,
    /// NAKs refused, by any reason.
    pub refused: u32,
}

/// One round's NAK collector.
#[derive(Clone, Debug)]
pub struct RepairRound {
    rekey_seq: u64,
    /// Per block: fresh parity shards it can still send.
    capacity: Vec<u16>,
    /// Per block: most shards asked by one NAK.
    asked: Vec<u16>,
    nakers: BTreeSet<u64>,
    max_nakers: usize,
    needed: Vec<u16>,
    refused: u32,
}

impl RepairRound {
    /// A round of rekey `rekey_seq` whose block b has `capacity[b]` fresh parity shards left.
    pub fn new(rekey_seq: u64, capacity: Vec<u16>, max_nakers: usize) -> Self {
        let blocks = capacity.len();
        RepairRound { rekey_seq, capacity, asked: vec![0; blocks], nakers: BTreeSet::new(), max_nakers, needed: Vec::new(), refused: 0 }
    }

    /// Takes one member's NAK.
    pub fn on_nak(&mut self, member: u64, rekey_seq: u64, nak: &NakRequest) -> NakVerdict {
        let verdict = self.judge(member, rekey_seq, nak);
        if verdict == NakVerdict::Accepted {
            self.nakers.insert(member);
            let mut most = 0;
            for need in &nak.blocks {
                let slot = &mut self.asked[need.block as usize];
                *slot = (*slot).max(need.needed);
                most = most.max(need.needed);
            }
            self.needed.push(most);
        } else {
            self.refused = self.refused.saturating_add(1);
        }
        verdict
    }

    fn judge(&self, member: u64, rekey_seq: u64, nak: &NakRequest) -> NakVerdict {
        if rekey_seq != self.rekey_seq {
            return NakVerdict::WrongRekey;
        }
        if self.nakers.contains(&member) {
            return NakVerdict::Duplicate;
        }
        if nak.blocks.is_empty() || nak.blocks.len() > MAX_WANTED_BLOCKS || nak.blocks.iter().any(|b| b.needed == 0) {
            return NakVerdict::Malformed;
        }
        if let Some(bad) = nak.blocks.iter().find(|b| b.block as usize >= self.asked.len()) {
            return NakVerdict::UnknownBlock(bad.block);
        }
        let distinct: BTreeSet<u32> = nak.blocks.iter().map(|b| b.block).collect();
        if distinct.len() != nak.blocks.len() {
            return NakVerdict::Malformed;
        }
        if self.nakers.len() >= self.max_nakers {
            return NakVerdict::Full;
        }
        NakVerdict::Accepted
    }

    /// NAKs accepted so far.
    pub fn naks(&self) -> usize {
        self.needed.len()
    }

    /// The repair to multicast: per block the largest count asked, capped at what it has left.
    pub fn finish(self) -> RepairPlan {
        let repairs = self
            .asked
            .iter()
            .zip(&self.capacity)
            .enumerate()
            .filter_map(|(block, (&asked, &left))| {
                let count = asked.min(left);
                (count > 0).then_some(BlockNeed { block: block as u32, needed: count })
            })
            .collect();
        RepairPlan { repairs, needed: self.needed, refused: self.refused }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nak(blocks: &[(u32, u16)]) -> NakRequest {
        NakRequest { blocks: blocks.iter().map(|&(block, needed)| BlockNeed { block, needed }).collect() }
    }

    #[test]
    fn answers_each_block_with_its_largest_need_capped_by_capacity() {
        let mut round = RepairRound::new(9, vec![5, 5, 2], 100);
        assert_eq!(round.on_nak(1, 9, &nak(&[(0, 2)])), NakVerdict::Accepted);
        assert_eq!(round.on_nak(2, 9, &nak(&[(0, 4), (2, 3)])), NakVerdict::Accepted);
        assert_eq!(round.on_nak(3, 9, &nak(&[(0, 1)])), NakVerdict::Accepted);
        let plan = round.finish();
        assert_eq!(plan.repairs, vec![BlockNeed { block: 0, needed: 4 }, BlockNeed { block: 2, needed: 2 }]);
        assert_eq!(plan.needed, vec![2, 4, 1]);
    }

    #[test]
    fn hostile_and_repeated_naks_are_refused_and_bounded() {
        let mut round = RepairRound::new(9, vec![5, 5], 2);
        assert_eq!(round.on_nak(1, 8, &nak(&[(0, 1)])), NakVerdict::WrongRekey);
        assert_eq!(round.on_nak(1, 9, &nak(&[(7, 1)])), NakVerdict::UnknownBlock(7));
        assert_eq!(round.on_nak(1, 9, &nak(&[])), NakVerdict::Malformed);
        assert_eq!(round.on_nak(1, 9, &nak(&[(0, 0)])), NakVerdict::Malformed);
        assert_eq!(round.on_nak(1, 9, &nak(&[(0, 1), (0, 2)])), NakVerdict::Malformed);
        assert_eq!(round.on_nak(1, 9, &nak(&[(1, u16::MAX)])), NakVerdict::Accepted);
        assert_eq!(round.on_nak(1, 9, &nak(&[(0, 3)])), NakVerdict::Duplicate);
        assert_eq!(round.on_nak(2, 9, &nak(&[(0, 1)])), NakVerdict::Accepted);
        assert_eq!(round.on_nak(3, 9, &nak(&[(0, 1)])), NakVerdict::Full);
        let too_many: Vec<(u32, u16)> = (0..=MAX_WANTED_BLOCKS as u32).map(|b| (b % 2, 1)).collect();
        assert_eq!(RepairRound::new(9, vec![1, 1], 9).on_nak(4, 9, &nak(&too_many)), NakVerdict::Malformed);
        let plan = round.finish();
        assert_eq!(plan.repairs, vec![BlockNeed { block: 0, needed: 1 }, BlockNeed { block: 1, needed: 5 }]);
        assert_eq!(plan.refused, 7);
    }
}
