//! The wire types: every JSON record the tool writes (events, verdict
//! changes, lost records, connection rows) is one of these types, written
//! straight to the output (building a `serde_json::Value` per record costs
//! several times more): the per-event ones through an [`ObjectWriter`],
//! the others through serde_json. Field order is the documented schema
//! (docs/events.md); the golden test holds it byte for byte.

use std::io;

use std::net::IpAddr;

use serde::Serialize;

use super::Clock;
use super::addr::{AddrOut, push_addr};
use super::append::{SHORT, push_i64, push_short, push_u64};
use crate::clock::Rfc3339;
use crate::events::{Detail, Event, Kind, Owner, state_name};
use crate::table::ConnId;
use crate::table::conn_table::VerdictChange;
use crate::table::walk::Row;

/// Version of the JSON schema, written as `v` in every record.
pub const SCHEMA_VERSION: u32 = 1;

/// A record that writes itself as one JSON object. The per-event records
/// (events, verdict changes, lost and `tuned` records) write their fields
/// through an [`ObjectWriter`]; the others (connection rows, policy
/// notices: not per event) are serde types, written by serde_json.
pub trait JsonRecord {
    /// Appends the record to `out` (where lines are buffered).
    fn write_json(&self, out: &mut Vec<u8>) -> io::Result<()>;
}

impl<T: Serialize> JsonRecord for T {
    fn write_json(&self, out: &mut Vec<u8>) -> io::Result<()> {
        serde_json::to_writer(out, self).map_err(io::Error::other)
    }
}

/// Appends one record as a JSON line.
pub fn write_line(out: &mut Vec<u8>, record: &impl JsonRecord) -> io::Result<()> {
    record.write_json(out)?;
    out.push(b'\n');
    Ok(())
}

/// One record as a JSON string (no newline), for tests and callers that
/// want a `String`.
pub fn to_string(record: &impl JsonRecord) -> String {
    let mut out = Vec::new();
    // Writing to a Vec fails only if a serde field does.
    let _ = record.write_json(&mut out);
    String::from_utf8(out).unwrap_or_default()
}

/// True when serde_json would write `s` as it is: no control character,
/// quote or backslash (the only bytes it escapes).
fn needs_no_escape(s: &[u8]) -> bool {
    s.iter().all(|&b| b >= 0x20 && b != b'"' && b != b'\\')
}

/// A key as an [`ObjectWriter`] takes it: `key!("ts")` is the literal
/// `,"ts":`, so writing a key is one copy.
macro_rules! key {
    ($k:literal) => {
        concat!(",\"", $k, "\":")
    };
}
pub(crate) use key;

/// A JSON object appended to a line buffer, byte for byte as serde_json
/// writes a struct (compact: no spaces).
///
/// serde_json scans every key and string for bytes to escape, and that
/// scan was the largest part of a line. Here keys, and values that are
/// ASCII names from a fixed set (states, kinds, verdicts), RFC 3339
/// timestamps or IP addresses, are copied as they are ([`Self::plain`]);
/// only text from outside (a process name, a reason) goes through
/// serde_json's escaping ([`Self::text`]). Debug builds check that what is
/// written plain needs no escaping, and a unit test goes through every
/// name that can be.
pub struct ObjectWriter<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> ObjectWriter<'a> {
    pub fn begin(out: &'a mut Vec<u8>) -> io::Result<Self> {
        Ok(ObjectWriter { out, first: true })
    }

    /// `key` as [`key!`] makes it. Copied whole (a constant length the
    /// compiler copies inline); the first key's comma becomes the `{`.
    #[inline(always)]
    fn key(&mut self, key: &'static str) {
        debug_assert!(
            key.len() > 4
                && key.starts_with(",\"")
                && key.ends_with("\":")
                && needs_no_escape(&key.as_bytes()[2..key.len() - 2]),
            "{key:?}"
        );
        let at = self.out.len();
        self.out.extend_from_slice(key.as_bytes());
        if self.first {
            self.out[at] = b'{';
            self.first = false;
        }
    }

    #[inline(always)]
    pub fn uint(&mut self, key: &'static str, v: impl Into<u64>) -> io::Result<()> {
        self.key(key);
        push_u64(self.out, v.into());
        Ok(())
    }

    #[inline(always)]
    pub fn int(&mut self, key: &'static str, v: impl Into<i64>) -> io::Result<()> {
        self.key(key);
        push_i64(self.out, v.into());
        Ok(())
    }

    #[inline(always)]
    pub fn bool(&mut self, key: &'static str, v: bool) -> io::Result<()> {
        self.key(key);
        // Two copies of a constant size: one of a length chosen at run
        // time would be a `memmove` call.
        if v {
            self.out.extend_from_slice(b"true");
        } else {
            self.out.extend_from_slice(b"false");
        }
        Ok(())
    }

    #[inline(always)]
    pub fn null(&mut self, key: &'static str) -> io::Result<()> {
        self.key(key);
        self.out.extend_from_slice(b"null");
        Ok(())
    }

    /// A string that holds no byte JSON escapes (a name from a fixed set,
    /// a timestamp, an address): written without the scan.
    #[inline(always)]
    pub fn plain(&mut self, key: &'static str, v: &[u8]) -> io::Result<()> {
        debug_assert!(needs_no_escape(v), "{:?}", String::from_utf8_lossy(v));
        self.key(key);
        self.out.push(b'"');
        push_short(self.out, v);
        self.out.push(b'"');
        Ok(())
    }

    /// Text from outside (a process name, a reason): escaped by serde_json,
    /// unless it is short and holds nothing to escape (a process name,
    /// nearly always), which serde_json would write as it is.
    #[inline(always)]
    pub fn text(&mut self, key: &'static str, v: &str) -> io::Result<()> {
        if v.len() <= SHORT && needs_no_escape(v.as_bytes()) {
            self.plain(key, v.as_bytes())
        } else {
            self.serde(key, v)
        }
    }

    /// Any serde value, written by serde_json.
    #[inline]
    pub fn serde(&mut self, key: &'static str, v: &(impl Serialize + ?Sized)) -> io::Result<()> {
        self.key(key);
        serde_json::to_writer(&mut *self.out, v).map_err(io::Error::other)
    }

    #[inline(always)]
    pub fn opt_uint(&mut self, key: &'static str, v: Option<impl Into<u64>>) -> io::Result<()> {
        match v {
            Some(v) => self.uint(key, v),
            None => self.null(key),
        }
    }

    #[inline(always)]
    pub fn opt_text(&mut self, key: &'static str, v: Option<&str>) -> io::Result<()> {
        match v {
            Some(v) => self.text(key, v),
            None => self.null(key),
        }
    }

    /// An address as its text, `null` when unknown.
    #[inline(always)]
    pub fn addr(&mut self, key: &'static str, v: Option<IpAddr>) -> io::Result<()> {
        match v {
            Some(a) => {
                self.key(key);
                self.out.push(b'"');
                push_addr(self.out, a);
                self.out.push(b'"');
                Ok(())
            }
            None => self.null(key),
        }
    }

    pub fn end(self) -> io::Result<()> {
        if self.first {
            self.out.push(b'{');
        }
        self.out.push(b'}');
        Ok(())
    }
}

/// Who a record about one connection is about, and when: the fields
/// every such record (an event, a verdict change, a `tuned` record) writes
/// after `v` and `event`, in this order. One definition for all of them,
/// written by [`write_conn_record`]. Nothing here allocates: the timestamp
/// and the addresses are formatted on the stack.
pub struct ConnIdentityOut<'a> {
    pub ts: Rfc3339,
    pub ts_mono_ns: u64,
    /// Addresses `null` when unknown.
    pub id: ConnId,
    pub pid: Option<u32>,
    pub comm: Option<&'a str>,
}

impl ConnIdentityOut<'_> {
    fn write_fields(&self, w: &mut ObjectWriter<'_>) -> io::Result<()> {
        let id = &self.id;
        w.plain(key!("ts"), self.ts.as_bytes())?;
        w.uint(key!("ts_mono_ns"), self.ts_mono_ns)?;
        w.uint(key!("cookie"), id.cookie)?;
        w.uint(key!("netns"), id.netns)?;
        w.addr(key!("saddr"), id.saddr)?;
        w.uint(key!("sport"), id.sport)?;
        w.addr(key!("daddr"), id.daddr)?;
        w.uint(key!("dport"), id.dport)?;
        w.plain(key!("state"), state_name(id.state).as_bytes())?;
        w.opt_uint(key!("pid"), self.pid)?;
        w.opt_text(key!("comm"), self.comm)
    }
}

/// Writes a record about one connection: `v`, `event` (a name from a
/// fixed set), the identity, then the fields `own` writes.
pub fn write_conn_record(
    out: &mut Vec<u8>,
    event: &'static str,
    id: &ConnIdentityOut<'_>,
    own: impl FnOnce(&mut ObjectWriter<'_>) -> io::Result<()>,
) -> io::Result<()> {
    let mut w = ObjectWriter::begin(out)?;
    w.uint(key!("v"), SCHEMA_VERSION)?;
    w.plain(key!("event"), event.as_bytes())?;
    id.write_fields(&mut w)?;
    own(&mut w)?;
    w.end()
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
                id: ConnId::of_event(e),
                pid: e.owner.as_ref().map(|o| o.pid),
                comm: e.owner.as_ref().map(|o| o.comm.as_str()),
            },
            detail: &e.detail,
        }
    }
}

impl JsonRecord for EventOut<'_> {
    fn write_json(&self, out: &mut Vec<u8>) -> io::Result<()> {
        write_conn_record(out, self.event.name(), &self.id, |w| match self.detail {
            Detail::Retransmit {
                segs,
                syn,
                synack,
                err,
            } => {
                w.uint(key!("segs"), *segs)?;
                w.bool(key!("syn"), *syn)?;
                w.int(key!("err"), *err)?;
                // Last, after the fields of the first version.
                w.bool(key!("synack"), *synack)
            }
            Detail::ResetSent { reason, no_socket } => {
                // `null` on a kernel without reset reasons.
                w.opt_text(key!("reason"), reason.as_deref())?;
                w.bool(key!("no_socket"), *no_socket)
            }
            Detail::StateChange { old, new } => {
                w.plain(key!("old_state"), state_name(*old).as_bytes())?;
                w.plain(key!("new_state"), state_name(*new).as_bytes())
            }
            Detail::KeepaliveProbe { probe } => w.uint(key!("probe"), *probe),
            Detail::Timeout {
                cause,
                probes_out,
                user_timeout_ms,
            } => {
                w.plain(key!("cause"), cause.name().as_bytes())?;
                w.plain(key!("error"), b"ETIMEDOUT")?;
                w.uint(key!("probes_out"), *probes_out)?;
                w.uint(key!("user_timeout_ms"), *user_timeout_ms)
            }
            // Nothing beyond the common fields.
            Detail::ResetReceived => Ok(()),
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
                id: c.id,
                pid: owner.map(|o| o.pid),
                comm: owner.map(|o| o.comm.as_str()),
            },
            change: ch,
        }
    }
}

impl JsonRecord for VerdictOut<'_> {
    fn write_json(&self, out: &mut Vec<u8>) -> io::Result<()> {
        let ch = self.change;
        write_conn_record(out, Kind::Verdict.name(), &self.id, |w| {
            w.plain(key!("old"), ch.old.name().as_bytes())?;
            w.plain(key!("new"), ch.new.name().as_bytes())?;
            w.plain(key!("reason_code"), ch.new.reason_code().as_bytes())?;
            w.text(key!("reason"), &ch.new.reason())
        })
    }
}

/// The kernel could not hand over `lost` events.
pub struct LostOut {
    ts: Rfc3339,
    ts_mono_ns: u64,
    lost: u64,
    lost_total: u64,
}

impl LostOut {
    pub fn new(count: u64, total: u64, mono_ns: u64, clock: &Clock) -> Self {
        LostOut {
            ts: clock.rfc3339_display(mono_ns),
            ts_mono_ns: mono_ns,
            lost: count,
            lost_total: total,
        }
    }
}

impl JsonRecord for LostOut {
    fn write_json(&self, out: &mut Vec<u8>) -> io::Result<()> {
        let mut w = ObjectWriter::begin(out)?;
        w.uint(key!("v"), SCHEMA_VERSION)?;
        w.plain(key!("event"), b"lost")?;
        w.plain(key!("ts"), self.ts.as_bytes())?;
        w.uint(key!("ts_mono_ns"), self.ts_mono_ns)?;
        w.uint(key!("lost"), self.lost)?;
        w.uint(key!("lost_total"), self.lost_total)?;
        w.end()
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
            cookie: c.id.cookie,
            netns: c.id.netns,
            saddr: c.id.saddr.map(AddrOut),
            sport: c.id.sport,
            daddr: c.id.daddr.map(AddrOut),
            dport: c.id.dport,
            state: state_name(c.id.state),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::TimeoutCause;

    #[test]
    fn every_state_kind_and_cause_name_needs_no_escaping() {
        let states = (0..=u8::MAX).map(|s| state_name(s.into()));
        let kinds = Kind::ALL.into_iter().map(Kind::name);
        let causes = [
            TimeoutCause::Keepalive,
            TimeoutCause::Retransmission,
            TimeoutCause::UserTimeout,
        ]
        .map(TimeoutCause::name);
        for name in states.chain(kinds).chain(causes) {
            assert!(needs_no_escape(name.as_bytes()), "{name:?}");
        }
        assert!(!needs_no_escape(b"a\"b") && !needs_no_escape(b"a\\b"));
        assert!(!needs_no_escape(b"\x1f") && needs_no_escape(b" \x7f\xc3\xa9"));
    }

    #[test]
    fn an_object_reads_as_serde_json_writes_the_same_struct() {
        #[derive(Serialize)]
        struct Same<'a> {
            a: u64,
            b: i64,
            c: bool,
            d: Option<u32>,
            e: &'a str,
            f: Option<&'a str>,
            g: Option<AddrOut>,
            h: Vec<u8>,
        }
        // Everything serde_json escapes, and what it leaves alone.
        let text = "q\"b\\s\n\t\r\u{1}\u{1f}\u{7f}é\u{2028}🙂/";
        for (a, b) in [(0, i64::MIN), (u64::MAX, i64::MAX), (7, -5)] {
            let mut out = Vec::new();
            let mut w = ObjectWriter::begin(&mut out).unwrap();
            w.uint(key!("a"), a).unwrap();
            w.int(key!("b"), b).unwrap();
            w.bool(key!("c"), a == 0).unwrap();
            w.opt_uint(key!("d"), None::<u32>).unwrap();
            w.text(key!("e"), text).unwrap();
            w.opt_text(key!("f"), Some(text)).unwrap();
            w.addr(key!("g"), Some("fd00::1".parse().unwrap())).unwrap();
            w.serde(key!("h"), &vec![1u8, 2]).unwrap();
            w.end().unwrap();
            let same = Same {
                a,
                b,
                c: a == 0,
                d: None,
                e: text,
                f: Some(text),
                g: Some(AddrOut("fd00::1".parse().unwrap())),
                h: vec![1, 2],
            };
            assert_eq!(
                String::from_utf8(out).unwrap(),
                serde_json::to_string(&same).unwrap()
            );
        }
        #[derive(Serialize)]
        struct Empty {}
        let mut out = Vec::new();
        ObjectWriter::begin(&mut out).unwrap().end().unwrap();
        assert_eq!(out, serde_json::to_vec(&Empty {}).unwrap());
    }
}
