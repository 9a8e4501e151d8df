//! The wire types: every JSON record the tool writes (events, verdict
//! changes, lost records, connection rows) is one of these derived serde
//! types, serialised straight to the output (building a
//! `serde_json::Value` per record costs several times more). Field order
//! is the documented schema (docs/events.md); the golden test holds it.

use std::io::{self, Write};

use serde::Serialize;

use super::Clock;
use crate::events::{Detail, Event, Kind, Owner, state_name};
use crate::table::conn_table::VerdictChange;
use crate::table::walk::Row;

/// Version of the JSON schema, written as `v` in every record.
pub const SCHEMA_VERSION: u32 = 1;

/// Writes one record as a JSON line.
pub fn write_line(out: &mut impl Write, record: &impl Serialize) -> io::Result<()> {
    serde_json::to_writer(&mut *out, record).map_err(io::Error::other)?;
    out.write_all(b"\n")
}

/// Writes a value through its `Display` straight into the output, with
/// no intermediate `String` (the hot path writes a million of these a
/// second).
fn display<T: std::fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// An event as serialised: the common fields, then the per-kind ones.
/// Nothing here allocates: the timestamp and the addresses are written
/// by their `Display` straight into the output.
#[derive(Serialize)]
pub struct EventOut<'a> {
    v: u32,
    event: Kind,
    #[serde(serialize_with = "display")]
    ts: humantime::Rfc3339Timestamp,
    ts_mono_ns: u64,
    cookie: u64,
    netns: u32,
    #[serde(serialize_with = "display")]
    saddr: std::net::IpAddr,
    sport: u16,
    #[serde(serialize_with = "display")]
    daddr: std::net::IpAddr,
    dport: u16,
    state: &'static str,
    pid: Option<u32>,
    comm: Option<&'a str>,
    #[serde(flatten)]
    detail: DetailOut<'a>,
}

/// The per-kind fields of an event, written after the common ones.
#[derive(Serialize)]
#[serde(untagged)]
enum DetailOut<'a> {
    Retransmit {
        segs: u32,
        syn: bool,
        err: i32,
    },
    ResetSent {
        /// `null` on a kernel without reset reasons.
        reason: Option<&'a str>,
        no_socket: bool,
    },
    StateChange {
        old_state: &'static str,
        new_state: &'static str,
    },
    KeepaliveProbe {
        probe: u32,
    },
    Timeout {
        cause: &'static str,
        error: &'static str,
        probes_out: u32,
        user_timeout_ms: u32,
    },
    /// `reset_received`: nothing beyond the common fields.
    Nothing {},
}

impl<'a> DetailOut<'a> {
    fn new(d: &'a Detail) -> Self {
        match d {
            &Detail::Retransmit { segs, syn, err } => DetailOut::Retransmit { segs, syn, err },
            Detail::ResetSent { reason, no_socket } => DetailOut::ResetSent {
                reason: reason.as_deref(),
                no_socket: *no_socket,
            },
            Detail::ResetReceived => DetailOut::Nothing {},
            &Detail::StateChange { old, new } => DetailOut::StateChange {
                old_state: state_name(old),
                new_state: state_name(new),
            },
            &Detail::KeepaliveProbe { probe } => DetailOut::KeepaliveProbe { probe },
            &Detail::Timeout {
                cause,
                probes_out,
                user_timeout_ms,
            } => DetailOut::Timeout {
                cause: cause.name(),
                error: "ETIMEDOUT",
                probes_out,
                user_timeout_ms,
            },
        }
    }
}

impl<'a> EventOut<'a> {
    pub fn new(e: &'a Event, clock: &Clock) -> Self {
        EventOut {
            v: SCHEMA_VERSION,
            event: e.kind(),
            ts: clock.rfc3339_display(e.ts_mono_ns),
            ts_mono_ns: e.ts_mono_ns,
            cookie: e.cookie,
            netns: e.netns,
            saddr: e.saddr,
            sport: e.sport,
            daddr: e.daddr,
            dport: e.dport,
            state: state_name(e.state),
            pid: e.owner.as_ref().map(|o| o.pid),
            comm: e.owner.as_ref().map(|o| o.comm.as_str()),
            detail: DetailOut::new(&e.detail),
        }
    }
}

/// A connection's verdict changed.
#[derive(Serialize)]
pub struct VerdictOut<'a> {
    v: u32,
    event: Kind,
    ts: String,
    ts_mono_ns: u64,
    cookie: u64,
    netns: u32,
    saddr: Option<String>,
    sport: u16,
    daddr: Option<String>,
    dport: u16,
    state: &'static str,
    pid: Option<u32>,
    comm: Option<&'a str>,
    old: &'static str,
    new: &'static str,
    reason_code: &'static str,
    reason: String,
}

impl<'a> VerdictOut<'a> {
    pub fn new(ch: &'a VerdictChange, mono_ns: u64, clock: &Clock) -> Self {
        let c = &ch.conn;
        let owner = c.owners.first();
        VerdictOut {
            v: SCHEMA_VERSION,
            event: Kind::Verdict,
            ts: clock.rfc3339(mono_ns),
            ts_mono_ns: mono_ns,
            cookie: c.cookie,
            netns: c.netns,
            saddr: c.saddr.map(|a| a.to_string()),
            sport: c.sport,
            daddr: c.daddr.map(|a| a.to_string()),
            dport: c.dport,
            state: state_name(c.state),
            pid: owner.map(|o| o.pid),
            comm: owner.map(|o| o.comm.as_str()),
            old: ch.old.name(),
            new: ch.new.name(),
            reason_code: ch.new.reason_code(),
            reason: ch.new.reason(),
        }
    }
}

/// The kernel could not hand over `lost` events.
#[derive(Serialize)]
pub struct LostOut {
    v: u32,
    event: &'static str,
    ts: String,
    ts_mono_ns: u64,
    lost: u64,
    lost_total: u64,
}

impl LostOut {
    pub fn new(count: u64, total: u64, mono_ns: u64, clock: &Clock) -> Self {
        LostOut {
            v: SCHEMA_VERSION,
            event: "lost",
            ts: clock.rfc3339(mono_ns),
            ts_mono_ns: mono_ns,
            lost: count,
            lost_total: total,
        }
    }
}

/// The JSON form of a connection row, serialised straight to the output
/// (building a `serde_json::Value` per row costs several times more).
#[derive(Serialize)]
pub struct RowOut<'a> {
    v: u32,
    cookie: u64,
    netns: u32,
    saddr: Option<String>,
    sport: u16,
    daddr: Option<String>,
    dport: u16,
    state: &'static str,
    verdict: &'static str,
    reason_code: &'static str,
    reason: String,
    owners: &'a [Owner],
    kernel_orphan: bool,
    keepalive: KeepaliveOut,
    probes_out: u32,
    retransmits: u32,
    total_retrans: u32,
    backoff: u32,
    rto_ms: u64,
    user_timeout_ms: u32,
    last_send_ms: u64,
    last_recv_ms: u64,
    last_ack_ms: u64,
    recv_queue: u32,
    send_queue: u32,
    timer: Option<TimerOut>,
    ino: u64,
    /// Kept by the kernel while a monitor runs (record --table-dump).
    counters: Option<CountersOut>,
}

#[derive(Serialize)]
pub struct KeepaliveOut {
    enabled: bool,
    idle_ms: u64,
    intvl_ms: u64,
    probes: u32,
}

#[derive(Serialize)]
pub struct TimerOut {
    kind: &'static str,
    fires_in_ms: i64,
}

#[derive(Serialize)]
pub struct CountersOut {
    probes: u32,
    retransmit_segs: u32,
    resets_sent: u32,
    resets_received: u32,
    timeouts: u32,
}

impl<'a> RowOut<'a> {
    pub fn new(row: &'a Row) -> Self {
        let c = &row.conn;
        RowOut {
            v: SCHEMA_VERSION,
            cookie: c.cookie,
            netns: c.netns,
            saddr: c.saddr.map(|a| a.to_string()),
            sport: c.sport,
            daddr: c.daddr.map(|a| a.to_string()),
            dport: c.dport,
            state: state_name(c.state),
            verdict: row.verdict.name(),
            reason_code: row.verdict.reason_code(),
            reason: row.verdict.reason(),
            owners: &c.owners,
            kernel_orphan: c.kernel_orphan,
            keepalive: KeepaliveOut {
                enabled: c.keepalive.enabled,
                idle_ms: c.keepalive.idle_ms,
                intvl_ms: c.keepalive.intvl_ms,
                probes: c.keepalive.probes,
            },
            probes_out: c.probes_out,
            retransmits: c.retransmits,
            total_retrans: c.total_retrans,
            backoff: c.backoff,
            rto_ms: c.rto_ms,
            user_timeout_ms: c.user_timeout_ms,
            last_send_ms: c.last_send_ms,
            last_recv_ms: c.last_recv_ms,
            last_ack_ms: c.last_ack_ms,
            recv_queue: c.recv_queue,
            send_queue: c.send_queue,
            timer: c.timer.map(|t| TimerOut {
                kind: t.kind.name(),
                fires_in_ms: t.fires_in_ms,
            }),
            ino: c.ino,
            counters: c.stats.map(|s| CountersOut {
                probes: s.probes,
                retransmit_segs: s.retransmit_segs,
                resets_sent: s.resets_sent,
                resets_received: s.resets_received,
                timeouts: s.timeouts,
            }),
        }
    }
}
