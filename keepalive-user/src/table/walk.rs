//! One look at every TCP socket: the iterator's rows turned into
//! [`Conn`]s with their owners, and [`Row`]s judged by the verdict rules
//! (what `snapshot` prints and `--table-dump` writes).

use std::collections::HashMap;

use anyhow::Result;
use keepalive_common::{OwnerRow, SockRecord, sock_flags};

use super::packed::{Owners, Packed};
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
        return Found::Proc("own pid namespace");
    }
    let t0 = std::time::Instant::now();
    match loader::walk_owners(ebpf) {
        Ok(rows) => {
            tracing::debug!("owner walk: {} rows in {:?}", rows.len(), t0.elapsed());
            Found::Kernel(rows)
        }
        Err(e) => {
            tracing::debug!("owner walk unavailable ({e:#}); reading /proc");
            Found::Proc("owner walk unavailable")
        }
    }
}

/// Socket inode -> the processes holding it, a list per socket (what
/// `snapshot` moves into its rows).
pub fn owners_of(ebpf: &mut aya::Ebpf) -> HashMap<u64, Vec<Owner>> {
    let t0 = std::time::Instant::now();
    let owners = match find_owners(ebpf) {
        Found::Kernel(rows) => owners::from_rows(&rows),
        Found::Proc(why) => {
            tracing::debug!("owners from /proc: {why}");
            owners::scan()
        }
    };
    tracing::debug!("owners of {} sockets in {:?}", owners.len(), t0.elapsed());
    owners
}

/// [`owners_of`], with the lists shared between a process's sockets (what
/// the connection table keeps).
pub fn shared_owners_of(ebpf: &mut aya::Ebpf) -> owners::SharedOwners {
    match find_owners(ebpf) {
        Found::Kernel(rows) => owners::shared_from_rows(&rows),
        Found::Proc(why) => {
            tracing::debug!("owners from /proc: {why}");
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

/// The rows of a walk that the connection table keeps (full sockets and
/// orphans, with a cookie; not TIME_WAIT or request sockets, which churn
/// makes by the hundred thousand), packed as they arrive: until the owners
/// are read (after the walk, so that every socket walked has its owner in
/// /proc by then) they take 96 bytes each, not a 152-byte row.
#[derive(Default)]
pub struct TableRows {
    rows: Vec<(u64, Packed)>,
    /// The kernel's tick rate, from the first row.
    hz: Option<u64>,
    /// Their holders, once looked up.
    owners: owners::SharedOwners,
}

impl TableRows {
    /// Takes one row of a walk.
    pub fn add(&mut self, r: &SockRecord) {
        let hz = *self
            .hz
            .get_or_insert_with(|| hz_of(std::slice::from_ref(r)));
        if r.cookie != 0 && r.flags & (sock_flags::FULL | sock_flags::ORPHAN) != 0 {
            let conn = Conn::from_record(r, hz);
            self.rows.push((r.cookie, Packed::new(&conn, None)));
        }
    }

    /// The kernel's tick rate, from the first row taken (or measured).
    pub fn hz(&self) -> u64 {
        self.hz.unwrap_or_else(measure_hz)
    }

    /// Looks up who holds the sockets taken so far (after the walk, so
    /// that every socket walked has its holder by then).
    pub fn find_owners(&mut self, ebpf: &mut aya::Ebpf) {
        self.owners = shared_owners_of(ebpf);
    }

    /// Walks every socket, and finds their owners if asked.
    pub fn walk(ebpf: &mut aya::Ebpf, with_owners: bool) -> Result<TableRows> {
        let mut rows = TableRows::default();
        loader::for_each_socket(ebpf, |r| rows.add(r))?;
        if with_owners {
            rows.find_owners(ebpf);
        }
        Ok(rows)
    }

    /// The connections, with their owners (shared between a process's
    /// sockets; none unless looked up); consumes the rows as it goes.
    pub fn into_conns(self) -> impl Iterator<Item = (Conn, Option<Owners>)> {
        let owners = self.owners;
        self.rows.into_iter().map(move |(cookie, packed)| {
            let mut conn = packed.conn(cookie);
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
        let mut t = TableRows::default();
        rows.iter().for_each(|r| t.add(r));
        assert_eq!(t.hz, Some(250));
        let got: Vec<_> = t.into_conns().collect();
        let want = [&rows[0], &rows[3]].map(|r| (Conn::from_record(r, 250), None));
        assert_eq!(got, want);
    }
}
