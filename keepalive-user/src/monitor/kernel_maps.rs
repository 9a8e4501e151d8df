//! The monitor's maps in the kernel: the per-CPU emit and drop counters
//! and the per-connection counters (the event rings are
//! [`crate::kernel::event_rings`]), and the decoding of a ring record.

use anyhow::{Context, Result};
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray};
use keepalive_common::{ConnStats, EventHead, RawEvent, maps};

pub(super) struct KernelMaps {
    drops: PerCpuArray<MapData, u64>,
    no_ring: PerCpuArray<MapData, u64>,
    emitted: PerCpuArray<MapData, u64>,
    stats: BpfHashMap<MapData, u64, ConnStats>,
}

fn take(ebpf: &mut aya::Ebpf, name: &str) -> Result<aya::maps::Map> {
    ebpf.take_map(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))
}

fn sum(counter: &PerCpuArray<MapData, u64>) -> u64 {
    counter.get(&0, 0).map(|v| v.iter().sum()).unwrap_or(0)
}

impl KernelMaps {
    /// Takes the maps out of the object, so they stay readable after the
    /// programs are detached.
    pub(super) fn take(ebpf: &mut aya::Ebpf) -> Result<KernelMaps> {
        Ok(KernelMaps {
            drops: PerCpuArray::try_from(take(ebpf, maps::DROPS)?).context("the drop counters")?,
            no_ring: PerCpuArray::try_from(take(ebpf, maps::NO_RING)?)
                .context("the no-ring drop counters")?,
            emitted: PerCpuArray::try_from(take(ebpf, maps::EMITTED)?)
                .context("the emit counters")?,
            stats: BpfHashMap::try_from(take(ebpf, maps::STATS)?)
                .context("the per-connection counters")?,
        })
    }

    /// Events the kernel could not queue, on every CPU: (in all, of which
    /// on a CPU that had no ring yet).
    pub(super) fn dropped(&self) -> (u64, u64) {
        let no_ring = sum(&self.no_ring);
        (sum(&self.drops) + no_ring, no_ring)
    }

    /// Events the kernel emitted (queued or dropped), on every CPU.
    pub(super) fn emitted(&self) -> u64 {
        sum(&self.emitted)
    }

    /// The kernel's per-connection counters.
    pub(super) fn conn_stats(&self) -> impl Iterator<Item = (u64, ConnStats)> + '_ {
        self.stats.iter().filter_map(Result::ok)
    }
}

/// A ring record as the kernel wrote it: a whole event, or its head alone
/// (the rest then zero); `None` when it is shorter than a head.
pub(super) fn parse(bytes: &[u8]) -> Option<RawEvent> {
    if bytes.len() >= size_of::<RawEvent>() {
        // SAFETY: RawEvent is plain old data and the slice is long enough.
        return Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) });
    }
    if bytes.len() >= EventHead::SIZE {
        // SAFETY: as above, for the head.
        let head: EventHead = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        return Some(RawEvent::from_head(&head));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of<T>(v: &T) -> Vec<u8> {
        // SAFETY: plain old data, read as bytes.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    #[test]
    fn a_head_alone_reads_as_the_event_with_the_rest_zero() {
        let ev = RawEvent {
            ts_ns: 7,
            cookie: 42,
            netns: 4026531840,
            kind: 1,
            family: 2,
            state: 1,
            flags: 3,
            sport: 80,
            dport: 5555,
            old_state: 1,
            new_state: 4,
            probes_out: 2,
            saddr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            daddr: [10, 1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ..RawEvent::default()
        };
        let whole = bytes_of(&ev);
        assert_eq!(parse(&whole), Some(ev));
        assert_eq!(parse(&whole[..EventHead::SIZE]), Some(ev));
        // A tail, when written, is read too; a record shorter than a head
        // is not an event.
        let owned = RawEvent {
            pid: 9,
            comm: *b"app\0\0\0\0\0\0\0\0\0\0\0\0\0",
            ..ev
        };
        assert_eq!(parse(&bytes_of(&owned)), Some(owned));
        assert_eq!(parse(&whole[..EventHead::SIZE - 1]), None);
    }
}
