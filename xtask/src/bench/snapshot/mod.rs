//! `cargo xtask bench --snapshot [--conns 10000,100000] [--rounds 5]
//! [--timeout 60]`: how long `keepalive snapshot` takes next to `ss` with
//! many connections. For each N of `--conns`, a network namespace
//! `ka-bench-<pid>` is made (deleted at the end, on errors and Ctrl-C too)
//! and helper processes ([`hold`](super::hold)) make and hold N
//! connections in it: 2N ESTABLISHED sockets.
//!
//! Then these commands run, one untimed check run each (output counted by
//! [`count`]: how many sockets each listed, how many of the test
//! namespace's 2N, how many attributed to a helper), then `--rounds` timed
//! rounds ([`run`]), each running every command once with stdout to
//! /dev/null, the order rotating from round to round:
//! - `ip netns exec NS ss -tanoi`
//! - `ip netns exec NS ss -tanoip` (with processes, the fair comparison to
//!   keepalive's owner scan)
//! - `keepalive snapshot --all --format json`
//! - `keepalive snapshot --all --format json --no-owners` (without the
//!   /proc owner scan)
//! - `ip netns exec NS true` (what `ip netns exec` adds to the ss times)
//!
//! Each run is bounded by `--timeout` seconds; a command exceeding it is
//! killed, reported as "timeout" and not run again at that N. keepalive
//! snapshot walks every network namespace on the host, which is more work
//! than ss in one namespace; the report says how many it saw. Results
//! ([`report`]): the median wall time per command and N, the ratios ss /
//! keepalive, CPU times and the check counts, on stdout and in
//! `<target dir>/bench/snapshot.json`.

mod count;
mod report;
mod run;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Parser;
use testkit::NamedNetns;

use self::count::{LineCounter, Seen};
use self::report::SnapReport;
use self::run::{Timed, run_bounded};
use super::hold;
use super::{
    Machine, check_interrupted, median, parse_opts, require_root_and, signals, summary_dir,
    write_summary,
};

/// Largest `--conns` value (twice as many sockets).
const MAX_SNAPSHOT_CONNS: u64 = 500_000;

/// Counts the snapshot bench runs when none is given.
const DEFAULT_SNAPSHOT_CONNS: &str = "10000,100000";

#[derive(Parser, Debug)]
#[command(
    name = "cargo xtask bench --snapshot",
    about = "Time `keepalive snapshot` against `ss -tanoi`/`ss -tanoip` on N established loopback \
             connections (2N sockets) held by a helper process in a test network namespace \
             (needs root)"
)]
struct SnapshotOpts {
    /// Selects this benchmark (instead of the monitor overhead one).
    #[arg(long)]
    snapshot: bool,
    /// Connection counts to measure, comma-separated; each makes 2x sockets
    /// (client and server ends), all ESTABLISHED.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = DEFAULT_SNAPSHOT_CONNS,
        value_parser = clap::value_parser!(u64).range(1..=MAX_SNAPSHOT_CONNS)
    )]
    conns: Vec<u64>,
    /// Timed rounds per count; every round runs each command once, the
    /// order rotating from round to round.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=50))]
    rounds: u64,
    /// Seconds one command may run before it is killed and reported as
    /// "timeout" (and not run again at that count).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=600))]
    timeout: u64,
}

struct SnapConfig {
    conns: Vec<u64>,
    rounds: usize,
    timeout: Duration,
}

pub fn run(bin: &Path, args: &[String]) -> Result<()> {
    let Some(opts) = parse_opts::<SnapshotOpts>("cargo xtask bench --snapshot", args)? else {
        return Ok(());
    };
    debug_assert!(opts.snapshot);
    require_root_and(
        bin,
        "bench --snapshot creates a network namespace and loads eBPF programs",
    )?;
    for tool in ["ip", "ss"] {
        let found = Command::new(tool)
            .arg("-V")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            bail!("`{tool} -V` failed: bench --snapshot needs iproute2 (ip, ss)");
        }
    }
    let _signals = signals::Guard::install();
    let machine = Machine::read();
    let cfg = SnapConfig {
        conns: opts.conns,
        rounds: opts.rounds as usize,
        timeout: Duration::from_secs(opts.timeout),
    };
    let mut sizes = Vec::new();
    for &n in &cfg.conns {
        check_interrupted()?;
        sizes.push(snapshot_size(bin, n, &cfg)?);
    }
    let report = SnapReport {
        machine,
        sizes,
        ss_version: ss_version(),
    };
    print!("{}", report.table(bin, &cfg));
    write_summary(
        &summary_dir(bin).join("snapshot.json"),
        &report.summary(bin, &cfg),
    )
}

fn ss_version() -> String {
    Command::new("ss")
        .arg("-V")
        .stdin(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// The commands timed against each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tool {
    Ss,
    SsProcs,
    Snapshot,
    SnapshotNoOwners,
    /// `ip netns exec NS true`: what `ip netns exec` adds to the ss times.
    NetnsExec,
}

const TOOLS: [Tool; 5] = [
    Tool::Ss,
    Tool::SsProcs,
    Tool::Snapshot,
    Tool::SnapshotNoOwners,
    Tool::NetnsExec,
];

impl Tool {
    /// Key in snapshot.json.
    fn key(self) -> &'static str {
        match self {
            Tool::Ss => "ss_tanoi",
            Tool::SsProcs => "ss_tanoip",
            Tool::Snapshot => "snapshot",
            Tool::SnapshotNoOwners => "snapshot_no_owners",
            Tool::NetnsExec => "netns_exec_true",
        }
    }

    /// Column heading.
    fn label(self) -> &'static str {
        match self {
            Tool::Ss => "ss -tanoi",
            Tool::SsProcs => "ss -tanoip",
            Tool::Snapshot => "snapshot",
            Tool::SnapshotNoOwners => "--no-owners",
            Tool::NetnsExec => "netns exec",
        }
    }

    fn is_ss(self) -> bool {
        matches!(self, Tool::Ss | Tool::SsProcs)
    }

    /// The whole command line.
    fn argv(self, bin: &Path, netns: &str) -> Vec<String> {
        let ns = |rest: &[&str]| {
            ["ip", "netns", "exec", netns]
                .iter()
                .chain(rest)
                .map(|s| s.to_string())
                .collect()
        };
        let ka = |rest: &[&str]| {
            std::iter::once(bin.display().to_string())
                .chain(
                    ["snapshot", "--all", "--format", "json"]
                        .iter()
                        .chain(rest)
                        .map(|s| s.to_string()),
                )
                .collect()
        };
        match self {
            Tool::Ss => ns(&["ss", "-tanoi"]),
            Tool::SsProcs => ns(&["ss", "-tanoip"]),
            Tool::Snapshot => ka(&[]),
            Tool::SnapshotNoOwners => ka(&["--no-owners"]),
            Tool::NetnsExec => ns(&["true"]),
        }
    }
}

/// One command at one connection count.
struct ToolResult {
    tool: Tool,
    argv: Vec<String>,
    /// The untimed first run (also the warm-up): what it listed and took.
    seen: Option<Seen>,
    first: Option<Timed>,
    /// The timed rounds.
    runs: Vec<Timed>,
    timed_out: bool,
}

impl ToolResult {
    fn median(&self, f: impl Fn(&Timed) -> f64) -> Option<f64> {
        (!self.timed_out && !self.runs.is_empty())
            .then(|| median(self.runs.iter().map(f).collect()))
    }

    fn wall(&self) -> Option<f64> {
        self.median(|t| t.wall)
    }

    /// Whether the check run listed what it should have.
    fn complete(&self, conns: u64) -> Option<bool> {
        let s = self.seen.as_ref()?;
        let want = 2 * conns;
        Some(match self.tool {
            Tool::Ss | Tool::SnapshotNoOwners => s.ours == want,
            Tool::SsProcs | Tool::Snapshot => s.ours == want && s.owned == want,
            Tool::NetnsExec => true,
        })
    }
}

struct SizeResult {
    conns: u64,
    /// Seconds the helper took to make the connections.
    setup_secs: f64,
    netns: String,
    netns_inode: u64,
    helper_pids: Vec<u32>,
    /// Why the connections are spread over several helpers, if they are.
    split: Option<String>,
    tools: Vec<ToolResult>,
}

impl SizeResult {
    fn tool(&self, t: Tool) -> &ToolResult {
        self.tools
            .iter()
            .find(|r| r.tool == t)
            .expect("every tool is measured")
    }

    /// Median wall time of `num` over that of `den`.
    fn ratio(&self, num: Tool, den: Tool) -> Option<f64> {
        let (n, d) = (self.tool(num).wall()?, self.tool(den).wall()?);
        (d > 0.0).then(|| n / d)
    }
}

/// The (numerator, denominator) pairs of the ratio table.
const RATIOS: [(Tool, Tool); 3] = [
    (Tool::Ss, Tool::Snapshot),
    (Tool::SsProcs, Tool::Snapshot),
    (Tool::Ss, Tool::SnapshotNoOwners),
];

fn snapshot_size(bin: &Path, conns: u64, cfg: &SnapConfig) -> Result<SizeResult> {
    let name = format!("ka-bench-{}", std::process::id());
    eprintln!("bench --snapshot: {conns} connections in network namespace {name}");
    let ns = NamedNetns::create(&name)?;
    let netns_inode = ns.inode()?;
    let held = hold::Held::make(&ns, conns, "bench --snapshot")?;
    let helper_pids = held.pids();
    let mut tools: Vec<ToolResult> = TOOLS
        .iter()
        .map(|&tool| ToolResult {
            tool,
            argv: tool.argv(bin, &name),
            seen: None,
            first: None,
            runs: Vec::new(),
            timed_out: false,
        })
        .collect();
    // Untimed first runs: a warm-up, and the check of what each command lists.
    for t in &mut tools {
        check_interrupted()?;
        let counter = LineCounter::new(t.tool, netns_inode, &helper_pids);
        let (timed, seen) = run_bounded(&t.argv, cfg.timeout, Some(counter))?;
        match timed {
            Some(first) => {
                t.first = Some(first);
                t.seen = seen;
            }
            None => t.timed_out = true,
        }
        eprintln!(
            "bench --snapshot: check {:<12} {}",
            t.tool.label(),
            match (&t.first, &t.seen) {
                (Some(f), Some(s)) if t.tool != Tool::NetnsExec => format!(
                    "{:.3} s, {} sockets listed, {} of the {} test sockets ESTABLISHED, {} owned by a helper",
                    f.wall,
                    s.sockets,
                    s.ours,
                    2 * conns,
                    s.owned
                ),
                (Some(f), _) => format!("{:.3} s", f.wall),
                _ => format!("timeout (> {} s)", cfg.timeout.as_secs()),
            }
        );
    }
    for round in 0..cfg.rounds {
        eprintln!(
            "bench --snapshot: {conns} connections, round {}/{}",
            round + 1,
            cfg.rounds
        );
        for k in 0..tools.len() {
            let i = (round + k) % tools.len();
            let t = &mut tools[i];
            if t.timed_out {
                continue;
            }
            check_interrupted()?;
            match run_bounded(&t.argv, cfg.timeout, None)?.0 {
                Some(timed) => t.runs.push(timed),
                None => t.timed_out = true,
            }
        }
    }
    let (setup_secs, split) = (held.setup_secs, held.split.clone());
    drop(held);
    drop(ns);
    Ok(SizeResult {
        conns,
        setup_secs,
        netns: name,
        netns_inode,
        helper_pids,
        split,
        tools,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_options() {
        let o = SnapshotOpts::try_parse_from(["b", "--snapshot"]).unwrap();
        assert_eq!(o.conns, vec![10_000, 100_000]);
        assert_eq!(o.rounds, 5);
        let o = SnapshotOpts::try_parse_from(["b", "--snapshot", "--conns", "10,20,30"]).unwrap();
        assert_eq!(o.conns, vec![10, 20, 30]);
        assert!(SnapshotOpts::try_parse_from(["b", "--conns", "0"]).is_err());
    }
}
