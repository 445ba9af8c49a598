//! The member's protocol state machine (sans-IO): applies verified rekeys and heartbeats,
//! switches group keys at their activation epoch, notices what it missed, and seals and opens
//! application data. The driver feeds it datagrams, resync answers and the time.

use std::collections::BTreeMap;

use crate::graph::MemberId;
use crate::key::{Key, KeyRef};
use crate::member::{MemberError, MemberKeys};
use crate::wire::control::{Data, JoinAccepted, Nak, ResyncAnswer, JOINERS_KEY_ID};
use crate::wire::guard::{Reject, ReplayGuard};
use crate::wire::heartbeat::{Heartbeat, SignedHeartbeat};
use crate::wrap::key_check;
use subtle::ConstantTimeEq;
use crate::wire::rekey::RekeyPacket;
use crate::wire::{ParityPacket, VerifiedRoots};

use super::repair::RepairCollector;
use crate::wire::{
    message_type, open_resync_answer, GroupId, Liveness, LivenessKey, MessageType, RefusalReason, ResyncAnswerKey, SignedDatagramRefusal, SignedDelta,
    SignedSignerChange, VerifyingKey,
    LIVENESS_LEN,
};
use crate::graph::merge::Subtree;
use crate::wire::{Move, SchemeSwitch as SignedSchemeSwitchBody, SignedMergeNotice, SignedSchemeSwitch, SwitchTarget};
use crate::graph::transition::{member_tree_keys, TreeSwitch};

use super::traffic::{self, Fresh, ReplayWindow, TrafficError, TrafficKeys, WrapKey};

/// A flat member's ID, its ID bits, and the newest group key it holds (the TEK, first) and the
/// newest KEK of each of its ID bits. Secret: its Debug shows the ID and the refs only.
pub struct FlatShares {
    pub id: u64,
    pub id_bits: u8,
    pub keys: Vec<(KeyRef, Key)>,
}

impl core::fmt::Debug for FlatShares {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let refs: Vec<KeyRef> = self.keys.iter().map(|(r, _)| *r).collect();
        f.debug_struct("FlatShares").field("id", &self.id).field("id_bits", &self.id_bits).field("keys", &refs).finish()
    }
}

/// What the application hears from its member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberEvent {
    /// Admitted, holding the keys of rekey `rekey_seq`.
    Joined { member: MemberId, rekey_seq: u64 },
    /// A rekey was applied; `group_key` takes effect in epoch `activation`.
    Rekeyed { seq: u64, group_key: KeyRef, activation: u64 },
    /// A new group key is in force.
    KeyActivated { group_key: KeyRef, epoch: u64 },
    /// A rekey is missing; the driver should resync over TLS.
    OutOfSync { reason: String },
    /// The controller announced something that contradicts what this member holds (another
    /// key under a ref it holds, a rekey seq behind its own): an alarm, and the member resyncs.
    Contradiction { reason: String },
    /// Caught up from the controller's answer.
    Resynced { rekey_seq: u64 },
    /// The controller refused a resync: this member is no longer in the group.
    Evicted,
    /// No heartbeat for three intervals.
    ControllerLost,
    /// Who joined and left with rekey `seq` (groups with membership deltas on).
    MembershipChanged { seq: u64, joined: Vec<MemberId>, left: Vec<MemberId> },
    /// The controller rotated its signing key (announced under the old one).
    SignerChanged { change: u64 },
    /// Lost packets of rekey `seq` were rebuilt from its FEC parity: the proactive parity of
    /// round 1, or (`after_nak`) a repair round this member asked for.
    Repaired { seq: u64, packets: usize, after_nak: bool },
    /// A merge notice moved this member under another controller (a merge or a split, see
    /// docs/merge.md), with its keys and no rejoin: the driver follows that controller's
    /// addresses and speaks TLS to it under `server_name`. `member` is this member's id there.
    Moved { group: GroupId, member: MemberId, controller: std::net::SocketAddr, server_name: crate::wire::TlsServerName, multicast: std::net::SocketAddr },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemberInputError {
    #[error(transparent)]
    Rejected(#[from] Reject),
    #[error("not a multicast message: {0:?}")]
    Unexpected(MessageType),
}

/// Rekeys a member keeps trying after its own packet fails (a chain split over packets).
const LATE_PACKETS: usize = 64;

#[derive(Debug)]
pub struct MemberSession {
    group: GroupId,
    member: MemberId,
    signer: VerifyingKey,
    /// Signing-key rotations followed (announcements at or below are replays).
    signer_changes: u64,
    keys: MemberKeys,
    guard: ReplayGuard,
    /// Group keys by rekey seq: ref, key, activation epoch.
    group_keys: BTreeMap<u64, (KeyRef, Key, u64)>,
    epoch: u64,
    active: Option<KeyRef>,
    /// Packets of the next rekey that did not yet give this member its keys.
    waiting: Vec<RekeyPacket>,
    /// Why the next rekey's packets so far did not apply (rekey, packets kept, error): named
    /// in the reason of a resync for it.
    apply_failed: Option<(u64, usize, MemberError)>,
    heartbeat_ms: u64,
    last_heartbeat_ms: u64,
    /// Members the controller counted in its latest verified heartbeat.
    group_size: u64,
    out_of_sync: bool,
    controller_lost: bool,
    /// The next rekey, once this member heard it was sent and while it does not hold it.
    behind: Option<Behind>,
    /// Membership delta parts already reported, as (rekey seq, part), for recent rekeys.
    deltas_seen: std::collections::BTreeSet<(u64, u16)>,
    /// The key in force by the controller's latest heartbeat: sealing under any other would
    /// use a key the controller has replaced (perhaps to shut out an evicted member).
    announced_active: Option<KeyRef>,
    /// Sequence number of the next data message this member seals.
    next_data_seq: u64,
    replays: ReplayWindow,
    /// Counter of the last liveness datagram (grows with the clock, never repeats).
    liveness_counter: u64,
    /// The counter of the resync request sent over UDP and not answered yet.
    resync_probe: Option<u64>,
    /// Packets and parity of the next rekey, to rebuild lost packets.
    repair: Option<RepairCollector>,
    /// Signing-block roots whose signature verified (the next packets of a block cost a hash).
    roots: VerifiedRoots,
    /// The last rekey this member sent a NAK for.
    nak_sent: Option<u64>,
    /// Rekeys this member did not hold when it first heard of them from a heartbeat (or a
    /// later rekey): the ones round 1 of their delivery did not bring.
    late_rekeys: u64,
    /// The newest rekey counted in `late_rekeys`.
    late_through: u64,
    resync_causes: ResyncCauses,
    /// Group keys a heartbeat announced in force while this member did not hold them, and
    /// the last one counted.
    keys_late: u64,
    last_key_late: Option<KeyRef>,
    /// The last key a heartbeat announced as pending.
    announced_pending: Option<KeyRef>,
    /// Heartbeats whose signature failed since the last one that verified.
    unverifiable_heartbeats: u32,
    /// The joiners' key of this member's batch (reflector on), until its group key is in force.
    joiners_key: Option<(KeyRef, Key)>,
    /// The rekey seq a merge or split notice left this member at: until a rekey of its new
    /// group comes, no notice is taken (the old group's notice would name the same seq).
    moved_at_seq: Option<u64>,
    /// A switch to a flat table (its rekey seq) and when this member asks for its keys of the
    /// table: resyncs spread over a window, not all at once (see [`flat_resync_delay_ms`]).
    flat_resync: Option<(u64, u64)>,
}

/// Why a member went out of sync (each resync counted once, by its first cause).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResyncCauses {
    /// A rekey still missing after the NAKs' repair rounds.
    pub repairs_exhausted: u64,
    /// Whole rekeys missed (a heartbeat or rekey more than one ahead).
    pub gap: u64,
    /// No heartbeat it could verify for three intervals while heartbeats failed verification,
    /// or none at all for fifty.
    pub silence: u64,
    /// The controller announced something that contradicts this member's keys.
    pub contradiction: u64,
}

enum ResyncCause {
    RepairsExhausted,
    Gap,
}

/// A rekey this member heard was sent (a packet of another member's, its parity, a heartbeat
/// naming it) and does not hold: once round 1 has been quiet for half a heartbeat interval it
/// NAKs; once the repair round that answers (sent a quarter interval after the first NAK of
/// the group) has been quiet as long it NAKs again, and after the second repair it resyncs:
/// about two intervals after the last packet, well before its key activates (an epoch is at
/// least four heartbeat intervals). Counted from the member's own clock, so lost heartbeats
/// do not delay it.
#[derive(Debug, Clone, Copy)]
struct Behind {
    seq: u64,
    /// The last verified packet or parity shard of the rekey heard: a round takes as long as
    /// its sender needs to send it (at thousands of receivers on one host, multicast's copies
    /// take hundreds of ms), and a NAK before its end asks for what is on its way.
    quiet_from_ms: u64,
    naks: u32,
    /// When the last NAK went (0: none): a repair lost whole must not hold the next NAK off.
    last_nak_ms: u64,
    /// When its key activates, as a heartbeat said: the member resyncs a heartbeat interval
    /// before, however late it heard of the rekey.
    activation_ms: Option<u64>,
}

/// Heartbeat intervals without any heartbeat before a member resyncs (its multicast path may
/// be down); bursts of loss on a wireless link last a few.
const SILENT_HEARTBEATS_BEFORE_RESYNC: u64 = 50;

/// NAKs per rekey before the member resyncs.
const NAKS_BEFORE_RESYNC: u32 = 2;

/// The delay of a member's NAK within `window_ms`: spread over the members (and rounds) by a
/// fixed mix of the values, so the session needs no randomness and every member's NAKs still
/// land at different times (SplitMix64's finalizer; not a secret, only a spread).
fn nak_spread(member: MemberId, seq: u64, round: u32, window_ms: u64) -> u64 {
    spread(member.0 ^ seq.rotate_left(32) ^ u64::from(round).rotate_left(48), window_ms)
}

/// `x` mixed (SplitMix64's finalizer) into `0..=window_ms`.
fn spread(mut x: u64, window_ms: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    x % (window_ms + 1)
}

/// Resyncs the controller is given at once, and then per heartbeat interval, after a switch to
/// a flat table: the window the members' resyncs spread over grows with the group by this, ...
pub const FLAT_RESYNCS_PER_INTERVAL: u64 = 256;
/// ... up to this many heartbeat intervals (a member reads nothing under the new table's key
/// until its resync, so the window stays short).
pub const FLAT_RESYNC_WINDOW_INTERVALS: u64 = 4;

/// How long after a switch to a flat table (rekey `seq`) `member` waits before it asks for its
/// keys of the table: a fixed mix of the member and the switch within a window of
/// `(group_size - FLAT_RESYNCS_PER_INTERVAL) / FLAT_RESYNCS_PER_INTERVAL` heartbeat intervals,
/// at most [`FLAT_RESYNC_WINDOW_INTERVALS`]. No randomness: the driver's resyncs are spread all
/// the same (a group of up to 256 members, or a member that heard no heartbeat yet, resyncs at
/// once).
pub fn flat_resync_delay_ms(member: MemberId, seq: u64, group_size: u64, heartbeat_ms: u64) -> u64 {
    let beyond = group_size.saturating_sub(FLAT_RESYNCS_PER_INTERVAL);
    let window_ms = beyond.saturating_mul(heartbeat_ms) / FLAT_RESYNCS_PER_INTERVAL;
    let window_ms = window_ms.min(FLAT_RESYNC_WINDOW_INTERVALS.saturating_mul(heartbeat_ms));
    spread(member.0.rotate_left(17) ^ seq ^ 0x7e5e_ed00_f1a7_0000, window_ms)
}

/// A member's first data seq is its join time in milliseconds shifted left by this, so a
/// member that restarts (and is handed its keys again) never repeats a seq it used before.
const DATA_SEQ_TIME_SHIFT: u32 = 16;

impl MemberSession {
    /// A member admitted with `accepted`, holding the keys in `keys`.
    pub fn join(accepted: &JoinAccepted, keys: ResyncAnswer, heartbeat_ms: u64, now_ms: u64) -> (Self, Vec<MemberEvent>) {
        let guard = ReplayGuard::new(keys.group, keys.epoch, keys.rekey_seq);
        let mut session = MemberSession {
            group: accepted.group,
            member: accepted.member,
            signer: accepted.signer,
            signer_changes: 0,
            keys: MemberKeys::from_snapshot(keys.position, Vec::new(), keys.active),
            guard,
            group_keys: BTreeMap::new(),
            epoch: 0,
            active: None,
            waiting: Vec::new(),
            apply_failed: None,
            heartbeat_ms,
            last_heartbeat_ms: now_ms,
            group_size: 0,
            out_of_sync: false,
            controller_lost: false,
            behind: None,
            deltas_seen: Default::default(),
            announced_active: None,
            next_data_seq: now_ms << DATA_SEQ_TIME_SHIFT,
            replays: ReplayWindow::default(),
            liveness_counter: 0,
            resync_probe: None,
            repair: None,
            roots: VerifiedRoots::default(),
            nak_sent: None,
            late_rekeys: 0,
            late_through: keys.rekey_seq,
            resync_causes: ResyncCauses::default(),
            keys_late: 0,
            last_key_late: None,
            announced_pending: None,
            unverifiable_heartbeats: 0,
            joiners_key: accepted.joiners_key.as_deref().cloned(),
            moved_at_seq: None,
            flat_resync: None,
        };
        let mut events = vec![MemberEvent::Joined { member: accepted.member, rekey_seq: keys.rekey_seq }];
        events.extend(session.install(keys));
        (session, events)
    }

    pub fn member(&self) -> MemberId {
        self.member
    }

    /// A liveness datagram for the controller (a refresh over UDP, tagged with a key derived
    /// from this member's individual key), or with `resync` a resync request over UDP (the
    /// answer must name its counter); `None` if this member holds no individual key.
    pub fn liveness(&mut self, now_ms: u64, resync: bool) -> Option<[u8; LIVENESS_LEN]> {
        let (key, counter) = self.next_datagram(now_ms)?;
        if resync {
            self.resync_probe = Some(counter);
        }
        Some(Liveness { group: self.group, member: self.member, resync, counter, rekey_seq: self.rekey_seq() }.seal(&key))
    }

    /// The liveness key and the next counter for a datagram to the controller (the counter
    /// grows with the clock and never repeats); `None` without an individual key.
    fn next_datagram(&mut self, now_ms: u64) -> Option<(LivenessKey, u64)> {
        let individual = self.keys.individual_key()?;
        self.liveness_counter = (self.liveness_counter + 1).max(now_ms);
        Some((LivenessKey::derive(&individual, self.group, self.member), self.liveness_counter))
    }

    /// A NAK for the controller, when one is due: per FEC block of the rekey this member lacks
    /// (as far as it heard of them), the shards it still needs, tagged with its liveness key.
    /// A member that heard nothing of the rekey's blocks sends no block: it needs one more
    /// shard of every block.
    /// Not before the time `next_nak_ms` names: NAKs are spread over a short window, so they
    /// do not reach the controller at once and a repair that comes first silences the rest.
    pub fn take_nak(&mut self, now_ms: u64) -> Option<Vec<u8>> {
        let due = self.next_nak_ms()?;
        if due > now_ms {
            return None;
        }
        let behind = self.behind.as_mut()?;
        let seq = behind.seq;
        behind.naks += 1;
        behind.last_nak_ms = now_ms;
        if behind.naks == 1 {
            self.count_late(seq);
        }
        self.nak_sent = Some(seq);
        let needs = self.repair.as_ref().filter(|r| r.seq() == seq).map(RepairCollector::needs).unwrap_or_default();
        let (key, counter) = self.next_datagram(now_ms)?;
        Some(Nak { group: self.group, member: self.member, counter, seq, needs, tag: [0; 32] }.seal(&key))
    }

    /// A resync answer that came over UDP, sealed to this member: installed if it answers the
    /// latest resync request (an older one replayed is refused).
    pub fn sealed_resync(&mut self, bytes: &[u8], now_ms: u64) -> Result<Vec<MemberEvent>, MemberInputError> {
        let individual = self.keys.individual_key().ok_or(Reject::BadSignature)?;
        let key = ResyncAnswerKey::derive(&individual, self.group, self.member);
        let (answer, counter) = open_resync_answer(bytes, &key)?;
        if answer.group != self.group || answer.member != self.member {
            return Err(Reject::WrongGroup { expected: self.group, got: answer.group }.into());
        }
        self.answers_probe("resync answer", counter)?;
        Ok(self.resynced(answer, now_ms))
    }

    /// The controller's signed refusal of this member's latest resync request over UDP: the
    /// controller no longer counts it. Taken only under the signer in force, for this group and
    /// member, and for the request last sent (an old refusal replayed is refused).
    pub fn datagram_refusal(&mut self, bytes: &[u8]) -> Result<RefusalReason, MemberInputError> {
        let refusal = SignedDatagramRefusal::verify(bytes, &self.signer)?;
        if refusal.group != self.group || refusal.member != self.member {
            return Err(Reject::WrongGroup { expected: self.group, got: refusal.group }.into());
        }
        self.answers_probe("datagram refusal", refusal.counter)?;
        Ok(refusal.reason)
    }

    /// Takes an answer naming `counter` only if it answers the latest resync request sent over
    /// UDP (an older answer replayed is refused); that request is then answered.
    fn answers_probe(&mut self, kind: &'static str, counter: u64) -> Result<(), Reject> {
        let expected = self.resync_probe.ok_or(Reject::Replay { kind, seq: counter, last: 0 })?;
        if counter != expected {
            return Err(Reject::Replay { kind, seq: counter, last: expected });
        }
        self.resync_probe = None;
        Ok(())
    }

    /// When the next NAK is due, if one is.
    pub fn next_nak_ms(&self) -> Option<u64> {
        let b = self.behind.filter(|b| b.seq > self.guard.rekey_seq() && b.naks < NAKS_BEFORE_RESYNC)?;
        let spread = nak_spread(self.member, b.seq, b.naks, self.heartbeat_ms / 4);
        Some(b.quiet_from_ms.max(b.last_nak_ms) + self.round_one_ms() + spread)
    }

    /// Time given round 1 of a rekey (its packets and proactive parity) to arrive.
    fn round_one_ms(&self) -> u64 {
        self.heartbeat_ms / 2
    }

    /// Notes that rekey `seq` was sent (a heartbeat named it): the next one starts the NAK and
    /// resync schedule.
    fn heard_of(&mut self, seq: u64, now_ms: u64) {
        // A switch to a flat table has no packets to NAK: its resync has its own time.
        if self.flat_resync.is_some_and(|(switch, _)| switch == seq) {
            return;
        }
        if seq == self.guard.rekey_seq() + 1 && self.behind.is_none_or(|b| b.seq != seq) {
            self.behind = Some(Behind { seq, quiet_from_ms: now_ms, naks: 0, last_nak_ms: 0, activation_ms: None });
        }
    }

    /// A verified packet or parity shard of rekey `seq` arrived: its round is still going.
    fn heard_packet_of(&mut self, seq: u64, now_ms: u64) {
        self.heard_of(seq, now_ms);
        if let Some(b) = self.behind.as_mut().filter(|b| b.seq == seq) {
            b.quiet_from_ms = b.quiet_from_ms.max(now_ms);
        }
    }

    /// Resyncs once the NAKs' repair rounds have had their time and the rekey is still missing.
    fn check_behind(&mut self, now_ms: u64) -> Vec<MemberEvent> {
        let Some(b) = self.behind.filter(|b| b.seq > self.guard.rekey_seq()) else { return Vec::new() };
        // Each NAK not sent yet (none if this member sends none) has its round's time; the
        // last repair a quarter interval more to come.
        let rounds_left = u64::from(1 + NAKS_BEFORE_RESYNC.saturating_sub(b.naks));
        let repairs_over = b.quiet_from_ms.max(b.last_nak_ms) + rounds_left * self.round_one_ms() + self.heartbeat_ms / 4;
        let activation_near = b.activation_ms.is_some_and(|at| now_ms + self.heartbeat_ms >= at);
        if now_ms < repairs_over && !activation_near {
            return Vec::new();
        }
        self.count_late(b.seq);
        let mut reason = format!("rekey {} still missing after {} NAKs and their repair rounds", b.seq, b.naks);
        if let Some((_, kept, e)) = self.apply_failed.as_ref().filter(|(seq, _, _)| *seq == b.seq) {
            reason += &format!(" ({kept} packets held for it did not apply: {e})");
        }
        self.lost(ResyncCause::RepairsExhausted, reason)
    }

    /// Rekeys this member lacked when a heartbeat (or a later rekey) first named them: the
    /// ones the first multicast round, parity included, did not bring it.
    pub fn late_rekeys(&self) -> u64 {
        self.late_rekeys
    }

    /// Group keys put in force before this member held them although heartbeats had announced
    /// them as pending (delivery missed its deadline: the member could not open traffic under
    /// them for a while).
    pub fn keys_late(&self) -> u64 {
        self.keys_late
    }

    /// Counts `active` as late if this member does not hold it although a heartbeat had
    /// announced it as pending: its delayed activation gave the delivery time. (An eviction's
    /// key is in force at once by design; a member that lost that rekey refuses to seal until
    /// it catches up, and is not counted.)
    fn note_key_in_force(&mut self, active: KeyRef, pending: Option<KeyRef>) {
        let held = self.group_keys.values().any(|(r, _, _)| *r == active);
        if !held && self.announced_pending == Some(active) && self.last_key_late != Some(active) {
            self.keys_late += 1;
            self.last_key_late = Some(active);
        }
        self.announced_pending = pending.or(self.announced_pending.filter(|p| *p != active));
    }

    pub fn resync_causes(&self) -> ResyncCauses {
        self.resync_causes
    }

    /// Counts rekeys up to `seq` as late, each once.
    fn count_late(&mut self, seq: u64) {
        let from = self.late_through.max(self.guard.rekey_seq());
        self.late_rekeys += seq.saturating_sub(from);
        self.late_through = self.late_through.max(seq);
    }

    pub fn group(&self) -> GroupId {
        self.group
    }

    pub fn rekey_seq(&self) -> u64 {
        self.guard.rekey_seq()
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// When the controller was last heard: a verified heartbeat, a resync answer, or the join.
    pub fn last_heard_ms(&self) -> u64 {
        self.last_heartbeat_ms
    }

    /// The group's size by the controller's latest verified heartbeat (0 before the first).
    pub fn group_size(&self) -> u64 {
        self.group_size
    }

    pub fn needs_resync(&self) -> bool {
        self.out_of_sync
    }

    /// The group key in force, for sealing.
    pub fn active_key(&self) -> Option<(KeyRef, Key)> {
        let active = self.active?;
        self.group_keys.values().find(|(r, _, _)| *r == active).map(|(r, k, _)| (*r, k.clone()))
    }

    /// A flat member's ID and its shares of the flat table: what it takes into a distributed
    /// flat group when the controller is lost (Caronni et al., figure 6). None for a tree
    /// member, or while it misses the TEK or a KEK.
    pub fn flat_shares(&self) -> Option<FlatShares> {
        let crate::graph::Position::Flat { id, id_bits } = self.keys.position() else { return None };
        let mut shares = vec![self.keys.group_key()?];
        let newest = |key_id| self.keys.keyring().refs().filter(|r| r.id == key_id).max_by_key(|r| (r.version, r.revision));
        for j in 0..id_bits {
            let key_ref = newest(crate::graph::flat::flat_kek_id(j, ((id >> j) & 1) as u8))?;
            shares.push((key_ref, self.keys.key(key_ref)?));
        }
        Some(FlatShares { id, id_bits, keys: shares })
    }

    /// Installs the controller's full answer after a gap; the answer counts as hearing from
    /// the controller at `now_ms`.
    pub fn resynced(&mut self, answer: ResyncAnswer, now_ms: u64) -> Vec<MemberEvent> {
        self.last_heartbeat_ms = now_ms;
        self.controller_lost = false;
        let mut events = vec![MemberEvent::Resynced { rekey_seq: answer.rekey_seq }];
        events.extend(self.install(answer));
        events
    }

    /// Takes the keys, sequence and epoch of `answer` as this member's whole state.
    fn install(&mut self, answer: ResyncAnswer) -> Vec<MemberEvent> {
        // The answer's keys are the graph's now: its group key is the newest (pending) one.
        let newest = answer.pending.map_or(answer.active, |p| p.key);
        self.keys = MemberKeys::from_snapshot(answer.position, answer.keys, newest);
        self.announced_active = Some(answer.active);
        // The answer comes over TLS from the controller itself: its signer is the one in force
        // (also after the controller's log was restored to before a rotation).
        self.signer = answer.signer;
        self.signer_changes = 0;
        self.guard = ReplayGuard::new(answer.group, answer.epoch, answer.rekey_seq);
        self.group_keys.clear();
        for (seq, (r, activation)) in [(0, (answer.active, 0))]
            .into_iter()
            .chain(answer.pending.map(|p| (answer.rekey_seq, (p.key, p.activation))))
        {
            if let Some(key) = self.keys.key(r) {
                self.group_keys.insert(seq, (r, key, activation));
            }
        }
        // A joiner is not given the key in force (it must not read what was sent before it
        // joined): that key is not late for it.
        if self.keys.key(answer.active).is_none() {
            self.last_key_late = Some(answer.active);
        }
        self.waiting.clear();
        self.out_of_sync = false;
        self.behind = None;
        self.flat_resync = None;
        self.epoch = 0;
        self.advance_epoch(answer.epoch)
    }

    /// A datagram from the multicast channel.
    pub fn receive(&mut self, bytes: &[u8], now_ms: u64) -> Result<Vec<MemberEvent>, MemberInputError> {
        match message_type(bytes).map_err(Reject::from)? {
            MessageType::Heartbeat => {
                let beat = SignedHeartbeat::verify(bytes, &self.signer).inspect_err(|e| {
                    let ours = || SignedHeartbeat::decode(bytes).is_ok_and(|b| b.heartbeat.group == self.group);
                    if *e == Reject::BadSignature && ours() {
                        self.unverifiable_heartbeats += 1;
                    }
                })?;
                self.guard.accept_heartbeat(&beat)?;
                self.unverifiable_heartbeats = 0;
                self.last_heartbeat_ms = now_ms;
                self.group_size = beat.group_size;
                self.controller_lost = false;
                self.announced_active = Some(beat.active);
                let mut events = self.advance_epoch(beat.epoch);
                if let Some(reason) = self.contradiction(&beat) {
                    // Reported once; the driver resyncs and the answer replaces this state.
                    if !self.out_of_sync {
                        self.resync_causes.contradiction += 1;
                        events.push(MemberEvent::Contradiction { reason });
                    }
                    self.out_of_sync = true;
                    return Ok(events);
                }
                self.note_key_in_force(beat.active, beat.pending.map(|p| p.key));
                if beat.rekey_seq > self.guard.rekey_seq() + 1 {
                    self.count_late(beat.rekey_seq);
                    let reason = format!("heartbeat names rekey {} but this member has {}", beat.rekey_seq, self.guard.rekey_seq());
                    events.extend(self.lost(ResyncCause::Gap, reason));
                } else {
                    self.heard_of(beat.rekey_seq, now_ms);
                    if let Some(b) = self.behind.as_mut().filter(|b| b.seq == beat.rekey_seq && beat.activates_in_ms > 0) {
                        b.activation_ms = Some(now_ms + u64::from(beat.activates_in_ms));
                    }
                    events.extend(self.check_behind(now_ms));
                }
                Ok(events)
            }
            MessageType::Rekey => {
                // Most packets of a rekey are other members': those of a rekey already applied
                // that hold nothing for this member are passed over before any verification.
                let claimed = RekeyPacket::decode(bytes).map_err(Reject::from)?;
                if claimed.header.group == self.group && claimed.header.seq <= self.guard.rekey_seq() && !self.has_entry(&claimed) {
                    return Ok(Vec::new());
                }
                let packet = claimed.verified(bytes, &self.signer, &mut self.roots)?;
                if packet.header.group == self.group {
                    self.heard_packet_of(packet.header.seq, now_ms);
                }
                let rebuilt = match self.repair_for(packet.header.group, packet.header.seq) {
                    Some(repair) => repair.packet(packet.header.index, bytes),
                    None => Vec::new(),
                };
                let mut events = self.rekey_packet(packet)?;
                events.extend(self.rebuilt(rebuilt));
                Ok(events)
            }
            MessageType::RekeyParity => {
                // Parity of a rekey already applied is expected (it follows the packets).
                let claimed = ParityPacket::decode(bytes).map_err(Reject::from)?;
                if claimed.header.group == self.group && claimed.header.seq <= self.guard.rekey_seq() {
                    return Ok(Vec::new());
                }
                let parity = claimed.verified(bytes, &self.signer, &mut self.roots)?;
                let header = parity.header;
                if header.group != self.group {
                    return Err(Reject::WrongGroup { expected: self.group, got: header.group }.into());
                }
                self.heard_packet_of(header.seq, now_ms);
                let Some(repair) = self.repair_for(header.group, header.seq) else { return Ok(Vec::new()) };
                let rebuilt = repair.parity(&header, parity.shard);
                Ok(self.rebuilt(rebuilt))
            }
            MessageType::MembershipDelta => {
                let delta = SignedDelta::verify(bytes, &self.signer)?;
                if delta.group != self.group {
                    return Err(Reject::WrongGroup { expected: self.group, got: delta.group }.into());
                }
                let key = (delta.seq, delta.part);
                if self.deltas_seen.contains(&key) || delta.seq + 16 < self.guard.rekey_seq() {
                    return Err(Reject::Replay { kind: "membership delta", seq: delta.seq, last: self.guard.rekey_seq() }.into());
                }
                self.deltas_seen.insert(key);
                let floor = self.guard.rekey_seq().saturating_sub(16);
                self.deltas_seen.retain(|(seq, _)| *seq >= floor);
                Ok(vec![MemberEvent::MembershipChanged { seq: delta.seq, joined: delta.joined, left: delta.left }])
            }
            MessageType::SignerChange => {
                let change = SignedSignerChange::verify(bytes, &self.signer)?;
                if change.group != self.group {
                    return Err(Reject::WrongGroup { expected: self.group, got: change.group }.into());
                }
                if change.change <= self.signer_changes {
                    return Err(Reject::Replay { kind: "signer change", seq: change.change, last: self.signer_changes }.into());
                }
                self.signer = change.next;
                self.signer_changes = change.change;
                Ok(vec![MemberEvent::SignerChanged { change: change.change }])
            }
            MessageType::MergeNotice => self.follow_notice(bytes),
            MessageType::SchemeSwitch => self.follow_switch(bytes, now_ms),
            other => Err(MemberInputError::Unexpected(other)),
        }
    }

    /// A merge notice from the controller this member follows, taken once it holds every
    /// rekey before it: the keys take their names in the next group, the member its id there,
    /// and the group, signer and replay guard become the next group's. The key in force stays
    /// usable until the merge's or split's rekey (the next one of the new group) replaces it.
    fn follow_notice(&mut self, bytes: &[u8]) -> Result<Vec<MemberEvent>, MemberInputError> {
        let notice = SignedMergeNotice::verify(bytes, &self.signer)?;
        if notice.group != self.group {
            return Err(Reject::WrongGroup { expected: self.group, got: notice.group }.into());
        }
        // A split's notice goes on the merged channel, which the left side hears too: it stays.
        if notice.change == Move::Split && self.keys.subtree() != Some(Subtree::Right) {
            return Ok(Vec::new());
        }
        let held = self.guard.rekey_seq();
        // A split leaves the right side at the seq its merge notice followed: a replay of that
        // notice (or its repeats with the old heartbeats) must not merge it again.
        if self.moved_at_seq == Some(held) {
            return Err(Reject::Replay { kind: "merge notice", seq: notice.after_seq, last: held }.into());
        }
        if notice.after_seq < held {
            return Err(Reject::Replay { kind: "merge notice", seq: notice.after_seq, last: held }.into());
        }
        if notice.after_seq > held {
            let reason = format!("merge notice follows rekey {} but this member has {held}", notice.after_seq);
            return Ok(self.lost(ResyncCause::Gap, reason));
        }
        let member = match notice.change {
            Move::Merge(_) => self.member.0.checked_add(notice.member_offset),
            Move::Split => self.member.0.checked_sub(notice.member_offset),
        };
        let member = member.ok_or(Reject::Decode(crate::wire::DecodeError::BadValue { field: "member offset", value: notice.member_offset }))?;
        match notice.change {
            Move::Merge(subtree) => self.keys.merge_into(subtree),
            Move::Split => self.keys.split_out(),
        }
        self.member = MemberId(member);
        self.group = notice.next_group;
        self.signer = notice.next_signer;
        self.signer_changes = 0;
        self.guard = ReplayGuard::new(notice.next_group, notice.next_epoch, notice.next_seq);
        self.epoch = notice.next_epoch;
        // Keys by the old group's rekey seqs: only the one in force carries over.
        let active = self.active.and_then(|r| self.group_keys.values().find(|(k, _, _)| *k == r).cloned());
        self.group_keys.clear();
        if let Some((r, key, _)) = active {
            self.group_keys.insert(0, (r, key, 0));
        }
        self.roots = VerifiedRoots::default();
        self.waiting.clear();
        self.apply_failed = None;
        self.behind = None;
        self.repair = None;
        self.nak_sent = None;
        self.deltas_seen.clear();
        self.announced_active = None;
        self.announced_pending = None;
        self.late_through = notice.next_seq;
        self.moved_at_seq = Some(notice.next_seq);
        Ok(vec![MemberEvent::Moved {
            group: self.group,
            member: self.member,
            controller: notice.controller,
            server_name: notice.server_name,
            multicast: notice.multicast,
        }])
    }

    /// A scheme switch from this member's controller, taken once it holds every rekey before
    /// it. To a tree: the member derives its path from its flat keys, no key travels. To a flat
    /// table: its new keys reach it only in a resync answer (sealed to it), so it asks for one,
    /// after its share of the spread ([`flat_resync_delay_ms`]; `tick` raises it).
    fn follow_switch(&mut self, bytes: &[u8], now_ms: u64) -> Result<Vec<MemberEvent>, MemberInputError> {
        let switch: SignedSchemeSwitchBody = SignedSchemeSwitch::verify(bytes, &self.signer)?;
        if switch.group != self.group {
            return Err(Reject::WrongGroup { expected: self.group, got: switch.group }.into());
        }
        let held = self.guard.rekey_seq();
        if switch.seq <= held {
            return Err(Reject::Replay { kind: "scheme switch", seq: switch.seq, last: held }.into());
        }
        if switch.seq > held + 1 {
            return Ok(self.lost(ResyncCause::Gap, format!("scheme switch {} but this member has rekey {held}", switch.seq)));
        }
        let SwitchTarget::Tree { id_bits, version } = switch.target else {
            if self.flat_resync.is_some_and(|(seq, _)| seq == switch.seq) {
                // A repeat of the notice: the resync keeps its time.
                return Ok(Vec::new());
            }
            let delay = flat_resync_delay_ms(self.member, switch.seq, self.group_size, self.heartbeat_ms);
            if delay > 0 {
                self.flat_resync = Some((switch.seq, now_ms + delay));
                self.behind = None;
                return Ok(Vec::new());
            }
            return Ok(self.lost(ResyncCause::Gap, format!("the group switched to a flat table at rekey {}: its keys come by resync", switch.seq)));
        };
        let keys = match member_tree_keys(TreeSwitch { id_bits, version }, &self.keys) {
            Ok(keys) => keys,
            Err(e) => return Ok(self.lost(ResyncCause::Gap, format!("the tree's keys do not derive from this member's: {e}"))),
        };
        let (root, _) = keys.group_key().ok_or(Reject::Decode(crate::wire::DecodeError::BadValue { field: "tree root", value: 0 }))?;
        // The leaf (the individual key) has the lowest id and must come first.
        let mut refs = keys.refs();
        refs.sort_unstable_by_key(|r| r.id.0);
        let answer = ResyncAnswer {
            group: self.group,
            member: self.member,
            position: keys.position(),
            epoch: switch.epoch.max(self.epoch),
            rekey_seq: switch.seq,
            active: root,
            pending: None,
            keys: refs.into_iter().filter_map(|r| Some((r, keys.key(r)?))).collect(),
            signer: self.signer,
        };
        let signer_changes = self.signer_changes;
        let mut events = vec![MemberEvent::Rekeyed { seq: switch.seq, group_key: root, activation: switch.epoch }];
        events.extend(self.install(answer));
        self.signer_changes = signer_changes;
        Ok(events)
    }

    /// The repair collector of rekey `seq` if it is the next one for this member (a newer
    /// rekey's replaces an older one's; the applied rekey's is dropped).
    fn repair_for(&mut self, group: GroupId, seq: u64) -> Option<&mut RepairCollector> {
        if group != self.group || seq <= self.guard.rekey_seq() {
            return None;
        }
        if self.repair.as_ref().is_none_or(|r| r.seq() < seq) {
            self.repair = Some(RepairCollector::new(seq));
        }
        self.repair.as_mut().filter(|r| r.seq() == seq)
    }

    /// Packets rebuilt from parity, taken like packets received (each verified again).
    fn rebuilt(&mut self, packets: Vec<Vec<u8>>) -> Vec<MemberEvent> {
        let Some(seq) = self.repair.as_ref().map(RepairCollector::seq) else { return Vec::new() };
        let mut events = Vec::new();
        let mut used = 0;
        for bytes in &packets {
            let Ok(packet) = RekeyPacket::verify_cached(bytes, &self.signer, &mut self.roots) else { continue };
            used += 1;
            events.extend(self.rekey_packet(packet).unwrap_or_default());
        }
        if used > 0 {
            events.insert(0, MemberEvent::Repaired { seq, packets: used, after_nak: self.nak_sent == Some(seq) });
        }
        if self.repair.as_ref().is_some_and(|r| r.seq() <= self.guard.rekey_seq()) {
            self.repair = None;
        }
        events
    }

    /// What in `beat` contradicts this member's state, if anything: a rekey seq behind the one
    /// it applied, or another key under a ref it holds (a controller restarted from an older
    /// copy of its log issues new keys under old refs).
    fn contradiction(&self, beat: &Heartbeat) -> Option<String> {
        if beat.rekey_seq < self.guard.rekey_seq() {
            return Some(format!("heartbeat names rekey {} but this member applied rekey {}", beat.rekey_seq, self.guard.rekey_seq()));
        }
        // At the same rekey the member holds its newest group key (pending, else active), and
        // in the same epoch it uses the same key.
        if beat.rekey_seq == self.guard.rekey_seq() {
            let newest = beat.pending.map_or(beat.active, |p| p.key);
            if !self.group_keys.values().any(|(r, _, _)| *r == newest) {
                return Some(format!("heartbeat names {newest} as the group key of rekey {}, which this member applied without it", beat.rekey_seq));
            }
            if let Some(active) = self.active.filter(|a| *a != beat.active) {
                return Some(format!("heartbeat names {} as the key in force, this member uses {active}", beat.active));
            }
        }
        let announced = [Some((beat.active, beat.active_check)), beat.pending.map(|p| (p.key, beat.pending_check))];
        announced.into_iter().flatten().find_map(|(key_ref, check)| {
            let (_, held, _) = self.group_keys.values().find(|(r, _, _)| *r == key_ref)?;
            (!bool::from(key_check(held, key_ref).ct_eq(&check)))
                .then(|| format!("this member holds another key under {key_ref} than the controller announces"))
        })
    }

    fn lost(&mut self, cause: ResyncCause, reason: String) -> Vec<MemberEvent> {
        if self.out_of_sync {
            return Vec::new();
        }
        match cause {
            ResyncCause::Gap => self.resync_causes.gap += 1,
            ResyncCause::RepairsExhausted => self.resync_causes.repairs_exhausted += 1,
        }
        self.out_of_sync = true;
        vec![MemberEvent::OutOfSync { reason }]
    }

    fn has_entry(&self, packet: &RekeyPacket) -> bool {
        self.keys.has_entry(&packet.message())
    }

    fn rekey_packet(&mut self, packet: RekeyPacket) -> Result<Vec<MemberEvent>, MemberInputError> {
        let header = packet.header;
        let applied = self.guard.rekey_seq();
        if header.seq == applied && header.group == self.group {
            // A later packet of the rekey already applied may hold the rest of a long chain.
            if self.has_entry(&packet) {
                let _ = self.keys.apply(&[packet.message()]);
            }
            return Ok(Vec::new());
        }
        self.guard.check_rekey(&header)?;
        if header.seq > applied + 1 {
            self.count_late(header.seq - 1);
            return Ok(self.lost(ResyncCause::Gap, format!("rekey {} arrived, this member has {applied}", header.seq)));
        }
        if !self.has_entry(&packet) && !packet.wraps.is_empty() {
            return Ok(Vec::new());
        }
        if self.waiting.len() < LATE_PACKETS {
            self.waiting.push(packet);
        }
        let messages: Vec<_> = self.waiting.iter().map(RekeyPacket::message).collect();
        match self.keys.apply(&messages) {
            Ok(update) => {
                self.waiting.clear();
                self.behind = None;
                self.guard.rekey_applied(&header);
                // This rekey is newer than any heartbeat heard: its key may be in force at once
                // (an eviction), so the last announcement no longer blocks sealing.
                self.announced_active = None;
                let key = self.keys.key(update.group_key).expect("apply holds the group key");
                self.group_keys.insert(header.seq, (update.group_key, key, header.activation));
                let mut events = vec![MemberEvent::Rekeyed { seq: header.seq, group_key: update.group_key, activation: header.activation }];
                // The rekey names the controller's epoch: an eviction's key, in force in that
                // very epoch, is used at once even before a heartbeat of that epoch arrives
                // (sealing under the old key would let the evicted member read it).
                events.extend(self.advance_epoch(header.epoch));
                Ok(events)
            }
            Err(e) => {
                self.apply_failed = Some((header.seq, self.waiting.len(), e));
                Ok(Vec::new())
            }
        }
    }

    fn advance_epoch(&mut self, epoch: u64) -> Vec<MemberEvent> {
        self.epoch = self.epoch.max(epoch);
        self.switch_keys()
    }

    /// Makes the newest key whose activation has come the active one.
    fn switch_keys(&mut self) -> Vec<MemberEvent> {
        let Some((&seq, &(key, _, _))) = self.group_keys.iter().rev().find(|(_, (_, _, a))| *a <= self.epoch) else {
            return Vec::new();
        };
        if self.active == Some(key) {
            return Vec::new();
        }
        // Keep the previous active key for a grace window (data sealed just before the
        // switch); drop older keys and pending keys this one supersedes.
        let previous = self.active.and_then(|r| self.group_keys.iter().find(|(_, (k, _, _))| *k == r).map(|(s, _)| *s));
        self.group_keys.retain(|s, _| *s >= seq || Some(*s) == previous);
        self.active = Some(key);
        // Reflected data is for joiners without a key in force (dropped: zeroized).
        self.joiners_key = None;
        vec![MemberEvent::KeyActivated { group_key: key, epoch: self.epoch }]
    }

    /// Advances time: reports a controller that went silent.
    pub fn tick(&mut self, now_ms: u64) -> Vec<MemberEvent> {
        let mut events = self.check_behind(now_ms);
        if let Some((seq, _)) = self.flat_resync.filter(|(_, at)| now_ms >= *at) {
            self.flat_resync = None;
            events.extend(self.lost(ResyncCause::Gap, format!("the group switched to a flat table at rekey {seq}: its keys come by resync")));
        }
        let silent = now_ms.saturating_sub(self.last_heartbeat_ms);
        if !self.controller_lost && silent > 3 * self.heartbeat_ms {
            self.controller_lost = true;
            events.push(MemberEvent::ControllerLost);
            return events;
        }
        // Heartbeats it cannot verify (a signing key it missed the rotation of): resync at once.
        // Heartbeats lost in a row on a lossy link need nothing (the next one names any rekey
        // missed meanwhile), unless the silence is long enough that the multicast path itself
        // may be down: then unicast keeps this member's keys.
        let unverifiable = self.unverifiable_heartbeats > 0;
        if self.controller_lost && !self.out_of_sync && (unverifiable || silent > SILENT_HEARTBEATS_BEFORE_RESYNC * self.heartbeat_ms) {
            self.resync_causes.silence += 1;
            self.out_of_sync = true;
        }
        events
    }

    /// The group key to seal under: the active one, unless the controller announces another
    /// key in force than the one this member holds (its rekey was lost): the old key may be
    /// known to an evicted member, so sealing fails closed.
    fn sealing_key(&self) -> Result<(KeyRef, Key), TrafficError> {
        let (key_ref, key) = self.active_key().ok_or(TrafficError::NoActiveKey)?;
        match self.announced_active.filter(|a| *a != key_ref) {
            Some(announced) => Err(TrafficError::StaleKey { held: key_ref, announced }),
            None => Ok((key_ref, key)),
        }
    }

    /// The group keys data may be under (previous, active, next) and the one to seal under:
    /// what a relay needs of the group it is a member of.
    pub fn traffic_keys(&self) -> TrafficKeys {
        TrafficKeys {
            group: self.group,
            sealing: self.sealing_key().ok().map(|(key_ref, _)| key_ref),
            keys: self.group_keys.values().map(|(r, k, _)| (*r, k.clone())).collect(),
        }
    }

    /// Seals application data under the sealing key as this member's next message; `fresh`
    /// must be fresh random bytes.
    pub fn seal(&mut self, plaintext: &[u8], fresh: Fresh) -> Result<Data, TrafficError> {
        let (key_ref, key) = self.sealing_key()?;
        let wrap_key = WrapKey::derive(self.group, key_ref, &key);
        let data = traffic::seal((self.group, self.member, self.next_data_seq), &wrap_key, fresh, plaintext)?;
        self.next_data_seq += 1;
        Ok(data)
    }

    /// Whether this member holds a joiners' key (it reads reflected data until its group key
    /// is in force).
    pub fn holds_joiners_key(&self) -> bool {
        self.joiners_key.is_some()
    }

    /// Opens data wrapped under the active key, the one before it, or the next one, or reflected
    /// under this member's joiners' key, once: a replayed (origin, sender, seq) is refused,
    /// whichever intermediaries it crossed (a reflected copy of data opened is a replay).
    pub fn open(&mut self, data: &Data) -> Result<Vec<u8>, TrafficError> {
        if data.group != self.group {
            return Err(TrafficError::WrongGroup(data.group));
        }
        let held = match data.key.id {
            JOINERS_KEY_ID => self.joiners_key.as_ref().filter(|(r, _)| *r == data.key).map(|(r, k)| (r, k)),
            _ => self.group_keys.values().find(|(r, _, _)| *r == data.key).map(|(r, k, _)| (r, k)),
        };
        let (key_ref, key) = held.ok_or(TrafficError::UnknownKey(data.key))?;
        self.replays.check(data.origin, data.sender, data.seq)?;
        let plaintext = traffic::open(data, &WrapKey::derive(self.group, *key_ref, key))?;
        self.replays.record(data.origin, data.sender, data.seq);
        Ok(plaintext)
    }
}
