//! The wire types: every JSON record the tool writes (events, verdict
//! changes, lost records, connection rows) is one of these serde types,
//! serialised straight to the output (building a `serde_json::Value` per
//! record costs several times more). Field order is the documented schema
//! (docs/events.md); the golden test holds it.

use std::io::{self, Write};

use std::net::IpAddr;

use serde::Serialize;
use serde::ser::{SerializeStruct, Serializer};

use super::Clock;
use super::addr::AddrOut;
use crate::clock::Rfc3339;
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

/// Who a record about one connection is about, and when: the fields
/// every such record (an event, a verdict change, a `tuned` record) writes
/// after `v` and `event`, in this order. One definition for all of them,
/// embedded by [`serialize_conn_record`] (a derive's `#[serde(flatten)]`
/// would turn each record into a map, several times slower). Nothing here
/// allocates: the timestamp and the addresses are formatted on the stack.
pub struct ConnIdentityOut<'a> {
    pub ts: Rfc3339,
    pub ts_mono_ns: u64,
    pub cookie: u64,
    pub netns: u32,
    /// `null` when unknown.
    pub saddr: Option<IpAddr>,
    pub sport: u16,
    pub daddr: Option<IpAddr>,
    pub dport: u16,
    pub state: &'static str,
    pub pid: Option<u32>,
    pub comm: Option<&'a str>,
}

impl ConnIdentityOut<'_> {
    /// How many fields [`Self::serialize_fields`] writes.
    const FIELDS: usize = 11;

    fn serialize_fields<S: SerializeStruct>(&self, s: &mut S) -> Result<(), S::Error> {
        s.serialize_field("ts", &self.ts)?;
        s.serialize_field("ts_mono_ns", &self.ts_mono_ns)?;
        s.serialize_field("cookie", &self.cookie)?;
        s.serialize_field("netns", &self.netns)?;
        s.serialize_field("saddr", &self.saddr.map(AddrOut))?;
        s.serialize_field("sport", &self.sport)?;
        s.serialize_field("daddr", &self.daddr.map(AddrOut))?;
        s.serialize_field("dport", &self.dport)?;
        s.serialize_field("state", self.state)?;
        s.serialize_field("pid", &self.pid)?;
        s.serialize_field("comm", &self.comm)
    }
}

/// Serialises a record about one connection: `v`, `event`, the identity,
/// then the `own` fields the record type writes (`own_fields` of them).
pub fn serialize_conn_record<S: Serializer>(
    s: S,
    event: &impl Serialize,
    id: &ConnIdentityOut<'_>,
    own_fields: usize,
    own: impl FnOnce(&mut S::SerializeStruct) -> Result<(), S::Error>,
) -> Result<S::Ok, S::Error> {
    let mut st = s.serialize_struct("record", 2 + ConnIdentityOut::FIELDS + own_fields)?;
    st.serialize_field("v", &SCHEMA_VERSION)?;
    st.serialize_field("event", event)?;
    id.serialize_fields(&mut st)?;
    own(&mut st)?;
    st.end()
}

/// An event as serialised: the common fields, then the per-kind ones.
pub struct EventOut<'a> {
    event: Kind,
    id: ConnIdentityOut<'a>,
    detail: &'a Detail,
}

impl<'a> EventOut<'a> {
    pub fn new(e: &'a Event, clock: &Clock) -> Self {
        EventOut {
            event: e.kind(),
            id: ConnIdentityOut {
                ts: clock.rfc3339_display(e.ts_mono_ns),
                ts_mono_ns: e.ts_mono_ns,
                cookie: e.cookie,
                netns: e.netns,
                saddr: Some(e.saddr),
                sport: e.sport,
                daddr: Some(e.daddr),
                dport: e.dport,
                state: state_name(e.state),
                pid: e.owner.as_ref().map(|o| o.pid),
                comm: e.owner.as_ref().map(|o| o.comm.as_str()),
            },
            detail: &e.detail,
        }
    }
}

impl Serialize for EventOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let fields = match self.detail {
            Detail::Retransmit { .. } => 4,
            Detail::ResetSent { .. } | Detail::StateChange { .. } => 2,
            Detail::KeepaliveProbe { .. } => 1,
            Detail::Timeout { .. } => 4,
            Detail::ResetReceived => 0,
        };
        serialize_conn_record(s, &self.event, &self.id, fields, |st| {
            match self.detail {
                Detail::Retransmit {
                    segs,
                    syn,
                    synack,
                    err,
                } => {
                    st.serialize_field("segs", segs)?;
                    st.serialize_field("syn", syn)?;
                    st.serialize_field("err", err)?;
                    // Last, after the fields of the first version.
                    st.serialize_field("synack", synack)
                }
                Detail::ResetSent { reason, no_socket } => {
                    // `null` on a kernel without reset reasons.
                    st.serialize_field("reason", &reason.as_deref())?;
                    st.serialize_field("no_socket", no_socket)
                }
                Detail::StateChange { old, new } => {
                    st.serialize_field("old_state", state_name(*old))?;
                    st.serialize_field("new_state", state_name(*new))
                }
                Detail::KeepaliveProbe { probe } => st.serialize_field("probe", probe),
                Detail::Timeout {
                    cause,
                    probes_out,
                    user_timeout_ms,
                } => {
                    st.serialize_field("cause", cause.name())?;
                    st.serialize_field("error", "ETIMEDOUT")?;
                    st.serialize_field("probes_out", probes_out)?;
                    st.serialize_field("user_timeout_ms", user_timeout_ms)
                }
                // Nothing beyond the common fields.
                Detail::ResetReceived => Ok(()),
            }
        })
    }
}

/// A connection's verdict changed.
pub struct VerdictOut<'a> {
    id: ConnIdentityOut<'a>,
    change: &'a VerdictChange,
}

impl<'a> VerdictOut<'a> {
    pub fn new(ch: &'a VerdictChange, mono_ns: u64, clock: &Clock) -> Self {
        let c = &ch.conn;
        let owner = c.owners.first();
        VerdictOut {
            id: ConnIdentityOut {
                ts: clock.rfc3339_display(mono_ns),
                ts_mono_ns: mono_ns,
                cookie: c.cookie,
                netns: c.netns,
                saddr: c.saddr,
                sport: c.sport,
                daddr: c.daddr,
                dport: c.dport,
                state: state_name(c.state),
                pid: owner.map(|o| o.pid),
                comm: owner.map(|o| o.comm.as_str()),
            },
            change: ch,
        }
    }
}

impl Serialize for VerdictOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let ch = self.change;
        serialize_conn_record(s, &Kind::Verdict, &self.id, 4, |st| {
            st.serialize_field("old", ch.old.name())?;
            st.serialize_field("new", ch.new.name())?;
            st.serialize_field("reason_code", ch.new.reason_code())?;
            st.serialize_field("reason", &ch.new.reason())
        })
    }
}

/// The kernel could not hand over `lost` events.
#[derive(Serialize)]
pub struct LostOut {
    v: u32,
    event: &'static str,
    ts: Rfc3339,
    ts_mono_ns: u64,
    lost: u64,
    lost_total: u64,
}

impl LostOut {
    pub fn new(count: u64, total: u64, mono_ns: u64, clock: &Clock) -> Self {
        LostOut {
            v: SCHEMA_VERSION,
            event: "lost",
            ts: clock.rfc3339_display(mono_ns),
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
    saddr: Option<AddrOut>,
    sport: u16,
    daddr: Option<AddrOut>,
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
            saddr: c.saddr.map(AddrOut),
            sport: c.sport,
            daddr: c.daddr.map(AddrOut),
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
