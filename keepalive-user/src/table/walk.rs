//! One look at every TCP socket: the iterator's rows turned into
//! [`Conn`]s with their owners, and [`Row`]s judged by the verdict rules
//! (what `snapshot` prints and `--table-dump` writes).

use std::collections::HashMap;

use anyhow::Result;
use keepalive_common::{OwnerRow, SockRecord, sock_flags};

use super::conn_table::{ConnTable, VerdictChange, Walked};
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

/// Where a look at the owners found them.
enum Found {
    /// The kernel's owner walk: (socket inode, pid) per descriptor.
    Kernel(Vec<OwnerRow>),
    /// Read /proc instead, and why.
    Proc(&'static str),
}

/// Socket inode -> the processes holding it: from the kernel's owner
/// walk (`iter/task_file`, one pass over every descriptor in the kernel)
/// when it loads and its pids are ours, else from /proc (one readlink per
/// descriptor of every process: seconds on a host with 100k connections).
fn find_owners(ebpf: &mut aya::Ebpf) -> Found {
    if !owners::kernel_pids_are_ours() {
        return Found::Proc("/proc (own pid namespace)");
    }
    let t0 = std::time::Instant::now();
    match loader::walk_owners(ebpf) {
        Ok(rows) => {
            tracing::debug!("owner walk: {} rows in {:?}", rows.len(), t0.elapsed());
            Found::Kernel(rows)
        }
        Err(e) => {
            tracing::debug!("owner walk unavailable ({e:#}); reading /proc");
            Found::Proc("/proc (owner walk unavailable)")
        }
    }
}

/// Socket inode -> the processes holding it, a list per socket (what
/// `snapshot` moves into its rows).
pub fn owners_of(ebpf: &mut aya::Ebpf) -> HashMap<u64, Vec<Owner>> {
    let t0 = std::time::Instant::now();
    let (how, owners) = match find_owners(ebpf) {
        Found::Kernel(rows) => ("kernel walk", owners::from_rows(&rows)),
        Found::Proc(why) => (why, owners::scan()),
    };
    tracing::debug!(
        "owners of {} sockets found by {how} in {:?}",
        owners.len(),
        t0.elapsed()
    );
    owners
}

/// [`owners_of`], with the lists shared between a process's sockets (what
/// the connection table keeps); none unless `wanted`.
pub fn owners_if(ebpf: &mut aya::Ebpf, wanted: bool) -> owners::SharedOwners {
    if !wanted {
        return owners::SharedOwners::default();
    }
    match find_owners(ebpf) {
        Found::Kernel(rows) => owners::shared_from_rows(&rows),
        Found::Proc(why) => {
            tracing::debug!("owners found by {why}");
            owners::scan_shared()
        }
    }
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

/// A walk going straight into the connection table: each row as it is
/// read ([`ConnTable::refresh_row`]), then the owners, read after the walk
/// so that every socket walked has its owner in /proc by then, and the
/// verdicts ([`ConnTable::refresh_end`]). Nothing but a cookie per row is
/// kept in between, however many sockets there are.
pub struct TableWalk<'a> {
    table: &'a mut ConnTable,
    pass: Walked,
    /// The kernel's tick rate, from the first row.
    hz: Option<u64>,
    now_ns: u64,
}

impl<'a> TableWalk<'a> {
    pub fn new(table: &'a mut ConnTable, now_ns: u64) -> Self {
        TableWalk {
            table,
            pass: Walked::default(),
            hz: None,
            now_ns,
        }
    }

    /// Takes one row of a walk (TIME_WAIT and request sockets, which churn
    /// makes by the hundred thousand, are not tracked and not kept).
    pub fn add(&mut self, r: &SockRecord) {
        let hz = *self
            .hz
            .get_or_insert_with(|| hz_of(std::slice::from_ref(r)));
        if r.cookie != 0 && r.flags & (sock_flags::FULL | sock_flags::ORPHAN) != 0 {
            let conn = Conn::from_record(r, hz);
            self.table.refresh_row(&mut self.pass, conn, self.now_ns);
        }
    }

    /// Gives the connections their owners (looked up after the walk, see
    /// [`owners_if`]) and judges; each verdict change goes to `changed` as
    /// in [`ConnTable::refresh_with`].
    pub fn finish(
        self,
        owners: owners::SharedOwners,
        now_ns: u64,
        changed: impl FnMut(VerdictChange, bool),
    ) {
        let lookup = owners.scanned().then_some(|ino| owners.get(ino).cloned());
        self.table.refresh_end(self.pass, lookup, now_ns, changed);
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
            ring_each: None,
            stats: Some(1),
        },
    )?;
    let t0 = std::time::Instant::now();
    let records = loader::walk_sockets(&mut ebpf)?;
    tracing::debug!("walked {} sockets in {:?}", records.len(), t0.elapsed());
    let owners = if thresholds.owners_known {
        owners_of(&mut ebpf)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn row(cookie: u64, flags: u8) -> SockRecord {
        SockRecord {
            cookie,
            ino: 0,
            // 1000 s of uptime at HZ 250.
            now_jiffies: (1 << 32) + 700 * 250,
            now_ns: 1_000_000_000_000,
            family: 2,
            state: 1,
            flags,
            lsndtime: 5,
            saddr: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ..SockRecord::default()
        }
    }

    #[test]
    fn the_table_gets_tracked_rows_exactly_and_nothing_else() {
        let rows = [
            row(1, sock_flags::FULL | sock_flags::KEEPALIVE),
            // TIME_WAIT or a request socket: not tracked.
            row(2, 0),
            // Without a cookie: not tracked.
            row(0, sock_flags::FULL),
            row(3, sock_flags::ORPHAN),
        ];
        let mut t = ConnTable::new(10, Thresholds::default());
        let mut w = TableWalk::new(&mut t, 1);
        rows.iter().for_each(|r| w.add(r));
        assert_eq!(w.hz, Some(250));
        w.finish(owners::SharedOwners::default(), 1, |_, _| {});
        assert_eq!(t.len(), 2);
        assert_eq!(t.get(1), Some(Conn::from_record(&rows[0], 250)));
        assert_eq!(t.get(3), Some(Conn::from_record(&rows[3], 250)));
    }
}
