//! Heartbeats on their own clock. What a heartbeat says changes only when the controller does
//! (a batch, a new signing key); between changes it follows from the time alone. So a driver
//! can hand the heartbeats to a timer of their own, fed with each change, and they leave on
//! time while the controller spends tens of milliseconds on a rekey at a million members.

use std::sync::Arc;

use crate::key::KeyRef;
use crate::wire::heartbeat::{Heartbeat, PendingKey};
use crate::wire::{GroupId, Signer};
use crate::wrap::{KeyCheck, CHECK_LEN};

/// Heartbeats that repeat each announcement (a signing-key change, a scheme switch, a merge
/// notice).
const ANNOUNCEMENT_REPEATS: u32 = 16;
/// Announcements the heartbeats carry at most: the newest, oldest first (a member takes them
/// in the order they were signed, each under the key the one before installed).
pub const MAX_ANNOUNCEMENTS: usize = 4;

/// Intervals without a step after which heartbeats sent apart from the controller stop: fewer
/// than the three of a standby's alive alarm, so a frozen controller is replaced.
const IDLE_INTERVALS: u64 = 2;
/// How long one step may run with heartbeats still leaving (a slow fsync, a huge rekey): past
/// it, the step counts as stuck.
const STUCK_STEP_MS: u64 = 5_000;

/// Whether heartbeats sent on a timer apart from the controller still speak for it. They are
/// its liveness (members and standbys act on their silence), so they stop when it stops:
/// `last_step_ms` is when its driver last finished a step, `step_since_ms` when the step under
/// way began, if one is. A long step keeps them going (up to a bound); a frozen driver that
/// runs no step at all does not.
pub fn controller_alive(now_ms: u64, heartbeat_ms: u64, last_step_ms: u64, step_since_ms: Option<u64>) -> bool {
    match step_since_ms {
        Some(since) => now_ms.saturating_sub(since) <= STUCK_STEP_MS.max(IDLE_INTERVALS * heartbeat_ms),
        None => now_ms.saturating_sub(last_step_ms) <= IDLE_INTERVALS * heartbeat_ms,
    }
}

/// What the controller's heartbeats say until its state changes again.
#[derive(Clone)]
pub struct HeartbeatContent {
    pub(crate) group: GroupId,
    pub(crate) created_ms: u64,
    pub(crate) epoch_ms: u64,
    pub(crate) heartbeat_ms: u64,
    /// The last epoch the controller closed: heartbeats name no later one, so none says an
    /// epoch has begun before its batch went out (a member that joined in that batch would
    /// take the heartbeat's older rekey seq for a contradiction).
    pub(crate) epoch: u64,
    pub(crate) rekey_seq: u64,
    pub(crate) group_size: u64,
    /// The group keys from the one in force when this was made on, oldest first: ref,
    /// activation epoch and key check (the keys themselves stay with the controller).
    pub(crate) keys: Vec<(KeyRef, u64, KeyCheck)>,
    pub(crate) signer: Arc<Signer>,
    /// The latest public notices (signing-key changes, scheme switches, a merge notice),
    /// oldest first, at most [`MAX_ANNOUNCEMENTS`]: each signed by the key in force when it
    /// was made.
    pub(crate) announcements: Vec<Arc<Vec<u8>>>,
    /// A notice every heartbeat carries once its repeats are over, for as long as it stands:
    /// the merge notice of a controller whose group was absorbed (a member that was away
    /// longer than the repeats would otherwise follow a controller that serves it no more).
    pub(crate) standing: Option<Arc<Vec<u8>>>,
}

impl core::fmt::Debug for HeartbeatContent {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("HeartbeatContent")
            .field("group", &self.group)
            .field("epoch", &self.epoch)
            .field("rekey_seq", &self.rekey_seq)
            .field("group_size", &self.group_size)
            .field("keys", &self.keys.iter().map(|(r, a, _)| (*r, *a)).collect::<Vec<_>>())
            .field("signer", &self.signer)
            .finish_non_exhaustive()
    }
}

/// The epoch at `now_ms` of a group created at `created_ms` (epochs count from 1).
pub(crate) fn epoch_at(created_ms: u64, epoch_ms: u64, now_ms: u64) -> u64 {
    now_ms.saturating_sub(created_ms) / epoch_ms.max(1) + 1
}

impl HeartbeatContent {
    /// When `epoch` begins (the inverse of `epoch_at`).
    fn epoch_start_ms(&self, epoch: u64) -> u64 {
        self.created_ms.saturating_add(epoch.saturating_sub(1).saturating_mul(self.epoch_ms.max(1)))
    }

    /// The heartbeat of `now_ms` (unsigned), numbered `seq`.
    fn heartbeat(&self, now_ms: u64, seq: u64) -> Heartbeat {
        let epoch = epoch_at(self.created_ms, self.epoch_ms, now_ms).min(self.epoch);
        let (active, _, active_check) = *self.keys.iter().rev().find(|(_, a, _)| *a <= epoch).unwrap_or(&self.keys[0]);
        let newest = self.keys.last().filter(|(_, activation, _)| *activation > epoch);
        let pending = newest.map(|(key, activation, _)| PendingKey { key: *key, activation: *activation });
        Heartbeat {
            group: self.group,
            epoch,
            seq,
            rekey_seq: self.rekey_seq,
            active,
            active_check,
            pending,
            pending_check: newest.map_or([0; CHECK_LEN], |(_, _, check)| *check),
            group_size: self.group_size,
            sent_ms: now_ms,
            activates_in_ms: pending.map_or(0, |p| self.epoch_start_ms(p.activation).saturating_sub(now_ms).min(u64::from(u32::MAX)) as u32),
        }
    }
}

/// The heartbeats' own state: their sequence numbers, when the next is due and how many more
/// times each announcement goes out with them.
#[derive(Clone, Debug)]
pub struct Heartbeats {
    content: HeartbeatContent,
    seq: u64,
    next_ms: u64,
    /// Repeats left of each of `content.announcements`, in the same order.
    repeats_left: Vec<u32>,
    /// A change is on its way to the wire: no heartbeat until its content comes.
    held: bool,
}

impl Heartbeats {
    /// Heartbeats starting at `now_ms` (the first is due at once).
    pub fn new(content: HeartbeatContent, now_ms: u64) -> Self {
        let repeats_left = vec![ANNOUNCEMENT_REPEATS; content.announcements.len()];
        Heartbeats { content, seq: 0, next_ms: now_ms, repeats_left, held: false }
    }

    /// Holds the heartbeats while a change's datagrams go out: one that named the state before
    /// would contradict the change at members that have it, one that named the change would
    /// send members after packets still on their way.
    pub fn hold(&mut self) {
        self.held = true;
    }

    pub fn held(&self) -> bool {
        self.held
    }

    /// Takes the controller's changed state (and ends a hold); a new announcement goes out
    /// with the next heartbeats, its full repeats, beside those still repeating.
    pub fn update(&mut self, content: HeartbeatContent) {
        self.held = false;
        let known = |a: &Arc<Vec<u8>>| self.content.announcements.iter().position(|b| Arc::ptr_eq(a, b) || a == b);
        self.repeats_left = content.announcements.iter().map(|a| known(a).map_or(ANNOUNCEMENT_REPEATS, |i| self.repeats_left[i])).collect();
        self.content = content;
    }

    pub fn interval_ms(&self) -> u64 {
        self.content.heartbeat_ms
    }

    /// When the next heartbeat is due.
    pub fn next_ms(&self) -> u64 {
        self.next_ms
    }

    /// The datagrams to multicast at `now_ms` if a heartbeat is due and not held (none
    /// otherwise): each announcement still repeating, oldest first, then the signed heartbeat.
    pub fn beat(&mut self, now_ms: u64) -> Vec<Vec<u8>> {
        if now_ms < self.next_ms || self.held {
            return Vec::new();
        }
        // The clock's milliseconds: a restart, even from an older copy of the log, never
        // repeats a seq members have seen (a log could not promise that).
        self.seq = (self.seq + 1).max(now_ms);
        self.next_ms = now_ms + self.content.heartbeat_ms;
        let mut out = Vec::with_capacity(1 + self.repeats_left.len());
        // A member that lost an announcement hears it again here, after those before it.
        for (announcement, left) in self.content.announcements.iter().zip(&mut self.repeats_left).filter(|(_, left)| **left > 0) {
            out.push(announcement.to_vec());
            *left -= 1;
        }
        if let Some(standing) = self.content.standing.as_ref().filter(|s| !out.iter().any(|sent| sent == s.as_ref())) {
            out.push(standing.to_vec());
        }
        out.push(self.content.heartbeat(now_ms, self.seq).sign(&self.content.signer).encode());
        out
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{controller_alive, HeartbeatContent, Heartbeats, ANNOUNCEMENT_REPEATS, MAX_ANNOUNCEMENTS};
    use crate::key::{Key, KeyId, KeyRef};
    use crate::wire::{GroupId, Signer};
    use crate::wrap::key_check;

    fn content(announcements: &[&[u8]]) -> HeartbeatContent {
        let key_ref = KeyRef::new(KeyId(1), 1, 0);
        HeartbeatContent {
            group: GroupId(1),
            created_ms: 0,
            epoch_ms: 1_000,
            heartbeat_ms: 100,
            epoch: 1,
            rekey_seq: 1,
            group_size: 2,
            keys: vec![(key_ref, 1, key_check(&Key::from_bytes([7; 32]), key_ref))],
            signer: Arc::new(Signer::from_seed(&[1; 32])),
            announcements: announcements.iter().map(|a| Arc::new(a.to_vec())).collect(),
            standing: None,
        }
    }

    /// The announcements a heartbeat at `now_ms` carries (everything before the heartbeat).
    fn carried(heartbeats: &mut Heartbeats, now_ms: u64) -> Vec<Vec<u8>> {
        let mut out = heartbeats.beat(now_ms);
        out.pop().expect("the heartbeat itself");
        out
    }

    #[test]
    fn a_standing_notice_goes_with_every_heartbeat_once_and_for_as_long_as_it_stands() {
        let mut standing = content(&[b"merge notice"]);
        standing.standing = Some(Arc::new(b"merge notice".to_vec()));
        let mut heartbeats = Heartbeats::new(standing.clone(), 0);
        for beat in 0..u64::from(ANNOUNCEMENT_REPEATS) + 40 {
            assert_eq!(carried(&mut heartbeats, beat * 100), vec![b"merge notice".to_vec()], "heartbeat {beat}: once, repeats or not");
        }
        let mut resumed = standing;
        (resumed.announcements, resumed.standing) = (Vec::new(), None);
        heartbeats.update(resumed);
        assert!(carried(&mut heartbeats, 10_000).is_empty(), "the notice stands no more");
    }

    #[test]
    fn each_announcement_gets_its_own_repeats_oldest_first() {
        let mut heartbeats = Heartbeats::new(content(&[b"signer change"]), 0);
        assert_eq!(carried(&mut heartbeats, 0), vec![b"signer change".to_vec()]);
        // A switch two heartbeats later: both go out, the older first, each for its own 16.
        heartbeats.update(content(&[b"signer change"]));
        carried(&mut heartbeats, 100);
        heartbeats.update(content(&[b"signer change", b"switch"]));
        let mut both = 0;
        for beat in 2..2 + u64::from(ANNOUNCEMENT_REPEATS) {
            let sent = carried(&mut heartbeats, beat * 100);
            if sent.len() == 2 {
                assert_eq!(sent, vec![b"signer change".to_vec(), b"switch".to_vec()]);
                both += 1;
            } else {
                assert_eq!(sent, vec![b"switch".to_vec()]);
            }
        }
        assert_eq!(both, ANNOUNCEMENT_REPEATS - 2, "the signer change keeps the repeats it had left");
        assert!(carried(&mut heartbeats, 1_800).is_empty(), "the switch had its 16 repeats");
    }

    #[test]
    fn the_controller_keeps_at_most_the_newest_announcements() {
        use crate::graph::{GraphConfig, JoinPolicy, Scheme};
        use crate::protocol::controller::{Controller, GroupPolicy, Output};
        let policy = GroupPolicy {
            group: GroupId(1),
            graph: GraphConfig { scheme: Scheme::Tree { degree: 2 }, join_policy: JoinPolicy::NewVersion },
            epoch_ms: 1_000,
            activation_delay: 1,
            heartbeat_ms: 100,
            refresh_timeout_ms: 60_000,
            immediate_eviction: false,
            membership_deltas: false,
            reflector: false,
            packets: Default::default(),
        };
        let (mut controller, _) = Controller::create(policy, Default::default(), 0, [1; 32], [2; 32]).unwrap();
        let mut changes = Vec::new();
        for i in 0..MAX_ANNOUNCEMENTS as u8 + 2 {
            match controller.rotate_signing_key([10 + i; 32]).pop() {
                Some(Output::Multicast(announcement)) => changes.push(announcement),
                other => panic!("a rotation ends with its announcement: {other:?}"),
            }
        }
        let mut heartbeats = controller.hand_over_heartbeats().unwrap();
        heartbeats.update(controller.heartbeat_content());
        assert_eq!(carried(&mut heartbeats, 0), changes[2..], "the newest four, oldest first");
    }

    #[test]
    fn heartbeats_speak_for_a_controller_only_while_it_steps() {
        // Idle between steps: two intervals, then silence (a standby's alarm is three).
        assert!(controller_alive(1_200, 100, 1_000, None));
        assert!(!controller_alive(1_201, 100, 1_000, None));
        // In a long step (a slow fsync): up to five seconds, then the step counts as stuck.
        assert!(controller_alive(5_900, 100, 0, Some(1_000)));
        assert!(!controller_alive(6_001, 100, 0, Some(1_000)));
    }
}
