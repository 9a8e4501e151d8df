//! What each BPF program costs in the kernel: a separate phase with the
//! kernel's run-time statistics on (through aya's `enable_stats`, so they
//! stop with this process whatever happens), reading `run_time_ns` and
//! `run_cnt` of the programs one process holds before and after each
//! workload. Statistics stay off in the throughput rounds because
//! collecting them has a cost of its own.

use std::thread;
use std::time::Duration;

use anyhow::{Result, bail};
use serde::Serialize;
use testkit::bpf::{self, Program, RunTimeStats};

use super::workloads::{self, Sample};
use super::{Config, check_interrupted};

/// Quiet time before each measurement (lets the previous phase settle).
pub const SETTLE: Duration = Duration::from_millis(300);
const BPF_STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";
/// keepalive's programs (keepalive-user/src/kernel/loader.rs), to undo the
/// kernel's 15-character truncation of names in the report.
const KEEPALIVE_PROGRAMS: &[&str] = &[
    "ka_state",
    "ka_retransmit",
    "ka_synack_rtx",
    "ka_reset_sent",
    "ka_reset_received",
    "ka_error",
    "ka_timer_entry",
    "ka_timer_exit",
];

/// One program's counters over one workload.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Runs {
    pub run_cnt: u64,
    pub run_time_ns: u64,
    pub ns_per_run: Option<f64>,
}

impl Runs {
    fn between(a: Option<&Program>, b: Option<&Program>) -> Runs {
        let (t0, c0) = a.map_or((0, 0), |p| (p.run_time_ns, p.run_cnt));
        let (t1, c1) = b.map_or((0, 0), |p| (p.run_time_ns, p.run_cnt));
        let (run_time_ns, run_cnt) = (t1.saturating_sub(t0), c1.saturating_sub(c0));
        Runs {
            run_cnt,
            run_time_ns,
            ns_per_run: (run_cnt > 0).then(|| run_time_ns as f64 / run_cnt as f64),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ProgCost {
    /// Full name when the kernel's (at most 15 characters) is a truncation
    /// of a known program.
    pub name: String,
    pub kernel_name: String,
    pub prog_id: u32,
    /// The tracepoint, when the process holds a link naming it.
    pub hook: Option<String>,
    pub request_response: Runs,
    pub churn: Runs,
}

#[derive(Debug, Serialize)]
pub struct KernelCost {
    /// Whose programs: "keepalive", "keepalive --to-state close" or "bpftrace".
    pub subject: &'static str,
    /// kernel.bpf_stats_enabled was already on before we started.
    pub stats_were_on: bool,
    pub request_response: Sample,
    pub churn: Sample,
    pub programs: Vec<ProgCost>,
    /// BPF nanoseconds per operation of each workload, all programs.
    pub ns_per_transaction: f64,
    pub ns_per_churned_connection: f64,
}

/// Whether the statistics were on before this benchmark turned them on.
pub fn stats_were_on() -> bool {
    std::fs::read_to_string(BPF_STATS_SYSCTL).is_ok_and(|s| s.trim() != "0")
}

/// Runs both workloads with statistics on and measures the programs held
/// by `pid` whose kernel name `keep` accepts.
pub fn measure(
    subject: &'static str,
    pid: u32,
    keep: impl Fn(&str) -> bool,
    cfg: &Config,
) -> Result<KernelCost> {
    let stats_were_on = stats_were_on();
    let _stats = RunTimeStats::enable()?;
    let (held, ids) = held_programs(subject, pid, keep)?;
    thread::sleep(SETTLE);
    let s0 = bpf::programs_by_id(&ids);
    let rr = workloads::request_response(cfg.conns, cfg.dur)?;
    let s1 = bpf::programs_by_id(&ids);
    check_interrupted()?;
    thread::sleep(SETTLE);
    let s2 = bpf::programs_by_id(&ids);
    let churn = workloads::churn(cfg.conns, cfg.dur, None)?;
    let s3 = bpf::programs_by_id(&ids);
    check_interrupted()?;
    let programs: Vec<ProgCost> = ids
        .iter()
        .map(|id| {
            let kernel_name = s0
                .get(id)
                .or(s3.get(id))
                .map_or_else(|| format!("prog_{id}"), |p| p.name.clone());
            ProgCost {
                name: full_name(&kernel_name),
                kernel_name,
                prog_id: *id,
                hook: held.hooks.get(id).cloned(),
                request_response: Runs::between(s0.get(id), s1.get(id)),
                churn: Runs::between(s2.get(id), s3.get(id)),
            }
        })
        .collect();
    Ok(KernelCost {
        subject,
        stats_were_on,
        ns_per_transaction: ns_per_op(&programs, &rr, |p| p.request_response),
        ns_per_churned_connection: ns_per_op(&programs, &churn, |p| p.churn),
        request_response: rr,
        churn,
        programs,
    })
}

/// BPF nanoseconds per operation of the workload.
/// The file descriptors `pid` holds, and the ids of its programs whose
/// kernel name `keep` accepts (an error when there are none).
pub fn held_programs(
    subject: &str,
    pid: u32,
    keep: impl Fn(&str) -> bool,
) -> Result<(bpf::HeldFds, Vec<u32>)> {
    let held = bpf::held_by(pid)?;
    let ids: Vec<u32> = bpf::programs_by_id(&held.programs)
        .into_values()
        .filter(|p| keep(&p.name))
        .map(|p| p.id)
        .collect();
    if ids.is_empty() {
        bail!("found no BPF programs of {subject} among the file descriptors of pid {pid}");
    }
    Ok((held, ids))
}

fn ns_per_op(programs: &[ProgCost], sample: &Sample, runs: impl Fn(&ProgCost) -> Runs) -> f64 {
    let ns: u64 = programs.iter().map(|p| runs(p).run_time_ns).sum();
    if sample.ops > 0 {
        ns as f64 / sample.ops as f64
    } else {
        0.0
    }
}

fn full_name(kernel_name: &str) -> String {
    KEEPALIVE_PROGRAMS
        .iter()
        .find(|p| **p == kernel_name || (kernel_name.len() == 15 && p.starts_with(kernel_name)))
        .map_or_else(|| kernel_name.to_string(), |p| p.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_names_are_expanded() {
        assert_eq!(full_name("ka_reset_receiv"), "ka_reset_received");
        assert_eq!(full_name("ka_state"), "ka_state");
        assert_eq!(full_name("ka_other"), "ka_other");
    }

    #[test]
    fn runs_between_two_readings() {
        let p = |t, c| Program {
            id: 1,
            name: "x".into(),
            run_time_ns: t,
            run_cnt: c,
        };
        let r = Runs::between(Some(&p(100, 2)), Some(&p(400, 5)));
        assert_eq!(
            (r.run_cnt, r.run_time_ns, r.ns_per_run),
            (3, 300, Some(100.0))
        );
        let r = Runs::between(None, None);
        assert_eq!(r.ns_per_run, None);
    }
}
