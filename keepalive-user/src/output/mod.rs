//! Renders events for people (`text`) and programs (`json`, one object per
//! line; schema in docs/events.md).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::events::comm::escape_str;
use crate::events::{Detail, Event, state_name};

/// Version of the JSON schema, written as `v` in every record.
pub mod file;

pub const SCHEMA_VERSION: u32 = 1;

/// Converts the kernel's CLOCK_MONOTONIC stamps to wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// realtime - monotonic, in nanoseconds.
    offset_ns: i128,
}

fn clock_ns(id: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(id, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

impl Clock {
    pub fn now() -> Self {
        Clock {
            offset_ns: clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_MONOTONIC),
        }
    }

    pub fn fixed(offset_ns: i128) -> Self {
        Clock { offset_ns }
    }

    pub fn mono_now_ns() -> u64 {
        clock_ns(libc::CLOCK_MONOTONIC) as u64
    }

    pub fn wall(&self, mono_ns: u64) -> SystemTime {
        let real = (mono_ns as i128 + self.offset_ns).max(0) as u128;
        UNIX_EPOCH + Duration::from_nanos(real as u64)
    }

    pub fn rfc3339(&self, mono_ns: u64) -> String {
        humantime::format_rfc3339_micros(self.wall(mono_ns)).to_string()
    }
}

/// An event as serialised: common fields, then the per-kind ones (absent
/// fields are skipped). Written straight to the output, which is several
/// times cheaper than building a `serde_json::Value` per event.
#[derive(serde::Serialize)]
pub struct EventOut<'a> {
    v: u32,
    event: &'static str,
    ts: String,
    ts_mono_ns: u64,
    cookie: u64,
    netns: u32,
    saddr: String,
    sport: u16,
    daddr: String,
    dport: u16,
    state: &'static str,
    pid: Option<u32>,
    comm: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    segs: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    syn: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    err: Option<i32>,
    /// `Some(None)` is written as `null` (a kernel without reset reasons).
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<Option<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    no_socket: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    old_state: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    new_state: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    probe: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cause: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    probes_out: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_timeout_ms: Option<u32>,
}

impl<'a> EventOut<'a> {
    pub fn new(e: &'a Event, clock: &Clock) -> Self {
        let mut out = EventOut {
            v: SCHEMA_VERSION,
            event: e.kind().name(),
            ts: clock.rfc3339(e.ts_mono_ns),
            ts_mono_ns: e.ts_mono_ns,
            cookie: e.cookie,
            netns: e.netns,
            saddr: e.saddr.to_string(),
            sport: e.sport,
            daddr: e.daddr.to_string(),
            dport: e.dport,
            state: state_name(e.state),
            pid: e.owner.as_ref().map(|o| o.pid),
            comm: e.owner.as_ref().map(|o| o.comm.as_str()),
            segs: None,
            syn: None,
            err: None,
            reason: None,
            no_socket: None,
            old_state: None,
            new_state: None,
            probe: None,
            cause: None,
            error: None,
            probes_out: None,
            user_timeout_ms: None,
        };
        match &e.detail {
            Detail::Retransmit { segs, syn, err } => {
                out.segs = Some(*segs);
                out.syn = Some(*syn);
                out.err = Some(*err);
            }
            Detail::ResetSent { reason, no_socket } => {
                out.reason = Some(reason.as_deref());
                out.no_socket = Some(*no_socket);
            }
            Detail::ResetReceived => {}
            Detail::StateChange { old, new } => {
                out.old_state = Some(state_name(*old));
                out.new_state = Some(state_name(*new));
            }
            Detail::KeepaliveProbe { probe } => out.probe = Some(*probe),
            Detail::Timeout {
                cause,
                probes_out,
                user_timeout_ms,
            } => {
                out.cause = Some(cause.name());
                out.error = Some("ETIMEDOUT");
                out.probes_out = Some(*probes_out);
                out.user_timeout_ms = Some(*user_timeout_ms);
            }
        }
        out
    }
}

/// One event as a JSON value.
pub fn event_json(e: &Event, clock: &Clock) -> Value {
    serde_json::to_value(EventOut::new(e, clock)).unwrap_or(Value::Null)
}

/// Writes one event as a JSON line.
pub fn write_event_json(
    out: &mut impl std::io::Write,
    e: &Event,
    clock: &Clock,
) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, &EventOut::new(e, clock)).map_err(std::io::Error::other)?;
    out.write_all(b"\n")
}

/// The record written when the kernel could not hand over `count` events.
pub fn lost_json(count: u64, total: u64, mono_ns: u64, clock: &Clock) -> Value {
    json!({
        "v": SCHEMA_VERSION,
        "event": "lost",
        "ts": clock.rfc3339(mono_ns),
        "ts_mono_ns": mono_ns,
        "lost": count,
        "lost_total": total,
    })
}

fn endpoint(addr: &std::net::IpAddr, port: u16) -> String {
    match addr {
        std::net::IpAddr::V6(a) => format!("[{a}]:{port}"),
        std::net::IpAddr::V4(a) => format!("{a}:{port}"),
    }
}

/// One event as a line of text.
pub fn event_text(e: &Event, clock: &Clock) -> String {
    let mut s = format!(
        "{} {:<15} {} > {} {} cookie={}",
        clock.rfc3339(e.ts_mono_ns),
        e.kind().name(),
        endpoint(&e.saddr, e.sport),
        endpoint(&e.daddr, e.dport),
        state_name(e.state),
        e.cookie,
    );
    match &e.detail {
        Detail::Retransmit { segs, syn, err } => {
            s += &format!(" segs={segs}");
            if *syn {
                s += " syn";
            }
            if *err != 0 {
                s += &format!(" err={err}");
            }
        }
        Detail::ResetSent { reason, no_socket } => {
            if let Some(r) = reason {
                s += &format!(" reason={}", escape_str(r));
            }
            if *no_socket {
                s += " no_socket";
            }
        }
        Detail::ResetReceived => {}
        Detail::StateChange { old, new } => {
            s += &format!(" {} -> {}", state_name(*old), state_name(*new));
        }
        Detail::KeepaliveProbe { probe } => s += &format!(" probe={probe}"),
        Detail::Timeout {
            cause,
            probes_out,
            user_timeout_ms,
        } => {
            s += &format!(" cause={} probes_out={probes_out}", cause.name());
            if *user_timeout_ms != 0 {
                s += &format!(" user_timeout_ms={user_timeout_ms}");
            }
        }
    }
    if let Some(o) = &e.owner {
        s += &format!(" pid={} comm={}", o.pid, o.comm);
    }
    s
}

pub fn lost_text(count: u64, total: u64, mono_ns: u64, clock: &Clock) -> String {
    format!(
        "{} lost            {count} events dropped by the kernel (ring buffer full), {total} in all",
        clock.rfc3339(mono_ns)
    )
}

/// Adds a connection's identity (cookie, namespace, tuple, state) to a JSON object.
pub fn conn_identity(v: &mut Value, c: &crate::table::Conn) {
    if let Value::Object(m) = v {
        m.insert("cookie".into(), json!(c.cookie));
        m.insert("netns".into(), json!(c.netns));
        m.insert("saddr".into(), json!(c.saddr.map(|a| a.to_string())));
        m.insert("sport".into(), json!(c.sport));
        m.insert("daddr".into(), json!(c.daddr.map(|a| a.to_string())));
        m.insert("dport".into(), json!(c.dport));
        m.insert("state".into(), json!(state_name(c.state)));
    }
}

/// A verdict change, with the connection it concerns.
pub fn verdict_json(
    ch: &crate::table::conn_table::VerdictChange,
    mono_ns: u64,
    clock: &Clock,
) -> Value {
    let c = &ch.conn;
    let owner = c.owners.first();
    let mut v = json!({
        "v": SCHEMA_VERSION,
        "event": "verdict",
        "ts": clock.rfc3339(mono_ns),
        "ts_mono_ns": mono_ns,
    });
    conn_identity(&mut v, c);
    if let Value::Object(m) = &mut v {
        m.insert("pid".into(), json!(owner.map(|o| o.pid)));
        m.insert("comm".into(), json!(owner.map(|o| o.comm.clone())));
        m.insert("old".into(), json!(ch.old.name()));
        m.insert("new".into(), json!(ch.new.name()));
        m.insert("reason_code".into(), json!(ch.new.reason_code()));
        m.insert("reason".into(), json!(ch.new.reason()));
    }
    v
}

pub fn verdict_text(
    ch: &crate::table::conn_table::VerdictChange,
    mono_ns: u64,
    clock: &Clock,
) -> String {
    let c = &ch.conn;
    let ep = |a: Option<std::net::IpAddr>, p: u16| match a {
        Some(a) => endpoint(&a, p),
        None => format!("*:{p}"),
    };
    format!(
        "{} {:<15} {} > {} {} cookie={} {} -> {}: {}",
        clock.rfc3339(mono_ns),
        "verdict",
        ep(c.saddr, c.sport),
        ep(c.daddr, c.dport),
        state_name(c.state),
        c.cookie,
        ch.old.name(),
        ch.new.name(),
        ch.new.reason()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
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

#[cfg(test)]
mod golden;
