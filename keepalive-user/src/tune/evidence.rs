//! What one connection under an adaptive rule says about its path, from
//! the signals a real host gets: keepalive probes answered or not, the
//! kernel giving up on it (ETIMEDOUT), and retransmissions without an
//! answer after a silence. A pure state machine per connection (unit
//! tested); the tuner feeds it events and looks at the socket, and hands
//! what it concludes to the destination's [`Learner`](super::adaptive::Learner).

use super::adaptive::Evidence;
use crate::events::TimeoutCause;

/// Consecutive RTO retransmissions without an answer that count as a
/// death (about 1.4 s at the 200 ms minimum RTO, more on longer paths),
/// without waiting for tcp_retries2 (~15 min) to run out.
pub const RTX_DEATH: u32 = 3;

/// The evidence state of one connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Watch {
    /// The TCP_KEEPIDLE (s) it was given, and its probe interval (s).
    pub idle_s: u32,
    pub interval_s: u32,
    /// When its last first probe went out, while not known to be unanswered.
    probe1_ns: Option<u64>,
    /// A probe went unanswered since the last answered one.
    unanswered: bool,
    /// Retransmitting since then (a retransmit event), until a look at the
    /// socket finds it answered.
    pub rtx_since_ns: Option<u64>,
    /// The silence (s) before the send that goes unanswered, from a look.
    rtx_silence_s: Option<u32>,
    /// The connection closed then (the kernel's timeout event follows its
    /// CLOSE, so it is kept a little longer).
    pub closed_ns: Option<u64>,
    /// Its death was reported already.
    died: bool,
}

impl Watch {
    pub fn new(idle_s: u32, interval_s: u32) -> Watch {
        Watch {
            idle_s,
            interval_s,
            ..Watch::default()
        }
    }

    /// A keepalive probe went out (`probe`: 1 for the first unanswered
    /// one). A new first probe means the previous one was answered.
    pub fn probe(&mut self, probe: u32, ts_ns: u64) -> Option<Evidence> {
        if probe <= 1 {
            let answered = self.probe1_ns.is_some() && !self.unanswered;
            self.probe1_ns = Some(ts_ns);
            self.unanswered = false;
            answered.then_some(Evidence::Answered {
                idle_s: self.idle_s,
            })
        } else {
            self.probe1_ns = None;
            self.unanswered = true;
            None
        }
    }

    /// No second probe an interval (and a second) after the first: the
    /// first was answered.
    pub fn quiet(&mut self, now_ns: u64) -> Option<Evidence> {
        let at = self.probe1_ns?;
        if now_ns.saturating_sub(at) <= (u64::from(self.interval_s) + 1) * 1_000_000_000 {
            return None;
        }
        self.probe1_ns = None;
        Some(Evidence::Answered {
            idle_s: self.idle_s,
        })
    }

    /// The kernel retransmitted on it (data, while established; a FIN
    /// retransmitted after close says nothing about idle timeouts).
    pub fn retransmit(&mut self, ts_ns: u64) {
        if !self.died && self.closed_ns.is_none() {
            self.rtx_since_ns.get_or_insert(ts_ns);
        }
    }

    /// A look at the sockets did not find it: closed meanwhile.
    pub fn gone(&mut self) {
        self.rtx_since_ns = None;
    }

    /// What a look at the socket found: `retransmits` consecutive RTOs
    /// without an ACK, `silence_s` between the last thing heard from the
    /// peer and the send that is being retransmitted. Enough unanswered
    /// retransmissions after a silence of at least a second are a death at
    /// that silence; a silence under a second is a path that broke while
    /// busy, which says nothing about idle timeouts.
    pub fn looked(&mut self, retransmits: u32, silence_s: u32) -> Option<Evidence> {
        if retransmits == 0 {
            self.rtx_since_ns = None;
            self.rtx_silence_s = None;
            return None;
        }
        let silence = *self.rtx_silence_s.get_or_insert(silence_s);
        if silence == 0 || self.died {
            // Nothing more to learn from it: no more looks.
            self.rtx_since_ns = None;
            return None;
        }
        if retransmits < RTX_DEATH {
            return None;
        }
        self.died = true;
        self.rtx_since_ns = None;
        Some(Evidence::Died { idle_s: silence })
    }

    /// The kernel gave up on it (ETIMEDOUT): after unanswered keepalive
    /// probes a death at its idle; after unanswered retransmissions a
    /// death at the silence before them, if a look measured it.
    pub fn timed_out(&mut self, cause: TimeoutCause) -> Option<Evidence> {
        if self.died {
            return None;
        }
        let idle_s = if cause == TimeoutCause::Keepalive || self.unanswered {
            self.idle_s
        } else {
            self.rtx_silence_s.filter(|s| *s > 0)?
        };
        self.died = true;
        Some(Evidence::Died { idle_s })
    }
}

/// The silence before the send being retransmitted, in seconds: from the
/// last ACK received (`rcv_tstamp`) to the last new data sent
/// (`lsndtime`), both in jiffies (u32, wrapping). 0 when the ACK is newer.
pub fn silence_before_send(lsndtime: u32, rcv_tstamp: u32, hz: u64) -> u32 {
    let d = lsndtime.wrapping_sub(rcv_tstamp);
    if d > u32::MAX / 2 || hz == 0 {
        return 0;
    }
    (u64::from(d) / hz) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use Evidence::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn a_new_first_probe_or_quiet_means_the_last_was_answered() {
        let mut w = Watch::new(4, 1);
        assert_eq!(w.probe(1, 4 * S), None, "nothing known yet");
        assert_eq!(w.probe(1, 8 * S), Some(Answered { idle_s: 4 }));
        assert_eq!(w.quiet(9 * S), None, "within interval + 1 s");
        assert_eq!(w.quiet(10 * S + 1), Some(Answered { idle_s: 4 }));
        assert_eq!(w.quiet(20 * S), None, "once");
    }

    #[test]
    fn unanswered_probes_then_close_then_timeout_is_one_death_at_the_idle() {
        let mut w = Watch::new(8, 1);
        w.probe(1, 8 * S);
        w.probe(2, 9 * S);
        assert_eq!(w.quiet(20 * S), None, "the first went unanswered");
        // The kernel reports CLOSE before the timeout.
        w.closed_ns = Some(10 * S);
        assert_eq!(
            w.timed_out(TimeoutCause::Keepalive),
            Some(Died { idle_s: 8 })
        );
        assert_eq!(w.timed_out(TimeoutCause::Keepalive), None, "once");
        // A probe after unanswered ones is not an answer.
        let mut w = Watch::new(8, 1);
        w.probe(1, 8 * S);
        w.probe(2, 9 * S);
        assert_eq!(w.probe(1, 30 * S), None);
    }

    #[test]
    fn retransmissions_after_silence_die_at_the_silence() {
        let mut w = Watch::new(30, 5);
        w.retransmit(S);
        assert_eq!(w.looked(1, 12), None, "not enough yet");
        assert_eq!(w.looked(RTX_DEATH, 13), Some(Died { idle_s: 12 }));
        assert_eq!(w.rtx_since_ns, None, "no more looks");
        assert_eq!(w.looked(RTX_DEATH + 1, 12), None, "once");
        assert_eq!(w.timed_out(TimeoutCause::Retransmission), None);
        // Answered: forgotten.
        let mut w = Watch::new(30, 5);
        w.retransmit(S);
        w.looked(1, 12);
        assert_eq!(w.looked(0, 0), None);
        assert_eq!(w.rtx_since_ns, None);
        assert_eq!(w.timed_out(TimeoutCause::UserTimeout), None);
    }

    #[test]
    fn a_busy_path_that_breaks_is_not_an_idle_death() {
        let mut w = Watch::new(30, 5);
        w.retransmit(S);
        assert_eq!(w.looked(RTX_DEATH + 2, 0), None);
        assert_eq!(w.timed_out(TimeoutCause::Retransmission), None);
        // A retransmission timeout after a measured silence is one.
        let mut w = Watch::new(30, 5);
        w.looked(1, 7);
        assert_eq!(
            w.timed_out(TimeoutCause::UserTimeout),
            Some(Died { idle_s: 7 })
        );
    }

    #[test]
    fn silence_in_jiffies_across_the_wrap() {
        assert_eq!(silence_before_send(1250, 0, 250), 5);
        assert_eq!(silence_before_send(99, u32::MAX - 900, 100), 10);
        assert_eq!(silence_before_send(100, 200, 250), 0, "ACK after send");
        assert_eq!(silence_before_send(100, 0, 0), 0);
    }
}
