//! Plain `#[repr(C)]` records shared by the eBPF programs and userspace.
//!
//! This crate owns the wire format between kernel and daemon: the raw event
//! written to the ring buffer ([`RawEvent`]), the runtime configuration the
//! daemon writes into the programs' read-only data ([`Config`]), and the
//! per-connection owner record ([`Owner`]). Nothing here has behaviour; the
//! meaning of every field is decided in `keepalive-user`.
#![cfg_attr(not(test), no_std)]

pub mod filter;

pub mod tune;

/// Event kinds, as written in [`RawEvent::kind`].
pub mod kind {
    pub const RETRANSMIT: u8 = 1;
    pub const RESET_SENT: u8 = 2;
    pub const RESET_RECEIVED: u8 = 3;
    pub const STATE_CHANGE: u8 = 4;
    pub const KEEPALIVE_PROBE: u8 = 5;
    pub const TIMEOUT: u8 = 6;
    /// Highest kind number; kinds are bits `1 << kind` in [`super::Config::event_mask`].
    pub const MAX: u8 = 6;
}

/// Bits of [`RawEvent::flags`].
pub mod flags {
    /// The retransmitted segment carries SYN.
    pub const SYN: u8 = 1 << 0;
    /// The event fired inside `tcp_keepalive_timer`.
    pub const IN_KEEPALIVE_TIMER: u8 = 1 << 1;
    /// The event fired inside the retransmit timer (`tcp_write_timer`).
    pub const IN_WRITE_TIMER: u8 = 1 << 2;
    /// The kernel told us a reset reason (kernels >= 6.10).
    pub const HAS_REASON: u8 = 1 << 3;
    /// There was no socket (e.g. a reset for a closed port); the tuple comes from the packet.
    pub const NO_SOCKET: u8 = 1 << 4;
    /// The retransmitted segment is a SYN-ACK (with [`SYN`]): a listener
    /// answering a connection again, from `tcp_retransmit_synack`.
    pub const SYN_ACK: u8 = 1 << 5;
}

/// TCP states, kernel numbering (include/net/tcp_states.h), as the
/// `inet_sock_set_state` tracepoint passes them.
pub mod tcp_state {
    pub const ESTABLISHED: u32 = 1;
    pub const SYN_SENT: u32 = 2;
    pub const SYN_RECV: u32 = 3;
    pub const FIN_WAIT1: u32 = 4;
    pub const FIN_WAIT2: u32 = 5;
    pub const TIME_WAIT: u32 = 6;
    pub const CLOSE: u32 = 7;
    pub const CLOSE_WAIT: u32 = 8;
    pub const LAST_ACK: u32 = 9;
    pub const LISTEN: u32 = 10;
    pub const CLOSING: u32 = 11;
    pub const NEW_SYN_RECV: u32 = 12;
    pub const BOUND_INACTIVE: u32 = 13;

    /// The kernel's name of a state (`UNKNOWN` for a number it does not have).
    pub const fn name(state: u32) -> &'static str {
        match state {
            ESTABLISHED => "ESTABLISHED",
            SYN_SENT => "SYN_SENT",
            SYN_RECV => "SYN_RECV",
            FIN_WAIT1 => "FIN_WAIT1",
            FIN_WAIT2 => "FIN_WAIT2",
            TIME_WAIT => "TIME_WAIT",
            CLOSE => "CLOSE",
            CLOSE_WAIT => "CLOSE_WAIT",
            LAST_ACK => "LAST_ACK",
            LISTEN => "LISTEN",
            CLOSING => "CLOSING",
            NEW_SYN_RECV => "NEW_SYN_RECV",
            BOUND_INACTIVE => "BOUND_INACTIVE",
            _ => "UNKNOWN",
        }
    }
}

pub const TASK_COMM_LEN: usize = 16;

/// One event, as the kernel writes it into the ring buffer.
///
/// Addresses are in network byte order; IPv4 addresses occupy the first 4
/// bytes. Ports are host order.
///
/// The first [`EventHead::SIZE`] bytes are an [`EventHead`]: a record that
/// carries nothing else (a state change without its owner, a keepalive
/// probe) is written as its head alone, one cache line of ring instead of
/// a line and a half (docs/benchmarks.md §16), and read back with the
/// rest zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawEvent {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// `bpf_get_socket_cookie`, 0 when there is no socket.
    pub cookie: u64,
    /// Inode of the connection's network namespace.
    pub netns: u32,
    pub kind: u8,
    /// AF_INET (2) or AF_INET6 (10).
    pub family: u8,
    /// TCP state at the time of the event (kernel numbering, 1 = ESTABLISHED).
    pub state: u8,
    pub flags: u8,
    pub sport: u16,
    pub dport: u16,
    /// state_change: the state left.
    pub old_state: u8,
    /// state_change: the state entered.
    pub new_state: u8,
    /// keepalive_probe: the probe number (1 = first unanswered);
    /// timeout: unanswered probes when the kernel gave up (`icsk_probes_out`).
    pub probes_out: u8,
    pub _pad: u8,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    // The head ends here.
    /// Owner's tgid (0: unknown).
    pub pid: u32,
    /// reset_sent: `enum sk_rst_reason` (with [`flags::HAS_REASON`]).
    pub reason: u32,
    /// timeout: the socket's TCP_USER_TIMEOUT (ms, 0: none).
    pub user_timeout_ms: u32,
    /// retransmit: result of the transmit (0 or a negative errno, which
    /// the kernel keeps above -4096).
    pub err: i16,
    /// retransmit: segments in the skb (`tcp_skb_cb.tcp_gso_segs`).
    pub segs: u16,
    pub comm: [u8; TASK_COMM_LEN],
}

/// The first 64 bytes of a [`RawEvent`], field for field (the asserts at
/// the end of this file hold the two layouts together): what every event
/// has, and all that a state change without its owner or a keepalive
/// probe carries.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHead {
    pub ts_ns: u64,
    pub cookie: u64,
    pub netns: u32,
    pub kind: u8,
    pub family: u8,
    pub state: u8,
    pub flags: u8,
    pub sport: u16,
    pub dport: u16,
    pub old_state: u8,
    pub new_state: u8,
    pub probes_out: u8,
    pub _pad: u8,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

impl EventHead {
    /// Bytes of a head-only record.
    pub const SIZE: usize = core::mem::size_of::<EventHead>();
}

impl RawEvent {
    /// The event's head, to fill the fields every event shares.
    #[inline(always)]
    pub fn head_mut(&mut self) -> &mut EventHead {
        // SAFETY: EventHead is RawEvent's first 64 bytes, field for field
        // (repr(C) both, asserted below), and RawEvent is at least as
        // aligned.
        unsafe { &mut *core::ptr::from_mut(self).cast::<EventHead>() }
    }

    /// An event whose tail is zero, from its head.
    pub fn from_head(head: &EventHead) -> RawEvent {
        let mut ev = RawEvent::default();
        *ev.head_mut() = *head;
        ev
    }
}

/// Field offsets the programs need, resolved from the running kernel's BTF
/// at load time (rustc emits no CO-RE relocations, so nothing is baked in).
///
/// [`Offsets::MISSING`] marks an offset the kernel does not have.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offsets {
    /// `timer_list.function`. First, so that it shares a cache line with
    /// [`Config::keepalive_timer_fn`] and [`Config::write_timer_fn`]: the
    /// timer hooks run for every timer of the system and, for all but
    /// the socket timers, read nothing else.
    pub timer_function: u16,
    pub skc_daddr: u16,
    pub skc_rcv_saddr: u16,
    pub skc_dport: u16,
    pub skc_num: u16,
    pub skc_family: u16,
    pub skc_state: u16,
    pub skc_v6_daddr: u16,
    pub skc_v6_rcv_saddr: u16,
    pub skc_net: u16,
    pub skc_cookie: u16,
    pub sk_protocol: u16,
    pub sk_err: u16,
    pub sk_timer: u16,
    pub icsk_probes_out: u16,
    pub icsk_user_timeout: u16,
    pub net_ns_inum: u16,
    pub skb_cb: u16,
    pub skb_head: u16,
    pub skb_network_header: u16,
    pub skb_transport_header: u16,
    pub skb_dev: u16,
    pub dev_nd_net: u16,
    pub tcb_gso_segs: u16,
    pub tcb_tcp_flags: u16,
    /// Size of `sk_protocol` in bytes (1 or 2; a bitfield on old kernels is not supported).
    pub sk_protocol_size: u16,
    pub icsk_retransmit_timer: u16,
    /// `net.mib.net_statistics`: the namespace's per-CPU `struct linux_mib`.
    pub net_mib_stats: u16,
    /// `LINUX_MIB_TCPKEEPALIVE`: index of TcpExt.TCPKeepAlive in `linux_mib.mibs`.
    pub mib_tcp_keepalive: u16,
    /// `bpf_array.pptrs`: where a per-CPU array map keeps its per-CPU pointers.
    pub bpf_array_pptrs: u16,
    /// `inet_sock.inet_sport` (network order): the local port, kept after
    /// the kernel zeroes `skc_num` on releasing the port at close.
    pub inet_sport: u16,
    /// `sock.sk_bpf_storage`: NULL when no BPF program stored anything on
    /// the socket, which saves the owner lookup (MISSING: always look).
    pub sk_bpf_storage: u16,
}

impl Offsets {
    /// The kernel has no such field.
    pub const MISSING: u16 = u16::MAX;
}

/// Offsets the socket iterator needs (one snapshot row per socket).
/// [`Offsets::MISSING`] marks a field this kernel does not have.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapOffsets {
    pub sk_flags: u16,
    pub sk_socket: u16,
    pub sk_ino: u16,
    pub sk_ack_backlog: u16,
    pub sk_max_ack_backlog: u16,
    /// `socket_alloc.vfs_inode - socket_alloc.socket` + `inode.i_ino`, for kernels without `sk_ino`.
    pub socket_to_ino: u16,
    pub icsk_retransmits: u16,
    pub icsk_pending: u16,
    pub icsk_backoff: u16,
    pub icsk_rto: u16,
    pub icsk_lrcvtime: u16,
    pub timer_expires: u16,
    pub timer_pprev: u16,
    pub tp_keepalive_time: u16,
    pub tp_keepalive_intvl: u16,
    pub tp_keepalive_probes: u16,
    pub tp_total_retrans: u16,
    pub tp_lsndtime: u16,
    pub tp_rcv_tstamp: u16,
    pub tp_copied_seq: u16,
    pub tp_rcv_nxt: u16,
    pub tp_write_seq: u16,
    pub tp_snd_una: u16,
    pub net_keepalive_time: u16,
    pub net_keepalive_intvl: u16,
    pub net_keepalive_probes: u16,
    pub net_retries2: u16,
    /// Bit number of SOCK_KEEPOPEN in `sk_flags`.
    pub sock_keepopen_bit: u16,
    /// `inet_timewait_sock.tw_substate`: FIN_WAIT2 or TIME_WAIT.
    pub tw_substate: u16,
    /// For the owner walk (`iter/task_file`): `file.f_inode`,
    /// `inode.i_mode`, `inode.i_ino`, `task_struct.tgid`.
    pub file_inode: u16,
    pub inode_mode: u16,
    pub inode_ino: u16,
    pub task_tgid: u16,
    pub _pad: [u16; 3],
}

/// Bits of [`SockRecord::flags`].
pub mod sock_flags {
    /// SO_KEEPALIVE is on.
    pub const KEEPALIVE: u8 = 1 << 0;
    /// No `struct socket` any more: the process closed it (kernel orphan).
    pub const ORPHAN: u8 = 1 << 1;
    /// The keepalive/FIN_WAIT2 timer (`sk_timer`) is pending.
    pub const SK_TIMER_PENDING: u8 = 1 << 2;
    /// A full socket (not TIME_WAIT or a request socket): the TCP fields are valid.
    pub const FULL: u8 = 1 << 3;
}

/// One TCP socket as the `iter/tcp` program sees it.
///
/// Times are in jiffies (`now_jiffies` taken at the same moment) so that
/// userspace can turn them into ages; addresses as in [`RawEvent`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRecord {
    pub cookie: u64,
    pub ino: u64,
    pub now_jiffies: u64,
    pub now_ns: u64,
    /// icsk_retransmit_timer.expires (jiffies).
    pub rtx_expires: u64,
    /// sk_timer.expires (jiffies): keepalive, FIN_WAIT2 or SYN-ACK timer.
    pub sk_timer_expires: u64,
    pub netns: u32,
    /// Per-socket TCP_KEEPIDLE/INTVL in jiffies (0: namespace default).
    pub keepalive_time: u32,
    pub keepalive_intvl: u32,
    /// The namespace's tcp_keepalive_time/intvl (jiffies).
    pub net_keepalive_time: u32,
    pub net_keepalive_intvl: u32,
    pub user_timeout_ms: u32,
    pub rto_jiffies: u32,
    pub total_retrans: u32,
    pub lsndtime: u32,
    pub rcv_tstamp: u32,
    pub lrcvtime: u32,
    pub recv_queue: u32,
    pub send_queue: u32,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub family: u8,
    pub state: u8,
    pub flags: u8,
    pub keepalive_probes: u8,
    pub net_keepalive_probes: u8,
    pub net_retries2: u8,
    pub probes_out: u8,
    pub retransmits: u8,
    pub backoff: u8,
    pub pending: u8,
    pub _pad: [u8; 6],
}

/// One open socket of a process, as the `iter/task_file` owner walk
/// sees it: what `/proc/PID/fd/N -> socket:[ino]` says, without the
/// readlink per descriptor.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OwnerRow {
    /// The socket's inode number.
    pub ino: u64,
    /// The process (thread group id).
    pub pid: u32,
    pub _pad: u32,
}

/// Per-connection counters kept in the kernel (map `STATS`, keyed by
/// cookie), exact even when the ring buffer overflows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnStats {
    pub probes: u32,
    pub retransmit_segs: u32,
    pub resets_sent: u32,
    pub resets_received: u32,
    pub timeouts: u32,
    /// The last probe number seen (1..n unanswered).
    pub last_probe: u32,
}

/// Maximum number of ports in a kernel-side port filter.
pub const MAX_PORTS: usize = 8;
/// Maximum number of CIDRs in a kernel-side address filter.
pub const MAX_CIDRS: usize = 4;

/// One address filter entry: matches when the first `prefix_len` bits equal.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cidr {
    pub addr: [u8; 16],
    pub family: u8,
    pub prefix_len: u8,
    pub _pad: [u8; 6],
}

/// Runtime configuration, written by the daemon into the programs'
/// read-only data before load.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Address of `tcp_keepalive_timer` (from /proc/kallsyms). First (see
    /// [`Offsets::timer_function`]).
    pub keepalive_timer_fn: u64,
    /// Address of `tcp_write_timer` (0 when unknown).
    pub write_timer_fn: u64,
    pub offsets: Offsets,
    /// Bit `1 << kind` set: emit that kind.
    pub event_mask: u32,
    /// `tcp_send_reset` passes a reason argument (kernels >= 6.10).
    pub reset_has_reason: u32,
    /// Ports to keep (either side); all zero: no port filter.
    pub ports: [u16; MAX_PORTS],
    pub n_cidrs: u32,
    /// `tcp_retransmit_skb` passes the transmit result (kernels >= 6.12).
    pub retransmit_has_err: u32,
    /// Wake the reader only once this many bytes wait in the ring; it
    /// also polls on a short timer. Saves a wakeup (an IPI) per event.
    pub wakeup_bytes: u32,
    /// 1: keep each connecting process on its socket (socket storage,
    /// map `OWNERS`) for consumers that need owners inside the kernel
    /// (`tune`'s policy matching by process name). 0: the `→ SYN_SENT`
    /// event carries the process and userspace remembers it by cookie;
    /// no storage is created (no allocation per connection).
    pub owner_storage: u32,
    /// Bit `1 << state` set: emit the state changes into that state (when
    /// [`kind::STATE_CHANGE`] is wanted at all); 0: into every state. A
    /// `→ SYN_SENT` is emitted whatever this says: it carries the owner.
    pub state_mask: u32,
    /// 1: the socket walk writes only the rows the connection table keeps
    /// (full sockets, and TIME_WAIT minisocks still in FIN_WAIT2): the
    /// monitor's walks. 0: every socket (`snapshot --all` shows TIME_WAIT
    /// and request sockets too).
    pub walk_tracked_only: u32,
    pub cidrs: [Cidr; MAX_CIDRS],
    pub snap: SnapOffsets,
    pub tune: TuneOffsets,
}

/// Offsets the tuning programs need to find a socket's cgroup and its
/// ancestors (`sock.sk_cgrp_data.cgroup`, `cgroup.level`,
/// `cgroup.ancestors`, `cgroup.kn`, `kernfs_node.id`).
/// `u16::MAX` marks a field this kernel does not have.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TuneOffsets {
    pub sk_cgroup: u16,
    pub cgroup_level: u16,
    pub cgroup_ancestors: u16,
    pub cgroup_kn: u16,
    pub kernfs_id: u16,
    pub _pad: [u16; 3],
}

impl Config {
    /// All zero: no offsets, no events, no filters. A `const fn` (unlike
    /// `Default`) so it can initialise the programs' `static`.
    pub const fn zeroed() -> Self {
        // SAFETY: Config is repr(C) and made only of integers and arrays of
        // integers, for which all-zero bytes are a valid value.
        unsafe { core::mem::zeroed() }
    }
}

/// The process that owns a connection, learned where the kernel runs in
/// that process's context (connect).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub _pad: u32,
    pub comm: [u8; TASK_COMM_LEN],
}

/// State saved at `timer_expire_entry` for the socket timer running on this CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimerFrame {
    pub timer: u64,
    pub sk: u64,
    /// This CPU's TcpExt.TCPKeepAlive counter of the socket's namespace
    /// (0 when the kernel lacks the offsets to find it).
    pub mib_addr: u64,
    /// Its value when the callback started.
    pub keepalives_before: u64,
    /// flags::IN_KEEPALIVE_TIMER or flags::IN_WRITE_TIMER, 0 when idle.
    pub which: u32,
    /// `icsk_probes_out` when the callback started.
    pub probes_before: u32,
}

/// Names of the maps, shared so both sides agree.
pub mod maps {
    /// Each CPU's event ring (they share the name).
    pub const EVENTS: &str = "EVENTS";
    /// The array of the event rings, indexed by CPU.
    pub const EVENT_RINGS: &str = "EVENT_RINGS";
    pub const DROPS: &str = "DROPS";
    pub const NO_RING: &str = "NO_RING";
    pub const EMITTED: &str = "EMITTED";
    pub const OWNERS: &str = "OWNERS";
    pub const STATS: &str = "STATS";
}

// The kernel and userspace see these records through raw bytes: a field
// added, removed or reordered on one side only must not compile.
const _: () = {
    use core::mem::{align_of, offset_of, size_of};
    assert!(size_of::<RawEvent>() == 96 && align_of::<RawEvent>() == 8);
    assert!(size_of::<EventHead>() == 64 && align_of::<EventHead>() == 8);
    // The head is the event's first 64 bytes, field for field.
    assert!(offset_of!(RawEvent, ts_ns) == offset_of!(EventHead, ts_ns));
    assert!(offset_of!(RawEvent, cookie) == offset_of!(EventHead, cookie));
    assert!(offset_of!(RawEvent, netns) == offset_of!(EventHead, netns));
    assert!(offset_of!(RawEvent, kind) == offset_of!(EventHead, kind));
    assert!(offset_of!(RawEvent, family) == offset_of!(EventHead, family));
    assert!(offset_of!(RawEvent, state) == offset_of!(EventHead, state));
    assert!(offset_of!(RawEvent, flags) == offset_of!(EventHead, flags));
    assert!(offset_of!(RawEvent, sport) == offset_of!(EventHead, sport));
    assert!(offset_of!(RawEvent, dport) == offset_of!(EventHead, dport));
    assert!(offset_of!(RawEvent, old_state) == offset_of!(EventHead, old_state));
    assert!(offset_of!(RawEvent, new_state) == offset_of!(EventHead, new_state));
    assert!(offset_of!(RawEvent, probes_out) == offset_of!(EventHead, probes_out));
    assert!(offset_of!(RawEvent, saddr) == offset_of!(EventHead, saddr));
    assert!(offset_of!(RawEvent, daddr) == offset_of!(EventHead, daddr));
    assert!(offset_of!(RawEvent, pid) == EventHead::SIZE);
    assert!(offset_of!(RawEvent, kind) == 20);
    assert!(offset_of!(RawEvent, saddr) == 32);
    assert!(offset_of!(RawEvent, comm) == 80);
    assert!(size_of::<Offsets>() == 64 && align_of::<Offsets>() == 2);
    assert!(size_of::<SnapOffsets>() == 72 && align_of::<SnapOffsets>() == 2);
    assert!(size_of::<OwnerRow>() == 16 && align_of::<OwnerRow>() == 8);
    assert!(size_of::<SockRecord>() == 152 && align_of::<SockRecord>() == 8);
    assert!(size_of::<ConnStats>() == 24 && align_of::<ConnStats>() == 4);
    assert!(size_of::<Cidr>() == 24 && align_of::<Cidr>() == 1);
    assert!(size_of::<Owner>() == 24 && align_of::<Owner>() == 4);
    // The programs copy an owner into an event word by word.
    assert!(offset_of!(Owner, comm) == 8 && offset_of!(RawEvent, comm) % 4 == 0);
    assert!(size_of::<TimerFrame>() == 40 && align_of::<TimerFrame>() == 8);
    assert!(offset_of!(Config, event_mask) == 80);
    // The timer hooks' first test reads these three: one cache line.
    assert!(offset_of!(Config, write_timer_fn) == 8);
    assert!(offset_of!(Config, offsets) + offset_of!(Offsets, timer_function) == 16);
    assert!(offset_of!(Config, cidrs) == 128);
    assert!(size_of::<Config>() == 312 && align_of::<Config>() == 8);
    assert!(size_of::<TuneOffsets>() == 16);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all are repr(C), Copy, made only of integers and arrays of
    // integers, and every bit pattern is valid.
    unsafe impl aya::Pod for RawEvent {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for Owner {}
    unsafe impl aya::Pod for TimerFrame {}
    unsafe impl aya::Pod for SnapOffsets {}
    unsafe impl aya::Pod for SockRecord {}
    unsafe impl aya::Pod for OwnerRow {}
    unsafe impl aya::Pod for ConnStats {}
    unsafe impl aya::Pod for tune::TuneRule {}
    unsafe impl aya::Pod for tune::RuleSet {}
    unsafe impl aya::Pod for TuneOffsets {}
    unsafe impl aya::Pod for tune::TuneConfig {}
    unsafe impl aya::Pod for tune::TuneReport {}
    unsafe impl aya::Pod for tune::TuneState {}
    unsafe impl aya::Pod for tune::RateWindow {}
    unsafe impl aya::Pod for tune::DestKey {}
    unsafe impl aya::Pod for tune::KaValues {}
}
