//! Tuning: the maps of `keepalive tune` and the one routine that decides
//! and applies a policy rule to a socket, shared by the sock_ops program
//! (new connections) and the tuning walk (existing ones).
//!
//! The decisions are keepalive-common's pure [`first_match`] and [`plan`];
//! this file only gathers what they need from the socket and carries out
//! the result with `bpf_setsockopt`.

use core::ffi::c_void;

use aya_ebpf::{
    btf_maps::SkStorage,
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_loop, bpf_setsockopt, bpf_sk_storage_get},
    },
    macros::{btf_map, map},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};
use keepalive_common::{
    TASK_COMM_LEN, TuneOffsets,
    tune::{
        DestKey, KaValues, MAX_RULES, Match, RateWindow, RuleSet, SockKey, TuneConfig, TuneReport,
        TuneState, cfg_flags, crit, opt, plan, report, rule_match, tflags,
    },
};

use crate::maps::{config, owner_of};
use crate::mem::{AF_INET, AF_INET6, read};

/// The compiled policy.
#[map]
pub static TUNE_RULES: Array<RuleSet> = Array::with_max_entries(1, 0);

/// Runtime switches (active, dry run, enforce, walk mode, rate cap).
#[map]
pub static TUNE_CFG: Array<TuneConfig> = Array::with_max_entries(1, 0);

/// Reports from sock_ops and the setsockopt hook.
#[map]
pub static TUNE_EVENTS: RingBuf = RingBuf::with_byte_size(1 << 18, 0);

/// Changes made in the current second, all CPUs together.
#[map]
static TUNE_RATE: Array<RateWindow> = Array::with_max_entries(1, 0);

/// Learned TCP_KEEPIDLE (seconds) per destination, for adaptive rules.
#[map]
static TUNE_ADAPT: HashMap<DestKey, u32> = HashMap::with_max_entries(4096, 0);

/// Owners userspace found in /proc for sockets the kernel has none for
/// (opened before the monitor, or accepted): cookie -> command name.
#[map]
static TUNE_OWNERS: HashMap<u64, [u8; TASK_COMM_LEN]> = HashMap::with_max_entries(16384, 0);

/// What we did to a socket, kept on the socket (freed with it, or when
/// the map goes away with the last program using it).
#[btf_map]
static TUNE_SK: SkStorage<TuneState> = SkStorage::new();

/// Scratch report (too big for the BPF stack next to everything else).
#[map]
pub(crate) static TUNE_ROW: PerCpuArray<TuneReport> = PerCpuArray::with_max_entries(1, 0);

const BPF_SK_STORAGE_GET_F_CREATE: u64 = 1;
pub const SOL_SOCKET: i32 = 1;
pub const SO_KEEPALIVE: i32 = 9;
pub const IPPROTO_TCP: i32 = 6;
pub const TCP_KEEPIDLE: i32 = 4;
pub const TCP_KEEPINTVL: i32 = 5;
pub const TCP_KEEPCNT: i32 = 6;
pub const TCP_USER_TIMEOUT: i32 = 18;

/// The level and name of the socket option behind an [`opt`] bit.
#[inline(always)]
fn sockopt_of(bit: u8) -> (i32, i32) {
    match bit {
        opt::KEEPALIVE => (SOL_SOCKET, SO_KEEPALIVE),
        opt::IDLE => (IPPROTO_TCP, TCP_KEEPIDLE),
        opt::INTVL => (IPPROTO_TCP, TCP_KEEPINTVL),
        opt::CNT => (IPPROTO_TCP, TCP_KEEPCNT),
        _ => (IPPROTO_TCP, TCP_USER_TIMEOUT),
    }
}

/// The [`opt`] bit of a socket option, 0 for the ones we do not tune.
#[inline(always)]
pub fn bit_of(level: i32, name: i32) -> u8 {
    match (level, name) {
        (SOL_SOCKET, SO_KEEPALIVE) => opt::KEEPALIVE,
        (IPPROTO_TCP, TCP_KEEPIDLE) => opt::IDLE,
        (IPPROTO_TCP, TCP_KEEPINTVL) => opt::INTVL,
        (IPPROTO_TCP, TCP_KEEPCNT) => opt::CNT,
        (IPPROTO_TCP, TCP_USER_TIMEOUT) => opt::USER_TIMEOUT,
        _ => 0,
    }
}

#[inline(always)]
pub fn tune_config() -> Option<&'static TuneConfig> {
    TUNE_CFG.get(0)
}

/// The socket's tuning state, created when `create`.
#[inline(always)]
pub fn state_of(sk: *const u8, create: bool) -> Option<&'static mut TuneState> {
    let init = TuneState::default();
    // SAFETY: `sk` is a socket pointer the verifier accepts for socket
    // storage; the map pointer is the map's address.
    let p = unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&TUNE_SK).cast_mut().cast(),
            sk as *mut _,
            if create {
                (&raw const init).cast_mut().cast()
            } else {
                core::ptr::null_mut()
            },
            if create {
                BPF_SK_STORAGE_GET_F_CREATE
            } else {
                0
            },
        )
    } as *mut TuneState;
    if p.is_null() {
        None
    } else {
        // SAFETY: non-null storage of our value type.
        Some(unsafe { &mut *p })
    }
}

/// The scratch report of this CPU, zeroed.
#[inline(always)]
pub fn scratch() -> Option<&'static mut TuneReport> {
    let p = TUNE_ROW.get_ptr_mut(0)?;
    // SAFETY: per-CPU slot; programs using it do not nest on one CPU.
    let r = unsafe { &mut *p };
    *r = TuneReport::default();
    Some(r)
}

/// Writes a report to the ring (sock_ops, setsockopt hook).
#[inline(always)]
pub fn submit(r: &TuneReport) {
    let _ = TUNE_EVENTS.output::<TuneReport>(r, 0);
}

/// Kernfs id of the socket's cgroup ancestor at `level` (0 when the
/// socket's cgroup is not that deep or the kernel lacks the fields).
#[inline(always)]
fn cgroup_at(sk: *const u8, level: u32) -> u64 {
    let o: &TuneOffsets = &config().tune;
    if o.sk_cgroup == u16::MAX || o.cgroup_ancestors == u16::MAX {
        return 0;
    }
    let cg: u64 = read(sk, o.sk_cgroup);
    let cg = cg as *const u8;
    let depth: i32 = read(cg, o.cgroup_level);
    if level as i32 > depth || level > 64 {
        return 0;
    }
    let slot = cg.wrapping_add(o.cgroup_ancestors as usize + 8 * level as usize);
    let anc: u64 = read(slot, 0);
    let kn: u64 = read(anc as *const u8, o.cgroup_kn);
    read(kn as *const u8, o.kernfs_id)
}

/// What the rule loop's callback works on, on the caller's stack.
struct RuleLoop {
    key: SockKey,
    /// The socket (for its cgroup), as an address.
    sk: u64,
    n_rules: u32,
    found: Match,
}

/// One turn of the rule loop: rule `i` against the socket; stops the loop
/// (returns 1) at the first rule that decides.
extern "C" fn rule_turn(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `RuleLoop` that `first_match_looped` handed to
    // bpf_loop, which passes it back unchanged.
    let l = unsafe { &mut *ctx.cast::<RuleLoop>() };
    let i = i as u32;
    if i >= l.n_rules || i as usize >= MAX_RULES {
        return 1;
    }
    let Some(rules) = TUNE_RULES.get(0) else {
        return 1;
    };
    let sk = l.sk as *const u8;
    match rule_match(i, &rules.rules[i as usize], &l.key, |level| {
        cgroup_at(sk, level)
    }) {
        Match::None => 0,
        found => {
            l.found = found;
            1
        }
    }
}

/// keepalive-common's `first_match`, as a `bpf_loop`: the verifier checks
/// the body once instead of sixteen unrolled copies of it (that was most
/// of a second of load time per tuning program).
#[inline(always)]
fn first_match_looped(key: SockKey, sk: *const u8, n_rules: u32) -> Match {
    let mut l = RuleLoop {
        key,
        sk: sk as u64,
        n_rules,
        found: Match::None,
    };
    // SAFETY: a static function of the callback's type and a pointer to
    // our own stack, valid for the call.
    unsafe {
        bpf_loop(
            MAX_RULES as u32,
            rule_turn as *const () as *mut c_void,
            (&raw mut l).cast(),
            0,
        )
    };
    l.found
}

/// The socket's own keepalive values (0: not set on the socket).
#[inline(always)]
fn current(sk: *const u8, hz: u32) -> KaValues {
    let o = &config().snap;
    let flags: u64 = read(sk, o.sk_flags);
    let hz = if hz == 0 { 1 } else { hz };
    KaValues {
        keepalive: ((flags >> (o.sock_keepopen_bit & 63)) & 1) as u32,
        idle_s: read::<u32>(sk, o.tp_keepalive_time) / hz,
        intvl_s: read::<u32>(sk, o.tp_keepalive_intvl) / hz,
        cnt: read::<u8>(sk, o.tp_keepalive_probes) as u32,
        user_timeout_ms: read(sk, conf!(offsets.icsk_user_timeout)),
    }
}

/// The namespace's keepalive sysctls: idle (s), interval (s), count.
#[inline(always)]
fn sysctls(sk: *const u8, hz: u32) -> (u32, u32, u32) {
    let o = &config().snap;
    let net: u64 = read(sk, conf!(offsets.skc_net));
    let net = net as *const u8;
    let hz = if hz == 0 { 1 } else { hz };
    (
        read::<u32>(net, o.net_keepalive_time) / hz,
        read::<u32>(net, o.net_keepalive_intvl) / hz,
        read::<u8>(net, o.net_keepalive_probes) as u32,
    )
}

/// One more change this second, unless the cap is reached. Counted
/// without atomics: two CPUs racing may let a change or two past the cap.
#[inline(always)]
fn rate_ok(cap: u32) -> bool {
    if cap == 0 {
        return true;
    }
    let Some(w) = TUNE_RATE.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: helper without arguments.
    let second = unsafe { bpf_ktime_get_ns() } / 1_000_000_000;
    // SAFETY: map value pointer (see above for the race).
    unsafe {
        if (*w).second != second {
            (*w).second = second;
            (*w).count = 0;
        }
        if (*w).count >= cap as u64 {
            return false;
        }
        (*w).count += 1;
    }
    true
}

/// Sets each option of `bits` to its value in `v` on `target` (the
/// sock_ops context or a socket the walk holds locked), in the order that
/// arms the keepalive timer last. Returns the failed bits and first error.
#[inline(always)]
pub fn apply(target: *mut c_void, bits: u8, v: &KaValues) -> (u8, i32) {
    let mut failed = 0u8;
    let mut err = 0i32;
    let mut i = 0;
    while i < opt::ORDER.len() {
        let bit = opt::ORDER[i];
        i += 1;
        if bits & bit == 0 {
            continue;
        }
        let (level, name) = sockopt_of(bit);
        let mut val: i32 = v.get(bit) as i32;
        // SAFETY: `target` is what this program type passes to the
        // helper; `val` is an int the helper reads.
        let r = unsafe { bpf_setsockopt(target, level, name, (&raw mut val).cast(), 4) };
        if r != 0 {
            failed |= bit;
            if err == 0 {
                err = r as i32;
            }
        }
    }
    (failed, err)
}

/// Fills the identity of `sk` (tuple, namespace, cookie, owner) into `r`.
#[inline(always)]
pub fn identify(r: &mut TuneReport, sk: *const u8, cookie: u64) {
    fill_tuple!(r, sk, read);
    r.cookie = cookie;
    if let Some(o) = owner_of(sk) {
        r.pid = o.pid;
        r.comm = o.comm;
    // SAFETY: read-only lookup of a plain value.
    } else if let Some(c) = unsafe { TUNE_OWNERS.get(cookie) } {
        r.comm = *c;
    }
}

/// Decides and (unless a dry run) applies the policy to an established
/// socket not yet handled. `sk` is a trusted `tcp_sock`; `target` is what
/// `bpf_setsockopt` takes in this program type. Fills `r` and returns
/// true when there is something to report.
#[inline(always)]
pub fn tune_socket(
    r: &mut TuneReport,
    sk: *const u8,
    target: *mut c_void,
    cookie: u64,
    cfg: &TuneConfig,
    rules: &RuleSet,
) -> bool {
    let mut restored = None;
    if let Some(st) = state_of(sk, false) {
        if st.flags & (tflags::TUNED | tflags::SEEN) != 0 {
            return false;
        }
        if st.restored != 0 {
            restored = Some((st.restored, st.new, st.old));
        }
    }
    identify(r, sk, cookie);
    let mut raddr = r.daddr;
    let mut family = r.family;
    // An IPv4 peer of an IPv6 socket (::ffff:a.b.c.d) matches IPv4 rules.
    if family as u16 == AF_INET6
        && raddr[..10] == [0u8; 10]
        && raddr[10] == 0xff
        && raddr[11] == 0xff
    {
        family = AF_INET as u8;
        let v4 = [raddr[12], raddr[13], raddr[14], raddr[15]];
        raddr = [0; 16];
        raddr[..4].copy_from_slice(&v4);
    }
    let key = SockKey {
        family,
        lport: r.sport,
        rport: r.dport,
        raddr,
        comm: if r.comm[0] != 0 { Some(r.comm) } else { None },
    };
    let idx = match first_match_looped(key, sk, cfg.n_rules) {
        Match::None => return false,
        Match::NeedOwner(i) => {
            r.what = report::NEED_OWNER;
            r.rule = i as u8 + 1;
            return true;
        }
        Match::Rule(i) => i,
    };
    if idx as usize >= rules.rules.len() {
        return false;
    }
    let mut rule = rules.rules[idx as usize];
    if rule.criteria & crit::ADAPTIVE != 0 {
        let dest = DestKey::of(family, &raddr, r.dport);
        // SAFETY: read-only lookup of a plain value.
        if let Some(idle) = unsafe { TUNE_ADAPT.get(dest) } {
            rule.values.idle_s = *idle;
        }
    }
    r.rule = idx as u8 + 1;
    r.generation = cfg.generation;
    let mut cur = current(sk, cfg.hz);
    // What we put back on an earlier restore is still the socket's default.
    if let Some((bits, put, orig)) = restored {
        let mut i = 0;
        while i < opt::ORDER.len() {
            let bit = opt::ORDER[i];
            i += 1;
            if bits & bit != 0 && cur.get(bit) == put.get(bit) {
                cur.set(bit, orig.get(bit));
            }
        }
    }
    (r.sysctl_idle_s, r.sysctl_intvl_s, r.sysctl_cnt) = sysctls(sk, cfg.hz);
    let p = plan(&rule, &cur, cfg.flags & cfg_flags::ENFORCE != 0);
    r.old = cur;
    r.new = p.target;
    r.set = p.set;
    r.kept = p.kept;
    if p.set == 0 {
        // Nothing to change: say so once if the application's values won.
        if let Some(st) = state_of(sk, true) {
            st.cookie = cookie;
            st.flags = tflags::SEEN;
            st.rule = r.rule;
        }
        r.what = report::APP_KEPT;
        return p.kept != 0;
    }
    if !rate_ok(cfg.rate_cap) {
        r.what = report::RATE_LIMITED;
        return true;
    }
    let Some(st) = state_of(sk, true) else {
        // No memory for the state: changing it now could not be undone.
        r.what = report::TUNED;
        r.failed = p.set;
        r.err = -12;
        return true;
    };
    st.cookie = cookie;
    st.rule = r.rule;
    st.generation = cfg.generation;
    st.restored = 0;
    st.old = cur;
    st.new = p.target;
    if cfg.flags & cfg_flags::DRY_RUN != 0 {
        st.flags = tflags::SEEN;
        st.set = 0;
        r.what = report::DRY_RUN;
        return true;
    }
    let (failed, err) = apply(target, p.set, &p.target);
    st.flags = tflags::TUNED;
    st.set = p.set & !failed;
    r.what = report::TUNED;
    r.failed = failed;
    r.err = err;
    if failed != 0 {
        // What failed stayed as it was.
        let mut i = 0;
        while i < opt::ORDER.len() {
            let bit = opt::ORDER[i];
            i += 1;
            if failed & bit != 0 {
                r.new.set(bit, cur.get(bit));
                st.new.set(bit, cur.get(bit));
            }
        }
    }
    true
}

/// Puts back the original values of a socket we tuned (the options still
/// ours). A 0 ("use the sysctl") cannot be set with setsockopt, so idle,
/// interval and count that were 0 get the sysctl's current value.
#[inline(always)]
pub fn restore_socket(
    r: &mut TuneReport,
    sk: *const u8,
    target: *mut c_void,
    cookie: u64,
    cfg: &TuneConfig,
) -> bool {
    let Some(st) = state_of(sk, false) else {
        return false;
    };
    if st.flags & tflags::TUNED == 0 || st.set == 0 {
        st.flags = 0;
        return false;
    }
    identify(r, sk, cookie);
    let (idle, intvl, cnt) = sysctls(sk, cfg.hz);
    (r.sysctl_idle_s, r.sysctl_intvl_s, r.sysctl_cnt) = (idle, intvl, cnt);
    let mut back = st.old;
    if back.idle_s == 0 {
        back.idle_s = idle;
    }
    if back.intvl_s == 0 {
        back.intvl_s = intvl;
    }
    if back.cnt == 0 {
        back.cnt = cnt;
    }
    let bits = st.set;
    let (failed, err) = apply(target, bits, &back);
    r.what = report::RESTORED;
    r.rule = st.rule;
    r.generation = st.generation;
    r.set = bits;
    r.failed = failed;
    r.err = err;
    r.old = st.new;
    r.new = st.old;
    st.flags = 0;
    st.set = 0;
    st.restored = bits & !failed;
    st.new = back;
    true
}

/// Current time for reports.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}
