//! The floor row: what the cheapest possible programs cost per run on this
//! machine, on the tracepoint `ka_state` hooks and under the same churn.
//!
//! - bpftrace (a perf tracepoint, as bpftrace attaches): an empty program,
//!   one that only takes a timestamp, and one that also updates a hash map;
//!   and an empty program on `timer_expire_entry`, which the timer hooks
//!   share: it runs for every timer of the system, a few hundred times in a
//!   churn round, each time with cold caches.
//! - tp_btf, the kind of hook `ka_state` is (`floor_tp_btf.bpf.c`, built
//!   with clang and loaded here): empty, a timestamp, and a timestamp plus
//!   one 64-byte record into this CPU's ring, read by a thread. The last is
//!   the least any program emitting one event per state change can cost:
//!   `ka_state`'s full stream is that and the socket's fields. And an empty
//!   tp_btf program on `timer_expire_entry`, as the timer hooks are.
//!
//! Published per-hook costs (ebpf_exporter's 15 ns empty, 35 ns with a map
//! update) come from bare metal; a virtual machine's timer and cache costs
//! can be several times that, so the keepalive rows are read against
//! these, measured in the same run.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use aya::maps::{MapData, RingBuf};
use aya::programs::BtfTracePoint;
use aya::{Btf, Ebpf};
use serde::Serialize;
use testkit::bpf::{self, RunTimeStats};

use super::bpf_cost::{SETTLE, held_programs};
use super::peer::Peer;
use super::workloads;
use super::{Config, check_interrupted};

/// A floor program and how it is run.
enum Floor {
    /// A bpftrace script that prints "ready" once attached.
    Bpftrace(&'static str),
    /// A program of [`TP_BTF_SOURCE`] and its tracepoint.
    TpBtf(&'static str, &'static str),
}

const PROGRAMS: &[(&str, Floor)] = &[
    (
        "empty",
        Floor::Bpftrace(r#"BEGIN { printf("ready\n"); } tracepoint:sock:inet_sock_set_state { }"#),
    ),
    (
        "timestamp",
        Floor::Bpftrace(
            r#"BEGIN { printf("ready\n"); } tracepoint:sock:inet_sock_set_state { $t = nsecs; }"#,
        ),
    ),
    (
        "timestamp + hash map update",
        Floor::Bpftrace(
            r#"BEGIN { printf("ready\n"); } tracepoint:sock:inet_sock_set_state { @n[cpu] = nsecs; }"#,
        ),
    ),
    (
        "empty, on timer_expire_entry",
        Floor::Bpftrace(r#"BEGIN { printf("ready\n"); } tracepoint:timer:timer_expire_entry { }"#),
    ),
    (
        "tp_btf: empty",
        Floor::TpBtf("floor_empty", "inet_sock_set_state"),
    ),
    (
        "tp_btf: timestamp",
        Floor::TpBtf("floor_clock", "inet_sock_set_state"),
    ),
    (
        "tp_btf: timestamp + 64 B to ring",
        Floor::TpBtf("floor_emit", "inet_sock_set_state"),
    ),
    (
        "tp_btf: empty, timer_expire_entry",
        Floor::TpBtf("floor_timer_empty", "timer_expire_entry"),
    ),
];

/// The tp_btf floor programs (C: no Rust program could be this bare and
/// still be built by the project's eBPF toolchain on its own).
const TP_BTF_SOURCE: &str = include_str!("floor_tp_btf.bpf.c");
/// The rings [`TP_BTF_SOURCE`] declares, and how often the reader empties them.
const TP_BTF_RINGS: usize = 8;
const READ_EVERY: Duration = Duration::from_millis(20);
/// clang, as `cargo xtask setup --bench` installs it (LLVM 22, as the
/// eBPF toolchain), or on PATH.
const CLANGS: &[&str] = &["/usr/lib/llvm-22/bin/clang", "clang-22", "clang"];

/// One reference program's cost under churn.
#[derive(Debug, Serialize)]
pub struct FloorRow {
    pub name: &'static str,
    /// The bpftrace script, or the tp_btf program's name in
    /// `floor_tp_btf.bpf.c`.
    pub script: &'static str,
    pub churn_conn_per_s: f64,
    pub run_cnt: u64,
    pub ns_per_run: Option<f64>,
}

/// Runs the churn workload under each reference program, statistics on.
/// `dir`: where the tp_btf object is built.
pub fn measure(cfg: &Config, dir: &Path) -> Result<Vec<FloorRow>> {
    let object = build_tp_btf(dir)?;
    let btf = Btf::from_sys_fs().context("reading the kernel's BTF")?;
    let _stats = RunTimeStats::enable()?;
    let mut rows = Vec::new();
    for (name, floor) in PROGRAMS {
        check_interrupted()?;
        eprintln!("bench: floor: {name}");
        // Each holds its program attached while it lives.
        let (held, ids, script): (Box<dyn Send>, Vec<u32>, &'static str) = match *floor {
            Floor::Bpftrace(script) => {
                let peer = Peer::start_script(script)?;
                // bpftrace names its programs after the probe (BEGIN included).
                let (_, ids) = held_programs("bpftrace", peer.pid(), |n| !n.contains("BEGIN"))?;
                (Box::new(peer), ids, script)
            }
            Floor::TpBtf(program, tracepoint) => {
                let attached = TpBtfFloor::attach(&object, &btf, program, tracepoint)?;
                let ids = vec![attached.id];
                (Box::new(attached), ids, program)
            }
        };
        thread::sleep(SETTLE);
        let before = bpf::programs_by_id(&ids);
        let churn = workloads::churn(cfg.conns, cfg.dur, None)?;
        let after = bpf::programs_by_id(&ids);
        // Counted already: detached or killed, not asked to stop (nothing
        // to collect).
        drop(held);
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

/// Builds [`TP_BTF_SOURCE`] into `dir`; returns the object.
fn build_tp_btf(dir: &Path) -> Result<Vec<u8>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let src = dir.join("floor_tp_btf.bpf.c");
    let obj = dir.join("floor_tp_btf.bpf.o");
    for p in [&src, &obj] {
        // Written fresh, never through a link someone else left there.
        match std::fs::remove_file(p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", p.display()));
            }
            _ => {}
        }
    }
    std::fs::write(&src, TP_BTF_SOURCE).with_context(|| format!("writing {}", src.display()))?;
    let clang = CLANGS
        .iter()
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .context("no clang for the tp_btf floor programs: `cargo xtask setup --bench` installs clang-22 (or run with --no-floor)")?;
    let out = Command::new(clang)
        .args(["-O2", "-g", "-target", "bpf", "-c"])
        .arg(&src)
        .arg("-o")
        .arg(&obj)
        .output()
        .with_context(|| format!("running {clang}"))?;
    if !out.status.success() {
        bail!(
            "{clang} could not build {}:\n{}",
            src.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::read(&obj).with_context(|| format!("reading {}", obj.display()))
}

/// One tp_btf floor program attached, and the thread reading its rings.
struct TpBtfFloor {
    id: u32,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
    // Detaches the program when dropped (after the reader stops).
    _ebpf: Ebpf,
}

impl TpBtfFloor {
    fn attach(object: &[u8], btf: &Btf, program: &str, tracepoint: &str) -> Result<TpBtfFloor> {
        let mut ebpf = Ebpf::load(object).context("loading the tp_btf floor object")?;
        let mut rings = Vec::with_capacity(TP_BTF_RINGS);
        for i in 0..TP_BTF_RINGS {
            let map = ebpf
                .take_map(&format!("ring{i}"))
                .with_context(|| format!("the floor object has no ring{i}"))?;
            rings.push(RingBuf::try_from(map).with_context(|| format!("ring{i}"))?);
        }
        let prog: &mut BtfTracePoint = ebpf
            .program_mut(program)
            .with_context(|| format!("the floor object has no {program}"))?
            .try_into()
            .with_context(|| format!("{program} is not a tp_btf program"))?;
        prog.load(tracepoint, btf)
            .with_context(|| format!("loading {program}"))?;
        prog.attach()
            .with_context(|| format!("attaching {program}"))?;
        let id = prog.info().with_context(|| format!("{program}'s id"))?.id();
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let stop = Arc::clone(&stop);
            thread::spawn(move || read_until(rings, &stop))
        };
        Ok(TpBtfFloor {
            id,
            stop,
            reader: Some(reader),
            _ebpf: ebpf,
        })
    }
}

impl Drop for TpBtfFloor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// Empties the rings every [`READ_EVERY`], as keepalive's reader polls,
/// so the floor's records go into memory a reader also touches.
fn read_until(mut rings: Vec<RingBuf<MapData>>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        for ring in &mut rings {
            while let Some(rec) = ring.next() {
                std::hint::black_box(rec.first());
            }
        }
        thread::sleep(READ_EVERY);
    }
}
