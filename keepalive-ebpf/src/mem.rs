//! Kernel memory access: struct fields at BTF-resolved offsets, and the
//! connection identity (tuple, namespace, cookie) of a socket.

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::helpers::generated::{bpf_get_socket_cookie, bpf_probe_read_kernel};
use keepalive_common::EventHead;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Reads a `T` at `base + off` from kernel memory, zero on failure.
///
/// Branchless on purpose: the helper zeroes its destination when the read
/// faults (a NULL base included), and a branch per field multiplies the
/// verifier's states. Offsets are always valid; optional fields are
/// checked by the caller.
#[inline(always)]
pub fn read<T: Default>(base: *const u8, off: u16) -> T {
    let mut v = T::default();
    // SAFETY: the helper tolerates any source address and writes at most
    // size_of::<T>() bytes into `v`.
    unsafe {
        bpf_probe_read_kernel(
            (&raw mut v).cast(),
            core::mem::size_of::<T>() as u32,
            base.wrapping_add(off as usize).cast(),
        )
    };
    v
}

/// Loads a `T` at `base + off` directly. Only for trusted BTF pointers
/// (tracepoint and iterator arguments) and fields inside the pointed-to
/// struct: the offsets come from read-only data the verifier sees as
/// constants, so it checks each access against the kernel's BTF and turns
/// it into a plain load, much cheaper than a probe-read helper call.
#[inline(always)]
pub fn load<T: Copy>(base: *const u8, off: u16) -> T {
    // SAFETY: see above; the verifier rejects anything else at load time.
    unsafe { read_volatile(base.wrapping_add(off as usize) as *const T) }
}

/// Stores an address (IPv6: four words; IPv4: the first word, the rest
/// zero) into a 16-byte field with 32-bit stores: an array copy becomes a
/// byte-by-byte `memcpy` loop in BPF.
#[inline(always)]
pub fn put_addr(dst: &mut [u8; 16], w: [u32; 4]) {
    let p = dst.as_mut_ptr().cast::<u32>();
    // SAFETY: 16 writable bytes, 4-aligned in every record that has an
    // address (RawEvent, SockRecord: see keepalive-common's asserts).
    unsafe {
        write_volatile(p, w[0]);
        write_volatile(p.add(1), w[1]);
        write_volatile(p.add(2), w[2]);
        write_volatile(p.add(3), w[3]);
    }
}

/// The 16 bytes at `base + off` as four words, read with `$read`.
macro_rules! addr_words {
    ($read:ident, $base:expr, $off:expr) => {{
        let (b, o) = ($base, $off);
        [
            $read::<u32>(b, o),
            $read::<u32>(b, o + 4),
            $read::<u32>(b, o + 8),
            $read::<u32>(b, o + 12),
        ]
    }};
}

/// Copies the connection identity out of a `struct sock_common` into any
/// record with the tuple fields (events and snapshot rows), with `$read`
/// being [`load`] for trusted pointers and [`read`] otherwise.
macro_rules! fill_tuple {
    ($dst:expr, $sk:expr, $read:ident) => {{
        use $crate::mem::$read;
        let sk: *const u8 = $sk;
        let family: u16 = $read(sk, conf!(offsets.skc_family));
        $dst.family = family as u8;
        $dst.state = $read::<u8>(sk, conf!(offsets.skc_state));
        $dst.sport = $read::<u16>(sk, conf!(offsets.skc_num));
        $dst.dport = u16::from_be($read::<u16>(sk, conf!(offsets.skc_dport)));
        if family == $crate::mem::AF_INET6 {
            let s = addr_words!($read, sk, conf!(offsets.skc_v6_rcv_saddr));
            let d = addr_words!($read, sk, conf!(offsets.skc_v6_daddr));
            $crate::mem::put_addr(&mut $dst.saddr, s);
            $crate::mem::put_addr(&mut $dst.daddr, d);
        } else {
            let s: u32 = $read(sk, conf!(offsets.skc_rcv_saddr));
            let d: u32 = $read(sk, conf!(offsets.skc_daddr));
            $crate::mem::put_addr(&mut $dst.saddr, [s, 0, 0, 0]);
            $crate::mem::put_addr(&mut $dst.daddr, [d, 0, 0, 0]);
        }
        // Through a trusted socket the loaded `struct net *` is itself a
        // BTF pointer the verifier lets us load from (fault-safe).
        let net: *const u8 = $read(sk, conf!(offsets.skc_net));
        $dst.netns = $read(net, conf!(offsets.net_ns_inum));
    }};
}

/// Tuple of a socket reached through an untrusted pointer (timer hooks).
#[inline(always)]
pub fn fill_sock(ev: &mut EventHead, sk: *const u8) {
    fill_tuple!(ev, sk, read);
    keep_released_port(ev, sk);
}

/// Tuple of a socket passed as a trusted tracepoint argument.
#[inline(always)]
pub fn fill_sock_direct(ev: &mut EventHead, sk: *const u8) {
    fill_tuple!(ev, sk, load);
    keep_released_port(ev, sk);
}

/// The local port of a socket whose port the kernel already released.
///
/// On `→ CLOSE` tcp_set_state calls inet_put_port, which zeroes `skc_num`,
/// before the state change the tracepoint reports (and tcp_disconnect
/// sends its reset after that). `inet_sport` keeps the port. Only full
/// sockets release their port this way; timewait and request sockets,
/// which have no `inet_sport`, keep `skc_num`. A probe read: the field lies
/// beyond `struct sock`, the type the verifier knows the argument by.
#[inline(always)]
fn keep_released_port(ev: &mut EventHead, sk: *const u8) {
    if ev.sport == 0 {
        ev.sport = u16::from_be(read::<u16>(sk, conf!(offsets.inet_sport)));
    }
}

/// The socket's cookie, assigned on first use.
///
/// Once assigned a cookie never changes (`sock_gen_cookie` sets it once,
/// with a compare-and-swap), so it is read from the socket, one load, and
/// the helper that assigns it is called only while it is still 0: on a
/// socket's first event (of a churned connection's ten state changes, the
/// client's `→ SYN_SENT` and the accepted socket's first).
#[inline(always)]
pub fn cookie_of(sk: *const u8) -> u64 {
    let cookie = load::<u64>(sk, conf!(offsets.skc_cookie));
    if cookie != 0 {
        return cookie;
    }
    // SAFETY: `sk` is a trusted BTF pointer from the tracepoint arguments.
    unsafe { bpf_get_socket_cookie(sk as *mut _) }
}

/// `sk->sk_protocol` of a trusted socket (a u8 or a u16 by kernel version).
#[inline(always)]
pub fn protocol(sk: *const u8) -> u16 {
    if conf!(offsets.sk_protocol_size) == 1 {
        load::<u8>(sk, conf!(offsets.sk_protocol)) as u16
    } else {
        load::<u16>(sk, conf!(offsets.sk_protocol))
    }
}
