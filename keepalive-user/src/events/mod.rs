//! Typed events: what a [`RawEvent`] from the kernel means.
//!
//! Decoding is pure (no kernel access) so it is unit-tested on constructed
//! records. The cause of a timeout and the names of reset reasons are
//! decided here, not in the eBPF programs.

pub mod comm;
pub mod filter;

pub use comm::Comm;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use keepalive_common::{RawEvent, flags, kind};

pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;

/// TCP states, kernel numbering (include/net/tcp_states.h).
pub use keepalive_common::tcp_state::name as state_name;

/// Event kinds, as named on the command line (`--event`) and in the
/// output (`event`): clap and serde derive both from the variant names.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum, serde::Serialize,
)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Kind {
    Retransmit,
    ResetSent,
    ResetReceived,
    StateChange,
    KeepaliveProbe,
    Timeout,
    /// A connection's verdict changed (made in userspace by the table).
    Verdict,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Retransmit,
        Kind::ResetSent,
        Kind::ResetReceived,
        Kind::StateChange,
        Kind::KeepaliveProbe,
        Kind::Timeout,
        Kind::Verdict,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Retransmit => "retransmit",
            Kind::ResetSent => "reset_sent",
            Kind::ResetReceived => "reset_received",
            Kind::StateChange => "state_change",
            Kind::KeepaliveProbe => "keepalive_probe",
            Kind::Timeout => "timeout",
            Kind::Verdict => "verdict",
        }
    }

    /// The number the kernel side uses.
    pub fn raw(self) -> u8 {
        match self {
            Kind::Retransmit => kind::RETRANSMIT,
            Kind::ResetSent => kind::RESET_SENT,
            Kind::ResetReceived => kind::RESET_RECEIVED,
            Kind::StateChange => kind::STATE_CHANGE,
            Kind::KeepaliveProbe => kind::KEEPALIVE_PROBE,
            Kind::Timeout => kind::TIMEOUT,
            // Not a kernel event.
            Kind::Verdict => 0,
        }
    }

    fn from_raw(k: u8) -> Option<Kind> {
        Kind::ALL.into_iter().find(|x| x.raw() == k && k != 0)
    }

    /// Made by the kernel (as opposed to userspace).
    pub fn is_kernel(self) -> bool {
        self.raw() != 0
    }
}

/// Why the kernel aborted a connection with ETIMEDOUT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeoutCause {
    /// Keepalive probes ran out (`tcp_keepalive_timer` gave up).
    Keepalive,
    /// RTO retries ran out (tcp_retries2 / tcp_syn_retries).
    Retransmission,
    /// TCP_USER_TIMEOUT expired with data unacknowledged.
    UserTimeout,
}

impl TimeoutCause {
    pub fn name(self) -> &'static str {
        match self {
            TimeoutCause::Keepalive => "keepalive",
            TimeoutCause::Retransmission => "retransmission",
            TimeoutCause::UserTimeout => "user_timeout",
        }
    }

    /// Keepalive aborts happen only inside the keepalive timer. Elsewhere
    /// the retransmit path gives up on TCP_USER_TIMEOUT when one is set and
    /// on its retry count otherwise (`retransmits_timed_out`).
    pub fn classify(event_flags: u8, user_timeout_ms: u32) -> TimeoutCause {
        if event_flags & flags::IN_KEEPALIVE_TIMER != 0 {
            TimeoutCause::Keepalive
        } else if user_timeout_ms != 0 {
            TimeoutCause::UserTimeout
        } else {
            TimeoutCause::Retransmission
        }
    }
}

/// The per-kind part of an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Detail {
    Retransmit {
        segs: u32,
        /// The segment carries SYN (a SYN, or with `synack` a SYN-ACK).
        syn: bool,
        /// A listener's SYN-ACK, sent again for a connection not yet
        /// established (`tcp_retransmit_synack`).
        synack: bool,
        /// Result of the (re)transmit: 0, or a negative errno.
        err: i32,
    },
    ResetSent {
        /// Kernel reset reason (`enum sk_rst_reason` without its prefix), when the kernel has one.
        reason: Option<String>,
        /// No socket matched the packet (e.g. a closed port).
        no_socket: bool,
    },
    ResetReceived,
    StateChange {
        old: u32,
        new: u32,
    },
    KeepaliveProbe {
        /// 1 for the first unanswered probe, 2 for the second, ...
        probe: u32,
    },
    Timeout {
        cause: TimeoutCause,
        /// Unanswered keepalive/window probes when the kernel gave up.
        probes_out: u32,
        user_timeout_ms: u32,
    },
}

/// A process that owns a connection.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Owner {
    pub pid: u32,
    /// Chosen by the process: escape it for text (its `Display` does).
    pub comm: Comm,
}

/// One decoded event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// CLOCK_MONOTONIC nanoseconds, as the kernel stamped it.
    pub ts_mono_ns: u64,
    pub cookie: u64,
    pub netns: u32,
    pub saddr: IpAddr,
    pub sport: u16,
    pub daddr: IpAddr,
    pub dport: u16,
    pub state: u32,
    pub owner: Option<Owner>,
    pub detail: Detail,
}

impl Event {
    pub fn kind(&self) -> Kind {
        match self.detail {
            Detail::Retransmit { .. } => Kind::Retransmit,
            Detail::ResetSent { .. } => Kind::ResetSent,
            Detail::ResetReceived => Kind::ResetReceived,
            Detail::StateChange { .. } => Kind::StateChange,
            Detail::KeepaliveProbe { .. } => Kind::KeepaliveProbe,
            Detail::Timeout { .. } => Kind::Timeout,
        }
    }
}

/// Whether the kernel counted a retransmission that ended with `err` in
/// Tcp.RetransSegs (and in the socket's `tcpi_total_retrans`).
/// `__tcp_retransmit_skb` counts the segments just before handing them to
/// the IP layer, so a failure there (-ENOBUFS, a netfilter -EPERM, a
/// queue's drop...) was counted; the checks before it give up uncounted:
/// still queued (-EBUSY), acked meanwhile (-EINVAL), no memory to trim or
/// split (-ENOMEM), no route (-EHOSTUNREACH), closed window (-EAGAIN).
/// The eBPF side keeps per-connection counters by the same rule.
pub fn counted_in_retranssegs(err: i32) -> bool {
    !matches!(
        -err,
        libc::EBUSY | libc::EINVAL | libc::ENOMEM | libc::EHOSTUNREACH | libc::EAGAIN
    )
}

/// Names of `enum sk_rst_reason` values, indexed by value (from kernel BTF).
#[derive(Clone, Debug, Default)]
pub struct ResetReasons(pub Vec<Option<String>>);

impl ResetReasons {
    pub fn name(&self, v: u32) -> String {
        self.0
            .get(v as usize)
            .cloned()
            .flatten()
            .unwrap_or_else(|| format!("UNKNOWN_{v}"))
    }
}

/// The address in a kernel record's 16 address bytes (IPv4 in the first 4).
pub fn addr(family: u8, raw: &[u8; 16]) -> IpAddr {
    if family == AF_INET6 {
        let v6 = Ipv6Addr::from(*raw);
        IpAddr::V6(v6)
    } else {
        IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
    }
}

/// Decodes a kernel record; `None` for a kind this build does not know.
pub fn decode(raw: &RawEvent, reasons: &ResetReasons) -> Option<Event> {
    let detail = match Kind::from_raw(raw.kind)? {
        Kind::Verdict => return None,
        Kind::Retransmit => Detail::Retransmit {
            segs: raw.segs as u32,
            syn: raw.flags & flags::SYN != 0,
            synack: raw.flags & flags::SYN_ACK != 0,
            err: raw.err as i32,
        },
        Kind::ResetSent => Detail::ResetSent {
            reason: (raw.flags & flags::HAS_REASON != 0).then(|| reasons.name(raw.reason)),
            no_socket: raw.flags & flags::NO_SOCKET != 0,
        },
        Kind::ResetReceived => Detail::ResetReceived,
        Kind::StateChange => Detail::StateChange {
            old: raw.old_state as u32,
            new: raw.new_state as u32,
        },
        Kind::KeepaliveProbe => Detail::KeepaliveProbe {
            probe: raw.probes_out as u32,
        },
        Kind::Timeout => Detail::Timeout {
            cause: TimeoutCause::classify(raw.flags, raw.user_timeout_ms),
            probes_out: raw.probes_out as u32,
            user_timeout_ms: raw.user_timeout_ms,
        },
    };
    Some(Event {
        ts_mono_ns: raw.ts_ns,
        cookie: raw.cookie,
        netns: raw.netns,
        saddr: addr(raw.family, &raw.saddr),
        sport: raw.sport,
        daddr: addr(raw.family, &raw.daddr),
        dport: raw.dport,
        state: raw.state as u32,
        owner: (raw.pid != 0).then(|| Owner {
            pid: raw.pid,
            comm: Comm::from_bytes(&raw.comm),
        }),
        detail,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(k: u8) -> RawEvent {
        let mut r = RawEvent {
            kind: k,
            family: AF_INET,
            state: 1,
            sport: 40000,
            dport: 80,
            cookie: 77,
            netns: 4026531840,
            ..RawEvent::default()
        };
        r.saddr[..4].copy_from_slice(&[198, 18, 0, 1]);
        r.daddr[..4].copy_from_slice(&[198, 18, 0, 2]);
        r
    }

    #[test]
    fn decodes_ipv4_tuple_and_owner() {
        let mut r = raw(kind::RETRANSMIT);
        r.segs = 3;
        r.flags = flags::SYN;
        r.pid = 42;
        r.comm[..4].copy_from_slice(b"curl");
        let e = decode(&r, &ResetReasons::default()).unwrap();
        assert_eq!(e.saddr.to_string(), "198.18.0.1");
        assert_eq!(e.daddr.to_string(), "198.18.0.2");
        assert_eq!(
            e.detail,
            Detail::Retransmit {
                segs: 3,
                syn: true,
                synack: false,
                err: 0
            }
        );
        assert_eq!(
            e.owner,
            Some(Owner {
                pid: 42,
                comm: "curl".into()
            })
        );
    }

    #[test]
    fn decodes_ipv6() {
        let mut r = raw(kind::RESET_RECEIVED);
        r.family = AF_INET6;
        r.saddr = "fd00::1".parse::<Ipv6Addr>().unwrap().octets();
        r.daddr = "fd00::2".parse::<Ipv6Addr>().unwrap().octets();
        let e = decode(&r, &ResetReasons::default()).unwrap();
        assert_eq!(e.saddr.to_string(), "fd00::1");
        assert_eq!(e.daddr.to_string(), "fd00::2");
        assert_eq!(e.owner, None);
    }

    #[test]
    fn retranssegs_counts_failed_transmits_not_early_give_ups() {
        // Handed to IP, dropped by a full queue (NET_XMIT_DROP), no
        // buffer, dropped by netfilter on output: counted.
        for err in [0, 1, -libc::ENOBUFS, -libc::EPERM] {
            assert!(counted_in_retranssegs(err), "{err}");
        }
        for err in [
            -libc::EBUSY,
            -libc::EINVAL,
            -libc::ENOMEM,
            -libc::EHOSTUNREACH,
            -libc::EAGAIN,
        ] {
            assert!(!counted_in_retranssegs(err), "{err}");
        }
    }

    #[test]
    fn decodes_a_synack_retransmit() {
        let mut r = raw(kind::RETRANSMIT);
        r.segs = 1;
        r.flags = flags::SYN | flags::SYN_ACK;
        r.state = 12;
        let e = decode(&r, &ResetReasons::default()).unwrap();
        assert_eq!(
            e.detail,
            Detail::Retransmit {
                segs: 1,
                syn: true,
                synack: true,
                err: 0
            }
        );
        assert_eq!(state_name(e.state), "NEW_SYN_RECV");
    }

    #[test]
    fn reset_reason_only_when_kernel_has_one() {
        let reasons = ResetReasons(vec![Some("NOT_SPECIFIED".into()), Some("NO_SOCKET".into())]);
        let mut r = raw(kind::RESET_SENT);
        r.reason = 1;
        let e = decode(&r, &reasons).unwrap();
        assert_eq!(
            e.detail,
            Detail::ResetSent {
                reason: None,
                no_socket: false
            }
        );
        r.flags = flags::HAS_REASON | flags::NO_SOCKET;
        let e = decode(&r, &reasons).unwrap();
        assert_eq!(
            e.detail,
            Detail::ResetSent {
                reason: Some("NO_SOCKET".into()),
                no_socket: true
            }
        );
        r.reason = 99;
        let e = decode(&r, &reasons).unwrap();
        assert!(
            matches!(e.detail, Detail::ResetSent { reason: Some(ref s), .. } if s == "UNKNOWN_99")
        );
    }

    #[test]
    fn timeout_cause_rules() {
        use TimeoutCause::*;
        assert_eq!(
            TimeoutCause::classify(flags::IN_KEEPALIVE_TIMER, 0),
            Keepalive
        );
        // keepalive wins even with a user timeout: the keepalive timer aborted it
        assert_eq!(
            TimeoutCause::classify(flags::IN_KEEPALIVE_TIMER, 5000),
            Keepalive
        );
        assert_eq!(
            TimeoutCause::classify(flags::IN_WRITE_TIMER, 0),
            Retransmission
        );
        assert_eq!(
            TimeoutCause::classify(flags::IN_WRITE_TIMER, 2000),
            UserTimeout
        );
        assert_eq!(TimeoutCause::classify(0, 0), Retransmission);
        assert_eq!(TimeoutCause::classify(0, 1), UserTimeout);
    }

    #[test]
    fn unknown_kind_is_skipped() {
        assert!(decode(&raw(200), &ResetReasons::default()).is_none());
    }

    #[test]
    fn kind_names_round_trip() {
        use clap::ValueEnum;
        for k in Kind::ALL {
            assert_eq!(Kind::from_str(k.name(), false), Ok(k));
            assert_eq!(serde_json::to_value(k).unwrap(), k.name());
            if k.is_kernel() {
                assert_eq!(Kind::from_raw(k.raw()), Some(k));
            }
        }
        assert_eq!(Kind::from_raw(0), None);
        assert!(Kind::from_str("nope", false).is_err());
    }

    #[test]
    fn state_names() {
        assert_eq!(state_name(1), "ESTABLISHED");
        assert_eq!(state_name(8), "CLOSE_WAIT");
        assert_eq!(state_name(99), "UNKNOWN");
    }
}
