//! `keepalive record`: streams kernel events to stdout or a file until
//! SIGINT/SIGTERM or a closed output.
//!
//! Nothing is lost silently: the kernel counts every event it could not
//! place in the ring buffer, and each increase becomes a `lost` record in
//! the stream and a line on stderr.

use std::fs::File;
use std::io::{self, BufWriter, ErrorKind, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use aya::maps::{MapData, PerCpuArray, RingBuf};
use keepalive_common::{RawEvent, maps};
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{SignalKind, signal};

use crate::events::filter::Filter;
use crate::events::{ResetReasons, decode};
use crate::kernel::{check_privileges, loader};
use crate::output::{self, Clock};

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
}

/// Where lines go; `flush_each` for files, which readers tail.
struct Sink {
    out: Box<dyn Write>,
    flush_each: bool,
}

/// Whether to keep going after writing.
enum Flow {
    Continue,
    /// The reader went away (`| head`): stop quietly.
    Closed,
}

impl Sink {
    fn line(&mut self, s: &str) -> Result<Flow> {
        let r = writeln!(self.out, "{s}").and_then(|_| {
            if self.flush_each {
                self.out.flush()
            } else {
                Ok(())
            }
        });
        match r {
            Ok(()) => Ok(Flow::Continue),
            Err(e) if e.kind() == ErrorKind::BrokenPipe => Ok(Flow::Closed),
            Err(e) => Err(anyhow!("writing events: {e}")),
        }
    }

    fn flush(&mut self) -> Result<Flow> {
        match self.out.flush() {
            Ok(()) => Ok(Flow::Continue),
            Err(e) if e.kind() == ErrorKind::BrokenPipe => Ok(Flow::Closed),
            Err(e) => Err(anyhow!("writing events: {e}")),
        }
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
}

impl Recorder {
    fn event(&mut self, bytes: &[u8]) -> Result<Flow> {
        self.received += 1;
        if bytes.len() < size_of::<RawEvent>() {
            return Ok(Flow::Continue);
        }
        // SAFETY: RawEvent is plain old data and the slice is long enough.
        let raw: RawEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        let Some(ev) = decode(&raw, &self.reasons) else {
            return Ok(Flow::Continue);
        };
        if !self.filter.matches(&ev) {
            return Ok(Flow::Continue);
        }
        let line = match self.format {
            Format::Json => output::event_json(&ev, &self.clock).to_string(),
            Format::Text => output::event_text(&ev, &self.clock),
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
}

fn sum(counter: &PerCpuArray<MapData, u64>) -> u64 {
    counter.get(&0, 0).map(|v| v.iter().sum()).unwrap_or(0)
}

fn open_sink(output: &Option<PathBuf>) -> Result<Sink> {
    Ok(match output {
        Some(path) => Sink {
            out: Box::new(BufWriter::new(
                File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
            )),
            flush_each: true,
        },
        None => Sink {
            out: Box::new(BufWriter::new(io::stdout())),
            flush_each: false,
        },
    })
}

pub fn run(opts: RecordOptions) -> Result<()> {
    check_privileges().map_err(|e| anyhow!(e))?;
    loader::ensure_object()?;
    if let Some(size) = opts.ring_size
        && (size < 4096 || !size.is_power_of_two())
    {
        anyhow::bail!("--ring-size must be a power of two of at least 4096 bytes, got {size}");
    }
    let info = loader::kernel_info(&opts.filter)?;
    let sink = open_sink(&opts.output)?;
    let mut ebpf = loader::load(&info.config, opts.ring_size)?;
    let hooks = loader::attach_all(&mut ebpf)?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the event loop")?;
    let mut rec = Recorder {
        sink,
        format: opts.format,
        filter: opts.filter,
        reasons: info.reset_reasons,
        clock: Clock::now(),
        received: 0,
        lost_total: 0,
    };
    let take = |ebpf: &mut aya::Ebpf, name: &str| {
        ebpf.take_map(name)
            .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
    };
    let ring = RingBuf::try_from(take(&mut ebpf, maps::EVENTS)?)?;
    let drops: PerCpuArray<MapData, u64> = PerCpuArray::try_from(take(&mut ebpf, maps::DROPS)?)?;
    let emitted: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(take(&mut ebpf, maps::EMITTED)?)?;

    rt.block_on(async move {
        // SAFETY: the RingBuf owns its fd and lives inside the AsyncFd, so
        // the fd stays open for as long as it is registered.
        let mut ring = unsafe { AsyncFd::register(ring) }
            .map_err(|e| anyhow!("polling the ring buffer: {}", e.into_parts().1))?;
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        eprintln!(
            "keepalive: recording; {hooks} hooks attached (pid {})",
            std::process::id()
        );
        'outer: loop {
            tokio::select! {
                guard = ring.readable_mut() => {
                    let mut guard = guard?;
                    let rb = guard.get_inner_mut();
                    while let Some(item) = rb.next() {
                        if let Flow::Closed = rec.event(&item)? {
                            break 'outer;
                        }
                    }
                    guard.clear_ready();
                    if let Flow::Closed = rec.sink.flush()? {
                        break 'outer;
                    }
                }
                _ = tick.tick() => {
                    if let Flow::Closed = rec.lost(sum(&drops))? {
                        break 'outer;
                    }
                    if let Flow::Closed = rec.sink.flush()? {
                        break 'outer;
                    }
                }
                _ = sigint.recv() => break,
                _ = sigterm.recv() => break,
            }
        }
        // Detach first so the counters stop moving, then drain what is
        // already in the ring and account for drops: emitted == received + lost.
        drop(ebpf);
        let rb = ring.get_mut();
        while let Some(item) = rb.next() {
            if let Flow::Closed = rec.event(&item)? {
                break;
            }
        }
        let _ = rec.lost(sum(&drops))?;
        let _ = rec.sink.flush()?;
        eprintln!(
            "keepalive: stopped; emitted={} received={} lost={}",
            sum(&emitted),
            rec.received,
            rec.lost_total
        );
        Ok::<(), anyhow::Error>(())
    })
}
