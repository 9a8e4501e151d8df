//! The overhead rounds: a short warm-up, then `--rounds` rounds of
//! *baseline* (nothing watching), *keepalive* (`keepalive record --format
//! json --output /dev/null` as a child, measured once it has printed
//! "hooks attached", stopped with SIGTERM afterwards) and *bpftrace* (the
//! [`peer`](super::peer) script). Alternating cancels slow drift
//! (thermal, page cache, TIME_WAIT buildup); the report compares the
//! medians. Each watcher's own CPU time and the events it wrote/lost are
//! kept per phase. Then a kernel-side cost phase per watcher
//! ([`bpf_cost`](super::bpf_cost)).

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;
use testkit::MonitorChild;

use super::bpf_cost::{self, KernelCost, SETTLE};
use super::floor::{self, FloorRow};
use super::peer::Peer;
use super::workloads::{self, Sample};
use super::{Config, Machine, check_interrupted, interrupted};

/// How long the monitor may take to attach its hooks.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the monitor may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// keepalive's arguments in the keepalive phases.
pub const MONITOR_ARGS: [&str; 5] = ["record", "--format", "json", "--output", "/dev/null"];

/// The same monitor asked only for connection ends among state changes:
/// what the kernel-side `--to-state` filter saves (its own cost row).
pub const ENDS_ONLY_ARGS: [&str; 7] = [
    "record",
    "--format",
    "json",
    "--output",
    "/dev/null",
    "--to-state",
    "close",
];

/// What watches the workloads in a phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Subject {
    Baseline,
    Keepalive,
    Bpftrace,
}

impl Subject {
    pub fn name(self) -> &'static str {
        match self {
            Subject::Baseline => "baseline",
            Subject::Keepalive => "keepalive",
            Subject::Bpftrace => "bpftrace",
        }
    }
}

/// What the watcher did during one phase.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Usage {
    /// CPU time (user + system) the watcher used while measuring.
    pub cpu_secs: f64,
    pub wall_secs: f64,
    /// Events it wrote (keepalive: `emitted=` of its summary; bpftrace:
    /// lines printed).
    pub events: Option<u64>,
    /// Events the kernel could not hand it.
    pub lost: Option<u64>,
    /// Seconds from its start to its hooks attached.
    pub ready_secs: f64,
}

#[derive(Debug, Serialize)]
pub struct Phase {
    pub round: usize,
    pub subject: Subject,
    pub request_response: Sample,
    pub churn: Sample,
    /// `None` for a baseline phase.
    pub usage: Option<Usage>,
}

pub struct Report {
    /// Read before the first phase.
    pub machine: Machine,
    pub phases: Vec<Phase>,
    pub costs: Vec<KernelCost>,
    /// The cheapest programs' costs on this machine ([`floor`]).
    pub floor: Vec<FloorRow>,
}

/// A watcher process of one phase.
enum Watcher {
    Keepalive(MonitorChild),
    Bpftrace(Peer),
}

impl Watcher {
    fn start(subject: Subject, bin: &Path) -> Result<Option<Watcher>> {
        Ok(match subject {
            Subject::Baseline => None,
            Subject::Keepalive => Some(Watcher::Keepalive(start_monitor(bin)?)),
            Subject::Bpftrace => Some(Watcher::Bpftrace(Peer::start()?)),
        })
    }

    fn ready_after(&self) -> Duration {
        match self {
            Watcher::Keepalive(m) => m.ready_after,
            Watcher::Bpftrace(p) => p.ready_after,
        }
    }

    fn pid(&self) -> u32 {
        match self {
            Watcher::Keepalive(m) => m.pid(),
            Watcher::Bpftrace(p) => p.pid(),
        }
    }

    /// Stops it; (events, lost).
    fn stop(&mut self) -> Result<(Option<u64>, Option<u64>)> {
        match self {
            Watcher::Keepalive(m) => {
                let status = m.stop_with(libc::SIGTERM, STOP_TIMEOUT)?;
                if !status.success() {
                    anyhow::bail!(
                        "keepalive exited with {status}; its stderr:\n{}",
                        m.stderr.join("\n")
                    );
                }
                Ok((m.summary_field("emitted"), m.summary_field("lost")))
            }
            Watcher::Bpftrace(p) => p.stop().map(|(e, l)| (Some(e), Some(l))),
        }
    }
}

/// `keepalive record` to /dev/null, hooks attached.
pub fn start_monitor(bin: &Path) -> Result<MonitorChild> {
    MonitorChild::start(bin, MONITOR_ARGS, READY_TIMEOUT, interrupted)
}

pub fn measure(bin: &Path, cfg: &Config) -> Result<Report> {
    let machine = Machine::read();
    let subjects: &[Subject] = if cfg.peer {
        &[Subject::Baseline, Subject::Keepalive, Subject::Bpftrace]
    } else {
        &[Subject::Baseline, Subject::Keepalive]
    };
    eprintln!(
        "bench: {} round(s) x ({}), {} s per workload, {} connections",
        cfg.rounds,
        subjects
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(", "),
        cfg.dur.as_secs(),
        cfg.conns
    );
    eprintln!("bench: warming up");
    workloads::request_response(cfg.conns, cfg.dur.min(Duration::from_secs(1)))?;

    let mut phases = Vec::new();
    for round in 1..=cfg.rounds {
        for &subject in subjects {
            check_interrupted()?;
            eprintln!("bench: round {round}/{}: {}", cfg.rounds, subject.name());
            let mut watcher = Watcher::start(subject, bin)?;
            thread::sleep(SETTLE);
            let cpu0 = watcher
                .as_ref()
                .map(|w| testkit::child::cpu_secs(w.pid()))
                .transpose()?;
            let t0 = Instant::now();
            let (rr, churn) = both(cfg)?;
            let wall_secs = t0.elapsed().as_secs_f64();
            let usage = match (&mut watcher, cpu0) {
                (Some(w), Some(cpu0)) => {
                    let cpu_secs = testkit::child::cpu_secs(w.pid())? - cpu0;
                    let ready_secs = w.ready_after().as_secs_f64();
                    let (events, lost) = w.stop()?;
                    Some(Usage {
                        cpu_secs,
                        wall_secs,
                        events,
                        lost,
                        ready_secs,
                    })
                }
                _ => None,
            };
            phases.push(Phase {
                round,
                subject,
                request_response: rr,
                churn,
                usage,
            });
        }
    }
    let mut costs = Vec::new();
    check_interrupted()?;
    eprintln!("bench: kernel-side cost of keepalive (BPF run-time statistics on)");
    let mut mon = start_monitor(bin)?;
    costs.push(bpf_cost::measure(
        "keepalive",
        mon.pid(),
        |n| n.starts_with("ka_"),
        cfg,
    )?);
    mon.stop_with(libc::SIGTERM, STOP_TIMEOUT)?;
    check_interrupted()?;
    eprintln!("bench: kernel-side cost of keepalive --to-state close (BPF run-time statistics on)");
    let mut mon = MonitorChild::start(bin, ENDS_ONLY_ARGS, READY_TIMEOUT, interrupted)?;
    costs.push(bpf_cost::measure(
        "keepalive --to-state close",
        mon.pid(),
        |n| n.starts_with("ka_"),
        cfg,
    )?);
    mon.stop_with(libc::SIGTERM, STOP_TIMEOUT)?;
    if cfg.peer {
        check_interrupted()?;
        eprintln!("bench: kernel-side cost of bpftrace (BPF run-time statistics on)");
        let mut peer = Peer::start()?;
        // bpftrace names its programs after the probe (BEGIN included).
        costs.push(bpf_cost::measure(
            "bpftrace",
            peer.pid(),
            |n| !n.contains("BEGIN"),
            cfg,
        )?);
        peer.stop()?;
    }
    let floor = if cfg.floor {
        check_interrupted()?;
        floor::measure(cfg, &super::summary_dir(bin).join("floor"))?
    } else {
        Vec::new()
    };
    Ok(Report {
        machine,
        phases,
        costs,
        floor,
    })
}

/// Both workloads, one after the other.
fn both(cfg: &Config) -> Result<(Sample, Sample)> {
    let rr = workloads::request_response(cfg.conns, cfg.dur)?;
    check_interrupted()?;
    thread::sleep(SETTLE);
    let churn = workloads::churn(cfg.conns, cfg.dur, None)?;
    check_interrupted()?;
    Ok((rr, churn))
}
