//! The tuning wire format and its two pure decisions, shared by the eBPF
//! programs (which apply them) and userspace (which tests and explains them):
//! which rule a socket falls under ([`first_match`]) and what to change on it
//! ([`plan`]).
//!
//! Both are written for the BPF verifier: fixed-size arrays, bounded loops,
//! no slices, no panics.

use crate::filter::in_cidr;
use crate::{Cidr, TASK_COMM_LEN};

/// Most rules a policy may hold (the kernel tries them in order).
pub const MAX_RULES: usize = 16;

/// Socket options a rule can set, as bits of a mask.
pub mod opt {
    /// SO_KEEPALIVE.
    pub const KEEPALIVE: u8 = 1 << 0;
    /// TCP_KEEPIDLE (seconds).
    pub const IDLE: u8 = 1 << 1;
    /// TCP_KEEPINTVL (seconds).
    pub const INTVL: u8 = 1 << 2;
    /// TCP_KEEPCNT.
    pub const CNT: u8 = 1 << 3;
    /// TCP_USER_TIMEOUT (milliseconds).
    pub const USER_TIMEOUT: u8 = 1 << 4;
    pub const ALL: u8 = 0x1f;
    /// Option bits in the order they are applied: the timer parameters
    /// before SO_KEEPALIVE, so the first timer already uses the new idle.
    pub const ORDER: [u8; 5] = [IDLE, INTVL, CNT, USER_TIMEOUT, KEEPALIVE];
}

/// Which criteria of a [`TuneRule`] are in use (absent ones match anything).
pub mod crit {
    pub const REMOTE_PORT: u32 = 1 << 0;
    pub const LOCAL_PORT: u32 = 1 << 1;
    pub const REMOTE: u32 = 1 << 2;
    pub const COMM: u32 = 1 << 3;
    pub const CGROUP: u32 = 1 << 4;
    /// TCP_KEEPIDLE comes from the learned per-destination map when it has one.
    pub const ADAPTIVE: u32 = 1 << 5;
}

/// Values of the five options. `0` in a socket's current values means
/// "not set on the socket": keepalive off, timers from the sysctls, no
/// user timeout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KaValues {
    pub keepalive: u32,
    pub idle_s: u32,
    pub intvl_s: u32,
    pub cnt: u32,
    pub user_timeout_ms: u32,
}

impl KaValues {
    /// The value of the option `bit` (one of [`opt`]).
    #[inline(always)]
    pub fn get(&self, bit: u8) -> u32 {
        match bit {
            opt::KEEPALIVE => self.keepalive,
            opt::IDLE => self.idle_s,
            opt::INTVL => self.intvl_s,
            opt::CNT => self.cnt,
            _ => self.user_timeout_ms,
        }
    }

    #[inline(always)]
    pub fn set(&mut self, bit: u8, v: u32) {
        match bit {
            opt::KEEPALIVE => self.keepalive = v,
            opt::IDLE => self.idle_s = v,
            opt::INTVL => self.intvl_s = v,
            opt::CNT => self.cnt = v,
            _ => self.user_timeout_ms = v,
        }
    }
}

/// One compiled policy rule.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TuneRule {
    /// [`crit`] bits.
    pub criteria: u32,
    /// [`opt`] bits this rule sets.
    pub set: u8,
    pub _pad: [u8; 3],
    pub rport_lo: u16,
    pub rport_hi: u16,
    pub lport_lo: u16,
    pub lport_hi: u16,
    pub remote: Cidr,
    /// NUL-padded, as the kernel keeps `task->comm`.
    pub comm: [u8; TASK_COMM_LEN],
    /// Kernfs id of the cgroup whose subtree matches, and its depth.
    pub cgroup_id: u64,
    pub cgroup_level: u32,
    pub _pad2: u32,
    pub values: KaValues,
    pub _pad3: u32,
}

impl TuneRule {
    pub const fn zeroed() -> Self {
        TuneRule {
            criteria: 0,
            set: 0,
            _pad: [0; 3],
            rport_lo: 0,
            rport_hi: 0,
            lport_lo: 0,
            lport_hi: 0,
            remote: Cidr {
                addr: [0; 16],
                family: 0,
                prefix_len: 0,
                _pad: [0; 6],
            },
            comm: [0; TASK_COMM_LEN],
            cgroup_id: 0,
            cgroup_level: 0,
            _pad2: 0,
            values: KaValues {
                keepalive: 0,
                idle_s: 0,
                intvl_s: 0,
                cnt: 0,
                user_timeout_ms: 0,
            },
            _pad3: 0,
        }
    }
}

impl Default for TuneRule {
    fn default() -> Self {
        Self::zeroed()
    }
}

/// The whole policy as the kernel holds it (array map `TUNE_RULES`, one entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleSet {
    pub rules: [TuneRule; MAX_RULES],
}

impl Default for RuleSet {
    fn default() -> Self {
        RuleSet {
            rules: [TuneRule::zeroed(); MAX_RULES],
        }
    }
}

/// What a socket is, for matching. Addresses as in [`crate::RawEvent`];
/// an IPv4-mapped IPv6 remote is given as IPv4.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockKey {
    pub family: u8,
    pub lport: u16,
    pub rport: u16,
    pub raddr: [u8; 16],
    /// The owner's command name, when known.
    pub comm: Option<[u8; TASK_COMM_LEN]>,
}

/// The outcome of matching a socket against the rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Match {
    /// No rule applies: the socket is never touched.
    None,
    /// Rule number `n` (0-based) applies.
    Rule(u32),
    /// Rule `n` needs the owner's command name and it is not known yet:
    /// nothing may be decided before it is.
    NeedOwner(u32),
}

/// The first rule (of the first `n`) whose every criterion holds.
/// `cgroup_at(level)` is the kernfs id of the socket's cgroup ancestor at
/// that depth (0 when it is not that deep).
///
/// The eBPF programs run [`rule_match`] from a `bpf_loop` callback instead
/// of this loop, so the verifier checks one rule once rather than sixteen
/// unrolled copies; the two agree by construction.
#[inline(always)]
pub fn first_match(
    rules: &[TuneRule; MAX_RULES],
    n: u32,
    s: &SockKey,
    cgroup_at: impl Fn(u32) -> u64,
) -> Match {
    let mut i = 0;
    while i < MAX_RULES {
        if i as u32 >= n {
            break;
        }
        let m = rule_match(i as u32, &rules[i], s, &cgroup_at);
        if m != Match::None {
            return m;
        }
        i += 1;
    }
    Match::None
}

/// Rule number `i` (`r`) against socket `s`: [`Match::Rule`] when every
/// criterion holds, [`Match::NeedOwner`] when all but an unknown owner do,
/// else [`Match::None`] (try the next rule).
#[inline(always)]
pub fn rule_match(i: u32, r: &TuneRule, s: &SockKey, cgroup_at: impl Fn(u32) -> u64) -> Match {
    let c = r.criteria;
    let ok = (c & crit::REMOTE_PORT == 0 || (s.rport >= r.rport_lo && s.rport <= r.rport_hi))
        && (c & crit::LOCAL_PORT == 0 || (s.lport >= r.lport_lo && s.lport <= r.lport_hi))
        && (c & crit::REMOTE == 0 || in_cidr(&s.raddr, s.family, &r.remote))
        && (c & crit::CGROUP == 0 || cgroup_at(r.cgroup_level) == r.cgroup_id);
    if !ok {
        return Match::None;
    }
    if c & crit::COMM == 0 {
        return Match::Rule(i);
    }
    match &s.comm {
        None => Match::NeedOwner(i),
        Some(comm) if same_comm(comm, &r.comm) => Match::Rule(i),
        Some(_) => Match::None,
    }
}

#[inline(always)]
fn same_comm(a: &[u8; TASK_COMM_LEN], b: &[u8; TASK_COMM_LEN]) -> bool {
    let mut i = 0;
    while i < TASK_COMM_LEN {
        if a[i] != b[i] {
            return false;
        }
        if a[i] == 0 {
            return true;
        }
        i += 1;
    }
    true
}

/// What to do to one socket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Options to set, to `target`'s values.
    pub set: u8,
    /// Options the rule sets but the application already set to something
    /// else: left alone (applications win unless enforcing).
    pub kept: u8,
    pub target: KaValues,
}

/// What the rule changes on a socket whose own values are `cur` (0: not
/// set). An option the application set (non-zero) and that differs from the
/// rule is kept unless `enforce`; an option already at the rule's value is
/// not touched.
#[inline(always)]
pub fn plan(rule: &TuneRule, cur: &KaValues, enforce: bool) -> Plan {
    let mut p = Plan {
        set: 0,
        kept: 0,
        target: *cur,
    };
    let mut i = 0;
    while i < opt::ORDER.len() {
        let bit = opt::ORDER[i];
        i += 1;
        if rule.set & bit == 0 {
            continue;
        }
        let want = rule.values.get(bit);
        let have = cur.get(bit);
        if have == want {
            continue;
        }
        if have != 0 && !enforce {
            p.kept |= bit;
            continue;
        }
        p.set |= bit;
        p.target.set(bit, want);
    }
    p
}

/// What a [`TuneReport`] says happened.
pub mod report {
    /// Options set on a new connection (sock_ops) or an existing one (walk).
    pub const TUNED: u8 = 1;
    /// Would have been set (`--dry-run`); nothing changed.
    pub const DRY_RUN: u8 = 2;
    /// The rule matched but every option it sets was the application's.
    pub const APP_KEPT: u8 = 3;
    /// The application set an option we had tuned (cgroup/setsockopt);
    /// it wins and will not be restored.
    pub const APP_OVERRIDE: u8 = 4;
    /// The application set an option we had tuned; `--enforce` rewrote its
    /// value to the policy's.
    pub const ENFORCED: u8 = 5;
    /// The original values were put back.
    pub const RESTORED: u8 = 6;
    /// Over the changes-per-second cap: left for a later walk.
    pub const RATE_LIMITED: u8 = 7;
    /// A rule needs the owner's name, unknown in the kernel yet.
    pub const NEED_OWNER: u8 = 8;
}

/// Bits of [`TuneReport::flags`] and [`TuneState::flags`].
pub mod tflags {
    /// From sock_ops at connection establishment (else from a socket walk).
    pub const NEW: u8 = 1 << 0;
    /// `TuneState`: the options in `set` are ours now.
    pub const TUNED: u8 = 1 << 1;
    /// `TuneState`: a dry run reported this socket already.
    pub const SEEN: u8 = 1 << 2;
}

/// One tuning action, reported by the kernel (ring `TUNE_EVENTS` from
/// sock_ops and the setsockopt hook, rows from the tuning walk).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TuneReport {
    pub ts_ns: u64,
    pub cookie: u64,
    pub netns: u32,
    pub pid: u32,
    pub comm: [u8; TASK_COMM_LEN],
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub family: u8,
    /// [`report`] value.
    pub what: u8,
    /// [`tflags`] bits.
    pub flags: u8,
    /// 1 + rule number (0: none).
    pub rule: u8,
    /// Options changed (or that would be), kept, and that failed.
    pub set: u8,
    pub kept: u8,
    pub failed: u8,
    /// TCP state (kernel numbering).
    pub state: u8,
    /// The first `bpf_setsockopt` error (negative errno), 0 when none failed.
    pub err: i32,
    /// The socket's own values before (0: not set).
    pub old: KaValues,
    /// The socket's values after (or that would be).
    pub new: KaValues,
    /// What the namespace's sysctls make of a 0: idle, interval, count.
    pub sysctl_idle_s: u32,
    pub sysctl_intvl_s: u32,
    pub sysctl_cnt: u32,
    pub generation: u32,
}

/// Per-socket tuning state (socket storage `TUNE_SK`), freed with the
/// socket or when the map goes away.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TuneState {
    pub cookie: u64,
    /// [`tflags`] bits.
    pub flags: u8,
    /// 1 + rule number.
    pub rule: u8,
    /// Options we set and still own (an application's later set clears its bit).
    pub set: u8,
    /// Options we put back on restore: `new` holds what we put there (the
    /// sysctl's value in place of a 0) and `old` the socket's own value,
    /// so that a later walk still sees them as the application's defaults.
    pub restored: u8,
    pub generation: u32,
    /// The socket's own values before we changed them.
    pub old: KaValues,
    /// What we set.
    pub new: KaValues,
    pub _pad2: u32,
}

/// What the tuning walk does.
pub mod walk_mode {
    /// Apply the rules to every established socket not yet tuned.
    pub const APPLY: u32 = 1;
    /// Put back the original values of every socket we tuned.
    pub const RESTORE: u32 = 2;
}

/// Bits of [`TuneConfig::flags`].
pub mod cfg_flags {
    /// sock_ops applies rules to new connections.
    pub const ACTIVE: u32 = 1 << 0;
    /// Compute and report, change nothing.
    pub const DRY_RUN: u32 = 1 << 1;
    /// Apply over the application's own values, and rewrite its later ones.
    pub const ENFORCE: u32 = 1 << 2;
}

/// Runtime tuning configuration (array map `TUNE_CFG`, one entry), changed
/// by userspace while the programs run.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TuneConfig {
    pub flags: u32,
    pub n_rules: u32,
    /// [`walk_mode`] of the next walk.
    pub walk_mode: u32,
    /// Kernel ticks per second (to turn the sysctls' jiffies into seconds).
    pub hz: u32,
    /// Changes allowed per second, all sockets together.
    pub rate_cap: u32,
    /// Bumped on every policy (re)load; reported with each change.
    pub generation: u32,
}

/// Changes made in the current second (array map `TUNE_RATE`, one entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateWindow {
    pub second: u64,
    pub count: u64,
}

/// Learned TCP_KEEPIDLE for one destination (map `TUNE_ADAPT`): the remote
/// /24 (IPv4) or /64 (IPv6) and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DestKey {
    pub addr: [u8; 16],
    pub family: u8,
    pub _pad: u8,
    pub port: u16,
}

impl DestKey {
    /// The destination group `raddr` belongs to.
    #[inline(always)]
    pub fn of(family: u8, raddr: &[u8; 16], port: u16) -> DestKey {
        let mut addr = [0u8; 16];
        let n = if family == 10 { 8 } else { 3 };
        let mut i = 0;
        while i < 16 {
            if i < n {
                addr[i] = raddr[i];
            }
            i += 1;
        }
        DestKey {
            addr,
            family,
            _pad: 0,
            port,
        }
    }
}

/// Names of the tuning maps and programs.
pub mod names {
    pub const TUNE_RULES: &str = "TUNE_RULES";
    pub const TUNE_CFG: &str = "TUNE_CFG";
    pub const TUNE_EVENTS: &str = "TUNE_EVENTS";
    pub const TUNE_RATE: &str = "TUNE_RATE";
    pub const TUNE_ADAPT: &str = "TUNE_ADAPT";
    pub const TUNE_OWNERS: &str = "TUNE_OWNERS";
    pub const SOCKOPS: &str = "ka_tune_sockops";
    pub const SETSOCKOPT: &str = "ka_tune_setsockopt";
    pub const WALK: &str = "ka_tune_iter";
    /// The failure loggers the tuning programs tail-call, and their arrays.
    pub const LOG_SOCKOPS: &str = "ka_tune_log_sockops";
    pub const LOG_ITER: &str = "ka_tune_log_iter";
    pub const TUNE_LOG_SOCKOPS: &str = "TUNE_LOG_SOCKOPS";
    pub const TUNE_LOG_ITER: &str = "TUNE_LOG_ITER";
}

// The layouts both sides rely on, without implicit padding.
const _: () = {
    use core::mem::size_of;
    assert!(size_of::<KaValues>() == 20);
    assert!(size_of::<TuneRule>() == 96);
    assert!(size_of::<RuleSet>() == 96 * MAX_RULES);
    assert!(size_of::<TuneReport>() == 144);
    assert!(size_of::<TuneState>() == 64);
    assert!(size_of::<TuneConfig>() == 24);
    assert!(size_of::<DestKey>() == 20);
};

#[cfg(test)]
#[path = "tune_tests.rs"]
mod tests;
