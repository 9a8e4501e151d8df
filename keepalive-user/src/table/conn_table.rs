//! [`ConnTable`]: the daemon's live view of every connection, seeded from
//! the socket iterator, kept current from the event stream, refreshed
//! periodically from the kernel, and judged after every change so that a
//! verdict change can be reported as it happens.
//!
//! Memory is bounded: at most `cap` live connections (the least recently
//! touched is evicted and counted) and tombstones for recently closed
//! connections expire after [`TOMBSTONE_NS`].
//!
//! A connection beyond the cap keeps only its last reported verdict (a few
//! bytes, dropped when a walk no longer finds it), and is judged from each
//! walk against it: a verdict change is reported once per real change,
//! however small the cap, instead of once per refresh for every connection
//! that did not fit.

use std::collections::HashMap;

use keepalive_common::ConnStats;

use super::packed::{Owners, Packed};
use super::verdict::{Thresholds, Verdict, judge};
use super::{
    Conn, ConnId, CookieMap, Keepalive, TCP_CLOSE, TCP_ESTABLISHED, TCP_SYN_SENT, Timer, TimerKind,
};
use crate::events::{Detail, Event, Owner};

/// How long a closed connection stays resolvable for late events.
pub const TOMBSTONE_NS: u64 = 10_000_000_000;

/// One tracked connection: boxed, so the maps' slots stay small and a
/// connection moves from live to tombstone without copying.
#[derive(Debug)]
pub(crate) struct Entry {
    conn: Packed,
    verdict: Verdict,
    touched_ns: u64,
}

/// The rows of a refresh between its two passes: cookies in walk order,
/// and the rows that did not fit in the table (rare).
#[derive(Default)]
pub struct Walked {
    order: Vec<Slot>,
}

enum Slot {
    Live(u64),
    Beyond(Box<(u64, Packed)>),
}

/// A verdict that changed, with the connection as it is now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerdictChange {
    pub conn: Conn,
    pub old: Verdict,
    pub new: Verdict,
}

pub struct ConnTable {
    live: CookieMap<Box<Entry>>,
    /// Closed connections, with the time they expire.
    tombstones: CookieMap<(Box<Entry>, u64)>,
    /// Connections beyond the cap (evicted, or found by a walk with the
    /// table full): the verdict last reported for each.
    overflow: CookieMap<Verdict>,
    cap: usize,
    thresholds: Thresholds,
    /// The owners of the last connection an event brought in: the next
    /// one is usually the same process's, and shares them.
    event_owners: Option<Owners>,
    pub evictions: u64,
}

impl ConnTable {
    pub fn new(cap: usize, thresholds: Thresholds) -> Self {
        // The table sees probes as they are sent: the newest is not
        // evidence yet, whether an event or a walk reported it.
        let thresholds = Thresholds {
            newest_probe_in_flight: true,
            ..thresholds
        };
        ConnTable {
            live: CookieMap::default(),
            tombstones: CookieMap::default(),
            overflow: CookieMap::default(),
            cap: cap.max(1),
            thresholds,
            event_owners: None,
            evictions: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    fn entry(&self, cookie: u64) -> Option<&Entry> {
        self.live
            .get(&cookie)
            .or_else(|| self.tombstones.get(&cookie).map(|(e, _)| e))
            .map(|e| &**e)
    }

    /// A live or recently closed connection.
    pub fn get(&self, cookie: u64) -> Option<Conn> {
        self.entry(cookie).map(|e| e.conn.conn(cookie))
    }

    /// The first owner of a live or recently closed connection.
    pub fn first_owner(&self, cookie: u64) -> Option<&Owner> {
        self.entry(cookie).and_then(|e| e.conn.first_owner())
    }

    pub fn verdict(&self, cookie: u64) -> Option<&Verdict> {
        self.live.get(&cookie).map(|e| &e.verdict)
    }

    /// Live connections.
    pub fn conns(&self) -> impl Iterator<Item = (Conn, &Verdict)> {
        self.live
            .iter()
            .map(|(&cookie, e)| (e.conn.conn(cookie), &e.verdict))
    }

    /// At the cap, evicts the least recently touched 1/64 of the table in
    /// one pass, so a full table costs O(1) amortised per new connection.
    fn make_room(&mut self) {
        if self.live.len() < self.cap {
            return;
        }
        let batch = (self.cap / 64).max(1).min(self.live.len());
        let mut by_age: Vec<(u64, u64)> = self
            .live
            .iter()
            .map(|(&cookie, e)| (e.touched_ns, cookie))
            .collect();
        by_age.select_nth_unstable(batch - 1);
        for &(_, cookie) in &by_age[..batch] {
            if let Some(e) = self.live.remove(&cookie) {
                self.overflow.insert(cookie, e.verdict);
            }
            self.evictions += 1;
        }
    }

    /// Connections known beyond the cap (only their verdict is kept).
    pub fn overflow_len(&self) -> usize {
        self.overflow.len()
    }

    /// Stores `conn` in `e` and judges it against the verdict last
    /// reported; returns the change, if any.
    fn store(
        e: &mut Entry,
        conn: &Conn,
        shared: Option<&Owners>,
        t: &Thresholds,
    ) -> Option<VerdictChange> {
        let shared = shared.or(e.conn.owners()).cloned();
        e.conn = Packed::new(conn, shared.as_ref());
        Self::judge_against(conn, &mut e.verdict, t)
    }

    /// Judges `conn` and records the result in `verdict`; returns it as a
    /// change when it is news.
    fn judge_against(
        conn: &Conn,
        verdict: &mut Verdict,
        thresholds: &Thresholds,
    ) -> Option<VerdictChange> {
        let new = judge(conn, thresholds);
        if new == *verdict {
            return None;
        }
        let old = std::mem::replace(verdict, new.clone());
        // Reason numbers move all the time; only a change of verdict or of
        // reason kind is news.
        if old.name() == new.name() && old.reason_code() == new.reason_code() {
            return None;
        }
        // Copied only here: most events change no verdict.
        Some(VerdictChange {
            conn: conn.clone(),
            old,
            new,
        })
    }

    /// Replaces the table with a fresh walk of the kernel's sockets.
    /// Connections the walk no longer finds have closed.
    pub fn refresh(&mut self, conns: Vec<Conn>, now_ns: u64) -> Vec<VerdictChange> {
        let mut changes = Vec::new();
        self.refresh_with(conns.into_iter().map(|c| (c, None)), now_ns, |ch, _| {
            changes.push(ch)
        });
        changes
    }

    /// [`ConnTable::refresh`] from conns whose owners are shared: each
    /// change goes to `changed` as it is found, with whether the table holds
    /// its connection as the change shows it (`get` gives it back until the
    /// next change to the table), so the caller need not keep a copy.
    pub fn refresh_with(
        &mut self,
        conns: impl IntoIterator<Item = (Conn, Option<Owners>)>,
        now_ns: u64,
        changed: impl FnMut(VerdictChange, bool),
    ) {
        let mut pass = Walked::default();
        let mut by_ino: HashMap<u64, Option<Owners>> = HashMap::new();
        for (conn, shared) in conns {
            if conn.ino != 0 {
                let owners = shared.or_else(|| {
                    (!conn.owners.is_empty()).then(|| Owners::new(conn.owners.clone()))
                });
                by_ino.insert(conn.ino, owners);
            }
            self.refresh_row(&mut pass, conn, now_ns);
        }
        self.refresh_end(
            pass,
            Some(|ino| by_ino.get(&ino).cloned().flatten()),
            now_ns,
            changed,
        );
    }

    /// A refresh, first pass: one row of the walk, as it is read. The
    /// connection goes into the table now (with the owners it had), and is
    /// judged in [`ConnTable::refresh_end`], after the owners are read:
    /// the walk keeps no copy of its rows (8 bytes a row).
    pub fn refresh_row(&mut self, pass: &mut Walked, mut conn: Conn, now_ns: u64) {
        let cookie = conn.id.cookie;
        if cookie == 0 || (!conn.full && !conn.kernel_orphan) {
            return;
        }
        if let Some(e) = self.live.get_mut(&cookie) {
            // Kernel state wins; keep what only events know. Owners: the
            // row's if it has some, else the old ones until the second pass
            // (which keeps them only where no scan can find any: inode 0).
            let old = e.conn.conn(cookie);
            conn.stats = old.stats.or(conn.stats);
            conn.timed_out = old.timed_out;
            if conn.owners.is_empty() {
                conn.owners = old.owners;
            }
            let shared = e.conn.owners().cloned();
            e.conn = Packed::new(&conn, shared.as_ref());
            e.touched_ns = now_ns;
            pass.order.push(Slot::Live(cookie));
            return;
        }
        // Not in the table: judged against what was last reported for it
        // (healthy if nothing was), so a connection that does not fit is
        // not news every walk.
        if self.live.len() >= self.cap {
            self.overflow.entry(cookie).or_insert(Verdict::Healthy);
            let row = Packed::new(&conn, None);
            pass.order.push(Slot::Beyond(Box::new((cookie, row))));
            return;
        }
        let verdict = self.overflow.remove(&cookie).unwrap_or(Verdict::Healthy);
        self.live.insert(
            cookie,
            Box::new(Entry {
                conn: Packed::new(&conn, None),
                verdict,
                touched_ns: now_ns,
            }),
        );
        pass.order.push(Slot::Live(cookie));
    }

    /// A refresh, second pass, after the walk: `owners` gives the holders
    /// of a socket inode (read after the walk, so every socket walked has
    /// its owner in /proc by then; `None`: not looked up, so the owners
    /// known stay, the `connect()` owners events bring included). Judges
    /// every row in walk order, each change to `changed` as in
    /// [`ConnTable::refresh_with`]; connections the walk did not find have
    /// closed.
    pub fn refresh_end(
        &mut self,
        pass: Walked,
        owners: Option<impl Fn(u64) -> Option<Owners>>,
        now_ns: u64,
        mut changed: impl FnMut(VerdictChange, bool),
    ) {
        let t = self.thresholds;
        let with_owners = |mut conn: Conn| {
            let Some(owners) = owners.as_ref().filter(|_| conn.ino != 0) else {
                return (conn, None);
            };
            let shared = owners(conn.ino);
            conn.owners = shared.as_deref().cloned().unwrap_or_default();
            (conn, shared)
        };
        let mut seen = Vec::with_capacity(pass.order.len());
        for slot in pass.order {
            match slot {
                Slot::Live(cookie) => {
                    seen.push(cookie);
                    let Some(e) = self.live.get_mut(&cookie) else {
                        continue;
                    };
                    let (conn, shared) = with_owners(e.conn.conn(cookie));
                    if let Some(ch) = Self::store(e, &conn, shared.as_ref(), &t) {
                        changed(ch, true);
                    }
                }
                Slot::Beyond(row) => {
                    let (cookie, row) = *row;
                    seen.push(cookie);
                    let (conn, _) = with_owners(row.conn(cookie));
                    if let Some(verdict) = self.overflow.get_mut(&cookie)
                        && let Some(ch) = Self::judge_against(&conn, verdict, &t)
                    {
                        changed(ch, false);
                    }
                }
            }
        }
        seen.sort_unstable();
        let was_seen = |c: &u64| seen.binary_search(c).is_ok();
        let gone: Vec<u64> = self.live.keys().filter(|c| !was_seen(c)).copied().collect();
        self.tombstones.retain(|_, (_, exp)| *exp > now_ns);
        for cookie in gone {
            if let Some(e) = self.live.remove(&cookie) {
                self.tombstones.insert(cookie, (e, now_ns + TOMBSTONE_NS));
            }
        }
        self.overflow.retain(|c, _| was_seen(c));
        // Capacity follows the maps down, so a burst's peak is not kept.
        shrink(&mut self.live);
        shrink(&mut self.tombstones);
        shrink(&mut self.overflow);
    }

    /// Sets the kernel-kept counters of a connection.
    pub fn set_stats(&mut self, cookie: u64, stats: ConnStats) {
        if let Some(e) = self.live.get_mut(&cookie) {
            e.conn.set_stats(stats);
        }
    }

    /// What an event alone tells of its connection.
    fn conn_from_event(ev: &Event) -> Conn {
        Conn {
            id: ConnId::of_event(ev),
            owners: ev.owner.iter().cloned().collect(),
            full: true,
            ..Conn::default()
        }
    }

    /// Applies one event; returns the verdict change it caused.
    pub fn apply(&mut self, ev: &Event, now_ns: u64) -> Option<VerdictChange> {
        if ev.cookie == 0 {
            return None;
        }
        let t = self.thresholds;
        // A closed socket that connects again (after a disconnect, with the
        // same cookie) is a new connection, with the owner of this connect().
        if matches!(ev.detail, Detail::StateChange { new, .. } if new == TCP_SYN_SENT) {
            self.tombstones.remove(&ev.cookie);
        }
        if !self.live.contains_key(&ev.cookie) {
            if let Some((e, _)) = self.tombstones.get_mut(&ev.cookie) {
                // Closed, or a walk no longer finds it. The kernel reports
                // ETIMEDOUT after it closed the socket; and the engine
                // drains the ring after a walk, which takes seconds on a
                // loaded host: probes still queued for a connection the
                // kernel has since aborted happened before the walk, and
                // the verdict they tell (dead before it timed out) is news,
                // in order. Only its state stays what was last seen.
                if matches!(ev.detail, Detail::StateChange { .. }) {
                    return None;
                }
                let mut conn = e.conn.conn(ev.cookie);
                Self::apply_detail(&mut conn, ev);
                return Self::store(e, &conn, None, &t);
            }
            // Beyond the cap: walks judge it (an event alone knows too
            // little of it, and would flap its verdict), except for the
            // kernel giving up on it, which no walk will see.
            if let Some(verdict) = self.overflow.get_mut(&ev.cookie) {
                let Detail::Timeout { cause, .. } = ev.detail else {
                    return None;
                };
                let mut conn = Self::conn_from_event(ev);
                conn.timed_out = Some(cause);
                return Self::judge_against(&conn, verdict, &t);
            }
            // A connection born after the last walk.
            self.make_room();
            let conn = Self::conn_from_event(ev);
            let shared = self.event_owners.clone();
            let conn = Packed::new(&conn, shared.as_ref());
            if conn.owners().is_some() {
                self.event_owners = conn.owners().cloned();
            }
            self.live.insert(
                ev.cookie,
                Box::new(Entry {
                    conn,
                    verdict: Verdict::Healthy,
                    touched_ns: now_ns,
                }),
            );
        }
        let e = self.live.get_mut(&ev.cookie)?;
        e.touched_ns = now_ns;
        let mut c = e.conn.conn(ev.cookie);
        Self::apply_detail(&mut c, ev);
        let change = Self::store(e, &c, None, &t);
        if let Detail::StateChange { new, .. } = ev.detail
            && new == TCP_CLOSE
            && let Some(e) = self.live.remove(&ev.cookie)
        {
            self.tombstones
                .insert(ev.cookie, (e, now_ns + TOMBSTONE_NS));
        }
        change
    }

    /// What one event tells of its connection.
    fn apply_detail(c: &mut Conn, ev: &Event) {
        if c.owners.is_empty()
            && let Some(o) = &ev.owner
        {
            c.owners.push(o.clone());
        }
        match &ev.detail {
            Detail::StateChange { new, .. } => {
                c.id.state = *new;
                if *new == TCP_ESTABLISHED {
                    c.id.sport = ev.sport;
                    c.id.saddr = Some(ev.saddr);
                }
            }
            Detail::KeepaliveProbe { probe } => {
                // Only a socket with keepalive on is probed.
                c.keepalive = Keepalive {
                    enabled: true,
                    ..c.keepalive
                };
                // The kernel's `probes_out` after sending probe N is N; the
                // verdict counts N-1 of them unanswered (the new one has
                // not had its chance yet), as for a walk's count.
                // A refresh may already have seen this probe outstanding
                // (it reads the kernel live; events lag by up to a poll):
                // never lower the count here, only a refresh does.
                c.probes_out = c.probes_out.max(*probe);
                c.timer = Some(Timer {
                    kind: TimerKind::Keepalive,
                    fires_in_ms: c.keepalive.intvl_ms as i64,
                });
            }
            Detail::Retransmit { segs, err, .. } => {
                // As the kernel counts `tcpi_total_retrans`.
                if crate::events::counted_in_retranssegs(*err) {
                    c.total_retrans += segs;
                }
            }
            Detail::Timeout { cause, .. } => c.timed_out = Some(*cause),
            Detail::ResetSent { .. } | Detail::ResetReceived => {}
        }
    }
}

/// Gives back a map's room when it holds under half of it.
fn shrink<V>(m: &mut CookieMap<V>) {
    if m.capacity() > 2 * m.len() + 64 {
        m.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Owner, TimeoutCause};

    fn conn(cookie: u64) -> Conn {
        Conn {
            id: ConnId {
                cookie,
                state: TCP_ESTABLISHED,
                ..ConnId::default()
            },
            full: true,
            ino: cookie,
            owners: vec![Owner {
                pid: 1,
                comm: "app".into(),
            }],
            keepalive: Keepalive {
                enabled: true,
                idle_ms: 1000,
                intvl_ms: 1000,
                probes: 3,
            },
            ..Conn::default()
        }
    }

    fn event(cookie: u64, detail: Detail) -> Event {
        Event {
            ts_mono_ns: 0,
            cookie,
            netns: 1,
            saddr: "198.18.0.1".parse().unwrap(),
            sport: 1,
            daddr: "198.18.0.2".parse().unwrap(),
            dport: 2,
            state: TCP_ESTABLISHED,
            owner: None,
            detail,
        }
    }

    fn keepalive_timeout(cookie: u64) -> Event {
        event(
            cookie,
            Detail::Timeout {
                cause: TimeoutCause::Keepalive,
                probes_out: 3,
                user_timeout_ms: 0,
            },
        )
    }

    fn state_change(cookie: u64, old: u32, new: u32, owner: Option<Owner>) -> Event {
        Event {
            owner,
            ..event(cookie, Detail::StateChange { old, new })
        }
    }

    fn owner(pid: u32, comm: &str) -> Owner {
        Owner {
            pid,
            comm: comm.into(),
        }
    }

    /// `owner`'s `connect()` of socket `cookie` (its `→ SYN_SENT`) at `now`.
    fn connect(t: &mut ConnTable, cookie: u64, owner: &Owner, now: u64) {
        let syn_sent = state_change(cookie, TCP_CLOSE, TCP_SYN_SENT, Some(owner.clone()));
        t.apply(&syn_sent, now);
    }

    /// The engine's owner of an event without one when the table is on:
    /// the `connect()` owner, for the connection's life and after its
    /// CLOSE (the reset of an abortive close, the timeout of an abort).
    #[test]
    fn the_connect_owner_outlives_the_close_and_a_new_connect_replaces_it() {
        let mut t = ConnTable::new(10, Thresholds::default());
        let curl = owner(42, "curl");
        connect(&mut t, 7, &curl, 1);
        t.apply(&state_change(7, TCP_SYN_SENT, TCP_ESTABLISHED, None), 2);
        assert_eq!(t.first_owner(7), Some(&curl));
        t.apply(&state_change(7, TCP_ESTABLISHED, TCP_CLOSE, None), 3);
        t.apply(&keepalive_timeout(7), 4);
        assert_eq!(t.first_owner(7), Some(&curl), "kept after CLOSE");
        // The same socket connects again, from another process.
        let wget = owner(43, "wget");
        connect(&mut t, 7, &wget, 5);
        assert_eq!(t.first_owner(7), Some(&wget));
        assert_eq!(t.len(), 1, "live again");
    }

    /// Without an owner look-up (`--no-owners`) a refresh keeps the owners
    /// events brought; with one, the holders found replace them.
    #[test]
    fn a_refresh_replaces_owners_only_when_it_looked_them_up() {
        let mut t = ConnTable::new(10, Thresholds::default());
        let curl = owner(42, "curl");
        connect(&mut t, 7, &curl, 1);
        let walk = |t: &mut ConnTable, owners: Option<Owners>, now: u64| {
            let mut pass = Walked::default();
            t.refresh_row(
                &mut pass,
                Conn {
                    owners: Vec::new(),
                    ..conn(7)
                },
                now,
            );
            let looked_up = owners.map(|o| move |_| Some(o.clone()));
            t.refresh_end(pass, looked_up, now, |_, _| {});
        };
        walk(&mut t, None, 2);
        assert_eq!(t.first_owner(7), Some(&curl));
        let holder = owner(44, "sshd");
        walk(&mut t, Some(Owners::new(vec![holder.clone()])), 3);
        assert_eq!(t.first_owner(7), Some(&holder));
    }

    #[test]
    fn probe_makes_dead_and_refresh_heals() {
        let mut t = ConnTable::new(10, Thresholds::default());
        assert!(t.refresh(vec![conn(1)], 0).is_empty());
        // The first probe is not evidence yet: a live peer answers it.
        assert!(
            t.apply(&event(1, Detail::KeepaliveProbe { probe: 1 }), 1)
                .is_none()
        );
        let ch = t
            .apply(&event(1, Detail::KeepaliveProbe { probe: 2 }), 2)
            .expect("verdict change");
        assert_eq!(ch.old, Verdict::Healthy);
        assert_eq!(ch.new.reason_code(), "probes_unanswered");
        assert!(ch.new.reason().contains("1 of 3"), "{}", ch.new.reason());
        // A third probe changes numbers, not the verdict: no news.
        assert!(
            t.apply(&event(1, Detail::KeepaliveProbe { probe: 3 }), 2)
                .is_none()
        );
        // The peer answered: the next walk shows no probe outstanding.
        let ch = t.refresh(vec![conn(1)], 3);
        assert_eq!(ch.len(), 1);
        assert_eq!(ch[0].new, Verdict::Healthy);
    }

    #[test]
    fn probes_drained_after_a_walk_lost_the_connection_still_report_dead() {
        // Under load the ring is drained after a walk that took seconds:
        // the walk no longer finds the connection the kernel aborted, and
        // only then do its probes and its timeout arrive.
        let mut t = ConnTable::new(10, Thresholds::default());
        assert!(t.refresh(vec![conn(1)], 0).is_empty());
        assert!(t.refresh(Vec::new(), 1).is_empty());
        assert!(
            t.apply(&event(1, Detail::KeepaliveProbe { probe: 1 }), 2)
                .is_none()
        );
        let ch = t
            .apply(&event(1, Detail::KeepaliveProbe { probe: 2 }), 2)
            .expect("dead before it timed out");
        assert_eq!(ch.new.reason_code(), "probes_unanswered");
        assert!(ch.new.reason().contains("1 of 3"), "{}", ch.new.reason());
        let ch = t.apply(&keepalive_timeout(1), 3).expect("then timed out");
        assert_eq!(ch.new.reason_code(), "timed_out");
    }

    #[test]
    fn a_late_probe_event_does_not_undo_what_a_refresh_saw() {
        let mut t = ConnTable::new(10, Thresholds::default());
        let mut seen = conn(1);
        // Probe 1 may be in flight: no verdict yet.
        seen.probes_out = 1;
        seen.timer = Some(Timer {
            kind: TimerKind::Keepalive,
            fires_in_ms: 900,
        });
        assert!(t.refresh(vec![seen.clone()], 0).is_empty());
        seen.probes_out = 2;
        let ch = t.refresh(vec![seen], 0);
        assert_eq!(ch.len(), 1, "the refresh sees the unanswered probe");
        assert!(
            ch[0].new.reason().contains("1 of 3"),
            "{}",
            ch[0].new.reason()
        );
        // The event for that same probe arrives afterwards: no flap.
        assert!(
            t.apply(&event(1, Detail::KeepaliveProbe { probe: 2 }), 1)
                .is_none()
        );
        assert_eq!(t.verdict(1).unwrap().reason_code(), "probes_unanswered");
        assert!(t.verdict(1).unwrap().reason().contains("1 of 3"));
    }

    #[test]
    fn timeout_then_close_leaves_a_tombstone() {
        let mut t = ConnTable::new(10, Thresholds::default());
        t.refresh(vec![conn(7)], 0);
        let ch = t.apply(&keepalive_timeout(7), 1).unwrap();
        assert_eq!(ch.new.reason_code(), "timed_out");
        t.apply(&event(7, Detail::StateChange { old: 1, new: 7 }), 2);
        assert_eq!(t.len(), 0);
        assert!(t.get(7).is_some(), "tombstone resolves late events");
        // Late events for a tombstone do not resurrect it.
        assert!(t.apply(&event(7, Detail::ResetReceived), 3).is_none());
        assert_eq!(t.len(), 0);
        t.refresh(vec![], 2 + TOMBSTONE_NS + 1);
        assert!(t.get(7).is_none());
    }

    #[test]
    fn timeout_reported_after_close_still_changes_the_verdict() {
        let mut t = ConnTable::new(10, Thresholds::default());
        t.refresh(vec![conn(8)], 0);
        t.apply(&event(8, Detail::KeepaliveProbe { probe: 3 }), 1);
        t.apply(&event(8, Detail::StateChange { old: 1, new: 7 }), 2);
        let ch = t
            .apply(&keepalive_timeout(8), 3)
            .expect("timed_out is news");
        assert_eq!(ch.old.reason_code(), "probes_unanswered");
        assert_eq!(ch.new.reason_code(), "timed_out");
    }

    /// Established, idle for `idle_ms`, keepalive off: unprotected once
    /// past the idle threshold.
    fn idle_conn(cookie: u64, idle_ms: u64) -> Conn {
        let mut c = conn(cookie);
        c.keepalive.enabled = false;
        c.last_recv_ms = idle_ms;
        c.last_send_ms = idle_ms;
        c
    }

    #[test]
    fn over_the_cap_each_verdict_change_is_reported_once() {
        // The flood: far more idle connections than the cap, walked
        // again and again.
        let cap = 100;
        let mut t = ConnTable::new(cap, Thresholds::default());
        let walk = |n: u64| (1..=n).map(|c| idle_conn(c, 120_000)).collect::<Vec<_>>();
        let first = t.refresh(walk(4_000), 0);
        assert_eq!(first.len(), 4_000, "each connection turns unprotected once");
        assert!(first.iter().all(|c| c.new.name() == "unprotected"));
        for round in 1..=5 {
            let again = t.refresh(walk(4_000), round * 1_000_000_000);
            assert!(again.is_empty(), "round {round}: {} repeats", again.len());
        }
        assert_eq!(t.len(), cap);
        assert_eq!(t.overflow_len(), 4_000 - cap);
        // A real change beyond the cap is still reported, once.
        let mut conns = walk(4_000);
        conns[3_999].keepalive.enabled = true;
        conns[3_999].keepalive.idle_ms = 30_000;
        let ch = t.refresh(conns.clone(), 10_000_000_000);
        assert_eq!(ch.len(), 1, "{ch:?}");
        assert_eq!((ch[0].conn.id.cookie, ch[0].new.name()), (4_000, "healthy"));
        assert!(t.refresh(conns, 11_000_000_000).is_empty());
        // Closed connections are forgotten beyond the cap too.
        t.refresh(walk(50), 12_000_000_000);
        assert_eq!(t.overflow_len(), 0);
    }

    #[test]
    fn evicted_connections_keep_their_verdict() {
        let mut t = ConnTable::new(2, Thresholds::default());
        let ch = t.refresh(vec![idle_conn(1, 120_000), idle_conn(2, 120_000)], 0);
        assert_eq!(ch.len(), 2);
        // New connections push both out of the table.
        t.apply(&event(3, Detail::ResetReceived), 5);
        t.apply(&event(4, Detail::ResetReceived), 6);
        assert_eq!(t.evictions, 2);
        let walk = vec![
            idle_conn(1, 120_000),
            idle_conn(2, 120_000),
            conn(3),
            conn(4),
        ];
        assert!(t.refresh(walk, 7).is_empty(), "no verdict moved");
        // Their events are not news; the kernel giving up on one is.
        assert!(t.apply(&event(1, Detail::ResetReceived), 8).is_none());
        let ch = t.apply(&keepalive_timeout(2), 9).expect("timed out");
        assert_eq!(ch.old.name(), "unprotected");
        assert_eq!(ch.new.reason_code(), "timed_out");
    }

    #[test]
    fn cap_evicts_least_recently_touched_and_counts() {
        let mut t = ConnTable::new(2, Thresholds::default());
        t.refresh(vec![conn(1)], 0);
        t.apply(&event(2, Detail::ResetReceived), 5);
        t.apply(&event(3, Detail::ResetReceived), 6);
        assert_eq!(t.len(), 2);
        assert_eq!(t.evictions, 1);
        assert!(t.get(1).is_none());
        assert!(t.get(3).is_some());
    }

    #[test]
    fn a_full_table_evicts_in_batches_and_never_grows() {
        let cap = 640;
        let mut t = ConnTable::new(cap, Thresholds::default());
        for cookie in 1..=5_000u64 {
            t.apply(&event(cookie, Detail::ResetReceived), cookie);
            assert!(t.len() <= cap);
        }
        assert_eq!(t.evictions as usize, 5_000 - t.len());
        // The newest survive.
        assert!(t.get(5_000).is_some());
        assert!(t.get(1).is_none());
    }

    #[test]
    fn bytes_per_tracked_connection() {
        // What a tracked connection costs: its boxed entry (136 bytes: a
        // 144-byte malloc chunk) plus the map's slot (key, pointer, control
        // byte); owners are shared per process.
        // The budget of docs/benchmarks.md §3 (<= 64 MiB at 200k sockets)
        // rests on it: a field added to Conn must be packed to keep it.
        let entry = size_of::<Entry>();
        let slot = size_of::<(u64, Box<Entry>)>() + 1;
        eprintln!("bytes per tracked connection: {entry} + {slot}");
        assert!(entry <= 136, "a tracked connection grew to {entry} bytes");
        assert!(slot <= 17);
    }

    #[test]
    fn a_refresh_does_not_keep_the_peak() {
        let mut t = ConnTable::new(100_000, Thresholds::default());
        t.refresh((1..=20_000).map(conn).collect(), 0);
        assert_eq!(t.len(), 20_000);
        // Most close; they stay as tombstones until those expire.
        t.refresh((1..=10).map(conn).collect(), 1);
        t.refresh((1..=10).map(conn).collect(), 2 + TOMBSTONE_NS);
        assert_eq!((t.len(), t.tombstones.len()), (10, 0));
        assert!(t.live.capacity() < 1_000, "{}", t.live.capacity());
        assert!(
            t.tombstones.capacity() < 1_000,
            "{}",
            t.tombstones.capacity()
        );
    }

    #[test]
    fn owners_are_shared_not_copied_per_connection() {
        let mut t = ConnTable::new(100, Thresholds::default());
        let shared: Owners = conn(1).owners.into();
        let walk = (1..=3).map(|c| {
            let mut c = conn(c);
            (c.id.saddr, c.id.daddr) = (Some([10, 0, 0, 1].into()), Some([10, 0, 0, 2].into()));
            (c, Some(shared.clone()))
        });
        t.refresh_with(walk, 0, |_, _| {});
        for c in 1..=3 {
            let e = &t.live[&c];
            assert!(std::sync::Arc::ptr_eq(e.conn.owners().unwrap(), &shared));
        }
        // Connections that events bring in share their process's too.
        t.apply(&event(7, Detail::ResetReceived), 1);
        let mut ev = event(8, Detail::ResetReceived);
        ev.owner = Some(conn(1).owners[0].clone());
        t.apply(&ev, 2);
        let mut ev9 = ev.clone();
        ev9.cookie = 9;
        t.apply(&ev9, 3);
        assert!(std::sync::Arc::ptr_eq(
            t.live[&8].conn.owners().unwrap(),
            t.live[&9].conn.owners().unwrap()
        ));
        assert_eq!(t.get(9).unwrap().owners, conn(1).owners);
    }

    #[test]
    fn walk_drops_closed_connections_and_keeps_stats() {
        let mut t = ConnTable::new(10, Thresholds::default());
        t.refresh(vec![conn(1), conn(2)], 0);
        let stats = ConnStats {
            probes: 4,
            ..ConnStats::default()
        };
        t.set_stats(1, stats);
        t.refresh(vec![conn(1)], 1);
        assert_eq!(t.len(), 1);
        assert_eq!(t.get(1).unwrap().stats, Some(stats));
    }
}
