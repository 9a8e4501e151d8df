//! Kernel side of keepalive: small, boring programs that turn TCP
//! tracepoints into [`RawEvent`]s on one ring buffer.
//!
//! Every struct offset comes from [`CONFIG`], which the daemon fills from the
//! running kernel's BTF before load. Policy (what an event means, causes,
//! verdicts) lives in userspace; the only decisions taken here are the cheap
//! filters that save ring-buffer space.
// Built for bpfel-unknown-none by keepalive-user's build.rs; on the host
// it compiles as an empty binary so `cargo clippy --workspace` checks it.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use core::ptr::read_volatile;

use aya_ebpf::{
    btf_maps::SkStorage,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        generated::{
            bpf_get_socket_cookie, bpf_jiffies64, bpf_probe_read_kernel as gen_probe_read,
            bpf_seq_write, bpf_sk_storage_get,
        },
    },
    macros::{btf_map, btf_tracepoint, map},
    maps::{LruHashMap, PerCpuArray, RingBuf},
    programs::BtfTracePointContext,
};
use keepalive_common::{
    Config, ConnStats, Owner, RawEvent, SockRecord, TimerFrame, flags, kind, sock_flags,
};

const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_TCP: u16 = 6;
const ETIMEDOUT: i32 = 110;
const TCP_SYN_SENT: u32 = 2;
const TCPHDR_SYN: u8 = 0x02;

/// Filled in by the daemon (`EbpfLoader::set_global`) before load.
#[unsafe(no_mangle)]
static CONFIG: Config = Config::zeroed();

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

/// Events that did not fit in the ring buffer, per CPU.
#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Events the programs tried to emit (after filtering), per CPU.
#[map]
static EMITTED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The owning process, stored on the socket itself (learned at connect(),
/// freed with the socket): a lookup is a pointer chase, not a hash.
#[btf_map]
static OWNERS: SkStorage<Owner> = SkStorage::new();

const BPF_SK_STORAGE_GET_F_CREATE: u64 = 1;

/// The owner stored on a trusted socket, if any.
#[inline(always)]
fn owner_of(sk: *const u8) -> Option<Owner> {
    // SAFETY: trusted socket pointer; the map pointer is the map's address.
    let p = unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&OWNERS).cast_mut().cast(),
            sk as *mut _,
            core::ptr::null_mut(),
            0,
        )
    } as *const Owner;
    if p.is_null() {
        None
    } else {
        // SAFETY: non-null storage of our value type.
        Some(unsafe { *p })
    }
}

/// Socket cookie -> counters, updated whatever the ring buffer does.
#[map]
static STATS: LruHashMap<u64, ConnStats> = LruHashMap::with_max_entries(65536, 0);

/// Scratch space for one snapshot row (too big for the BPF stack).
#[map]
static SNAP_ROW: PerCpuArray<SockRecord> = PerCpuArray::with_max_entries(1, 0);

/// The socket timer (keepalive or retransmit) running on this CPU.
#[map]
static TIMER: PerCpuArray<TimerFrame> = PerCpuArray::with_max_entries(1, 0);

/// The configuration, through a pointer the compiler cannot see through,
/// so it never folds the zeroed placeholder into the code.
#[inline(always)]
fn config() -> &'static Config {
    let p: *const Config = &raw const CONFIG;
    // SAFETY: reads back a local; the pointer is valid for 'static.
    unsafe { &*read_volatile(&p) }
}

macro_rules! cfg {
    ($($f:ident).+) => {
        config().$($f).+
    };
}

/// Reads a `T` at `base + off` from kernel memory, zero on failure.
///
/// Branchless on purpose: the helper zeroes its destination when the read
/// faults (a NULL base included), and a branch per field multiplies the
/// verifier's states. Offsets are always valid; optional fields are
/// checked by the caller.
#[inline(always)]
fn read<T: Default>(base: *const u8, off: u16) -> T {
    let mut v = T::default();
    // SAFETY: the helper tolerates any source address and writes at most
    // size_of::<T>() bytes into `v`.
    unsafe {
        gen_probe_read(
            (&raw mut v).cast(),
            core::mem::size_of::<T>() as u32,
            base.wrapping_add(off as usize).cast(),
        )
    };
    v
}

#[inline(always)]
fn wanted(k: u8) -> bool {
    cfg!(event_mask) & (1u32 << k) != 0
}

#[inline(always)]
fn bump(counter: &PerCpuArray<u64>) {
    if let Some(p) = counter.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}

/// Loads a `T` at `base + off` directly. Only for trusted BTF pointers
/// (tracepoint and iterator arguments) and fields inside the pointed-to
/// struct: the offsets come from read-only data the verifier sees as
/// constants, so it checks each access against the kernel's BTF and turns
/// it into a plain load, much cheaper than a probe-read helper call.
#[inline(always)]
fn load<T: Copy>(base: *const u8, off: u16) -> T {
    // SAFETY: see above; the verifier rejects anything else at load time.
    unsafe { read_volatile(base.wrapping_add(off as usize) as *const T) }
}

/// Copies the connection identity out of a `struct sock_common` into any
/// record with the tuple fields (events and snapshot rows), with `$read`
/// being [`load`] for trusted pointers and [`read`] otherwise.
macro_rules! fill_tuple {
    ($dst:expr, $sk:expr, $read:ident) => {{
        let sk: *const u8 = $sk;
        let family: u16 = $read(sk, cfg!(offsets.skc_family));
        $dst.family = family as u8;
        $dst.state = $read::<u8>(sk, cfg!(offsets.skc_state));
        $dst.sport = $read::<u16>(sk, cfg!(offsets.skc_num));
        $dst.dport = u16::from_be($read::<u16>(sk, cfg!(offsets.skc_dport)));
        if family == AF_INET6 {
            $dst.saddr = $read(sk, cfg!(offsets.skc_v6_rcv_saddr));
            $dst.daddr = $read(sk, cfg!(offsets.skc_v6_daddr));
        } else {
            let s: u32 = $read(sk, cfg!(offsets.skc_rcv_saddr));
            let d: u32 = $read(sk, cfg!(offsets.skc_daddr));
            $dst.saddr = [0; 16];
            $dst.daddr = [0; 16];
            $dst.saddr[..4].copy_from_slice(&s.to_ne_bytes());
            $dst.daddr[..4].copy_from_slice(&d.to_ne_bytes());
        }
        // Through a trusted socket the loaded `struct net *` is itself a
        // BTF pointer the verifier lets us load from (fault-safe).
        let net: *const u8 = $read(sk, cfg!(offsets.skc_net));
        $dst.netns = $read(net, cfg!(offsets.net_ns_inum));
    }};
}

/// Tuple of a socket reached through an untrusted pointer (timer hooks).
#[inline(always)]
fn fill_sock(ev: &mut RawEvent, sk: *const u8) {
    fill_tuple!(ev, sk, read);
}

/// Tuple of a socket passed as a trusted tracepoint argument.
#[inline(always)]
fn fill_sock_direct(ev: &mut RawEvent, sk: *const u8) {
    fill_tuple!(ev, sk, load);
}

/// True when `addr` falls in `cidr` (`prefix_len` bits equal).
#[inline(always)]
fn in_cidr(addr: &[u8; 16], family: u8, c: &keepalive_common::Cidr) -> bool {
    if c.family != family {
        return false;
    }
    let bits = c.prefix_len as usize;
    let mut i = 0;
    while i < 16 {
        let left = bits.saturating_sub(i * 8);
        if left == 0 {
            return true;
        }
        let mask: u8 = if left >= 8 {
            0xff
        } else {
            0xffu8 << (8 - left)
        };
        if (addr[i] ^ c.addr[i]) & mask != 0 {
            return false;
        }
        i += 1;
    }
    true
}

/// Kernel-side port and address filters; userspace applies the rest.
#[inline(always)]
fn passes_filters(ev: &RawEvent) -> bool {
    let ports = &config().ports;
    if ports[0] != 0 {
        let mut hit = false;
        let mut i = 0;
        while i < ports.len() {
            let p = ports[i];
            if p != 0 && (p == ev.sport || p == ev.dport) {
                hit = true;
            }
            i += 1;
        }
        if !hit {
            return false;
        }
    }
    let n = cfg!(n_cidrs) as usize;
    if n != 0 {
        let cidrs = &config().cidrs;
        let mut hit = false;
        let mut i = 0;
        while i < cidrs.len() {
            if i < n
                && (in_cidr(&ev.saddr, ev.family, &cidrs[i])
                    || in_cidr(&ev.daddr, ev.family, &cidrs[i]))
            {
                hit = true;
            }
            i += 1;
        }
        if !hit {
            return false;
        }
    }
    true
}

/// Adds the owner learned at connect time (for trusted sockets; the
/// timer hooks cannot reach socket storage and leave it to userspace),
/// then filters and submits.
#[inline(always)]
fn emit(ev: &mut RawEvent, trusted_sk: *const u8) {
    if !passes_filters(ev) {
        return;
    }
    if !trusted_sk.is_null()
        && let Some(o) = owner_of(trusted_sk)
    {
        ev.pid = o.pid;
        ev.comm = o.comm;
    }
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    bump(&EMITTED);
    match EVENTS.reserve::<RawEvent>(0) {
        Some(mut slot) => {
            slot.write(*ev);
            // A wakeup per event costs an IPI; wake the reader only when
            // enough has piled up (it polls on a timer for the rest).
            // Only the record that crosses the threshold wakes it, so a
            // lagging reader is not woken once per event.
            let avail = EVENTS.query(BPF_RB_AVAIL_DATA);
            let threshold = cfg!(wakeup_bytes) as u64;
            let size = (core::mem::size_of::<RawEvent>() + 8) as u64;
            let flags = if avail >= threshold && avail < threshold + size {
                BPF_RB_FORCE_WAKEUP
            } else {
                BPF_RB_NO_WAKEUP
            };
            slot.submit(flags);
        }
        None => bump(&DROPS),
    }
}

/// Applies `f` to the counters of connection `cookie`, creating them.
#[inline(always)]
fn count(cookie: u64, f: impl FnOnce(&mut ConnStats)) {
    if cookie == 0 {
        return;
    }
    let mut p = STATS.get_ptr_mut(cookie);
    if p.is_none() {
        let _ = STATS.insert(cookie, ConnStats::default(), 0);
        p = STATS.get_ptr_mut(cookie);
    }
    if let Some(p) = p {
        // SAFETY: map value pointer; concurrent updates of one connection
        // are serialised by the socket lock the hooks run under.
        f(unsafe { &mut *p });
    }
}

#[inline(always)]
fn cookie_of(sk: *const u8) -> u64 {
    // SAFETY: `sk` is a trusted BTF pointer from the tracepoint arguments.
    unsafe { bpf_get_socket_cookie(sk as *mut _) }
}

#[inline(always)]
fn protocol(sk: *const u8) -> u16 {
    if cfg!(offsets.sk_protocol_size) == 1 {
        load::<u8>(sk, cfg!(offsets.sk_protocol)) as u16
    } else {
        load::<u16>(sk, cfg!(offsets.sk_protocol))
    }
}

/// Which socket timer is running on this CPU for `sk`, as event flags.
#[inline(always)]
fn timer_flags(sk: *const u8) -> u8 {
    match TIMER.get(0) {
        Some(f) if f.sk == sk as u64 => f.which as u8,
        _ => 0,
    }
}

// tcp_retransmit_skb(const struct sock *sk, const struct sk_buff *skb[, int err])
#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn ka_retransmit(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    let skb: *const u8 = ctx.arg(1);
    if sk.is_null() {
        return 0;
    }
    let mut ev = RawEvent {
        kind: kind::RETRANSMIT,
        cookie: cookie_of(sk),
        ..RawEvent::default()
    };
    let cb = cfg!(offsets.skb_cb);
    if cb != u16::MAX && !skb.is_null() {
        let tcb = skb.wrapping_add(cb as usize);
        ev.a = read::<u16>(tcb, cfg!(offsets.tcb_gso_segs)) as u32;
        if read::<u8>(tcb, cfg!(offsets.tcb_tcp_flags)) & TCPHDR_SYN != 0 {
            ev.flags |= flags::SYN;
        }
    }
    if cfg!(retransmit_has_err) != 0 {
        let err: i64 = ctx.arg(2);
        ev.b = err as i32 as u32;
    }
    if ev.b == 0 {
        let segs = ev.a;
        count(ev.cookie, |s| s.retransmit_segs += segs);
    }
    if !wanted(kind::RETRANSMIT) {
        return 0;
    }
    fill_sock_direct(&mut ev, sk);
    ev.flags |= timer_flags(sk);
    emit(&mut ev, sk);
    0
}

/// Fills the tuple of a reset sent without a socket from the packet it answers.
#[inline(always)]
fn fill_from_skb(ev: &mut RawEvent, skb: *const u8) {
    let head: u64 = read(skb, cfg!(offsets.skb_head));
    let nh: u16 = read(skb, cfg!(offsets.skb_network_header));
    let th: u16 = read(skb, cfg!(offsets.skb_transport_header));
    let ip = (head as *const u8).wrapping_add(nh as usize);
    let tcp = (head as *const u8).wrapping_add(th as usize);
    let ver: u8 = read(ip, 0);
    // The reset travels back: our source is the packet's destination.
    if ver >> 4 == 6 {
        ev.family = AF_INET6 as u8;
        ev.daddr = read(ip, 8);
        ev.saddr = read(ip, 24);
    } else {
        ev.family = AF_INET as u8;
        let s: [u8; 4] = read(ip, 12);
        let d: [u8; 4] = read(ip, 16);
        ev.daddr[..4].copy_from_slice(&s);
        ev.saddr[..4].copy_from_slice(&d);
    }
    ev.dport = u16::from_be(read::<u16>(tcp, 0));
    ev.sport = u16::from_be(read::<u16>(tcp, 2));
    let dev: u64 = read(skb, cfg!(offsets.skb_dev));
    let net: u64 = read(dev as *const u8, cfg!(offsets.dev_nd_net));
    ev.netns = read(net as *const u8, cfg!(offsets.net_ns_inum));
}

// tcp_send_reset(const struct sock *sk, const struct sk_buff *skb[, enum sk_rst_reason reason])
#[btf_tracepoint(function = "tcp_send_reset")]
pub fn ka_reset_sent(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    let cookie = if sk.is_null() { 0 } else { cookie_of(sk) };
    count(cookie, |s| s.resets_sent += 1);
    if !wanted(kind::RESET_SENT) {
        return 0;
    }
    let skb: *const u8 = ctx.arg(1);
    let mut ev = RawEvent {
        kind: kind::RESET_SENT,
        ..RawEvent::default()
    };
    if !sk.is_null() {
        ev.cookie = cookie;
        fill_sock_direct(&mut ev, sk);
        ev.flags |= timer_flags(sk);
    } else if !skb.is_null() {
        ev.flags |= flags::NO_SOCKET;
        fill_from_skb(&mut ev, skb);
    } else {
        return 0;
    }
    if cfg!(reset_has_reason) != 0 {
        let reason: u64 = ctx.arg(2);
        ev.b = reason as u32;
        ev.flags |= flags::HAS_REASON;
    }
    emit(&mut ev, sk);
    0
}

// tcp_receive_reset(struct sock *sk)
#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn ka_reset_received(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    if sk.is_null() {
        return 0;
    }
    let cookie = cookie_of(sk);
    count(cookie, |s| s.resets_received += 1);
    if !wanted(kind::RESET_RECEIVED) {
        return 0;
    }
    let mut ev = RawEvent {
        kind: kind::RESET_RECEIVED,
        cookie,
        ..RawEvent::default()
    };
    fill_sock_direct(&mut ev, sk);
    emit(&mut ev, sk);
    0
}

// inet_sock_set_state(const struct sock *sk, const int oldstate, const int newstate)
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn ka_state(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    if sk.is_null() || protocol(sk) != IPPROTO_TCP {
        return 0;
    }
    let old: u64 = ctx.arg(1);
    let new: u64 = ctx.arg(2);
    // Generating the cookie here also makes it readable later from
    // contexts that cannot call the helper (the timer tracepoints).
    let cookie = cookie_of(sk);
    if new as u32 == TCP_SYN_SENT {
        // connect(): the only transition that runs in the owner's context.
        let owner = Owner {
            pid: (bpf_get_current_pid_tgid() >> 32) as u32,
            _pad: 0,
            comm: bpf_get_current_comm().unwrap_or_default(),
        };
        // SAFETY: trusted socket pointer; `owner` is copied into the storage.
        unsafe {
            bpf_sk_storage_get(
                core::ptr::from_ref(&OWNERS).cast_mut().cast(),
                sk as *mut _,
                (&raw const owner).cast_mut().cast(),
                BPF_SK_STORAGE_GET_F_CREATE,
            )
        };
    }
    if wanted(kind::STATE_CHANGE) {
        let mut ev = RawEvent {
            kind: kind::STATE_CHANGE,
            cookie,
            a: old as u32,
            b: new as u32,
            ..RawEvent::default()
        };
        fill_sock_direct(&mut ev, sk);
        emit(&mut ev, sk);
    }
    // The owner lives as long as the socket, so a timeout reported after
    // CLOSE still carries it.
    0
}

// inet_sk_error_report(const struct sock *sk)
#[btf_tracepoint(function = "inet_sk_error_report")]
pub fn ka_error(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    if sk.is_null() || protocol(sk) != IPPROTO_TCP {
        return 0;
    }
    let err: i32 = load(sk, cfg!(offsets.sk_err));
    if err != ETIMEDOUT {
        return 0;
    }
    let cookie = cookie_of(sk);
    count(cookie, |s| s.timeouts += 1);
    if !wanted(kind::TIMEOUT) {
        return 0;
    }
    let mut ev = RawEvent {
        kind: kind::TIMEOUT,
        cookie,
        a: err as u32,
        b: read::<u32>(sk, cfg!(offsets.icsk_user_timeout)),
        c: read::<u8>(sk, cfg!(offsets.icsk_probes_out)) as u32,
        ..RawEvent::default()
    };
    fill_sock_direct(&mut ev, sk);
    ev.flags |= timer_flags(sk);
    emit(&mut ev, sk);
    0
}

// timer_expire_entry(struct timer_list *timer, unsigned long baseclk)
#[btf_tracepoint(function = "timer_expire_entry")]
pub fn ka_timer_entry(ctx: BtfTracePointContext) -> i32 {
    let timer: *const u8 = ctx.arg(0);
    let func: u64 = read(timer, cfg!(offsets.timer_function));
    let (which, sk) = if func == cfg!(keepalive_timer_fn) && func != 0 {
        (
            flags::IN_KEEPALIVE_TIMER,
            timer.wrapping_sub(cfg!(offsets.sk_timer) as usize),
        )
    } else if func == cfg!(write_timer_fn) && func != 0 {
        (
            flags::IN_WRITE_TIMER,
            timer.wrapping_sub(cfg!(offsets.icsk_retransmit_timer) as usize),
        )
    } else {
        return 0;
    };
    if let Some(f) = TIMER.get_ptr_mut(0) {
        // SAFETY: per-CPU slot; timer callbacks do not nest on one CPU.
        unsafe {
            (*f).timer = timer as u64;
            (*f).sk = sk as u64;
            (*f).which = which as u32;
            (*f).probes_before = read::<u8>(sk, cfg!(offsets.icsk_probes_out)) as u32;
        }
    }
    0
}

// timer_expire_exit(struct timer_list *timer)
#[btf_tracepoint(function = "timer_expire_exit")]
pub fn ka_timer_exit(ctx: BtfTracePointContext) -> i32 {
    let timer: *const u8 = ctx.arg(0);
    let Some(f) = TIMER.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU slot, see ka_timer_entry.
    let frame = unsafe { *f };
    if frame.timer != timer as u64 || frame.which == 0 {
        return 0;
    }
    unsafe { (*f).which = 0 };
    if frame.which != flags::IN_KEEPALIVE_TIMER as u32 {
        return 0;
    }
    let sk = frame.sk as *const u8;
    // tcp_keepalive_timer increments icsk_probes_out exactly when it sends
    // a probe, so a rise across the callback is one probe on the wire.
    let after = read::<u8>(sk, cfg!(offsets.icsk_probes_out)) as u32;
    if after <= frame.probes_before {
        return 0;
    }
    let cookie: u64 = read(sk, cfg!(offsets.skc_cookie));
    count(cookie, |s| {
        s.probes += 1;
        s.last_probe = after;
    });
    if !wanted(kind::KEEPALIVE_PROBE) {
        return 0;
    }
    let mut ev = RawEvent {
        kind: kind::KEEPALIVE_PROBE,
        cookie,
        a: after,
        c: after,
        flags: flags::IN_KEEPALIVE_TIMER,
        ..RawEvent::default()
    };
    fill_sock(&mut ev, sk);
    emit(&mut ev, core::ptr::null());
    0
}

/// Context of an `iter/tcp` program (`struct bpf_iter__tcp`).
#[repr(C)]
pub struct IterTcpCtx {
    meta: *const u8,
    sk_common: *const u8,
    uid: u32,
}

const TCP_FIN_WAIT2: u8 = 5;
const TCP_TIME_WAIT: u8 = 6;
const TCP_LISTEN: u8 = 10;
const TCP_NEW_SYN_RECV: u8 = 12;

/// Walks every TCP socket of the opening thread's namespace and writes one
/// [`SockRecord`] per socket. Asking for each cookie also makes the kernel
/// assign one, so sockets opened before the monitor keep their real cookie
/// in the timer tracepoints.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
extern "C" fn ka_iter_tcp(ctx: *mut IterTcpCtx) -> i32 {
    // SAFETY: the kernel passes a valid context.
    let (meta, sk) = unsafe { ((*ctx).meta, (*ctx).sk_common) };
    if sk.is_null() || meta.is_null() {
        return 0;
    }
    let Some(r) = SNAP_ROW.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU scratch slot, used only here (iterators do not nest).
    let r = unsafe { &mut *r };
    r.cookie = cookie_of(sk);
    // SAFETY: helpers without arguments.
    r.now_jiffies = unsafe { bpf_jiffies64() };
    r.now_ns = unsafe { bpf_ktime_get_ns() };
    fill_tuple!(r, sk, load);
    // TIME_WAIT and request sockets are smaller structs: their TCP fields
    // read as garbage (safely); userspace ignores them without FULL.
    fill_full(r, sk);
    if r.state == TCP_TIME_WAIT {
        // An orphan that reaches FIN_WAIT2 with the default tcp_fin_timeout
        // becomes a timewait minisock that still waits for the peer's FIN.
        let sub: u8 = read(sk, config().snap.tw_substate);
        r.flags = 0;
        if sub == TCP_FIN_WAIT2 {
            r.state = TCP_FIN_WAIT2;
            r.flags = sock_flags::ORPHAN;
        }
    } else if r.state == TCP_NEW_SYN_RECV {
        r.flags = 0;
    }
    // SAFETY: meta is the trusted iterator metadata; seq is its first field.
    let seq = unsafe { *(meta as *const *mut core::ffi::c_void) };
    // SAFETY: r is a map value valid for the call.
    unsafe {
        bpf_seq_write(
            seq as *mut _,
            (r as *const SockRecord).cast(),
            core::mem::size_of::<SockRecord>() as u32,
        )
    };
    0
}

/// The `struct sock` / `tcp_sock` part of a snapshot row.
#[inline(always)]
fn fill_full(r: &mut SockRecord, sk: *const u8) {
    let o = &config().snap;
    let skflags: u64 = read(sk, o.sk_flags);
    let keepalive = ((skflags >> (o.sock_keepopen_bit & 63)) & 1) as u8;
    let socket: u64 = read(sk, o.sk_socket);
    let orphan = (socket == 0) as u8;
    r.ino = if o.sk_ino != u16::MAX {
        read(sk, o.sk_ino)
    } else {
        read(socket as *const u8, o.socket_to_ino)
    };
    let sk_timer = sk.wrapping_add(cfg!(offsets.sk_timer) as usize);
    let pending = (read::<u64>(sk_timer, o.timer_pprev) != 0) as u8;
    r.flags = sock_flags::FULL
        | (keepalive * sock_flags::KEEPALIVE)
        | (orphan * sock_flags::ORPHAN)
        | (pending * sock_flags::SK_TIMER_PENDING);
    r.sk_timer_expires = read(sk_timer, o.timer_expires);
    let rtx = sk.wrapping_add(cfg!(offsets.icsk_retransmit_timer) as usize);
    r.rtx_expires = read(rtx, o.timer_expires);
    r.retransmits = read(sk, o.icsk_retransmits);
    r.backoff = read(sk, o.icsk_backoff);
    r.probes_out = read(sk, cfg!(offsets.icsk_probes_out));
    r.rto_jiffies = read(sk, o.icsk_rto);
    r.lrcvtime = read(sk, o.icsk_lrcvtime);
    r.user_timeout_ms = read(sk, cfg!(offsets.icsk_user_timeout));
    r.keepalive_time = read(sk, o.tp_keepalive_time);
    r.keepalive_intvl = read(sk, o.tp_keepalive_intvl);
    r.keepalive_probes = read(sk, o.tp_keepalive_probes);
    r.total_retrans = read(sk, o.tp_total_retrans);
    r.lsndtime = read(sk, o.tp_lsndtime);
    r.rcv_tstamp = read(sk, o.tp_rcv_tstamp);
    if r.state == TCP_LISTEN {
        r.recv_queue = read(sk, o.sk_ack_backlog);
        r.send_queue = read(sk, o.sk_max_ack_backlog);
    } else {
        let rcv_nxt: u32 = read(sk, o.tp_rcv_nxt);
        let copied: u32 = read(sk, o.tp_copied_seq);
        let write_seq: u32 = read(sk, o.tp_write_seq);
        let snd_una: u32 = read(sk, o.tp_snd_una);
        r.recv_queue = rcv_nxt.wrapping_sub(copied);
        r.send_queue = write_seq.wrapping_sub(snd_una);
    }
    r.pending = read(sk, o.icsk_pending);
    let net: u64 = read(sk, cfg!(offsets.skc_net));
    let net = net as *const u8;
    r.net_keepalive_time = read(net, o.net_keepalive_time);
    r.net_keepalive_intvl = read(net, o.net_keepalive_intvl);
    r.net_keepalive_probes = read(net, o.net_keepalive_probes);
    r.net_retries2 = read(net, o.net_retries2);
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
