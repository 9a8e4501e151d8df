//! Event emission: the kernel-side filters, the owner, and the write to
//! this CPU's event ring, with every event counted as emitted or dropped.

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    helpers::generated::{bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_ringbuf_query},
    maps::ring_buf::RingBufEntry,
};
use keepalive_common::{
    EventHead, Offsets, Owner, RawEvent, TASK_COMM_LEN,
    filter::{addrs_match, ports_match},
};

use crate::maps::{
    DROPS, EMITTED, EVENT_RINGS, EventRing, NO_RING, bump, config, owner_ptr, owner_storage,
};
use crate::mem::load;

const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;

/// A record the programs write into a ring: a whole [`RawEvent`], or its
/// [`EventHead`] alone when the event carries nothing more.
pub trait Record: Sized + 'static {
    /// Its 8-byte words.
    const WORDS: usize = core::mem::size_of::<Self>() / 8;
    fn head(&mut self) -> &mut EventHead;
    /// Adds the owner kept on a trusted socket ([`add_stored_owner`]);
    /// a head has nowhere to put one.
    #[inline(always)]
    fn add_stored_owner(&mut self, _trusted_sk: *const u8) {}
}

impl Record for RawEvent {
    #[inline(always)]
    fn head(&mut self) -> &mut EventHead {
        self.head_mut()
    }
    #[inline(always)]
    fn add_stored_owner(&mut self, trusted_sk: *const u8) {
        add_stored_owner(self, trusted_sk)
    }
}

impl Record for EventHead {
    #[inline(always)]
    fn head(&mut self) -> &mut EventHead {
        self
    }
}

const _: () = assert!(core::mem::size_of::<RawEvent>().is_multiple_of(8));
const _: () = assert!(core::mem::size_of::<EventHead>().is_multiple_of(8));

/// Zeroes `slot` with word stores and makes it an event of kind `kind`.
///
/// `RawEvent { .., ..Default::default() }` compiles to a call of the
/// linker's byte-by-byte `memset` (hundreds of instructions per event),
/// and moving an event copies it byte by byte as well: the event is built
/// where it stays (its ring slot, or a stack slot when filtered first). Ring
/// memory is not cleared by the kernel, so every byte is written.
#[inline(always)]
pub fn zeroed_event<R: Record>(
    slot: &mut core::mem::MaybeUninit<R>,
    kind: u8,
    cookie: u64,
) -> &mut R {
    let p = slot.as_mut_ptr().cast::<u64>();
    let mut i = 0;
    while i < R::WORDS {
        // SAFETY: within the record, 8-aligned (both records' alignment).
        unsafe { write_volatile(p.add(i), 0) };
        i += 1;
    }
    // SAFETY: every byte was written; all-zero is a valid record.
    let ev = unsafe { slot.assume_init_mut() };
    let h = ev.head();
    h.kind = kind;
    h.cookie = cookie;
    ev
}

/// Copies `ev` into a ring slot with 8-byte loads and stores (a plain
/// struct copy is the byte-by-byte `memmove` loop).
#[inline(always)]
fn copy_event<R: Record>(dst: *mut R, ev: &R) {
    let (d, s) = (dst.cast::<u64>(), core::ptr::from_ref(ev).cast::<u64>());
    let mut i = 0;
    while i < R::WORDS {
        // SAFETY: both are whole, 8-aligned records.
        unsafe { write_volatile(d.add(i), read_volatile(s.add(i))) };
        i += 1;
    }
}

/// True when the configuration has a kernel-side port or address filter
/// (a constant to the verifier, which keeps only one of [`emit`]'s paths).
#[inline(always)]
fn has_filters() -> bool {
    let c = config();
    c.ports[0] != 0 || c.n_cidrs != 0
}

/// Kernel-side port and address filters; userspace applies the rest.
#[inline(always)]
fn passes_filters(ev: &EventHead) -> bool {
    let c = config();
    ports_match(&c.ports, ev.sport, ev.dport)
        && addrs_match(
            &c.cidrs,
            c.n_cidrs as usize,
            ev.family,
            &ev.saddr,
            &ev.daddr,
        )
}

/// False when no BPF program stored anything on the socket (the server
/// side of every accepted connection, for one): a load and a compare
/// instead of a storage lookup that would find nothing.
#[inline(always)]
fn has_storage(sk: *const u8) -> bool {
    let off = conf!(offsets.sk_bpf_storage);
    off == Offsets::MISSING || load::<u64>(sk, off) != 0
}

/// Copies the owner in socket storage `o` into the event, word by word
/// (a `comm` array copy is a byte loop in BPF).
#[inline(always)]
pub fn copy_owner(ev: &mut RawEvent, o: *const Owner) {
    let src = o.cast::<u32>();
    // SAFETY: `o` is our storage value (pid, pad, 16-byte comm at 8); pid
    // and comm are 4-aligned in both records (keepalive-common asserts).
    unsafe {
        ev.pid = read_volatile(src);
        let comm = ev.comm.as_mut_ptr().cast::<u32>();
        let mut i = 0;
        while i < TASK_COMM_LEN / 4 {
            write_volatile(comm.add(i), read_volatile(src.add(2 + i)));
            i += 1;
        }
    }
}

/// The owner kept on a trusted socket, when owners are kept on sockets
/// ([`owner_storage`]; the timer hooks cannot reach socket storage and
/// pass null). Otherwise userspace puts the owner it remembers by cookie
/// on the event.
#[inline(always)]
fn add_stored_owner(ev: &mut RawEvent, trusted_sk: *const u8) {
    if owner_storage() && !trusted_sk.is_null() && has_storage(trusted_sk) {
        let o = owner_ptr(trusted_sk);
        if !o.is_null() {
            copy_owner(ev, o);
        }
    }
}

/// Emits an event of kind `kind` for connection `cookie`: `fill` writes
/// its fields (the rest stay zero), the owner kept on `trusted_sk` is
/// added (null: none), then the port and address filters decide.
#[inline(always)]
pub fn emit(kind: u8, cookie: u64, trusted_sk: *const u8, fill: impl FnOnce(&mut RawEvent)) {
    emit_record::<RawEvent>(kind, cookie, trusted_sk, fill);
}

/// Emits an event that carries nothing beyond the [`EventHead`] (a state
/// change without its owner, a keepalive probe) as a 64-byte record: one
/// cache line of ring where a whole event takes a line and a half, for
/// most of what the hooks write (docs/benchmarks.md §16). Userspace reads
/// it back with the rest zero.
#[inline(always)]
pub fn emit_head(kind: u8, cookie: u64, fill: impl FnOnce(&mut EventHead)) {
    emit_record::<EventHead>(kind, cookie, core::ptr::null(), fill);
}

/// [`emit`] and [`emit_head`], for a record of type `R`.
///
/// Without filters the event is built in place, in a reserved ring slot:
/// no copy through the stack, and an event that does not fit costs
/// nothing but its count. With filters it is built on the stack first,
/// so an event filtered out costs no reservation. `fill` has one call
/// site either way, so it is inlined (a closure called from two places
/// becomes a BPF subprogram reading its captures through the stack).
#[inline(always)]
fn emit_record<R: Record>(kind: u8, cookie: u64, trusted_sk: *const u8, fill: impl FnOnce(&mut R)) {
    let mut stack = core::mem::MaybeUninit::<R>::uninit();
    let mut slot = None;
    if !has_filters() {
        slot = reserve_counted::<R>();
        if slot.is_none() {
            return;
        }
    }
    let ev: *mut R = match slot.as_mut() {
        Some((s, _)) => zeroed_event(s, kind, cookie),
        None => zeroed_event(&mut stack, kind, cookie),
    };
    // SAFETY: `ev` is the slot or the stack event, whole and initialised;
    // nothing else refers to it until it is submitted.
    let ev = unsafe { &mut *ev };
    fill(ev);
    ev.add_stored_owner(trusted_sk);
    if let Some((s, ring)) = slot {
        stamp_and_submit(s, ring);
        return;
    }
    if !passes_filters(ev.head()) {
        return;
    }
    if let Some((mut s, ring)) = reserve_counted::<R>() {
        copy_event(s.as_mut_ptr(), ev);
        stamp_and_submit(s, ring);
    }
}

/// A slot for one event in this CPU's ring (and the ring), the event
/// counted as emitted, and as dropped when the ring is full ([`DROPS`]) or
/// the CPU has none yet ([`NO_RING`]: brought online after the daemon
/// started), so emitted == written + lost.
#[inline(always)]
fn reserve_counted<R: Record>() -> Option<(RingBufEntry<R>, &'static EventRing)> {
    bump(&EMITTED);
    // SAFETY: helper without arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let Some(ring) = EVENT_RINGS.get(cpu) else {
        bump(&NO_RING);
        return None;
    };
    let Some(slot) = ring.reserve_untyped::<R>(0) else {
        bump(&DROPS);
        return None;
    };
    Some((slot, ring))
}

/// Timestamps the event in `slot` and hands it to the reader.
#[inline(always)]
fn stamp_and_submit<R: Record>(mut slot: RingBufEntry<R>, ring: &EventRing) {
    // SAFETY: helper without arguments; the slot holds a whole record.
    unsafe { (*slot.as_mut_ptr()).head().ts_ns = bpf_ktime_get_ns() };
    // A wakeup per event costs an IPI; wake the reader only when
    // enough has piled up in this ring (it polls on a timer for the
    // rest). Only the record that crosses the threshold wakes it, so a
    // lagging reader is not woken once per event.
    // SAFETY: the ring is a map the outer array handed out.
    let avail = unsafe {
        bpf_ringbuf_query(
            core::ptr::from_ref(ring).cast_mut().cast(),
            BPF_RB_AVAIL_DATA,
        )
    };
    let threshold = conf!(wakeup_bytes) as u64;
    let size = (core::mem::size_of::<R>() + 8) as u64;
    let flags = if avail >= threshold && avail < threshold + size {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    slot.submit(flags);
}
