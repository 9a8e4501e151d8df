//! `keepalive tune`: applies a keepalive policy to live TCP connections —
//! new ones from sock_ops, existing ones from a socket walk — reports every
//! change as a `tuned` record, and puts the original values back on exit.
//!
//! [`Tuner`] is a monitor-engine consumer that wraps another (the line sink
//! of `record` or `tune`, the TUI of `top`): it forwards everything to it
//! and writes its own records through [`TunedSink`]. The decisions are pure
//! and shared with the kernel (keepalive-common's `first_match`/`plan`);
//! the policy file is [`policy`], the kernel side [`kernel`], the records
//! [`report`].

pub mod kernel;
pub mod policy;
pub mod report;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use keepalive_common::TASK_COMM_LEN;
use keepalive_common::tune::{
    TuneConfig, TuneReport, TuneRule, cfg_flags, report as rep, walk_mode,
};
use serde::Serialize;

use crate::events::Event;
use crate::kernel::loader;
use crate::monitor::{Consumer, Counters, Ctx, Flow};
use crate::output::Clock;
use crate::table::conn_table::{ConnTable, VerdictChange};
use kernel::TuneKernel;
use policy::Policy;
use report::{Action, Tuned};

/// Default cap on changes per second, all sockets together.
pub const DEFAULT_RATE_CAP: u32 = 1000;

/// How `tune` (or `record`/`top --policy`) runs.
#[derive(Clone, Debug)]
pub struct TuneOptions {
    pub policy_path: PathBuf,
    /// Compute and report, change nothing.
    pub dry_run: bool,
    /// Apply over applications' own values, and rewrite their later ones.
    pub enforce: bool,
    /// Leave our values on the sockets at exit.
    pub keep: bool,
    /// Changes per second, all sockets together (0: no cap).
    pub rate_cap: u32,
}

/// A policy and its kernel form, checked and compiled before anything runs.
#[derive(Clone, Debug)]
pub struct LoadedPolicy {
    pub policy: Policy,
    pub rules: Vec<TuneRule>,
}

/// Reads, checks and compiles a policy file (cgroup paths resolved below
/// the cgroup v2 mount). Every error is `FILE:LINE: what`.
pub fn load_policy(path: &std::path::Path) -> Result<LoadedPolicy> {
    let policy = policy::load(path)?;
    let mount = crate::kernel::cgroup2_mount();
    let rules = policy::compile(&policy, |c| match &mount {
        Some(m) => policy::resolve_cgroup(m, c),
        None => Err("cgroup v2 is not mounted".into()),
    })?;
    Ok(LoadedPolicy { policy, rules })
}

/// A notice about the policy itself (loaded, reloaded, reload refused).
#[derive(Clone, Debug, Serialize)]
pub struct PolicyNotice {
    pub action: &'static str,
    pub file: String,
    pub rules: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub dry_run: bool,
    pub enforce: bool,
}

/// `policy` record, as serialised.
#[derive(Serialize)]
pub struct PolicyOut<'a> {
    v: u32,
    event: &'static str,
    ts: String,
    ts_mono_ns: u64,
    #[serde(flatten)]
    notice: &'a PolicyNotice,
}

impl<'a> PolicyOut<'a> {
    pub fn new(n: &'a PolicyNotice, mono_ns: u64, clock: &Clock) -> Self {
        PolicyOut {
            v: crate::output::json::SCHEMA_VERSION,
            event: "policy",
            ts: clock.rfc3339(mono_ns),
            ts_mono_ns: mono_ns,
            notice: n,
        }
    }
}

pub fn policy_text(n: &PolicyNotice, mono_ns: u64, clock: &Clock) -> String {
    let mut s = format!(
        "{} {:<15} {} {} rules=[{}]",
        clock.rfc3339(mono_ns),
        "policy",
        n.action,
        n.file,
        n.rules.join(",")
    );
    if n.dry_run {
        s += " dry_run";
    }
    if n.enforce {
        s += " enforce";
    }
    if let Some(e) = &n.error {
        s += &format!(" error: {e}");
    }
    s
}

/// Where a [`Tuner`] writes its records: the consumer it wraps.
pub trait TunedSink {
    fn tuned(&mut self, t: &Tuned, clock: &Clock) -> Result<Flow>;
    fn policy(&mut self, n: &PolicyNotice, mono_ns: u64, clock: &Clock) -> Result<Flow>;
}

/// Who a socket is, as last reported.
#[derive(Clone, Debug)]
struct Ident {
    netns: u32,
    saddr: Option<std::net::IpAddr>,
    sport: u16,
    daddr: Option<std::net::IpAddr>,
    dport: u16,
    state: u32,
}

impl Ident {
    fn of(t: &Tuned) -> Ident {
        Ident {
            netns: t.netns,
            saddr: t.saddr,
            sport: t.sport,
            daddr: t.daddr,
            dport: t.dport,
            state: t.state,
        }
    }

    fn fill(&self, t: &mut Tuned) {
        t.netns = self.netns;
        t.saddr = self.saddr;
        t.sport = self.sport;
        t.daddr = self.daddr;
        t.dport = self.dport;
        t.state = self.state;
    }
}

/// Totals for the closing line.
#[derive(Clone, Copy, Debug, Default)]
pub struct TuneCounts {
    pub tuned: u64,
    pub dry_run: u64,
    pub app_kept: u64,
    pub app_override: u64,
    pub enforced: u64,
    pub restored: u64,
    pub failed: u64,
    pub rate_limited: u64,
}

/// The tuning consumer, wrapping the one that writes records.
pub struct Tuner<C> {
    pub inner: C,
    opts: TuneOptions,
    loaded: LoadedPolicy,
    kernel: Option<TuneKernel>,
    generation: u32,
    /// A walk is due then (rate-limited or owner-waiting sockets).
    rewalk_at: Option<Instant>,
    /// Which rule tuned each socket we changed (for `top`).
    rule_of: HashMap<u64, String>,
    /// The identity of each socket we reported, for the setsockopt hook's
    /// reports (which carry only the cookie).
    idents: HashMap<u64, Ident>,
    pub counts: TuneCounts,
    /// Write the closing `tune ended; ...` line on stderr (serve logs the
    /// counts through `tracing` instead).
    pub summary_line: bool,
}

impl<C: Consumer + TunedSink> Tuner<C> {
    pub fn new(inner: C, opts: TuneOptions, loaded: LoadedPolicy) -> Self {
        Tuner {
            inner,
            opts,
            loaded,
            kernel: None,
            generation: 1,
            rewalk_at: None,
            rule_of: HashMap::new(),
            idents: HashMap::new(),
            counts: TuneCounts::default(),
            summary_line: true,
        }
    }

    /// The rule that tuned connection `cookie`, if one did.
    pub fn rule_of(&self, cookie: u64) -> Option<&str> {
        self.rule_of.get(&cookie).map(String::as_str)
    }

    fn notice(
        &mut self,
        action: &'static str,
        error: Option<String>,
        clock: &Clock,
    ) -> Result<Flow> {
        let n = PolicyNotice {
            action,
            file: self.opts.policy_path.display().to_string(),
            rules: self
                .loaded
                .policy
                .rules
                .iter()
                .map(|r| r.name.clone())
                .collect(),
            error,
            dry_run: self.opts.dry_run,
            enforce: self.opts.enforce,
        };
        self.inner.policy(&n, Clock::mono_now_ns(), clock)
    }

    /// Decodes and writes reports; schedules a walk for those that wait.
    fn handle(&mut self, reports: &[TuneReport], clock: &Clock) -> Result<Flow> {
        let mut flow = Flow::Continue;
        for r in reports {
            if r.what == rep::NEED_OWNER || r.what == rep::RATE_LIMITED {
                let wait = if r.what == rep::NEED_OWNER {
                    1000
                } else {
                    1100
                };
                let at = Instant::now() + Duration::from_millis(wait);
                self.rewalk_at = Some(self.rewalk_at.map_or(at, |t| t.min(at)));
            }
            let rules = &self.loaded.policy.rules;
            let Some(mut t) = report::decode(r, |i| rules.get(i).map(|r| r.name.clone())) else {
                continue;
            };
            if t.source == report::Source::Application {
                if let Some(id) = self.idents.get(&t.cookie) {
                    id.fill(&mut t);
                }
            } else {
                self.idents.insert(t.cookie, Ident::of(&t));
            }
            let c = &mut self.counts;
            match t.action {
                Action::Tuned => c.tuned += 1,
                Action::DryRun => c.dry_run += 1,
                Action::AppKept => c.app_kept += 1,
                Action::AppOverride => c.app_override += 1,
                Action::Enforced => c.enforced += 1,
                Action::Restored => c.restored += 1,
                Action::Failed => c.failed += 1,
                Action::RateLimited => c.rate_limited += 1,
            }
            if !t.failed.is_empty() && t.action != Action::Failed {
                c.failed += 1;
            }
            match t.action {
                Action::Tuned | Action::DryRun | Action::Enforced => {
                    self.rule_of.insert(t.cookie, t.rule.clone());
                }
                Action::Restored => {
                    self.rule_of.remove(&t.cookie);
                }
                _ => {}
            }
            if self.inner.tuned(&t, clock)? == Flow::Stop {
                flow = Flow::Stop;
            }
        }
        Ok(flow)
    }

    /// Tells the kernel the owners of sockets it has none for, when a rule
    /// needs one: from /proc, like `ss -p`.
    fn fill_owners(&mut self, ebpf: &mut aya::Ebpf) -> Result<()> {
        if !self.loaded.policy.rules.iter().any(|r| r.comm.is_some()) {
            return Ok(());
        }
        let Some(k) = self.kernel.as_mut() else {
            return Ok(());
        };
        let rows = loader::walk_sockets(ebpf, loader::aya_btf()?)?;
        let by_ino = crate::table::owners::scan();
        let mut owners = HashMap::new();
        for r in rows.iter().filter(|r| r.ino != 0) {
            // A socket nobody holds gets a name no rule can have, so the
            // rules after a `comm` rule get their turn.
            let mut comm = [0u8; TASK_COMM_LEN];
            comm[0] = 1;
            if let Some(o) = by_ino.get(&r.ino).and_then(|o| o.first()) {
                comm = [0u8; TASK_COMM_LEN];
                let n = o.comm.len().min(TASK_COMM_LEN - 1);
                comm[..n].copy_from_slice(&o.comm.as_bytes()[..n]);
            }
            owners.insert(r.cookie, comm);
        }
        k.forget_owners(|c| owners.contains_key(&c));
        k.set_owners(&owners)
    }

    /// Fills owners if needed, then applies the policy to every existing
    /// socket not yet handled.
    fn apply_walk(&mut self, ebpf: &mut aya::Ebpf, clock: &Clock) -> Result<Flow> {
        self.rewalk_at = None;
        self.fill_owners(ebpf)?;
        let Some(k) = self.kernel.as_mut() else {
            return Ok(Flow::Continue);
        };
        let rows = k.walk(ebpf, walk_mode::APPLY)?;
        self.handle(&rows, clock)
    }

    /// Takes our values back from every socket still open (unless
    /// `--keep`), after stopping sock_ops from tuning new ones.
    fn restore(&mut self, ebpf: &mut aya::Ebpf, clock: &Clock) -> Result<Flow> {
        let Some(k) = self.kernel.as_mut() else {
            return Ok(Flow::Continue);
        };
        k.set_active(false)?;
        let pending = k.drain();
        let mut flow = self.handle(&pending, clock)?;
        if !self.opts.keep
            && let Some(k) = self.kernel.as_mut()
        {
            let rows = k.walk(ebpf, walk_mode::RESTORE)?;
            if self.handle(&rows, clock)? == Flow::Stop {
                flow = Flow::Stop;
            }
        }
        Ok(flow)
    }

    fn config(&self) -> TuneConfig {
        let mut flags = 0;
        if self.opts.dry_run {
            flags |= cfg_flags::DRY_RUN;
        }
        if self.opts.enforce {
            flags |= cfg_flags::ENFORCE;
        }
        TuneConfig {
            flags,
            n_rules: self.loaded.rules.len() as u32,
            walk_mode: walk_mode::APPLY,
            hz: 0,
            rate_cap: self.opts.rate_cap,
            generation: self.generation,
        }
    }
}

fn k_drain(k: &mut Option<TuneKernel>) -> Vec<TuneReport> {
    k.as_mut().map(TuneKernel::drain).unwrap_or_default()
}

impl<C: Consumer + TunedSink> Consumer for Tuner<C> {
    fn started(&mut self, ctx: &mut Ctx) -> Result<Flow> {
        let ebpf = ctx
            .ebpf
            .as_deref_mut()
            .ok_or_else(|| anyhow!("tune: the eBPF object is not loaded"))?;
        let mut config = self.config();
        let rows = loader::walk_sockets(ebpf, ctx.btf)?;
        config.hz = crate::table::walk::hz_of(&rows) as u32;
        let mut k = TuneKernel::attach(ebpf, &self.loaded.rules, config)
            .context("attaching the tuning programs")?;
        k.set_active(true)?;
        self.kernel = Some(k);
        let mut flow = self.notice("loaded", None, ctx.clock)?;
        if self.apply_walk(ebpf, ctx.clock)? == Flow::Stop {
            flow = Flow::Stop;
        }
        if self.inner.started(ctx)? == Flow::Stop {
            flow = Flow::Stop;
        }
        Ok(flow)
    }

    fn event(&mut self, ev: &Event, ctx: &Ctx) -> Result<Flow> {
        if let crate::events::Detail::StateChange { new, .. } = ev.detail
            && new == keepalive_common::tcp_state::CLOSE
        {
            self.rule_of.remove(&ev.cookie);
            self.idents.remove(&ev.cookie);
        }
        self.inner.event(ev, ctx)
    }

    fn verdict(&mut self, ch: &VerdictChange, mono_ns: u64, ctx: &Ctx) -> Result<Flow> {
        self.inner.verdict(ch, mono_ns, ctx)
    }

    fn lost(&mut self, count: u64, total: u64, mono_ns: u64, ctx: &Ctx) -> Result<Flow> {
        self.inner.lost(count, total, mono_ns, ctx)
    }

    fn refreshed(&mut self, ctx: &mut Ctx) -> Result<Flow> {
        self.inner.refreshed(ctx)
    }

    fn batch_done(&mut self, ctx: &mut Ctx) -> Result<Flow> {
        let reports = k_drain(&mut self.kernel);
        let mut flow = self.handle(&reports, ctx.clock)?;
        if self.rewalk_at.is_some_and(|t| Instant::now() >= t)
            && let Some(ebpf) = ctx.ebpf.as_deref_mut()
            && self.apply_walk(ebpf, ctx.clock)? == Flow::Stop
        {
            flow = Flow::Stop;
        }
        if self.inner.batch_done(ctx)? == Flow::Stop {
            flow = Flow::Stop;
        }
        Ok(flow)
    }

    /// Reloads the policy: a bad file keeps the running one and says why;
    /// a good one takes the old values back, then applies the new rules.
    /// Applying and restoring settings walks the sockets (also at stop).
    fn walks_sockets(&self) -> bool {
        true
    }

    fn hangup(&mut self, ctx: &mut Ctx) -> Result<Flow> {
        let mut flow = self.inner.hangup(ctx)?;
        let Some(ebpf) = ctx.ebpf.as_deref_mut() else {
            return Ok(flow);
        };
        match load_policy(&self.opts.policy_path) {
            Err(e) => {
                let msg = format!("{e:#}");
                eprintln!("keepalive: policy reload refused, keeping the running policy: {msg}");
                if self.notice("reload_refused", Some(msg), ctx.clock)? == Flow::Stop {
                    flow = Flow::Stop;
                }
            }
            Ok(new) => {
                if self.restore(ebpf, ctx.clock)? == Flow::Stop {
                    flow = Flow::Stop;
                }
                self.loaded = new;
                self.generation += 1;
                let cfg = self.config();
                if let Some(k) = self.kernel.as_mut() {
                    k.config = TuneConfig {
                        hz: k.config.hz,
                        ..cfg
                    };
                    k.set_rules(&self.loaded.rules)?;
                    k.set_active(true)?;
                }
                if self.notice("reloaded", None, ctx.clock)? == Flow::Stop {
                    flow = Flow::Stop;
                }
                if self.apply_walk(ebpf, ctx.clock)? == Flow::Stop {
                    flow = Flow::Stop;
                }
            }
        }
        Ok(flow)
    }

    fn stopping(&mut self, ctx: &mut Ctx) -> Result<()> {
        let restored = match ctx.ebpf.as_deref_mut() {
            Some(ebpf) => self.restore(ebpf, ctx.clock).map(|_| ()),
            None => Ok(()),
        };
        let inner = self.inner.stopping(ctx);
        restored.and(inner)
    }

    fn finished(&mut self, totals: &Counters, table: Option<&ConnTable>) -> Result<()> {
        let c = self.counts;
        if self.summary_line {
            crate::diag!(
                "tune ended; tuned={} dry_run={} app_kept={} app_override={} enforced={} restored={} failed={} rate_limited={}",
                c.tuned,
                c.dry_run,
                c.app_kept,
                c.app_override,
                c.enforced,
                c.restored,
                c.failed,
                c.rate_limited
            );
        }
        self.inner.finished(totals, table)
    }
}
