//! TCP tracepoints: state changes (and owners), retransmits (a listener's
//! SYN-ACKs included), resets sent and received, socket errors. Each runs
//! with a trusted `struct sock *` argument, so fields are plain loads and
//! socket storage is reachable.

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use keepalive_common::{Offsets, RawEvent, flags, kind, tcp_state};

use super::timer::timer_flags;
use crate::emit::{copy_owner, emit, emit_head};
use crate::maps::{
    count, current_owner_into, owner_storage, set_owner_to_current, wanted, wanted_state,
};
use crate::mem::{AF_INET, AF_INET6, cookie_of, fill_sock_direct, load, protocol, put_addr, read};

const IPPROTO_TCP: u16 = 6;
const ETIMEDOUT: i32 = 110;
const TCPHDR_SYN: u8 = 0x02;
const EAGAIN: i16 = 11;
const ENOMEM: i16 = 12;
const EBUSY: i16 = 16;
const EINVAL: i16 = 22;
const EHOSTUNREACH: i16 = 113;

// TP_PROTO(const struct sock *sk, const struct sk_buff *skb, int err)
// (`err` since 6.12: Config::retransmit_has_err)
#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn ka_retransmit(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    let skb: *const u8 = ctx.arg(1);
    if sk.is_null() {
        return 0;
    }
    let cookie = cookie_of(sk);
    let (mut segs, mut syn) = (0u16, 0u8);
    let cb = conf!(offsets.skb_cb);
    if cb != Offsets::MISSING && !skb.is_null() {
        let tcb = skb.wrapping_add(cb as usize);
        segs = read::<u16>(tcb, conf!(offsets.tcb_gso_segs));
        if read::<u8>(tcb, conf!(offsets.tcb_tcp_flags)) & TCPHDR_SYN != 0 {
            syn = flags::SYN;
        }
    }
    let err = if conf!(retransmit_has_err) != 0 {
        ctx.arg::<i64>(2) as i16
    } else {
        0
    };
    if counted_in_retranssegs(err) {
        count(cookie, |s| s.retransmit_segs += segs as u32);
    }
    if !wanted(kind::RETRANSMIT) {
        return 0;
    }
    let timer = timer_flags(sk);
    emit(kind::RETRANSMIT, cookie, sk, |ev| {
        ev.segs = segs;
        ev.err = err;
        ev.flags = syn | timer;
        fill_sock_direct(ev.head_mut(), sk);
    });
    0
}

/// Whether the kernel counted a retransmission that ended with `err` in
/// Tcp.RetransSegs (and the socket's `tcpi_total_retrans`): the same rule
/// as `events::counted_in_retranssegs` in userspace, which explains it.
#[inline(always)]
fn counted_in_retranssegs(err: i16) -> bool {
    !matches!(-err, EBUSY | EINVAL | ENOMEM | EHOSTUNREACH | EAGAIN)
}

// TP_PROTO(const struct sock *sk, const struct request_sock *req)
// tcp_rtx_synack fires it, and counts one Tcp.RetransSegs, each time a
// SYN-ACK is sent again (the request socket's timer, or a retransmitted
// SYN from the peer); a SYN-ACK that could not be sent is neither counted
// nor traced. `sk` is the listener, or for a passive TCP Fast Open the
// child socket already created. `req` starts with its `sock_common`
// (the kernel's req_to_sk is a cast; KernelBtf::offsets checks it), so
// the socket offsets read its tuple.
#[btf_tracepoint(function = "tcp_retransmit_synack")]
pub fn ka_synack_rtx(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    let req: *const u8 = ctx.arg(1);
    if sk.is_null() || req.is_null() {
        return 0;
    }
    // A request socket has a cookie only if something asked for one
    // (`ss` does); the connection's socket, created when the handshake
    // completes, gets its own. A Fast Open child is that socket already.
    let fast_open = load::<u8>(sk, conf!(offsets.skc_state)) as u32 != tcp_state::LISTEN;
    let cookie = if fast_open {
        cookie_of(sk)
    } else {
        load::<u64>(req, conf!(offsets.skc_cookie))
    };
    count(cookie, |s| s.retransmit_segs += 1);
    if !wanted(kind::RETRANSMIT) {
        return 0;
    }
    // No owner: the server side learns none (see ka_state).
    emit(kind::RETRANSMIT, cookie, core::ptr::null(), |ev| {
        ev.segs = 1;
        ev.flags = flags::SYN | flags::SYN_ACK;
        let from = if fast_open { sk } else { req };
        fill_sock_direct(ev.head_mut(), from);
    });
    0
}

/// Fills the tuple of a reset sent without a socket from the packet it answers.
#[inline(always)]
fn fill_from_skb(ev: &mut RawEvent, skb: *const u8) {
    let head: u64 = read(skb, conf!(offsets.skb_head));
    let nh: u16 = read(skb, conf!(offsets.skb_network_header));
    let th: u16 = read(skb, conf!(offsets.skb_transport_header));
    let ip = (head as *const u8).wrapping_add(nh as usize);
    let tcp = (head as *const u8).wrapping_add(th as usize);
    let ver: u8 = read(ip, 0);
    // The reset travels back: our source is the packet's destination.
    if ver >> 4 == 6 {
        ev.family = AF_INET6 as u8;
        put_addr(&mut ev.daddr, addr_words!(read, ip, 8));
        put_addr(&mut ev.saddr, addr_words!(read, ip, 24));
    } else {
        ev.family = AF_INET as u8;
        put_addr(&mut ev.daddr, [read(ip, 12), 0, 0, 0]);
        put_addr(&mut ev.saddr, [read(ip, 16), 0, 0, 0]);
    }
    ev.dport = u16::from_be(read::<u16>(tcp, 0));
    ev.sport = u16::from_be(read::<u16>(tcp, 2));
    let dev: u64 = read(skb, conf!(offsets.skb_dev));
    let net: u64 = read(dev as *const u8, conf!(offsets.dev_nd_net));
    ev.netns = read(net as *const u8, conf!(offsets.net_ns_inum));
}

// TP_PROTO(const struct sock *sk, const struct sk_buff *skb,
//          const enum sk_rst_reason reason)
// (`sk` may be NULL; `reason` since 6.10: Config::reset_has_reason)
#[btf_tracepoint(function = "tcp_send_reset")]
pub fn ka_reset_sent(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    let cookie = if sk.is_null() { 0 } else { cookie_of(sk) };
    count(cookie, |s| s.resets_sent += 1);
    if !wanted(kind::RESET_SENT) {
        return 0;
    }
    let skb: *const u8 = ctx.arg(1);
    let mut ev_flags = if !sk.is_null() {
        timer_flags(sk)
    } else if !skb.is_null() {
        flags::NO_SOCKET
    } else {
        return 0;
    };
    let mut reason = 0;
    if conf!(reset_has_reason) != 0 {
        reason = ctx.arg::<u64>(2) as u32;
        ev_flags |= flags::HAS_REASON;
    }
    emit(kind::RESET_SENT, cookie, sk, |ev| {
        if !sk.is_null() {
            fill_sock_direct(ev.head_mut(), sk);
        } else {
            fill_from_skb(ev, skb);
        }
        ev.flags = ev_flags;
        ev.reason = reason;
    });
    0
}

// TP_PROTO(struct sock *sk)
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
    emit(kind::RESET_RECEIVED, cookie, sk, |ev| {
        fill_sock_direct(ev.head_mut(), sk)
    });
    0
}

// TP_PROTO(const struct sock *sk, const int oldstate, const int newstate)
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
    // connect(): the only transition that runs in the owner's context.
    // Kept on the socket only for in-kernel consumers (tune), which costs
    // an allocation per connection; the event carries it either way and
    // userspace remembers it by cookie for the connection's later events.
    let to_syn_sent = new as u32 == tcp_state::SYN_SENT;
    let owner = if to_syn_sent && owner_storage() {
        set_owner_to_current(sk)
    } else {
        core::ptr::null()
    };
    // → SYN_SENT is emitted even when no consumer asked for state changes
    // (or for that state): it is where userspace learns the owner of the
    // connection's later events (consumers drop what they did not ask for).
    // The cookie above is generated either way, for the timer hooks.
    if to_syn_sent {
        emit(kind::STATE_CHANGE, cookie, core::ptr::null(), |ev| {
            ev.old_state = old as u8;
            ev.new_state = new as u8;
            fill_sock_direct(ev.head_mut(), sk);
            if !owner.is_null() {
                copy_owner(ev, owner);
            } else {
                current_owner_into(ev);
            }
        });
    } else if wanted(kind::STATE_CHANGE) && wanted_state(new as u32) {
        // No owner here (userspace knows it by cookie): the head alone.
        emit_head(kind::STATE_CHANGE, cookie, |ev| {
            ev.old_state = old as u8;
            ev.new_state = new as u8;
            fill_sock_direct(ev, sk);
        });
    }
    0
}

// TP_PROTO(const struct sock *sk)
#[btf_tracepoint(function = "inet_sk_error_report")]
pub fn ka_error(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    if sk.is_null() || protocol(sk) != IPPROTO_TCP {
        return 0;
    }
    let err: i32 = load(sk, conf!(offsets.sk_err));
    if err != ETIMEDOUT {
        return 0;
    }
    let cookie = cookie_of(sk);
    count(cookie, |s| s.timeouts += 1);
    if !wanted(kind::TIMEOUT) {
        return 0;
    }
    let timer = timer_flags(sk);
    emit(kind::TIMEOUT, cookie, sk, |ev| {
        ev.user_timeout_ms = read::<u32>(sk, conf!(offsets.icsk_user_timeout));
        ev.probes_out = read::<u8>(sk, conf!(offsets.icsk_probes_out));
        fill_sock_direct(ev.head_mut(), sk);
        ev.flags = timer;
    });
    0
}
