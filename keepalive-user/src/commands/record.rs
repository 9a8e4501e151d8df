//! `keepalive record`: the monitor engine with a line sink. Streams events
//! (and verdict changes, and lost records) to stdout or a file until
//! SIGINT/SIGTERM or a closed output.
//!
//! Nothing is lost silently: the kernel counts every event it could not
//! place in the ring buffer, and each increase becomes a `lost` record in
//! the stream and a line on stderr.

use std::fs::File;
use std::io::{self, BufWriter, ErrorKind, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::events::Event;
use crate::events::Kind;
use crate::events::filter::Filter;
use crate::monitor::{self, Consumer, Counters, Ctx, Flow, MonitorOptions};
use crate::output::json::{EventOut, LostOut, RowOut, VerdictOut, write_line};
use crate::output::{Clock, Format, text};
use crate::table::conn_table::{ConnTable, VerdictChange};
use crate::table::verdict::Thresholds;
use crate::table::walk::Row;
use crate::tune::report::{Tuned, TunedOut, tuned_text};
use crate::tune::{
    PolicyNotice, PolicyOut, TuneOptions, TunedSink, Tuner, load_policy, policy_text,
};

pub struct RecordOptions {
    pub format: Format,
    pub output: Option<PathBuf>,
    pub filter: Filter,
    pub ring_size: Option<u32>,
    /// How often the connection table is re-read from the kernel; `None`
    /// turns the table (and `verdict` events) off.
    pub refresh: Option<Duration>,
    pub max_conns: usize,
    pub thresholds: Thresholds,
    /// Where to write the final connection table (JSON lines) at exit.
    pub table_dump: Option<PathBuf>,
    /// Tune connections with this policy while recording (`--policy`).
    pub tune: Option<TuneOptions>,
}

/// Writes what the monitor sees as lines. Flushed after every batch
/// drained from the ring, so a reader never waits for a line while we are
/// idle, and a burst goes out in large writes.
pub struct LineSink {
    out: Box<dyn Write>,
    format: Format,
    filter: Filter,
    /// Set once the writer failed with a broken pipe: nothing more is
    /// written, and the monitor stops.
    closed: bool,
    writes_to_stdout: bool,
    table_dump: Option<PathBuf>,
}

impl LineSink {
    pub fn new(
        out: Box<dyn Write>,
        format: Format,
        filter: Filter,
        writes_to_stdout: bool,
        table_dump: Option<PathBuf>,
    ) -> Self {
        LineSink {
            out,
            format,
            filter,
            closed: false,
            writes_to_stdout,
            table_dump,
        }
    }

    /// A write's outcome: a reader that went away (`| head`) stops the
    /// monitor quietly; any other failure is an error.
    fn flow(&mut self, r: io::Result<()>) -> Result<Flow> {
        match r {
            Ok(()) if !self.closed => Ok(Flow::Continue),
            Ok(()) => Ok(Flow::Stop),
            Err(e) if e.kind() == ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(Flow::Stop)
            }
            Err(e) => Err(e).context("writing events"),
        }
    }

    fn write_text(&mut self, line: &str) -> Result<Flow> {
        if self.closed {
            return Ok(Flow::Stop);
        }
        let r = writeln!(self.out, "{line}");
        self.flow(r)
    }

    fn write_json(&mut self, record: &impl serde::Serialize) -> Result<Flow> {
        if self.closed {
            return Ok(Flow::Stop);
        }
        let r = write_line(&mut self.out, record);
        self.flow(r)
    }
}

impl TunedSink for LineSink {
    fn tuned(&mut self, t: &Tuned, clock: &Clock) -> Result<Flow> {
        match self.format {
            Format::Json => self.write_json(&TunedOut::new(t, clock)),
            Format::Text => self.write_text(&tuned_text(t, clock)),
        }
    }

    fn policy(&mut self, n: &PolicyNotice, mono_ns: u64, clock: &Clock) -> Result<Flow> {
        match self.format {
            Format::Json => self.write_json(&PolicyOut::new(n, mono_ns, clock)),
            Format::Text => self.write_text(&policy_text(n, mono_ns, clock)),
        }
    }
}

impl Consumer for LineSink {
    fn started(&mut self, ctx: &mut Ctx) -> Result<Flow> {
        eprintln!(
            "keepalive: recording; {} hooks attached (pid {})",
            ctx.hooks,
            std::process::id()
        );
        Ok(Flow::Continue)
    }

    fn event(&mut self, ev: &Event, ctx: &Ctx) -> Result<Flow> {
        if !self.filter.matches(ev) {
            return Ok(Flow::Continue);
        }
        match self.format {
            Format::Json => self.write_json(&EventOut::new(ev, ctx.clock)),
            Format::Text => self.write_text(&text::event_text(ev, ctx.clock)),
        }
    }

    fn verdict(&mut self, ch: &VerdictChange, mono_ns: u64, ctx: &Ctx) -> Result<Flow> {
        let f = &self.filter;
        if !f.kinds.is_empty() && !f.kinds.contains(&Kind::Verdict) || !f.matches_conn(&ch.conn) {
            return Ok(Flow::Continue);
        }
        match self.format {
            Format::Json => self.write_json(&VerdictOut::new(ch, mono_ns, ctx.clock)),
            Format::Text => self.write_text(&text::verdict_text(ch, mono_ns, ctx.clock)),
        }
    }

    fn lost(&mut self, count: u64, total: u64, mono_ns: u64, ctx: &Ctx) -> Result<Flow> {
        eprintln!(
            "keepalive: lost {count} events (ring buffer full, {total} in all); raise --ring-size"
        );
        match self.format {
            Format::Json => self.write_json(&LostOut::new(count, total, mono_ns, ctx.clock)),
            Format::Text => self.write_text(&text::lost_text(count, total, mono_ns, ctx.clock)),
        }
    }

    fn batch_done(&mut self, _ctx: &mut Ctx) -> Result<Flow> {
        if self.closed {
            return Ok(Flow::Stop);
        }
        let r = self.out.flush();
        let flow = self.flow(r)?;
        if flow == Flow::Continue && self.writes_to_stdout && stdout_reader_gone() {
            self.closed = true;
            return Ok(Flow::Stop);
        }
        Ok(flow)
    }

    fn finished(&mut self, totals: &Counters, table: Option<&ConnTable>) -> Result<()> {
        if !self.closed {
            let r = self.out.flush();
            self.flow(r)?;
        }
        if let (Some(table), Some(path)) = (table, &self.table_dump) {
            dump_table(path, table)?;
        }
        eprintln!(
            "keepalive: stopped; emitted={} received={} lost={} tracked={} evicted={}",
            totals.emitted, totals.received, totals.lost, totals.tracked, totals.evicted,
        );
        Ok(())
    }
}

/// True once nobody reads our stdout any more (`| head` exited): a pipe
/// whose reader closed reports an error to poll() on the writing end, so
/// we notice without waiting for the next event to fail to write.
fn stdout_reader_gone() -> bool {
    let mut pfd = libc::pollfd {
        fd: 1,
        events: 0,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no waiting.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && pfd.revents & (libc::POLLERR | libc::POLLHUP) != 0
}

/// Writes the table as JSON lines (one connection each, as `snapshot`).
fn dump_table(path: &PathBuf, table: &ConnTable) -> Result<()> {
    let mut out = BufWriter::new(
        File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
    );
    for (conn, verdict) in table.conns() {
        let row = Row {
            conn: conn.clone(),
            verdict: verdict.clone(),
        };
        write_line(&mut out, &RowOut::new(&row))?;
    }
    out.flush()
        .with_context(|| format!("writing {}", path.display()))
}

pub fn open_output(output: &Option<PathBuf>) -> Result<Box<dyn Write>> {
    Ok(match output {
        Some(path) => Box::new(BufWriter::new(
            File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
        )),
        None => Box::new(BufWriter::new(io::stdout())),
    })
}

pub fn run(opts: RecordOptions) -> Result<()> {
    if let Some(size) = opts.ring_size
        && (size < 4096 || !size.is_power_of_two())
    {
        anyhow::bail!("--ring-size must be a power of two of at least 4096 bytes, got {size}");
    }
    // A bad policy is refused before anything runs or is created.
    let loaded = opts
        .tune
        .as_ref()
        .map(|t| load_policy(&t.policy_path))
        .transpose()?;
    let out = open_output(&opts.output)?;
    if let Some(p) = &opts.table_dump {
        File::create(p).with_context(|| format!("cannot create {}", p.display()))?;
    }
    let mut sink = LineSink::new(
        out,
        opts.format,
        opts.filter.clone(),
        opts.output.is_none(),
        opts.table_dump.clone(),
    );
    let monitor_opts = MonitorOptions {
        filter: opts.filter,
        ring_size: opts.ring_size,
        refresh: opts.refresh,
        max_conns: opts.max_conns,
        thresholds: opts.thresholds,
        final_walk: opts.table_dump.is_some(),
    };
    match (opts.tune, loaded) {
        (Some(tune), Some(loaded)) => {
            monitor::run(monitor_opts, &mut Tuner::new(sink, tune, loaded))?;
        }
        _ => {
            monitor::run(monitor_opts, &mut sink)?;
        }
    }
    Ok(())
}
