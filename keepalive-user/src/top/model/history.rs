//! The per-second counts behind the sparklines: which event kinds are
//! counted ([`Series`]) and the sliding window of buckets ([`History`]).

use super::*;

/// The series counted per second and shown with sparklines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Series {
    Probes = 0,
    Retransmits = 1,
    Resets = 2,
    Timeouts = 3,
}

impl Series {
    pub const ALL: [Series; 4] = [
        Series::Probes,
        Series::Retransmits,
        Series::Resets,
        Series::Timeouts,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Series::Probes => "probes",
            Series::Retransmits => "retrans",
            Series::Resets => "resets",
            Series::Timeouts => "timeouts",
        }
    }

    pub(super) fn of(kind: Kind) -> Option<Series> {
        match kind {
            Kind::KeepaliveProbe => Some(Series::Probes),
            Kind::Retransmit => Some(Series::Retransmits),
            Kind::ResetSent | Kind::ResetReceived => Some(Series::Resets),
            Kind::Timeout => Some(Series::Timeouts),
            _ => None,
        }
    }
}

/// Counts per second for the last [`HISTORY_SECS`] seconds.
#[derive(Clone, Debug, Default)]
pub struct History {
    /// Second (CLOCK_MONOTONIC) of the last bucket.
    last_sec: u64,
    pub(super) buckets: VecDeque<[u32; 4]>,
}

impl History {
    /// Moves the window so that its last bucket is `sec`.
    pub fn advance(&mut self, sec: u64) {
        if self.buckets.is_empty() {
            self.last_sec = sec;
            self.buckets.push_back([0; 4]);
            return;
        }
        if sec <= self.last_sec {
            return;
        }
        let gap = (sec - self.last_sec).min(HISTORY_SECS as u64);
        for _ in 0..gap {
            self.buckets.push_back([0; 4]);
        }
        self.last_sec = sec;
        while self.buckets.len() > HISTORY_SECS {
            self.buckets.pop_front();
        }
    }

    pub fn count(&mut self, series: Series, ts_ns: u64, n: u32) {
        let sec = ts_ns / NS;
        self.advance(sec);
        let back = (self.last_sec - sec.min(self.last_sec)) as usize;
        let len = self.buckets.len();
        if back < len {
            self.buckets[len - 1 - back][series as usize] += n;
        }
    }

    /// The last `n` complete seconds of a series, oldest first (the
    /// current second is still filling).
    pub fn recent(&self, series: Series, n: usize) -> Vec<u32> {
        let complete = self.buckets.len().saturating_sub(1);
        let from = complete.saturating_sub(n);
        self.buckets
            .iter()
            .take(complete)
            .skip(from)
            .map(|b| b[series as usize])
            .collect()
    }

    /// Per second, averaged over the last [`RATE_SECS`] complete seconds.
    pub fn rate(&self, series: Series) -> f64 {
        let r = self.recent(series, RATE_SECS);
        if r.is_empty() {
            return 0.0;
        }
        r.iter().map(|&v| v as f64).sum::<f64>() / r.len() as f64
    }
}
