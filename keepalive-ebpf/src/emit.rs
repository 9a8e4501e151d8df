//! Event emission: the kernel-side filters, the owner, and the write to
//! the ring buffer, with every event counted as emitted or dropped.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use keepalive_common::{
    Offsets, RawEvent,
    filter::{addrs_match, ports_match},
};

use crate::maps::{DROPS, EMITTED, EVENTS, bump, config, owner_of};
use crate::mem::load;

const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;

/// Kernel-side port and address filters; userspace applies the rest.
#[inline(always)]
fn passes_filters(ev: &RawEvent) -> bool {
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

/// Adds the owner learned at connect time (for trusted sockets; the
/// timer hooks cannot reach socket storage and leave it to userspace),
/// then filters and submits.
#[inline(always)]
pub fn emit(ev: &mut RawEvent, trusted_sk: *const u8) {
    if !passes_filters(ev) {
        return;
    }
    if !trusted_sk.is_null()
        && has_storage(trusted_sk)
        && let Some(o) = owner_of(trusted_sk)
    {
        ev.pid = o.pid;
        ev.comm = o.comm;
    }
    // SAFETY: helper without arguments.
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    bump(&EMITTED);
    match EVENTS.reserve::<RawEvent>(0) {
        Some(mut slot) => {
            slot.write(*ev);
            // A wakeup per event costs an IPI; wake the reader only when
            // enough has piled up (it polls on a timer for the rest).
            // Only the record that crosses the threshold wakes it, so a
            // lagging reader is not woken once per event.
            let avail = EVENTS.query(BPF_RB_AVAIL_DATA);
            let threshold = conf!(wakeup_bytes) as u64;
            let size = (core::mem::size_of::<RawEvent>() + 8) as u64;
            let flags = if avail >= threshold && avail < threshold + size {
                BPF_RB_FORCE_WAKEUP
            } else {
                BPF_RB_NO_WAKEUP
            };
            slot.submit(flags);
        }
        None => bump(&DROPS),
    }
}
