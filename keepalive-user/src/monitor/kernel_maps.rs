//! The monitor's maps in the kernel: the per-CPU emit and drop counters
//! and the per-connection counters (the event rings are
//! [`crate::kernel::event_rings`]), and the decoding of a ring record.

use anyhow::{Context, Result};
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray};
use keepalive_common::{ConnStats, RawEvent, maps};

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

/// A ring record as the kernel wrote it; `None` when it is too short.
pub(super) fn parse(bytes: &[u8]) -> Option<RawEvent> {
    if bytes.len() < size_of::<RawEvent>() {
        return None;
    }
    // SAFETY: RawEvent is plain old data and the slice is long enough.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) })
}
