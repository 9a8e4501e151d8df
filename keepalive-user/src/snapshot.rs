//! `keepalive snapshot`: every TCP connection on the host right now, like
//! `ss`, plus keepalive settings, probes, retransmits, idle times and a
//! verdict with its reason, worst first.

use std::collections::HashMap;
use std::io::{self, BufWriter, ErrorKind, Write};

use anyhow::{Result, anyhow};
use serde_json::Value;

use crate::events::filter::Filter;
use crate::events::{Owner, state_name};
use crate::kernel::{check_privileges, loader};
use crate::output::{Clock, SCHEMA_VERSION};
use crate::record::Format;
use crate::table::verdict::{Thresholds, Verdict, judge};
use crate::table::{Conn, detect_hz, nearest_hz, owners};
use keepalive_common::SockRecord;

pub struct SnapshotOptions {
    pub format: Format,
    pub filter: Filter,
    /// Only these verdict names; empty: all.
    pub verdicts: Vec<String>,
    pub thresholds: Thresholds,
    /// Include LISTEN, TIME_WAIT and SYN_RECV sockets.
    pub all: bool,
}

pub const VERDICT_NAMES: [&str; 4] = ["dead", "orphaned", "unprotected", "healthy"];

/// Reads the kernel's tick rate by sampling /proc/timer_list 100 ms apart
/// (only needed within seconds of the 5-minute uptime mark).
fn measure_hz() -> u64 {
    let sample = || -> Option<(u64, u64)> {
        let text = std::fs::read_to_string("/proc/timer_list").ok()?;
        let j = text
            .lines()
            .find_map(|l| l.strip_prefix("jiffies: "))?
            .trim()
            .parse()
            .ok()?;
        Some((j, Clock::mono_now_ns()))
    };
    let (Some((j0, t0)), Some((j1, t1))) = (sample(), {
        std::thread::sleep(std::time::Duration::from_millis(100));
        sample()
    }) else {
        return 250;
    };
    nearest_hz((j1 - j0) as f64 / ((t1 - t0) as f64 / 1e9))
}

/// A connection with its verdict.
pub struct Row {
    pub conn: Conn,
    pub verdict: Verdict,
}

/// Turns iterator rows into connections with their owners.
pub fn conns_from_records(records: &[SockRecord], with_owners: bool) -> Vec<Conn> {
    let hz = records
        .first()
        .and_then(|r| detect_hz(r.now_jiffies, r.now_ns))
        .unwrap_or_else(measure_hz);
    let owners: HashMap<u64, Vec<Owner>> = if with_owners {
        owners::scan()
    } else {
        HashMap::new()
    };
    records
        .iter()
        .map(|r| {
            let mut conn = Conn::from_record(r, hz);
            if conn.ino != 0
                && let Some(o) = owners.get(&conn.ino)
            {
                conn.owners = o.clone();
            }
            conn
        })
        .collect()
}

/// Walks every socket, resolves owners and judges each connection.
pub fn collect(thresholds: &Thresholds) -> Result<Vec<Row>> {
    check_privileges().map_err(|e| anyhow!(e))?;
    let info = loader::kernel_info(&Filter::default(), loader::Use::Snapshot)?;
    let mut ebpf = loader::load(
        &info.config,
        loader::Sizes {
            ring: Some(4096),
            stats: Some(1),
        },
    )?;
    let btf = loader::aya_btf()?;
    let records = loader::walk_sockets(&mut ebpf, btf)?;
    drop(ebpf);
    Ok(conns_from_records(&records, thresholds.owners_known)
        .into_iter()
        .map(|conn| {
            let verdict = judge(&conn, thresholds);
            Row { conn, verdict }
        })
        .collect())
}

fn wanted(row: &Row, opts: &SnapshotOptions) -> bool {
    let c = &row.conn;
    // Listeners, TIME_WAIT and request sockets only with --all; orphans
    // always (a FIN_WAIT2 orphan may be a minisock).
    if !opts.all && !c.kernel_orphan && (!c.full || c.state == crate::table::TCP_LISTEN) {
        return false;
    }
    if !opts.verdicts.is_empty() && !opts.verdicts.iter().any(|v| v == row.verdict.name()) {
        return false;
    }
    opts.filter.matches_conn(c)
}

fn endpoint(a: Option<std::net::IpAddr>, port: u16) -> String {
    match a {
        Some(std::net::IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
        Some(a) => format!("{a}:{port}"),
        None => format!("*:{port}"),
    }
}

/// The JSON form of a connection row, serialised straight to the output
/// (building a `serde_json::Value` per row costs several times more).
#[derive(serde::Serialize)]
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

#[derive(serde::Serialize)]
pub struct KeepaliveOut {
    enabled: bool,
    idle_ms: u64,
    intvl_ms: u64,
    probes: u32,
}

#[derive(serde::Serialize)]
pub struct TimerOut {
    kind: &'static str,
    fires_in_ms: i64,
}

#[derive(serde::Serialize)]
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

/// One connection as a JSON value.
pub fn row_json(row: &Row) -> Value {
    serde_json::to_value(RowOut::new(row)).unwrap_or(Value::Null)
}

/// Writes one connection as a JSON line.
pub fn write_row_json(out: &mut impl Write, row: &Row) -> io::Result<()> {
    serde_json::to_writer(&mut *out, &RowOut::new(row)).map_err(io::Error::other)?;
    out.write_all(b"\n")
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
            state_name(c.state),
            endpoint(c.saddr, c.sport),
            endpoint(c.daddr, c.dport),
            owner,
            ka,
            c.probes_out,
            c.total_retrans,
            // Listeners and minisocks have no traffic stamps.
            if c.full && c.state != crate::table::TCP_LISTEN {
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

pub fn run(opts: SnapshotOptions) -> Result<()> {
    for v in &opts.verdicts {
        if !VERDICT_NAMES.contains(&v.as_str()) {
            anyhow::bail!(
                "unknown verdict `{v}`: expected one of {}",
                VERDICT_NAMES.join(", ")
            );
        }
    }
    let rows = collect(&opts.thresholds)?;
    let mut shown: Vec<&Row> = rows.iter().filter(|r| wanted(r, &opts)).collect();
    shown.sort_by(|a, b| {
        b.verdict
            .severity()
            .cmp(&a.verdict.severity())
            .then(b.conn.idle_ms().cmp(&a.conn.idle_ms()))
    });
    let mut out = BufWriter::new(io::stdout().lock());
    let result = match opts.format {
        Format::Json => shown.iter().try_for_each(|r| write_row_json(&mut out, r)),
        Format::Text => table_lines(&shown)
            .iter()
            .try_for_each(|l| writeln!(out, "{l}")),
    }
    .and_then(|()| out.flush());
    match result {
        Err(e) if e.kind() == ErrorKind::BrokenPipe => Ok(()),
        r => r.map_err(|e| anyhow!("writing the snapshot: {e}")),
    }
}
