//! `keepalive snapshot`: every TCP connection on the host right now, like
//! `ss`, plus keepalive settings, probes, retransmits, idle times and a
//! verdict with its reason, worst first.

use std::io::{self, BufWriter, Write};

use anyhow::{Context, Result};

use crate::events::filter::Filter;
use crate::output::json::{RowOut, write_line};
use crate::output::{Format, text};
use crate::table::MatchesConn;
use crate::table::TCP_LISTEN;
use crate::table::verdict::{Thresholds, VerdictKind};
use crate::table::walk::{Row, collect};

pub struct SnapshotOptions {
    pub format: Format,
    pub filter: Filter,
    /// Only these verdicts; empty: all.
    pub verdicts: Vec<VerdictKind>,
    pub thresholds: Thresholds,
    /// Include LISTEN, TIME_WAIT and SYN_RECV sockets.
    pub all: bool,
}

fn wanted(row: &Row, opts: &SnapshotOptions) -> bool {
    let c = &row.conn;
    // Listeners, TIME_WAIT and request sockets only with --all; orphans
    // always (a FIN_WAIT2 orphan may be a minisock).
    if !opts.all && !c.kernel_orphan && (!c.full || c.id.state == TCP_LISTEN) {
        return false;
    }
    if !opts.verdicts.is_empty() && !opts.verdicts.contains(&row.verdict.kind()) {
        return false;
    }
    opts.filter.matches_conn(c)
}

pub fn run(opts: SnapshotOptions) -> Result<()> {
    let t0 = std::time::Instant::now();
    let rows = collect(&opts.thresholds)?;
    tracing::debug!("collected {} rows in {:?}", rows.len(), t0.elapsed());
    let t0 = std::time::Instant::now();
    let mut shown: Vec<&Row> = rows.iter().filter(|r| wanted(r, &opts)).collect();
    shown.sort_by(|a, b| {
        b.verdict
            .severity()
            .cmp(&a.verdict.severity())
            .then(b.conn.idle_ms().cmp(&a.conn.idle_ms()))
    });
    let mut out = BufWriter::new(io::stdout().lock());
    let mut line = Vec::new();
    match opts.format {
        Format::Json => shown.iter().try_for_each(|r| {
            line.clear();
            write_line(&mut line, &RowOut::new(r))?;
            out.write_all(&line)
        }),
        Format::Text => text::table_lines(&shown)
            .iter()
            .try_for_each(|l| writeln!(out, "{l}")),
    }
    .and_then(|()| out.flush())
    .context("writing the snapshot")?;
    tracing::debug!(
        "{} rows sorted and written in {:?}",
        shown.len(),
        t0.elapsed()
    );
    Ok(())
}
