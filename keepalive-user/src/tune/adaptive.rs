//! Adaptive TCP_KEEPIDLE: the per-destination learner of `adaptive = {
//! min_idle, max_idle }` rules, as a pure state machine (unit-tested; the
//! tuner feeds it evidence and applies what it decides).
//!
//! After Tencent Mars's smart heartbeat: start from the safe end
//! (`min_idle`), step up carefully while probes are answered, back off on a
//! death, and settle on the longest idle known to survive, never above a
//! margin below the shortest idle known to kill.

use serde::Serialize;

/// Answered probes at the current idle before stepping up.
pub const STEP_AFTER: u32 = 2;
/// The settled idle stays at most this fraction (percent) of the shortest
/// idle seen to kill a connection.
pub const MARGIN_PCT: u32 = 80;
/// After a death, the idle stays where it settled for this many of its
/// periods before trying higher again (the path may have changed), so one
/// learned limit does not cost a death every few probes.
pub const HOLD_PERIODS: u64 = 30;

/// What was seen on a connection to the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Evidence {
    /// A keepalive probe sent after `idle_s` of silence was answered.
    Answered { idle_s: u32 },
    /// A connection silent for `idle_s` then died without an answer
    /// (unanswered probes or retransmissions, a timeout).
    Died { idle_s: u32 },
}

/// One decision to change the idle, with what it rests on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Adjustment {
    pub from_s: u32,
    pub to_s: u32,
    /// `step_up`, `back_off` or `settle`.
    pub reason: &'static str,
    #[serde(flatten)]
    pub evidence: Evidence,
    /// Longest idle known to survive, shortest known to kill.
    pub safe_s: u32,
    pub fatal_s: Option<u32>,
}

/// The state for one destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Learner {
    pub min_s: u32,
    pub max_s: u32,
    /// The idle new connections get.
    pub idle_s: u32,
    /// Longest idle a probe was answered after (0: none yet).
    pub safe_s: u32,
    /// Shortest idle a connection died after.
    pub fatal_s: Option<u32>,
    answered: u32,
    /// No stepping up before then (CLOCK_MONOTONIC ns), after a death.
    hold_until_ns: u64,
}

impl Learner {
    pub fn new(min_s: u32, max_s: u32) -> Learner {
        Learner {
            min_s,
            max_s,
            idle_s: min_s,
            safe_s: 0,
            fatal_s: None,
            answered: 0,
            hold_until_ns: 0,
        }
    }

    /// The highest idle allowed below a fatal one.
    fn ceiling(&self) -> u32 {
        match self.fatal_s {
            Some(f) => (f * MARGIN_PCT / 100).clamp(self.min_s, self.max_s),
            None => self.max_s,
        }
    }

    /// Takes in one piece of evidence, seen at `now_ns`; returns the change
    /// to make, if any.
    pub fn observe(&mut self, ev: Evidence, now_ns: u64) -> Option<Adjustment> {
        let from = self.idle_s;
        let reason;
        match ev {
            Evidence::Answered { idle_s } => {
                self.safe_s = self.safe_s.max(idle_s);
                if let Some(f) = self.fatal_s
                    && self.safe_s >= f
                {
                    // The path changed (a longer timeout now): forget the death.
                    self.fatal_s = None;
                }
                if idle_s < self.idle_s || now_ns < self.hold_until_ns {
                    return None;
                }
                self.answered += 1;
                if self.answered < STEP_AFTER {
                    return None;
                }
                self.answered = 0;
                let next = match self.fatal_s {
                    None => self.idle_s.saturating_mul(2),
                    // Halfway to the fatal idle, within the margin.
                    Some(f) => (self.idle_s + f) / 2,
                };
                self.idle_s = next.min(self.ceiling()).max(self.min_s);
                reason = "step_up";
            }
            Evidence::Died { idle_s } => {
                self.answered = 0;
                self.fatal_s = Some(self.fatal_s.map_or(idle_s, |f| f.min(idle_s)));
                if self.safe_s >= idle_s {
                    // What used to survive dies now: start over below it.
                    self.safe_s = 0;
                }
                let ceiling = self.ceiling();
                let next = if self.safe_s > 0 {
                    self.safe_s.min(ceiling)
                } else {
                    (idle_s / 2).min(ceiling)
                };
                self.idle_s = next.max(self.min_s);
                self.hold_until_ns =
                    now_ns.saturating_add(HOLD_PERIODS * u64::from(self.idle_s) * 1_000_000_000);
                reason = if self.safe_s > 0 {
                    "settle"
                } else {
                    "back_off"
                };
            }
        }
        (self.idle_s != from).then_some(Adjustment {
            from_s: from,
            to_s: self.idle_s,
            reason,
            evidence: ev,
            safe_s: self.safe_s,
            fatal_s: self.fatal_s,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Evidence::*;

    /// Feeds evidence with a clock far enough apart that no hold applies.
    trait At {
        fn see(&mut self, ev: Evidence) -> Option<Adjustment>;
    }

    impl At for Learner {
        fn see(&mut self, ev: Evidence) -> Option<Adjustment> {
            self.observe(ev, u64::MAX / 2)
        }
    }

    #[test]
    fn starts_safe_and_steps_up_after_answered_probes() {
        let mut l = Learner::new(20, 600);
        assert_eq!(l.idle_s, 20);
        assert_eq!(l.see(Answered { idle_s: 20 }), None, "one is not enough");
        let a = l.see(Answered { idle_s: 20 }).unwrap();
        assert_eq!((a.from_s, a.to_s, a.reason), (20, 40, "step_up"));
        l.see(Answered { idle_s: 40 });
        l.see(Answered { idle_s: 40 });
        assert_eq!(l.idle_s, 80);
        // Probes answered at an older, shorter idle do not count.
        assert_eq!(l.see(Answered { idle_s: 40 }), None);
        assert_eq!(l.see(Answered { idle_s: 40 }), None);
        assert_eq!(l.idle_s, 80);
    }

    #[test]
    fn never_beyond_max() {
        let mut l = Learner::new(20, 50);
        for _ in 0..10 {
            let i = l.idle_s;
            l.see(Answered { idle_s: i });
        }
        assert_eq!(l.idle_s, 50);
    }

    #[test]
    fn a_death_backs_off_below_it_and_settles_on_what_survived() {
        // A NAT that drops flows idle for more than 350 s.
        let mut l = Learner::new(20, 3600);
        let nat = 350;
        let mut deaths = 0;
        for _ in 0..40 {
            let i = l.idle_s;
            if i > nat {
                deaths += 1;
                l.see(Died { idle_s: i });
            } else {
                l.see(Answered { idle_s: i });
            }
        }
        assert!(
            l.idle_s <= nat,
            "settled at {} above the NAT's {nat}",
            l.idle_s
        );
        assert!(l.idle_s >= nat / 2, "settled too low: {}", l.idle_s);
        assert!(deaths <= 3, "{deaths} deaths to learn it");
        assert!(l.fatal_s.unwrap() > nat);
        // Stable: more answered probes keep it below the fatal margin.
        for _ in 0..10 {
            let i = l.idle_s;
            l.see(Answered { idle_s: i });
        }
        assert!(l.idle_s <= l.fatal_s.unwrap() * MARGIN_PCT / 100);
        assert!(l.idle_s <= nat);
    }

    #[test]
    fn a_first_death_with_nothing_known_halves() {
        let mut l = Learner::new(10, 600);
        let a = l.see(Died { idle_s: 100 }).unwrap();
        assert_eq!((a.from_s, a.to_s, a.reason), (10, 50, "back_off"));
        assert_eq!(a.fatal_s, Some(100));
        // Never below min.
        let mut l = Learner::new(30, 600);
        assert_eq!(l.see(Died { idle_s: 40 }), None, "30 is already the floor");
        assert_eq!(l.idle_s, 30);
    }

    #[test]
    fn a_shorter_timeout_later_is_learned_again() {
        let mut l = Learner::new(10, 600);
        l.safe_s = 200;
        l.idle_s = 200;
        let a = l.see(Died { idle_s: 200 }).unwrap();
        assert_eq!(a.to_s, 100, "what survived before dies now: back off");
        assert_eq!(l.safe_s, 0);
    }

    #[test]
    fn after_a_death_it_holds_before_trying_higher() {
        const S: u64 = 1_000_000_000;
        let mut l = Learner::new(1, 60);
        l.observe(Answered { idle_s: 1 }, S);
        l.observe(Answered { idle_s: 1 }, 2 * S);
        l.observe(Answered { idle_s: 2 }, 4 * S);
        l.observe(Answered { idle_s: 2 }, 6 * S);
        assert_eq!(l.idle_s, 4);
        let a = l.observe(Died { idle_s: 4 }, 10 * S).unwrap();
        assert_eq!((a.to_s, a.reason), (2, "settle"));
        // Answered probes at the settled idle, but within the hold.
        let hold_end = 10 * S + HOLD_PERIODS * 2 * S;
        for t in [11, 13, 15, 30] {
            assert_eq!(l.observe(Answered { idle_s: 2 }, t * S), None);
        }
        assert_eq!(l.idle_s, 2);
        // After it, halfway to the death, within the margin (3 <= 0.8 * 4).
        l.observe(Answered { idle_s: 2 }, hold_end + S);
        let a = l.observe(Answered { idle_s: 2 }, hold_end + 2 * S).unwrap();
        assert_eq!((a.from_s, a.to_s, a.reason), (2, 3, "step_up"));
    }
}
