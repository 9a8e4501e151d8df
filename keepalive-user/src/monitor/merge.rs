//! Puts the records of the per-CPU event rings back in kernel time order
//! (`ts_ns`, stamped just before each record is submitted), holding back
//! the newest until every ring has been read past them.
//!
//! Each CPU writes its own ring, so the reader sees one stream per CPU.
//! Within a ring, records are nearly in time order: a program interrupted
//! between its reserve and its submit by another program on the same CPU
//! (a softirq over a process-context hook) is stamped after the
//! interrupting one though it sits before it in the ring. Across rings, a
//! record stamped at `t` can still be unread when another ring's records
//! after `t` are: it may sit behind a record whose program is still
//! running (the kernel's reader stops at a reserved, unsubmitted record).
//! So a record is released only once every ring was read empty by a pass
//! that started at least [`MARGIN_NS`] after it was stamped: by then any
//! record stamped before it has been read, unless a program on some CPU
//! spent longer than that between reserve and submit.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use keepalive_common::RawEvent;

/// How long a record may take from reserve to submit, interruptions
/// included, and still come out in order. A program cannot be preempted
/// (tracepoints run with preemption off), only interrupted: a hard
/// interrupt and the softirq work run on its exit, which the kernel bounds
/// at about 2 ms (`MAX_SOFTIRQ_TIME`, `netdev_budget_usecs`) before
/// handing the rest to ksoftirqd. The reader wakes every 20 ms anyway;
/// this delays a record by at most the margin more.
pub(super) const MARGIN_NS: u64 = 10_000_000;

/// The records read from every ring and not yet released.
pub(super) struct Merge {
    /// Per ring, in `ts_ns` order (ties in ring order).
    rings: Vec<VecDeque<RawEvent>>,
    /// Per ring, the start of the last pass that read it empty (CLOCK_MONOTONIC
    /// ns): every record submitted before then has been read.
    read_to: Vec<u64>,
    margin_ns: u64,
}

impl Merge {
    pub(super) fn new(rings: usize, margin_ns: u64) -> Merge {
        Merge {
            rings: (0..rings).map(|_| VecDeque::new()).collect(),
            read_to: vec![0; rings],
            margin_ns,
        }
    }

    /// A ring added after the start (a CPU brought online): it is the last
    /// one, and nothing is released until it was read empty once (its
    /// records before that pass are all stamped after the pass started).
    pub(super) fn add_ring(&mut self) {
        self.rings.push(VecDeque::new());
        self.read_to.push(0);
    }

    /// A record read from ring `ring`, in the ring's order. It goes after
    /// every held record of its ring stamped no later (usually the last:
    /// the scan from the back is short).
    pub(super) fn push(&mut self, ring: usize, ev: RawEvent) {
        let q = &mut self.rings[ring];
        let mut at = q.len();
        while at > 0 && q[at - 1].ts_ns > ev.ts_ns {
            at -= 1;
        }
        q.insert(at, ev);
    }

    /// Ring `ring` read empty by a pass that started at `pass_ns`.
    pub(super) fn read_empty(&mut self, ring: usize, pass_ns: u64) {
        let t = &mut self.read_to[ring];
        *t = (*t).max(pass_ns);
    }

    /// Records stamped up to here may be released: every ring was read
    /// empty at least the margin after it.
    pub(super) fn watermark(&self) -> u64 {
        let read = self.read_to.iter().copied().min().unwrap_or(u64::MAX);
        read.saturating_sub(self.margin_ns)
    }

    /// The oldest held record's stamp.
    #[cfg(test)]
    fn oldest(&self) -> Option<u64> {
        self.rings
            .iter()
            .filter_map(|q| q.front().map(|e| e.ts_ns))
            .min()
    }

    /// Records held.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.rings.iter().map(VecDeque::len).sum()
    }

    /// Moves the held records stamped at or before `upto` into `out`, in
    /// time order (ties in ring order, then ring number), until `out` holds
    /// `cap` records; returns how many moved.
    pub(super) fn release(&mut self, upto: u64, out: &mut Vec<RawEvent>, cap: usize) -> usize {
        let start = out.len();
        // The rings' first records, smallest stamp on top.
        let mut fronts: BinaryHeap<Reverse<(u64, usize)>> = self
            .rings
            .iter()
            .enumerate()
            .filter_map(|(i, q)| q.front().map(|e| Reverse((e.ts_ns, i))))
            .filter(|Reverse((ts, _))| *ts <= upto)
            .collect();
        while out.len() < cap
            && let Some(Reverse((_, i))) = fronts.pop()
        {
            let q = &mut self.rings[i];
            if let Some(ev) = q.pop_front() {
                out.push(ev);
            }
            if let Some(next) = q.front()
                && next.ts_ns <= upto
            {
                fronts.push(Reverse((next.ts_ns, i)));
            }
        }
        out.len() - start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(ts_ns: u64, cookie: u64) -> RawEvent {
        RawEvent {
            ts_ns,
            cookie,
            ..RawEvent::default()
        }
    }

    fn stamps(evs: &[RawEvent]) -> Vec<(u64, u64)> {
        evs.iter().map(|e| (e.ts_ns, e.cookie)).collect()
    }

    #[test]
    fn rings_read_out_of_order_come_out_in_time_order() {
        let mut m = Merge::new(3, 0);
        // Ring 0 was interrupted: its record stamped 40 sits before the
        // interrupting program's 30.
        for (r, ts) in [(0, 10), (0, 40), (0, 30), (1, 20), (1, 50), (2, 5), (2, 45)] {
            m.push(r, ev(ts, r as u64));
        }
        for r in 0..3 {
            m.read_empty(r, 100);
        }
        let mut out = Vec::new();
        assert_eq!(m.release(m.watermark(), &mut out, usize::MAX), 7);
        assert_eq!(
            stamps(&out),
            [(5, 2), (10, 0), (20, 1), (30, 0), (40, 0), (45, 2), (50, 1)]
        );
        assert_eq!(m.len(), 0);
        assert_eq!(m.oldest(), None);
    }

    #[test]
    fn an_added_ring_holds_everything_back_until_it_was_read_empty() {
        let mut m = Merge::new(1, 0);
        m.push(0, ev(10, 1));
        m.read_empty(0, 100);
        // A CPU came online: its ring is read from the next pass on.
        m.add_ring();
        m.push(1, ev(60, 2));
        let mut out = Vec::new();
        assert_eq!(m.watermark(), 0);
        assert_eq!(m.release(m.watermark(), &mut out, usize::MAX), 0);
        m.read_empty(1, 90);
        m.push(0, ev(70, 3));
        m.read_empty(0, 200);
        assert_eq!(m.release(m.watermark(), &mut out, usize::MAX), 3);
        assert_eq!(stamps(&out), [(10, 1), (60, 2), (70, 3)]);
    }

    #[test]
    fn equal_stamps_keep_ring_order_then_ring_number() {
        let mut m = Merge::new(2, 0);
        m.push(1, ev(7, 10));
        m.push(1, ev(7, 11));
        m.push(0, ev(7, 20));
        m.push(0, ev(7, 21));
        let mut out = Vec::new();
        m.release(u64::MAX, &mut out, usize::MAX);
        assert_eq!(stamps(&out), [(7, 20), (7, 21), (7, 10), (7, 11)]);
    }

    #[test]
    fn records_newer_than_the_slowest_ring_minus_the_margin_are_held() {
        let mut m = Merge::new(2, 100);
        m.push(0, ev(1_000, 1));
        m.push(0, ev(1_500, 2));
        m.push(1, ev(1_200, 3));
        // Ring 1 was never read empty: nothing can go, whatever ring 0 says.
        m.read_empty(0, 5_000);
        assert_eq!(m.watermark(), 0);
        let mut out = Vec::new();
        assert_eq!(m.release(m.watermark(), &mut out, usize::MAX), 0);
        // Ring 1 read empty at 1,400: up to 1,300 may go.
        m.read_empty(1, 1_400);
        assert_eq!(m.watermark(), 1_300);
        assert_eq!(m.release(m.watermark(), &mut out, usize::MAX), 2);
        assert_eq!(stamps(&out), [(1_000, 1), (1_200, 3)]);
        assert_eq!(m.oldest(), Some(1_500));
        // A record of ring 1 stamped before the held one (it sat behind a
        // program still running at the last pass) still comes first.
        m.push(1, ev(1_450, 4));
        m.read_empty(1, 1_700);
        out.clear();
        assert_eq!(m.release(m.watermark(), &mut out, usize::MAX), 2);
        assert_eq!(stamps(&out), [(1_450, 4), (1_500, 2)]);
    }

    #[test]
    fn a_pass_that_read_less_does_not_move_a_ring_back() {
        let mut m = Merge::new(1, 0);
        m.read_empty(0, 900);
        m.read_empty(0, 800);
        assert_eq!(m.watermark(), 900);
    }

    #[test]
    fn flush_and_finish_release_everything_up_to_their_bound() {
        let mut m = Merge::new(2, 1_000_000);
        for (r, ts) in [(0, 100), (1, 90), (0, 300), (1, 200)] {
            m.push(r, ev(ts, 0));
        }
        m.read_empty(0, 250);
        m.read_empty(1, 250);
        // The margin holds everything back...
        let mut out = Vec::new();
        assert_eq!(m.release(m.watermark(), &mut out, usize::MAX), 0);
        // ...a flush asked at 250 takes all stamped up to then...
        assert_eq!(m.release(250, &mut out, usize::MAX), 3);
        assert_eq!(stamps(&out), [(90, 0), (100, 0), (200, 0)]);
        // ...and the end takes the rest.
        out.clear();
        assert_eq!(m.release(u64::MAX, &mut out, usize::MAX), 1);
        assert_eq!(stamps(&out), [(300, 0)]);
        assert_eq!(m.len(), 0);
    }

    #[test]
    fn a_release_stops_at_the_cap_and_resumes_in_order() {
        let mut m = Merge::new(2, 0);
        for i in 0..10u64 {
            m.push((i % 2) as usize, ev(i, i));
        }
        let mut out = Vec::new();
        assert_eq!(m.release(u64::MAX, &mut out, 4), 4);
        assert_eq!(m.release(u64::MAX, &mut out, 4), 0, "out is full");
        let mut rest = Vec::new();
        assert_eq!(m.release(u64::MAX, &mut rest, 100), 6);
        out.extend(rest);
        assert_eq!(
            out.iter().map(|e| e.ts_ns).collect::<Vec<_>>(),
            (0..10).collect::<Vec<_>>()
        );
    }

    #[test]
    fn no_rings_hold_nothing() {
        let m = Merge::new(0, 5);
        assert_eq!(m.watermark(), u64::MAX - 5);
        assert_eq!(m.oldest(), None);
    }
}
