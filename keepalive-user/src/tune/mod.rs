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

pub mod adaptive;
mod consumer;
pub mod evidence;
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
use crate::table::ConnId;
use crate::table::conn_table::{ConnTable, VerdictChange};
use adaptive::{Evidence, Learner};
use keepalive_common::tune::DestKey;
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
    pub adapted: u64,
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
    idents: HashMap<u64, ConnId>,
    /// Connections under adaptive rules, watched for evidence.
    watched: HashMap<u64, Watched>,
    /// One learner per (rule, destination).
    learners: HashMap<(usize, DestKey), Learner>,
    /// When retransmitting adaptive connections were last looked at.
    rtx_looked: Option<Instant>,
    pub counts: TuneCounts,
    /// Write the closing `tune ended; ...` line on stderr (serve logs the
    /// counts through `tracing` instead).
    pub summary_line: bool,
}

/// A connection an adaptive rule tuned.
#[derive(Clone, Debug)]
struct Watched {
    rule: usize,
    dest: DestKey,
    watch: evidence::Watch,
    tuned: Tuned,
}

/// How often sockets that retransmit under adaptive rules are looked at
/// (a walk of every socket), while any does.
const RTX_LOOK_EVERY: Duration = Duration::from_secs(1);
/// How long a closed connection stays watched for the kernel's timeout
/// event, which follows its CLOSE.
const CLOSED_GRACE_NS: u64 = 5_000_000_000;

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
            watched: HashMap::new(),
            learners: HashMap::new(),
            rtx_looked: None,
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
            if t.action == Action::Tuned {
                self.watch_adaptive(&t, r.rule);
            }
            if t.source == report::Source::Application {
                if let Some(id) = self.idents.get(&t.id.cookie) {
                    t.id = *id;
                }
            } else {
                self.idents.insert(t.id.cookie, t.id);
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
                Action::Adapted => c.adapted += 1,
            }
            if !t.failed.is_empty() && t.action != Action::Failed {
                c.failed += 1;
            }
            match t.action {
                Action::Tuned | Action::DryRun | Action::Enforced => {
                    self.rule_of.insert(t.id.cookie, t.rule.clone());
                }
                Action::Restored => {
                    self.rule_of.remove(&t.id.cookie);
                }
                _ => {}
            }
            if self.inner.tuned(&t, clock)? == Flow::Stop {
                flow = Flow::Stop;
            }
        }
        Ok(flow)
    }

    /// Starts watching a connection an adaptive rule just tuned.
    fn watch_adaptive(&mut self, t: &Tuned, rule_no: u8) {
        let Some(rule) = (rule_no as usize)
            .checked_sub(1)
            .and_then(|i| self.loaded.policy.rules.get(i).map(|r| (i, r)))
        else {
            return;
        };
        let (idx, rule) = rule;
        let Some(a) = rule.adaptive else {
            return;
        };
        let Some(daddr) = t.id.daddr else {
            return;
        };
        let changed = |option: &str| {
            t.changes
                .iter()
                .find(|c| c.option == option)
                .and_then(|c| c.new.as_u64())
                .map(|v| v as u32)
        };
        let idle_s = changed("idle_s").unwrap_or(a.min_idle_s);
        let interval_s = rule
            .interval_s
            .or_else(|| changed("interval_s"))
            .unwrap_or(75);
        self.watched.insert(
            t.id.cookie,
            Watched {
                rule: idx,
                dest: dest_key(daddr, t.id.dport),
                watch: evidence::Watch::new(idle_s, interval_s),
                tuned: t.clone(),
            },
        );
    }

    /// Feeds one piece of evidence to its destination's learner; applies
    /// and reports what it decides.
    fn learn(&mut self, cookie: u64, ev: Evidence, ctx: &Ctx) -> Result<Flow> {
        let Some(w) = self.watched.get(&cookie).cloned() else {
            return Ok(Flow::Continue);
        };
        let Some(a) = self
            .loaded
            .policy
            .rules
            .get(w.rule)
            .and_then(|r| r.adaptive)
        else {
            return Ok(Flow::Continue);
        };
        let learner = self
            .learners
            .entry((w.rule, w.dest))
            .or_insert_with(|| Learner::new(a.min_idle_s, a.max_idle_s));
        let Some(adj) = learner.observe(ev, Clock::mono_now_ns()) else {
            return Ok(Flow::Continue);
        };
        if let Some(k) = self.kernel.as_mut() {
            k.set_learned_idle(w.dest, adj.to_s)?;
        }
        let mut t = w.tuned.clone();
        t.ts_mono_ns = Clock::mono_now_ns();
        t.action = Action::Adapted;
        t.source = report::Source::Learned;
        t.kept.clear();
        t.failed.clear();
        t.changes = vec![report::Change {
            option: "idle_s",
            old: adj.from_s.into(),
            new: adj.to_s.into(),
            old_from_sysctl: false,
            new_from_sysctl: false,
        }];
        let mut evidence = serde_json::to_value(&adj).unwrap_or_default();
        if let serde_json::Value::Object(m) = &mut evidence {
            m.insert("destination".into(), dest_text(&w.dest).into());
        }
        t.evidence = Some(evidence);
        self.counts.adapted += 1;
        self.inner.tuned(&t, ctx.clock)
    }

    /// Probes answered (a first probe not followed by a second within an
    /// interval and a second); closed connections forgotten once their
    /// timeout had time to arrive.
    fn answered_probes(&mut self, ctx: &Ctx) -> Result<Flow> {
        let now = Clock::mono_now_ns();
        self.watched.retain(|_, w| {
            w.watch
                .closed_ns
                .is_none_or(|at| now.saturating_sub(at) < CLOSED_GRACE_NS)
        });
        let due: Vec<(u64, Evidence)> = self
            .watched
            .iter_mut()
            .filter_map(|(c, w)| w.watch.quiet(now).map(|e| (*c, e)))
            .collect();
        let mut flow = Flow::Continue;
        for (cookie, ev) in due {
            if self.learn(cookie, ev, ctx)? == Flow::Stop {
                flow = Flow::Stop;
            }
        }
        Ok(flow)
    }

    /// Looks at the sockets of adaptive connections that retransmit (at
    /// most every [`RTX_LOOK_EVERY`]): still unanswered after enough
    /// retransmissions, following a silence, is a death at that silence.
    fn look_at_retransmitting(&mut self, ctx: &mut Ctx) -> Result<Flow> {
        let pending = self
            .watched
            .values()
            .any(|w| w.watch.rtx_since_ns.is_some() && w.watch.closed_ns.is_none());
        if !pending
            || self
                .rtx_looked
                .is_some_and(|t| t.elapsed() < RTX_LOOK_EVERY)
        {
            return Ok(Flow::Continue);
        }
        let Some(ebpf) = ctx.ebpf.as_deref_mut() else {
            return Ok(Flow::Continue);
        };
        self.rtx_looked = Some(Instant::now());
        let mut found = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let hz = ctx.hz;
        // One row at a time: only the watched sockets are kept.
        loader::for_each_socket(ebpf, |r| {
            let Some(w) = self.watched.get_mut(&r.cookie) else {
                return;
            };
            if w.watch.rtx_since_ns.is_none() {
                return;
            }
            seen.insert(r.cookie);
            let silence = evidence::silence_before_send(r.lsndtime, r.rcv_tstamp, hz);
            if let Some(e) = w.watch.looked(u32::from(r.retransmits), silence) {
                found.push((r.cookie, e));
            }
        })?;
        for (c, w) in self.watched.iter_mut() {
            if w.watch.rtx_since_ns.is_some() && !seen.contains(c) {
                w.watch.gone();
            }
        }
        let mut flow = Flow::Continue;
        for (cookie, e) in found {
            if self.learn(cookie, e, ctx)? == Flow::Stop {
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
        let rows = loader::walk_sockets(ebpf)?;
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

/// The destination group of an address (remote /24 or /64, and port), as
/// the kernel keys learned idles.
fn dest_key(addr: std::net::IpAddr, port: u16) -> DestKey {
    let mut raw = [0u8; 16];
    let family = match addr.to_canonical() {
        std::net::IpAddr::V4(a) => {
            raw[..4].copy_from_slice(&a.octets());
            crate::events::AF_INET
        }
        std::net::IpAddr::V6(a) => {
            raw = a.octets();
            crate::events::AF_INET6
        }
    };
    DestKey::of(family, &raw, port)
}

fn dest_text(d: &DestKey) -> String {
    if d.family == crate::events::AF_INET6 {
        let a = std::net::Ipv6Addr::from(d.addr);
        format!("[{a}/64]:{}", d.port)
    } else {
        let a = std::net::Ipv4Addr::new(d.addr[0], d.addr[1], d.addr[2], d.addr[3]);
        format!("{a}/24:{}", d.port)
    }
}

fn k_drain(k: &mut Option<TuneKernel>) -> Vec<TuneReport> {
    k.as_mut().map(TuneKernel::drain).unwrap_or_default()
}
