//! The kernel half of tuning as userspace drives it: attaching the sock_ops
//! and setsockopt programs to the cgroup v2 root, filling the rule, config,
//! owner and learned-idle maps, running the tuning walk in every namespace,
//! and draining the reports.
//!
//! Every attachment is a BPF link owned by this process: when it exits for
//! any reason (SIGKILL included) the kernel detaches the programs and frees
//! the maps, so new sockets are no longer tuned and nothing stays behind.

use std::collections::HashMap as StdHashMap;
use std::fs::File;

use anyhow::{Context, Result, anyhow};
use aya::Ebpf;
use aya::maps::{Array, HashMap, MapData, ProgramArray, RingBuf};
use aya::programs::{CgroupAttachMode, CgroupSockopt, Program, ProgramError, SockOps};
use aya_log::EbpfLogger;
use keepalive_common::TASK_COMM_LEN;
use keepalive_common::tune::{
    DestKey, MAX_RULES, RuleSet, TuneConfig, TuneReport, TuneRule, cfg_flags, names, walk_mode,
};

use crate::kernel::{cgroup2_mount, loader};

/// The tuning programs attached and their maps in hand.
pub struct TuneKernel {
    ring: RingBuf<MapData>,
    rules: Array<MapData, RuleSet>,
    cfg_map: Array<MapData, TuneConfig>,
    owners: HashMap<MapData, u64, [u8; TASK_COMM_LEN]>,
    adapt: HashMap<MapData, DestKey, u32>,
    /// The aya-log ring of the failure loggers and the program arrays they
    /// sit in (None: the object has none). The arrays are kept open: the
    /// kernel empties a program array when its last file descriptor closes.
    logger: Option<(EbpfLogger<KernelLog>, [ProgramArray<MapData>; 2])>,
    pub config: TuneConfig,
    /// Where cgroup v2 is mounted (rules' cgroup paths are below it).
    pub cgroup_root: std::path::PathBuf,
}

/// Program `name` of the object as its type `P`, loaded with `load` (the
/// verifier's summary when it refuses; the load logged with its size).
fn loaded<'a, P>(
    ebpf: &'a mut Ebpf,
    name: &str,
    load: fn(&mut P) -> Result<(), ProgramError>,
) -> Result<&'a mut P>
where
    for<'b> &'b mut P: TryFrom<&'b mut Program, Error = ProgramError>,
{
    fn program<'e>(ebpf: &'e mut Ebpf, name: &str) -> Result<&'e mut Program> {
        ebpf.program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))
    }
    let t0 = std::time::Instant::now();
    load(program(ebpf, name)?.try_into()?)
        .map_err(|e| anyhow!("{}", loader::verifier_summary(&e)))
        .with_context(|| format!("loading the {name} program"))?;
    loader::log_loaded(name, t0, ebpf.program(name).and_then(|p| p.info().ok()));
    Ok(program(ebpf, name)?.try_into()?)
}

fn take<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))?;
    T::try_from(map).map_err(|e| anyhow!("map {name}: {e}"))
}

impl TuneKernel {
    /// Takes the tuning maps, writes `rules` and `config` (not yet active),
    /// loads the programs and attaches sock_ops and the setsockopt hook to
    /// the cgroup v2 root.
    pub fn attach(ebpf: &mut Ebpf, rules: &[TuneRule], config: TuneConfig) -> Result<TuneKernel> {
        let cgroup_root = cgroup2_mount().ok_or_else(|| {
            anyhow!("cgroup v2 is not mounted (no cgroup2 line in /proc/mounts): tune attaches to its root")
        })?;
        let mut k = TuneKernel {
            ring: take(ebpf, names::TUNE_EVENTS)?,
            rules: take(ebpf, names::TUNE_RULES)?,
            cfg_map: take(ebpf, names::TUNE_CFG)?,
            owners: take(ebpf, names::TUNE_OWNERS)?,
            adapt: take(ebpf, names::TUNE_ADAPT)?,
            logger: None,
            config: TuneConfig {
                flags: config.flags & !cfg_flags::ACTIVE,
                ..config
            },
            cgroup_root,
        };
        k.set_rules(rules)?;
        k.write_config()?;
        k.logger = failure_loggers(ebpf);
        let cg = File::open(&k.cgroup_root)
            .with_context(|| format!("opening the cgroup v2 root {}", k.cgroup_root.display()))?;
        let root = k.cgroup_root.display();
        // A BPF link (kernels >= 5.7) always coexists with other programs
        // on the cgroup; its attach flags must be 0 (`Single`).
        loaded(ebpf, names::SOCKOPS, SockOps::load)?
            .attach(&cg, CgroupAttachMode::Single)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("attaching sock_ops to {root}"))?;
        loaded(ebpf, names::SETSOCKOPT, CgroupSockopt::load)?
            .attach(&cg, CgroupAttachMode::Single)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("attaching cgroup/setsockopt to {root}"))?;
        Ok(k)
    }

    /// Replaces the policy the programs use.
    pub fn set_rules(&mut self, rules: &[TuneRule]) -> Result<()> {
        let mut set = RuleSet::default();
        let n = rules.len().min(MAX_RULES);
        set.rules[..n].copy_from_slice(&rules[..n]);
        self.rules
            .set(0, set, 0)
            .map_err(|e| anyhow!("writing TUNE_RULES: {e}"))?;
        self.config.n_rules = n as u32;
        self.write_config()
    }

    pub fn write_config(&mut self) -> Result<()> {
        self.cfg_map
            .set(0, self.config, 0)
            .map_err(|e| anyhow!("writing TUNE_CFG: {e}"))
    }

    /// Turns tuning of new connections on or off.
    pub fn set_active(&mut self, on: bool) -> Result<()> {
        if on {
            self.config.flags |= cfg_flags::ACTIVE;
        } else {
            self.config.flags &= !cfg_flags::ACTIVE;
        }
        self.write_config()
    }

    /// Runs the tuning walk (`walk_mode::APPLY` or `RESTORE`) over every
    /// reachable namespace; returns what it did.
    pub fn walk(&mut self, ebpf: &mut Ebpf, mode: u32) -> Result<Vec<TuneReport>> {
        self.config.walk_mode = mode;
        self.write_config()?;
        let rows = loader::iter_rows::<TuneReport>(ebpf, names::WALK);
        self.flush_log();
        self.config.walk_mode = walk_mode::APPLY;
        self.write_config()?;
        rows.context("walking TCP sockets to tune them (iter/tcp)")
    }

    /// Every report sock_ops and the setsockopt hook queued.
    pub fn drain(&mut self) -> Vec<TuneReport> {
        self.flush_log();
        let mut out = Vec::new();
        while let Some(item) = self.ring.next() {
            if item.len() >= size_of::<TuneReport>() {
                // SAFETY: TuneReport is plain old data and the slice is long enough.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
            }
        }
        out
    }

    /// Passes on what the failure loggers said (rare: only failures log).
    fn flush_log(&mut self) {
        if let Some((l, _)) = self.logger.as_mut() {
            l.flush();
        }
    }

    /// Tells the programs who owns sockets the kernel knows no owner of.
    pub fn set_owners(&mut self, owners: &StdHashMap<u64, [u8; TASK_COMM_LEN]>) -> Result<()> {
        for (cookie, comm) in owners {
            self.owners
                .insert(cookie, comm, 0)
                .map_err(|e| anyhow!("writing TUNE_OWNERS: {e}"))?;
        }
        Ok(())
    }

    /// Forgets owners of sockets that are gone (keeps the map small).
    pub fn forget_owners(&mut self, keep: impl Fn(u64) -> bool) {
        let stale: Vec<u64> = self
            .owners
            .keys()
            .filter_map(Result::ok)
            .filter(|c| !keep(*c))
            .collect();
        for c in stale {
            let _ = self.owners.remove(&c);
        }
    }

    /// The learned TCP_KEEPIDLE new connections to `dest` get.
    pub fn set_learned_idle(&mut self, dest: DestKey, idle_s: u32) -> Result<()> {
        self.adapt
            .insert(dest, idle_s, 0)
            .map_err(|e| anyhow!("writing TUNE_ADAPT: {e}"))
    }
}

/// Where kernel-side diagnostics go: aya-log records become `tracing`
/// events under the target `keepalive::kernel`, at their own level.
pub struct KernelLog;

impl log::Log for KernelLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let msg = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: "keepalive::kernel", "{msg}"),
            log::Level::Warn => tracing::warn!(target: "keepalive::kernel", "{msg}"),
            log::Level::Info => tracing::info!(target: "keepalive::kernel", "{msg}"),
            log::Level::Debug => tracing::debug!(target: "keepalive::kernel", "{msg}"),
            log::Level::Trace => tracing::trace!(target: "keepalive::kernel", "{msg}"),
        }
    }

    fn flush(&self) {}
}

/// Loads the programs that log a failed `bpf_setsockopt`, puts them where
/// the tuning programs tail-call them, and returns the reader of their
/// log ring. Diagnostics are optional: when anything here fails (an object
/// built without them), tuning goes on without and says so at debug level.
fn failure_loggers(ebpf: &mut Ebpf) -> Option<(EbpfLogger<KernelLog>, [ProgramArray<MapData>; 2])> {
    let installed = (|| -> Result<[ProgramArray<MapData>; 2]> {
        let fd = loaded(ebpf, names::LOG_SOCKOPS, SockOps::load)?
            .fd()?
            .try_clone()?;
        let mut for_sockops: ProgramArray<MapData> = take(ebpf, names::TUNE_LOG_SOCKOPS)?;
        for_sockops.set(0, &fd, 0)?;
        let prog = loader::loaded_iter(ebpf, names::LOG_ITER, "tcp")?;
        let fd = prog.fd()?.try_clone()?;
        let mut for_iter: ProgramArray<MapData> = take(ebpf, names::TUNE_LOG_ITER)?;
        for_iter.set(0, &fd, 0)?;
        Ok([for_sockops, for_iter])
    })();
    let arrays = match installed {
        Ok(arrays) => arrays,
        Err(e) => {
            tracing::debug!("kernel diagnostics of tuning failures are off: {e:#}");
            return None;
        }
    };
    match EbpfLogger::init_with_logger(ebpf, KernelLog) {
        Ok(l) => Some((l, arrays)),
        Err(e) => {
            tracing::debug!("kernel diagnostics of tuning failures are off: {e}");
            None
        }
    }
}
