//! The snapshot benchmark's report: tables on stdout and `snapshot.json`.

use std::fmt::{self, Write as _};
use std::path::Path;

use serde::Serialize;

use std::collections::BTreeMap;

use super::count::Seen;
use super::run::Timed;
use super::{RATIOS, SizeResult, SnapConfig, TOOLS, Tool};
use crate::bench::Machine;

pub struct SnapReport {
    /// Read before the first measurement.
    pub machine: Machine,
    pub sizes: Vec<SizeResult>,
    pub ss_version: String,
}

/// snapshot.json.
#[derive(Serialize)]
pub struct Summary<'a> {
    schema: u32,
    machine: Machine,
    config: SummaryConfig<'a>,
    note: &'static str,
    sizes: Vec<SizeSummary<'a>>,
}

#[derive(Serialize)]
struct SummaryConfig<'a> {
    conns: &'a [u64],
    rounds: usize,
    timeout_secs: u64,
    bin: String,
    ss_version: &'a str,
}

#[derive(Serialize)]
struct SizeSummary<'a> {
    conns: u64,
    sockets: u64,
    netns: &'a str,
    netns_inode: u64,
    helper_pids: &'a [u32],
    helpers_why: Option<&'a str>,
    setup_secs: f64,
    commands: BTreeMap<&'static str, CommandSummary<'a>>,
    ratios: BTreeMap<&'static str, Option<f64>>,
}

#[derive(Serialize)]
struct CommandSummary<'a> {
    argv: &'a [String],
    timed_out: bool,
    median_wall_secs: Option<f64>,
    median_user_secs: Option<f64>,
    median_sys_secs: Option<f64>,
    first_run: Option<Timed>,
    listed: Option<&'a Seen>,
    complete: Option<bool>,
    runs: &'a [Timed],
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "timeout".to_string(), |s| format!("{:.1}", s * 1000.0))
}

fn ratio_str(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |r| format!("{r:.2}"))
}

/// Key of a ratio in snapshot.json.
fn ratio_key(num: Tool, den: Tool) -> &'static str {
    match (num, den) {
        (Tool::Ss, Tool::Snapshot) => "ss_tanoi_over_snapshot",
        (Tool::SsProcs, Tool::Snapshot) => "ss_tanoip_over_snapshot",
        (Tool::Ss, Tool::SnapshotNoOwners) => "ss_tanoi_over_snapshot_no_owners",
        _ => "other",
    }
}

const SNAPSHOT_NOTE: &str = "keepalive snapshot walks every network namespace on the host and \
    resolves owners over all of /proc, so it does more work than ss, which lists only the test \
    namespace; the ss times include `ip netns exec` (its own row: `ip netns exec NS true`)";

impl SnapReport {
    pub fn table(&self, bin: &Path, cfg: &SnapConfig) -> String {
        let mut o = String::new();
        let _ = self.write_table(&mut o, bin, cfg);
        o
    }

    fn write_table(&self, o: &mut String, bin: &Path, cfg: &SnapConfig) -> fmt::Result {
        writeln!(
            o,
            "\nkeepalive snapshot vs ss: N established loopback connections (2N sockets) held by helper processes in a test network namespace; {} timed round(s) per N, commands in rotating order, stdout to /dev/null",
            cfg.rounds
        )?;
        writeln!(o, "keepalive: {}; {}", bin.display(), self.ss_version)?;
        if let Some(s) = self.sizes.first() {
            for t in &s.tools {
                writeln!(o, "  {:<12} {}", t.tool.label(), t.argv.join(" "))?;
            }
        }
        writeln!(o, "note: {SNAPSHOT_NOTE}")?;
        for s in &self.sizes {
            if let Some(seen) = &s.tool(Tool::Snapshot).seen {
                writeln!(
                    o,
                    "      at N={}: snapshot listed {} sockets in {} namespaces (ss: {} in the test namespace)",
                    s.conns,
                    seen.sockets,
                    seen.namespaces,
                    s.tool(Tool::Ss).seen.as_ref().map_or(0, |x| x.sockets)
                )?;
            }
            writeln!(
                o,
                "      at N={}: {} helper process(es){}",
                s.conns,
                s.helper_pids.len(),
                s.split
                    .as_ref()
                    .map_or_else(String::new, |why| format!(" ({why})"))
            )?;
        }

        writeln!(o, "\nmedian wall time, ms")?;
        write!(o, "{:>8} {:>8}", "N", "sockets")?;
        for t in TOOLS {
            write!(o, " {:>12}", t.label())?;
        }
        writeln!(o, " {:>9}", "setup s")?;
        for s in &self.sizes {
            write!(o, "{:>8} {:>8}", s.conns, 2 * s.conns)?;
            for t in TOOLS {
                write!(o, " {:>12}", ms(s.tool(t).wall()))?;
            }
            writeln!(o, " {:>9.2}", s.setup_secs)?;
        }

        writeln!(
            o,
            "\nratio ss / keepalive (median wall time; > 1: keepalive is faster)"
        )?;
        write!(o, "{:>8}", "N")?;
        for (n, d) in RATIOS {
            write!(o, " {:>26}", format!("{} / {}", n.label(), d.label()))?;
        }
        writeln!(o)?;
        for s in &self.sizes {
            write!(o, "{:>8}", s.conns)?;
            for (n, d) in RATIOS {
                write!(o, " {:>26}", ratio_str(s.ratio(n, d)))?;
            }
            writeln!(o)?;
        }

        writeln!(
            o,
            "\nper command: medians of the timed rounds; first = the untimed first run, whose output was counted (listed: sockets; test: ESTABLISHED test-namespace sockets; owned: of those, attributed to a helper process; ns: namespaces with sockets among its rows)"
        )?;
        writeln!(
            o,
            "{:>8} {:<12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>4}  check",
            "N",
            "command",
            "wall ms",
            "min ms",
            "max ms",
            "user ms",
            "sys ms",
            "first ms",
            "listed",
            "test",
            "owned",
            "ns"
        )?;
        for s in &self.sizes {
            for t in &s.tools {
                let min = (!t.timed_out && !t.runs.is_empty())
                    .then(|| t.runs.iter().map(|r| r.wall).fold(f64::INFINITY, f64::min));
                let max = (!t.timed_out && !t.runs.is_empty())
                    .then(|| t.runs.iter().map(|r| r.wall).fold(0.0, f64::max));
                let seen = t.seen.clone().unwrap_or_default();
                let check = match t.complete(s.conns) {
                    _ if t.tool == Tool::NetnsExec => "-",
                    Some(true) => "ok",
                    Some(false) => "INCOMPLETE",
                    None => "timeout",
                };
                let count = |v: u64| {
                    if t.seen.is_none() || t.tool == Tool::NetnsExec {
                        "-".to_string()
                    } else {
                        v.to_string()
                    }
                };
                writeln!(
                    o,
                    "{:>8} {:<12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>4}  {}",
                    s.conns,
                    t.tool.label(),
                    ms(t.wall()),
                    ms(min),
                    ms(max),
                    ms(t.median(|r| r.user)),
                    ms(t.median(|r| r.sys)),
                    ms(t.first.map(|f| f.wall)),
                    count(seen.sockets),
                    count(seen.ours),
                    count(seen.owned),
                    if t.tool.is_ss() || t.seen.is_none() || t.tool == Tool::NetnsExec {
                        "-".to_string()
                    } else {
                        seen.namespaces.to_string()
                    },
                    check
                )?;
            }
        }
        writeln!(o)
    }

    pub fn summary<'a>(&'a self, bin: &Path, cfg: &'a SnapConfig) -> Summary<'a> {
        let sizes = self
            .sizes
            .iter()
            .map(|s| SizeSummary {
                conns: s.conns,
                sockets: 2 * s.conns,
                netns: &s.netns,
                netns_inode: s.netns_inode,
                helper_pids: &s.helper_pids,
                helpers_why: s.split.as_deref(),
                setup_secs: s.setup_secs,
                commands: s
                    .tools
                    .iter()
                    .map(|t| {
                        let counted = t.tool != Tool::NetnsExec;
                        let summary = CommandSummary {
                            argv: &t.argv,
                            timed_out: t.timed_out,
                            median_wall_secs: t.wall(),
                            median_user_secs: t.median(|r| r.user),
                            median_sys_secs: t.median(|r| r.sys),
                            first_run: t.first,
                            listed: t.seen.as_ref().filter(|_| counted),
                            complete: t.complete(s.conns).filter(|_| counted),
                            runs: &t.runs,
                        };
                        (t.tool.key(), summary)
                    })
                    .collect(),
                ratios: RATIOS
                    .iter()
                    .map(|&(n, d)| (ratio_key(n, d), s.ratio(n, d)))
                    .collect(),
            })
            .collect();
        Summary {
            schema: 2,
            machine: self.machine.clone(),
            config: SummaryConfig {
                conns: &cfg.conns,
                rounds: cfg.rounds,
                timeout_secs: cfg.timeout.as_secs(),
                bin: bin.display().to_string(),
                ss_version: &self.ss_version,
            },
            note: SNAPSHOT_NOTE,
            sizes,
        }
    }
}
