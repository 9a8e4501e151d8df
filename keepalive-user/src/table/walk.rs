//! One look at every TCP socket: the iterator's rows turned into
//! [`Conn`]s with their owners, and [`Row`]s judged by the verdict rules
//! (what `snapshot` prints and `--table-dump` writes).

use std::collections::HashMap;

use anyhow::Result;
use keepalive_common::SockRecord;

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

/// Socket inode -> the processes holding it: from the kernel's owner
/// walk (`iter/task_file`, one pass over every descriptor in the kernel)
/// when it loads and its pids are ours, else from /proc (one readlink per
/// descriptor of every process: seconds on a host with 100k connections).
pub fn owners_of(ebpf: &mut aya::Ebpf, btf: &aya::Btf) -> HashMap<u64, Vec<Owner>> {
    let t0 = std::time::Instant::now();
    let (how, owners) = match owners::kernel_pids_are_ours().then(|| loader::walk_owners(ebpf, btf))
    {
        Some(Ok(rows)) => {
            tracing::debug!("owner walk: {} rows in {:?}", rows.len(), t0.elapsed());
            ("kernel walk", owners::from_rows(&rows))
        }
        Some(Err(e)) => {
            tracing::debug!("owner walk unavailable ({e:#}); reading /proc");
            ("/proc", owners::scan())
        }
        None => ("/proc (own pid namespace)", owners::scan()),
    };
    tracing::debug!(
        "owners of {} sockets found by {how} in {:?}",
        owners.len(),
        t0.elapsed()
    );
    owners
}

/// Turns iterator rows into connections with their owners (socket inode
/// -> processes; empty when owners are not wanted).
pub fn conns_from_records(
    records: &[SockRecord],
    mut owners: HashMap<u64, Vec<Owner>>,
) -> Vec<Conn> {
    let hz = hz_of(records);
    records
        .iter()
        .map(|r| {
            let mut conn = Conn::from_record(r, hz);
            // Each socket is one row: its owners move, no copy.
            if conn.ino != 0
                && let Some(o) = owners.remove(&conn.ino)
            {
                conn.owners = o;
            }
            conn
        })
        .collect()
}

/// Loads only the socket iterator, walks every socket in every reachable
/// namespace, resolves owners and judges each connection.
pub fn collect(thresholds: &Thresholds) -> Result<Vec<Row>> {
    check_privileges()?;
    let info = loader::kernel_info(&Filter::default(), loader::Use::Snapshot)?;
    let mut ebpf = loader::load(
        &info.config,
        loader::Sizes {
            ring: Some(4096),
            stats: Some(1),
        },
    )?;
    let btf = loader::aya_btf()?;
    let t0 = std::time::Instant::now();
    let records = loader::walk_sockets(&mut ebpf, btf)?;
    tracing::debug!("walked {} sockets in {:?}", records.len(), t0.elapsed());
    let owners = if thresholds.owners_known {
        owners_of(&mut ebpf, btf)
    } else {
        HashMap::new()
    };
    drop(ebpf);
    let t0 = std::time::Instant::now();
    let conns = conns_from_records(&records, owners);
    let rows = conns
        .into_iter()
        .map(|conn| {
            let verdict = judge(&conn, thresholds);
            Row { conn, verdict }
        })
        .collect();
    tracing::debug!("rows built and judged in {:?}", t0.elapsed());
    Ok(rows)
}
