//! The member's checks on multicast input: group, epoch, sequence (replay), signature; and
//! the collection of one rekey's packets.

use std::collections::BTreeMap;

use crate::strategy::RekeyMessage;

use super::heartbeat::Heartbeat;
use super::rekey::{RekeyHeader, RekeyPacket};
use super::{DecodeError, GroupId};

/// Why a member dropped a multicast message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("signature or hash path does not verify under the controller's key")]
    BadSignature,
    #[error("message for group {got:?}, this member is in {expected:?}")]
    WrongGroup { expected: GroupId, got: GroupId },
    #[error("message from epoch {got}, this member is already in epoch {current}")]
    StaleEpoch { current: u64, got: u64 },
    #[error("replayed {kind} {seq}: already at {last}")]
    Replay { kind: &'static str, seq: u64, last: u64 },
    #[error("packet {index} of rekey {seq} disagrees with the packets already received")]
    Inconsistent { seq: u64, index: u32 },
}

/// What a member has accepted so far: later messages must be newer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplayGuard {
    group: GroupId,
    epoch: u64,
    /// Last rekey applied (0: none).
    rekey_seq: u64,
    /// Last heartbeat accepted (0: none).
    heartbeat_seq: u64,
}

impl ReplayGuard {
    /// A member that joined `group` in `epoch` and holds the keys of rekey `rekey_seq`.
    pub fn new(group: GroupId, epoch: u64, rekey_seq: u64) -> Self {
        ReplayGuard { group, epoch, rekey_seq, heartbeat_seq: 0 }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn rekey_seq(&self) -> u64 {
        self.rekey_seq
    }

    fn check(&self, group: GroupId, epoch: u64) -> Result<(), Reject> {
        if group != self.group {
            return Err(Reject::WrongGroup { expected: self.group, got: group });
        }
        if epoch < self.epoch {
            return Err(Reject::StaleEpoch { current: self.epoch, got: epoch });
        }
        Ok(())
    }

    /// Accepts a packet of a rekey not applied yet, whatever epoch it names: rekeys are
    /// ordered by their seq, and the next one may come (repaired, or on a slow host) after a
    /// heartbeat of a later epoch.
    pub fn check_rekey(&self, header: &RekeyHeader) -> Result<(), Reject> {
        if header.group != self.group {
            return Err(Reject::WrongGroup { expected: self.group, got: header.group });
        }
        if header.seq <= self.rekey_seq {
            return Err(Reject::Replay { kind: "rekey", seq: header.seq, last: self.rekey_seq });
        }
        Ok(())
    }

    /// Records that the rekey of `header` was applied.
    pub fn rekey_applied(&mut self, header: &RekeyHeader) {
        self.rekey_seq = self.rekey_seq.max(header.seq);
        self.epoch = self.epoch.max(header.epoch);
    }

    /// Accepts a newer heartbeat and records it.
    pub fn accept_heartbeat(&mut self, heartbeat: &Heartbeat) -> Result<(), Reject> {
        self.check(heartbeat.group, heartbeat.epoch)?;
        if heartbeat.seq <= self.heartbeat_seq {
            return Err(Reject::Replay { kind: "heartbeat", seq: heartbeat.seq, last: self.heartbeat_seq });
        }
        self.heartbeat_seq = heartbeat.seq;
        self.epoch = heartbeat.epoch;
        Ok(())
    }
}

/// Whether a packet added anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offer {
    New,
    Duplicate,
}

/// The packets of one rekey received so far (verified by the caller), by index.
#[derive(Clone, Debug)]
pub struct RekeyAssembly {
    header: RekeyHeader,
    packets: BTreeMap<u32, RekeyPacket>,
}

impl RekeyAssembly {
    pub fn new(first: RekeyPacket) -> Self {
        let header = first.header;
        RekeyAssembly { header, packets: BTreeMap::from([(header.index, first)]) }
    }

    pub fn header(&self) -> &RekeyHeader {
        &self.header
    }

    /// Adds a packet of the same rekey; a packet that disagrees on any shared field is refused.
    pub fn offer(&mut self, packet: RekeyPacket) -> Result<Offer, Reject> {
        if !self.header.same_rekey(&packet.header) {
            return Err(Reject::Inconsistent { seq: packet.header.seq, index: packet.header.index });
        }
        match self.packets.get(&packet.header.index) {
            Some(held) if *held == packet => Ok(Offer::Duplicate),
            Some(_) => Err(Reject::Inconsistent { seq: packet.header.seq, index: packet.header.index }),
            None => {
                self.packets.insert(packet.header.index, packet);
                Ok(Offer::New)
            }
        }
    }

    pub fn is_complete(&self) -> bool {
        self.packets.len() == self.header.count as usize
    }

    /// Up to `limit` missing indices, ascending (for a NAK).
    pub fn missing(&self, limit: usize) -> Vec<u32> {
        (0..self.header.count).filter(|i| !self.packets.contains_key(i)).take(limit).collect()
    }

    pub fn messages(&self) -> Vec<RekeyMessage<'_>> {
        self.packets.values().map(RekeyPacket::message).collect()
    }
}
