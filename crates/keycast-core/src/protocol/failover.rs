//! A standby relay's decisions (the GSM paper's fail-over), sans-IO: when to raise the alive
//! alarm, when to take over the subgroup, and when to stand down. Time is an input.
//!
//! Standbys are ordered by registration number (1 is first in line). Each watches the active
//! relay's heartbeats; after three silent heartbeat intervals (the alive alarm) standby `r`
//! waits `(r - 1) * back_off_ms` and takes over unless it hears an active relay meanwhile (a
//! standby before it in line took over first): then it stands down and watches the new one.
//!
//! The take-over is announced by the new controller's heartbeats on the subgroup's channel. An
//! active relay that was cut off for as long as the alive alarm (paused, or not hearing its
//! parent) and then hears heartbeats for its subgroup that its own controller did not sign has
//! been replaced: it steps down (`IncumbentGuard`), so two controllers never keep serving one
//! subgroup. Silence counts as the members see it too: a gap in the relay's own heartbeats.

/// Heartbeat intervals without a heartbeat before the alive alarm (as members count them).
pub const SILENT_INTERVALS: u64 = 3;

/// A standby's place in line and its clocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StandbyPolicy {
    /// Registration number: 1 takes over first.
    pub registration: u32,
    /// The subgroup's heartbeat interval.
    pub heartbeat_ms: u64,
    /// Wait per place in line after the alarm: long enough for the standby before to take
    /// over and be heard (its controller's start, one epoch for a join, a heartbeat).
    pub back_off_ms: u64,
}

impl StandbyPolicy {
    fn alarm_after_ms(&self) -> u64 {
        SILENT_INTERVALS * self.heartbeat_ms
    }

    fn back_off_for_rank_ms(&self) -> u64 {
        u64::from(self.registration.saturating_sub(1)).saturating_mul(self.back_off_ms)
    }
}

/// What the driver must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StandbyDecision {
    /// The active relay is silent: waiting out this standby's back-off.
    Alarm { take_over_at_ms: u64 },
    /// Become the active relay: join the parent, start a fresh controller, announce.
    TakeOver,
    /// Another relay is active again: keep watching it.
    StandDown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StandbyState {
    /// The active relay was last heard at `last_heard_ms`.
    Watching { last_heard_ms: u64 },
    /// The alarm went off; this standby takes over at `take_over_at_ms` unless it hears a
    /// relay after `last_heard_ms`.
    Alarmed { last_heard_ms: u64, take_over_at_ms: u64 },
    /// This standby is the active relay now.
    Active,
}

/// One standby's watch over the active relay of its subgroup.
#[derive(Clone, Debug)]
pub struct StandbyWatch {
    policy: StandbyPolicy,
    state: StandbyState,
}

impl StandbyWatch {
    /// Starts watching; the active relay counts as heard at `now_ms` (the standby just joined it).
    pub fn new(policy: StandbyPolicy, now_ms: u64) -> StandbyWatch {
        StandbyWatch { policy, state: StandbyState::Watching { last_heard_ms: now_ms } }
    }

    pub fn state(&self) -> StandbyState {
        self.state
    }

    pub fn policy(&self) -> StandbyPolicy {
        self.policy
    }

    /// A verified heartbeat (or an accepted join) from the active relay at `heard_ms`; a time
    /// not after the last one heard changes nothing (drivers may report the same one again).
    pub fn heard_active(&mut self, heard_ms: u64) -> Option<StandbyDecision> {
        match self.state {
            StandbyState::Watching { last_heard_ms } => {
                self.state = StandbyState::Watching { last_heard_ms: last_heard_ms.max(heard_ms) };
                None
            }
            StandbyState::Alarmed { last_heard_ms, .. } if heard_ms > last_heard_ms => {
                self.state = StandbyState::Watching { last_heard_ms: heard_ms };
                Some(StandbyDecision::StandDown)
            }
            StandbyState::Alarmed { .. } | StandbyState::Active => None,
        }
    }

    /// Advances time: raises the alarm after the silence, takes over after the back-off.
    pub fn tick(&mut self, now_ms: u64) -> Option<StandbyDecision> {
        match self.state {
            StandbyState::Watching { last_heard_ms } if now_ms.saturating_sub(last_heard_ms) > self.policy.alarm_after_ms() => {
                let take_over_at_ms = now_ms.saturating_add(self.policy.back_off_for_rank_ms());
                self.state = StandbyState::Alarmed { last_heard_ms, take_over_at_ms };
                Some(StandbyDecision::Alarm { take_over_at_ms })
            }
            StandbyState::Alarmed { take_over_at_ms, .. } if now_ms >= take_over_at_ms => {
                self.state = StandbyState::Active;
                Some(StandbyDecision::TakeOver)
            }
            _ => None,
        }
    }

    /// The take-over failed (the parent refused, a port was taken): watch again from `now_ms`,
    /// so the alarm rings again after another silence.
    pub fn take_over_failed(&mut self, now_ms: u64) {
        if self.state == StandbyState::Active {
            self.state = StandbyState::Watching { last_heard_ms: now_ms };
        }
    }
}

/// Heartbeat intervals after a relay's silence during which another controller's heartbeat
/// means it was replaced (long enough for the standby's next heartbeats, and those that
/// waited in the socket while the relay was paused).
pub const REPLACED_WINDOW_INTERVALS: u64 = 10;

/// What an active relay must do about another controller of its subgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IncumbentDecision {
    /// A standby took over while this relay was cut off: stop the subgroup's controller and
    /// leave the parent group.
    StepDown,
    /// Another controller's heartbeat without a silence of this relay: not proof of a take-over
    /// (anyone on the channel can send one); the operator is told, once per window.
    Conflict,
}

/// An active relay's guard against a second active relay of its subgroup. Time is an input;
/// the driver reports when it ran and when it last heard its parent, and the heartbeats of
/// its subgroup that its controller did not sign.
#[derive(Clone, Debug)]
pub struct IncumbentGuard {
    heartbeat_ms: u64,
    last_ran_ms: u64,
    /// Until when another controller's heartbeat means this relay was replaced.
    replaced_until_ms: Option<u64>,
    /// Until when a conflict is not reported again.
    quiet_until_ms: u64,
}

impl IncumbentGuard {
    pub fn new(heartbeat_ms: u64, now_ms: u64) -> IncumbentGuard {
        IncumbentGuard { heartbeat_ms, last_ran_ms: now_ms, replaced_until_ms: None, quiet_until_ms: 0 }
    }

    fn window_ms(&self) -> u64 {
        REPLACED_WINDOW_INTERVALS * self.heartbeat_ms
    }

    /// The relay was silent from `from_ms` to `to_ms` (its driver did not run, it did not hear
    /// its parent, or its own heartbeats did not come): longer than the alive alarm, its
    /// standbys may have taken over.
    pub fn silent(&mut self, from_ms: u64, to_ms: u64) {
        if to_ms.saturating_sub(from_ms) > SILENT_INTERVALS * self.heartbeat_ms {
            let until = to_ms.saturating_add(self.window_ms());
            self.replaced_until_ms = Some(self.replaced_until_ms.map_or(until, |u| u.max(until)));
        }
    }

    /// The driver runs at `now_ms` (at least every heartbeat interval): a gap since its last
    /// run is a silence (a paused process).
    pub fn ran(&mut self, now_ms: u64) {
        let last = self.last_ran_ms;
        self.last_ran_ms = last.max(now_ms);
        self.silent(last, now_ms);
    }

    /// A heartbeat for this subgroup that this relay's controller did not sign, at `now_ms`,
    /// from a controller created after this relay's (`newer`: a lower epoch number at the same
    /// time; epochs have one length in a group). Only a newer one can be the relay that
    /// replaced this one: should both have been silent, only the older steps down.
    pub fn foreign_heartbeat(&mut self, now_ms: u64, newer: bool) -> Option<IncumbentDecision> {
        self.ran(now_ms);
        if newer && self.replaced_until_ms.is_some_and(|until| now_ms <= until) {
            return Some(IncumbentDecision::StepDown);
        }
        if now_ms < self.quiet_until_ms {
            return None;
        }
        self.quiet_until_ms = now_ms.saturating_add(self.window_ms());
        Some(IncumbentDecision::Conflict)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standby(registration: u32) -> StandbyWatch {
        StandbyWatch::new(StandbyPolicy { registration, heartbeat_ms: 100, back_off_ms: 1000 }, 0)
    }

    #[test]
    fn heartbeats_keep_the_alarm_off_and_three_silent_intervals_raise_it() {
        let mut watch = standby(1);
        for at in (50..=1000).step_by(50) {
            watch.heard_active(at);
            assert_eq!(watch.tick(at + 99), None, "heard {at}");
        }
        assert_eq!(watch.tick(1300), None, "exactly three intervals is not yet silence");
        assert_eq!(watch.tick(1301), Some(StandbyDecision::Alarm { take_over_at_ms: 1301 }));
        assert_eq!(watch.tick(1301), Some(StandbyDecision::TakeOver), "the first in line takes over at once");
        assert_eq!(watch.state(), StandbyState::Active);
        assert_eq!(watch.tick(99_999), None);
        assert_eq!(watch.heard_active(99_999), None, "an active relay does not stand down on its own heartbeats");
    }

    #[test]
    fn a_later_standby_backs_off_by_its_rank_and_stands_down_when_the_first_is_heard() {
        let (mut first, mut second, mut third) = (standby(1), standby(2), standby(3));
        let alarms: Vec<_> = [&mut first, &mut second, &mut third].map(|w| w.tick(301)).into_iter().collect();
        assert_eq!(
            alarms,
            [1301 - 1000, 1301, 2301].map(|at| Some(StandbyDecision::Alarm { take_over_at_ms: at })).to_vec(),
            "back-off: 0, 1 and 2 times back_off_ms"
        );
        assert_eq!(first.tick(301), Some(StandbyDecision::TakeOver));
        assert_eq!(second.tick(1300), None, "still backing off");
        assert_eq!(second.heard_active(0), None, "the silent relay's last heartbeat again");
        // The first's heartbeats reach the others: they stand down and watch it.
        assert_eq!(second.heard_active(700), Some(StandbyDecision::StandDown));
        assert_eq!(third.heard_active(700), Some(StandbyDecision::StandDown));
        assert_eq!(second.heard_active(1200), None);
        assert_eq!(second.tick(1301), None, "no take-over after standing down");
        assert_eq!(second.state(), StandbyState::Watching { last_heard_ms: 1200 });
    }

    #[test]
    fn when_the_first_in_line_is_dead_too_the_next_takes_over_after_its_back_off() {
        let mut second = standby(2);
        assert!(matches!(second.tick(301), Some(StandbyDecision::Alarm { .. })));
        assert_eq!(second.tick(1300), None);
        assert_eq!(second.tick(1301), Some(StandbyDecision::TakeOver));
    }

    #[test]
    fn a_failed_take_over_watches_again_and_rings_after_another_silence() {
        let mut first = standby(1);
        first.tick(301);
        assert_eq!(first.tick(301), Some(StandbyDecision::TakeOver));
        first.take_over_failed(500);
        assert_eq!(first.tick(800), None);
        assert!(matches!(first.tick(801), Some(StandbyDecision::Alarm { .. })));
    }

    fn incumbent() -> IncumbentGuard {
        IncumbentGuard::new(100, 0)
    }

    #[test]
    fn a_relay_paused_longer_than_the_alarm_steps_down_on_another_controllers_heartbeat() {
        let mut guard = incumbent();
        for at in (25..=1000).step_by(25) {
            guard.ran(at);
        }
        // Paused from 1000 to 1400: longer than three heartbeat intervals.
        guard.ran(1400);
        assert_eq!(guard.foreign_heartbeat(1401, true), Some(IncumbentDecision::StepDown), "a heartbeat that waited in the socket");
        assert_eq!(guard.foreign_heartbeat(1400 + 10 * 100, true), Some(IncumbentDecision::StepDown), "the window's last moment");
    }

    #[test]
    fn a_relay_never_steps_down_for_an_older_controller() {
        let mut guard = incumbent();
        guard.ran(1400);
        assert_eq!(guard.foreign_heartbeat(1401, false), Some(IncumbentDecision::Conflict), "the relay it replaced, back too");
        assert_eq!(guard.foreign_heartbeat(1402, true), Some(IncumbentDecision::StepDown));
    }

    #[test]
    fn a_pause_no_longer_than_the_alarm_or_long_ago_is_no_proof_of_a_take_over() {
        let mut guard = incumbent();
        guard.ran(300);
        assert_eq!(guard.foreign_heartbeat(301, true), Some(IncumbentDecision::Conflict), "300 ms is not yet silence");
        assert_eq!(guard.foreign_heartbeat(400, true), None, "a conflict is reported once per window");
        let mut guard = incumbent();
        guard.ran(1000);
        for at in (1025..=2100).step_by(25) {
            guard.ran(at);
        }
        assert_eq!(guard.foreign_heartbeat(2101, true), Some(IncumbentDecision::Conflict), "the silence ended more than ten intervals ago");
    }

    #[test]
    fn a_relay_that_did_not_hear_its_parent_for_the_alarm_steps_down_too() {
        let mut guard = incumbent();
        for at in (25..=2000).step_by(25) {
            guard.ran(at);
        }
        guard.silent(1500, 1800);
        assert_eq!(guard.foreign_heartbeat(2000, true), Some(IncumbentDecision::Conflict), "exactly the alarm's length is not a silence");
        guard.silent(1500, 1801);
        assert_eq!(guard.foreign_heartbeat(2001, true), Some(IncumbentDecision::StepDown));
    }
}
