//! Loads the embedded eBPF object with the runtime configuration and
//! attaches its programs.
//!
//! [`HOOKS`] is the table of which program needs which kernel hook; `check`
//! walks it to tell the user what works on their kernel. Every attachment is
//! a BPF link owned by this process, so when the process exits for any
//! reason (SIGKILL included) the kernel detaches and frees everything:
//! nothing is pinned, nothing outlives us.

use anyhow::{Context, Result, anyhow, bail};
use std::io::Read;
use std::sync::{Arc, Mutex, Weak};

use aya::{
    Ebpf, EbpfLoader,
    programs::{BtfTracePoint, Iter},
};
use keepalive_common::{Config, OwnerRow, SockRecord};

use super::btf::KernelBtf;
use super::symbols;
use crate::events::ResetReasons;
use crate::events::filter::Filter;

/// The eBPF object built by build.rs (empty when the eBPF toolchain was missing).
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/keepalive.bpf.o"));

/// How build.rs produced [`EBPF_OBJECT`].
pub const EBPF_BUILD: &str = env!("KEEPALIVE_EBPF_BUILD");

/// One kernel hook the monitor uses.
#[derive(Clone, Copy, Debug)]
pub struct Hook {
    /// Program name in the eBPF object.
    pub program: &'static str,
    /// BTF-enabled tracepoint (`tp_btf`) it attaches to.
    pub tracepoint: &'static str,
    /// What the user loses without it.
    pub provides: &'static str,
}

pub const HOOKS: &[Hook] = &[
    Hook {
        program: "ka_state",
        tracepoint: "inet_sock_set_state",
        provides: "state_change events, connection owners",
    },
    Hook {
        program: "ka_retransmit",
        tracepoint: "tcp_retransmit_skb",
        provides: "retransmit events",
    },
    Hook {
        program: "ka_synack_rtx",
        tracepoint: "tcp_retransmit_synack",
        provides: "retransmit events for a listener's SYN-ACKs",
    },
    Hook {
        program: "ka_reset_sent",
        tracepoint: "tcp_send_reset",
        provides: "reset_sent events",
    },
    Hook {
        program: "ka_reset_received",
        tracepoint: "tcp_receive_reset",
        provides: "reset_received events",
    },
    Hook {
        program: "ka_error",
        tracepoint: "inet_sk_error_report",
        provides: "timeout events",
    },
    Hook {
        program: "ka_timer_entry",
        tracepoint: "timer_expire_entry",
        provides: "keepalive_probe events, timeout causes",
    },
    Hook {
        program: "ka_timer_exit",
        tracepoint: "timer_expire_exit",
        provides: "keepalive_probe events",
    },
];

/// Everything learned from the kernel before loading.
pub struct KernelInfo {
    pub config: Config,
    pub reset_reasons: ResetReasons,
}

/// What the programs will be used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Use {
    /// Every hook (needs timer addresses from kallsyms).
    Monitor,
    /// Only the socket iterator.
    Snapshot,
}

/// Reads BTF (and kallsyms for the hooks) and builds the program configuration.
pub fn kernel_info(filter: &Filter, usage: Use) -> Result<KernelInfo> {
    let kbtf = KernelBtf::load()?;
    let mut config = Config::zeroed();
    config.offsets = kbtf.offsets()?;
    config.snap = kbtf.snap_offsets()?;
    config.tune = kbtf.tune_offsets();
    // Only the hooks need timer addresses, tracepoint signatures and the
    // names of reset reasons; the iterator alone does not.
    let mut reset_reasons = ResetReasons::default();
    if usage == Use::Monitor {
        // The monitor's walks feed its table, which keeps full sockets and
        // orphans only (table::walk::TableWalk::add).
        config.walk_tracked_only = 1;
        let timers = symbols::timer_symbols()?;
        config.keepalive_timer_fn = timers.keepalive_timer;
        config.write_timer_fn = timers.write_timer;
        config.reset_has_reason = (kbtf.tracepoint_args("tcp_send_reset")? >= 3) as u32;
        config.retransmit_has_err = (kbtf.tracepoint_args("tcp_retransmit_skb")? >= 3) as u32;
        reset_reasons = ResetReasons(kbtf.enum_names("sk_rst_reason", "SK_RST_REASON_"));
        if let Some((stats, index, pptrs)) = kbtf.keepalive_probe_offsets() {
            config.offsets.net_mib_stats = stats;
            config.offsets.mib_tcp_keepalive = index;
            config.offsets.bpf_array_pptrs = pptrs;
        } else {
            tracing::warn!(
                "kernel BTF lacks the TCPKeepAlive counter offsets: a keepalive probe answered within microseconds on another CPU may be missed"
            );
        }
    }
    filter.apply_to_kernel(&mut config);
    config.wakeup_bytes = DEFAULT_WAKEUP_BYTES;
    Ok(KernelInfo {
        config,
        reset_reasons,
    })
}

pub fn ensure_object() -> Result<()> {
    if EBPF_OBJECT.is_empty() {
        bail!(
            "this keepalive binary was built without its eBPF programs ({EBPF_BUILD}); build it with `cargo xtask build --release`"
        );
    }
    Ok(())
}

/// Default bytes of the event rings, all CPUs together
/// ([`super::event_rings`] splits them).
pub const DEFAULT_RING_BYTES: u32 = 1 << 22;
const DEFAULT_WAKEUP_BYTES: u32 = DEFAULT_RING_BYTES / 16;
/// How often the reader drains the ring without being woken.
pub const POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);

/// The kernel's BTF as aya reads it, shared by whoever holds it at once.
pub fn aya_btf() -> Result<Arc<aya::Btf>> {
    // Parsed, the kernel's BTF takes about 13 MiB: it is needed to load
    // and attach programs, not to run them, so it is shared while someone
    // holds it and parsed again when needed after that.
    static BTF: Mutex<Weak<aya::Btf>> = Mutex::new(Weak::new());
    let mut cached = BTF.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(b) = cached.upgrade() {
        return Ok(b);
    }
    let b = Arc::new(aya::Btf::from_sys_fs().context("reading kernel BTF")?);
    *cached = Arc::downgrade(&b);
    Ok(b)
}

/// Map sizes chosen at load time.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sizes {
    /// Bytes of each CPU's event ring ([`super::event_rings::RingPlan`]),
    /// which sets the programs' wakeup threshold; `None` when no rings are
    /// read (the rings themselves are created after the load).
    pub ring_each: Option<u32>,
    /// Connections whose counters the kernel keeps (default 65536).
    pub stats: Option<u32>,
}

/// Loads the object with `config` and map sizes.
pub fn load(config: &Config, sizes: Sizes) -> Result<Ebpf> {
    ensure_object()?;
    raise_memlock();
    let mut config = *config;
    if let Some(size) = sizes.ring_each {
        // A ring wakes its reader when it is 1/16 full.
        config.wakeup_bytes = size / 16;
    }
    // A slot for every CPU number the kernel may use (the possible CPUs
    // are numbered from 0 without gaps, as for per-CPU maps).
    let cpu_slots = aya::util::nr_cpus().map_err(|(path, e)| anyhow!("reading {path}: {e}"))?;
    let config = &config;
    let btf = aya_btf()?;
    let mut loader = EbpfLoader::new();
    loader.btf(Some(&btf));
    loader.override_global("CONFIG", config, true);
    loader.map_max_entries(keepalive_common::maps::EVENT_RINGS, cpu_slots.max(1) as u32);
    if let Some(n) = sizes.stats {
        loader.map_max_entries(keepalive_common::maps::STATS, n.max(1));
    }
    loader
        .load(EBPF_OBJECT)
        .context("loading the eBPF object failed")
}

/// Runs of the hook programs the kernel skipped because the program was
/// already running on that CPU (`recursion_misses` in the program's
/// fdinfo; an interrupt's softirq firing the same tracepoint, for one):
/// each may be a missing event, and nothing else would tell.
pub fn skipped_runs(ebpf: &Ebpf) -> u64 {
    use std::os::fd::{AsFd, AsRawFd};
    HOOKS
        .iter()
        .filter_map(|h| {
            let fd = ebpf.program(h.program)?.fd().ok()?.as_fd().as_raw_fd();
            let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
            info.lines()
                .find_map(|l| l.strip_prefix("recursion_misses:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .sum()
}

/// Loads and attaches one hook's program.
pub fn attach(ebpf: &mut Ebpf, btf: &aya::Btf, hook: &Hook) -> Result<()> {
    let prog: &mut BtfTracePoint = ebpf
        .program_mut(hook.program)
        .ok_or_else(|| anyhow!("program {} missing from the eBPF object", hook.program))?
        .try_into()
        .with_context(|| format!("program {} has the wrong type", hook.program))?;
    let t0 = std::time::Instant::now();
    prog.load(hook.tracepoint, btf)
        .map_err(|e| anyhow!("{}", verifier_summary(&e)))
        .with_context(|| format!("loading {} for tp_btf/{}", hook.program, hook.tracepoint))?;
    log_loaded(hook.program, t0, prog.info().ok());
    prog.attach()
        .with_context(|| format!("attaching tp_btf/{}", hook.tracepoint))?;
    Ok(())
}

/// Attaches every hook (the first failure is an error naming the hook),
/// then walks the existing sockets, handing each to `row`; returns the
/// hook count.
pub fn attach_all(ebpf: &mut Ebpf, row: impl FnMut(&SockRecord)) -> Result<usize> {
    let btf = aya_btf()?;
    // Walk once before attaching so that every socket that already exists
    // has its cookie assigned before a timer hook can see it (those hooks
    // can only read the cookie, not create it)...
    for_each_socket(ebpf, |_| {}).context("walking existing TCP sockets (iter/tcp)")?;
    for hook in HOOKS {
        attach(ebpf, &btf, hook)?;
    }
    // ...and once after, for the sockets born in between.
    // After the hooks, so every socket is either walked here or seen by them.
    for_each_socket(ebpf, row).context("walking existing TCP sockets (iter/tcp)")?;
    Ok(HOOKS.len())
}

/// Runs the `iter/tcp` program once over every TCP socket of every
/// reachable namespace and returns one row per socket. Asking for each
/// cookie also makes the kernel assign one, so connections opened before we
/// started carry their real cookie in the timer tracepoints.
pub fn walk_sockets(ebpf: &mut Ebpf) -> Result<Vec<SockRecord>> {
    iter_rows(ebpf, "ka_iter_tcp")
}

/// [`walk_sockets`], one row at a time: nothing is kept but what `f`
/// keeps, however many sockets there are.
pub fn for_each_socket(ebpf: &mut Ebpf, f: impl FnMut(&SockRecord)) -> Result<()> {
    for_each_row(ebpf, "ka_iter_tcp", f)
}

/// Runs the `iter/tcp` program `program` once in every reachable
/// namespace and returns the fixed-size rows it wrote, in order.
pub fn iter_rows<T: aya::Pod>(ebpf: &mut Ebpf, program: &str) -> Result<Vec<T>> {
    let mut rows = Vec::new();
    for_each_row(ebpf, program, |r: &T| rows.push(*r))?;
    Ok(rows)
}

/// Rows read from an iterator per read(2).
const ROWS_PER_READ: usize = 256;

/// Runs the `iter/tcp` program `program` once in every reachable
/// namespace and hands `f` each fixed-size row it wrote, in order. The
/// program is loaded (with the kernel's BTF) on first use.
///
/// A TCP iterator sees the namespace of the thread that opens it, so each
/// is opened by a thread inside the namespace; this thread reads it.
pub fn for_each_row<T: aya::Pod>(
    ebpf: &mut Ebpf,
    program: &str,
    mut f: impl FnMut(&T),
) -> Result<()> {
    let prog = loaded_iter(ebpf, program, "tcp")?;
    let t0 = std::time::Instant::now();
    let size = size_of::<T>();
    let mut buf = vec![0u8; size * ROWS_PER_READ];
    let mut rows = 0usize;
    let namespaces = super::netns::reachable();
    let n_ns = namespaces.len();
    for ns in namespaces {
        let opened = std::thread::scope(|scope| {
            scope
                .spawn(|| -> Result<std::fs::File> {
                    ns.enter()?;
                    let link_id = prog.attach()?;
                    let link = prog.take_link(link_id)?;
                    Ok(link.into_file()?)
                })
                .join()
                .map_err(|_| anyhow!("namespace walker thread failed"))?
        });
        // A namespace can vanish while we walk; that is not an error.
        let mut file = match opened {
            Ok(file) => file,
            Err(e) => {
                tracing::debug!("skipping netns {}: {e:#}", ns.path.display());
                continue;
            }
        };
        // The iterator writes whole rows; a read may still end mid-row.
        let mut filled = 0;
        loop {
            let n = match file.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!("skipping the rest of netns {}: {e}", ns.path.display());
                    break;
                }
            };
            filled += n;
            let whole = filled / size * size;
            for c in buf[..whole].chunks_exact(size) {
                // SAFETY: T is plain old data of exactly this size.
                f(&unsafe { std::ptr::read_unaligned(c.as_ptr().cast::<T>()) });
                rows += 1;
            }
            buf.copy_within(whole..filled, 0);
            filled -= whole;
        }
    }
    tracing::debug!(
        program,
        namespaces = n_ns,
        rows,
        ms = t0.elapsed().as_millis() as u64,
        "sockets walked"
    );
    Ok(())
}

/// The iterator program `program` of the object, loaded for `iter/TARGET`
/// (with the kernel's BTF) on first use.
pub(crate) fn loaded_iter<'a>(
    ebpf: &'a mut Ebpf,
    program: &str,
    target: &str,
) -> Result<&'a mut Iter> {
    let prog: &mut Iter = ebpf
        .program_mut(program)
        .ok_or_else(|| anyhow!("program {program} missing from the eBPF object"))?
        .try_into()?;
    if prog.fd().is_err() {
        let t0 = std::time::Instant::now();
        prog.load(target, &*aya_btf()?)
            .map_err(|e| anyhow!("{}", verifier_summary(&e)))
            .with_context(|| format!("loading {program} for iter/{target}"))?;
        log_loaded(program, t0, prog.info().ok());
    }
    Ok(prog)
}

/// Fixed-size rows an iterator wrote, in order.
fn pod_rows<T: aya::Pod>(bytes: &[u8]) -> impl Iterator<Item = T> + '_ {
    bytes.chunks_exact(size_of::<T>()).map(|c| {
        // SAFETY: T is plain old data of exactly this size.
        unsafe { std::ptr::read_unaligned(c.as_ptr().cast::<T>()) }
    })
}

/// Runs the `iter/task_file` owner walk once: every socket descriptor of
/// every process on the host (tasks are not per network namespace), with
/// the process's pid as the initial pid namespace numbers it.
pub fn walk_owners(ebpf: &mut Ebpf) -> Result<Vec<OwnerRow>> {
    const PROGRAM: &str = "ka_iter_owners";
    let prog = loaded_iter(ebpf, PROGRAM, "task_file")?;
    let link_id = prog.attach()?;
    let link = prog.take_link(link_id)?;
    let mut file = link.into_file()?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(pod_rows::<OwnerRow>(&bytes).collect())
}

/// Says (at debug level) how long loading a program took — the verifier's
/// work, mostly — and how much it verified: where startup time goes.
pub(crate) fn log_loaded(
    program: &str,
    started: std::time::Instant,
    info: Option<aya::programs::ProgramInfo>,
) {
    let insns = info.as_ref().and_then(|i| i.verified_instruction_count());
    let xlated = info.as_ref().and_then(|i| i.size_translated());
    tracing::debug!(
        program,
        ms = started.elapsed().as_millis() as u64,
        verified_insns = insns,
        xlated_bytes = xlated,
        "program loaded"
    );
}

/// The last informative lines of a verifier log, on one line.
pub(crate) fn verifier_summary(e: &aya::programs::ProgramError) -> String {
    use std::error::Error;
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s = format!("{s}: {inner}");
        src = inner.source();
    }
    if let aya::programs::ProgramError::LoadError { verifier_log, .. } = e {
        let log = verifier_log.to_string();
        let tail: Vec<&str> = log
            .lines()
            .rev()
            .filter(|l| !l.trim().is_empty())
            .take(3)
            .collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        if !tail.is_empty() {
            s = format!("{s} (verifier: {})", tail.join(" | "));
        }
    }
    s
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK.
fn raise_memlock() {
    let r = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: valid rlimit pointer; failure only matters on old kernels.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &r) };
}
