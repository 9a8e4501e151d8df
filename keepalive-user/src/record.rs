//! `keepalive record`: streams kernel events to stdout or a file until
//! SIGINT/SIGTERM or a closed output.
//!
//! Nothing is lost silently: the kernel counts every event it could not
//! place in the ring buffer, and each increase becomes a `lost` record in
//! the stream and a line on stderr.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use keepalive_common::{RawEvent, maps};
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{SignalKind, signal};

use crate::events::filter::Filter;
use crate::events::{Kind, ResetReasons, decode};
use crate::kernel::{check_privileges, loader};
use crate::output::file::{FileOptions, LineFile, WriteError};
use crate::output::{self, Clock};
use crate::snapshot;
use crate::table::conn_table::{ConnTable, VerdictChange};
use crate::table::verdict::Thresholds;
use keepalive_common::ConnStats;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

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
}

/// Where lines go. Flushed after every batch drained from the ring, so a
/// reader never waits for a line while we are idle.
struct Sink {
    out: LineFile,
    /// The first write that failed (disk full): recording stops, the
    /// totals are still printed, and the exit is non-zero.
    error: Option<anyhow::Error>,
}

/// Whether to keep going after writing.
enum Flow {
    Continue,
    /// The reader went away (`| head`) or the output failed: stop.
    Closed,
}

impl Sink {
    fn line(&mut self, s: &str) -> Result<Flow> {
        let r = self.out.write_line(s.as_bytes());
        Ok(self.result(r))
    }

    fn result(&mut self, r: Result<(), WriteError>) -> Flow {
        match r {
            Ok(()) => Flow::Continue,
            Err(e) if e.is_broken_pipe() => Flow::Closed,
            Err(e) => {
                self.error.get_or_insert(anyhow::Error::new(e));
                Flow::Closed
            }
        }
    }

    fn flush(&mut self) -> Result<Flow> {
        let r = self.out.flush();
        Ok(self.result(r))
    }
}

struct Recorder {
    sink: Sink,
    format: Format,
    filter: Filter,
    reasons: ResetReasons,
    clock: Clock,
    received: u64,
    lost_total: u64,
    table: Option<ConnTable>,
}

impl Recorder {
    fn event(&mut self, bytes: &[u8]) -> Result<Flow> {
        self.received += 1;
        if bytes.len() < size_of::<RawEvent>() {
            return Ok(Flow::Continue);
        }
        // SAFETY: RawEvent is plain old data and the slice is long enough.
        let raw: RawEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        let Some(mut ev) = decode(&raw, &self.reasons) else {
            return Ok(Flow::Continue);
        };
        // The timer hooks cannot reach the owner stored on the socket;
        // the table knows it.
        if ev.owner.is_none()
            && let Some(c) = self.table.as_ref().and_then(|t| t.get(ev.cookie))
        {
            ev.owner = c.owners.first().cloned();
        }
        let change = self.table.as_mut().and_then(|t| t.apply(&ev, raw.ts_ns));
        if self.filter.matches(&ev) {
            let flow = match self.format {
                Format::Json => {
                    let clock = &self.clock;
                    let r = (self.sink.out).line_with(|b| output::write_event_json(b, &ev, clock));
                    self.sink.result(r)
                }
                Format::Text => self.sink.line(&output::event_text(&ev, &self.clock))?,
            };
            if let Flow::Closed = flow {
                return Ok(Flow::Closed);
            }
        }
        match change {
            Some(ch) => self.verdict(&ch, raw.ts_ns),
            None => Ok(Flow::Continue),
        }
    }

    /// Handles every record waiting in the ring.
    fn drain(&mut self, ring: &mut RingBuf<MapData>) -> Result<Flow> {
        while let Some(item) = ring.next() {
            if let Flow::Closed = self.event(&item)? {
                return Ok(Flow::Closed);
            }
        }
        Ok(Flow::Continue)
    }

    /// Writes a verdict change when the filters let verdicts through.
    fn verdict(&mut self, ch: &VerdictChange, mono_ns: u64) -> Result<Flow> {
        let f = &self.filter;
        if !f.kinds.is_empty() && !f.kinds.contains(&Kind::Verdict) {
            return Ok(Flow::Continue);
        }
        if !f.matches_conn(&ch.conn) {
            return Ok(Flow::Continue);
        }
        let line = match self.format {
            Format::Json => output::verdict_json(ch, mono_ns, &self.clock).to_string(),
            Format::Text => output::verdict_text(ch, mono_ns, &self.clock),
        };
        self.sink.line(&line)
    }

    fn lost(&mut self, total: u64) -> Result<Flow> {
        if total <= self.lost_total {
            return Ok(Flow::Continue);
        }
        let n = total - self.lost_total;
        self.lost_total = total;
        let now = Clock::mono_now_ns();
        eprintln!(
            "keepalive: lost {n} events (ring buffer full, {total} in all); raise --ring-size"
        );
        let line = match self.format {
            Format::Json => output::lost_json(n, total, now, &self.clock).to_string(),
            Format::Text => output::lost_text(n, total, now, &self.clock),
        };
        self.sink.line(&line)
    }

    /// Re-reads every socket and the kernel's per-connection counters.
    fn refresh(
        &mut self,
        ebpf: &mut aya::Ebpf,
        btf: &aya::Btf,
        stats: &BpfHashMap<MapData, u64, ConnStats>,
        thresholds: &Thresholds,
    ) -> Result<Flow> {
        let Some(table) = self.table.as_mut() else {
            return Ok(Flow::Continue);
        };
        let records = loader::walk_sockets(ebpf, btf)?;
        let now = Clock::mono_now_ns();
        let changes = update_table(table, &records, stats, thresholds, now);
        for ch in changes {
            if let Flow::Closed = self.verdict(&ch, now)? {
                return Ok(Flow::Closed);
            }
        }
        Ok(Flow::Continue)
    }
}

/// Replaces the table's view with a walk of the sockets plus the kernel's
/// per-connection counters; returns the verdict changes.
fn update_table(
    table: &mut ConnTable,
    records: &[keepalive_common::SockRecord],
    stats: &BpfHashMap<MapData, u64, ConnStats>,
    thresholds: &Thresholds,
    now: u64,
) -> Vec<VerdictChange> {
    let conns = snapshot::conns_from_records(records, thresholds.owners_known);
    let changes = table.refresh(conns, now);
    for (cookie, s) in stats.iter().filter_map(Result::ok) {
        table.set_stats(cookie, s);
    }
    changes
}

fn sum(counter: &PerCpuArray<MapData, u64>) -> u64 {
    counter.get(&0, 0).map(|v| v.iter().sum()).unwrap_or(0)
}

fn open_sink(output: &Option<PathBuf>) -> Result<Sink> {
    let out = match output {
        Some(path) => LineFile::create(path, FileOptions::default())?,
        None => LineFile::stdout().context("cannot write to stdout")?,
    };
    Ok(Sink { out, error: None })
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
        let row = snapshot::Row {
            conn: conn.clone(),
            verdict: verdict.clone(),
        };
        out.line_with(|b| snapshot::write_row_json(b, &row))?;
    }
    out.flush()?;
    Ok(())
}

pub fn run(opts: RecordOptions) -> Result<()> {
    check_privileges().map_err(|e| anyhow!(e))?;
    loader::ensure_object()?;
    if let Some(size) = opts.ring_size
        && (size < 4096 || !size.is_power_of_two())
    {
        anyhow::bail!("--ring-size must be a power of two of at least 4096 bytes, got {size}");
    }
    // The table needs every kernel event to judge, whatever is printed.
    let mut kernel_filter = opts.filter.clone();
    if opts.filter.kinds.contains(&Kind::Verdict) {
        kernel_filter.kinds.clear();
    }
    let info = loader::kernel_info(&kernel_filter, loader::Use::Monitor)?;
    let sink = open_sink(&opts.output)?;
    // Opened now so a bad path fails before anything is attached.
    let mut table_dump = opts
        .table_dump
        .as_deref()
        .map(|p| LineFile::create(p, FileOptions::default()))
        .transpose()?;
    let mut ebpf = loader::load(
        &info.config,
        loader::Sizes {
            ring: opts.ring_size,
            // The kernel keeps counters for as many connections as the table.
            stats: Some(u32::try_from(opts.max_conns).unwrap_or(u32::MAX)),
        },
    )?;
    let (hooks, records) = loader::attach_all(&mut ebpf)?;
    let btf = loader::aya_btf()?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the event loop")?;
    let table = opts.refresh.map(|_| {
        let mut t = ConnTable::new(opts.max_conns, opts.thresholds);
        let conns = snapshot::conns_from_records(&records, opts.thresholds.owners_known);
        t.refresh(conns, Clock::mono_now_ns());
        t
    });
    let mut rec = Recorder {
        sink,
        format: opts.format,
        filter: opts.filter,
        reasons: info.reset_reasons,
        clock: Clock::now(),
        received: 0,
        lost_total: 0,
        table,
    };
    let take = |ebpf: &mut aya::Ebpf, name: &str| {
        ebpf.take_map(name)
            .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
    };
    let ring = RingBuf::try_from(take(&mut ebpf, maps::EVENTS)?)?;
    let drops: PerCpuArray<MapData, u64> = PerCpuArray::try_from(take(&mut ebpf, maps::DROPS)?)?;
    let emitted: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(take(&mut ebpf, maps::EMITTED)?)?;
    let stats: BpfHashMap<MapData, u64, ConnStats> =
        BpfHashMap::try_from(take(&mut ebpf, maps::STATS)?)?;
    let thresholds = opts.thresholds;
    let refresh_every = opts.refresh.unwrap_or(Duration::from_secs(3600));
    let writes_to_stdout = opts.output.is_none();

    rt.block_on(async move {
        // SAFETY: the RingBuf owns its fd and lives inside the AsyncFd, so
        // the fd stays open for as long as it is registered.
        let mut ring = unsafe { AsyncFd::register(ring) }
            .map_err(|e| anyhow!("polling the ring buffer: {}", e.into_parts().1))?;
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sigterm = signal(SignalKind::terminate())?;
        // The kernel wakes us only when the ring fills up; drain it on a
        // short timer for the rest.
        let mut tick = tokio::time::interval(loader::POLL_INTERVAL);
        let mut drops_at = std::time::Instant::now();
        let mut refresh = tokio::time::interval(refresh_every);
        refresh.tick().await;
        eprintln!(
            "keepalive: recording; {hooks} hooks attached (pid {})",
            std::process::id()
        );
        'outer: loop {
            tokio::select! {
                guard = ring.readable_mut() => {
                    let mut guard = guard?;
                    if let Flow::Closed = rec.drain(guard.get_inner_mut())? {
                        break 'outer;
                    }
                    guard.clear_ready();
                    if let Flow::Closed = rec.sink.flush()? {
                        break 'outer;
                    }
                }
                _ = tick.tick() => {
                    if let Flow::Closed = rec.drain(ring.get_mut())? {
                        break 'outer;
                    }
                    if drops_at.elapsed() >= Duration::from_millis(250) {
                        drops_at = std::time::Instant::now();
                        if let Flow::Closed = rec.lost(sum(&drops))? {
                            break 'outer;
                        }
                    }
                    if let Flow::Closed = rec.sink.flush()? {
                        break 'outer;
                    }
                    if writes_to_stdout && stdout_reader_gone() {
                        break 'outer;
                    }
                }
                _ = refresh.tick() => {
                    if let Flow::Closed = rec.refresh(&mut ebpf, btf, &stats, &thresholds)? {
                        break 'outer;
                    }
                }
                _ = sigint.recv() => break,
                _ = sigterm.recv() => break,
            }
        }
        // Detach first so the counters stop moving, then drain what is
        // already in the ring and account for drops: emitted == received + lost.
        // Only a table dump needs a last look at the sockets.
        let final_walk = if rec.table.is_some() && table_dump.is_some() {
            Some(loader::walk_sockets(&mut ebpf, btf))
        } else {
            None
        };
        drop(ebpf);
        let _ = rec.drain(ring.get_mut())?;
        let _ = rec.lost(sum(&drops))?;
        let _ = rec.sink.flush()?;
        if let (Some(table), Some(Ok(records))) = (rec.table.as_mut(), final_walk) {
            // Nobody reads verdict changes after the stream ended.
            let _ = update_table(table, &records, &stats, &thresholds, Clock::mono_now_ns());
            if let Some(out) = table_dump.as_mut() {
                dump_table(out, table)?;
            }
        }
        eprintln!(
            "keepalive: stopped; emitted={} received={} lost={} tracked={} evicted={}",
            sum(&emitted),
            rec.received,
            rec.lost_total,
            rec.table.as_ref().map_or(0, ConnTable::len),
            rec.table.as_ref().map_or(0, |t| t.evictions),
        );
        match rec.sink.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    })
}
