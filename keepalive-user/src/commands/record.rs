//! `keepalive record`: the monitor engine with a line sink. Streams events
//! (and verdict changes, and lost records) to stdout or a file until
//! SIGINT/SIGTERM or a closed output.
//!
//! Nothing is lost silently: the kernel counts every event it could not
//! place in the ring buffer, and each increase becomes a `lost` record in
//! the stream and a line on stderr.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::diag;
use crate::events::Event;
use crate::events::Kind;
use crate::events::filter::Filter;
use crate::metrics::consumer::MetricsConsumer;
use crate::metrics::labels::LabelOptions;
use crate::metrics::{Metrics, http};
use crate::monitor::{self, Consumer, Counters, Ctx, Fanout, Flow, MonitorOptions};
use crate::output::file::{FileOptions, LineFile, WriteError};
use crate::output::json::{EventOut, JsonRecord, LostOut, RowOut, VerdictOut, write_line};
use crate::output::{Clock, Format, text};
use crate::table::MatchesConn;
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
    /// Serve Prometheus metrics on this address while recording.
    pub metrics: Option<String>,
    /// Tune connections with this policy while recording (`--policy`).
    pub tune: Option<TuneOptions>,
}

/// Writes what the monitor sees as lines. Flushed after every batch
/// drained from the ring, so a reader never waits for a line while we are
/// idle, and a burst goes out in large writes.
///
/// A write that fails stops the monitor cleanly instead of aborting it:
/// the programs are detached, the totals printed, and [`run`] returns the
/// error (non-zero exit). Only whole lines reach the file.
pub struct LineSink {
    out: LineFile,
    format: Format,
    filter: Filter,
    /// Set once the output cannot take more (the reader went away, or a
    /// write failed): nothing more is written, and the monitor stops.
    closed: bool,
    /// The failed write, reported after the totals.
    error: Option<WriteError>,
    writes_to_stdout: bool,
    table_dump: Option<LineFile>,
    /// Write kernel events and verdict changes (`tune` writes only its own
    /// records).
    events: bool,
    /// What the start line on stderr says the monitor is doing.
    doing: &'static str,
    /// Where `tuned` records are counted too (`--metrics` with a policy).
    tuned_metrics: Option<Arc<Metrics>>,
    /// Events lost on a CPU without its ring yet, as last reported.
    no_ring_reported: u64,
}

impl LineSink {
    pub fn new(
        out: LineFile,
        format: Format,
        filter: Filter,
        table_dump: Option<LineFile>,
    ) -> Self {
        LineSink {
            writes_to_stdout: out.path().is_none(),
            out,
            format,
            filter,
            closed: false,
            error: None,
            table_dump,
            events: true,
            doing: "recording",
            tuned_metrics: None,
            no_ring_reported: 0,
        }
    }

    /// Also counts the `tuned` records written in `metrics`
    /// (`keepalive_tuned_total`), when there are metrics.
    pub fn counting_tuned(mut self, metrics: Option<Arc<Metrics>>) -> Self {
        self.tuned_metrics = metrics;
        self
    }

    /// The sink of `tune`: only `tuned`, `policy` and `lost` records.
    pub fn tuning_only(mut self, dry_run: bool) -> Self {
        self.events = false;
        self.doing = if dry_run {
            "tuning (dry run: nothing is changed)"
        } else {
            "tuning"
        };
        self
    }

    /// The write that failed, if one did.
    pub fn take_error(&mut self) -> Option<WriteError> {
        self.error.take()
    }

    /// A write's outcome: a reader that went away (`| head`) stops the
    /// monitor quietly; any other failure stops it and is reported at the
    /// end.
    fn flow(&mut self, r: Result<(), WriteError>) -> Flow {
        match r {
            Ok(()) if !self.closed => Flow::Continue,
            Ok(()) => Flow::Stop,
            Err(e) => {
                self.closed = true;
                if !e.is_broken_pipe() {
                    self.error.get_or_insert(e);
                }
                Flow::Stop
            }
        }
    }

    fn write_text(&mut self, line: &str) -> Flow {
        if self.closed {
            return Flow::Stop;
        }
        let r = self.out.write_line(line.as_bytes());
        self.flow(r)
    }

    fn write_json(&mut self, record: &impl JsonRecord) -> Flow {
        if self.closed {
            return Flow::Stop;
        }
        let r = self.out.line_with(|b| write_line(b, record));
        self.flow(r)
    }
}

impl TunedSink for LineSink {
    fn tuned(&mut self, t: &Tuned, clock: &Clock) -> Result<Flow> {
        if let Some(m) = &self.tuned_metrics {
            m.tuned(&t.rule, t.action.name());
        }
        Ok(match self.format {
            Format::Json => self.write_json(&TunedOut::new(t, clock)),
            Format::Text => self.write_text(&tuned_text(t, clock)),
        })
    }

    fn policy(&mut self, n: &PolicyNotice, mono_ns: u64, clock: &Clock) -> Result<Flow> {
        Ok(match self.format {
            Format::Json => self.write_json(&PolicyOut::new(n, mono_ns, clock)),
            Format::Text => self.write_text(&policy_text(n, mono_ns, clock)),
        })
    }
}

/// The line sink, alone or wrapped by a tuner: the monitor drives it as a
/// consumer, and its write error is read back at the end.
pub trait SinkConsumer {
    fn as_consumer(&mut self) -> &mut dyn Consumer;
    fn sink(&mut self) -> &mut LineSink;
}

impl SinkConsumer for LineSink {
    fn as_consumer(&mut self) -> &mut dyn Consumer {
        self
    }
    fn sink(&mut self) -> &mut LineSink {
        self
    }
}

impl SinkConsumer for Tuner<LineSink> {
    fn as_consumer(&mut self) -> &mut dyn Consumer {
        self
    }
    fn sink(&mut self) -> &mut LineSink {
        &mut self.inner
    }
}

impl Consumer for LineSink {
    fn started(&mut self, ctx: &mut Ctx) -> Result<Flow> {
        diag!(
            "{}; {} hooks attached (pid {})",
            self.doing,
            ctx.hooks,
            std::process::id()
        );
        Ok(Flow::Continue)
    }

    fn event(&mut self, ev: &Event, ctx: &Ctx) -> Result<Flow> {
        if !self.events || !self.filter.matches(ev) {
            return Ok(Flow::Continue);
        }
        Ok(match self.format {
            Format::Json => self.write_json(&EventOut::new(ev, ctx.clock)),
            Format::Text => {
                if self.closed {
                    return Ok(Flow::Stop);
                }
                let r = self.out.line_with(|b| {
                    text::write_event_text(b, ev, ctx.clock);
                    Ok(())
                });
                self.flow(r)
            }
        })
    }

    fn verdict(&mut self, ch: &VerdictChange, mono_ns: u64, ctx: &Ctx) -> Result<Flow> {
        let f = &self.filter;
        if !self.events
            || !f.kinds.is_empty() && !f.kinds.contains(&Kind::Verdict)
            || !f.matches_conn(&ch.conn)
        {
            return Ok(Flow::Continue);
        }
        Ok(match self.format {
            Format::Json => self.write_json(&VerdictOut::new(ch, mono_ns, ctx.clock)),
            Format::Text => self.write_text(&text::verdict_text(ch, mono_ns, ctx.clock)),
        })
    }

    fn lost(&mut self, count: u64, total: u64, mono_ns: u64, ctx: &Ctx) -> Result<Flow> {
        // The record in the stream first: it is what the reader relies on.
        let flow = match self.format {
            Format::Json => self.write_json(&LostOut::new(count, total, mono_ns, ctx.clock)),
            Format::Text => self.write_text(&text::lost_text(count, total, mono_ns, ctx.clock)),
        };
        let no_ring = ctx.counters.lost_no_ring - self.no_ring_reported;
        self.no_ring_reported = ctx.counters.lost_no_ring;
        diag!("{}", loss_text(count, no_ring, total));
        Ok(flow)
    }

    fn batch_done(&mut self, _ctx: &mut Ctx) -> Result<Flow> {
        if self.closed {
            return Ok(Flow::Stop);
        }
        let r = self.out.flush();
        let flow = self.flow(r);
        if flow == Flow::Continue && self.writes_to_stdout && stdout_reader_gone() {
            self.closed = true;
            return Ok(Flow::Stop);
        }
        Ok(flow)
    }

    /// SIGHUP (log rotation): write what is buffered to the old file, then
    /// open the path again. If that fails, keep writing to the old file.
    fn hangup(&mut self, _ctx: &mut Ctx) -> Result<Flow> {
        if self.closed {
            return Ok(Flow::Stop);
        }
        match self.out.reopen() {
            Ok(()) => diag!("SIGHUP: reopened {}", self.out.name()),
            Err(e) => {
                if let Some(we) = e.downcast_ref::<WriteError>() {
                    self.closed = true;
                    if !we.is_broken_pipe() {
                        self.error = e.downcast::<WriteError>().ok();
                    }
                    return Ok(Flow::Stop);
                }
                diag!("SIGHUP: {e:#}; still writing to the old file");
            }
        }
        Ok(Flow::Continue)
    }

    fn finished(&mut self, totals: &Counters, table: Option<&ConnTable>) -> Result<()> {
        if !self.closed {
            let r = self.out.flush();
            self.flow(r);
        }
        let dumped = match (table, self.table_dump.as_mut()) {
            (Some(table), Some(out)) => dump_table(out, table),
            _ => Ok(()),
        };
        diag!(
            "stopped; emitted={} received={} lost={} tracked={} evicted={} skipped={} undecoded={}",
            totals.emitted,
            totals.received,
            totals.lost,
            totals.tracked,
            totals.evicted,
            totals.skipped,
            totals.undecoded,
        );
        dumped
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
fn dump_table(out: &mut LineFile, table: &ConnTable) -> Result<()> {
    for (conn, verdict) in table.conns() {
        let row = Row {
            conn: conn.clone(),
            verdict: verdict.clone(),
        };
        out.line_with(|b| write_line(b, &RowOut::new(&row)))?;
    }
    out.flush()?;
    Ok(())
}

pub fn open_output(output: &Option<PathBuf>) -> Result<LineFile> {
    Ok(match output {
        Some(path) => LineFile::create(path, FileOptions::default())?,
        None => LineFile::stdout().context("cannot write to stdout")?,
    })
}

impl RecordOptions {
    fn monitor_options(&self) -> MonitorOptions {
        MonitorOptions {
            filter: self.filter.clone(),
            ring_size: self.ring_size,
            refresh: self.refresh,
            max_conns: self.max_conns,
            thresholds: self.thresholds,
            final_walk: self.table_dump.is_some(),
        }
    }

    /// Every setting in range, and no combination that could never print
    /// anything; errors name the flags.
    pub fn validate(&self) -> Result<()> {
        self.monitor_options().validate()?;
        if self.refresh.is_none() {
            if self.filter.kinds.contains(&Kind::Verdict) {
                anyhow::bail!(
                    "--event verdict needs the connection table, which --refresh 0 turns off"
                );
            }
            if self.table_dump.is_some() {
                anyhow::bail!(
                    "--table-dump needs the connection table, which --refresh 0 turns off"
                );
            }
        }
        Ok(())
    }
}

/// The `--metrics` of `record` and `tune`: the address bound now (so one
/// in use stops us before anything is attached) and the metrics served
/// there once the engine runs.
pub(crate) struct MetricsEndpoint {
    listener: std::net::TcpListener,
    pub metrics: Arc<Metrics>,
}

impl MetricsEndpoint {
    pub fn bind(addr: Option<&str>) -> Result<Option<MetricsEndpoint>> {
        let Some(addr) = addr else {
            return Ok(None);
        };
        Ok(Some(MetricsEndpoint {
            listener: http::bind(addr)?,
            metrics: Arc::new(Metrics::new(&LabelOptions::default())),
        }))
    }
}

/// Runs the engine with `main`, and with the metrics of `endpoint` (if
/// any) counted from the same stream and served while it runs.
pub(crate) fn run_metered(
    opts: MonitorOptions,
    main: &mut dyn Consumer,
    endpoint: Option<MetricsEndpoint>,
) -> Result<()> {
    let Some(MetricsEndpoint { listener, metrics }) = endpoint else {
        monitor::run(opts, main)?;
        return Ok(());
    };
    let _server = http::spawn(listener, metrics.clone())?;
    let mut counting = MetricsConsumer::new(metrics, LabelOptions::default(), &opts.filter);
    monitor::run(opts, &mut Fanout(vec![main, &mut counting]))?;
    Ok(())
}

/// The stderr line for `count` events lost since the last one (`no_ring`
/// of them on a CPU brought online after the start, before its ring was
/// installed; the rest found their ring full), `total` in all.
fn loss_text(count: u64, no_ring: u64, total: u64) -> String {
    let full = count.saturating_sub(no_ring);
    let late_cpu = "on a CPU brought online after the start, without an event ring yet";
    match (full, no_ring) {
        (_, 0) => {
            format!("lost {count} events (ring buffer full, {total} in all); raise --ring-size")
        }
        (0, _) => format!("lost {count} events {late_cpu} ({total} in all)"),
        _ => format!(
            "lost {count} events ({full} with the ring buffer full, {no_ring} {late_cpu}; {total} in all); raise --ring-size"
        ),
    }
}

pub fn run(opts: RecordOptions) -> Result<()> {
    opts.validate()?;
    // A bad policy is refused before anything runs or is created.
    let loaded = opts
        .tune
        .as_ref()
        .map(|t| load_policy(&t.policy_path))
        .transpose()?;
    let endpoint = MetricsEndpoint::bind(opts.metrics.as_deref())?;
    let out = open_output(&opts.output)?;
    // Opened now, so a bad path fails before anything is attached.
    let table_dump = opts
        .table_dump
        .as_deref()
        .map(|p| LineFile::create(p, FileOptions::default()))
        .transpose()?;
    let monitor_opts = opts.monitor_options();
    let sink = LineSink::new(out, opts.format, opts.filter.clone(), table_dump)
        .counting_tuned(endpoint.as_ref().map(|e| e.metrics.clone()));
    // The tuner wraps the sink: its `tuned` records go into the same stream.
    let mut main: Box<dyn SinkConsumer> = match (opts.tune, loaded) {
        (Some(tune), Some(loaded)) => Box::new(Tuner::new(sink, tune, loaded)),
        _ => Box::new(sink),
    };
    run_metered(monitor_opts, main.as_consumer(), endpoint)?;
    match main.sink().take_error() {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

#[cfg(test)]
mod loss_text_tests {
    use super::loss_text;

    #[test]
    fn the_loss_line_names_its_cause() {
        assert_eq!(
            loss_text(5, 0, 12),
            "lost 5 events (ring buffer full, 12 in all); raise --ring-size"
        );
        assert_eq!(
            loss_text(5, 5, 5),
            "lost 5 events on a CPU brought online after the start, without an event ring yet (5 in all)"
        );
        assert_eq!(
            loss_text(7, 2, 9),
            "lost 7 events (5 with the ring buffer full, 2 on a CPU brought online after the start, without an event ring yet; 9 in all); raise --ring-size"
        );
    }
}
