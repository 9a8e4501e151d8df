//! Kernel-side diagnostics of `keepalive tune`: when a `bpf_setsockopt`
//! failed, the tuning program tail-calls one of these small programs, which
//! says so once through aya-log (the `tuned` report carries the failure too).
//!
//! Why tail calls: a log call is a lot of code for the verifier. Inlined in
//! the tuning programs it is verified once per call site and per path (a
//! second of load time or more); a tail-called program is verified once, on
//! its own, and only runs on the rare failure path.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::generated::bpf_tail_call,
    macros::{map, sock_ops},
    maps::ProgramArray,
    programs::SockOpsContext,
};
use aya_log_ebpf::warn;

use crate::iter::IterTcpCtx;
use crate::tune::TUNE_ROW;

/// Slot 0: [`ka_tune_log_sockops`] (a program array holds one program type).
#[map]
static TUNE_LOG_SOCKOPS: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Slot 0: [`ka_tune_log_iter`].
#[map]
static TUNE_LOG_ITER: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Hands over to the failure logger of the sock_ops program; returns only
/// when none is installed.
#[inline(always)]
pub fn log_failure_sockops(ctx: &SockOpsContext) {
    // SAFETY: the program's own context and a program array of its type.
    unsafe {
        bpf_tail_call(
            ctx.ops.cast(),
            core::ptr::from_ref(&TUNE_LOG_SOCKOPS).cast_mut().cast(),
            0,
        )
    };
}

/// Hands over to the failure logger of the tuning walk; returns only when
/// none is installed.
#[inline(always)]
pub fn log_failure_iter(ctx: *mut IterTcpCtx) {
    // SAFETY: the program's own context and a program array of its type.
    unsafe {
        bpf_tail_call(
            ctx.cast::<c_void>(),
            core::ptr::from_ref(&TUNE_LOG_ITER).cast_mut().cast(),
            0,
        )
    };
}

/// Says what failed in this CPU's scratch report, which the tuning program
/// that tail-called us has just filled.
#[inline(always)]
fn log_failure() {
    let Some(r) = TUNE_ROW.get(0) else {
        return;
    };
    let ctx = ();
    warn!(
        &ctx,
        "bpf_setsockopt failed: cookie {} report {} options {:x} (of {:x}) errno {}",
        r.cookie,
        r.what,
        r.failed,
        r.set,
        -r.err
    );
}

#[sock_ops]
pub fn ka_tune_log_sockops(_ctx: SockOpsContext) -> u32 {
    log_failure();
    1
}

// int prog(struct bpf_iter__tcp *ctx)
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
extern "C" fn ka_tune_log_iter(_ctx: *mut IterTcpCtx) -> i32 {
    log_failure();
    0
}
