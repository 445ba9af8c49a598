//! A member's side of one rekey's delivery (sans-IO): which of its packets it holds, how many
//! more shards each of its blocks needs, and when to NAK.
//!
//! The member knows which packets it needs (block and index in the block, see
//! `docs/delivery.md`). It feeds every shard of those blocks it receives: an original packet
//! (already verified by the caller, as every rekey packet is signed) or a parity shard. A
//! wanted packet is available when it arrives itself, or once the block has k distinct shards
//! and decodes. Parity shards are not trusted: each decoded packet goes through the caller's
//! `verify`, and a block whose decode yields a packet that does not verify drops its parity
//! shards (so wrong bytes are never reported as the member's packet) and asks again.
//!
//! NAKs: when a round ends without every wanted packet, the member draws a backoff (from a
//! random number the caller gives) and NAKs at its deadline with, per incomplete block, the
//! shards it still needs. Before then, a repair announced for the block that covers its need,
//! or another member's NAK for the block asking at least as many, suppresses that block's
//! entry; a NAK with no entry left is not sent. No clock: times are `now_ms` inputs.

use std::collections::BTreeMap;

use super::fec::{decode_block, BlockCode, FecError, Shard, ShardIndex};
use super::{BlockNeed, NakRequest};

/// Most blocks one member can wait on in a rekey (tiered placement needs two packets).
pub const MAX_WANTED_BLOCKS: usize = 8;

/// A block's shape, as the server announces it with its parity shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockShape {
    pub code: BlockCode,
    /// Bytes of each parity shard (see [`super::fec::shard_len_for`]).
    pub shard_len: usize,
}

/// A packet a member needs: its block, its index among the block's originals, and how many
/// originals the block has (k, or fewer for a rekey's last block).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Wanted {
    pub block: u32,
    pub index: u16,
    pub block_originals: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecoveryError {
    #[error("a member waits on at most {MAX_WANTED_BLOCKS} blocks, not {0}")]
    TooManyBlocks(usize),
    #[error("no wanted packets")]
    NothingWanted,
    #[error("block {0} is not one this member waits on")]
    UnknownBlock(u32),
    #[error("block {block} was announced with another shape before, or with another k than the member's")]
    ShapeMismatch { block: u32 },
    #[error("wanted packet {index} is beyond block {block}'s {originals} originals")]
    WantedOutOfRange { block: u32, index: u16, originals: usize },
    #[error("block {block} decoded to a packet that does not verify: its parity shards were dropped")]
    DecodedPacketInvalid { block: u32 },
    #[error(transparent)]
    Fec(#[from] FecError),
}

/// What a shard changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Kept; the block still needs this many shards.
    Needs(u16),
    /// Every wanted packet of the block is now available.
    BlockDone,
    /// Not needed (the block is done, or the shard was a duplicate).
    Ignored,
}

#[derive(Debug)]
struct BlockState {
    /// k of this block.
    originals: u16,
    /// Indices of the member's packets in this block.
    wanted: Vec<u16>,
    shape: Option<BlockShape>,
    received: BTreeMap<u16, Vec<u8>>,
    parity: BTreeMap<u16, Vec<u8>>,
    /// The member's packets, once all available (in `wanted` order).
    done: Option<Vec<Vec<u8>>>,
    /// Suppressed for this round: a repair or another NAK covers the need.
    suppressed: bool,
}

impl BlockState {
    /// Distinct shards held, at most k are ever kept.
    fn held(&self) -> usize {
        self.received.len() + self.parity.len()
    }

    fn needed(&self) -> u16 {
        if self.done.is_some() {
            return 0;
        }
        usize::from(self.originals).saturating_sub(self.held()) as u16
    }

    /// The wanted packets if they all arrived as originals.
    fn wanted_directly(&self) -> Option<Vec<Vec<u8>>> {
        self.wanted.iter().map(|i| self.received.get(i).cloned()).collect()
    }
}

/// One member's recovery state for one rekey.
#[derive(Debug)]
pub struct MemberRecovery {
    blocks: BTreeMap<u32, BlockState>,
    /// Longest backoff drawn before a NAK.
    backoff_max_ms: u64,
    nak_deadline: Option<u64>,
}

impl MemberRecovery {
    pub fn new(wanted: &[Wanted], backoff_max_ms: u64) -> Result<Self, RecoveryError> {
        if wanted.is_empty() {
            return Err(RecoveryError::NothingWanted);
        }
        let mut blocks: BTreeMap<u32, BlockState> = BTreeMap::new();
        for w in wanted {
            if w.index >= w.block_originals {
                return Err(RecoveryError::WantedOutOfRange { block: w.block, index: w.index, originals: w.block_originals.into() });
            }
            if !blocks.contains_key(&w.block) && blocks.len() == MAX_WANTED_BLOCKS {
                return Err(RecoveryError::TooManyBlocks(MAX_WANTED_BLOCKS + 1));
            }
            let state = blocks.entry(w.block).or_insert_with(|| BlockState {
                originals: w.block_originals,
                wanted: Vec::new(),
                shape: None,
                received: BTreeMap::new(),
                parity: BTreeMap::new(),
                done: None,
                suppressed: false,
            });
            if state.originals != w.block_originals {
                return Err(RecoveryError::ShapeMismatch { block: w.block });
            }
            if !state.wanted.contains(&w.index) {
                state.wanted.push(w.index);
            }
        }
        Ok(MemberRecovery { blocks, backoff_max_ms, nak_deadline: None })
    }

    fn block(&mut self, block: u32) -> Result<&mut BlockState, RecoveryError> {
        self.blocks.get_mut(&block).ok_or(RecoveryError::UnknownBlock(block))
    }

    /// Pins a block's shape on its first announcement; later ones must agree.
    fn pin_shape(state: &mut BlockState, block: u32, shape: BlockShape) -> Result<(), RecoveryError> {
        match state.shape {
            Some(pinned) if pinned != shape => Err(RecoveryError::ShapeMismatch { block }),
            Some(_) => Ok(()),
            None if shape.code.originals() != usize::from(state.originals) => Err(RecoveryError::ShapeMismatch { block }),
            None => {
                state.shape = Some(shape);
                Ok(())
            }
        }
    }

    /// An original packet of `block` (verified by the caller). `verify` checks packets decoded
    /// if this original completes k shards with parity held before.
    pub fn receive_original(&mut self, block: u32, index: u16, packet: &[u8], verify: impl Fn(&[u8]) -> bool) -> Result<Progress, RecoveryError> {
        let state = self.block(block)?;
        if index >= state.originals {
            return Err(FecError::IndexOutOfRange { index: ShardIndex::Original(index), limit: state.originals.into() }.into());
        }
        if state.done.is_some() || state.received.contains_key(&index) {
            return Ok(Progress::Ignored);
        }
        // Past k shards only a wanted packet is worth keeping.
        if !state.wanted.contains(&index) && state.held() >= usize::from(state.originals) {
            return Ok(Progress::Ignored);
        }
        state.received.insert(index, packet.to_vec());
        if let Some(packets) = state.wanted_directly() {
            state.done = Some(packets);
            state.parity.clear();
            return Ok(Progress::BlockDone);
        }
        match state.shape {
            Some(shape) if !state.parity.is_empty() && state.held() >= shape.code.originals() => Self::decode(state, block, shape, verify),
            _ => Ok(Progress::Needs(state.needed())),
        }
    }

    /// A parity shard of `block`. `verify` checks a decoded packet (its signature).
    pub fn receive_parity(
        &mut self,
        block: u32,
        shape: BlockShape,
        index: u16,
        shard: &[u8],
        verify: impl Fn(&[u8]) -> bool,
    ) -> Result<Progress, RecoveryError> {
        let state = self.block(block)?;
        if state.done.is_some() {
            return Ok(Progress::Ignored);
        }
        Self::pin_shape(state, block, shape)?;
        shape.code.check_index(ShardIndex::Parity(index))?;
        if shard.len() != shape.shard_len {
            return Err(FecError::WrongShardLength { index: ShardIndex::Parity(index), expected: shape.shard_len, got: shard.len() }.into());
        }
        if state.parity.contains_key(&index) || state.held() >= shape.code.originals() {
            return Ok(Progress::Ignored);
        }
        state.parity.insert(index, shard.to_vec());
        if state.held() < shape.code.originals() {
            return Ok(Progress::Needs(state.needed()));
        }
        Self::decode(state, block, shape, verify)
    }

    /// Decodes a block holding k shards; on a packet that does not verify, drops the parity.
    fn decode(state: &mut BlockState, block: u32, shape: BlockShape, verify: impl Fn(&[u8]) -> bool) -> Result<Progress, RecoveryError> {
        let shards: Vec<Shard<'_>> = state
            .received
            .iter()
            .map(|(&i, bytes)| Shard { index: ShardIndex::Original(i), bytes })
            .chain(state.parity.iter().map(|(&i, bytes)| Shard { index: ShardIndex::Parity(i), bytes }))
            .collect();
        let decoded = match decode_block(shape.code, shape.shard_len, &shards) {
            Ok(decoded) => decoded,
            Err(error) => {
                state.parity.clear();
                return Err(error.into());
            }
        };
        let restored = |i: &usize| !state.received.contains_key(&(*i as u16));
        if decoded.iter().enumerate().any(|(i, packet)| restored(&i) && !verify(packet)) {
            state.parity.clear();
            return Err(RecoveryError::DecodedPacketInvalid { block });
        }
        state.done = Some(state.wanted.iter().map(|&i| decoded[usize::from(i)].clone()).collect());
        state.parity.clear();
        state.received.clear();
        Ok(Progress::BlockDone)
    }

    /// True once every wanted packet is available.
    pub fn is_complete(&self) -> bool {
        self.blocks.values().all(|b| b.done.is_some())
    }

    /// The member's packets, block by block in wanted order, once complete.
    pub fn packets(&self) -> Option<Vec<&[u8]>> {
        let mut out = Vec::new();
        for state in self.blocks.values() {
            out.extend(state.done.as_ref()?.iter().map(Vec::as_slice));
        }
        Some(out)
    }

    /// Shards each incomplete block still needs, in block order.
    pub fn needs(&self) -> Vec<BlockNeed> {
        self.blocks
            .iter()
            .filter(|(_, s)| s.done.is_none())
            .map(|(&block, s)| BlockNeed { block, needed: s.needed() })
            .collect()
    }

    /// A multicast round ended at `now_ms`: if still incomplete, schedule a NAK after a backoff
    /// drawn from `random` (uniform in 0..=backoff_max_ms). Returns the deadline.
    pub fn round_ended(&mut self, now_ms: u64, random: u64) -> Option<u64> {
        self.blocks.values_mut().for_each(|b| b.suppressed = false);
        if self.is_complete() {
            self.nak_deadline = None;
            return None;
        }
        let backoff = random % self.backoff_max_ms.saturating_add(1).max(1);
        self.nak_deadline = Some(now_ms.saturating_add(backoff));
        self.nak_deadline
    }

    pub fn nak_deadline(&self) -> Option<u64> {
        self.nak_deadline
    }

    /// The server announced `count` fresh parity shards for `block` this round.
    pub fn heard_repair(&mut self, block: u32, count: u16) {
        self.suppress_if_covered(block, count);
    }

    /// Another member NAKed `block` for `count` shards (the server answers the largest).
    pub fn heard_nak(&mut self, block: u32, count: u16) {
        self.suppress_if_covered(block, count);
    }

    fn suppress_if_covered(&mut self, block: u32, count: u16) {
        if let Some(state) = self.blocks.get_mut(&block) {
            if state.done.is_none() && count >= state.needed() {
                state.suppressed = true;
            }
        }
    }

    /// The NAK to send at `now_ms`, if its deadline has come and some block is still short
    /// and not covered; the deadline is cleared either way once reached.
    pub fn poll_nak(&mut self, now_ms: u64) -> Option<NakRequest> {
        let deadline = self.nak_deadline?;
        if now_ms < deadline {
            return None;
        }
        self.nak_deadline = None;
        let blocks: Vec<BlockNeed> = self
            .blocks
            .iter()
            .filter(|(_, s)| s.done.is_none() && !s.suppressed)
            .map(|(&block, s)| BlockNeed { block, needed: s.needed().max(1) })
            .collect();
        (!blocks.is_empty()).then_some(NakRequest { blocks })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::fec::encode_block;
    use proptest::prelude::*;

    fn block_of(k: usize, m: usize) -> (Vec<Vec<u8>>, BlockShape, Vec<Vec<u8>>) {
        let packets: Vec<Vec<u8>> = (0..k).map(|i| vec![i as u8 + 1; 40 + i]).collect();
        let code = BlockCode::new(k, m).unwrap();
        let encoded = encode_block(code, &packets).unwrap();
        (packets, BlockShape { code, shard_len: encoded.shard_len }, encoded.parity)
    }

    #[test]
    fn own_packet_directly_completes_the_block() {
        let (packets, _, _) = block_of(4, 4);
        let mut member = MemberRecovery::new(&[Wanted { block: 7, index: 2, block_originals: 4 }], 100).unwrap();
        assert_eq!(member.receive_original(7, 0, &packets[0], |_: &[u8]| true).unwrap(), Progress::Needs(3));
        assert_eq!(member.receive_original(7, 2, &packets[2], |_: &[u8]| true).unwrap(), Progress::BlockDone);
        assert_eq!(member.packets().unwrap(), vec![&packets[2][..]]);
        assert_eq!(member.round_ended(0, 5), None, "nothing to NAK");
        assert!(matches!(member.receive_original(8, 0, &packets[0], |_: &[u8]| true), Err(RecoveryError::UnknownBlock(8))));
    }

    #[test]
    fn k_shards_decode_the_lost_packet() {
        let (packets, shape, parity) = block_of(4, 4);
        let mut member = MemberRecovery::new(&[Wanted { block: 0, index: 3, block_originals: 4 }], 100).unwrap();
        member.receive_original(0, 0, &packets[0], |_: &[u8]| true).unwrap();
        member.receive_original(0, 1, &packets[1], |_: &[u8]| true).unwrap();
        let ok = |p: &[u8]| packets.iter().any(|q| q == p);
        assert_eq!(member.receive_parity(0, shape, 2, &parity[2], ok).unwrap(), Progress::Needs(1));
        assert_eq!(member.needs(), vec![BlockNeed { block: 0, needed: 1 }]);
        assert_eq!(member.receive_parity(0, shape, 0, &parity[0], ok).unwrap(), Progress::BlockDone);
        assert_eq!(member.packets().unwrap(), vec![&packets[3][..]]);
    }

    #[test]
    fn a_bad_parity_shard_is_never_reported_as_the_packet() {
        let (packets, shape, mut parity) = block_of(3, 3);
        parity[1][5] ^= 0x40;
        let ok = |p: &[u8]| packets.iter().any(|q| q == p);
        let mut member = MemberRecovery::new(&[Wanted { block: 0, index: 0, block_originals: 3 }], 100).unwrap();
        member.receive_original(0, 2, &packets[2], |_: &[u8]| true).unwrap();
        member.receive_parity(0, shape, 0, &parity[0], ok).unwrap();
        let result = member.receive_parity(0, shape, 1, &parity[1], ok);
        assert!(result.is_err(), "{result:?}");
        assert!(!member.is_complete());
        assert_eq!(member.needs(), vec![BlockNeed { block: 0, needed: 2 }], "the parity was dropped");
        let wrong_shape = BlockShape { shard_len: shape.shard_len + 2, ..shape };
        assert!(matches!(member.receive_parity(0, wrong_shape, 2, &parity[2], ok), Err(RecoveryError::ShapeMismatch { .. })));
        assert!(member.receive_parity(0, shape, 9, &parity[2], ok).is_err(), "index out of range");
        assert!(member.receive_parity(0, shape, 2, &parity[2][1..], ok).is_err(), "short shard");
    }

    #[test]
    fn naks_wait_for_the_backoff_and_are_suppressed_when_covered() {
        let (packets, _, _) = block_of(4, 4);
        let wanted = [Wanted { block: 1, index: 0, block_originals: 4 }, Wanted { block: 2, index: 3, block_originals: 4 }];
        let mut member = MemberRecovery::new(&wanted, 100).unwrap();
        member.receive_original(1, 1, &packets[1], |_: &[u8]| true).unwrap();
        assert_eq!(member.round_ended(1000, 250), Some(1048), "250 mod 101");
        assert_eq!(member.poll_nak(1047), None);
        member.heard_nak(2, 9);
        let nak = member.poll_nak(1048).unwrap();
        assert_eq!(nak.blocks, vec![BlockNeed { block: 1, needed: 3 }], "block 2 is covered by another NAK");
        assert_eq!(member.poll_nak(2000), None, "sent once");
        member.round_ended(3000, 0);
        member.heard_repair(1, 3);
        member.heard_nak(2, 4);
        assert_eq!(member.poll_nak(3000), None, "everything covered: no NAK");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Whatever shards arrive, corrupted or not, in any order, a completed member holds
        /// exactly its packet.
        #[test]
        fn never_completes_with_wrong_bytes(
            k in 1usize..8,
            wanted in 0u16..8,
            arrivals in prop::collection::vec((any::<bool>(), 0u16..16, any::<bool>(), any::<u8>()), 0..30),
        ) {
            let wanted = wanted % k as u16;
            let (packets, shape, parity) = block_of(k, 8);
            let ok = |p: &[u8]| packets.iter().any(|q| q == p);
            let mut member = MemberRecovery::new(&[Wanted { block: 0, index: wanted, block_originals: k as u16 }], 10).unwrap();
            for (is_parity, index, corrupt, flip) in arrivals {
                if is_parity {
                    let mut shard = parity[usize::from(index) % 8].clone();
                    if corrupt { let at = usize::from(flip) % shard.len(); shard[at] ^= flip | 1; }
                    let _ = member.receive_parity(0, shape, index % 8, &shard, ok);
                } else if !corrupt {
                    // Originals arrive verified: never corrupted.
                    let i = index % k as u16;
                    let _ = member.receive_original(0, i, &packets[usize::from(i)], ok);
                }
                if let Some(got) = member.packets() {
                    prop_assert_eq!(got, vec![&packets[usize::from(wanted)][..]]);
                }
            }
        }
    }
}
