//! The text form: one readable line per event, verdict change or lost
//! record, and the `snapshot` table.

use std::io::Write as _;

use super::{Clock, Endpoint, endpoint};
use crate::events::comm::escape_str;
use crate::events::{Detail, Event, state_name};
use crate::table::conn_table::VerdictChange;
use crate::table::walk::Row;

/// One event as a line of text.
pub fn event_text(e: &Event, clock: &Clock) -> String {
    let mut line = Vec::new();
    write_event_text(&mut line, e, clock);
    String::from_utf8(line).unwrap_or_default()
}

/// [`event_text`], appended to `out` (where lines are buffered) without a
/// `String` per part.
pub fn write_event_text(out: &mut Vec<u8>, e: &Event, clock: &Clock) {
    // Writing to a Vec cannot fail.
    let _ = write_event(out, e, clock);
}

fn write_event(s: &mut Vec<u8>, e: &Event, clock: &Clock) -> std::io::Result<()> {
    write!(
        s,
        "{} {:<15} {} > {} {} cookie={}",
        clock.rfc3339_display(e.ts_mono_ns),
        e.kind().name(),
        Endpoint(Some(e.saddr), e.sport),
        Endpoint(Some(e.daddr), e.dport),
        state_name(e.state),
        e.cookie,
    )?;
    match &e.detail {
        Detail::Retransmit {
            segs,
            syn,
            synack,
            err,
        } => {
            write!(s, " segs={segs}")?;
            if *synack {
                s.extend_from_slice(b" synack");
            } else if *syn {
                s.extend_from_slice(b" syn");
            }
            if *err != 0 {
                write!(s, " err={err}")?;
            }
        }
        Detail::ResetSent { reason, no_socket } => {
            if let Some(r) = reason {
                write!(s, " reason={}", escape_str(r))?;
            }
            if *no_socket {
                s.extend_from_slice(b" no_socket");
            }
        }
        Detail::ResetReceived => {}
        Detail::StateChange { old, new } => {
            write!(s, " {} -> {}", state_name(*old), state_name(*new))?;
        }
        Detail::KeepaliveProbe { probe } => write!(s, " probe={probe}")?,
        Detail::Timeout {
            cause,
            probes_out,
            user_timeout_ms,
        } => {
            write!(s, " cause={} probes_out={probes_out}", cause.name())?;
            if *user_timeout_ms != 0 {
                write!(s, " user_timeout_ms={user_timeout_ms}")?;
            }
        }
    }
    if let Some(o) = &e.owner {
        write!(s, " pid={} comm={}", o.pid, o.comm)?;
    }
    Ok(())
}

pub fn lost_text(count: u64, total: u64, mono_ns: u64, clock: &Clock) -> String {
    format!(
        "{} lost            {count} events dropped by the kernel (ring buffer full), {total} in all",
        clock.rfc3339(mono_ns)
    )
}

/// A verdict change as a line of text.
pub fn verdict_text(ch: &VerdictChange, mono_ns: u64, clock: &Clock) -> String {
    let c = &ch.conn;
    format!(
        "{} {:<15} {} > {} {} cookie={} {} -> {}: {}",
        clock.rfc3339(mono_ns),
        "verdict",
        endpoint(c.id.saddr, c.id.sport),
        endpoint(c.id.daddr, c.id.dport),
        state_name(c.id.state),
        c.id.cookie,
        ch.old.name(),
        ch.new.name(),
        ch.new.reason()
    )
}

/// Header and rows of the text table.
pub fn table_lines(rows: &[&Row]) -> Vec<String> {
    let mut out = vec![format!(
        "{:<11} {:<11} {:<45} {:<45} {:<18} {:<16} {:>6} {:>5} {:>8} {:<20} REASON",
        "VERDICT",
        "STATE",
        "LOCAL",
        "PEER",
        "OWNER",
        "KEEPALIVE",
        "PROBES",
        "RETR",
        "IDLE",
        "TIMER"
    )];
    for row in rows {
        let c = &row.conn;
        let owner = match c.owners.as_slice() {
            [] if c.kernel_orphan => "(orphan)".to_string(),
            [] => "-".to_string(),
            [o] => format!("{}/{}", o.comm, o.pid),
            [o, rest @ ..] => format!("{}/{}+{}", o.comm, o.pid, rest.len()),
        };
        let ka = if c.keepalive.enabled {
            format!(
                "{}s/{}s/{}",
                c.keepalive.idle_ms / 1000,
                c.keepalive.intvl_ms / 1000,
                c.keepalive.probes
            )
        } else {
            "off".to_string()
        };
        let timer = c
            .timer
            .map(|t| format!("{}:{}ms", t.kind.name(), t.fires_in_ms))
            .unwrap_or_else(|| "-".into());
        out.push(format!(
            "{:<11} {:<11} {:<45} {:<45} {:<18} {:<16} {:>6} {:>5} {:>8} {:<20} {}",
            row.verdict.name(),
            state_name(c.id.state),
            endpoint(c.id.saddr, c.id.sport),
            endpoint(c.id.daddr, c.id.dport),
            owner,
            ka,
            c.probes_out,
            c.total_retrans,
            // Listeners and minisocks have no traffic stamps.
            if c.full && c.id.state != crate::table::TCP_LISTEN {
                format!("{}s", c.idle_ms() / 1000)
            } else {
                "-".to_string()
            },
            timer,
            row.verdict.reason()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::json::{self, EventOut, LostOut};
    use serde_json::Value;

    fn event_json(e: &Event, clock: &Clock) -> Value {
        serde_json::from_str(&json::to_string(&EventOut::new(e, clock))).unwrap()
    }

    fn lost_json(count: u64, total: u64, mono_ns: u64, clock: &Clock) -> Value {
        serde_json::from_str(&json::to_string(&LostOut::new(
            count, total, mono_ns, clock,
        )))
        .unwrap()
    }
    use crate::events::{Owner, TimeoutCause};

    fn ev(detail: Detail) -> Event {
        Event {
            ts_mono_ns: 1_000_000_000,
            cookie: 9,
            netns: 4026531840,
            saddr: "198.18.0.1".parse().unwrap(),
            sport: 40000,
            daddr: "fd00::2".parse().unwrap(),
            dport: 80,
            state: 1,
            owner: None,
            detail,
        }
    }

    #[test]
    fn json_has_the_documented_fields() {
        let clock = Clock::fixed(1_700_000_000_000_000_000);
        let v = event_json(&ev(Detail::KeepaliveProbe { probe: 2 }), &clock);
        assert_eq!(v["event"], "keepalive_probe");
        assert_eq!(v["probe"], 2);
        assert_eq!(v["cookie"], 9);
        assert_eq!(v["state"], "ESTABLISHED");
        assert_eq!(v["pid"], Value::Null);
        assert_eq!(v["ts"], "2023-11-14T22:13:21.000000Z");
        let v = event_json(
            &ev(Detail::Timeout {
                cause: TimeoutCause::UserTimeout,
                probes_out: 0,
                user_timeout_ms: 2000,
            }),
            &clock,
        );
        assert_eq!(v["cause"], "user_timeout");
        assert_eq!(v["user_timeout_ms"], 2000);
        let v = event_json(&ev(Detail::StateChange { old: 2, new: 1 }), &clock);
        assert_eq!(v["old_state"], "SYN_SENT");
        assert_eq!(v["new_state"], "ESTABLISHED");
    }

    #[test]
    fn text_is_one_readable_line() {
        let clock = Clock::fixed(0);
        let mut e = ev(Detail::Retransmit {
            segs: 2,
            syn: true,
            synack: false,
            err: 0,
        });
        e.owner = Some(Owner {
            pid: 5,
            comm: "curl".into(),
        });
        let t = event_text(&e, &clock);
        assert!(t.contains("retransmit"), "{t}");
        assert!(t.contains("198.18.0.1:40000 > [fd00::2]:80"), "{t}");
        assert!(t.contains("segs=2 syn"), "{t}");
        assert!(t.ends_with("pid=5 comm=curl"), "{t}");
        assert!(!t.contains('\n'));
    }

    #[test]
    fn a_hostile_name_stays_on_one_line() {
        let mut e = ev(Detail::ResetSent {
            reason: Some("X\nY".into()),
            no_socket: false,
        });
        e.owner = Some(Owner {
            pid: 5,
            comm: crate::events::Comm::from_bytes(b"a\nb\"c\x1b[31mX\xff"),
        });
        let t = event_text(&e, &Clock::fixed(0));
        assert!(t.ends_with(" pid=5 comm=a\\nb\"c\\x1b[31mX\\xff"), "{t}");
        assert!(t.contains(" reason=X\\nY "), "{t}");
        assert!(!t.chars().any(char::is_control), "{t:?}");
        let v = event_json(&e, &Clock::fixed(0));
        assert_eq!(v["comm"], "a\nb\"c\x1b[31mX\u{fffd}");
    }

    #[test]
    fn lost_record() {
        let v = lost_json(3, 10, 0, &Clock::fixed(0));
        assert_eq!(v["event"], "lost");
        assert_eq!(v["lost"], 3);
        assert_eq!(v["lost_total"], 10);
    }
}
