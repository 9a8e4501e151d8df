//! [`Packed`]: a [`Conn`] as the connection table stores it, in under half
//! the bytes. The table holds one per tracked socket (hundreds of
//! thousands on a busy host), so its size is the monitor's memory.
//!
//! Values that always fit in practice are narrowed (IPv4 addresses, ages
//! and timeouts in milliseconds under 49 days, counters under 256, inode
//! numbers under 2^32); owners are shared between the sockets of one
//! process and counters the kernel rarely keeps are boxed. A connection
//! with any value that does not fit is kept whole, boxed, so every
//! [`Conn`] comes back exactly as it went in.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use keepalive_common::ConnStats;

use super::{Conn, ConnId, Keepalive, Timer, TimerKind};
use crate::events::{Owner, TimeoutCause};

/// A connection, narrowed; the cookie is the table's key.
#[derive(Clone, Debug)]
pub enum Packed {
    Narrow(Narrow),
    /// What does not fit: IPv6 or missing addresses, huge values.
    Whole(Box<Conn>),
}

/// Owners shared by every socket that has the same ones (a thin pointer:
/// 8 bytes in every connection, not 16).
pub type Owners = Arc<Vec<Owner>>;

#[derive(Clone, Debug)]
pub struct Narrow {
    owners: Option<Owners>,
    stats: Option<Box<ConnStats>>,
    netns: u32,
    ino: u32,
    saddr: u32,
    daddr: u32,
    keepalive_idle_ms: u32,
    keepalive_intvl_ms: u32,
    total_retrans: u32,
    user_timeout_ms: u32,
    rto_ms: u32,
    last_send_ms: u32,
    last_recv_ms: u32,
    last_ack_ms: u32,
    recv_queue: u32,
    send_queue: u32,
    timer_fires_in_ms: i32,
    sport: u16,
    dport: u16,
    state: u8,
    probes_out: u8,
    retransmits: u8,
    backoff: u8,
    retries2: u8,
    keepalive_probes: u8,
    /// A bool, not a flag bit: its spare values tell [`Packed`]'s variants
    /// apart, so the enum costs no tag.
    full: bool,
    /// [`FLAG_ORPHAN`] | [`FLAG_KEEPALIVE`] | timer kind
    /// (2 bits at [`TIMER_SHIFT`]) | timeout cause (2 bits at
    /// [`TIMEOUT_SHIFT`]).
    flags: u8,
}

const FLAG_ORPHAN: u8 = 1;
const FLAG_KEEPALIVE: u8 = 4;
const TIMER_SHIFT: u8 = 3;
const TIMEOUT_SHIFT: u8 = 5;

fn timer_code(t: Option<TimerKind>) -> u8 {
    match t {
        None => 0,
        Some(TimerKind::Retransmit) => 1,
        Some(TimerKind::ZeroWindowProbe) => 2,
        Some(TimerKind::Keepalive) => 3,
    }
}

fn timer_kind(code: u8) -> Option<TimerKind> {
    match code & 3 {
        1 => Some(TimerKind::Retransmit),
        2 => Some(TimerKind::ZeroWindowProbe),
        3 => Some(TimerKind::Keepalive),
        _ => None,
    }
}

fn timeout_code(t: Option<TimeoutCause>) -> u8 {
    match t {
        None => 0,
        Some(TimeoutCause::Keepalive) => 1,
        Some(TimeoutCause::Retransmission) => 2,
        Some(TimeoutCause::UserTimeout) => 3,
    }
}

fn timeout_cause(code: u8) -> Option<TimeoutCause> {
    match code & 3 {
        1 => Some(TimeoutCause::Keepalive),
        2 => Some(TimeoutCause::Retransmission),
        3 => Some(TimeoutCause::UserTimeout),
        _ => None,
    }
}

fn v4(a: Option<IpAddr>) -> Option<u32> {
    match a? {
        IpAddr::V4(a) => Some(a.to_bits()),
        IpAddr::V6(_) => None,
    }
}

impl Narrow {
    /// `None` when a value of `c` does not fit. `owners` are `c.owners`,
    /// shared; `stats` is `c.stats` boxed (or `None` to only ask whether
    /// `c` fits: then nothing is allocated).
    fn with(c: &Conn, owners: Option<Owners>, stats: Option<Box<ConnStats>>) -> Option<Narrow> {
        let n = |v: u64| u32::try_from(v).ok();
        let b = |v: u32| u8::try_from(v).ok();
        Some(Narrow {
            owners,
            stats,
            netns: c.id.netns,
            ino: n(c.ino)?,
            saddr: v4(c.id.saddr)?,
            daddr: v4(c.id.daddr)?,
            keepalive_idle_ms: n(c.keepalive.idle_ms)?,
            keepalive_intvl_ms: n(c.keepalive.intvl_ms)?,
            total_retrans: c.total_retrans,
            user_timeout_ms: c.user_timeout_ms,
            rto_ms: n(c.rto_ms)?,
            last_send_ms: n(c.last_send_ms)?,
            last_recv_ms: n(c.last_recv_ms)?,
            last_ack_ms: n(c.last_ack_ms)?,
            recv_queue: c.recv_queue,
            send_queue: c.send_queue,
            timer_fires_in_ms: match c.timer {
                Some(t) => i32::try_from(t.fires_in_ms).ok()?,
                None => 0,
            },
            sport: c.id.sport,
            dport: c.id.dport,
            state: b(c.id.state)?,
            probes_out: b(c.probes_out)?,
            retransmits: b(c.retransmits)?,
            backoff: b(c.backoff)?,
            retries2: b(c.retries2)?,
            keepalive_probes: b(c.keepalive.probes)?,
            full: c.full,
            flags: if c.kernel_orphan { FLAG_ORPHAN } else { 0 }
                | if c.keepalive.enabled {
                    FLAG_KEEPALIVE
                } else {
                    0
                }
                | timer_code(c.timer.map(|t| t.kind)) << TIMER_SHIFT
                | timeout_code(c.timed_out) << TIMEOUT_SHIFT,
        })
    }

    fn conn(&self, cookie: u64) -> Conn {
        Conn {
            owners: self.owners.as_deref().cloned().unwrap_or_default(),
            ..self.conn_without_owners(cookie)
        }
    }

    /// The connection with an empty owner list (nothing allocated).
    fn conn_without_owners(&self, cookie: u64) -> Conn {
        Conn {
            id: ConnId {
                cookie,
                netns: self.netns,
                saddr: Some(IpAddr::V4(Ipv4Addr::from_bits(self.saddr))),
                sport: self.sport,
                daddr: Some(IpAddr::V4(Ipv4Addr::from_bits(self.daddr))),
                dport: self.dport,
                state: self.state.into(),
            },
            ino: self.ino.into(),
            kernel_orphan: self.flags & FLAG_ORPHAN != 0,
            owners: Vec::new(),
            keepalive: Keepalive {
                enabled: self.flags & FLAG_KEEPALIVE != 0,
                idle_ms: self.keepalive_idle_ms.into(),
                intvl_ms: self.keepalive_intvl_ms.into(),
                probes: self.keepalive_probes.into(),
            },
            probes_out: self.probes_out.into(),
            retransmits: self.retransmits.into(),
            backoff: self.backoff.into(),
            total_retrans: self.total_retrans,
            user_timeout_ms: self.user_timeout_ms,
            rto_ms: self.rto_ms.into(),
            retries2: self.retries2.into(),
            last_send_ms: self.last_send_ms.into(),
            last_recv_ms: self.last_recv_ms.into(),
            last_ack_ms: self.last_ack_ms.into(),
            recv_queue: self.recv_queue,
            send_queue: self.send_queue,
            timer: timer_kind(self.flags >> TIMER_SHIFT).map(|kind| Timer {
                kind,
                fires_in_ms: self.timer_fires_in_ms.into(),
            }),
            stats: self.stats.as_deref().copied(),
            timed_out: timeout_cause(self.flags >> TIMEOUT_SHIFT),
            full: self.full,
        }
    }
}

impl Packed {
    /// Packs `c`; its owners are shared with `owners` when that holds the
    /// same ones (the walk hands every socket of a process the same list).
    pub fn new(c: &Conn, owners: Option<&Owners>) -> Packed {
        let shared = if c.owners.is_empty() {
            None
        } else {
            match owners {
                Some(o) if **o == *c.owners => Some(o.clone()),
                _ => Some(Arc::new(c.owners.clone())),
            }
        };
        Packed::owned(c, shared)
    }

    /// Packs `c` with `owners` as its owners (`c.owners` is not read):
    /// for a connection whose owner list is already shared.
    pub fn owned(c: &Conn, owners: Option<Owners>) -> Packed {
        match Narrow::with(c, None, c.stats.map(Box::new)) {
            Some(n) => Packed::Narrow(Narrow { owners, ..n }),
            None => Packed::Whole(Box::new(Conn {
                owners: owners.as_deref().cloned().unwrap_or_default(),
                ..c.clone()
            })),
        }
    }

    /// The connection, as it was packed.
    pub fn conn(&self, cookie: u64) -> Conn {
        match self {
            Packed::Narrow(n) => n.conn(cookie),
            Packed::Whole(c) => Conn {
                id: ConnId { cookie, ..c.id },
                ..(**c).clone()
            },
        }
    }

    /// The shared owner list, if any (for packing the next version of this
    /// connection without copying it again).
    pub fn owners(&self) -> Option<&Owners> {
        match self {
            Packed::Narrow(n) => n.owners.as_ref(),
            Packed::Whole(_) => None,
        }
    }

    /// Its first owner, without unpacking.
    pub fn first_owner(&self) -> Option<&Owner> {
        match self {
            Packed::Narrow(n) => n.owners.as_deref().and_then(|o| o.first()),
            Packed::Whole(c) => c.owners.first(),
        }
    }

    /// Whether any process holds it (all a verdict asks of its owners).
    pub fn held(&self) -> bool {
        self.first_owner().is_some()
    }

    /// Gives it `owner` when it has none (as a connection an event
    /// brought in, or one a walk found no holder for, learns its
    /// `connect()` owner).
    pub fn own_if_unowned(&mut self, owner: &Owner) {
        match self {
            Packed::Narrow(n) if n.owners.is_none() => {
                n.owners = Some(Arc::new(vec![owner.clone()]));
            }
            Packed::Whole(c) if c.owners.is_empty() => c.owners.push(owner.clone()),
            _ => {}
        }
    }

    /// Changes the connection in place by `change`, which gets it with
    /// an empty owner list: the owners stay as they are, shared, not
    /// copied out and packed again ([`Packed::held`] tells whether there
    /// are any). The result is packed as [`Packed::new`] would pack it
    /// (narrow when everything fits), without allocating when it stays
    /// narrow: the table does this once per event.
    pub fn change<R>(&mut self, cookie: u64, change: impl FnOnce(&mut Conn) -> R) -> R {
        match self {
            Packed::Narrow(n) => {
                let mut c = n.conn_without_owners(cookie);
                let r = change(&mut c);
                // The stats box is reused: the value goes in it.
                let stats = match (n.stats.take(), c.stats) {
                    (Some(mut b), Some(s)) => {
                        *b = s;
                        Some(b)
                    }
                    (_, s) => s.map(Box::new),
                };
                match Narrow::with(&c, None, stats) {
                    Some(narrowed) => {
                        let owners = n.owners.take();
                        *n = Narrow { owners, ..narrowed };
                    }
                    None => {
                        c.owners = n.owners.as_deref().cloned().unwrap_or_default();
                        *self = Packed::Whole(Box::new(c));
                    }
                }
                r
            }
            Packed::Whole(c) => {
                let owners = std::mem::take(&mut c.owners);
                c.id.cookie = cookie;
                let r = change(c);
                c.owners = owners;
                if Narrow::with(c, None, None).is_some() {
                    *self = Packed::new(c, None);
                }
                r
            }
        }
    }

    pub fn set_stats(&mut self, stats: ConnStats) {
        match self {
            Packed::Narrow(n) => match &mut n.stats {
                Some(s) => **s = stats,
                None => n.stats = Some(Box::new(stats)),
            },
            Packed::Whole(c) => c.stats = Some(stats),
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use proptest::prelude::*;

    fn owner(pid: u32) -> Owner {
        Owner {
            pid,
            comm: crate::events::Comm::from_bytes(b"app"),
        }
    }

    fn addr() -> impl Strategy<Value = Option<IpAddr>> {
        prop_oneof![
            8 => any::<u32>().prop_map(|a| Some(IpAddr::V4(Ipv4Addr::from_bits(a)))),
            1 => any::<u128>().prop_map(|a| Some(IpAddr::V6(a.into()))),
            1 => Just(None),
        ]
    }

    /// Mostly values that fit, sometimes values that do not.
    fn wide() -> impl Strategy<Value = u64> {
        prop_oneof![8 => 0..=u64::from(u32::MAX), 1 => any::<u64>()]
    }

    fn small() -> impl Strategy<Value = u32> {
        prop_oneof![8 => 0u32..=255, 1 => any::<u32>()]
    }

    prop_compose! {
        /// Any connection: mostly ones that pack narrow, some whole.
        pub(in crate::table) fn conn()(
            (cookie, netns, saddr, daddr, sport, dport) in
                (any::<u64>(), any::<u32>(), addr(), addr(), any::<u16>(), any::<u16>()),
            (state, ino, kernel_orphan, full, owners) in
                (small(), wide(), any::<bool>(), any::<bool>(), 0usize..3),
            (enabled, idle_ms, intvl_ms, probes) in (any::<bool>(), wide(), wide(), small()),
            (probes_out, retransmits, backoff, retries2) in (small(), small(), small(), small()),
            (total_retrans, user_timeout_ms, recv_queue, send_queue) in
                (any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>()),
            (rto_ms, last_send_ms, last_recv_ms, last_ack_ms) in (wide(), wide(), wide(), wide()),
            timer in proptest::option::of((0u8..3, prop_oneof![
                8 => i32::MIN as i64..=i32::MAX as i64, 1 => any::<i64>()])),
            stats in proptest::option::of(any::<[u32; 6]>()),
            timed_out in 0u8..4,
        ) -> Conn {
            Conn {
                id: ConnId { cookie, netns, saddr, sport, daddr, dport, state },
                ino, kernel_orphan,
                owners: (0..owners as u32).map(owner).collect(),
                keepalive: Keepalive { enabled, idle_ms, intvl_ms, probes },
                probes_out, retransmits, backoff, total_retrans, user_timeout_ms,
                rto_ms, retries2, last_send_ms, last_recv_ms, last_ack_ms,
                recv_queue, send_queue,
                timer: timer.map(|(k, fires_in_ms)| Timer {
                    kind: timer_kind(k + 1).unwrap(),
                    fires_in_ms,
                }),
                stats: stats.map(|s| ConnStats {
                    probes: s[0], retransmit_segs: s[1], resets_sent: s[2],
                    resets_received: s[3], timeouts: s[4], last_probe: s[5],
                }),
                timed_out: timeout_cause(timed_out),
                full,
            }
        }
    }

    proptest! {
        #[test]
        fn every_conn_comes_back_exactly(c in conn()) {
            let p = Packed::new(&c, None);
            prop_assert_eq!(p.conn(c.id.cookie), c.clone());
            prop_assert_eq!(p.first_owner(), c.owners.first());
        }
    }

    #[test]
    fn a_usual_connection_is_narrow_and_small() {
        let c = Conn {
            id: ConnId {
                saddr: Some("10.0.0.1".parse().unwrap()),
                daddr: Some("10.0.0.2".parse().unwrap()),
                ..ConnId::default()
            },
            owners: vec![owner(7)],
            ..Conn::default()
        };
        let p = Packed::new(&c, None);
        assert!(matches!(p, Packed::Narrow(_)));
        // The owner list is shared with the next version of it.
        let again = Packed::new(&c, p.owners());
        assert!(Arc::ptr_eq(again.owners().unwrap(), p.owners().unwrap()));
        // The table's memory budget (docs/benchmarks.md §3) rests on this.
        assert!(
            size_of::<Packed>() <= 88,
            "a packed connection grew to {} bytes",
            size_of::<Packed>()
        );
    }
}
