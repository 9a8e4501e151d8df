//! The cgroup/setsockopt hook of `keepalive tune`: sees an application set
//! a keepalive option on a socket we tuned. By default the application
//! wins (the option is no longer ours to restore) and it is reported; with
//! `--enforce` its value is rewritten to the policy's before the kernel
//! applies it.

use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid},
    macros::cgroup_sockopt,
    programs::SockoptContext,
};
use keepalive_common::tune::{cfg_flags, opt, report, tflags};

use crate::tune::{bit_of, now, scratch, state_of, submit, tune_config};

#[cgroup_sockopt(setsockopt)]
pub fn ka_tune_setsockopt(ctx: SockoptContext) -> i32 {
    // SAFETY: fields of the context; the verifier checks each access.
    let (level, name) = unsafe { ((*ctx.sockopt).level, (*ctx.sockopt).optname) };
    let bit = bit_of(level, name);
    if bit != 0 {
        on_keepalive_option(&ctx, bit);
    }
    // Always let the call through.
    1
}

#[inline(always)]
fn on_keepalive_option(ctx: &SockoptContext, bit: u8) {
    // SAFETY: as above.
    let (sk, optval, end) = unsafe {
        (
            (*ctx.sockopt).__bindgen_anon_1.sk,
            (*ctx.sockopt).__bindgen_anon_2.optval as *mut u8,
            (*ctx.sockopt).__bindgen_anon_3.optval_end as *mut u8,
        )
    };
    if sk.is_null() || optval.wrapping_add(4) > end {
        return;
    }
    let Some(st) = state_of(sk as *const u8, false) else {
        return;
    };
    if st.flags & tflags::TUNED == 0 || st.set & bit == 0 {
        return;
    }
    let Some(cfg) = tune_config() else {
        return;
    };
    // SAFETY: 4 bytes inside [optval, optval_end), checked above.
    let mut asked = unsafe { core::ptr::read_unaligned(optval as *const u32) };
    if bit == opt::KEEPALIVE {
        asked = (asked != 0) as u32;
    }
    let ours = st.new.get(bit);
    let Some(r) = scratch() else {
        return;
    };
    r.cookie = st.cookie;
    r.rule = st.rule;
    r.generation = st.generation;
    r.set = bit;
    r.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    r.comm = bpf_get_current_comm().unwrap_or_default();
    if cfg.flags & cfg_flags::ENFORCE != 0 {
        if asked == ours {
            return;
        }
        // SAFETY: as above; the kernel applies this buffer after us.
        unsafe { core::ptr::write_unaligned(optval as *mut u32, ours) };
        // old: what the application asked for; new: what it got.
        r.what = report::ENFORCED;
        r.old.set(bit, asked);
        r.new.set(bit, ours);
    } else {
        // old: our value; new: the application's, which it keeps.
        st.set &= !bit;
        r.what = report::APP_OVERRIDE;
        r.old.set(bit, ours);
        r.new.set(bit, asked);
    }
    r.ts_ns = now();
    submit(r);
}
