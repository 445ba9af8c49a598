//! The controller's protocol state machine (sans-IO). Inputs: requests with the time they
//! arrived, clock ticks, and entropy; outputs: records to persist, datagrams to multicast and
//! answers to send. The driver writes every `Output::Persist` before it sends what follows.
//!
//! Epochs (Mukkamalla 3.2): joins, leaves, expiries and evictions queue up during an epoch and
//! become one rekey at the start of the next, whose group key takes effect `activation_delay`
//! epochs later. An epoch with no change sends no rekey. Evictions can instead rekey at once,
//! active at once (GSM 3.5). Liveness is soft state (Iolus 6.3): a member that does not
//! refresh within `refresh_timeout_ms` is removed like a leave.
//!
//! Persistence is a log of records; [`Controller::restore`] replays it. Key graphs are
//! deterministic for a batch and its seed, so replay rebuilds the same keys.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::graph::{import_graph, new_graph, Batch, GraphConfig, GraphError, KeyGraph, MemberId, RekeyPlan};
use crate::key::{Key, KeyRef};
use crate::keygen::BatchSeed;
use crate::wire::control::{JoinAccepted, JoinAnswer, RefusalReason, ResyncAnswer};
use crate::wire::heartbeat::PendingKey;
use crate::wire::rekey::{encode_rekey, PacketConfig, PacketiseError, Placement, RekeyContext};
use crate::wire::control::Nak;
use crate::wire::{encode_parity, ParityRound, ParityShard};

use super::heartbeats::{epoch_at, HeartbeatContent, Heartbeats, MAX_ANNOUNCEMENTS};
use super::pending::Pending;
use super::reflector::{JoinersKeys, ReflectionKeys};
use super::rounds::Delivery;
use super::traffic::TrafficKeys;
use crate::wire::{seal_resync_answer, DatagramRefusal, GroupId, Liveness, LivenessKey, MembershipDelta, Reject, ResyncAnswerKey, Signer, SignerChange, VerifyingKey};
use crate::wrap::key_check;
use crate::wire::DecodeError;
use zeroize::Zeroizing;

use super::merge_state::{MergeRecord, Merged};
use super::snapshot::Snapshot;
use crate::graph::merge::MergedTrees;
use crate::graph::transition::{flat_from_tree, tree_from_flat, TransitionError};
use crate::graph::{FlatIds, Scheme};
use crate::wire::{SchemeSwitch, SwitchTarget};

mod merging;

/// Policy fixed for a group's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupPolicy {
    pub group: GroupId,
    pub graph: GraphConfig,
    pub epoch_ms: u64,
    /// Epochs between a rekey and its group key taking effect (default 1).
    pub activation_delay: u64,
    pub heartbeat_ms: u64,
    /// A member silent this long is removed (soft state).
    pub refresh_timeout_ms: u64,
    /// Rekey at once when a member is evicted, and activate the new key at once.
    pub immediate_eviction: bool,
    /// After each rekey, multicast who joined and left (conferencing groups, Mukkamalla 4.3).
    pub membership_deltas: bool,
    /// Give each batch's joiners a temporary key and reflect the group's data to them until
    /// their group key is in force (Mukkamalla 4.4; docs/hierarchy.md).
    pub reflector: bool,
    pub packets: PacketConfig,
}

/// The settings fixed at a group's creation. The same seeds under other values would build
/// other keys (and number epochs otherwise), so a restart whose configuration changes any of
/// them is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FixedPolicy {
    pub group: GroupId,
    pub graph: GraphConfig,
    pub epoch_ms: u64,
}

impl GroupPolicy {
    pub fn fixed(&self) -> FixedPolicy {
        FixedPolicy { group: self.group, graph: self.graph, epoch_ms: self.epoch_ms }
    }
}

impl FixedPolicy {
    /// The first setting that differs, with the logged and the configured values.
    fn first_change(&self, configured: &FixedPolicy) -> Option<(&'static str, String, String)> {
        let pairs = [
            ("group", format!("{}", self.group.0), format!("{}", configured.group.0)),
            ("policy.scheme (with degree / flat_id_bits)", format!("{:?}", self.graph.scheme), format!("{:?}", configured.graph.scheme)),
            ("policy.join_policy", format!("{:?}", self.graph.join_policy), format!("{:?}", configured.graph.join_policy)),
            ("policy.epoch_ms", self.epoch_ms.to_string(), configured.epoch_ms.to_string()),
        ];
        pairs.into_iter().find(|(_, logged, now)| logged != now)
    }
}

/// An admitted member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberRecord {
    pub identity: String,
    pub last_seen_ms: u64,
    /// The rekey that admitted it: it may hold group keys from this one on.
    pub joined_seq: u64,
    /// The last liveness datagram's counter: a datagram must be above it (in memory only: a
    /// restart accepts any counter once more, which at worst refreshes a member once).
    pub liveness_counter: u64,
    /// When the last resync answer over UDP went to it (rate limit; in memory only).
    pub udp_resync_ms: u64,
}

/// A change waiting for the end of the epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Join { member: MemberId, identity: String },
    Leave { member: MemberId },
    Evict { member: MemberId },
}

/// What the driver must make durable, in order, before sending anything after it.
#[derive(Clone, PartialEq, Eq)]
pub enum Record {
    /// The group's creation: the entropy of its first keys and of the signing key, and the
    /// settings fixed for its life (absent in logs written before they were recorded).
    Genesis { created_ms: u64, graph_seed: [u8; 32], signing_seed: [u8; 32], fixed: Option<FixedPolicy> },
    /// A leave or eviction that was accepted and will be applied.
    Requested(Request),
    /// One applied batch: replaying it with the same seed rebuilds the same keys.
    Batch { seq: u64, epoch: u64, activation: u64, joins: Vec<(MemberId, String)>, leaves: Vec<MemberId>, seed: [u8; 32] },
    /// An evicted identity: its joins are refused until it is re-admitted.
    Revoked(String),
    Readmitted(String),
    /// Changes to the ACL made at run time, on top of the configured ACL.
    AclAdded(String),
    AclRemoved(String),
    /// Members reported rekeys up to this seq that the log does not hold (it was restored from
    /// an older copy): rekeys continue above it.
    SeqFloor(u64),
    /// The whole state: the log before it is no longer needed, and the driver drops it.
    Snapshot(Box<Snapshot>),
    /// A new signing key (rotation number `change`): everything after is signed by it.
    SigningKey { change: u64, seed: [u8; 32] },
    /// This controller absorbed another group (docs/merge.md): from here on it runs the merged group.
    Merged(Box<MergeRecord>),
    /// The merged group split: the absorbed group's side was handed back, its keys drawn from `seed`.
    Split { seq: u64, epoch: u64, seed: [u8; 32] },
    /// This group was absorbed into group `to` after its rekey `seq`: the controller serves it no
    /// more until the split hands it back (a snapshot then starts its log again). Its heartbeats
    /// repeat `notice` (signed, public) for members that missed it.
    HandedOff { to: GroupId, seq: u64, notice: Vec<u8> },
    /// The key graph moved between flat and tree as rekey `seq` (Caronni et al., figure 6); a
    /// switch to a flat table draws its keys from `seed` (unused to a tree, which derives them).
    Switched { seq: u64, epoch: u64, to: SchemeTarget, seed: [u8; 32] },
}

/// The scheme a switch moves the group's key graph to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchemeTarget {
    /// A binary tree derived from the flat table (no key travels).
    Tree,
    /// A fresh flat table of `id_bits` (each member's keys reach it by resync).
    Flat { id_bits: u8 },
}

/// Seeds are secrets: Debug names the record and its public fields only.
impl core::fmt::Debug for Record {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Record::Genesis { created_ms, fixed, .. } => write!(f, "Genesis {{ created_ms: {created_ms}, fixed: {fixed:?}, seeds: <redacted> }}"),
            Record::Requested(r) => write!(f, "Requested({r:?})"),
            Record::Batch { seq, epoch, activation, joins, leaves, .. } => write!(
                f,
                "Batch {{ seq: {seq}, epoch: {epoch}, activation: {activation}, joins: {}, leaves: {}, seed: <redacted> }}",
                joins.len(),
                leaves.len()
            ),
            Record::Revoked(i) => write!(f, "Revoked({i:?})"),
            Record::Readmitted(i) => write!(f, "Readmitted({i:?})"),
            Record::AclAdded(i) => write!(f, "AclAdded({i:?})"),
            Record::AclRemoved(i) => write!(f, "AclRemoved({i:?})"),
            Record::SeqFloor(n) => write!(f, "SeqFloor({n})"),
            Record::Snapshot(s) => write!(f, "{s:?}"),
            Record::SigningKey { change, .. } => write!(f, "SigningKey {{ change: {change}, seed: <redacted> }}"),
            Record::Merged(merge) => write!(f, "{merge:?}"),
            Record::Split { seq, epoch, .. } => write!(f, "Split {{ seq: {seq}, epoch: {epoch}, seed: <redacted> }}"),
            Record::HandedOff { to, seq, .. } => write!(f, "HandedOff {{ to: {}, seq: {seq} }}", to.0),
            Record::Switched { seq, epoch, to, .. } => write!(f, "Switched {{ seq: {seq}, epoch: {epoch}, to: {to:?}, seed: <redacted> }}"),
        }
    }
}

/// Passes over every member looking for silent ones per refresh timeout: a member expires at
/// most 1/16 of the timeout late.
const EXPIRY_SCANS_PER_TIMEOUT: u64 = 16;

/// Least time between two resync answers over UDP to one member.
pub const UDP_RESYNC_INTERVAL_MS: u64 = 50;

/// What an accepted liveness datagram gives.
#[derive(Debug)]
pub enum LivenessAnswer {
    /// A refresh: nothing to send.
    Refreshed(MemberId),
    /// A resync request: this datagram goes back to where the request came from.
    Resync(MemberId, Vec<u8>),
    /// A resync request from a member id this group no longer counts: this signed refusal
    /// goes back to where the request came from.
    Departed(MemberId, Vec<u8>),
}

/// Why a liveness datagram was not counted (the driver counts these; it never answers).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LivenessRefused {
    #[error("not a liveness datagram: {0}")]
    Decode(DecodeError),
    #[error("for group {0:?}, not this one")]
    OtherGroup(GroupId),
    #[error("member {0:?} left the group (left, expired or evicted)")]
    Departed(MemberId),
    #[error("member id {0:?} was never issued in this group")]
    Stranger(MemberId),
    #[error("member {0:?}'s tag does not verify")]
    BadTag(MemberId),
    #[error("member {member:?}'s counter {counter} is not above {last}: a replay")]
    Replayed { member: MemberId, counter: u64, last: u64 },
    #[error("member {0:?} asked for a resync again too soon")]
    TooSoon(MemberId),
    #[error("member {0:?}'s NAK names no rekey being repaired, or repeats one of this round")]
    NakNotCounted(MemberId),
}

/// Why a member left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Departure {
    Left,
    Expired,
    Evicted,
}

/// The outcome of an accepted join request.
#[derive(Debug)]
pub enum JoinStatus {
    /// Answered when the epoch's batch is applied.
    Queued(MemberId),
    /// Already a member: the acceptance and its current keys, to send at once.
    Admitted(Box<(JoinAnswer, ResyncAnswer)>),
}

/// A connection the driver holds open for an answer.
pub type ConnId = u64;

#[derive(Debug)]
pub enum Output {
    Persist(Record),
    Multicast(Vec<u8>),
    /// Answer to a join: acceptance and the member's full keys (after its batch), or refusal.
    JoinAnswer { conn: ConnId, answer: JoinAnswer, keys: Option<ResyncAnswer> },
    Departed { member: MemberId, identity: String, why: Departure },
    /// A batch was applied: its seq, the wraps and the packets it took, and the FEC parity
    /// packets sent with them.
    Rekeyed { seq: u64, epoch: u64, wraps: usize, packets: usize, bytes: usize, parity: usize, parity_bytes: usize },
    /// A repair round went out: the NAKs it answers and the parity packets it took.
    Repaired { seq: u64, naks: usize, packets: usize, bytes: usize },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error(transparent)]
    Packets(#[from] PacketiseError),
    #[error("the persisted log is not a history of this group: {0}")]
    BadLog(&'static str),
    #[error("the log's snapshot does not decode: {0}")]
    BadSnapshot(#[from] DecodeError),
    #[error("compact placement is for measurements: a live group's members find their packets only under user-oriented or tiered placement")]
    CompactPlacement,
    #[error("merge or split refused: {0}")]
    Merge(&'static str),
    #[error("scheme switch refused: {0}")]
    Switch(&'static str),
    #[error(transparent)]
    Transition(#[from] TransitionError),
    #[error("the configuration changed {setting} from {logged} (recorded when the group was created) to {configured}; the same log under other settings would rebuild other keys: restore the setting, or create a new group with a new database")]
    PolicyChanged { setting: &'static str, logged: String, configured: String },
}

/// A refused request, with a reason for the log and the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason:?}: {detail}")]
pub struct Refusal {
    pub reason: RefusalReason,
    pub detail: String,
}

fn refuse(reason: RefusalReason, detail: impl Into<String>) -> Refusal {
    Refusal { reason, detail: detail.into() }
}

fn check_fixed(logged: Option<&FixedPolicy>, policy: &GroupPolicy) -> Result<(), ControllerError> {
    match logged.and_then(|f| f.first_change(&policy.fixed())) {
        Some((setting, logged, configured)) => Err(ControllerError::PolicyChanged { setting, logged, configured }),
        None => Ok(()),
    }
}

fn revoked(identity: &str) -> Refusal {
    refuse(RefusalReason::Revoked, format!("{identity} was evicted; it stays out until an administrator re-admits it (keycast admin readmit {identity})"))
}

/// Batches between snapshots by default.
pub const DEFAULT_SNAPSHOT_EVERY: u64 = 64;

/// Largest jump a member's report may move the rekey seq (a restored log is this far behind at
/// most); a larger report is not believed.
const MAX_SEQ_REPORT_GAP: u64 = 1 << 20;

pub struct Controller {
    policy: GroupPolicy,
    acl: BTreeSet<String>,
    /// Evicted identities: refused until re-admitted.
    revoked: BTreeSet<String>,
    graph: Box<dyn KeyGraph>,
    /// Shared with the heartbeats (see [`HeartbeatContent`]).
    signer: Arc<Signer>,
    /// Kept for snapshots (the key pair does not give its seed back).
    signing_seed: Zeroizing<[u8; 32]>,
    /// Signing-key rotations so far, and the latest announcements, oldest first (the
    /// heartbeats repeat them), with how many were made in this run.
    signer_changes: u64,
    announcements: Vec<Arc<Vec<u8>>>,
    announced: u64,
    /// Run-time changes to the configured ACL, net.
    acl_added: BTreeSet<String>,
    acl_removed: BTreeSet<String>,
    /// Batches since the last snapshot, and how many make one.
    batches_since_snapshot: u64,
    snapshot_every: u64,
    created_ms: u64,
    members: BTreeMap<MemberId, MemberRecord>,
    by_identity: BTreeMap<String, MemberId>,
    next_member: u64,
    /// The epoch of the last batch applied (rekeys never go back in epoch).
    epoch: u64,
    rekey_seq: u64,
    /// Group keys by rekey seq, with their activation epoch.
    group_keys: BTreeMap<u64, (KeyRef, u64, Key)>,
    /// Sent from `tick` unless a driver took them over (see [`Controller::hand_over_heartbeats`]).
    heartbeats: Option<Heartbeats>,
    pending: Pending,
    waiting_joins: BTreeMap<MemberId, ConnId>,
    /// The packets of the last rekey, for retransmission after a restart.
    last_rekey: Vec<Vec<u8>>,
    /// The last tick: a longer gap than a heartbeat interval means the controller was not
    /// running (paused, stalled), and that time does not count against members' liveness.
    last_tick_ms: u64,
    /// The expiry scan goes over the members a slice per tick, from here, so that no tick reads
    /// them all (at a million members that read takes tens of ms, and heartbeats would wait).
    expiry_cursor: MemberId,
    expiry_pass_members: usize,
    last_expiry_scan_ms: u64,
    /// A rekey seq floor members reported, to persist with the next tick.
    unpersisted_floor: Option<u64>,
    /// FEC parity of the last rekey, its NAKs and repair, and the proactivity factor.
    delivery: Delivery,
    /// Signed refusals over UDP given in the current second.
    refusals: RefusalBudget,
    /// A standby's fresh controller: the members of the subgroup it took over rejoin at once,
    /// so the first batch closes when this many joins wait, not at the epoch's end.
    rejoins_expected: Option<usize>,
    /// The joiners' keys of the batches whose joiners wait for their key (reflector on).
    joiners: JoinersKeys,
    /// The group this controller absorbed, while merged (docs/merge.md).
    merged: Option<Merged>,
    /// The group this one was absorbed into, until the split hands it back: nothing is served.
    handed_off: Option<GroupId>,
    /// The merge notice of that hand-off: every heartbeat carries it while handed off, so a
    /// member away for longer than its repeats still finds its group (docs/merge.md).
    hand_off_notice: Option<Arc<Vec<u8>>>,
}

/// Signed refusals answer requests nobody can authenticate (the member's key is gone) and cost
/// a signature each: at most this many a second, whoever asks. A refusal not sent costs the
/// departed member nothing but time: after three unanswered requests it asks over TLS.
pub const DATAGRAM_REFUSALS_PER_SECOND: u32 = 64;

#[derive(Default)]
struct RefusalBudget {
    second_started_ms: u64,
    spent: u32,
}

impl RefusalBudget {
    fn take(&mut self, now_ms: u64) -> bool {
        if now_ms >= self.second_started_ms.saturating_add(1000) {
            (self.second_started_ms, self.spent) = (now_ms, 0);
        }
        if self.spent >= DATAGRAM_REFUSALS_PER_SECOND {
            return false;
        }
        self.spent += 1;
        true
    }
}

impl Controller {
    /// A new group. Returns the controller and the genesis record to persist first.
    pub fn create(
        policy: GroupPolicy,
        acl: BTreeSet<String>,
        now_ms: u64,
        graph_seed: [u8; 32],
        signing_seed: [u8; 32],
    ) -> Result<(Controller, Output), ControllerError> {
        let genesis = Record::Genesis { created_ms: now_ms, graph_seed, signing_seed, fixed: Some(policy.fixed()) };
        let controller = Controller::restore(policy, acl, std::slice::from_ref(&genesis), now_ms)?;
        Ok((controller, Output::Persist(genesis)))
    }

    /// Rebuilds the controller from its persisted log. Members count as seen at `now_ms`, so a
    /// restart does not expire them before they can refresh.
    pub fn restore(
        policy: GroupPolicy,
        acl: BTreeSet<String>,
        log: &[Record],
        now_ms: u64,
    ) -> Result<Controller, ControllerError> {
        // A compact packet may hold a member's upper wrap beside another subtree's copy of the
        // key it is sealed under, so a member cannot tell it from a packet it does not need.
        if policy.packets.placement == Placement::Compact {
            return Err(ControllerError::CompactPlacement);
        }
        let mut c = match log.first() {
            Some(Record::Genesis { created_ms, graph_seed, signing_seed, fixed }) => {
                check_fixed(fixed.as_ref(), &policy)?;
                let graph = new_graph(policy.graph, &BatchSeed::from_bytes(*graph_seed))?;
                let group_keys = BTreeMap::from([(0, (graph.group_key().0, 0, graph.group_key().1.clone()))]);
                Controller::blank(policy, acl, graph, signing_seed, *created_ms, group_keys, now_ms)
            }
            Some(Record::Snapshot(snapshot)) => {
                check_fixed(Some(&snapshot.fixed), &policy)?;
                Controller::from_snapshot(policy, acl, snapshot, now_ms)?
            }
            _ => return Err(ControllerError::BadLog("it does not start with the group's genesis or a snapshot")),
        };
        let created_ms = &c.created_ms.clone();
        let mut last_batch = None;
        for record in &log[1..] {
            match record {
                Record::Genesis { .. } | Record::Snapshot(_) => {
                    return Err(ControllerError::BadLog("a genesis or snapshot after the log's first record"))
                }
                Record::Requested(request) => c.pending.push(request.clone()),
                Record::Batch { seq, epoch, activation, joins, leaves, seed } => {
                    if *seq != c.rekey_seq + 1 {
                        return Err(ControllerError::BadLog("rekey sequence numbers are not consecutive"));
                    }
                    let plan = c.apply_batch(*seq, *epoch, *activation, joins, leaves, seed, *created_ms)?;
                    last_batch = Some((plan, *seq, *epoch, *activation));
                }
                Record::Revoked(identity) => drop(c.revoked.insert(identity.clone())),
                Record::Readmitted(identity) => drop(c.revoked.remove(identity)),
                Record::AclAdded(identity) => c.note_acl_change(identity, true),
                Record::AclRemoved(identity) => c.note_acl_change(identity, false),
                Record::SeqFloor(floor) => c.rekey_seq = c.rekey_seq.max(*floor),
                Record::SigningKey { change, seed } => c.install_signer(*change, seed),
                Record::Merged(merge) => {
                    if merge.seq != c.rekey_seq + 1 {
                        return Err(ControllerError::BadLog("rekey sequence numbers are not consecutive"));
                    }
                    let plan = c.apply_merge(merge, *created_ms)?;
                    last_batch = Some((plan, merge.seq, merge.epoch, merge.epoch));
                }
                Record::Split { seq, epoch, seed } => {
                    if *seq != c.rekey_seq + 1 {
                        return Err(ControllerError::BadLog("rekey sequence numbers are not consecutive"));
                    }
                    let (plan, _) = c.apply_split(*seq, *epoch, seed)?;
                    last_batch = Some((plan, *seq, *epoch, *epoch));
                }
                Record::Switched { seq, epoch, to, seed } => {
                    if *seq != c.rekey_seq + 1 {
                        return Err(ControllerError::BadLog("rekey sequence numbers are not consecutive"));
                    }
                    c.apply_switch(*seq, *epoch, *to, seed)?;
                    last_batch = None;
                }
                Record::HandedOff { to, notice, .. } => {
                    c.handed_off = Some(*to);
                    c.hand_off_notice = Some(Arc::new(notice.clone()));
                    c.announce(notice.clone());
                }
            }
        }
        for record in c.members.values_mut() {
            record.last_seen_ms = now_ms;
        }
        // A revoked identity is never left a member (a log whose eviction batch was lost).
        let revoked_members: Vec<MemberId> =
            c.members.iter().filter(|(_, r)| c.revoked.contains(&r.identity)).map(|(m, _)| *m).collect();
        for member in revoked_members {
            if !c.pending.contains(&Request::Evict { member }) {
                c.pending.push(Request::Evict { member });
            }
        }
        // With nothing waiting, the epoch under way counts as closed: a request that arrives now
        // waits for the epoch's end like any other (a fresh group's first tick would otherwise
        // batch it at once). Requests restored from the log have waited already: the first
        // tick serves them.
        if c.pending.is_empty() {
            c.epoch = c.epoch.max(c.epoch_at(now_ms));
        }
        if let Some((plan, seq, epoch, activation)) = last_batch {
            c.last_rekey = c.encode(&plan, seq, epoch, activation)?.0;
        }
        c.heartbeats = Some(Heartbeats::new(c.heartbeat_content(), now_ms));
        Ok(c)
    }

    #[allow(clippy::too_many_arguments)]
    fn blank(
        policy: GroupPolicy,
        acl: BTreeSet<String>,
        graph: Box<dyn KeyGraph>,
        signing_seed: &[u8; 32],
        created_ms: u64,
        group_keys: BTreeMap<u64, (KeyRef, u64, Key)>,
        now_ms: u64,
    ) -> Controller {
        Controller {
            policy,
            acl,
            revoked: BTreeSet::new(),
            group_keys,
            graph,
            signer: Arc::new(Signer::from_seed(signing_seed)),
            signing_seed: Zeroizing::new(*signing_seed),
            signer_changes: 0,
            announcements: Vec::new(),
            announced: 0,
            acl_added: BTreeSet::new(),
            acl_removed: BTreeSet::new(),
            batches_since_snapshot: 0,
            snapshot_every: DEFAULT_SNAPSHOT_EVERY,
            created_ms,
            members: BTreeMap::new(),
            by_identity: BTreeMap::new(),
            next_member: 1,
            epoch: 0,
            rekey_seq: 0,
            heartbeats: None,
            pending: Pending::default(),
            waiting_joins: BTreeMap::new(),
            last_rekey: Vec::new(),
            last_tick_ms: now_ms,
            expiry_cursor: MemberId(0),
            expiry_pass_members: 0,
            last_expiry_scan_ms: now_ms,
            unpersisted_floor: None,
            delivery: Delivery::new(policy.packets.fec),
            refusals: RefusalBudget::default(),
            rejoins_expected: None,
            joiners: JoinersKeys::default(),
            merged: None,
            handed_off: None,
            hand_off_notice: None,
        }
    }

    fn from_snapshot(policy: GroupPolicy, acl: BTreeSet<String>, s: &Snapshot, now_ms: u64) -> Result<Controller, ControllerError> {
        let graph: Box<dyn KeyGraph> = match s.merged {
            None => import_graph(s.switched.unwrap_or(policy.graph), &s.graph)?,
            Some(_) => Box::new(MergedTrees::import(&s.graph)?),
        };
        if graph.config() != s.switched.unwrap_or(policy.graph) {
            return Err(ControllerError::BadLog("the snapshot's graph is not of the configured scheme"));
        }
        let group_keys = s.group_keys.iter().map(|(seq, r, activation, key)| (*seq, (*r, *activation, key.clone()))).collect();
        let mut c = Controller::blank(policy, acl, graph, &s.signing_seed, s.created_ms, group_keys, now_ms);
        for identity in &s.acl_added {
            c.note_acl_change(identity, true);
        }
        for identity in &s.acl_removed {
            c.note_acl_change(identity, false);
        }
        c.revoked = s.revoked.clone();
        for (member, identity, joined_seq) in &s.members {
            c.members.insert(*member, MemberRecord { identity: identity.clone(), last_seen_ms: now_ms, joined_seq: *joined_seq, liveness_counter: 0, udp_resync_ms: 0 });
            c.by_identity.insert(identity.clone(), *member);
        }
        (c.next_member, c.epoch, c.rekey_seq) = (s.next_member, s.epoch, s.rekey_seq);
        c.pending = Pending::from_requests(&s.pending);
        c.last_rekey = s.last_rekey.clone();
        c.signer_changes = s.signer_changes;
        c.merged = s.merged.clone();
        if c.group_keys.is_empty() || c.members.keys().any(|m| !c.graph.contains(*m)) {
            return Err(ControllerError::BadLog("the snapshot's members and keys disagree"));
        }
        Ok(c)
    }

    /// The whole state, in place of the log so far.
    fn whole_state(&self) -> Snapshot {
        Snapshot {
            created_ms: self.created_ms,
            signing_seed: self.signing_seed.clone(),
            signer_changes: self.signer_changes,
            fixed: self.policy.fixed(),
            next_member: self.next_member,
            epoch: self.epoch,
            rekey_seq: self.rekey_seq,
            members: self.members.iter().map(|(m, r)| (*m, r.identity.clone(), r.joined_seq)).collect(),
            group_keys: self.group_keys.iter().map(|(seq, (r, activation, key))| (*seq, *r, *activation, key.clone())).collect(),
            revoked: self.revoked.clone(),
            acl_added: self.acl_added.clone(),
            acl_removed: self.acl_removed.clone(),
            pending: self.pending.iter().filter(|r| !matches!(r, Request::Join { .. })).cloned().collect(),
            last_rekey: self.last_rekey.clone(),
            graph: self.graph.export(),
            merged: self.merged.clone(),
            switched: Some(self.graph.config()).filter(|config| *config != self.policy.graph),
        }
    }

    /// Replaces the signing key with the one of `seed`: the announcement, signed by the current
    /// key, goes out now and with the next heartbeats; members follow it without rejoining.
    pub fn rotate_signing_key(&mut self, seed: [u8; 32]) -> Vec<Output> {
        let change = self.signer_changes + 1;
        let next = Signer::from_seed(&seed).verifying_key();
        let announcement = SignerChange { group: self.policy.group, change, next }.sign(&self.signer).encode();
        self.install_signer(change, &seed);
        self.announce(announcement.clone());
        vec![Output::Persist(Record::SigningKey { change, seed }), Output::Multicast(announcement)]
    }

    /// Caronni et al.'s flat to tree switch (figure 6): the tree is derived from the flat table,
    /// so the signed public notice (returned to multicast, repeated with the heartbeats) is all
    /// members need. Footnote 1: old members' KEKs still cover tree nodes, so colluding old
    /// members cannot be expelled; members joining later are expelled as in any tree.
    pub fn switch_to_tree(&mut self, now_ms: u64) -> Result<Vec<Output>, ControllerError> {
        self.switch_scheme(SchemeTarget::Tree, now_ms, [0; 32])
    }

    /// Caronni et al.'s tree to flat switch with perfect forward secrecy kept: a fresh table of
    /// `id_bits` from `entropy`. The notice tells members to resync; each member's new TEK and
    /// KEKs reach it in its resync answer, sealed to it alone (docs/distributed-flat.md).
    pub fn switch_to_flat(&mut self, id_bits: u8, now_ms: u64, entropy: [u8; 32]) -> Result<Vec<Output>, ControllerError> {
        self.switch_scheme(SchemeTarget::Flat { id_bits }, now_ms, entropy)
    }

    fn switch_scheme(&mut self, to: SchemeTarget, now_ms: u64, seed: [u8; 32]) -> Result<Vec<Output>, ControllerError> {
        if self.merged.is_some() || self.handed_off.is_some() {
            return Err(ControllerError::Switch("a merged or handed-off group keeps its merged tree until it splits"));
        }
        let epoch = self.epoch_at(now_ms).max(self.epoch);
        let seq = self.rekey_seq + 1;
        let notice = self.apply_switch(seq, epoch, to, &seed)?;
        Ok(vec![Output::Persist(Record::Switched { seq, epoch, to, seed }), Output::Multicast(notice)])
    }

    /// Replaces the graph as switch `seq` and returns its signed notice (also the heartbeats'
    /// announcement and the last rekey's retransmission). Its group key is in force at once.
    fn apply_switch(&mut self, seq: u64, epoch: u64, to: SchemeTarget, seed: &[u8; 32]) -> Result<Vec<u8>, ControllerError> {
        let target = match to {
            SchemeTarget::Tree => {
                let switched = tree_from_flat(&*self.graph)?;
                self.graph = switched.graph;
                SwitchTarget::Tree { id_bits: switched.switch.id_bits, version: switched.switch.version }
            }
            SchemeTarget::Flat { id_bits } => {
                let ids = match self.policy.graph.scheme {
                    Scheme::Flat { ids, .. } => ids,
                    _ => FlatIds::Sequential,
                };
                // The notices' wraps are not sent: resync answers carry the same keys.
                self.graph = flat_from_tree(&*self.graph, id_bits, ids, &BatchSeed::from_bytes(*seed))?.graph;
                SwitchTarget::Flat { id_bits }
            }
        };
        self.install_group_key(seq, epoch, self.graph.group_key().0, epoch);
        let notice = SchemeSwitch { group: self.policy.group, seq, epoch, target }.sign(&self.signer).encode();
        self.announce(notice.clone());
        self.last_rekey = vec![notice.clone()];
        Ok(notice)
    }

    /// The group key in force in `epoch`, with its ref (what members must hold).
    pub fn key_in_force(&self, epoch: u64) -> (KeyRef, Key) {
        let (_, (r, _, key)) = self.active_entry(epoch);
        (*r, key.clone())
    }

    /// The key graph's scheme now (the configured one until a switch).
    pub fn scheme(&self) -> GraphConfig {
        self.graph.config()
    }

    /// A public notice the heartbeats repeat, after those still repeating (the oldest beyond
    /// [`MAX_ANNOUNCEMENTS`] is dropped).
    fn announce(&mut self, notice: Vec<u8>) {
        if self.announcements.len() == MAX_ANNOUNCEMENTS {
            self.announcements.remove(0);
        }
        self.announcements.push(Arc::new(notice));
        self.announced += 1;
    }

    fn install_signer(&mut self, change: u64, seed: &[u8; 32]) {
        self.signer = Arc::new(Signer::from_seed(seed));
        self.signing_seed = Zeroizing::new(*seed);
        self.signer_changes = change;
    }

    /// Makes a snapshot every `batches` batches (default [`DEFAULT_SNAPSHOT_EVERY`]).
    pub fn set_snapshot_interval(&mut self, batches: u64) {
        self.snapshot_every = batches.max(1);
    }

    fn note_acl_change(&mut self, identity: &str, added: bool) {
        let (into, out_of) = if added { (&mut self.acl_added, &mut self.acl_removed) } else { (&mut self.acl_removed, &mut self.acl_added) };
        out_of.remove(identity);
        into.insert(identity.to_owned());
        if added {
            self.acl.insert(identity.to_owned());
        } else {
            self.acl.remove(identity);
        }
    }

    pub fn policy(&self) -> &GroupPolicy {
        &self.policy
    }

    /// How many times the signing key was replaced since the group was created.
    pub fn signer_changes(&self) -> u64 {
        self.signer_changes
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.signer.verifying_key()
    }

    pub fn members(&self) -> &BTreeMap<MemberId, MemberRecord> {
        &self.members
    }

    pub fn rekey_seq(&self) -> u64 {
        self.rekey_seq
    }

    /// The epoch the clock says it is.
    pub fn epoch_at(&self, now_ms: u64) -> u64 {
        epoch_at(self.created_ms, self.policy.epoch_ms, now_ms)
    }

    /// The group key in force in `epoch`: the newest rekey's whose activation has come.
    pub fn active_key(&self, epoch: u64) -> KeyRef {
        self.active_entry(epoch).1 .0
    }

    /// What the heartbeats say until the next batch or signing key.
    pub fn heartbeat_content(&self) -> HeartbeatContent {
        let (from, _) = self.active_entry(self.epoch);
        HeartbeatContent {
            group: self.policy.group,
            created_ms: self.created_ms,
            epoch_ms: self.policy.epoch_ms,
            heartbeat_ms: self.policy.heartbeat_ms,
            epoch: self.epoch,
            rekey_seq: self.rekey_seq,
            group_size: self.members.len() as u64,
            keys: self.group_keys.range(from..).map(|(_, (r, activation, key))| (*r, *activation, key_check(key, *r))).collect(),
            signer: self.signer.clone(),
            announcements: self.announcements.clone(),
            standing: self.hand_off_notice.clone(),
        }
    }

    /// Changes whenever [`Controller::heartbeat_content`] would: a driver that sends the
    /// heartbeats itself asks for new content only then.
    pub fn heartbeat_generation(&self) -> [u64; 4] {
        [self.epoch, self.rekey_seq, self.members.len() as u64, self.signer_changes + self.announced]
    }

    /// Stops `tick` from sending heartbeats and returns them, to be sent on a timer of the
    /// driver's (fed with [`Controller::heartbeat_content`] after each change, before the
    /// change's first datagram goes out).
    pub fn hand_over_heartbeats(&mut self) -> Option<Heartbeats> {
        self.heartbeats.take()
    }

    /// The group keys members may wrap data under at `now_ms` (the active one and any pending
    /// one) and the active one to wrap under: a relay's view of the subgroup it controls.
    pub fn traffic_keys(&self, now_ms: u64) -> TrafficKeys {
        TrafficKeys {
            group: self.policy.group,
            sealing: Some(self.active_key(self.epoch_at(now_ms))),
            keys: self.group_keys.values().map(|(r, _, k)| (*r, k.clone())).collect(),
        }
    }

    /// What the reflector needs at `now_ms`: the group keys and the joiners' keys in use
    /// (`None` with the reflector off).
    pub fn reflection_keys(&self, now_ms: u64) -> Option<ReflectionKeys> {
        let in_force = self.active_entry(self.epoch_at(now_ms)).0;
        self.policy.reflector.then(|| ReflectionKeys {
            group: self.policy.group,
            group_keys: self.group_keys.iter().map(|(seq, (r, _, k))| (*seq, *r, k.clone())).collect(),
            joiners: self.joiners.live().filter(|(seq, _, _)| *seq > in_force).collect(),
        })
    }

    /// The rekey seq and entry of the group key in force in `epoch`.
    fn active_entry(&self, epoch: u64) -> (u64, &(KeyRef, u64, Key)) {
        let (seq, entry) = self.group_keys.iter().rev().find(|(_, (_, a, _))| *a <= epoch).expect("the first key is active");
        (*seq, entry)
    }

    fn pending_key(&self, epoch: u64) -> Option<PendingKey> {
        let (_, &(key, activation, _)) = self.group_keys.last_key_value()?;
        (activation > epoch).then_some(PendingKey { key, activation })
    }

    /// The packets of the last rekey (sent again after a restart: members that had them
    /// drop them as replays, members that missed them catch up).
    pub fn last_rekey(&self) -> &[Vec<u8>] {
        &self.last_rekey
    }

    /// The ACL in force (the configured one with the run-time changes of the log).
    pub fn acl(&self) -> &BTreeSet<String> {
        &self.acl
    }

    /// Identities evicted and not re-admitted.
    pub fn revoked(&self) -> &BTreeSet<String> {
        &self.revoked
    }

    pub fn member_by_identity(&self, identity: &str) -> Option<MemberId> {
        self.by_identity.get(identity).copied()
    }

    fn member_of(&self, identity: &str, member: MemberId) -> Result<(), Refusal> {
        match self.members.get(&member) {
            Some(record) if record.identity == identity => Ok(()),
            Some(_) => Err(refuse(RefusalReason::NotInAcl, format!("{identity} is not member {}", member.0))),
            None if self.revoked.contains(identity) => Err(revoked(identity)),
            None => Err(refuse(RefusalReason::NotMember, format!("member {} is not in the group (it left, expired or was removed)", member.0))),
        }
    }

    /// True while a leave or eviction of `member` waits for the epoch's batch.
    fn departing(&self, member: MemberId) -> bool {
        self.pending.departing(member)
    }

    /// A join request from the TLS identity `identity` on connection `conn`. A new member is
    /// answered when the epoch's batch is applied (`JoinStatus::Queued`). An identity that is
    /// already a member (its answer was lost, say in a controller crash) gets its keys at once;
    /// one whose leave is pending is admitted anew in the same batch, with fresh keys, so the
    /// old session's leave never removes the new one.
    pub fn join(&mut self, conn: ConnId, identity: &str, group: GroupId, now_ms: u64) -> Result<JoinStatus, Refusal> {
        if group != self.policy.group {
            return Err(refuse(RefusalReason::UnknownGroup, format!("no group {}", group.0)));
        }
        if let Some(to) = self.handed_off {
            return Err(refuse(RefusalReason::UnknownGroup, format!("group {} is merged into group {} until it splits", group.0, to.0)));
        }
        if self.revoked.contains(identity) {
            return Err(revoked(identity));
        }
        if !self.acl.contains(identity) {
            return Err(refuse(RefusalReason::NotInAcl, format!("{identity} is not in the ACL")));
        }
        if let Some(&member) = self.by_identity.get(identity) {
            if !self.departing(member) {
                let keys = self.resync(identity, member, 0, now_ms)?;
                return Ok(JoinStatus::Admitted(Box::new((self.acceptance(&keys), keys))));
            }
        }
        let queued = self.pending.queued_join(identity);
        let member = match queued {
            Some(member) => member,
            None => {
                let joining = self.pending.joins() as u64;
                let most = self.graph.max_members();
                if self.members.len() as u64 + joining >= most {
                    return Err(refuse(RefusalReason::GroupFull, format!("the group holds {most} members at most with its scheme; try again after a member leaves")));
                }
                let member = MemberId(self.next_member);
                self.next_member += 1;
                self.pending.push(Request::Join { member, identity: identity.to_owned() });
                member
            }
        };
        // A repeated request replaces the connection the answer goes to.
        self.waiting_joins.insert(member, conn);
        Ok(JoinStatus::Queued(member))
    }

    fn acceptance(&self, keys: &ResyncAnswer) -> JoinAnswer {
        JoinAnswer::Accepted(JoinAccepted {
            group: self.policy.group,
            member: keys.member,
            position: keys.position,
            individual: keys.keys[0].0,
            individual_key: keys.keys[0].1.clone(),
            signer: self.signer.verifying_key(),
            rekey_seq: keys.rekey_seq,
            joiners_key: self.members.get(&keys.member).and_then(|m| self.joiners.of_batch(m.joined_seq)).map(Box::new),
        })
    }

    /// A member asks to leave; applied with the epoch's batch.
    pub fn leave(&mut self, identity: &str, member: MemberId) -> Result<Vec<Output>, Refusal> {
        self.member_of(identity, member)?;
        Ok(self.request(Request::Leave { member }))
    }

    fn request(&mut self, request: Request) -> Vec<Output> {
        if self.pending.contains(&request) {
            return Vec::new();
        }
        self.pending.push(request.clone());
        vec![Output::Persist(Record::Requested(request))]
    }

    /// Soft-state refresh, with the last rekey the member applied (`rekey_seq`).
    pub fn refresh(&mut self, identity: &str, member: MemberId, rekey_seq: u64, now_ms: u64) -> Result<(), Refusal> {
        self.member_of(identity, member)?;
        self.seen(member, rekey_seq, now_ms);
        Ok(())
    }

    /// A liveness datagram (UDP): counts as a refresh from its member when its tag verifies
    /// under the member's liveness key and its counter is above the last one (one lookup and
    /// one HMAC, no allocation). A resync request is answered with the member's keys sealed
    /// under its resync answer key (`nonce`: 12 fresh random bytes), at most once per
    /// [`UDP_RESYNC_INTERVAL_MS`].
    pub fn liveness(&mut self, bytes: &[u8], now_ms: u64, nonce: [u8; 12]) -> Result<LivenessAnswer, LivenessRefused> {
        let claimed = Liveness::peek(bytes).map_err(LivenessRefused::Decode)?;
        let (member, group) = (claimed.member, self.policy.group);
        let (live, individual) = match self.authenticated(claimed.group, member, |key| Liveness::open(bytes, key), |l| l.counter) {
            Err(LivenessRefused::Departed(_)) if claimed.resync => return self.refuse_departed(claimed, now_ms),
            other => other?,
        };
        let record = &self.members[&member];
        if live.resync && now_ms < record.udp_resync_ms.saturating_add(UDP_RESYNC_INTERVAL_MS) {
            return Err(LivenessRefused::TooSoon(member));
        }
        let identity = record.identity.clone();
        if let Some(record) = self.members.get_mut(&member) {
            record.liveness_counter = live.counter;
            record.udp_resync_ms = if live.resync { now_ms } else { record.udp_resync_ms };
        }
        if !live.resync {
            self.seen(member, live.rekey_seq, now_ms);
            return Ok(LivenessAnswer::Refreshed(member));
        }
        let answer = self.resync(&identity, member, live.rekey_seq, now_ms).map_err(|_| LivenessRefused::Departed(member))?;
        let sealed = seal_resync_answer(&answer, live.counter, &ResyncAnswerKey::derive(&individual, group, member), nonce);
        Ok(LivenessAnswer::Resync(member, sealed))
    }

    /// A signed refusal of a resync request from a member id that was issued in this group but
    /// is no longer in it (left, expired, evicted), within [`DATAGRAM_REFUSALS_PER_SECOND`].
    fn refuse_departed(&mut self, request: Liveness, now_ms: u64) -> Result<LivenessAnswer, LivenessRefused> {
        let member = request.member;
        if !self.refusals.take(now_ms) {
            return Err(LivenessRefused::Departed(member));
        }
        let refusal = DatagramRefusal { group: request.group, member, counter: request.counter, reason: RefusalReason::NotMember };
        Ok(LivenessAnswer::Departed(member, refusal.sign(&self.signer)))
    }

    /// A datagram claiming to come from `member` of `group` (a liveness datagram, resync
    /// request or NAK), opened under the member's liveness key by `open`: refused unless the
    /// member is in this group, the tag verifies and the counter is above the member's last.
    /// Returns it with the member's individual key.
    fn authenticated<T>(
        &self,
        group: GroupId,
        member: MemberId,
        open: impl FnOnce(&LivenessKey) -> Result<T, Reject>,
        counter: impl Fn(&T) -> u64,
    ) -> Result<(T, Key), LivenessRefused> {
        if group != self.policy.group {
            return Err(LivenessRefused::OtherGroup(group));
        }
        let (Some(individual), Some(record)) = (self.graph.individual_key(member), self.members.get(&member)) else {
            // Ids never issued get no signed refusal: a stranger learns no more than it knew.
            let issued = (1..self.next_member).contains(&member.0);
            return Err(if issued { LivenessRefused::Departed(member) } else { LivenessRefused::Stranger(member) });
        };
        let last = record.liveness_counter;
        let datagram = open(&LivenessKey::derive(&individual, group, member)).map_err(|_| LivenessRefused::BadTag(member))?;
        if counter(&datagram) <= last {
            return Err(LivenessRefused::Replayed { member, counter: counter(&datagram), last });
        }
        Ok((datagram, individual))
    }

    /// Records that `member` was heard, and a rekey seq it reports: a seq above this log's
    /// means the log was restored from an older copy, so rekeys continue above it (members that
    /// hold the other history's keys detect the difference from heartbeats and resync).
    fn seen(&mut self, member: MemberId, rekey_seq: u64, now_ms: u64) {
        if let Some(record) = self.members.get_mut(&member) {
            record.last_seen_ms = record.last_seen_ms.max(now_ms);
        }
        if rekey_seq > self.rekey_seq && rekey_seq - self.rekey_seq <= MAX_SEQ_REPORT_GAP {
            self.rekey_seq = rekey_seq;
            self.unpersisted_floor = Some(rekey_seq);
        }
    }

    /// Everything `member` needs to continue after a gap; `rekey_seq` is the last rekey it
    /// applied.
    pub fn resync(&mut self, identity: &str, member: MemberId, rekey_seq: u64, now_ms: u64) -> Result<ResyncAnswer, Refusal> {
        self.member_of(identity, member)?;
        if self.revoked.contains(identity) {
            return Err(revoked(identity));
        }
        self.seen(member, rekey_seq, now_ms);
        let epoch = self.epoch_at(now_ms);
        let mut answer = self.snapshot(member, epoch);
        // Until the newest key activates, traffic is sealed under the active one: a member
        // admitted before that key was made gets it too (never a later joiner).
        let (active_seq, (active_ref, _, active_key)) = self.active_entry(epoch);
        if answer.pending.is_some() && self.members[&member].joined_seq <= active_seq {
            answer.keys.push((*active_ref, active_key.clone()));
        }
        Ok(answer)
    }

    fn snapshot(&self, member: MemberId, epoch: u64) -> ResyncAnswer {
        let (position, keys) = self.graph.member_keys(member).expect("a member has keys");
        ResyncAnswer {
            group: self.policy.group,
            member,
            position,
            epoch,
            rekey_seq: self.rekey_seq,
            active: self.active_key(epoch),
            pending: self.pending_key(epoch),
            keys,
            signer: self.signer.verifying_key(),
        }
    }

    /// Removes `member` on an administrator's order and revokes its identity: its joins are
    /// refused, across restarts, until [`Controller::readmit`].
    pub fn evict(&mut self, member: MemberId, now_ms: u64, entropy: [u8; 32]) -> Result<Vec<Output>, ControllerError> {
        let Some(record) = self.members.get(&member) else {
            return Ok(Vec::new());
        };
        let identity = record.identity.clone();
        let mut out = self.revoke_identity(&identity);
        out.extend(self.remove(member, now_ms, entropy)?);
        Ok(out)
    }

    /// Revokes `identity` (evicting it if it is a member).
    pub fn revoke(&mut self, identity: &str, now_ms: u64, entropy: [u8; 32]) -> Result<Vec<Output>, ControllerError> {
        match self.by_identity.get(identity) {
            Some(&member) => self.evict(member, now_ms, entropy),
            None => Ok(self.revoke_identity(identity)),
        }
    }

    fn revoke_identity(&mut self, identity: &str) -> Vec<Output> {
        let mut out = self.drop_queued_join(identity, revoked(identity));
        if self.revoked.insert(identity.to_owned()) {
            out.insert(0, Output::Persist(Record::Revoked(identity.to_owned())));
        }
        out
    }

    /// Withdraws a join of `identity` waiting for the epoch, answering it with `refusal`.
    fn drop_queued_join(&mut self, identity: &str, refusal: Refusal) -> Vec<Output> {
        let Some(member) = self.pending.remove_join(identity) else {
            return Vec::new();
        };
        let answer = JoinAnswer::Refused { reason: refusal.reason, detail: refusal.detail };
        self.waiting_joins.remove(&member).map(|conn| Output::JoinAnswer { conn, answer, keys: None }).into_iter().collect()
    }

    /// Lets a revoked identity join again (it still needs to be in the ACL).
    pub fn readmit(&mut self, identity: &str) -> Vec<Output> {
        match self.revoked.remove(identity) {
            true => vec![Output::Persist(Record::Readmitted(identity.to_owned()))],
            false => Vec::new(),
        }
    }

    pub fn acl_add(&mut self, identity: &str) -> Vec<Output> {
        if self.acl.contains(identity) {
            return Vec::new();
        }
        self.note_acl_change(identity, true);
        vec![Output::Persist(Record::AclAdded(identity.to_owned()))]
    }

    /// Takes `identity` out of the ACL; a member with it is removed at once.
    pub fn acl_remove(&mut self, identity: &str, now_ms: u64, entropy: [u8; 32]) -> Result<Vec<Output>, ControllerError> {
        if !self.acl.contains(identity) {
            return Ok(Vec::new());
        }
        self.note_acl_change(identity, false);
        let mut out = vec![Output::Persist(Record::AclRemoved(identity.to_owned()))];
        out.extend(self.drop_queued_join(identity, refuse(RefusalReason::NotInAcl, format!("{identity} was removed from the ACL"))));
        if let Some(&member) = self.by_identity.get(identity) {
            out.extend(self.remove(member, now_ms, entropy)?);
        }
        Ok(out)
    }

    /// Queues the removal of `member` and, under immediate eviction, rekeys at once.
    fn remove(&mut self, member: MemberId, now_ms: u64, entropy: [u8; 32]) -> Result<Vec<Output>, ControllerError> {
        let mut out = self.request(Request::Evict { member });
        if self.policy.immediate_eviction {
            out.extend(self.close_epoch(now_ms, entropy, true)?);
        }
        Ok(out)
    }

    /// A standby took over with this controller: `members` of the old relay's subgroup are
    /// rejoining now. The next batch closes as soon as that many joins wait (or at the epoch's
    /// end, if some never come).
    pub fn expect_rejoins(&mut self, members: usize) {
        self.rejoins_expected = Some(members);
    }

    /// Advances time: expires silent members, closes the epoch when it is over, and sends a
    /// heartbeat when one is due.
    pub fn tick(&mut self, now_ms: u64, entropy: [u8; 32]) -> Result<Vec<Output>, ControllerError> {
        let mut out = Vec::new();
        if self.handed_off.is_some() {
            // Nothing to batch or expire: only the heartbeats, which repeat the merge notice.
            out.extend(self.beat(now_ms));
            return Ok(out);
        }
        self.discount_pause(now_ms);
        if let Some(floor) = self.unpersisted_floor.take() {
            out.push(Output::Persist(Record::SeqFloor(floor)));
        }
        out.extend(self.expire_silent(now_ms));
        let rejoined = self.rejoins_expected.is_some_and(|n| self.pending.joins() >= n.max(1));
        if self.epoch_at(now_ms) > self.epoch || rejoined {
            self.rejoins_expected = None;
            out.extend(self.close_epoch(now_ms, entropy, false)?);
        }
        out.extend(self.repair(now_ms));
        self.joiners.retire(self.active_entry(self.epoch_at(now_ms)).0);
        out.extend(self.beat(now_ms));
        Ok(out)
    }

    /// The heartbeats due at `now_ms`, unless a driver took them over.
    fn beat(&mut self, now_ms: u64) -> Vec<Output> {
        if self.heartbeats.as_ref().is_none_or(|h| now_ms < h.next_ms()) {
            return Vec::new();
        }
        let content = self.heartbeat_content();
        let heartbeats = self.heartbeats.as_mut().expect("checked above");
        heartbeats.update(content);
        heartbeats.beat(now_ms).into_iter().map(Output::Multicast).collect()
    }

    /// Leave requests for the members not heard from for the refresh timeout, among the slice
    /// of members this tick's share of a pass covers (a whole pass every timeout / 16).
    fn expire_silent(&mut self, now_ms: u64) -> Vec<Output> {
        let pass_ms = (self.policy.refresh_timeout_ms / EXPIRY_SCANS_PER_TIMEOUT).max(1);
        let elapsed = now_ms.saturating_sub(self.last_expiry_scan_ms);
        // The pace is set by the members the pass started with: members leaving behind the
        // cursor must not slow the visit of those ahead of it.
        let per_pass = self.members.len().max(self.expiry_pass_members) as u64;
        let share = (per_pass.saturating_mul(elapsed).div_ceil(pass_ms)).min(self.members.len() as u64) as usize;
        if share == 0 {
            return Vec::new();
        }
        self.last_expiry_scan_ms = now_ms;
        let deadline = now_ms.saturating_sub(self.policy.refresh_timeout_ms);
        let mut slice: Vec<(MemberId, u64)> = self.members.range(self.expiry_cursor..).take(share).map(|(m, r)| (*m, r.last_seen_ms)).collect();
        if slice.len() < share {
            // The pass is over: the next one starts from the lowest id, paced by today's count.
            self.expiry_pass_members = self.members.len();
            let more = share - slice.len();
            slice.extend(self.members.range(..self.expiry_cursor).take(more).map(|(m, r)| (*m, r.last_seen_ms)));
        }
        self.expiry_cursor = slice.last().map_or(MemberId(0), |(m, _)| MemberId(m.0 + 1));
        let silent: Vec<MemberId> = slice.into_iter().filter(|(m, seen)| *seen < deadline && !self.pending.names(*m)).map(|(m, _)| m).collect();
        silent.into_iter().flat_map(|member| self.request(Request::Leave { member })).collect()
    }

    /// Liveness counts only time the controller was running: after a gap between ticks longer
    /// than a heartbeat interval (a pause, a stall, a migrated VM), every member is credited
    /// with the gap, so no member expires for the controller's own silence.
    fn discount_pause(&mut self, now_ms: u64) {
        let gap = now_ms.saturating_sub(self.last_tick_ms);
        self.last_tick_ms = self.last_tick_ms.max(now_ms);
        if gap <= self.policy.heartbeat_ms {
            return;
        }
        for record in self.members.values_mut() {
            record.last_seen_ms = record.last_seen_ms.saturating_add(gap).min(now_ms);
        }
    }

    /// Applies the pending requests as one batch and sends its rekey.
    fn close_epoch(&mut self, now_ms: u64, entropy: [u8; 32], immediate: bool) -> Result<Vec<Output>, ControllerError> {
        let epoch = self.epoch_at(now_ms).max(self.epoch);
        self.epoch = epoch;
        // Nothing changes unless the rekey can be sent: the requests wait for a later epoch.
        self.policy.packets.check()?;
        let requests = self.pending.take();
        let mut joins = Vec::new();
        let mut leaves = BTreeSet::new();
        let mut departures = Vec::new();
        for request in requests {
            match request {
                Request::Join { member, identity } => joins.push((member, identity)),
                Request::Leave { member } | Request::Evict { member } if !self.members.contains_key(&member) => {}
                Request::Leave { member } => {
                    if leaves.insert(member) {
                        let expired = self.members[&member].last_seen_ms < now_ms.saturating_sub(self.policy.refresh_timeout_ms);
                        departures.push((member, if expired { Departure::Expired } else { Departure::Left }));
                    }
                }
                Request::Evict { member } => {
                    leaves.insert(member);
                    departures.retain(|(m, _)| *m != member);
                    departures.push((member, Departure::Evicted));
                }
            }
        }
        // A joiner that leaves in the same epoch never joins.
        joins.retain(|(m, _)| !leaves.contains(m));
        if joins.is_empty() && leaves.is_empty() {
            return Ok(Vec::new());
        }
        let seq = self.rekey_seq + 1;
        // The delay lets members receive the rekey before its key is in force; a group with no
        // member yet has nobody to wait for (its joiners get the key in their answers).
        let activation = if immediate || self.members.is_empty() { epoch } else { epoch + self.policy.activation_delay };
        let leaves: Vec<MemberId> = leaves.into_iter().collect();
        let departed: Vec<(MemberId, String, Departure)> =
            departures.into_iter().map(|(m, why)| (m, self.members[&m].identity.clone(), why)).collect();
        let mut refused = Vec::new();
        let plan = match self.apply_batch(seq, epoch, activation, &joins, &leaves, &entropy, now_ms) {
            // Joins are checked against the capacity when they arrive; should the graph still
            // refuse them, they are refused and the leaves go ahead: no request stops a rekey.
            Err(ControllerError::Graph(GraphError::Full(most))) if !joins.is_empty() => {
                let detail = format!("the group holds {most} members at most with its scheme; try again after a member leaves");
                for (member, _) in joins.drain(..) {
                    if let Some(conn) = self.waiting_joins.remove(&member) {
                        let answer = JoinAnswer::Refused { reason: RefusalReason::GroupFull, detail: detail.clone() };
                        refused.push(Output::JoinAnswer { conn, answer, keys: None });
                    }
                }
                if leaves.is_empty() {
                    return Ok(refused);
                }
                self.apply_batch(seq, epoch, activation, &joins, &leaves, &entropy, now_ms)?
            }
            result => result?,
        };
        let record = Record::Batch { seq, epoch, activation, joins: joins.clone(), leaves: leaves.clone(), seed: entropy };
        let (packets, bytes) = self.encode(&plan, seq, epoch, activation)?;
        let mut out = vec![Output::Persist(record)];
        out.append(&mut refused);
        let parity = self.parity(seq, &packets);
        let parity_bytes = parity.iter().map(Vec::len).sum();
        out.push(Output::Rekeyed { seq, epoch, wraps: plan.wraps.len(), packets: packets.len(), bytes, parity: parity.len(), parity_bytes });
        out.extend(packets.iter().cloned().map(Output::Multicast));
        out.extend(parity.into_iter().map(Output::Multicast));
        if self.policy.membership_deltas {
            let joined = joins.iter().map(|(m, _)| *m).collect();
            let left = leaves.iter().chain(&plan.excluded).copied().collect();
            for part in MembershipDelta::split(self.policy.group, seq, joined, left) {
                out.push(Output::Multicast(part.sign(&self.signer).encode()));
            }
        }
        self.last_rekey = packets;
        self.batches_since_snapshot += 1;
        if self.batches_since_snapshot >= self.snapshot_every {
            self.batches_since_snapshot = 0;
            out.insert(1, Output::Persist(Record::Snapshot(Box::new(self.whole_state()))));
        }
        for (member, identity, why) in departed {
            out.push(Output::Departed { member, identity, why });
        }
        for (member, _) in &joins {
            if let Some(conn) = self.waiting_joins.remove(member) {
                let keys = self.snapshot(*member, epoch);
                out.push(Output::JoinAnswer { conn, answer: self.acceptance(&keys), keys: Some(keys) });
            }
        }
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn apply_batch(
        &mut self,
        seq: u64,
        epoch: u64,
        activation: u64,
        joins: &[(MemberId, String)],
        leaves: &[MemberId],
        seed: &[u8; 32],
        now_ms: u64,
    ) -> Result<RekeyPlan, ControllerError> {
        let batch = Batch { joins: joins.iter().map(|(m, _)| *m).collect(), leaves: leaves.to_vec() };
        let seed = BatchSeed::from_bytes(*seed);
        let plan = self.graph.apply(&batch, &seed)?;
        if self.policy.reflector && !joins.is_empty() {
            self.joiners.draw(seq, &seed);
        }
        for m in leaves.iter().chain(&plan.excluded) {
            if let Some(record) = self.members.remove(m) {
                self.by_identity.remove(&record.identity);
            }
        }
        for (m, identity) in joins {
            self.members.insert(*m, MemberRecord { identity: identity.clone(), last_seen_ms: now_ms, joined_seq: seq, liveness_counter: 0, udp_resync_ms: 0 });
            self.by_identity.insert(identity.clone(), *m);
            self.next_member = self.next_member.max(m.0 + 1);
        }
        if !self.pending.is_empty() {
            let joined: BTreeSet<MemberId> = joins.iter().map(|(m, _)| *m).collect();
            self.pending.retain(|r| !leaves.contains(&r.member()) && !joined.contains(&r.member()));
        }
        self.install_group_key(seq, epoch, plan.group_key, activation);
        Ok(plan)
    }

    /// Records rekey `seq`, made in `epoch`, as the newest group key (`group_ref`, the graph's
    /// key, in force from `activation`); keys superseded by a newer active key are never used
    /// again.
    fn install_group_key(&mut self, seq: u64, epoch: u64, group_ref: KeyRef, activation: u64) {
        self.rekey_seq = seq;
        self.epoch = self.epoch.max(epoch);
        self.group_keys.insert(seq, (group_ref, activation, self.graph.group_key().1.clone()));
        let active_seq = self.active_entry(epoch).0;
        self.group_keys.retain(|s, _| *s >= active_seq);
        self.joiners.retire(active_seq);
    }

    /// The proactive parity packets of a rekey (round 1), signed (none while rho is 1).
    fn parity(&mut self, seq: u64, packets: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let shards = self.delivery.first_round(seq, packets, self.members.len() as u64);
        self.sign_parity(seq, 1, &shards)
    }

    fn sign_parity(&self, seq: u64, round: u8, shards: &[ParityShard]) -> Vec<Vec<u8>> {
        if shards.is_empty() {
            return Vec::new();
        }
        let round = ParityRound { group: self.policy.group, seq, round, block_bits: self.policy.packets.block_bits };
        encode_parity(round, shards, &self.signer).unwrap_or_default()
    }

    /// The proactivity factor the next rekey's round 1 starts from.
    pub fn rho(&self) -> f64 {
        self.delivery.rho()
    }

    /// A NAK (UDP) for the last rekey: counted toward its repair round when its tag verifies
    /// under the member's liveness key and its counter is above the last one.
    pub fn nak(&mut self, bytes: &[u8], now_ms: u64) -> Result<MemberId, LivenessRefused> {
        let claimed = Nak::decode(bytes).map_err(LivenessRefused::Decode)?;
        let member = claimed.member;
        let (nak, _) = self.authenticated(claimed.group, member, |key| Nak::open(bytes, key), |n| n.counter)?;
        if let Some(record) = self.members.get_mut(&member) {
            record.liveness_counter = nak.counter;
        }
        let wait = (self.policy.heartbeat_ms / 4).clamp(5, 100);
        self.delivery.nak(member, &nak, now_ms, wait).map_err(|_| LivenessRefused::NakNotCounted(member))?;
        Ok(member)
    }

    /// The repair round of the last rekey, when it is due.
    fn repair(&mut self, now_ms: u64) -> Vec<Output> {
        let Some(repair) = self.delivery.due_repair(now_ms) else { return Vec::new() };
        let packets = self.sign_parity(repair.seq, repair.round, &repair.shards);
        let mut out = vec![Output::Repaired { seq: repair.seq, naks: repair.naks, packets: packets.len(), bytes: packets.iter().map(Vec::len).sum() }];
        out.extend(packets.into_iter().map(Output::Multicast));
        out
    }

    fn encode(&self, plan: &RekeyPlan, seq: u64, epoch: u64, activation: u64) -> Result<(Vec<Vec<u8>>, usize), ControllerError> {
        let context = RekeyContext { group: self.policy.group, epoch, seq, activation };
        let rekey = encode_rekey(plan, context, self.policy.packets, &self.signer)?;
        Ok((rekey.packets, rekey.stats.bytes))
    }
}

impl Request {
    pub(crate) fn member(&self) -> MemberId {
        match self {
            Request::Join { member, .. } | Request::Leave { member } | Request::Evict { member } => *member,
        }
    }
}

/// The first record of a group that a controller takes back from distributed flat participants
/// (Caronni et al., figure 6; `distributed_flat::handback`): a snapshot whose table is `graph`
/// and whose members are `members` (member, identity), made at `now_ms` with a signing key of
/// `signing_seed`. [`Controller::restore`] starts from it; a member that joins gets its keys
/// at once, as after a lost answer.
pub fn handback_record(policy: &GroupPolicy, graph: &dyn KeyGraph, members: &[(MemberId, String)], now_ms: u64, signing_seed: [u8; 32]) -> Record {
    let mut members: Vec<(MemberId, String, u64)> = members.iter().map(|(m, identity)| (*m, identity.clone(), 0)).collect();
    members.sort_unstable();
    let (group_ref, group_key) = graph.group_key();
    Record::Snapshot(Box::new(Snapshot {
        created_ms: now_ms,
        signing_seed: Zeroizing::new(signing_seed),
        signer_changes: 0,
        fixed: policy.fixed(),
        next_member: members.last().map_or(1, |(m, _, _)| m.0 + 1),
        epoch: 0,
        rekey_seq: 0,
        members,
        group_keys: vec![(0, group_ref, 0, group_key.clone())],
        revoked: BTreeSet::new(),
        acl_added: BTreeSet::new(),
        acl_removed: BTreeSet::new(),
        pending: Vec::new(),
        last_rekey: Vec::new(),
        graph: graph.export(),
        merged: None,
        switched: None,
    }))
}
