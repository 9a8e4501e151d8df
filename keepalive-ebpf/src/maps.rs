//! The programs' configuration and maps: the per-CPU event rings, loss
//! counters, per-connection counters, socket-storage owners and per-CPU
//! scratch.

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    btf_maps::{ArrayOfMaps, RingBuf as BtfRingBuf, SkStorage},
    helpers::generated::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_sk_storage_get},
    macros::{btf_map, map},
    maps::{LruHashMap, PerCpuArray},
};
use keepalive_common::{
    Config, ConnStats, Offsets, Owner, RawEvent, SockRecord, TASK_COMM_LEN, TimerFrame,
};

/// Filled in by the daemon (`EbpfLoader::override_global`) before load.
#[unsafe(no_mangle)]
pub(crate) static CONFIG: Config = Config::zeroed();

/// The configuration, through a pointer the compiler cannot see through,
/// so it never folds the zeroed placeholder into the code.
#[inline(always)]
pub fn config() -> &'static Config {
    let p: *const Config = &raw const CONFIG;
    // SAFETY: reads back a local; the pointer is valid for 'static.
    unsafe { &*read_volatile(&p) }
}

/// One scalar configuration field: `conf!(offsets.skc_num)` is
/// `config().offsets.skc_num`, read with one load from the map value (a
/// volatile read, so the zeroed placeholder is never folded in; the
/// verifier still sees the loaded value as the constant it is, the map
/// being frozen). [`config`] would first store and reload the pointer
/// through the stack, for every field.
macro_rules! conf {
    ($($f:ident).+) => {
        $crate::maps::conf_field(&raw const $crate::maps::CONFIG.$($f).+)
    };
}

/// [`conf!`]'s read of one field of [`CONFIG`].
#[inline(always)]
pub fn conf_field<T: Copy>(field: *const T) -> T {
    // SAFETY: `conf!` passes a field of the configuration static.
    unsafe { read_volatile(field) }
}

/// One CPU's event ring. The size here is only the template the kernel
/// checks inner maps against (it does not compare ring sizes): the daemon
/// creates each CPU's ring with the size it chose.
pub type EventRing = BtfRingBuf<RawEvent, { 1 << 16 }>;

/// Every CPU's event ring, at its CPU number (the daemon sizes the array
/// to the possible CPUs and fills the slots of the online ones). A ring
/// per CPU: programs on two CPUs never write to one ring, which under the
/// bench's churn took away its slowest rounds (docs/benchmarks.md §13).
#[btf_map]
pub static EVENT_RINGS: ArrayOfMaps<EventRing, 1> = ArrayOfMaps::new();

/// Events that did not fit in their CPU's ring, per CPU.
#[map]
pub static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Events on a CPU that had no ring yet (brought online after the daemon
/// started, until the reader installs its ring), per CPU.
#[map]
pub static NO_RING: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Events the programs tried to emit (after filtering), per CPU.
#[map]
pub static EMITTED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The owning process, stored on the socket itself (learned at connect(),
/// freed with the socket): a lookup is a pointer chase, not a hash.
#[btf_map]
static OWNERS: SkStorage<Owner> = SkStorage::new();

const BPF_SK_STORAGE_GET_F_CREATE: u64 = 1;

/// Socket cookie -> counters, updated whatever the ring buffer does.
#[map]
static STATS: LruHashMap<u64, ConnStats> = LruHashMap::with_max_entries(65536, 0);

/// Scratch space for one snapshot row (too big for the BPF stack).
#[map]
pub static SNAP_ROW: PerCpuArray<SockRecord> = PerCpuArray::with_max_entries(1, 0);

/// The socket timer (keepalive or retransmit) running on this CPU.
#[map]
pub static TIMER: PerCpuArray<TimerFrame> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's per-CPU area offset (the kernel's `__per_cpu_offset[cpu]`),
/// learned once per CPU, 0 until then.
#[map]
static CPU_AREA: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's per-CPU area offset: what turns a kernel `__percpu` pointer
/// into this CPU's copy. 0 when the kernel lacks `bpf_array.pptrs`.
///
/// The kernel does not export `__per_cpu_offset` here (no data symbols
/// in kallsyms), but a per-CPU array map shows it: a lookup returns this
/// CPU's copy of the slot, `bpf_array.pptrs[0]` holds the slot's per-CPU
/// pointer, and the difference is the offset. Storing a pointer in a map
/// value and loading it back turns it into a number (allowed to programs
/// loaded with CAP_PERFMON, which the monitor needs anyway).
#[inline(always)]
pub fn this_cpu_offset() -> u64 {
    let Some(slot) = CPU_AREA.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU slot of this map; nothing else on this CPU runs
    // between these accesses (the timer softirq does not nest).
    unsafe {
        let known = read_volatile(slot);
        if known != 0 || conf!(offsets.bpf_array_pptrs) == Offsets::MISSING {
            return known;
        }
        write_volatile(slot, slot as u64);
        let here = read_volatile(slot);
        write_volatile(slot, core::ptr::from_ref(&CPU_AREA) as u64);
        let map = read_volatile(slot) as *const u8;
        let base: u64 = crate::mem::read(map, conf!(offsets.bpf_array_pptrs));
        let offset = if base == 0 {
            0
        } else {
            here.wrapping_sub(base)
        };
        write_volatile(slot, offset);
        offset
    }
}

/// The owner stored on a trusted socket, if any.
#[inline(always)]
pub fn owner_of(sk: *const u8) -> Option<Owner> {
    // SAFETY: trusted socket pointer; the map pointer is the map's address.
    let p = unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&OWNERS).cast_mut().cast(),
            sk as *mut _,
            core::ptr::null_mut(),
            0,
        )
    } as *const Owner;
    if p.is_null() {
        None
    } else {
        // SAFETY: non-null storage of our value type.
        Some(unsafe { *p })
    }
}

/// The owner stored on a trusted socket, null when none.
#[inline(always)]
pub fn owner_ptr(sk: *const u8) -> *const Owner {
    // SAFETY: trusted socket pointer; the map pointer is the map's address.
    unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&OWNERS).cast_mut().cast(),
            sk as *mut _,
            core::ptr::null_mut(),
            0,
        )
    }
    .cast()
}

/// Stores the current process as the owner of a trusted socket (creating
/// the storage, zeroed, and writing the fields in place: no copy through
/// the stack); returns the storage, null when it could not be created.
#[inline(always)]
pub fn set_owner_to_current(sk: *const u8) -> *const Owner {
    // SAFETY: trusted socket pointer; the storage is created zeroed.
    let p = unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&OWNERS).cast_mut().cast(),
            sk as *mut _,
            core::ptr::null_mut(),
            BPF_SK_STORAGE_GET_F_CREATE,
        )
    } as *mut Owner;
    if p.is_null() {
        return p;
    }
    // SAFETY: our storage value; the helpers write within it.
    unsafe {
        (*p).pid = (bpf_get_current_pid_tgid() >> 32) as u32;
        bpf_get_current_comm(
            core::ptr::addr_of_mut!((*p).comm).cast(),
            TASK_COMM_LEN as u32,
        );
    }
    p
}

/// True when a consumer in the kernel needs owners on the sockets
/// ([`Config::owner_storage`]).
#[inline(always)]
pub fn owner_storage() -> bool {
    conf!(owner_storage) != 0
}

/// Writes the current process into `ev` as its owner (helpers writing
/// straight into the record: no storage, no copy).
#[inline(always)]
pub fn current_owner_into(ev: &mut keepalive_common::RawEvent) {
    // SAFETY: helpers writing within the event's own fields.
    unsafe {
        ev.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
        bpf_get_current_comm(ev.comm.as_mut_ptr().cast(), TASK_COMM_LEN as u32);
    }
}

/// True when a consumer asked for events of kind `k`.
#[inline(always)]
pub fn wanted(k: u8) -> bool {
    conf!(event_mask) & (1u32 << k) != 0
}

/// True when a consumer asked for state changes into `state`
/// ([`Config::state_mask`]; the caller checks the kind).
#[inline(always)]
pub fn wanted_state(state: u32) -> bool {
    let mask = conf!(state_mask);
    mask == 0 || mask & (1u32 << (state & 31)) != 0
}

/// Adds one to a per-CPU counter.
#[inline(always)]
pub fn bump(counter: &PerCpuArray<u64>) {
    if let Some(p) = counter.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}

/// Applies `f` to the counters of connection `cookie`, creating them.
#[inline(always)]
pub fn count(cookie: u64, f: impl FnOnce(&mut ConnStats)) {
    if cookie == 0 {
        return;
    }
    let mut p = STATS.get_ptr_mut(cookie);
    if p.is_none() {
        let _ = STATS.insert(cookie, ConnStats::default(), 0);
        p = STATS.get_ptr_mut(cookie);
    }
    if let Some(p) = p {
        // SAFETY: map value pointer; concurrent updates of one connection
        // are serialised by the socket lock the hooks run under.
        f(unsafe { &mut *p });
    }
}
