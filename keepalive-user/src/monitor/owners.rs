//! Connect-time owners, remembered by cookie until the connection closes:
//! the kernel sends the owner with a connection's `→ SYN_SENT` state
//! change only (it runs in the connecting process), and the engine puts
//! it back on the connection's later state changes, which saves the
//! kernel a socket-storage lookup on each of them.

use std::collections::HashMap;

use keepalive_common::tcp_state;

use crate::events::{Detail, Event, Owner};

pub(super) struct ConnectOwners {
    by_cookie: HashMap<u64, Owner>,
    /// Most connections remembered (the table's cap); past it the memory
    /// is cleared, which only loses owners of connections whose CLOSE was
    /// never seen (lost events).
    cap: usize,
}

impl ConnectOwners {
    pub(super) fn new(cap: usize) -> Self {
        ConnectOwners {
            by_cookie: HashMap::new(),
            cap: cap.max(1),
        }
    }

    /// Remembers or fills in the owner of a state change, as the kernel
    /// did when it looked the owner up on every state change.
    pub(super) fn fill(&mut self, ev: &mut Event) {
        let Detail::StateChange { new, .. } = ev.detail else {
            return;
        };
        match &ev.owner {
            Some(o) if new == tcp_state::SYN_SENT => {
                if self.by_cookie.len() >= self.cap && !self.by_cookie.contains_key(&ev.cookie) {
                    tracing::debug!(cap = self.cap, "connect-time owners: cap reached, cleared");
                    self.by_cookie.clear();
                }
                self.by_cookie.insert(ev.cookie, o.clone());
            }
            Some(_) => {}
            None => ev.owner = self.by_cookie.get(&ev.cookie).cloned(),
        }
        if new == tcp_state::CLOSE {
            self.by_cookie.remove(&ev.cookie);
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

    fn change(cookie: u64, old: u32, new: u32, owner: Option<Owner>) -> Event {
        Event {
            ts_mono_ns: 1,
            cookie,
            netns: 1,
            saddr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            sport: 1,
            daddr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            dport: 2,
            state: old,
            owner,
            detail: Detail::StateChange { old, new },
        }
    }

    fn curl() -> Owner {
        Owner {
            pid: 42,
            comm: Comm::from_bytes(b"curl\0\0\0\0\0\0\0\0\0\0\0\0"),
        }
    }

    #[test]
    fn later_state_changes_get_the_connect_owner_until_close() {
        let mut o = ConnectOwners::new(16);
        let mut syn = change(7, tcp_state::CLOSE, tcp_state::SYN_SENT, Some(curl()));
        o.fill(&mut syn);
        let mut est = change(7, tcp_state::SYN_SENT, tcp_state::ESTABLISHED, None);
        o.fill(&mut est);
        assert_eq!(est.owner, Some(curl()));
        let mut close = change(7, tcp_state::FIN_WAIT2, tcp_state::CLOSE, None);
        o.fill(&mut close);
        assert_eq!(close.owner, Some(curl()));
        assert_eq!(o.len(), 0);
        // After CLOSE the cookie is forgotten.
        let mut late = change(7, tcp_state::CLOSE, tcp_state::CLOSE, None);
        o.fill(&mut late);
        assert_eq!(late.owner, None);
    }

    #[test]
    fn other_connections_and_kinds_are_left_alone() {
        let mut o = ConnectOwners::new(16);
        o.fill(&mut change(
            7,
            tcp_state::CLOSE,
            tcp_state::SYN_SENT,
            Some(curl()),
        ));
        let mut server = change(8, tcp_state::SYN_RECV, tcp_state::ESTABLISHED, None);
        o.fill(&mut server);
        assert_eq!(server.owner, None);
        let mut rst = change(7, 0, 0, None);
        rst.detail = Detail::ResetReceived;
        o.fill(&mut rst);
        assert_eq!(rst.owner, None, "only state changes are filled in");
    }

    #[test]
    fn the_memory_is_bounded() {
        let mut o = ConnectOwners::new(2);
        for cookie in 1..=5 {
            o.fill(&mut change(
                cookie,
                tcp_state::CLOSE,
                tcp_state::SYN_SENT,
                Some(curl()),
            ));
            assert!(o.len() <= 2);
        }
        let mut est = change(5, tcp_state::SYN_SENT, tcp_state::ESTABLISHED, None);
        o.fill(&mut est);
        assert_eq!(est.owner, Some(curl()), "the newest is kept");
    }
}
