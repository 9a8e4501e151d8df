//! One look at every TCP socket: the iterator's rows turned into
//! [`Conn`]s with their owners, and [`Row`]s judged by the verdict rules
//! (what `snapshot` prints and `--table-dump` writes).

use std::collections::HashMap;

use anyhow::Result;
use keepalive_common::{SockRecord, sock_flags};

use super::packed::Owners;
use super::verdict::{Thresholds, Verdict, judge};
use super::{Conn, detect_hz, nearest_hz, owners};
use crate::clock::Clock;
use crate::events::Owner;
use crate::events::filter::Filter;
use crate::kernel::{check_privileges, loader};

/// A connection with its verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub conn: Conn,
    pub verdict: Verdict,
}

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

/// The kernel's tick rate, from a walk's clock stamps (or measured).
pub fn hz_of(records: &[SockRecord]) -> u64 {
    records
        .first()
        .and_then(|r| detect_hz(r.now_jiffies, r.now_ns))
        .unwrap_or_else(measure_hz)
}

/// Turns iterator rows into connections with their owners.
pub fn conns_from_records(records: &[SockRecord], with_owners: bool) -> Vec<Conn> {
    let hz = hz_of(records);
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

/// The rows of a walk that the connection table keeps (full sockets and
/// orphans, with a cookie; not TIME_WAIT or request sockets, which churn
/// makes by the hundred thousand), and the kernel's tick rate.
#[derive(Default)]
pub struct TableRows {
    pub records: Vec<SockRecord>,
    /// Clock stamps of the walk's first row, for the tick rate.
    first: Option<(u64, u64)>,
}

impl TableRows {
    /// Takes one row of a walk.
    pub fn add(&mut self, r: &SockRecord) {
        self.first.get_or_insert((r.now_jiffies, r.now_ns));
        if r.cookie != 0 && r.flags & (sock_flags::FULL | sock_flags::ORPHAN) != 0 {
            self.records.push(*r);
        }
    }

    /// Walks every socket.
    pub fn walk(ebpf: &mut aya::Ebpf) -> Result<TableRows> {
        let mut rows = TableRows::default();
        loader::for_each_socket(ebpf, |r| rows.add(r))?;
        Ok(rows)
    }

    /// The connections, with their owners (shared between a process's
    /// sockets) when asked; consumes the rows as it goes.
    pub fn into_conns(self, with_owners: bool) -> impl Iterator<Item = (Conn, Option<Owners>)> {
        let hz = self
            .first
            .and_then(|(j, ns)| detect_hz(j, ns))
            .unwrap_or_else(measure_hz);
        let owners = if with_owners {
            owners::scan_shared()
        } else {
            owners::SharedOwners::default()
        };
        self.records.into_iter().map(move |r| {
            let mut conn = Conn::from_record(&r, hz);
            let shared = (conn.ino != 0).then(|| owners.get(conn.ino)).flatten();
            if let Some(o) = shared {
                conn.owners = o.to_vec();
            }
            (conn, shared.cloned())
        })
    }
}

/// Loads only the socket iterator, walks every socket in every reachable
/// namespace, resolves owners and judges each connection.
pub fn collect(thresholds: &Thresholds) -> Result<Vec<Row>> {
    check_privileges()?;
    let info = loader::kernel_info(&Filter::default(), loader::Use::Snapshot)?;
    // Held from load to the walk's program load: parsed once.
    let _btf = loader::aya_btf()?;
    let mut ebpf = loader::load(
        &info.config,
        loader::Sizes {
            ring: Some(4096),
            stats: Some(1),
        },
    )?;
    let records = loader::walk_sockets(&mut ebpf)?;
    drop(ebpf);
    Ok(conns_from_records(&records, thresholds.owners_known)
        .into_iter()
        .map(|conn| {
            let verdict = judge(&conn, thresholds);
            Row { conn, verdict }
        })
        .collect())
}
