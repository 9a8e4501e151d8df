//! Timer tracepoints around the socket timers: which socket timer runs on
//! this CPU (so TCP events can say "inside the keepalive timer"), and the
//! keepalive probes the keepalive timer sends.
//!
//! The socket is reached from the `timer_list` by a known offset, so it is
//! untrusted here: fields are read with the probe-read helper and socket
//! storage is out of reach.

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use keepalive_common::{flags, kind};

use keepalive_common::Offsets;

use crate::emit::emit_head;
use crate::maps::{TIMER, count, this_cpu_offset, wanted};
use crate::mem::{fill_sock, load, read};

/// Which socket timer is running on this CPU for `sk`, as event flags.
#[inline(always)]
pub fn timer_flags(sk: *const u8) -> u8 {
    match TIMER.get(0) {
        Some(f) if f.sk == sk as u64 => f.which as u8,
        _ => 0,
    }
}

/// Whether `func` is one of the socket timers we follow, and which.
///
/// Both hooks run for every timer of the system, nearly all of them not
/// TCP's: this test reads the timer (just read by the kernel) and one
/// cache line of the configuration (keepalive-common keeps the three
/// fields together), so the common miss touches no map.
#[inline(always)]
fn socket_timer(func: u64) -> u8 {
    if func == 0 {
        0
    } else if func == conf!(keepalive_timer_fn) {
        flags::IN_KEEPALIVE_TIMER
    } else if func == conf!(write_timer_fn) {
        flags::IN_WRITE_TIMER
    } else {
        0
    }
}

// TP_PROTO(struct timer_list *timer, unsigned long baseclk)
#[btf_tracepoint(function = "timer_expire_entry")]
pub fn ka_timer_entry(ctx: BtfTracePointContext) -> i32 {
    let timer: *const u8 = ctx.arg(0);
    // A plain load (the argument is a trusted `struct timer_list *`), no
    // helper call, for the common miss.
    let func: u64 = load(timer, conf!(offsets.timer_function));
    let which = socket_timer(func);
    let sk = if which == flags::IN_KEEPALIVE_TIMER {
        timer.wrapping_sub(conf!(offsets.sk_timer) as usize)
    } else if which == flags::IN_WRITE_TIMER {
        timer.wrapping_sub(conf!(offsets.icsk_retransmit_timer) as usize)
    } else {
        return 0;
    };
    let Some(f) = TIMER.get_ptr_mut(0) else {
        return 0;
    };
    let (mut mib_addr, mut keepalives_before, mut probes_before) = (0, 0, 0);
    if which == flags::IN_KEEPALIVE_TIMER {
        mib_addr = keepalive_counter(sk);
        if mib_addr != 0 {
            keepalives_before = read::<u64>(mib_addr as *const u8, 0);
        }
        probes_before = read::<u8>(sk, conf!(offsets.icsk_probes_out)) as u32;
    }
    // SAFETY: per-CPU slot; timer callbacks do not nest on one CPU.
    unsafe {
        (*f).timer = timer as u64;
        (*f).sk = sk as u64;
        (*f).which = which as u32;
        (*f).mib_addr = mib_addr;
        (*f).keepalives_before = keepalives_before;
        (*f).probes_before = probes_before;
    }
    0
}

/// Address of this CPU's TcpExt.TCPKeepAlive counter in the namespace of
/// `sk`, 0 when unknown.
///
/// tcp_keepalive_timer sends each probe through tcp_write_wakeup(sk,
/// LINUX_MIB_TCPKEEPALIVE), which counts it on the running CPU. Between
/// timer_expire_entry and _exit only that callback runs on this CPU, so
/// the counter's rise is exactly the probes it sent, whatever another CPU
/// does meanwhile (an ACK processed there right after the callback
/// releases the socket resets `icsk_probes_out`, which is why that field
/// alone can miss a probe).
#[inline(always)]
fn keepalive_counter(sk: *const u8) -> u64 {
    let stats_off = conf!(offsets.net_mib_stats);
    if stats_off == Offsets::MISSING {
        return 0;
    }
    let cpu_off = this_cpu_offset();
    if cpu_off == 0 {
        return 0;
    }
    let net: u64 = read(sk, conf!(offsets.skc_net));
    let stats: u64 = read(net as *const u8, stats_off);
    if stats == 0 {
        return 0;
    }
    stats
        .wrapping_add(cpu_off)
        .wrapping_add(conf!(offsets.mib_tcp_keepalive) as u64 * 8)
}

// TP_PROTO(struct timer_list *timer)
#[btf_tracepoint(function = "timer_expire_exit")]
pub fn ka_timer_exit(ctx: BtfTracePointContext) -> i32 {
    let timer: *const u8 = ctx.arg(0);
    // The same test as at entry, before the per-CPU frame is looked at
    // (a map lookup and a cache line the miss would not otherwise touch).
    // The timer may be gone by now: the load is fault-safe, and a socket
    // timer keeps its function while the socket lives (and while this CPU
    // stays in the softirq, its memory holds a socket: TCP sockets are
    // freed after an RCU grace period).
    let func: u64 = load(timer, conf!(offsets.timer_function));
    if socket_timer(func) == 0 {
        return 0;
    }
    let Some(f) = TIMER.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU slot, see ka_timer_entry.
    let (frame_timer, which) = unsafe { ((*f).timer, (*f).which) };
    if frame_timer != timer as u64 || which == 0 {
        return 0;
    }
    // SAFETY: as above.
    unsafe { (*f).which = 0 };
    if which != flags::IN_KEEPALIVE_TIMER as u32 {
        return 0;
    }
    // SAFETY: as above.
    let frame = unsafe { *f };
    let sk = frame.sk as *const u8;
    let sent = if frame.mib_addr != 0 {
        read::<u64>(frame.mib_addr as *const u8, 0) != frame.keepalives_before
    } else {
        // Without the counter: tcp_keepalive_timer increments
        // icsk_probes_out when it sends a probe (missed when the answer
        // is processed on another CPU before this tracepoint).
        read::<u8>(sk, conf!(offsets.icsk_probes_out)) as u32 > frame.probes_before
    };
    if !sent {
        return 0;
    }
    // The timer counts a probe by incrementing icsk_probes_out under the
    // socket lock; by now an answer may have reset it, so number the probe
    // from the value the callback started with.
    let probe = (frame.probes_before + 1) as u8;
    let cookie: u64 = read(sk, conf!(offsets.skc_cookie));
    count(cookie, |s| {
        s.probes += 1;
        s.last_probe = probe as u32;
    });
    if !wanted(kind::KEEPALIVE_PROBE) {
        return 0;
    }
    // No owner reachable from a timer: the head alone.
    emit_head(kind::KEEPALIVE_PROBE, cookie, |ev| {
        ev.probes_out = probe;
        ev.flags = flags::IN_KEEPALIVE_TIMER;
        fill_sock(ev, sk);
    });
    0
}
