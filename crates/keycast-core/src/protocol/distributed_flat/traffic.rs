//! Application data in a distributed flat group: sealed under the TEK in force exactly as a
//! member seals under its group key (`protocol::traffic`: a fresh message key wrapped under a
//! key derived from the TEK), the sender named by its participant ID. A sender's seqs start at
//! its clock (ms << 16, as a member's), so they only grow across restarts; a receiver opens only
//! seqs from shortly before it became a participant, so data sealed under a TEK it still holds
//! from its controller is not taken as new (a replay of old data across the change).

use crate::graph::MemberId;
use crate::key::{Key, KeyRef};
use crate::protocol::traffic::{self, Fresh, ReplayWindow, TrafficError, WrapKey};
use crate::wire::control::Data;
use crate::wire::GroupId;

/// Data seqs are the sender's clock in ms shifted by this (room for 65,536 messages a ms).
const SEQ_TIME_SHIFT: u32 = 16;
/// How long before a receiver became a participant a sender's seqs may start (clock skew
/// between participants, and senders that converted before it).
pub const SEQ_MARGIN_MS: u64 = 60_000;

/// One participant's sealing and opening state: its next seq and the replay window.
#[derive(Debug)]
pub struct ParticipantTraffic {
    group: GroupId,
    sender: MemberId,
    next_seq: u64,
    /// The lowest seq opened: `SEQ_MARGIN_MS` before this participant's start.
    since_seq: u64,
    replays: ReplayWindow,
}

impl ParticipantTraffic {
    /// For participant `id` of `group`, starting at `now_ms`.
    pub fn new(group: GroupId, id: u64, now_ms: u64) -> ParticipantTraffic {
        let since_seq = now_ms.saturating_sub(SEQ_MARGIN_MS) << SEQ_TIME_SHIFT;
        ParticipantTraffic { group, sender: MemberId(id), next_seq: now_ms << SEQ_TIME_SHIFT, since_seq, replays: ReplayWindow::default() }
    }

    /// Seals `plaintext` under `tek` (the TEK in force) as this participant's next message.
    pub fn seal(&mut self, tek: &(KeyRef, Key), plaintext: &[u8], fresh: Fresh, now_ms: u64) -> Result<Data, TrafficError> {
        let seq = self.next_seq.max(now_ms << SEQ_TIME_SHIFT);
        let data = traffic::seal((self.group, self.sender, seq), &WrapKey::derive(self.group, tek.0, &tek.1), fresh, plaintext)?;
        self.next_seq = seq + 1;
        Ok(data)
    }

    /// Opens `data` under the TEK it names, if `held` has it; each (sender, seq) once.
    pub fn open(&mut self, data: &Data, held: impl Fn(KeyRef) -> Option<Key>) -> Result<Vec<u8>, TrafficError> {
        if data.group != self.group || data.origin != self.group {
            return Err(TrafficError::WrongGroup(data.group));
        }
        if data.seq < self.since_seq {
            return Err(TrafficError::Replayed { origin: data.origin, sender: data.sender.0, seq: data.seq });
        }
        self.replays.check(data.origin, data.sender, data.seq)?;
        let tek = held(data.key).filter(|_| data.key.id == crate::key::KeyId(0)).ok_or(TrafficError::UnknownKey(data.key))?;
        let plain = traffic::open(data, &WrapKey::derive(self.group, data.key, &tek))?;
        self.replays.record(data.origin, data.sender, data.seq);
        Ok(plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::KeyId;

    fn fresh(n: u8) -> Fresh {
        Fresh { message_key: [n; 32], nonce: [n; crate::wire::control::DATA_NONCE_LEN] }
    }

    #[test]
    fn participants_read_each_other_once_and_nothing_older_or_foreign() {
        let tek = (KeyRef::new(KeyId(0), 3, 1), Key::from_bytes([7; 32]));
        let held = |r: KeyRef| (r == tek.0).then(|| tek.1.clone());
        let (mut alice, mut bob) = (ParticipantTraffic::new(GroupId(1), 5, 100_000), ParticipantTraffic::new(GroupId(1), 9, 100_500));
        let data = alice.seal(&tek, b"hello", fresh(1), 100_000).unwrap();
        assert_eq!(bob.open(&data, held).unwrap(), b"hello");
        assert!(matches!(bob.open(&data, held), Err(TrafficError::Replayed { .. })), "a replay opened");
        let next = alice.seal(&tek, b"again", fresh(2), 100_000).unwrap();
        assert!(next.seq > data.seq);
        assert_eq!(bob.open(&next, held).unwrap(), b"again");
        // Sealed by a member long before bob became a participant, under a TEK bob still holds.
        let mut member = ParticipantTraffic::new(GroupId(1), 5, 100_500 - SEQ_MARGIN_MS - 1);
        let old = member.seal(&tek, b"old", fresh(3), 100_500 - SEQ_MARGIN_MS - 1).unwrap();
        assert!(matches!(bob.open(&old, held), Err(TrafficError::Replayed { .. })), "data older than the margin opened");
        let other = (KeyRef::new(KeyId(0), 4, 0), Key::from_bytes([8; 32]));
        let unknown = alice.seal(&other, b"x", fresh(4), 100_001).unwrap();
        assert!(matches!(bob.open(&unknown, held), Err(TrafficError::UnknownKey(_))));
        let mut forged = alice.seal(&tek, b"y", fresh(5), 100_002).unwrap();
        forged.ciphertext[0] ^= 1;
        assert_eq!(bob.open(&forged, held), Err(TrafficError::Forged));
        let foreign = ParticipantTraffic::new(GroupId(2), 5, 100_000).seal(&tek, b"z", fresh(6), 100_003).unwrap();
        assert!(matches!(bob.open(&foreign, held), Err(TrafficError::WrongGroup(_))));
    }
}
