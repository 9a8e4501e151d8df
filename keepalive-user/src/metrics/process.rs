//! The monitor's own cost, read on each scrape: CPU seconds and resident
//! memory from /proc/self, and how full the per-CPU event rings are, read
//! from each ring's producer and consumer positions (the pages the kernel
//! shares with its reader).

use std::sync::Mutex;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use keepalive_common::maps;

/// `BPF_MAP_TYPE_RINGBUF`.
const MAP_TYPE_RINGBUF: u32 = 27;

/// Read-only views of a ring buffer's consumer and producer positions.
#[derive(Debug)]
pub struct RingFill {
    consumer: *const u64,
    producer: *const u64,
    page: usize,
    /// Data area size in bytes.
    pub size: u64,
}

// SAFETY: the pages are mapped read-only for the life of the value and
// only read with volatile loads.
unsafe impl Send for RingFill {}
unsafe impl Sync for RingFill {}

impl RingFill {
    /// Maps the positions of the ring buffer open at `fd` (max_entries `size`).
    pub fn map(fd: i32, size: u64) -> std::io::Result<RingFill> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let map = |offset: usize| -> std::io::Result<*const u64> {
            // SAFETY: a fresh read-only shared mapping of one page of a
            // ring buffer fd; the kernel allows read-only maps of both pages.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    page,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    fd,
                    offset as libc::off_t,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
            Ok(p as *const u64)
        };
        let consumer = map(0)?;
        let producer = match map(page) {
            Ok(p) => p,
            Err(e) => {
                // SAFETY: unmapping what we just mapped.
                unsafe { libc::munmap(consumer as *mut _, page) };
                return Err(e);
            }
        };
        Ok(RingFill {
            consumer,
            producer,
            page,
            size,
        })
    }

    /// Finds this process's own event rings (the `EVENTS` ring buffer maps,
    /// one per CPU, among our open fds) and maps their positions.
    pub fn find_own() -> Vec<RingFill> {
        let mut rings = Vec::new();
        let Ok(dir) = std::fs::read_dir("/proc/self/fdinfo") else {
            return rings;
        };
        for entry in dir.flatten() {
            let Ok(text) = std::fs::read_to_string(entry.path()) else {
                continue;
            };
            let field = |name: &str| -> Option<u64> {
                text.lines()
                    .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            };
            if field("map_type:") != Some(MAP_TYPE_RINGBUF as u64) {
                continue;
            }
            let (Some(id), Some(size)) = (field("map_id:"), field("max_entries:")) else {
                continue;
            };
            let named = aya::maps::MapInfo::from_id(id as u32)
                .ok()
                .is_some_and(|i| i.name_as_str() == Some(maps::EVENTS));
            let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if named && let Ok(r) = RingFill::map(fd, size) {
                rings.push(r);
            }
        }
        rings
    }

    /// Bytes written by the kernel and not yet consumed.
    pub fn pending(&self) -> u64 {
        // SAFETY: both pointers are live read-only mappings of the ring's
        // position pages; the kernel updates them concurrently.
        let (cons, prod) = unsafe {
            (
                std::ptr::read_volatile(self.consumer),
                std::ptr::read_volatile(self.producer),
            )
        };
        prod.saturating_sub(cons)
    }

    /// Fraction of the ring in use, 0 to 1.
    pub fn ratio(&self) -> f64 {
        if self.size == 0 {
            return 0.0;
        }
        (self.pending() as f64 / self.size as f64).min(1.0)
    }
}

impl Drop for RingFill {
    fn drop(&mut self) {
        // SAFETY: both were mapped by `map` with this length.
        unsafe {
            libc::munmap(self.consumer as *mut _, self.page);
            libc::munmap(self.producer as *mut _, self.page);
        }
    }
}

/// CPU time (user + system) and resident set size of this process.
pub fn self_usage() -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which may hold spaces: state is 3rd,
    // utime the 14th and stime the 15th of the whole line.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let (tck, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let rss_pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some((
        (utime + stime) as f64 / tck.max(1) as f64,
        rss_pages * page.max(1) as u64,
    ))
}

/// Process metrics computed on each scrape.
#[derive(Debug, Default)]
pub struct ProcessCollector {
    /// Every CPU's event ring.
    pub ring: Mutex<Vec<RingFill>>,
}

impl ProcessCollector {
    /// Starts reporting the fill of this process's event rings (call once
    /// the monitor has created them).
    pub fn watch_own_ring(&self) {
        if let Ok(mut r) = self.ring.lock() {
            *r = RingFill::find_own();
        }
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some((cpu, rss)) = self_usage() {
            let c = ConstCounter::new(cpu);
            c.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time of the keepalive process.",
                None,
                c.metric_type(),
            )?)?;
            let g = ConstGauge::new(rss as i64);
            g.encode(encoder.encode_descriptor(
                "process_resident_memory_bytes",
                "Resident memory of the keepalive process.",
                None,
                g.metric_type(),
            )?)?;
        }
        if let Ok(rings) = self.ring.lock()
            && !rings.is_empty()
        {
            // The fullest ring: a CPU loses events when its own ring is full,
            // whatever the others hold.
            let fullest = rings.iter().map(RingFill::ratio).fold(0.0, f64::max);
            let g = ConstGauge::new(fullest);
            g.encode(encoder.encode_descriptor(
                "keepalive_ring_fill_ratio",
                "Fraction of the fullest per-CPU event ring written and not yet read.",
                None,
                g.metric_type(),
            )?)?;
            let g = ConstGauge::new(rings.iter().map(|r| r.size as i64).sum::<i64>());
            g.encode(encoder.encode_descriptor(
                "keepalive_ring_size_bytes",
                "Size of the event ring buffers, all CPUs together.",
                None,
                g.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_usage_is_read_from_proc() {
        let (cpu, rss) = self_usage().expect("/proc/self readable");
        assert!(cpu >= 0.0);
        assert!(rss > 1 << 20, "rss {rss}");
    }
}
