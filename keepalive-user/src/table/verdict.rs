//! Verdicts: is a connection dead, orphaned, unprotected or healthy, and
//! why. Pure rules over a [`Conn`], each verdict carrying the numbers
//! behind it so the reason can be shown in words.

use crate::events::{TimeoutCause, state_name};

use super::{
    Conn, TCP_CLOSE_WAIT, TCP_CLOSING, TCP_ESTABLISHED, TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_LAST_ACK,
    TCP_SYN_SENT, TimerKind,
};

/// Thresholds of the rules (flags and config; defaults documented in the README).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    /// CLOSE_WAIT longer than this is a leak.
    pub close_wait_ms: u64,
    /// Established and idle longer than this without working keepalive is unprotected.
    pub idle_ms: u64,
    /// NAT/load-balancer idle timeout a silent connection must be probed within.
    pub middlebox_idle_ms: u64,
    /// Consecutive unanswered RTO retransmissions that make a connection dead.
    pub dead_retransmits: u32,
    /// Owners were looked up (/proc scanned), so "no owner" means none.
    pub owners_known: bool,
    /// Count the newest keepalive probe as not yet unanswered: it may be
    /// in flight (a live peer answers within a round trip). The monitor's
    /// table, which sees each probe sent, judges so whether a walk or an
    /// event told it the kernel's `probes_out`, so both agree; a snapshot,
    /// which only sees the kernel's count, does not (docs/verdicts.md).
    pub newest_probe_in_flight: bool,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            close_wait_ms: 60_000,
            idle_ms: 60_000,
            middlebox_idle_ms: 350_000,
            dead_retransmits: 3,
            owners_known: true,
            newest_probe_in_flight: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dead {
    /// Keepalive probes are going unanswered.
    ProbesUnanswered {
        unanswered_probes: u32,
        probes: u32,
        gives_up_in_ms: i64,
    },
    /// Retransmissions back off with no ACK progress.
    RetransmitBackoff {
        retransmits: u32,
        /// `None` before the handshake completed (SYN_SENT): no ACK yet.
        since_last_ack_ms: Option<u64>,
        gives_up_in_ms: i64,
    },
    /// The kernel already aborted it.
    TimedOut { cause: TimeoutCause },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Orphaned {
    /// Closed by the process, still held by the kernel.
    Kernel {
        state: u32,
        waiting_for: &'static str,
        idle_ms: u64,
    },
    /// The peer closed; the application never did.
    CloseWaitLeak { idle_ms: u64 },
    /// Established, but no process holds it any more.
    NoOwner { idle_ms: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unprotected {
    /// Idle with SO_KEEPALIVE off: a silent peer would never be noticed.
    KeepaliveOff { idle_ms: u64 },
    /// Keepalive starts only after the middlebox has forgotten the flow.
    KeepaliveTooLate {
        idle_ms: u64,
        keepalive_idle_ms: u64,
        middlebox_idle_ms: u64,
    },
}

/// The four verdicts without their reasons, as named on the command line
/// (`--verdict`), in filters and in the output.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum, serde::Serialize,
)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum VerdictKind {
    Dead,
    Orphaned,
    Unprotected,
    Healthy,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Dead(Dead),
    Orphaned(Orphaned),
    Unprotected(Unprotected),
    Healthy,
}

fn secs(ms: u64) -> String {
    if ms >= 10_000 {
        format!("{}s", ms / 1000)
    } else {
        format!("{:.1}s", ms as f64 / 1000.0)
    }
}

fn secs_i(ms: i64) -> String {
    secs(ms.max(0) as u64)
}

impl Verdict {
    pub fn kind(&self) -> VerdictKind {
        match self {
            Verdict::Dead(_) => VerdictKind::Dead,
            Verdict::Orphaned(_) => VerdictKind::Orphaned,
            Verdict::Unprotected(_) => VerdictKind::Unprotected,
            Verdict::Healthy => VerdictKind::Healthy,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Verdict::Dead(_) => "dead",
            Verdict::Orphaned(_) => "orphaned",
            Verdict::Unprotected(_) => "unprotected",
            Verdict::Healthy => "healthy",
        }
    }

    /// Higher is worse; tables sort by it.
    pub fn severity(&self) -> u8 {
        match self {
            Verdict::Dead(_) => 3,
            Verdict::Orphaned(_) => 2,
            Verdict::Unprotected(_) => 1,
            Verdict::Healthy => 0,
        }
    }

    /// Short machine name of the reason (`probes_unanswered`, ...).
    pub fn reason_code(&self) -> &'static str {
        match self {
            Verdict::Dead(Dead::ProbesUnanswered { .. }) => "probes_unanswered",
            Verdict::Dead(Dead::RetransmitBackoff { .. }) => "retransmit_backoff",
            Verdict::Dead(Dead::TimedOut { .. }) => "timed_out",
            Verdict::Orphaned(Orphaned::Kernel { .. }) => "kernel_orphan",
            Verdict::Orphaned(Orphaned::CloseWaitLeak { .. }) => "close_wait_leak",
            Verdict::Orphaned(Orphaned::NoOwner { .. }) => "no_owner",
            Verdict::Unprotected(Unprotected::KeepaliveOff { .. }) => "keepalive_off",
            Verdict::Unprotected(Unprotected::KeepaliveTooLate { .. }) => "keepalive_too_late",
            Verdict::Healthy => "ok",
        }
    }

    /// The reason in words, with the numbers behind it.
    pub fn reason(&self) -> String {
        match self {
            Verdict::Dead(Dead::ProbesUnanswered {
                unanswered_probes,
                probes,
                gives_up_in_ms,
            }) => format!(
                "{unanswered_probes} of {probes} keepalive probes unanswered; kernel gives up in {}",
                secs_i(*gives_up_in_ms)
            ),
            Verdict::Dead(Dead::RetransmitBackoff {
                retransmits,
                since_last_ack_ms,
                gives_up_in_ms,
            }) => match since_last_ack_ms {
                Some(ms) => format!(
                    "{retransmits} retransmissions without an ACK, last ACK {} ago; kernel gives up in about {}",
                    secs(*ms),
                    secs_i(*gives_up_in_ms)
                ),
                None => format!(
                    "{retransmits} SYN retransmissions without an answer; kernel gives up in about {}",
                    secs_i(*gives_up_in_ms)
                ),
            },
            Verdict::Dead(Dead::TimedOut { cause }) => {
                format!("kernel aborted it with ETIMEDOUT ({})", cause.name())
            }
            Verdict::Orphaned(Orphaned::Kernel {
                state,
                waiting_for,
                idle_ms,
            }) => format!(
                "closed by its process, kernel holds it in {} waiting for {waiting_for}; idle {}",
                state_name(*state),
                secs(*idle_ms)
            ),
            Verdict::Orphaned(Orphaned::CloseWaitLeak { idle_ms }) => format!(
                "peer closed {} ago and the application never closed it (CLOSE_WAIT leak)",
                secs(*idle_ms)
            ),
            Verdict::Orphaned(Orphaned::NoOwner { idle_ms }) => format!(
                "established but no process holds it; idle {}",
                secs(*idle_ms)
            ),
            Verdict::Unprotected(Unprotected::KeepaliveOff { idle_ms }) => format!(
                "idle {} with keepalive off: a silent peer would never be noticed",
                secs(*idle_ms)
            ),
            Verdict::Unprotected(Unprotected::KeepaliveTooLate {
                idle_ms,
                keepalive_idle_ms,
                middlebox_idle_ms,
            }) => format!(
                "idle {}; keepalive starts after {}, later than the {} middlebox idle timeout",
                secs(*idle_ms),
                secs(*keepalive_idle_ms),
                secs(*middlebox_idle_ms)
            ),
            Verdict::Healthy => "ok".into(),
        }
    }
}

/// Worst case time until the kernel gives up retransmitting: the pending
/// timer, then the remaining backed-off RTOs (capped at TCP_RTO_MAX).
fn retransmit_gives_up_in(c: &Conn, fires_in_ms: i64) -> i64 {
    if c.user_timeout_ms != 0 {
        return c.user_timeout_ms as i64 - c.last_ack_ms as i64;
    }
    let mut left = fires_in_ms;
    let mut rto = c.rto_ms.max(1);
    for _ in c.retransmits..c.retries2 {
        rto = (rto * 2).min(120_000);
        left += rto as i64;
    }
    left
}

fn waiting_for(state: u32) -> &'static str {
    match state {
        TCP_FIN_WAIT1 | TCP_CLOSING | TCP_LAST_ACK => "the peer to acknowledge our FIN",
        _ => "the peer's FIN",
    }
}

/// Applies the rules, worst first.
pub fn judge(c: &Conn, t: &Thresholds) -> Verdict {
    judge_held(c, !c.owners.is_empty(), t)
}

/// [`judge`], told whether any process holds `c` instead of reading its
/// owners: the table judges a connection after every event without
/// copying its owner list out (it holds it shared), and the rules only
/// ask whether there is one.
pub fn judge_held(c: &Conn, held: bool, t: &Thresholds) -> Verdict {
    if let Some(cause) = c.timed_out {
        return Verdict::Dead(Dead::TimedOut { cause });
    }
    if c.full
        && let Some(timer) = c.timer
    {
        // `probes_out` is the kernel's count: probes sent since the last
        // answer, the newest included.
        let unanswered = if t.newest_probe_in_flight {
            c.probes_out.saturating_sub(1)
        } else {
            c.probes_out
        };
        if timer.kind == TimerKind::Keepalive && c.keepalive.enabled && unanswered >= 1 {
            // The kernel gives up when the timer fires with TCP_KEEPCNT
            // probes out: one more interval per probe still to send.
            let left = c.keepalive.probes.saturating_sub(c.probes_out) as i64;
            return Verdict::Dead(Dead::ProbesUnanswered {
                unanswered_probes: unanswered,
                probes: c.keepalive.probes,
                gives_up_in_ms: timer.fires_in_ms + left * c.keepalive.intvl_ms as i64,
            });
        }
        if timer.kind == TimerKind::Retransmit && c.retransmits >= t.dead_retransmits {
            return Verdict::Dead(Dead::RetransmitBackoff {
                retransmits: c.retransmits,
                // Before the handshake the kernel's last-ACK stamp is 0.
                since_last_ack_ms: (c.id.state != TCP_SYN_SENT).then_some(c.last_ack_ms),
                gives_up_in_ms: retransmit_gives_up_in(c, timer.fires_in_ms),
            });
        }
    }
    if c.kernel_orphan
        && matches!(
            c.id.state,
            TCP_FIN_WAIT1 | TCP_FIN_WAIT2 | TCP_CLOSING | TCP_LAST_ACK
        )
    {
        return Verdict::Orphaned(Orphaned::Kernel {
            state: c.id.state,
            waiting_for: waiting_for(c.id.state),
            idle_ms: c.idle_ms(),
        });
    }
    // A bare FIN does not move the last-data stamp, but it is an ACK and
    // moves the last-ACK one: the peer closed at most this long ago.
    let since_fin = c.last_recv_ms.min(c.last_ack_ms);
    if c.id.state == TCP_CLOSE_WAIT && since_fin >= t.close_wait_ms {
        return Verdict::Orphaned(Orphaned::CloseWaitLeak { idle_ms: since_fin });
    }
    if c.id.state == TCP_ESTABLISHED
        && t.owners_known
        && c.full
        && !c.kernel_orphan
        && c.ino != 0
        && !held
    {
        return Verdict::Orphaned(Orphaned::NoOwner {
            idle_ms: c.idle_ms(),
        });
    }
    if c.id.state == TCP_ESTABLISHED && c.full && c.idle_ms() >= t.idle_ms {
        if !c.keepalive.enabled {
            return Verdict::Unprotected(Unprotected::KeepaliveOff {
                idle_ms: c.idle_ms(),
            });
        }
        if c.keepalive.idle_ms > t.middlebox_idle_ms {
            return Verdict::Unprotected(Unprotected::KeepaliveTooLate {
                idle_ms: c.idle_ms(),
                keepalive_idle_ms: c.keepalive.idle_ms,
                middlebox_idle_ms: t.middlebox_idle_ms,
            });
        }
    }
    Verdict::Healthy
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Owner;
    use crate::table::{ConnId, Keepalive, Timer};

    fn established() -> Conn {
        Conn {
            id: ConnId {
                cookie: 1,
                state: TCP_ESTABLISHED,
                ..ConnId::default()
            },
            full: true,
            ino: 100,
            owners: vec![Owner {
                pid: 1,
                comm: "app".into(),
            }],
            keepalive: Keepalive {
                enabled: true,
                idle_ms: 30_000,
                intvl_ms: 10_000,
                probes: 5,
            },
            rto_ms: 200,
            retries2: 15,
            ..Conn::default()
        }
    }

    fn t() -> Thresholds {
        Thresholds::default()
    }

    #[test]
    fn a_quiet_protected_connection_is_healthy() {
        let mut c = established();
        c.last_recv_ms = 10 * 60_000;
        c.last_send_ms = 10 * 60_000;
        assert_eq!(judge(&c, &t()), Verdict::Healthy);
    }

    #[test]
    fn unanswered_probes_are_dead_with_time_left() {
        let mut c = established();
        c.probes_out = 2;
        c.timer = Some(Timer {
            kind: TimerKind::Keepalive,
            fires_in_ms: 4_000,
        });
        let v = judge(&c, &t());
        assert_eq!(
            v,
            Verdict::Dead(Dead::ProbesUnanswered {
                unanswered_probes: 2,
                probes: 5,
                gives_up_in_ms: 4_000 + 3 * 10_000,
            })
        );
        assert!(
            v.reason().contains("2 of 5 keepalive probes unanswered"),
            "{}",
            v.reason()
        );
        // The boundary: no probe outstanding is not dead.
        c.probes_out = 0;
        assert_eq!(judge(&c, &t()), Verdict::Healthy);
    }

    #[test]
    fn the_monitor_waits_for_the_newest_probe_to_have_its_chance() {
        let t = Thresholds {
            newest_probe_in_flight: true,
            ..t()
        };
        let mut c = established();
        c.timer = Some(Timer {
            kind: TimerKind::Keepalive,
            fires_in_ms: 10_000,
        });
        // Just sent, maybe in flight: not evidence yet.
        c.probes_out = 1;
        assert_eq!(judge(&c, &t), Verdict::Healthy);
        // Probe 2 sent: probe 1 went unanswered. The kernel sends 3 more
        // (one per interval) and gives up at the timer after the last.
        c.probes_out = 2;
        assert_eq!(
            judge(&c, &t),
            Verdict::Dead(Dead::ProbesUnanswered {
                unanswered_probes: 1,
                probes: 5,
                gives_up_in_ms: 10_000 + 3 * 10_000,
            })
        );
    }

    #[test]
    fn zero_window_probes_are_not_keepalive_death() {
        let mut c = established();
        c.probes_out = 3;
        c.timer = Some(Timer {
            kind: TimerKind::ZeroWindowProbe,
            fires_in_ms: 1_000,
        });
        assert_eq!(judge(&c, &t()), Verdict::Healthy);
    }

    #[test]
    fn unanswered_syns_do_not_claim_a_last_ack() {
        let mut c = established();
        c.id.state = TCP_SYN_SENT;
        c.timer = Some(Timer {
            kind: TimerKind::Retransmit,
            fires_in_ms: 800,
        });
        c.retransmits = 3;
        // The kernel's stamp of the last ACK is 0 before the handshake.
        c.last_ack_ms = 4_110_000;
        let v = judge(&c, &t());
        assert!(
            matches!(
                v,
                Verdict::Dead(Dead::RetransmitBackoff {
                    since_last_ack_ms: None,
                    ..
                })
            ),
            "{v:?}"
        );
        assert!(
            v.reason()
                .starts_with("3 SYN retransmissions without an answer"),
            "{}",
            v.reason()
        );
    }

    #[test]
    fn retransmission_backoff_threshold() {
        let mut c = established();
        c.timer = Some(Timer {
            kind: TimerKind::Retransmit,
            fires_in_ms: 800,
        });
        c.retransmits = 2;
        assert_eq!(judge(&c, &t()), Verdict::Healthy);
        c.retransmits = 3;
        c.rto_ms = 1_600;
        c.retries2 = 5;
        c.last_ack_ms = 3_000;
        match judge(&c, &t()) {
            Verdict::Dead(Dead::RetransmitBackoff {
                retransmits,
                since_last_ack_ms,
                gives_up_in_ms,
            }) => {
                assert_eq!(retransmits, 3);
                assert_eq!(since_last_ack_ms, Some(3_000));
                assert_eq!(gives_up_in_ms, 800 + 3_200 + 6_400);
            }
            v => panic!("{v:?}"),
        }
        c.user_timeout_ms = 5_000;
        assert!(matches!(
            judge(&c, &t()),
            Verdict::Dead(Dead::RetransmitBackoff {
                gives_up_in_ms: 2_000,
                ..
            })
        ));
    }

    #[test]
    fn timed_out_is_dead_whatever_else() {
        let mut c = established();
        c.timed_out = Some(TimeoutCause::Keepalive);
        assert_eq!(
            judge(&c, &t()).reason(),
            "kernel aborted it with ETIMEDOUT (keepalive)"
        );
    }

    #[test]
    fn kernel_orphans_say_what_they_wait_for() {
        let mut c = established();
        c.owners.clear();
        c.kernel_orphan = true;
        c.ino = 0;
        c.id.state = TCP_FIN_WAIT2;
        let v = judge(&c, &t());
        assert_eq!(v.reason_code(), "kernel_orphan");
        assert!(
            v.reason().contains("FIN_WAIT2 waiting for the peer's FIN"),
            "{}",
            v.reason()
        );
        c.id.state = TCP_LAST_ACK;
        assert!(judge(&c, &t()).reason().contains("acknowledge our FIN"));
    }

    #[test]
    fn close_wait_leak_boundary() {
        let mut c = established();
        c.id.state = TCP_CLOSE_WAIT;
        c.last_recv_ms = 59_999;
        c.last_ack_ms = 59_999;
        assert_eq!(judge(&c, &t()), Verdict::Healthy);
        c.last_recv_ms = 60_000;
        c.last_ack_ms = 60_000;
        assert_eq!(
            judge(&c, &t()),
            Verdict::Orphaned(Orphaned::CloseWaitLeak { idle_ms: 60_000 })
        );
    }

    #[test]
    fn close_wait_counts_from_the_fin_not_the_last_data() {
        // Idle for ten minutes, then the peer's bare FIN a second ago.
        let mut c = established();
        c.id.state = TCP_CLOSE_WAIT;
        c.last_recv_ms = 600_000;
        c.last_ack_ms = 1_000;
        assert_eq!(judge(&c, &t()), Verdict::Healthy);
    }

    #[test]
    fn established_without_owner() {
        let mut c = established();
        c.owners.clear();
        assert_eq!(judge(&c, &t()).reason_code(), "no_owner");
        // Unknown owners (not scanned) are not evidence of none.
        let th = Thresholds {
            owners_known: false,
            ..t()
        };
        assert_eq!(judge(&c, &th), Verdict::Healthy);
    }

    #[test]
    fn idle_without_keepalive_is_unprotected_from_the_threshold_on() {
        let mut c = established();
        c.keepalive.enabled = false;
        c.last_recv_ms = 59_999;
        c.last_send_ms = 70_000;
        assert_eq!(judge(&c, &t()), Verdict::Healthy);
        c.last_recv_ms = 60_000;
        assert_eq!(
            judge(&c, &t()),
            Verdict::Unprotected(Unprotected::KeepaliveOff { idle_ms: 60_000 })
        );
    }

    #[test]
    fn keepalive_later_than_the_middlebox_is_unprotected() {
        let mut c = established();
        c.last_recv_ms = 120_000;
        c.last_send_ms = 120_000;
        c.keepalive.idle_ms = 350_000;
        assert_eq!(judge(&c, &t()), Verdict::Healthy);
        c.keepalive.idle_ms = 7_200_000;
        let v = judge(&c, &t());
        assert_eq!(v.reason_code(), "keepalive_too_late");
        assert!(v.reason().contains("7200s"), "{}", v.reason());
    }

    #[test]
    fn severity_orders_verdicts() {
        let dead = Verdict::Dead(Dead::TimedOut {
            cause: TimeoutCause::Retransmission,
        });
        let orphan = Verdict::Orphaned(Orphaned::CloseWaitLeak { idle_ms: 1 });
        let unprot = Verdict::Unprotected(Unprotected::KeepaliveOff { idle_ms: 1 });
        assert!(dead.severity() > orphan.severity());
        assert!(orphan.severity() > unprot.severity());
        assert!(unprot.severity() > Verdict::Healthy.severity());
    }
}
