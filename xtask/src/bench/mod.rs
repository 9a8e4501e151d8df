//! `cargo xtask bench`: what the monitor costs, next to no monitor and to
//! bpftrace on the same tracepoints, measured side by side in one run;
//! `--snapshot`: `keepalive snapshot` against `ss`; `--soak`: the
//! monitor's memory under churn; `--micro`: the criterion benchmarks of
//! userspace decoding.
//!
//! One file per job: [`workloads`] (the loopback TCP load), [`overhead`]
//! (the baseline / keepalive / bpftrace rounds), [`peer`] (the bpftrace
//! script), [`bpf_cost`] (per-program cost from the kernel's run-time
//! statistics), [`report`] (table and summary.json of the overhead run),
//! [`soak`] (memory under churn and at many tracked connections, split by
//! [`memory`]),
//! [`snapshot`] (snapshot vs ss, with [`hold`] holding the connections).
//!
//! Results go to stdout as tables and to `<target dir>/bench/*.json`.
//! Missing a target is reported, not an error: the numbers are noisy on
//! small machines and are for people to judge.

mod bpf_cost;
mod floor;
mod hold;
mod memory;
mod overhead;
mod peer;
mod report;
mod signals;
mod snapshot;
mod soak;
mod workloads;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde::Serialize;

pub use hold::hold_conns;
pub(crate) use signals::{check_interrupted, interrupted};

/// The hidden xtask subcommand running the connection helper (main.rs).
pub const HOLD_SUBCOMMAND: &str = "bench-hold-conns";

#[derive(Parser, Debug)]
#[command(
    name = "cargo xtask bench",
    about = "Measure the monitor's overhead on loopback TCP workloads, next to bpftrace on the same tracepoints (needs root)"
)]
struct Opts {
    /// Seconds per workload per phase.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=600))]
    seconds: u64,
    /// Rounds of (baseline, keepalive, bpftrace).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=50))]
    rounds: u64,
    /// Connections (request/response) and client threads (churn).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=256))]
    conns: u64,
    /// Leave out the bpftrace peer row.
    #[arg(long)]
    no_peer: bool,
    /// Leave out the floor rows (bpftrace: empty, timestamp-only and
    /// map-update programs on the same tracepoint; tp_btf: empty,
    /// timestamp-only and timestamp + one ring record: this machine's
    /// cheapest possible per-run costs, next to keepalive's).
    #[arg(long)]
    no_floor: bool,
    /// Run the snapshot benchmark instead: `keepalive snapshot` against
    /// `ss -tanoi`/`ss -tanoip` on 10k and 100k connections. It has its own
    /// --conns (a list), --rounds and --timeout: see
    /// `cargo xtask bench --snapshot --help`.
    #[arg(long)]
    snapshot: bool,
    /// Run the memory soak instead: the monitor's RSS under connection
    /// churn and at many tracked connections. Options: `cargo xtask bench
    /// --soak --help`.
    #[arg(long)]
    soak: bool,
    /// Run the criterion micro-benchmarks instead (`cargo bench -p
    /// keepalive-user`: userspace decoding, events/s on one core).
    #[arg(long)]
    micro: bool,
}

/// The settings of one overhead run.
pub(crate) struct Config {
    pub dur: std::time::Duration,
    pub rounds: usize,
    pub conns: usize,
    pub peer: bool,
    pub floor: bool,
}

/// Runs the benchmark selected by `args` with the release binary `bin`.
pub fn run(bin: &Path, args: &[String]) -> Result<()> {
    if selects(args, "--snapshot") {
        return snapshot::run(bin, args);
    }
    if selects(args, "--soak") {
        return soak::run(bin, args);
    }
    let Some(opts) = parse_opts::<Opts>("cargo xtask bench", args)? else {
        return Ok(());
    };
    if opts.micro {
        return micro();
    }
    require_root_and(
        bin,
        "bench loads eBPF programs and turns on BPF run-time statistics",
    )?;
    let _signals = signals::Guard::install();
    let cfg = Config {
        dur: std::time::Duration::from_secs(opts.seconds),
        rounds: opts.rounds as usize,
        conns: opts.conns as usize,
        peer: !opts.no_peer,
        floor: !opts.no_floor,
    };
    let report = overhead::measure(bin, &cfg)?;
    print!("{}", report.table(bin, &cfg));
    write_summary(
        &summary_dir(bin).join("summary.json"),
        &report.summary(bin, &cfg),
    )
}

/// `cargo bench -p keepalive-user`: the criterion benchmarks.
fn micro() -> Result<()> {
    let status = Command::new(crate::cargo())
        .current_dir(crate::root())
        .args(["bench", "-p", "keepalive-user", "--bench", "decode"])
        .env("KEEPALIVE_REQUIRE_EBPF", "1")
        .status()
        .context("cannot run cargo bench")?;
    if !status.success() {
        bail!("cargo bench -p keepalive-user failed ({status})");
    }
    Ok(())
}

/// Whether `args` (those of `cargo xtask bench`) contain `flag` before any `--`.
fn selects(args: &[String], flag: &str) -> bool {
    args.iter().take_while(|a| *a != "--").any(|a| a == flag)
}

/// Parses a benchmark's own options; `None` after printing `--help`.
fn parse_opts<T: Parser>(name: &str, args: &[String]) -> Result<Option<T>> {
    match T::try_parse_from(std::iter::once(name.to_string()).chain(args.iter().cloned())) {
        Ok(o) => Ok(Some(o)),
        Err(e) if !e.use_stderr() => {
            // --help / --version
            print!("{e}");
            Ok(None)
        }
        Err(e) => {
            let msg = e.to_string();
            bail!("{}", msg.trim_start_matches("error: ").trim_end())
        }
    }
}

/// Fails unless we are root (`why` says what needs it) and `bin` exists.
fn require_root_and(bin: &Path, why: &str) -> Result<()> {
    if !testkit::is_root() {
        bail!("{why}: run it as root");
    }
    if !bin.is_file() {
        bail!("{} does not exist", bin.display());
    }
    Ok(())
}

/// Writes a report as pretty JSON to `path` (creating its directory) and
/// says where.
fn write_summary(path: &Path, report: &impl Serialize) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut text = serde_json::to_string_pretty(report).context("serialising the summary")?;
    text.push('\n');
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    println!("summary: {}", path.display());
    Ok(())
}

/// `<target>/bench`, `<target>` being where `bin` was built.
fn summary_dir(bin: &Path) -> PathBuf {
    let target = bin
        .canonicalize()
        .ok()
        .and_then(|b| Some(b.parent()?.parent()?.to_path_buf()))
        .unwrap_or_else(|| PathBuf::from("target"));
    target.join("bench")
}

/// The median; 0 for no values.
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The machine the numbers come from, for the reports.
#[derive(Serialize, Debug, Clone)]
pub(crate) struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub load_avg_1m: f64,
}

impl Machine {
    pub fn read() -> Machine {
        let cpu_model = fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
            })
            .unwrap_or_default();
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let load_avg_1m = fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            kernel,
            load_avg_1m,
        }
    }

    pub fn line(&self) -> String {
        format!(
            "machine: {} CPUs ({}), Linux {}, load average {:.2} at the start",
            self.cpus, self.cpu_model, self.kernel, self.load_avg_1m
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_and_even() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
    }

    #[test]
    fn flags_before_the_separator_select() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(selects(
            &args(&["--rounds", "2", "--snapshot"]),
            "--snapshot"
        ));
        assert!(!selects(
            &args(&["--rounds", "2", "--", "--snapshot"]),
            "--snapshot"
        ));
        assert!(!selects(&args(&["--conns", "4"]), "--snapshot"));
        assert!(selects(&args(&["--soak"]), "--soak"));
    }

    #[test]
    fn machine_is_described() {
        let m = Machine::read();
        assert!(m.cpus >= 1 && !m.kernel.is_empty());
    }
}
