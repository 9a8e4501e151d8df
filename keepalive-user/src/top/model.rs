//! What `keepalive top` knows, fed by the monitor engine through
//! [`Update`]s: the connections with their verdicts, recently closed ones
//! and how they ended, the event log, each connection's recent timeline,
//! totals with per-second history, and lost events.
//!
//! Everything is bounded (log, timelines, closed list, history), and
//! applying updates is pure, so it is unit-tested on constructed updates.

use std::collections::{HashMap, VecDeque};

use crate::events::{Detail, Event, Kind, Owner, TimeoutCause, state_name};
use crate::output::Clock;
use crate::table::Conn;
use crate::table::conn_table::VerdictChange;
use crate::table::verdict::Verdict;
use crate::tune::PolicyNotice;
use crate::tune::report::{Action, Tuned, tuned_summary};

mod history;

pub use history::{History, Series};

/// Event log entries kept.
pub const LOG_CAP: usize = 10_000;
/// Timeline entries kept per connection.
pub const TIMELINE_CAP: usize = 64;
/// Recently closed connections kept, and for how long.
pub const CLOSED_CAP: usize = 2_000;
pub const CLOSED_KEEP_NS: u64 = 300_000_000_000;
/// Seconds of per-second history (sparklines, rates).
pub const HISTORY_SECS: usize = 300;
/// Seconds a rate is averaged over.
pub const RATE_SECS: usize = 5;

const TCP_CLOSE: u32 = 7;
const NS: u64 = 1_000_000_000;

/// The monitor's running totals, as the engine reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub emitted: u64,
    pub received: u64,
    pub lost: u64,
    pub evicted: u64,
    pub tracked: u64,
}

/// What the engine thread sends the UI thread.
#[derive(Clone, Debug)]
pub enum Update {
    /// The monitor is attached; the table as first walked.
    Started {
        rows: Vec<(Conn, Verdict)>,
        hooks: usize,
        mono_ns: u64,
    },
    /// A full table after a refresh from the kernel.
    Table {
        rows: Vec<(Conn, Verdict)>,
    },
    /// Connections that events touched in the last batch, as the table has them now.
    Rows(Vec<(Conn, Verdict)>),
    Event(Event),
    Verdict {
        change: VerdictChange,
        mono_ns: u64,
    },
    Lost {
        count: u64,
        total: u64,
        mono_ns: u64,
    },
    Totals(Totals),
    /// `--policy`: what the tuner did to a connection.
    Tuned(Box<Tuned>),
    /// `--policy`: the policy was loaded, reloaded or a reload refused.
    Policy(PolicyNotice),
    /// The monitor stopped (signal or error); the UI ends too.
    Stopped,
}

/// What `top --policy` did to a connection: the rule and the action.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunedBy {
    pub rule: String,
    pub action: Action,
}

impl TunedBy {
    /// As the RULE column and the detail view show it.
    pub fn describe(&self) -> String {
        match self.action {
            Action::Tuned | Action::Enforced => self.rule.clone(),
            a => format!("{} ({})", self.rule, a.name().replace('_', " ")),
        }
    }
}

/// How a closed connection ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    TimedOut {
        cause: TimeoutCause,
        probes_out: u32,
    },
    ResetReceived,
    ResetSent {
        reason: Option<String>,
    },
    /// An orderly close, from this state.
    Closed {
        from: u32,
    },
    /// A refresh no longer found it (it closed between two walks).
    Vanished,
}

impl Ending {
    pub fn describe(&self) -> String {
        match self {
            Ending::TimedOut { cause, probes_out } => match cause {
                TimeoutCause::Keepalive => {
                    format!("timed out: {probes_out} keepalive probes unanswered (ETIMEDOUT)")
                }
                TimeoutCause::Retransmission => {
                    "timed out: retransmissions unanswered (ETIMEDOUT)".into()
                }
                TimeoutCause::UserTimeout => "timed out: TCP_USER_TIMEOUT expired".into(),
            },
            Ending::ResetReceived => "reset by the peer".into(),
            Ending::ResetSent { reason: Some(r) } => format!("reset sent ({r})"),
            Ending::ResetSent { reason: None } => "reset sent".into(),
            Ending::Closed { from } => format!("closed from {}", state_name(*from)),
            Ending::Vanished => "closed between two walks".into(),
        }
    }
}

/// A connection as shown: the table's view of it and its verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub conn: Conn,
    pub verdict: Verdict,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Closed {
    pub row: Row,
    pub ending: Ending,
    pub closed_ns: u64,
}

/// One line of the event log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEntry {
    pub ts_ns: u64,
    pub cookie: u64,
    pub conn: Option<LogConn>,
    /// `keepalive_probe`, `verdict`, `lost`, ...
    pub what: &'static str,
    pub text: String,
    /// For colouring: the verdict severity it concerns, or an event's weight.
    pub severity: u8,
    /// The verdict of a `verdict` entry.
    pub verdict: Option<&'static str>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogConn {
    pub saddr: std::net::IpAddr,
    pub sport: u16,
    pub daddr: std::net::IpAddr,
    pub dport: u16,
    pub state: u32,
    pub owners: Vec<Owner>,
}

/// One entry of a connection's timeline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Moment {
    pub ts_ns: u64,
    pub kind: Kind,
    pub text: String,
}

/// Host facts for the header.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Host {
    pub hostname: String,
    pub kernel: String,
}

impl Host {
    pub fn read() -> Host {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "?".into())
        };
        Host {
            hostname: read("/proc/sys/kernel/hostname"),
            kernel: read("/proc/sys/kernel/osrelease"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Model {
    pub host: Host,
    pub clock: Clock,
    /// CLOCK_MONOTONIC when the monitor started, and now.
    pub started_ns: u64,
    pub now_ns: u64,
    pub hooks: usize,
    /// Table refresh interval, for the header.
    pub refresh_ms: u64,
    pub rows: HashMap<u64, Row>,
    /// Oldest first.
    pub closed: VecDeque<Closed>,
    /// Oldest first.
    pub log: VecDeque<LogEntry>,
    pub timelines: HashMap<u64, VecDeque<Moment>>,
    pub history: History,
    /// Events seen per series since the start.
    pub seen: [u64; 4],
    pub totals: Totals,
    /// Events the kernel could not queue.
    pub lost: u64,
    /// Updates the engine could not hand over because the UI lagged.
    pub ui_dropped: u64,
    pub stopped: bool,
    /// The policy file `--policy` applies (`None`: not tuning).
    pub policy: Option<String>,
    /// Which rule tuned each connection (`--policy`).
    pub tuned: HashMap<u64, TunedBy>,
}

impl Model {
    pub fn new(host: Host, clock: Clock, refresh_ms: u64) -> Model {
        Model {
            host,
            clock,
            started_ns: 0,
            now_ns: 0,
            hooks: 0,
            refresh_ms,
            rows: HashMap::new(),
            closed: VecDeque::new(),
            log: VecDeque::new(),
            timelines: HashMap::new(),
            history: History::default(),
            seen: [0; 4],
            totals: Totals::default(),
            lost: 0,
            ui_dropped: 0,
            stopped: false,
            policy: None,
            tuned: HashMap::new(),
        }
    }

    /// Moves the clock: history advances, old closed connections expire.
    pub fn tick(&mut self, now_ns: u64) {
        self.now_ns = self.now_ns.max(now_ns);
        self.history.advance(self.now_ns / NS);
        let horizon = self.now_ns.saturating_sub(CLOSED_KEEP_NS);
        while self.closed.front().is_some_and(|c| c.closed_ns < horizon) {
            if let Some(c) = self.closed.pop_front() {
                self.forget_timeline(c.row.conn.id.cookie);
            }
        }
    }

    fn forget_timeline(&mut self, cookie: u64) {
        if !self.rows.contains_key(&cookie) {
            self.timelines.remove(&cookie);
        }
    }

    pub fn apply(&mut self, u: Update) {
        match u {
            Update::Started {
                rows,
                hooks,
                mono_ns,
            } => {
                self.started_ns = mono_ns;
                self.hooks = hooks;
                self.tick(mono_ns);
                self.replace_rows(rows);
            }
            Update::Table { rows } => self.replace_rows(rows),
            Update::Rows(rows) => {
                for (conn, verdict) in rows {
                    self.rows.insert(conn.id.cookie, Row { conn, verdict });
                }
            }
            Update::Event(ev) => self.event(ev),
            Update::Verdict { change, mono_ns } => self.verdict(change, mono_ns),
            Update::Lost {
                count,
                total,
                mono_ns,
            } => {
                self.lost = self.lost.max(total);
                self.push_log(LogEntry {
                    ts_ns: mono_ns,
                    cookie: 0,
                    conn: None,
                    what: "lost",
                    text: format!(
                        "{count} events dropped by the kernel (ring buffer full), {total} in all"
                    ),
                    severity: 3,
                    verdict: None,
                });
            }
            Update::Totals(t) => {
                self.totals = t;
                self.lost = self.lost.max(t.lost);
            }
            Update::Tuned(t) => self.tuned_record(*t),
            Update::Policy(n) => {
                self.policy = Some(n.file.clone());
                let mut text = format!("{} {} rules=[{}]", n.action, n.file, n.rules.join(","));
                if let Some(e) = &n.error {
                    text += &format!(" error: {e}");
                }
                self.push_log(LogEntry {
                    ts_ns: self.now_ns,
                    cookie: 0,
                    conn: None,
                    what: "policy",
                    text,
                    severity: if n.error.is_some() { 3 } else { 0 },
                    verdict: None,
                });
            }
            Update::Stopped => self.stopped = true,
        }
    }

    /// A `tuned` record: which rule now holds the connection, and a log line.
    fn tuned_record(&mut self, t: Tuned) {
        match t.action {
            Action::Tuned | Action::DryRun | Action::Enforced | Action::AppKept => {
                self.tuned.insert(
                    t.id.cookie,
                    TunedBy {
                        rule: t.rule.clone(),
                        action: t.action,
                    },
                );
            }
            Action::Restored => {
                self.tuned.remove(&t.id.cookie);
            }
            _ => {}
        }
        let conn = match (t.id.saddr, t.id.daddr) {
            (Some(saddr), Some(daddr)) => Some(LogConn {
                saddr,
                sport: t.id.sport,
                daddr,
                dport: t.id.dport,
                state: t.id.state,
                owners: t.owner.iter().cloned().collect(),
            }),
            _ => None,
        };
        self.push_log(LogEntry {
            ts_ns: t.ts_mono_ns,
            cookie: t.id.cookie,
            conn,
            what: "tuned",
            text: tuned_summary(&t),
            severity: if t.failed.is_empty() { 0 } else { 3 },
            verdict: None,
        });
    }

    /// A full walk replaces the rows; the ones it no longer has closed.
    fn replace_rows(&mut self, rows: Vec<(Conn, Verdict)>) {
        let mut fresh: HashMap<u64, Row> = HashMap::with_capacity(rows.len());
        for (conn, verdict) in rows {
            fresh.insert(conn.id.cookie, Row { conn, verdict });
        }
        let old = std::mem::replace(&mut self.rows, fresh);
        let now = self.now_ns;
        let mut gone: Vec<Row> = old
            .into_iter()
            .filter(|(cookie, _)| !self.rows.contains_key(cookie))
            .map(|(_, r)| r)
            .collect();
        gone.sort_by_key(|r| r.conn.id.cookie);
        for row in gone {
            let ending = self.ending_of(&row).unwrap_or(Ending::Vanished);
            self.push_closed(row, ending, now);
        }
        // Timelines of connections neither live nor recently closed go.
        let closed: std::collections::HashSet<u64> =
            self.closed.iter().map(|c| c.row.conn.id.cookie).collect();
        self.timelines
            .retain(|c, _| self.rows.contains_key(c) || closed.contains(c));
    }

    fn push_closed(&mut self, row: Row, ending: Ending, closed_ns: u64) {
        self.closed.push_back(Closed {
            row,
            ending,
            closed_ns,
        });
        while self.closed.len() > CLOSED_CAP {
            if let Some(c) = self.closed.pop_front() {
                self.forget_timeline(c.row.conn.id.cookie);
            }
        }
    }

    /// How a connection ended, from its own last state and what its
    /// timeline saw; `None` when nothing tells.
    fn ending_of(&self, row: &Row) -> Option<Ending> {
        if let Some(cause) = row.conn.timed_out {
            return Some(Ending::TimedOut {
                cause,
                probes_out: row.conn.probes_out,
            });
        }
        let t = self.timelines.get(&row.conn.id.cookie)?;
        t.iter().rev().find_map(|m| match m.kind {
            Kind::ResetReceived => Some(Ending::ResetReceived),
            Kind::ResetSent => Some(Ending::ResetSent { reason: None }),
            _ => None,
        })
    }

    fn push_log(&mut self, e: LogEntry) {
        self.log.push_back(e);
        while self.log.len() > LOG_CAP {
            self.log.pop_front();
        }
    }

    fn push_moment(&mut self, cookie: u64, m: Moment) {
        let t = self.timelines.entry(cookie).or_default();
        t.push_back(m);
        while t.len() > TIMELINE_CAP {
            t.pop_front();
        }
    }

    fn event(&mut self, ev: Event) {
        let kind = ev.kind();
        if let Some(s) = Series::of(kind) {
            let n = match ev.detail {
                Detail::Retransmit { segs, .. } => segs.max(1),
                _ => 1,
            };
            self.seen[s as usize] += n as u64;
            self.history.count(s, ev.ts_mono_ns, n);
        }
        let text = event_words(&ev.detail);
        let owners: Vec<Owner> = ev.owner.iter().cloned().collect();
        let owners = if owners.is_empty() {
            self.rows
                .get(&ev.cookie)
                .map(|r| r.conn.owners.clone())
                .unwrap_or_default()
        } else {
            owners
        };
        self.push_log(LogEntry {
            ts_ns: ev.ts_mono_ns,
            cookie: ev.cookie,
            conn: Some(LogConn {
                saddr: ev.saddr,
                sport: ev.sport,
                daddr: ev.daddr,
                dport: ev.dport,
                state: ev.state,
                owners,
            }),
            what: kind.name(),
            text: text.clone(),
            severity: match kind {
                Kind::Timeout | Kind::ResetReceived | Kind::ResetSent => 3,
                Kind::KeepaliveProbe | Kind::Retransmit => 1,
                _ => 0,
            },
            verdict: None,
        });
        if ev.cookie == 0 {
            return;
        }
        self.push_moment(
            ev.cookie,
            Moment {
                ts_ns: ev.ts_mono_ns,
                kind,
                text,
            },
        );
        match &ev.detail {
            Detail::StateChange { old, new } if *new == TCP_CLOSE => {
                // The row keeps its last state (a listener stays one, and
                // is hidden as one); the screen says CLOSED.
                if let Some(row) = self.rows.remove(&ev.cookie) {
                    let ending = self
                        .ending_of(&row)
                        .unwrap_or(Ending::Closed { from: *old });
                    self.push_closed(row, ending, ev.ts_mono_ns);
                }
            }
            Detail::Timeout {
                cause, probes_out, ..
            } => {
                let ending = Ending::TimedOut {
                    cause: *cause,
                    probes_out: *probes_out,
                };
                // The kernel reports ETIMEDOUT around the close: whichever
                // comes first, the closed entry says it timed out.
                if let Some(c) = self
                    .closed
                    .iter_mut()
                    .rev()
                    .find(|c| c.row.conn.id.cookie == ev.cookie)
                {
                    c.ending = ending;
                } else if let Some(row) = self.rows.get_mut(&ev.cookie) {
                    row.conn.timed_out = Some(*cause);
                    row.conn.probes_out = row.conn.probes_out.max(*probes_out);
                }
            }
            Detail::ResetReceived | Detail::ResetSent { .. } => {
                if let Some(c) = self
                    .closed
                    .iter_mut()
                    .rev()
                    .find(|c| c.row.conn.id.cookie == ev.cookie)
                    && matches!(c.ending, Ending::Closed { .. } | Ending::Vanished)
                {
                    c.ending = match &ev.detail {
                        Detail::ResetSent { reason, .. } => Ending::ResetSent {
                            reason: reason.clone(),
                        },
                        _ => Ending::ResetReceived,
                    };
                }
            }
            _ => {}
        }
    }

    fn verdict(&mut self, ch: VerdictChange, mono_ns: u64) {
        let c = &ch.conn;
        let text = format!(
            "{} -> {}: {}",
            ch.old.name(),
            ch.new.name(),
            ch.new.reason()
        );
        self.push_log(LogEntry {
            ts_ns: mono_ns,
            cookie: c.id.cookie,
            conn: match (c.id.saddr, c.id.daddr) {
                (Some(saddr), Some(daddr)) => Some(LogConn {
                    saddr,
                    sport: c.id.sport,
                    daddr,
                    dport: c.id.dport,
                    state: c.id.state,
                    owners: c.owners.clone(),
                }),
                _ => None,
            },
            what: "verdict",
            text: text.clone(),
            severity: ch.new.severity(),
            verdict: Some(ch.new.name()),
        });
        self.push_moment(
            c.id.cookie,
            Moment {
                ts_ns: mono_ns,
                kind: Kind::Verdict,
                text: format!("verdict {text}"),
            },
        );
        let row = Row {
            conn: ch.conn,
            verdict: ch.new,
        };
        if let Some(r) = self.rows.get_mut(&row.conn.id.cookie) {
            *r = row;
        } else if let Some(c) = self
            .closed
            .iter_mut()
            .rev()
            .find(|c| c.row.conn.id.cookie == row.conn.id.cookie)
        {
            c.row.verdict = row.verdict;
        } else {
            self.rows.insert(row.conn.id.cookie, row);
        }
    }

    pub fn closed_row(&self, cookie: u64) -> Option<&Closed> {
        self.closed
            .iter()
            .rev()
            .find(|c| c.row.conn.id.cookie == cookie)
    }

    /// Live connections by verdict: dead, orphaned, unprotected, healthy.
    pub fn by_verdict(&self, visible: impl Fn(&Row) -> bool) -> [usize; 4] {
        let mut n = [0; 4];
        for r in self.rows.values().filter(|r| visible(r)) {
            n[3 - r.verdict.severity().min(3) as usize] += 1;
        }
        n
    }
}

/// An event's own part in words (the tuple and owner are shown apart).
pub fn event_words(d: &Detail) -> String {
    match d {
        Detail::Retransmit {
            segs,
            syn,
            synack,
            err,
        } => {
            let mut s = format!("retransmit {segs} seg{}", if *segs == 1 { "" } else { "s" });
            if *synack {
                s += " (SYN-ACK)";
            } else if *syn {
                s += " (SYN)";
            }
            if *err != 0 {
                s += &format!(" failed: {err}");
            }
            s
        }
        Detail::ResetSent { reason, no_socket } => {
            let mut s = "reset sent".to_string();
            if let Some(r) = reason {
                s += &format!(" ({r})");
            }
            if *no_socket {
                s += ", no socket";
            }
            s
        }
        Detail::ResetReceived => "reset received".into(),
        Detail::StateChange { old, new } => {
            format!("{} -> {}", state_name(*old), state_name(*new))
        }
        Detail::KeepaliveProbe { probe } => {
            if *probe > 1 {
                format!("keepalive probe {probe} ({} unanswered)", probe - 1)
            } else {
                format!("keepalive probe {probe}")
            }
        }
        Detail::Timeout {
            cause,
            probes_out,
            user_timeout_ms,
        } => {
            let mut s = format!("timeout: {}", cause.name());
            if *probes_out > 0 {
                s += &format!(", {probes_out} probes unanswered");
            }
            if *user_timeout_ms > 0 {
                s += &format!(", user timeout {user_timeout_ms} ms");
            }
            s + " (ETIMEDOUT)"
        }
    }
}

#[cfg(test)]
#[path = "model_tests.rs"]
pub(crate) mod tests;
