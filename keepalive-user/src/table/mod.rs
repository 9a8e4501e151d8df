//! The connection table: one [`Conn`] per TCP socket, built from the
//! kernel's socket iterator rows ([`SockRecord`]), the owning processes
//! (from /proc) and, while a monitor runs, the per-connection counters the
//! kernel keeps.

pub mod conn_table;
pub mod owners;
pub mod packed;
pub mod verdict;
pub mod walk;

use std::net::IpAddr;

use keepalive_common::{ConnStats, SockRecord, sock_flags};

use crate::events::{AF_INET6, Event, Owner, TimeoutCause};

/// A map keyed by socket cookie, as the per-event path keeps them: hashed
/// with foldhash instead of std's SipHash, which cost more than the rest of
/// a lookup. SipHash's keyed hashing defends against keys chosen to collide;
/// cookies are not chosen by anyone: the kernel hands them out from a
/// counter (`gen_cookie_next`, in sequence, per-CPU batches), so no peer or
/// local process can aim them at one bucket. foldhash still seeds each map
/// at random.
pub type CookieMap<V> = foldhash::HashMap<u64, V>;

/// Which of the socket's timers is pending, as `ss -o` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerKind {
    /// Retransmit, loss probe or reordering timer (`ss`: "on").
    Retransmit,
    /// Zero-window probe timer (`ss`: "probe").
    ZeroWindowProbe,
    /// `sk_timer`: keepalive, or the FIN_WAIT2 timer of an orphan (`ss`: "keepalive").
    Keepalive,
}

impl TimerKind {
    pub fn name(self) -> &'static str {
        match self {
            TimerKind::Retransmit => "retransmit",
            TimerKind::ZeroWindowProbe => "zero_window_probe",
            TimerKind::Keepalive => "keepalive",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timer {
    pub kind: TimerKind,
    /// Milliseconds until it fires (negative: overdue).
    pub fires_in_ms: i64,
}

/// Effective keepalive settings: the socket's own, else the namespace's sysctls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Keepalive {
    /// SO_KEEPALIVE is on.
    pub enabled: bool,
    pub idle_ms: u64,
    pub intvl_ms: u64,
    pub probes: u32,
}

/// Which connection a record is about: the fields every record of one
/// (events, verdicts, `tuned` records, rows) starts with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnId {
    /// The socket cookie: stable for the socket's life, the table's key.
    pub cookie: u64,
    /// Inode of the socket's network namespace.
    pub netns: u32,
    /// `None` when unknown.
    pub saddr: Option<IpAddr>,
    pub sport: u16,
    pub daddr: Option<IpAddr>,
    pub dport: u16,
    /// TCP state (`tcp_state`).
    pub state: u32,
}

impl ConnId {
    /// The connection an event is about, as the event has it.
    pub fn of_event(ev: &Event) -> ConnId {
        ConnId {
            cookie: ev.cookie,
            netns: ev.netns,
            saddr: Some(ev.saddr),
            sport: ev.sport,
            daddr: Some(ev.daddr),
            dport: ev.dport,
            state: ev.state,
        }
    }
}

/// One TCP connection (or listener) and everything known about it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Conn {
    pub id: ConnId,
    /// Socket inode (what /proc/PID/fd links to); 0 for orphans.
    pub ino: u64,
    /// The process closed it; the kernel still holds it.
    pub kernel_orphan: bool,
    /// Processes holding the socket open (several when the fd is shared).
    pub owners: Vec<Owner>,
    pub keepalive: Keepalive,
    /// Keepalive or zero-window probes sent and not answered.
    pub probes_out: u32,
    /// Consecutive RTO retransmissions without an ACK (icsk_retransmits).
    pub retransmits: u32,
    pub backoff: u32,
    pub total_retrans: u32,
    pub user_timeout_ms: u32,
    pub rto_ms: u64,
    /// The namespace's tcp_retries2.
    pub retries2: u32,
    pub last_send_ms: u64,
    pub last_recv_ms: u64,
    pub last_ack_ms: u64,
    pub recv_queue: u32,
    pub send_queue: u32,
    pub timer: Option<Timer>,
    /// Counters the kernel kept while a monitor ran.
    pub stats: Option<ConnStats>,
    /// The kernel aborted it with ETIMEDOUT.
    pub timed_out: Option<TimeoutCause>,
    /// A full socket (not TIME_WAIT or a request socket).
    pub full: bool,
}

/// The TCP state numbers, defined once in keepalive-common for both sides.
pub use keepalive_common::tcp_state::{
    CLOSE as TCP_CLOSE, CLOSE_WAIT as TCP_CLOSE_WAIT, CLOSING as TCP_CLOSING,
    ESTABLISHED as TCP_ESTABLISHED, FIN_WAIT1 as TCP_FIN_WAIT1, FIN_WAIT2 as TCP_FIN_WAIT2,
    LAST_ACK as TCP_LAST_ACK, LISTEN as TCP_LISTEN, SYN_SENT as TCP_SYN_SENT,
    TIME_WAIT as TCP_TIME_WAIT,
};

const ICSK_TIME_RETRANS: u8 = 1;
const ICSK_TIME_PROBE0: u8 = 3;
const ICSK_TIME_LOSS_PROBE: u8 = 5;
const ICSK_TIME_REO_TIMEOUT: u8 = 6;

/// Kernel tick rate, needed to turn jiffies into time.
///
/// The kernel starts `jiffies` at `INITIAL_JIFFIES` (2^32 - 300 HZ on 64
/// bit) when CLOCK_MONOTONIC is 0, so `jiffies = 2^32 + HZ (mono_s - 300)`
/// holds for exactly one of the possible HZ values.
pub fn detect_hz(jiffies64: u64, mono_ns: u64) -> Option<u64> {
    const CANDIDATES: [u64; 12] = [100, 250, 300, 1000, 24, 48, 64, 128, 256, 512, 1024, 1200];
    let mono_s = mono_ns as f64 / 1e9;
    let mut fits = CANDIDATES.into_iter().filter(|&hz| {
        let expect = 4294967296.0 + hz as f64 * (mono_s - 300.0);
        // Half a second of slack, plus 0.1% drift.
        (jiffies64 as f64 - expect).abs() <= hz as f64 * (0.5 + 0.001 * mono_s)
    });
    // Near 300 s of uptime every HZ fits: then we cannot tell.
    match (fits.next(), fits.next()) {
        (Some(hz), None) => Some(hz),
        _ => None,
    }
}

/// Nearest usual HZ to a measured tick rate.
pub fn nearest_hz(measured: f64) -> u64 {
    [
        100u64, 250, 300, 1000, 24, 48, 64, 128, 256, 512, 1024, 1200,
    ]
    .into_iter()
    .min_by(|a, b| {
        let da = (*a as f64 - measured).abs();
        let db = (*b as f64 - measured).abs();
        da.total_cmp(&db)
    })
    .unwrap_or(250)
}

fn addr(family: u8, raw: &[u8; 16]) -> IpAddr {
    if family == AF_INET6 {
        IpAddr::from(*raw)
    } else {
        IpAddr::from([raw[0], raw[1], raw[2], raw[3]])
    }
}

impl Conn {
    /// Builds a connection from an iterator row; `hz` converts jiffies.
    pub fn from_record(r: &SockRecord, hz: u64) -> Conn {
        let ms = |j: u64| j * 1000 / hz.max(1);
        let now32 = r.now_jiffies as u32;
        let age = |stamp: u32| ms(now32.wrapping_sub(stamp) as u64);
        let full = r.flags & sock_flags::FULL != 0;
        let or = |own: u32, ns: u32| if own != 0 { own } else { ns };
        let timer = if !full {
            None
        } else if matches!(
            r.pending,
            ICSK_TIME_RETRANS | ICSK_TIME_LOSS_PROBE | ICSK_TIME_REO_TIMEOUT
        ) {
            Some((TimerKind::Retransmit, r.rtx_expires))
        } else if r.pending == ICSK_TIME_PROBE0 {
            Some((TimerKind::ZeroWindowProbe, r.rtx_expires))
        } else if r.flags & sock_flags::SK_TIMER_PENDING != 0 {
            Some((TimerKind::Keepalive, r.sk_timer_expires))
        } else {
            None
        }
        .map(|(kind, expires)| {
            let delta = expires.wrapping_sub(r.now_jiffies) as i64;
            Timer {
                kind,
                fires_in_ms: delta * 1000 / hz.max(1) as i64,
            }
        });
        let mut conn = Conn {
            id: ConnId {
                cookie: r.cookie,
                netns: r.netns,
                saddr: Some(addr(r.family, &r.saddr)),
                sport: r.sport,
                daddr: Some(addr(r.family, &r.daddr)),
                dport: r.dport,
                state: r.state as u32,
            },
            ino: r.ino,
            // A timewait minisock in FIN_WAIT2 is an orphan too.
            kernel_orphan: r.flags & sock_flags::ORPHAN != 0,
            owners: Vec::new(),
            keepalive: Keepalive {
                enabled: r.flags & sock_flags::KEEPALIVE != 0,
                idle_ms: ms(or(r.keepalive_time, r.net_keepalive_time) as u64),
                intvl_ms: ms(or(r.keepalive_intvl, r.net_keepalive_intvl) as u64),
                probes: or(r.keepalive_probes as u32, r.net_keepalive_probes as u32),
            },
            probes_out: r.probes_out as u32,
            retransmits: r.retransmits as u32,
            backoff: r.backoff as u32,
            total_retrans: r.total_retrans,
            user_timeout_ms: r.user_timeout_ms,
            rto_ms: ms(r.rto_jiffies as u64),
            retries2: r.net_retries2 as u32,
            last_send_ms: age(r.lsndtime),
            last_recv_ms: age(r.lrcvtime),
            last_ack_ms: age(r.rcv_tstamp),
            recv_queue: r.recv_queue,
            send_queue: r.send_queue,
            timer,
            stats: None,
            timed_out: None,
            full,
        };
        if !full {
            // TIME_WAIT and request sockets are smaller structs: only the
            // tuple and state mean anything.
            conn = Conn {
                id: conn.id,
                kernel_orphan: conn.kernel_orphan,
                ..Conn::default()
            };
        }
        conn
    }

    /// Time since anything was received or sent.
    pub fn idle_ms(&self) -> u64 {
        self.last_recv_ms.min(self.last_send_ms)
    }
}

/// The event filters applied to a tracked connection (ports, addresses,
/// owners; kinds do not apply to connections). Lives with [`Conn`] so the
/// filter module does not need the table.
pub trait MatchesConn {
    fn matches_conn(&self, c: &Conn) -> bool;
}

impl MatchesConn for crate::events::filter::Filter {
    fn matches_conn(&self, c: &Conn) -> bool {
        self.matches_tuple(
            c.id.sport,
            c.id.dport,
            c.id.saddr,
            c.id.daddr,
            c.owners.iter().map(|o| o.pid),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hz_from_jiffies_and_uptime() {
        for hz in [100u64, 250, 300, 1000] {
            for uptime_s in [1u64, 250, 350, 3600, 86400 * 30] {
                let j = (1u64 << 32) - 300 * hz + uptime_s * hz;
                assert_eq!(
                    detect_hz(j, uptime_s * 1_000_000_000),
                    Some(hz),
                    "hz {hz} uptime {uptime_s}"
                );
            }
        }
        assert_eq!(detect_hz(12345, 1_000_000_000_000), None);
        // Around 300 s of uptime the formula cannot tell HZ apart.
        assert_eq!(detect_hz(1 << 32, 300_000_000_000), None);
        assert_eq!(nearest_hz(997.0), 1000);
        assert_eq!(nearest_hz(251.3), 250);
    }

    fn record() -> SockRecord {
        SockRecord {
            cookie: 5,
            now_jiffies: 10_000,
            family: 2,
            state: 1,
            flags: sock_flags::FULL | sock_flags::KEEPALIVE | sock_flags::SK_TIMER_PENDING,
            sk_timer_expires: 10_250,
            net_keepalive_time: 7_200_000,
            net_keepalive_intvl: 75_000,
            net_keepalive_probes: 9,
            keepalive_time: 1_000,
            lsndtime: 9_000,
            lrcvtime: 9_500,
            rcv_tstamp: 9_400,
            saddr: [198, 18, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ..SockRecord::default()
        }
    }

    #[test]
    fn settings_fall_back_to_the_namespace() {
        let c = Conn::from_record(&record(), 1000);
        assert!(c.keepalive.enabled);
        assert_eq!(c.keepalive.idle_ms, 1_000);
        assert_eq!(c.keepalive.intvl_ms, 75_000);
        assert_eq!(c.keepalive.probes, 9);
    }

    #[test]
    fn ages_and_timers_in_milliseconds() {
        let c = Conn::from_record(&record(), 250);
        assert_eq!(c.last_send_ms, 4_000);
        assert_eq!(c.last_recv_ms, 2_000);
        assert_eq!(c.last_ack_ms, 2_400);
        assert_eq!(c.idle_ms(), 2_000);
        assert_eq!(
            c.timer,
            Some(Timer {
                kind: TimerKind::Keepalive,
                fires_in_ms: 1_000
            })
        );
        assert_eq!(c.id.saddr.unwrap().to_string(), "198.18.0.1");
    }

    #[test]
    fn retransmit_timer_wins_over_keepalive() {
        let mut r = record();
        r.pending = ICSK_TIME_RETRANS;
        r.rtx_expires = 10_200;
        let c = Conn::from_record(&r, 1000);
        assert_eq!(c.timer.unwrap().kind, TimerKind::Retransmit);
        assert_eq!(c.timer.unwrap().fires_in_ms, 200);
        r.pending = ICSK_TIME_PROBE0;
        assert_eq!(
            Conn::from_record(&r, 1000).timer.unwrap().kind,
            TimerKind::ZeroWindowProbe
        );
    }

    #[test]
    fn jiffies_wraparound() {
        let mut r = record();
        r.now_jiffies = (1u64 << 32) + 100;
        r.lsndtime = u32::MAX - 99; // 200 jiffies ago, across the u32 wrap
        assert_eq!(Conn::from_record(&r, 1000).last_send_ms, 200);
    }
}
