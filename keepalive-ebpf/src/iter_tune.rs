//! The tuning walk (`iter/tcp`): applies the policy to every established
//! socket of the namespace that was open before `tune` started (or was
//! rate-limited, or waited for its owner), or puts back the original values
//! of every socket it tuned, and writes one [`TuneReport`] per socket it
//! acted on. The iterator holds each socket's lock, which is what lets
//! `bpf_setsockopt` change a socket from here.

use aya_ebpf::helpers::generated::{bpf_seq_write, bpf_skc_to_tcp_sock};
use keepalive_common::{
    tcp_state,
    tune::{TuneReport, walk_mode},
};

use crate::iter::IterTcpCtx;
use crate::mem::{cookie_of, read};
use crate::tune::{TUNE_RULES, now, restore_socket, scratch, tune_config, tune_socket};
use crate::tune_log::log_failure_iter;

// int prog(struct bpf_iter__tcp *ctx)
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
extern "C" fn ka_tune_iter(ctx: *mut IterTcpCtx) -> i32 {
    // SAFETY: the kernel passes a valid context.
    let (meta, skc) = unsafe { ((*ctx).meta, (*ctx).sk_common) };
    if skc.is_null() || meta.is_null() {
        return 0;
    }
    // SAFETY: helper on a trusted sock_common; NULL unless a full TCP socket.
    let tp = unsafe { bpf_skc_to_tcp_sock(skc as *mut _) } as *const u8;
    if tp.is_null() {
        return 0;
    }
    let (Some(cfg), Some(rules), Some(r)) = (tune_config(), TUNE_RULES.get(0), scratch()) else {
        return 0;
    };
    let cookie = cookie_of(tp);
    let acted = if cfg.walk_mode == walk_mode::RESTORE {
        restore_socket(r, tp, tp as *mut _, cookie, cfg)
    } else {
        let state: u8 = read(tp, conf!(offsets.skc_state));
        state as u32 == tcp_state::ESTABLISHED
            && tune_socket(r, tp, tp as *mut _, cookie, cfg, rules)
    };
    if !acted {
        return 0;
    }
    r.ts_ns = now();
    // SAFETY: meta is the trusted iterator metadata; seq is its first field.
    let seq = unsafe { *(meta as *const *mut core::ffi::c_void) };
    // SAFETY: r is a map value valid for the call.
    unsafe {
        bpf_seq_write(
            seq as *mut _,
            (r as *const TuneReport).cast(),
            core::mem::size_of::<TuneReport>() as u32,
        )
    };
    if r.failed != 0 {
        log_failure_iter(ctx);
    }
    0
}
