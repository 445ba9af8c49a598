//! The controller's side of a rekey's delivery (Zhang, Lam, Lee and Yang): the parity of the
//! last rekey's FEC blocks, sent proactively in round 1; the NAKs members send when they still
//! lack packets; up to two repair rounds answering each block with the most shards any NAK of
//! the round asked for;
//! and the proactivity factor, adapted before each rekey from the NAKs of the one before.

use std::collections::{BTreeMap, BTreeSet};

use crate::delivery::fec::{encode_block, BlockCode, MAX_PARITY};
use crate::delivery::proactivity::Proactivity;
use crate::graph::MemberId;
use crate::wire::control::Nak;
use crate::wire::rekey::{FecConfig, MAX_PROACTIVITY_PCT};
use crate::wire::ParityShard;

/// A rekey of more packets than this keeps no parity for repairs (members resync instead).
const MAX_REPAIRABLE_PACKETS: usize = 4096;
/// NAKs counted per round, at most (one per member).
const MAX_NAKERS: usize = 65_536;
/// Repair rounds per rekey: members NAK at two heartbeats, and a member whose heartbeat was
/// lost NAKs a heartbeat later, so NAKs come in up to three waves (a fourth round is slack);
/// after that, members resync.
const MAX_REPAIR_ROUNDS: u8 = 4;

/// Why a NAK is not counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NakIgnored {
    /// Not the last rekey, or its repair round is over.
    Stale,
    /// This member already asked in this round.
    Repeated,
}

#[derive(Debug)]
struct Block {
    originals: u16,
    capacity: u16,
    parity: Vec<Vec<u8>>,
    sent: usize,
}

#[derive(Debug)]
struct LastRekey {
    seq: u64,
    blocks: BTreeMap<u32, Block>,
    /// The most shards any NAK asked for, per block.
    needs: BTreeMap<u32, u16>,
    nakers: BTreeSet<MemberId>,
    /// Members that NAKed this rekey in any round: each lacked something after round 1.
    ever_naked: BTreeSet<MemberId>,
    repair_at: Option<u64>,
    /// Repair rounds sent so far.
    repairs: u8,
    /// Members the rekey went to.
    receivers: u64,
}

#[derive(Debug)]
pub(crate) struct Delivery {
    block: usize,
    proactivity: Proactivity,
    last: Option<LastRekey>,
    /// Per member that NAKed the last rekey, the most shards its first NAK asked for in one
    /// block (rho's input). A member NAKing only after a repair round (its backoff was longer,
    /// or its first NAK was lost) still failed round 1: leaving it out made rho sink.
    needed: Vec<u16>,
}

/// A repair round to send: the rekey, the round number and its shards.
pub(crate) struct Repair {
    pub seq: u64,
    pub round: u8,
    pub shards: Vec<ParityShard>,
    pub naks: usize,
}

impl Delivery {
    pub(crate) fn new(fec: FecConfig) -> Delivery {
        let block = usize::from(fec.block.max(1));
        let max_pct = fec.max_proactivity_pct.clamp(100, MAX_PROACTIVITY_PCT);
        let rho = f64::from(fec.proactivity_pct.clamp(100, max_pct)) / 100.0;
        let rho_max = f64::from(max_pct) / 100.0;
        let proactivity = Proactivity::new(block, u32::from(fec.target_naks), rho, rho_max)
            .unwrap_or_else(|_| Proactivity::new(block, u32::from(fec.target_naks), 1.0, rho_max).expect("rho 1 is always valid"));
        Delivery { block, proactivity, last: None, needed: Vec::new() }
    }

    pub(crate) fn rho(&self) -> f64 {
        self.proactivity.rho()
    }

    /// Round 1 of rekey `seq` to `receivers` members: rho adapts to the first-round NAKs of
    /// the rekey before (and is at least what the loss they show needs), then each block of
    /// `packets` gets its proactive parity; the rest of each block's code is kept for repairs.
    pub(crate) fn first_round(&mut self, seq: u64, packets: &[Vec<u8>], receivers: u64) -> Vec<ParityShard> {
        if let Some(last) = &self.last {
            let needed = std::mem::take(&mut self.needed);
            // A member NAKs only if it lost its own packet: NAKs over receivers bound the loss
            // rate from below.
            let loss_floor = needed.len() as f64 / last.receivers.max(1) as f64;
            self.proactivity.update(&needed);
            self.proactivity.raise_for_loss(loss_floor.min(0.9), receivers);
        }
        let keep = packets.len() <= MAX_REPAIRABLE_PACKETS;
        // Room for every repair round to answer a member that lost a whole full block (rho
        // times what NAKs ask; a short block is protected like a full one): with less, the
        // last rounds of a rekey many members NAKed went out empty, and those members resynced.
        // A rekey kept for no repair codes its proactive parity alone.
        let repair_room = if keep { usize::from(MAX_REPAIR_ROUNDS) * self.block } else { 0 };
        let mut blocks = BTreeMap::new();
        let mut shards = Vec::new();
        for (b, chunk) in packets.chunks(self.block).enumerate() {
            let first = (b * self.block) as u32;
            let proactive = self.proactivity.round_one_packets(chunk.len()) - chunk.len();
            let capacity = (proactive + repair_room).min(MAX_PARITY.max(proactive));
            let Ok(encoded) = BlockCode::new(chunk.len(), capacity).and_then(|code| encode_block(code, chunk)) else { continue };
            let shape = |i: usize, shard: Vec<u8>| ParityShard {
                fec_block: b as u32,
                first,
                originals: chunk.len() as u16,
                capacity: capacity as u16,
                parity_index: i as u16,
                shard,
            };
            shards.extend(encoded.parity.iter().take(proactive).cloned().enumerate().map(|(i, s)| shape(i, s)));
            blocks.insert(first, Block { originals: chunk.len() as u16, capacity: capacity as u16, parity: encoded.parity, sent: proactive });
        }
        self.last = Some(LastRekey {
            seq,
            blocks: if keep { blocks } else { BTreeMap::new() },
            needs: BTreeMap::new(),
            nakers: BTreeSet::new(),
            ever_naked: BTreeSet::new(),
            repair_at: None,
            repairs: 0,
            receivers,
        });
        shards
    }

    /// A NAK from `member` (its tag already checked): counted toward the repair round, which
    /// goes out `wait_ms` after the round's first NAK.
    pub(crate) fn nak(&mut self, member: MemberId, nak: &Nak, now_ms: u64, wait_ms: u64) -> Result<(), NakIgnored> {
        let last = self.last.as_mut().filter(|l| l.seq == nak.seq && l.repairs < MAX_REPAIR_ROUNDS && !l.blocks.is_empty()).ok_or(NakIgnored::Stale)?;
        if last.nakers.len() >= MAX_NAKERS || !last.nakers.insert(member) {
            return Err(NakIgnored::Repeated);
        }
        let mut most = 0;
        if nak.needs.is_empty() {
            // A member that heard nothing of the rekey's blocks: one more shard of each.
            for &first in last.blocks.keys() {
                last.needs.entry(first).or_insert(1);
            }
            most = 1;
        }
        for &(first, needed) in &nak.needs {
            let Some(block) = last.blocks.get(&first) else { continue };
            let needed = needed.min(block.originals);
            most = most.max(needed);
            let entry = last.needs.entry(first).or_default();
            *entry = (*entry).max(needed);
        }
        if last.ever_naked.len() < MAX_NAKERS && last.ever_naked.insert(member) {
            self.needed.push(most);
        }
        last.repair_at.get_or_insert(now_ms + wait_ms);
        Ok(())
    }

    /// The repair round, once its time has come: fresh shards for every block a NAK named, as
    /// many as the neediest NAK asked for times rho (repair packets are lost like the rest).
    pub(crate) fn due_repair(&mut self, now_ms: u64) -> Option<Repair> {
        let rho = self.proactivity.rho();
        let last = self.last.as_mut().filter(|l| l.repair_at.is_some_and(|at| at <= now_ms))?;
        last.repairs += 1;
        last.repair_at = None;
        let naks = std::mem::take(&mut last.nakers).len();
        let mut shards = Vec::new();
        for (first, needed) in std::mem::take(&mut last.needs) {
            let block = last.blocks.get_mut(&first).expect("needs name known blocks");
            let count = (f64::from(needed) * rho).ceil() as usize;
            let (from, to) = (block.sent, (block.sent + count).min(usize::from(block.capacity)));
            for i in from..to {
                shards.push(ParityShard {
                    fec_block: first / self.block as u32,
                    first,
                    originals: block.originals,
                    capacity: block.capacity,
                    parity_index: i as u16,
                    shard: block.parity[i].clone(),
                });
            }
            block.sent = to;
        }
        Some(Repair { seq: last.seq, round: 1 + last.repairs, shards, naks })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::GroupId;

    fn nak(member: u64, needs: Vec<(u32, u16)>) -> Nak {
        Nak { group: GroupId(1), member: MemberId(member), counter: 1, seq: 1, needs, tag: [0; 32] }
    }

    #[test]
    fn members_first_naking_after_a_repair_round_count_toward_rho() {
        let mut delivery = Delivery::new(FecConfig { block: 4, proactivity_pct: 125, target_naks: 1, ..FecConfig::default() });
        let packets = vec![vec![7u8; 200]; 4];
        delivery.first_round(1, &packets, 1_000);
        let rho_before = delivery.rho();
        // One member lost one packet and NAKs at once: round 2 goes out.
        delivery.nak(MemberId(1), &nak(1, vec![(0, 1)]), 0, 10).unwrap();
        assert!(delivery.due_repair(10).is_some());
        // Two lost the whole block and NAK only now (longer backoffs): three members failed
        // round 1, two more than the target.
        for member in [2, 3] {
            delivery.nak(MemberId(member), &nak(member, vec![(0, 4)]), 20, 10).unwrap();
        }
        assert!(delivery.due_repair(30).is_some());
        delivery.first_round(2, &packets, 1_000);
        // Rho rises by the second-largest ask (four packets per block), as if all three NAKs
        // had come before the first repair.
        let raised = ((delivery.rho() - rho_before) * 4.0).round();
        assert!(raised >= 4.0, "rho {rho_before} -> {}: {raised} packets more per block of 4", delivery.rho());
    }
}
