//! [`ConnTable`]: the daemon's live view of every connection, seeded from
//! the socket iterator, kept current from the event stream, refreshed
//! periodically from the kernel, and judged after every change so that a
//! verdict change can be reported as it happens.
//!
//! Memory is bounded: at most `cap` live connections (the least recently
//! touched is evicted and counted), and tombstones for recently closed
//! connections expire [`TOMBSTONE_NS`] after the close, as the events
//! move on (not only at walks: under churn with a long `--refresh` they
//! would pile up until the next).
//!
//! A connection beyond the cap keeps only its last reported verdict (a few
//! bytes, dropped when a walk no longer finds it), and is judged from each
//! walk against it: a verdict change is reported once per real change,
//! however small the cap, instead of once per refresh for every connection
//! that did not fit.

use std::collections::{HashMap, VecDeque};

use keepalive_common::ConnStats;

use super::packed::{Owners, Packed};
use super::verdict::{Thresholds, Verdict, judge, judge_held};
use super::{
    Conn, ConnId, CookieMap, Keepalive, TCP_CLOSE, TCP_ESTABLISHED, TCP_SYN_SENT, Timer, TimerKind,
};
use crate::events::{Detail, Event};

/// How long a closed connection stays resolvable for late events, in the
/// events' own time. What the kernel reports of a socket after its CLOSE
/// (the reset of an abortive close, the timeout of an abort) is stamped
/// microseconds after it, and events are applied in time order; probes
/// drained after a walk found a connection gone were stamped before the
/// walk. So this is a wide margin, kept short because under churn every
/// connection spends it as a tombstone: at 20,000 connections a second,
/// 10 s of them were 400,000 entries (tens of MiB, and a cache miss on
/// each new connection's look-up).
pub const TOMBSTONE_NS: u64 = 2_000_000_000;

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
    /// (expiry, cookie) of every burial, in the order they were made
    /// (nearly expiry order: a walk's burials can come before events
    /// stamped during the walk, which then wait at most as long as it).
    /// A cookie buried again has a later expiry; the earlier one finds it
    /// changed and leaves it.
    burials: VecDeque<(u64, u64)>,
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
            burials: VecDeque::new(),
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

    /// The first owner of a live or recently closed connection (what
    /// [`ConnTable::apply`] gives an event without one).
    #[cfg(test)]
    pub fn first_owner(&self, cookie: u64) -> Option<&crate::events::Owner> {
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
        let (old, new) = Self::news(verdict, judge(conn, thresholds))?;
        // Copied only here: most events change no verdict.
        Some(VerdictChange {
            conn: conn.clone(),
            old,
            new,
        })
    }

    /// Records `new` in `verdict`; returns the old and the new one when
    /// that is news.
    fn news(verdict: &mut Verdict, new: Verdict) -> Option<(Verdict, Verdict)> {
        if new == *verdict {
            return None;
        }
        let old = std::mem::replace(verdict, new.clone());
        // Reason numbers move all the time; only a change of verdict or of
        // reason kind is news.
        if old.name() == new.name() && old.reason_code() == new.reason_code() {
            return None;
        }
        Some((old, new))
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
        self.expire_tombstones(now_ns);
        for cookie in gone {
            if let Some(e) = self.live.remove(&cookie) {
                self.bury(cookie, e, now_ns + TOMBSTONE_NS);
            }
        }
        self.overflow.retain(|c, _| was_seen(c));
        // Capacity follows the maps down, so a burst's peak is not kept.
        shrink(&mut self.live);
        shrink(&mut self.tombstones);
        shrink(&mut self.overflow);
        if self.burials.capacity() > 2 * self.burials.len() + 64 {
            self.burials.shrink_to_fit();
        }
    }

    /// Keeps `e` as a tombstone until `expires_ns`.
    fn bury(&mut self, cookie: u64, e: Box<Entry>, expires_ns: u64) {
        self.tombstones.insert(cookie, (e, expires_ns));
        self.burials.push_back((expires_ns, cookie));
    }

    /// Drops the tombstones expired at `now_ns`, oldest burial first.
    fn expire_tombstones(&mut self, now_ns: u64) {
        while let Some(&(expires_ns, cookie)) = self.burials.front()
            && expires_ns <= now_ns
        {
            self.burials.pop_front();
            // Unless it was buried again since (or brought back to life).
            if self
                .tombstones
                .get(&cookie)
                .is_some_and(|&(_, exp)| exp == expires_ns)
            {
                self.tombstones.remove(&cookie);
            }
        }
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
    ///
    /// An event without an owner gets the first owner of its connection as
    /// the table knows it, live or recently closed: the `connect()` owner
    /// (from its `→ SYN_SENT` record) or the holder a walk found; so the
    /// reset of an abortive close and the timeout of an abort, which come
    /// after the CLOSE, still name it. The same look-up of the cookie
    /// serves both: every event takes this path.
    ///
    /// A change is rare and large (hundreds of bytes): boxed, so that each
    /// event returns a pointer's width instead of copying it through.
    pub fn apply(&mut self, ev: &mut Event, now_ns: u64) -> Option<Box<VerdictChange>> {
        let cookie = ev.cookie;
        if cookie == 0 {
            return None;
        }
        let t = self.thresholds;
        self.expire_tombstones(now_ns);
        // A closed socket that connects again (after a disconnect, with the
        // same cookie) is a new connection, with the owner of this connect().
        let connects = matches!(ev.detail, Detail::StateChange { new, .. } if new == TCP_SYN_SENT);
        let closes = matches!(ev.detail, Detail::StateChange { new, .. } if new == TCP_CLOSE);
        if let Some(e) = self.live.get_mut(&cookie) {
            Self::fill_owner(ev, e);
            e.touched_ns = now_ns;
            let change = Self::update(e, ev, cookie, &t);
            if connects {
                self.tombstones.remove(&cookie);
            }
            if closes && let Some(e) = self.live.remove(&cookie) {
                self.bury(cookie, e, now_ns + TOMBSTONE_NS);
            }
            return change;
        }
        if let Some((e, _)) = self.tombstones.get_mut(&cookie) {
            Self::fill_owner(ev, e);
            if connects {
                self.tombstones.remove(&cookie);
            } else {
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
                return Self::update(e, ev, cookie, &t);
            }
        }
        // Beyond the cap: walks judge it (an event alone knows too little
        // of it, and would flap its verdict), except for the kernel giving
        // up on it, which no walk will see.
        if let Some(verdict) = self.overflow.get_mut(&cookie) {
            let Detail::Timeout { cause, .. } = ev.detail else {
                return None;
            };
            let mut conn = Self::conn_from_event(ev);
            conn.timed_out = Some(cause);
            return Self::judge_against(&conn, verdict, &t).map(Box::new);
        }
        // A connection born after the last walk.
        self.make_room();
        let mut e = Box::new(Entry {
            conn: self.packed_from_event(ev),
            verdict: Verdict::Healthy,
            touched_ns: now_ns,
        });
        let change = Self::update(&mut e, ev, cookie, &t);
        if closes {
            self.bury(cookie, e, now_ns + TOMBSTONE_NS);
        } else {
            self.live.insert(cookie, e);
        }
        change
    }

    /// Gives an event without an owner the first owner of its connection.
    fn fill_owner(ev: &mut Event, e: &Entry) {
        if ev.owner.is_none() {
            ev.owner = e.conn.first_owner().cloned();
        }
    }

    /// What an event alone tells of its connection, packed; its owner is
    /// shared with the connection an event brought in before when it is
    /// the same (the next one is usually the same process's).
    fn packed_from_event(&mut self, ev: &Event) -> Packed {
        let conn = Conn {
            id: ConnId::of_event(ev),
            full: true,
            ..Conn::default()
        };
        let owners = ev.owner.as_ref().map(|o| match &self.event_owners {
            Some(last) if last.as_slice() == std::slice::from_ref(o) => last.clone(),
            _ => Owners::new(vec![o.clone()]),
        });
        let packed = Packed::owned(&conn, owners);
        if let Some(o) = packed.owners() {
            self.event_owners = Some(o.clone());
        }
        packed
    }

    /// Applies an event to a tracked connection, in place (its owners stay
    /// shared, not copied), and judges it against the verdict last
    /// reported; returns the change, if any.
    fn update(
        e: &mut Entry,
        ev: &Event,
        cookie: u64,
        t: &Thresholds,
    ) -> Option<Box<VerdictChange>> {
        if let Some(o) = &ev.owner {
            e.conn.own_if_unowned(o);
        }
        let held = e.conn.held();
        let new = e.conn.change(cookie, |c| {
            Self::apply_detail(c, ev);
            judge_held(c, held, t)
        });
        let (old, new) = Self::news(&mut e.verdict, new)?;
        // Unpacked whole only here: most events change no verdict.
        Some(Box::new(VerdictChange {
            conn: e.conn.conn(cookie),
            old,
            new,
        }))
    }

    /// What one event's detail tells of its connection (its owner:
    /// [`Packed::own_if_unowned`]).
    fn apply_detail(c: &mut Conn, ev: &Event) {
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
    use proptest::prelude::*;

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
        let mut syn_sent = state_change(cookie, TCP_CLOSE, TCP_SYN_SENT, Some(owner.clone()));
        t.apply(&mut syn_sent, now);
    }

    /// The engine's owner of an event without one when the table is on:
    /// the `connect()` owner, for the connection's life and after its
    /// CLOSE (the reset of an abortive close, the timeout of an abort).
    #[test]
    fn the_connect_owner_outlives_the_close_and_a_new_connect_replaces_it() {
        let mut t = ConnTable::new(10, Thresholds::default());
        let curl = owner(42, "curl");
        connect(&mut t, 7, &curl, 1);
        t.apply(&mut state_change(7, TCP_SYN_SENT, TCP_ESTABLISHED, None), 2);
        assert_eq!(t.first_owner(7), Some(&curl));
        t.apply(&mut state_change(7, TCP_ESTABLISHED, TCP_CLOSE, None), 3);
        t.apply(&mut keepalive_timeout(7), 4);
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
            t.apply(&mut event(1, Detail::KeepaliveProbe { probe: 1 }), 1)
                .is_none()
        );
        let ch = t
            .apply(&mut event(1, Detail::KeepaliveProbe { probe: 2 }), 2)
            .expect("verdict change");
        assert_eq!(ch.old, Verdict::Healthy);
        assert_eq!(ch.new.reason_code(), "probes_unanswered");
        assert!(ch.new.reason().contains("1 of 3"), "{}", ch.new.reason());
        // A third probe changes numbers, not the verdict: no news.
        assert!(
            t.apply(&mut event(1, Detail::KeepaliveProbe { probe: 3 }), 2)
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
            t.apply(&mut event(1, Detail::KeepaliveProbe { probe: 1 }), 2)
                .is_none()
        );
        let ch = t
            .apply(&mut event(1, Detail::KeepaliveProbe { probe: 2 }), 2)
            .expect("dead before it timed out");
        assert_eq!(ch.new.reason_code(), "probes_unanswered");
        assert!(ch.new.reason().contains("1 of 3"), "{}", ch.new.reason());
        let ch = t
            .apply(&mut keepalive_timeout(1), 3)
            .expect("then timed out");
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
            t.apply(&mut event(1, Detail::KeepaliveProbe { probe: 2 }), 1)
                .is_none()
        );
        assert_eq!(t.verdict(1).unwrap().reason_code(), "probes_unanswered");
        assert!(t.verdict(1).unwrap().reason().contains("1 of 3"));
    }

    #[test]
    fn timeout_then_close_leaves_a_tombstone() {
        let mut t = ConnTable::new(10, Thresholds::default());
        t.refresh(vec![conn(7)], 0);
        let ch = t.apply(&mut keepalive_timeout(7), 1).unwrap();
        assert_eq!(ch.new.reason_code(), "timed_out");
        t.apply(&mut event(7, Detail::StateChange { old: 1, new: 7 }), 2);
        assert_eq!(t.len(), 0);
        assert!(t.get(7).is_some(), "tombstone resolves late events");
        // Late events for a tombstone do not resurrect it.
        assert!(t.apply(&mut event(7, Detail::ResetReceived), 3).is_none());
        assert_eq!(t.len(), 0);
        t.refresh(vec![], 2 + TOMBSTONE_NS + 1);
        assert!(t.get(7).is_none());
    }

    /// A connection's life as events alone tell it: connect, established,
    /// close, stamped from `at`.
    fn churn_one(t: &mut ConnTable, cookie: u64, at: u64) {
        for (i, (old, new)) in [(7, TCP_SYN_SENT), (TCP_SYN_SENT, 1), (1, 7)]
            .into_iter()
            .enumerate()
        {
            t.apply(
                &mut event(cookie, Detail::StateChange { old, new }),
                at + i as u64,
            );
        }
    }

    #[test]
    fn tombstones_expire_as_events_move_on_without_a_walk() {
        let mut t = ConnTable::new(10, Thresholds::default());
        churn_one(&mut t, 1, 0);
        assert!(t.get(1).is_some(), "a tombstone right after the close");
        // Closed at 2: still there for events up to just before 2 + TTL.
        churn_one(&mut t, 2, TOMBSTONE_NS - 1);
        assert!(t.get(1).is_some());
        // Gone once another connection's events pass its expiry; no walk.
        churn_one(&mut t, 3, TOMBSTONE_NS + 3);
        assert!(t.get(1).is_none());
        assert!(t.get(2).is_some() && t.get(3).is_some());
    }

    #[test]
    fn churn_without_walks_keeps_only_the_tombstones_of_their_lifetime() {
        // 20,000 connections a second for 10 s of event time, no walk
        // (a long --refresh): tombstones are at most TOMBSTONE_NS of them.
        let mut t = ConnTable::new(1 << 20, Thresholds::default());
        let (rate, secs) = (20_000u64, 10);
        let gap = 1_000_000_000 / rate;
        let mut most = 0;
        for i in 0..rate * secs {
            churn_one(&mut t, i + 1, i * gap);
            most = most.max(t.tombstones.len());
        }
        assert_eq!(t.len(), 0);
        let lifetime = (rate * TOMBSTONE_NS / 1_000_000_000) as usize;
        assert!(
            (lifetime..=lifetime + 1).contains(&most),
            "{most} tombstones at most, {lifetime} expected"
        );
        assert!(t.burials.len() <= lifetime + 1);
    }

    #[test]
    fn a_cookie_buried_again_keeps_its_later_expiry() {
        let mut t = ConnTable::new(10, Thresholds::default());
        churn_one(&mut t, 5, 0);
        // The same socket connects again after its close and closes later.
        let again = TOMBSTONE_NS / 2;
        churn_one(&mut t, 5, again);
        // The first burial's expiry passes: the second one holds.
        churn_one(&mut t, 6, TOMBSTONE_NS + 10);
        assert!(t.get(5).is_some(), "the second close's tombstone was kept");
        churn_one(&mut t, 7, again + TOMBSTONE_NS + 10);
        assert!(t.get(5).is_none());
    }

    #[test]
    fn timeout_reported_after_close_still_changes_the_verdict() {
        let mut t = ConnTable::new(10, Thresholds::default());
        t.refresh(vec![conn(8)], 0);
        t.apply(&mut event(8, Detail::KeepaliveProbe { probe: 3 }), 1);
        t.apply(&mut event(8, Detail::StateChange { old: 1, new: 7 }), 2);
        let ch = t
            .apply(&mut keepalive_timeout(8), 3)
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
        t.apply(&mut event(3, Detail::ResetReceived), 5);
        t.apply(&mut event(4, Detail::ResetReceived), 6);
        assert_eq!(t.evictions, 2);
        let walk = vec![
            idle_conn(1, 120_000),
            idle_conn(2, 120_000),
            conn(3),
            conn(4),
        ];
        assert!(t.refresh(walk, 7).is_empty(), "no verdict moved");
        // Their events are not news; the kernel giving up on one is.
        assert!(t.apply(&mut event(1, Detail::ResetReceived), 8).is_none());
        let ch = t.apply(&mut keepalive_timeout(2), 9).expect("timed out");
        assert_eq!(ch.old.name(), "unprotected");
        assert_eq!(ch.new.reason_code(), "timed_out");
    }

    #[test]
    fn cap_evicts_least_recently_touched_and_counts() {
        let mut t = ConnTable::new(2, Thresholds::default());
        t.refresh(vec![conn(1)], 0);
        t.apply(&mut event(2, Detail::ResetReceived), 5);
        t.apply(&mut event(3, Detail::ResetReceived), 6);
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
            t.apply(&mut event(cookie, Detail::ResetReceived), cookie);
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
        // Events update a connection in place: its owners stay shared.
        t.apply(&mut event(2, Detail::KeepaliveProbe { probe: 1 }), 1);
        t.apply(&mut event(2, Detail::StateChange { old: 1, new: 8 }), 1);
        assert!(std::sync::Arc::ptr_eq(
            t.live[&2].conn.owners().unwrap(),
            &shared
        ));
        // Connections that events bring in share their process's too.
        t.apply(&mut event(7, Detail::ResetReceived), 1);
        let mut ev = event(8, Detail::ResetReceived);
        ev.owner = Some(conn(1).owners[0].clone());
        t.apply(&mut ev, 2);
        let mut ev9 = ev.clone();
        ev9.cookie = 9;
        t.apply(&mut ev9, 3);
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

    /// The table's event path as it was before it updated entries in
    /// place: the engine looked the owner up (`first_owner`), then the
    /// table unpacked the connection (owners copied), applied the event
    /// and packed it again. The fast path is held to it.
    fn apply_unpacked(t: &mut ConnTable, ev: &mut Event, now_ns: u64) -> Option<VerdictChange> {
        if ev.owner.is_none() {
            ev.owner = t.first_owner(ev.cookie).cloned();
        }
        let ev = &*ev;
        let with_detail = |c: &mut Conn| {
            if c.owners.is_empty()
                && let Some(o) = &ev.owner
            {
                c.owners.push(o.clone());
            }
            ConnTable::apply_detail(c, ev);
        };
        if ev.cookie == 0 {
            return None;
        }
        let th = t.thresholds;
        if matches!(ev.detail, Detail::StateChange { new, .. } if new == TCP_SYN_SENT) {
            t.tombstones.remove(&ev.cookie);
        }
        if !t.live.contains_key(&ev.cookie) {
            if let Some((e, _)) = t.tombstones.get_mut(&ev.cookie) {
                if matches!(ev.detail, Detail::StateChange { .. }) {
                    return None;
                }
                let mut conn = e.conn.conn(ev.cookie);
                with_detail(&mut conn);
                return ConnTable::store(e, &conn, None, &th);
            }
            if let Some(verdict) = t.overflow.get_mut(&ev.cookie) {
                let Detail::Timeout { cause, .. } = ev.detail else {
                    return None;
                };
                let mut conn = ConnTable::conn_from_event(ev);
                conn.timed_out = Some(cause);
                return ConnTable::judge_against(&conn, verdict, &th);
            }
            t.make_room();
            let conn = ConnTable::conn_from_event(ev);
            let conn = Packed::new(&conn, t.event_owners.as_ref());
            if conn.owners().is_some() {
                t.event_owners = conn.owners().cloned();
            }
            t.live.insert(
                ev.cookie,
                Box::new(Entry {
                    conn,
                    verdict: Verdict::Healthy,
                    touched_ns: now_ns,
                }),
            );
        }
        let e = t.live.get_mut(&ev.cookie)?;
        e.touched_ns = now_ns;
        let mut c = e.conn.conn(ev.cookie);
        with_detail(&mut c);
        let change = ConnTable::store(e, &c, None, &th);
        if let Detail::StateChange { new, .. } = ev.detail
            && new == TCP_CLOSE
            && let Some(e) = t.live.remove(&ev.cookie)
        {
            t.tombstones.insert(ev.cookie, (e, now_ns + TOMBSTONE_NS));
        }
        change
    }

    /// Everything the table holds of one connection, as `PartialEq`.
    fn held_of(t: &ConnTable, cookie: u64) -> impl PartialEq + std::fmt::Debug {
        let packing = |e: &Entry| {
            (
                matches!(e.conn, Packed::Narrow(_)),
                e.conn.owners().map(|o| (**o).clone()),
                e.verdict.clone(),
                e.touched_ns,
            )
        };
        (
            t.get(cookie),
            t.live.get(&cookie).map(|e| packing(e)),
            t.tombstones
                .get(&cookie)
                .map(|(e, expires)| (packing(e), *expires)),
            t.overflow.get(&cookie).cloned(),
            (t.len(), t.tombstones.len(), t.overflow_len(), t.evictions),
            t.event_owners.as_deref().cloned(),
        )
    }

    /// Where the connection is when its events come.
    #[derive(Clone, Copy, Debug)]
    enum Start {
        /// Not known: the first event brings it in.
        New,
        Live,
        /// Closed: a walk no longer found it.
        Tombstone,
        /// Beyond the cap.
        Overflow,
        /// Live again after a walk missed it: a tombstone too.
        Reopened,
    }

    fn any_detail() -> impl Strategy<Value = Detail> {
        // Some values beyond what packs narrow (states, probe numbers).
        let state = prop_oneof![8 => 0u32..=12, 1 => 250u32..=300];
        prop_oneof![
            (state.clone(), state).prop_map(|(old, new)| Detail::StateChange { old, new }),
            (0u32..=12).prop_map(|new| Detail::StateChange { old: 1, new }),
            prop_oneof![8 => 0u32..=12, 1 => 250u32..=300]
                .prop_map(|probe| Detail::KeepaliveProbe { probe }),
            (
                0u32..4,
                any::<bool>(),
                prop_oneof![Just(0), Just(-libc::EBUSY)]
            )
                .prop_map(|(segs, syn, err)| Detail::Retransmit {
                    segs,
                    syn,
                    synack: false,
                    err
                }),
            (0u8..3, 0u32..10).prop_map(|(c, probes_out)| Detail::Timeout {
                cause: [
                    TimeoutCause::Keepalive,
                    TimeoutCause::Retransmission,
                    TimeoutCause::UserTimeout
                ][c as usize],
                probes_out,
                user_timeout_ms: 0,
            }),
            Just(Detail::ResetReceived),
            Just(Detail::ResetSent {
                reason: None,
                no_socket: false
            }),
        ]
    }

    prop_compose! {
        fn any_event(cookie: u64)(
            detail in any_detail(),
            v6 in prop_oneof![8 => Just(false), 1 => Just(true)],
            sport in any::<u16>(),
            owner in proptest::option::of(0u32..3),
        ) -> Event {
            let mut ev = event(cookie, detail);
            if v6 {
                ev.saddr = "2001:db8::1".parse().unwrap();
                ev.daddr = "2001:db8::2".parse().unwrap();
            }
            ev.sport = sport;
            // pid 0 is the walk's owner (as `packed::tests::conn` makes them).
            ev.owner = owner.map(|pid| Owner { pid: pid + 100, comm: "ev".into() });
            ev
        }
    }

    proptest! {
        /// Every event kind, on narrow and whole entries, new, live,
        /// closed or beyond the cap, with and without owners: the event
        /// path that updates an entry in place and fills the event's owner
        /// in its one look-up leaves the table, the event and the verdict
        /// change exactly as unpacking the connection did.
        #[test]
        fn the_in_place_event_path_is_the_unpacked_one(
            walked in super::super::packed::tests::conn(),
            start in prop_oneof![
                Just(Start::New), Just(Start::Live), Just(Start::Tombstone), Just(Start::Overflow),
                Just(Start::Reopened),
            ],
            // Often an established connection not dead yet, so that its
            // owners decide (no_owner).
            established in any::<bool>(),
            owners_known in any::<bool>(),
            events in proptest::collection::vec(any_event(7), 1..8),
        ) {
            let cookie = 7;
            // Values the verdict's sums take without overflow (still many
            // beyond what packs narrow).
            let mut walked = Conn {
                full: true,
                total_retrans: walked.total_retrans.min(1 << 30),
                rto_ms: walked.rto_ms.min(1 << 40),
                last_ack_ms: walked.last_ack_ms.min(1 << 40),
                keepalive: Keepalive {
                    intvl_ms: walked.keepalive.intvl_ms.min(1 << 40),
                    probes: walked.keepalive.probes.min(1 << 10),
                    ..walked.keepalive
                },
                timer: walked.timer.map(|t| Timer {
                    fires_in_ms: t.fires_in_ms.clamp(-1 << 40, 1 << 40),
                    ..t
                }),
                timed_out: walked.timed_out.filter(|_| !established),
                ..walked
            };
            walked.id.cookie = cookie;
            if established {
                walked.id.state = TCP_ESTABLISHED;
            }
            let th = Thresholds { owners_known, ..Thresholds::default() };
            let mut fast = ConnTable::new(if matches!(start, Start::Overflow) { 1 } else { 10 }, th);
            match start {
                Start::New => {}
                Start::Live => { fast.refresh(vec![walked.clone()], 1); }
                Start::Tombstone => {
                    fast.refresh(vec![walked.clone()], 1);
                    fast.refresh(Vec::new(), 2);
                }
                Start::Overflow => {
                    fast.refresh(vec![conn(99), walked.clone()], 1);
                }
                Start::Reopened => {
                    fast.refresh(vec![walked.clone()], 1);
                    fast.refresh(Vec::new(), 2);
                    fast.refresh(vec![walked.clone()], 3);
                }
            }
            // The same table, entry for entry.
            let mut slow = ConnTable::new(fast.cap, th);
            slow.live = fast.live.iter().map(|(&c, e)| (c, Box::new(Entry {
                conn: e.conn.clone(), verdict: e.verdict.clone(), touched_ns: e.touched_ns,
            }))).collect();
            slow.tombstones = fast.tombstones.iter().map(|(&c, (e, exp))| (c, (Box::new(Entry {
                conn: e.conn.clone(), verdict: e.verdict.clone(), touched_ns: e.touched_ns,
            }), *exp))).collect();
            slow.overflow = fast.overflow.clone();
            prop_assert_eq!(held_of(&fast, cookie), held_of(&slow, cookie));
            for (i, ev) in events.into_iter().enumerate() {
                let now = 10 + i as u64;
                let (mut ev_fast, mut ev_slow) = (ev.clone(), ev);
                let change_fast = fast.apply(&mut ev_fast, now);
                let change_slow = apply_unpacked(&mut slow, &mut ev_slow, now).map(Box::new);
                prop_assert_eq!(&ev_fast, &ev_slow, "event {} filled", i);
                prop_assert_eq!(&change_fast, &change_slow, "event {}: {:?}", i, ev_fast);
                prop_assert_eq!(held_of(&fast, cookie), held_of(&slow, cookie), "event {}", i);
            }
        }
    }
}
