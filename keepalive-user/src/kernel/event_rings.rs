//! The event rings: one ring buffer per online CPU, how `--ring-size` is
//! split among them, and putting them in the programs' `EVENT_RINGS` array
//! (each program writes to its own CPU's ring, never to one another CPU
//! writes: docs/benchmarks.md §13).
//!
//! `--ring-size` is the total at the start: each online CPU gets an equal share,
//! rounded down to a power of two and at least a page (the kernel's
//! smallest ring), so the rings never take more than asked unless the
//! share would be under a page (`--ring-size 4096` on 2 CPUs: two 4 KiB
//! rings). A 64-CPU host with the default 4 MiB has 64 KiB per CPU.
//!
//! The array has a slot for every possible CPU; the CPUs online at start
//! get a ring before any program is attached. A CPU brought online later
//! gets one from [`RingAdder`], which the reader asks every
//! [`ONLINE_CHECK`]: until then an event on that CPU finds no ring and is
//! counted as lost by the kernel (apart from the ring-full drops, never
//! silently). Its ring has the size of the others, so the total then
//! exceeds `--ring-size` by a share. A CPU taken offline keeps its ring for
//! when it comes back.

use std::collections::BTreeSet;
use std::os::fd::AsFd;
use std::time::Duration;

use anyhow::{Context, Result};
use aya::maps::{ArrayOfMaps, Map, MapData, RingBuf};
use keepalive_common::maps;

/// How often the reader looks for CPUs brought online since the last look
/// (one read of a small sysfs file).
pub const ONLINE_CHECK: Duration = Duration::from_millis(250);

/// `BPF_MAP_TYPE_RINGBUF`.
const MAP_TYPE_RINGBUF: u32 = 27;

/// Which CPUs get a ring, and how big each is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingPlan {
    /// The online CPUs (their numbers index `EVENT_RINGS`).
    pub cpus: Vec<u32>,
    /// Bytes of each CPU's ring.
    pub bytes_each: u32,
}

impl RingPlan {
    /// The plan for `total` bytes on this host's online CPUs.
    pub fn for_host(total: u32) -> Result<RingPlan> {
        let cpus =
            aya::util::online_cpus().map_err(|(path, e)| anyhow::anyhow!("reading {path}: {e}"))?;
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        Ok(RingPlan::new(total, cpus, page.max(4096) as u32))
    }

    /// The plan for `total` bytes shared by `cpus`, with pages of `page`
    /// bytes (a power of two).
    pub fn new(total: u32, cpus: Vec<u32>, page: u32) -> RingPlan {
        let share = total / (cpus.len().max(1) as u32);
        let floor = if share == 0 {
            0
        } else {
            1u32 << (31 - share.leading_zeros())
        };
        RingPlan {
            cpus,
            bytes_each: floor.max(page),
        }
    }

    /// Bytes of every ring together.
    pub fn total(&self) -> usize {
        self.cpus.len() * self.bytes_each as usize
    }
}

/// Creates the plan's rings and puts each in its CPU's slot of the
/// programs' `EVENT_RINGS` array; returns them in CPU order (the reader's
/// ends) and what adds the rings of CPUs brought online later. Called
/// before any program is attached, so no event finds its CPU without a
/// ring.
pub fn create(ebpf: &mut aya::Ebpf, plan: &RingPlan) -> Result<(Vec<RingBuf<MapData>>, RingAdder)> {
    let outer = ebpf
        .map(maps::EVENT_RINGS)
        .with_context(|| format!("map {} missing from the eBPF object", maps::EVENT_RINGS))?;
    let Map::ArrayOfMaps(outer) = outer else {
        anyhow::bail!("map {} is not an array of maps", maps::EVENT_RINGS);
    };
    // A handle of the adder's own (the reader thread keeps it), on the
    // same kernel map.
    let fd = outer
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .context("duplicating the event ring array's descriptor")?;
    let outer: ArrayOfMaps<MapData, RingBuf<MapData>> = ArrayOfMaps::try_from(Map::ArrayOfMaps(
        MapData::from_fd(fd).context("the event ring array")?,
    ))
    .context("the event ring array")?;
    let mut adder = RingAdder {
        slots: outer.len(),
        outer,
        bytes_each: plan.bytes_each,
        have: BTreeSet::new(),
    };
    let rings = plan
        .cpus
        .iter()
        .map(|&cpu| adder.add(cpu))
        .collect::<Result<_>>()?;
    Ok((rings, adder))
}

/// Creates and installs the rings of CPUs that come online after start.
pub struct RingAdder {
    outer: ArrayOfMaps<MapData, RingBuf<MapData>>,
    bytes_each: u32,
    /// Slots of the array (the possible CPUs).
    slots: u32,
    /// CPUs that have a ring, or whose ring could not be made.
    have: BTreeSet<u32>,
}

impl RingAdder {
    /// Gives CPU `cpu` its ring: created, put in its slot, and returned for
    /// the reader. A CPU whose ring cannot be made is not tried again (its
    /// events stay counted as lost).
    pub fn add(&mut self, cpu: u32) -> Result<RingBuf<MapData>> {
        self.have.insert(cpu);
        let bytes = self.bytes_each;
        let def = aya_obj::Map::new_from_params(MAP_TYPE_RINGBUF, 0, 0, bytes, 0);
        // Every ring carries the one name, so the metrics find them all.
        let data = MapData::create(def, maps::EVENTS, None)
            .with_context(|| format!("creating the event ring of CPU {cpu} ({bytes} bytes)"))?;
        let ring = RingBuf::try_from(Map::RingBuf(data))
            .with_context(|| format!("mapping the event ring of CPU {cpu}"))?;
        self.outer
            .set(cpu, &ring, 0)
            .with_context(|| format!("installing the event ring of CPU {cpu}"))?;
        Ok(ring)
    }

    /// The online CPUs without a ring (and with a slot: a CPU number
    /// beyond the possible ones cannot come online).
    pub fn missing(&self) -> Result<Vec<u32>> {
        let online =
            aya::util::online_cpus().map_err(|(path, e)| anyhow::anyhow!("reading {path}: {e}"))?;
        Ok(online
            .into_iter()
            .filter(|c| *c < self.slots && !self.have.contains(c))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_total_is_split_evenly_in_powers_of_two() {
        let p = RingPlan::new(4 << 20, vec![0, 1], 4096);
        assert_eq!(p.bytes_each, 2 << 20);
        assert_eq!(p.total(), 4 << 20);
        // Three CPUs: 1.33 MiB each rounds down to 1 MiB.
        let p = RingPlan::new(4 << 20, vec![0, 1, 2], 4096);
        assert_eq!(p.bytes_each, 1 << 20);
        assert_eq!(p.total(), 3 << 20);
        let p = RingPlan::new(4 << 20, (0..64).collect(), 4096);
        assert_eq!(p.bytes_each, 64 << 10);
        assert_eq!(p.total(), 4 << 20);
    }

    #[test]
    fn no_ring_is_smaller_than_a_page() {
        let p = RingPlan::new(4096, vec![0, 1], 4096);
        assert_eq!(p.bytes_each, 4096);
        assert_eq!(p.total(), 8192);
        let p = RingPlan::new(64 << 10, vec![0], 64 << 10);
        assert_eq!(p.bytes_each, 64 << 10);
        let p = RingPlan::new(4096, (0..256).collect(), 16384);
        assert_eq!(p.bytes_each, 16384);
    }

    #[test]
    fn one_cpu_takes_it_all() {
        let p = RingPlan::new(256 << 20, vec![3], 4096);
        assert_eq!(
            (p.cpus.as_slice(), p.bytes_each),
            ([3u32].as_slice(), 256 << 20)
        );
    }
}
