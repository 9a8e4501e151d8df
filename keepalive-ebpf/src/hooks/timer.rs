//! Timer tracepoints around the socket timers: which socket timer runs on
//! this CPU (so TCP events can say "inside the keepalive timer"), and the
//! keepalive probes the keepalive timer sends.
//!
//! The socket is reached from the `timer_list` by a known offset, so it is
//! untrusted here: fields are read with the probe-read helper and socket
//! storage is out of reach.

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use keepalive_common::{RawEvent, flags, kind};

use crate::emit::emit;
use crate::maps::{TIMER, count, wanted};
use crate::mem::{fill_sock, read};

/// Which socket timer is running on this CPU for `sk`, as event flags.
#[inline(always)]
pub fn timer_flags(sk: *const u8) -> u8 {
    match TIMER.get(0) {
        Some(f) if f.sk == sk as u64 => f.which as u8,
        _ => 0,
    }
}

// TP_PROTO(struct timer_list *timer, unsigned long baseclk)
#[btf_tracepoint(function = "timer_expire_entry")]
pub fn ka_timer_entry(ctx: BtfTracePointContext) -> i32 {
    let timer: *const u8 = ctx.arg(0);
    let func: u64 = read(timer, conf!(offsets.timer_function));
    let (which, sk) = if func == conf!(keepalive_timer_fn) && func != 0 {
        (
            flags::IN_KEEPALIVE_TIMER,
            timer.wrapping_sub(conf!(offsets.sk_timer) as usize),
        )
    } else if func == conf!(write_timer_fn) && func != 0 {
        (
            flags::IN_WRITE_TIMER,
            timer.wrapping_sub(conf!(offsets.icsk_retransmit_timer) as usize),
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
            (*f).probes_before = read::<u8>(sk, conf!(offsets.icsk_probes_out)) as u32;
        }
    }
    0
}

// TP_PROTO(struct timer_list *timer)
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
    // SAFETY: as above.
    unsafe { (*f).which = 0 };
    if frame.which != flags::IN_KEEPALIVE_TIMER as u32 {
        return 0;
    }
    let sk = frame.sk as *const u8;
    // tcp_keepalive_timer increments icsk_probes_out exactly when it sends
    // a probe, so a rise across the callback is one probe on the wire.
    let after = read::<u8>(sk, conf!(offsets.icsk_probes_out));
    if after as u32 <= frame.probes_before {
        return 0;
    }
    let cookie: u64 = read(sk, conf!(offsets.skc_cookie));
    count(cookie, |s| {
        s.probes += 1;
        s.last_probe = after as u32;
    });
    if !wanted(kind::KEEPALIVE_PROBE) {
        return 0;
    }
    let mut ev = RawEvent {
        kind: kind::KEEPALIVE_PROBE,
        cookie,
        probes_out: after,
        flags: flags::IN_KEEPALIVE_TIMER,
        ..RawEvent::default()
    };
    fill_sock(&mut ev, sk);
    emit(&mut ev, core::ptr::null());
    0
}
