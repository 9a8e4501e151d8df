//! `cargo xtask bench --soak`: the monitor's memory (#7 item 9), reported,
//! not judged by a test. Two phases, each with a fresh `keepalive record
//! --format json --output /dev/null` (default settings):
//! - *churn*: connections opened and closed at `--rate` per second on
//!   127.0.0.1 for `--seconds`; its resident set size sampled every
//!   `--every` seconds. Flat is the goal.
//! - *tracked*: `--conns` established connections held in a test
//!   namespace (the [`hold`](super::hold) helpers) before the monitor
//!   starts; its RSS once a table refresh has taken them in, and the
//!   `tracked=` count of its summary. The goal is <= 64 MiB at 100k.
//!
//! Each RSS is split by what backs it ([`Memory`]: heap and other
//! anonymous memory, code and libraries, the BPF maps it has mapped such as
//! the ring buffer) with the peak so far, so that growth can be placed.
//!
//! Results on stdout and in `<target dir>/bench/soak.json`.

use std::fmt::Write as _;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Parser;
use serde::Serialize;
use testkit::{MonitorChild, NamedNetns};

use super::memory::Memory;
use super::overhead::{MONITOR_ARGS, start_monitor};
use super::workloads::{self, Sample};
use super::{
    Machine, check_interrupted, hold, parse_opts, require_root_and, signals, summary_dir,
    write_summary,
};

const MIB: f64 = 1024.0 * 1024.0;
/// RSS at `--conns` tracked connections, at most (issue #7 item 9).
const TRACKED_RSS_GOAL_MIB: f64 = 64.0;
/// 100 ms samples over one default refresh period (5 s) in the tracked phase.
const REFRESH_SAMPLES: usize = 50;
/// How long a stop may take.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Parser, Debug)]
#[command(
    name = "cargo xtask bench --soak",
    about = "The monitor's resident memory under connection churn and at many tracked connections (needs root)"
)]
struct SoakOpts {
    /// Selects this benchmark.
    #[arg(long)]
    soak: bool,
    /// Connections per second in the churn phase.
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    rate: u64,
    /// Seconds of churn.
    #[arg(long, default_value_t = 180, value_parser = clap::value_parser!(u64).range(1..=3600))]
    seconds: u64,
    /// Seconds between RSS samples.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    every: u64,
    /// Established connections held for the tracked phase (0: skip it).
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(0..=500_000))]
    conns: u64,
}

#[derive(Serialize)]
struct RssSample {
    secs: f64,
    rss_bytes: u64,
    memory: Memory,
}

impl RssSample {
    fn take(secs: f64, mon: &MonitorChild) -> Result<RssSample> {
        let memory = Memory::of(mon.pid())?;
        Ok(RssSample {
            secs,
            rss_bytes: memory.rss,
            memory,
        })
    }
}

#[derive(Serialize)]
struct ChurnPhase {
    rate_asked: u64,
    workload: Sample,
    samples: Vec<RssSample>,
    start_rss_bytes: u64,
    peak_rss_bytes: u64,
    end_rss_bytes: u64,
    events: Option<u64>,
    lost: Option<u64>,
}

#[derive(Serialize)]
struct TrackedPhase {
    conns: u64,
    /// `tracked=` of the monitor's summary.
    tracked: Option<u64>,
    rss_bytes: u64,
    memory: Memory,
    /// Lowest and highest RSS over the next refresh period (sampled every
    /// 100 ms): between refreshes, and during one.
    rss_min_bytes: u64,
    rss_max_bytes: u64,
    goal_rss_mib: f64,
    /// (rss - churn phase start rss) / tracked.
    bytes_per_tracked_conn: Option<f64>,
}

#[derive(Serialize)]
struct SoakSummary {
    schema: u32,
    machine: Machine,
    monitor_args: [&'static str; 5],
    churn: ChurnPhase,
    tracked: Option<TrackedPhase>,
}

pub fn run(bin: &Path, args: &[String]) -> Result<()> {
    let Some(o) = parse_opts::<SoakOpts>("cargo xtask bench --soak", args)? else {
        return Ok(());
    };
    debug_assert!(o.soak);
    require_root_and(
        bin,
        "bench --soak loads eBPF programs and creates a network namespace",
    )?;
    let _signals = signals::Guard::install();
    let machine = Machine::read();
    let churn = churn_phase(bin, &o)?;
    let tracked = if o.conns > 0 {
        check_interrupted()?;
        Some(tracked_phase(bin, o.conns, churn.start_rss_bytes)?)
    } else {
        None
    };
    let summary = SoakSummary {
        schema: 2,
        machine,
        monitor_args: MONITOR_ARGS,
        churn,
        tracked,
    };
    print!("{}", table(&summary));
    write_summary(&summary_dir(bin).join("soak.json"), &summary)
}

fn churn_phase(bin: &Path, o: &SoakOpts) -> Result<ChurnPhase> {
    eprintln!(
        "bench --soak: churn at {} conn/s for {} s, RSS every {} s",
        o.rate, o.seconds, o.every
    );
    let mut mon = start_monitor(bin)?;
    let first = RssSample::take(0.0, &mon)?;
    let start_rss_bytes = first.rss_bytes;
    let t0 = Instant::now();
    let (dur, rate) = (Duration::from_secs(o.seconds), o.rate as f64);
    let worker = thread::spawn(move || workloads::churn(8, dur, Some(rate)));
    let mut samples = vec![first];
    let mut next = Duration::from_secs(o.every);
    while !worker.is_finished() {
        thread::sleep(Duration::from_millis(100));
        if t0.elapsed() >= next {
            let s = RssSample::take(t0.elapsed().as_secs_f64(), &mon)?;
            eprintln!(
                "bench --soak: {:>5.0} s  RSS {:.1} MiB",
                s.secs,
                s.rss_bytes as f64 / MIB
            );
            samples.push(s);
            next += Duration::from_secs(o.every);
        }
    }
    let workload = worker
        .join()
        .map_err(|_| anyhow::anyhow!("the churn thread panicked"))??;
    check_interrupted()?;
    let last = RssSample::take(t0.elapsed().as_secs_f64(), &mon)?;
    let end_rss_bytes = last.rss_bytes;
    samples.push(last);
    let (events, lost) = stop(&mut mon)?;
    Ok(ChurnPhase {
        rate_asked: o.rate,
        workload,
        peak_rss_bytes: samples.iter().map(|s| s.rss_bytes).max().unwrap_or(0),
        samples,
        start_rss_bytes,
        end_rss_bytes,
        events,
        lost,
    })
}

fn tracked_phase(bin: &Path, conns: u64, idle_rss: u64) -> Result<TrackedPhase> {
    let ns = NamedNetns::create(&format!("ka-soak-{}", std::process::id()))?;
    let held = hold::Held::make(&ns, conns, "bench --soak")?;
    let mut mon = start_monitor(bin)?;
    // The default refresh is 5 s: two of them take every connection in.
    eprintln!("bench --soak: waiting 12 s for the monitor's table refreshes");
    for _ in 0..120 {
        check_interrupted()?;
        thread::sleep(Duration::from_millis(100));
    }
    let memory = Memory::of(mon.pid())?;
    let (mut rss_min_bytes, mut rss_max_bytes) = (memory.rss, memory.rss);
    for _ in 0..REFRESH_SAMPLES {
        check_interrupted()?;
        thread::sleep(Duration::from_millis(100));
        let rss = Memory::of(mon.pid())?.rss;
        rss_min_bytes = rss_min_bytes.min(rss);
        rss_max_bytes = rss_max_bytes.max(rss);
    }
    let _ = stop(&mut mon)?;
    let tracked = mon.summary_field("tracked");
    drop(held);
    drop(ns);
    Ok(TrackedPhase {
        conns,
        tracked,
        rss_bytes: memory.rss,
        memory,
        rss_min_bytes,
        rss_max_bytes,
        goal_rss_mib: TRACKED_RSS_GOAL_MIB,
        bytes_per_tracked_conn: tracked
            .filter(|&t| t > 0)
            .map(|t| memory.rss.saturating_sub(idle_rss) as f64 / t as f64),
    })
}

/// SIGTERM; (events emitted, lost) from its summary.
fn stop(mon: &mut MonitorChild) -> Result<(Option<u64>, Option<u64>)> {
    let status = mon.stop_with(libc::SIGTERM, STOP_TIMEOUT)?;
    if !status.success() {
        bail!(
            "keepalive exited with {status}; its stderr:\n{}",
            mon.stderr.join("\n")
        );
    }
    Ok((mon.summary_field("emitted"), mon.summary_field("lost")))
}

fn table(s: &SoakSummary) -> String {
    let mib = |b: u64| format!("{:.1}", b as f64 / MIB);
    let mut o = String::new();
    let c = &s.churn;
    let _ = writeln!(o, "\nkeepalive memory soak: {}", MONITOR_ARGS.join(" "));
    let _ = writeln!(o, "{}", s.machine.line());
    let _ = writeln!(
        o,
        "churn: asked {} conn/s, made {:.0} conn/s ({} errors) for {:.0} s; events {} lost {}",
        c.rate_asked,
        c.workload.rate(),
        c.workload.errors,
        c.workload.secs,
        c.events.map_or("-".into(), |v| v.to_string()),
        c.lost.map_or("-".into(), |v| v.to_string()),
    );
    let _ = writeln!(o, "{}", memory_header("seconds"));
    for p in &c.samples {
        let _ = writeln!(o, "{}", memory_row(&format!("{:.0}", p.secs), &p.memory));
    }
    let _ = writeln!(
        o,
        "RSS start {} MiB, peak {} MiB, end {} MiB (growth {} MiB)",
        mib(c.start_rss_bytes),
        mib(c.peak_rss_bytes),
        mib(c.end_rss_bytes),
        mib(c.end_rss_bytes.saturating_sub(c.start_rss_bytes))
    );
    if let Some(t) = &s.tracked {
        let _ = writeln!(o, "{}", memory_header("tracked"));
        let _ = writeln!(o, "{}", memory_row(&t.conns.to_string(), &t.memory));
        let _ = writeln!(
            o,
            "over the next 5 s (a refresh every 5 s), sampled every 100 ms: RSS {} to {} MiB",
            mib(t.rss_min_bytes),
            mib(t.rss_max_bytes)
        );
        let _ = writeln!(
            o,
            "tracked: {} connections held ({} sockets), monitor tracked {}: RSS {} MiB (goal <= {} MiB: {}), {} bytes per tracked connection",
            t.conns,
            2 * t.conns,
            t.tracked.map_or("-".into(), |v| v.to_string()),
            mib(t.rss_bytes),
            t.goal_rss_mib,
            if t.rss_bytes as f64 / MIB <= t.goal_rss_mib {
                "ok"
            } else {
                "MISSED"
            },
            t.bytes_per_tracked_conn
                .map_or("-".into(), |v| format!("{v:.0}")),
        );
    }
    o
}

/// The columns of [`memory_row`], after a first one named `first`.
fn memory_header(first: &str) -> String {
    format!(
        "{first:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}   (MiB)",
        "RSS", "peak", "anon", "file", "bpf-map", "shmem"
    )
}

/// One process's memory in MiB: RSS, peak, anonymous (heap), file-backed
/// (code, libraries and BPF maps), of which BPF maps (the ring buffer), shmem.
fn memory_row(first: &str, m: &Memory) -> String {
    let mib = |b: u64| format!("{:.1}", b as f64 / MIB);
    format!(
        "{first:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        mib(m.rss),
        mib(m.peak),
        mib(m.anon),
        mib(m.file),
        mib(m.bpf_maps),
        mib(m.shmem)
    )
}
