//! Connect-time owners, remembered by cookie for the life of a connection
//! and a short while after: the kernel sends the owner with a connection's
//! `→ SYN_SENT` state change only (it runs in the connecting process), and
//! the engine puts it on every later event of that connection, which
//! saves the kernel socket storage (an allocation per connection) and a
//! lookup per event. Only without a connection table (`--refresh 0`): the
//! table learns the same owner from the same record and keeps it as long.

use std::collections::VecDeque;

use keepalive_common::tcp_state;

use crate::events::{Detail, Event, Owner};
use crate::table::CookieMap;

/// How long (kernel event time) a connection's owner is kept after its
/// `→ CLOSE`: the kernel reports some events after it, microseconds
/// later (the reset of a close with SO_LINGER 0, the error report of a
/// timeout or a reset received).
const AFTER_CLOSE_NS: u64 = 2_000_000_000;

struct Remembered {
    owner: Owner,
    /// When the connection's `→ CLOSE` was seen (kernel time).
    closed_at: Option<u64>,
}

pub(super) struct ConnectOwners {
    by_cookie: CookieMap<Remembered>,
    /// Closed connections still remembered, oldest first, with the time of
    /// their CLOSE.
    closed: VecDeque<(u64, u64)>,
    /// Most open connections remembered (the table's cap), and most closed
    /// ones: past it the open ones are cleared, which only loses owners of
    /// connections whose CLOSE was never seen (lost events), and the
    /// oldest closed one is forgotten.
    cap: usize,
}

impl ConnectOwners {
    pub(super) fn new(cap: usize) -> Self {
        ConnectOwners {
            by_cookie: CookieMap::default(),
            closed: VecDeque::new(),
            cap: cap.max(1),
        }
    }

    /// Remembers the owner a `→ SYN_SENT` carries, and puts the
    /// remembered owner on any later event of the connection that has
    /// none (state changes, retransmits, resets, probes, timeouts).
    pub(super) fn fill(&mut self, ev: &mut Event) {
        self.forget_closed_before(ev.ts_mono_ns.saturating_sub(AFTER_CLOSE_NS));
        if ev.cookie == 0 {
            return;
        }
        let new_state = match ev.detail {
            Detail::StateChange { new, .. } => Some(new),
            _ => None,
        };
        match &ev.owner {
            Some(o) if new_state == Some(tcp_state::SYN_SENT) => {
                let open = self.by_cookie.len().saturating_sub(self.closed.len());
                if open >= self.cap && !self.by_cookie.contains_key(&ev.cookie) {
                    tracing::debug!(cap = self.cap, "connect-time owners: cap reached, cleared");
                    self.by_cookie.clear();
                    self.closed.clear();
                }
                // A socket connects again after a disconnect with the same
                // cookie: it is open again.
                self.by_cookie.insert(
                    ev.cookie,
                    Remembered {
                        owner: o.clone(),
                        closed_at: None,
                    },
                );
            }
            Some(_) => {}
            None => ev.owner = self.by_cookie.get(&ev.cookie).map(|r| r.owner.clone()),
        }
        if new_state == Some(tcp_state::CLOSE)
            && let Some(r) = self.by_cookie.get_mut(&ev.cookie)
            && r.closed_at.is_none()
        {
            r.closed_at = Some(ev.ts_mono_ns);
            self.closed.push_back((ev.cookie, ev.ts_mono_ns));
            if self.closed.len() > self.cap {
                self.forget_oldest_closed();
            }
        }
    }

    /// Forgets the connections that closed before `t`.
    fn forget_closed_before(&mut self, t: u64) {
        while self.closed.front().is_some_and(|&(_, at)| at < t) {
            self.forget_oldest_closed();
        }
    }

    fn forget_oldest_closed(&mut self) {
        let Some((cookie, at)) = self.closed.pop_front() else {
            return;
        };
        // Unless it connected again since.
        if self
            .by_cookie
            .get(&cookie)
            .is_some_and(|r| r.closed_at == Some(at))
        {
            self.by_cookie.remove(&cookie);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_cookie.len()
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::events::comm::Comm;
    use tcp_state::{CLOSE, ESTABLISHED, SYN_SENT};

    const MS: u64 = 1_000_000;

    fn event(ts: u64, cookie: u64, detail: Detail, owner: Option<Owner>) -> Event {
        Event {
            ts_mono_ns: ts,
            cookie,
            netns: 1,
            saddr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            sport: 1,
            daddr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            dport: 2,
            state: tcp_state::ESTABLISHED,
            owner,
            detail,
        }
    }

    fn change(ts: u64, cookie: u64, old: u32, new: u32, owner: Option<Owner>) -> Event {
        event(ts, cookie, Detail::StateChange { old, new }, owner)
    }

    fn connect(o: &mut ConnectOwners, ts: u64, cookie: u64) {
        o.fill(&mut change(ts, cookie, CLOSE, SYN_SENT, Some(curl())));
    }

    /// The connection's `→ CLOSE`, which starts its last 2 seconds.
    fn close(o: &mut ConnectOwners, ts: u64, cookie: u64) {
        o.fill(&mut change(ts, cookie, ESTABLISHED, CLOSE, None));
    }

    fn curl() -> Owner {
        Owner {
            pid: 42,
            comm: Comm::from_bytes(b"curl\0\0\0\0\0\0\0\0\0\0\0\0"),
        }
    }

    fn other() -> Owner {
        Owner {
            pid: 43,
            comm: Comm::from_bytes(b"wget\0\0\0\0\0\0\0\0\0\0\0\0"),
        }
    }

    #[test]
    fn later_state_changes_get_the_connect_owner() {
        let mut o = ConnectOwners::new(16);
        connect(&mut o, MS, 7);
        let mut est = change(2 * MS, 7, tcp_state::SYN_SENT, tcp_state::ESTABLISHED, None);
        o.fill(&mut est);
        assert_eq!(est.owner, Some(curl()));
        let mut close = change(3 * MS, 7, tcp_state::FIN_WAIT2, tcp_state::CLOSE, None);
        o.fill(&mut close);
        assert_eq!(close.owner, Some(curl()));
    }

    #[test]
    fn every_kind_gets_the_connect_owner() {
        let mut o = ConnectOwners::new(16);
        connect(&mut o, MS, 7);
        for detail in [
            Detail::Retransmit {
                segs: 1,
                syn: false,
                synack: false,
                err: 0,
            },
            Detail::ResetReceived,
            Detail::ResetSent {
                reason: None,
                no_socket: false,
            },
            Detail::KeepaliveProbe { probe: 1 },
            Detail::Timeout {
                cause: crate::events::TimeoutCause::Retransmission,
                probes_out: 0,
                user_timeout_ms: 0,
            },
        ] {
            let mut ev = event(2 * MS, 7, detail, None);
            o.fill(&mut ev);
            assert_eq!(ev.owner, Some(curl()), "{:?}", ev.detail);
        }
        // An owner the kernel sent (from socket storage) is kept.
        let mut ev = event(2 * MS, 7, Detail::ResetReceived, Some(other()));
        o.fill(&mut ev);
        assert_eq!(ev.owner, Some(other()));
    }

    #[test]
    fn events_after_close_get_it_a_short_while() {
        let mut o = ConnectOwners::new(16);
        connect(&mut o, MS, 7);
        close(&mut o, 10 * MS, 7);
        // A close with SO_LINGER 0 reports its reset after CLOSE.
        let mut rst = event(
            10 * MS + 5,
            7,
            Detail::ResetSent {
                reason: None,
                no_socket: false,
            },
            None,
        );
        o.fill(&mut rst);
        assert_eq!(rst.owner, Some(curl()));
        // Another connection's events much later: the closed one is gone.
        connect(&mut o, 10 * MS + AFTER_CLOSE_NS + 1, 8);
        assert_eq!(o.len(), 1);
        let mut late = event(10 * MS + AFTER_CLOSE_NS + 2, 7, Detail::ResetReceived, None);
        o.fill(&mut late);
        assert_eq!(late.owner, None);
    }

    #[test]
    fn other_connections_are_left_alone() {
        let mut o = ConnectOwners::new(16);
        connect(&mut o, MS, 7);
        let mut server = change(2 * MS, 8, tcp_state::SYN_RECV, tcp_state::ESTABLISHED, None);
        o.fill(&mut server);
        assert_eq!(server.owner, None);
        // No socket, no cookie: nothing to find.
        let mut rst = event(2 * MS, 0, Detail::ResetReceived, None);
        o.fill(&mut rst);
        assert_eq!(rst.owner, None);
    }

    #[test]
    fn a_socket_that_connects_again_is_open_again() {
        let mut o = ConnectOwners::new(16);
        connect(&mut o, MS, 7);
        close(&mut o, 2 * MS, 7);
        // Same socket (same cookie), connected again by another process.
        o.fill(&mut change(
            3 * MS,
            7,
            tcp_state::CLOSE,
            tcp_state::SYN_SENT,
            Some(other()),
        ));
        // The first CLOSE expiring does not forget the live connection.
        let mut ev = event(3 * MS + AFTER_CLOSE_NS, 7, Detail::ResetReceived, None);
        o.fill(&mut ev);
        assert_eq!(ev.owner, Some(other()));
    }

    #[test]
    fn the_memory_is_bounded() {
        let mut o = ConnectOwners::new(2);
        for cookie in 1..=5 {
            connect(&mut o, MS, cookie);
            assert!(o.len() <= 2);
        }
        let mut est = change(MS, 5, tcp_state::SYN_SENT, tcp_state::ESTABLISHED, None);
        o.fill(&mut est);
        assert_eq!(est.owner, Some(curl()), "the newest is kept");
        // Closed ones too, however fast they close: at most `cap` closed
        // and `cap` open.
        for cookie in 10..100 {
            connect(&mut o, MS, cookie);
            close(&mut o, MS, cookie);
            assert!(o.closed.len() <= 2 && o.len() <= 4, "{}", o.len());
        }
        let mut last = event(MS, 99, Detail::ResetReceived, None);
        o.fill(&mut last);
        assert_eq!(last.owner, Some(curl()), "the newest closed is kept");
    }
}
