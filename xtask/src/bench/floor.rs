//! The floor row: what the cheapest possible programs cost per run on this
//! machine, on the tracepoint `ka_state` hooks and under the same churn —
//! an empty program, one that only takes a timestamp, and one that also
//! updates a hash map — and an empty program on `timer_expire_entry`,
//! which the timer hooks share: it runs for every timer of the system, a
//! few hundred times in a churn round, each time with cold caches. Published per-hook costs (ebpf_exporter's 15 ns
//! empty, 35 ns with a map update) come from bare metal; a virtual
//! machine's timer and cache costs can be several times that, so the
//! keepalive rows are read against these, measured in the same run.

use std::thread;

use anyhow::Result;
use serde::Serialize;
use testkit::bpf::{self, RunTimeStats};

use super::bpf_cost::{SETTLE, held_programs};
use super::peer::Peer;
use super::workloads;
use super::{Config, check_interrupted};

/// (name, bpftrace script): each prints "ready" once attached.
const PROGRAMS: &[(&str, &str)] = &[
    (
        "empty",
        r#"BEGIN { printf("ready\n"); } tracepoint:sock:inet_sock_set_state { }"#,
    ),
    (
        "timestamp",
        r#"BEGIN { printf("ready\n"); } tracepoint:sock:inet_sock_set_state { $t = nsecs; }"#,
    ),
    (
        "timestamp + hash map update",
        r#"BEGIN { printf("ready\n"); } tracepoint:sock:inet_sock_set_state { @n[cpu] = nsecs; }"#,
    ),
    (
        "empty, on timer_expire_entry",
        r#"BEGIN { printf("ready\n"); } tracepoint:timer:timer_expire_entry { }"#,
    ),
];

/// One reference program's cost under churn.
#[derive(Debug, Serialize)]
pub struct FloorRow {
    pub name: &'static str,
    pub script: &'static str,
    pub churn_conn_per_s: f64,
    pub run_cnt: u64,
    pub ns_per_run: Option<f64>,
}

/// Runs the churn workload under each reference program, statistics on.
pub fn measure(cfg: &Config) -> Result<Vec<FloorRow>> {
    let _stats = RunTimeStats::enable()?;
    let mut rows = Vec::new();
    for &(name, script) in PROGRAMS {
        check_interrupted()?;
        eprintln!("bench: floor: {name}");
        let peer = Peer::start_script(script)?;
        // bpftrace names its programs after the probe (BEGIN included).
        let (_, ids) = held_programs("bpftrace", peer.pid(), |n| !n.contains("BEGIN"))?;
        thread::sleep(SETTLE);
        let before = bpf::programs_by_id(&ids);
        let churn = workloads::churn(cfg.conns, cfg.dur, None)?;
        let after = bpf::programs_by_id(&ids);
        // Counted already: killed, not asked to stop (nothing to collect).
        drop(peer);
        let sum = |m: &std::collections::BTreeMap<u32, bpf::Program>| {
            m.values()
                .fold((0, 0), |(t, c), p| (t + p.run_time_ns, c + p.run_cnt))
        };
        let ((t0, c0), (t1, c1)) = (sum(&before), sum(&after));
        let (time, runs) = (t1.saturating_sub(t0), c1.saturating_sub(c0));
        rows.push(FloorRow {
            name,
            script,
            churn_conn_per_s: churn.rate(),
            run_cnt: runs,
            ns_per_run: (runs > 0).then(|| time as f64 / runs as f64),
        });
    }
    Ok(rows)
}
