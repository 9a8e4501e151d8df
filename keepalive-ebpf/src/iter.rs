//! The `iter/tcp` program: one [`SockRecord`] per TCP socket of the
//! namespace, the kernel half of `snapshot` and of the startup walk.

use aya_ebpf::helpers::{
    bpf_ktime_get_ns,
    generated::{bpf_jiffies64, bpf_seq_write, bpf_skc_to_tcp_sock},
};
use keepalive_common::{Offsets, SockRecord, sock_flags, tcp_state};

use crate::maps::{SNAP_ROW, config};
use crate::mem::{cookie_of, load, read};

/// Context of an `iter/tcp` program:
/// `struct bpf_iter__tcp { struct bpf_iter_meta *meta;
/// struct sock_common *sk_common; uid_t uid; }`.
#[repr(C)]
pub struct IterTcpCtx {
    pub meta: *const u8,
    pub sk_common: *const u8,
    pub uid: u32,
}

/// The `struct sock` / `tcp_sock` part of a snapshot row, with `$read`
/// being [`load`] for a trusted `tcp_sock` and [`read`] otherwise. The
/// inode behind `sk_socket` (in `socket_alloc`, beyond `struct socket`)
/// is always a probe read.
macro_rules! fill_full {
    ($r:expr, $sk:expr, $read:ident) => {{
        use $crate::mem::$read;
        let r: &mut SockRecord = $r;
        let sk: *const u8 = $sk;
        let o = &config().snap;
        let skflags: u64 = $read(sk, o.sk_flags);
        let keepalive = ((skflags >> (o.sock_keepopen_bit & 63)) & 1) as u8;
        let socket: u64 = $read(sk, o.sk_socket);
        let orphan = (socket == 0) as u8;
        r.ino = if o.sk_ino != Offsets::MISSING {
            $read(sk, o.sk_ino)
        } else {
            read(socket as *const u8, o.socket_to_ino)
        };
        let sk_timer = sk.wrapping_add(conf!(offsets.sk_timer) as usize);
        let pending = ($read::<u64>(sk_timer, o.timer_pprev) != 0) as u8;
        r.flags = sock_flags::FULL
            | (keepalive * sock_flags::KEEPALIVE)
            | (orphan * sock_flags::ORPHAN)
            | (pending * sock_flags::SK_TIMER_PENDING);
        r.sk_timer_expires = $read(sk_timer, o.timer_expires);
        let rtx = sk.wrapping_add(conf!(offsets.icsk_retransmit_timer) as usize);
        r.rtx_expires = $read(rtx, o.timer_expires);
        r.retransmits = $read(sk, o.icsk_retransmits);
        r.backoff = $read(sk, o.icsk_backoff);
        r.probes_out = $read(sk, conf!(offsets.icsk_probes_out));
        r.rto_jiffies = $read(sk, o.icsk_rto);
        r.lrcvtime = $read(sk, o.icsk_lrcvtime);
        r.user_timeout_ms = $read(sk, conf!(offsets.icsk_user_timeout));
        r.keepalive_time = $read(sk, o.tp_keepalive_time);
        r.keepalive_intvl = $read(sk, o.tp_keepalive_intvl);
        r.keepalive_probes = $read(sk, o.tp_keepalive_probes);
        r.total_retrans = $read(sk, o.tp_total_retrans);
        r.lsndtime = $read(sk, o.tp_lsndtime);
        r.rcv_tstamp = $read(sk, o.tp_rcv_tstamp);
        if r.state as u32 == tcp_state::LISTEN {
            r.recv_queue = $read(sk, o.sk_ack_backlog);
            r.send_queue = $read(sk, o.sk_max_ack_backlog);
        } else {
            let rcv_nxt: u32 = $read(sk, o.tp_rcv_nxt);
            let copied: u32 = $read(sk, o.tp_copied_seq);
            let write_seq: u32 = $read(sk, o.tp_write_seq);
            let snd_una: u32 = $read(sk, o.tp_snd_una);
            r.recv_queue = rcv_nxt.wrapping_sub(copied);
            r.send_queue = write_seq.wrapping_sub(snd_una);
        }
        r.pending = $read(sk, o.icsk_pending);
        let net: *const u8 = $read(sk, conf!(offsets.skc_net));
        r.net_keepalive_time = $read(net, o.net_keepalive_time);
        r.net_keepalive_intvl = $read(net, o.net_keepalive_intvl);
        r.net_keepalive_probes = $read(net, o.net_keepalive_probes);
        r.net_retries2 = $read(net, o.net_retries2);
    }};
}

/// Whether the connection table keeps a socket in `state` (its walk keeps
/// full sockets and orphans): not a request socket, and a TIME_WAIT
/// minisock only while it still waits for the peer's FIN.
#[inline(always)]
fn tracked(sk: *const u8, state: u32) -> bool {
    match state {
        tcp_state::NEW_SYN_RECV => false,
        tcp_state::TIME_WAIT => {
            read::<u8>(sk, config().snap.tw_substate) as u32 == tcp_state::FIN_WAIT2
        }
        _ => true,
    }
}

/// Walks every TCP socket of the opening thread's namespace and writes one
/// [`SockRecord`] per socket. Asking for each cookie also makes the kernel
/// assign one, so sockets opened before the monitor keep their real cookie
/// in the timer tracepoints.
// int prog(struct bpf_iter__tcp *ctx)
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
extern "C" fn ka_iter_tcp(ctx: *mut IterTcpCtx) -> i32 {
    // SAFETY: the kernel passes a valid context.
    let (meta, sk) = unsafe { ((*ctx).meta, (*ctx).sk_common) };
    if sk.is_null() || meta.is_null() {
        return 0;
    }
    // The monitor's walks skip what its table would drop: under connection
    // churn most sockets are TIME_WAIT (the bench's churn leaves ~85,000),
    // and a row each, copied out and parsed every refresh, costs more
    // than this test (docs/benchmarks.md §14).
    let state: u8 = load(sk, conf!(offsets.skc_state));
    if conf!(walk_tracked_only) != 0 && !tracked(sk, state as u32) {
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
    // TIME_WAIT and request sockets are smaller structs without the TCP
    // fields: only the tuple and state mean anything (userspace reads the
    // rest only with FULL), so skip the ~30 reads (most walked sockets
    // under connection churn are TIME_WAIT).
    if r.state as u32 == tcp_state::TIME_WAIT {
        // An orphan that reaches FIN_WAIT2 with the default tcp_fin_timeout
        // becomes a timewait minisock that still waits for the peer's FIN.
        let sub: u8 = read(sk, config().snap.tw_substate);
        r.flags = 0;
        if sub as u32 == tcp_state::FIN_WAIT2 {
            r.state = tcp_state::FIN_WAIT2 as u8;
            r.flags = sock_flags::ORPHAN;
        }
    } else if r.state as u32 == tcp_state::NEW_SYN_RECV {
        r.flags = 0;
    } else {
        // SAFETY: helper on the iterator's trusted sock_common; NULL
        // unless a full TCP socket.
        let tp = unsafe { bpf_skc_to_tcp_sock(sk as *mut _) } as *const u8;
        if tp.is_null() {
            fill_full!(r, sk, read);
        } else {
            // A trusted `tcp_sock`: every field a plain load the verifier
            // checks against BTF, not a probe-read helper call (the walk
            // reads ~30 fields of every socket on the host).
            fill_full!(r, tp, load);
        }
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
