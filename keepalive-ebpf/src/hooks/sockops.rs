//! The sock_ops program of `keepalive tune`, attached to the cgroup v2
//! root: applies the policy to every new connection the moment it is
//! established (both ends), before the application can send a byte.

use aya_ebpf::{
    helpers::generated::{bpf_get_socket_cookie, bpf_skc_to_tcp_sock},
    macros::sock_ops,
    programs::SockOpsContext,
};
use keepalive_common::tune::{TuneConfig, cfg_flags, tflags};

use crate::tune::{TUNE_RULES, now, scratch, submit, tune_config, tune_socket};
use crate::tune_log::log_failure_sockops;

const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;
const BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB: u32 = 5;

#[sock_ops]
pub fn ka_tune_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        return 1;
    }
    let Some(cfg) = tune_config() else {
        return 1;
    };
    if cfg.flags & cfg_flags::ACTIVE == 0 {
        return 1;
    }
    on_established(&ctx, cfg);
    1
}

#[inline(always)]
fn on_established(ctx: &SockOpsContext, cfg: &TuneConfig) {
    // SAFETY: `sk` of a sock_ops context; the verifier checks the access.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return;
    }
    // SAFETY: helper on the context's socket; NULL unless it is TCP.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk.cast()) } as *const u8;
    if tp.is_null() {
        return;
    }
    let Some(rules) = TUNE_RULES.get(0) else {
        return;
    };
    let Some(r) = scratch() else {
        return;
    };
    // In sock_ops the cookie helper takes the context, not the socket.
    // SAFETY: the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    if tune_socket(r, tp, ctx.ops.cast(), cookie, cfg, rules) {
        r.flags |= tflags::NEW;
        r.ts_ns = now();
        submit(r);
        if r.failed != 0 {
            log_failure_sockops(ctx);
        }
    }
}
