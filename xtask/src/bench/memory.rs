//! Where a process's resident memory is (for `bench --soak`): its resident
//! set and peak from /proc/PID/status, split by what backs it, with the
//! BPF maps it has mapped (the ring buffer) apart from the program's code.

use std::fs;

use anyhow::{Context, Result, anyhow};
use serde::Serialize;

/// One look at a process's memory, in bytes.
#[derive(Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    /// VmRSS.
    pub rss: u64,
    /// VmHWM: the highest RSS so far.
    pub peak: u64,
    /// RssAnon: heap, stacks, anonymous mappings.
    pub anon: u64,
    /// RssFile: code and libraries, and the BPF maps mapped (ring buffer).
    pub file: u64,
    /// RssShmem.
    pub shmem: u64,
    /// The part of `file` that is BPF maps (`anon_inode:bpf-map`).
    pub bpf_maps: u64,
}

impl Memory {
    pub fn of(pid: u32) -> Result<Memory> {
        let path = format!("/proc/{pid}/status");
        let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let kb = |key: &str| -> Result<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
                .and_then(|v| v.trim().strip_suffix("kB"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(|kb| kb * 1024)
                .ok_or_else(|| anyhow!("no {key} in {path}"))
        };
        let path = format!("/proc/{pid}/smaps");
        let smaps = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        Ok(Memory {
            rss: kb("VmRSS")?,
            peak: kb("VmHWM")?,
            anon: kb("RssAnon")?,
            file: kb("RssFile")?,
            shmem: kb("RssShmem")?,
            bpf_maps: rss_of_mappings(&smaps, |name| name == "anon_inode:bpf-map"),
        })
    }
}

/// Sum of the `Rss:` of the mappings in `smaps` whose name passes `which`.
fn rss_of_mappings(smaps: &str, which: impl Fn(&str) -> bool) -> u64 {
    let mut selected = false;
    let mut sum = 0;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else {
            continue;
        };
        if first.contains('-') && first.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
            // A mapping: range, perms, offset, dev, inode, [name].
            selected = which(words.nth(4).unwrap_or(""));
        } else if first == "Rss:" && selected {
            sum += words
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                * 1024;
        }
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bpf_maps_are_summed_from_smaps() {
        let smaps = "\
55f7e32da000-55f7e46ad000 rw-p 00000000 00:00 0                          [heap]
Size:              20044 kB
Rss:               18304 kB
7f4ec98b1000-7f4eca0b2000 r--s 00000000 00:0e 1060                       anon_inode:bpf-map
Size:               8196 kB
Rss:                8196 kB
7f4ec98b0000-7f4ec98b1000 rw-s 00000000 00:0e 1060                       anon_inode:bpf-map
Rss:                   4 kB
7f4eca0b2000-7f4eca9b3000 rw-p 00000000 00:00 0
Rss:                8904 kB
";
        assert_eq!(
            rss_of_mappings(smaps, |n| n == "anon_inode:bpf-map"),
            8200 * 1024
        );
        assert_eq!(rss_of_mappings(smaps, |n| n.is_empty()), 8904 * 1024);
    }

    #[test]
    fn our_own_memory_adds_up() {
        let m = Memory::of(std::process::id()).unwrap();
        assert!(m.rss > 0 && m.peak >= m.rss);
        assert_eq!(m.anon + m.file + m.shmem, m.rss);
        assert_eq!(m.bpf_maps, 0);
    }
}
