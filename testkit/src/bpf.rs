//! The BPF programs a process holds (from /proc/PID/fdinfo) and what the
//! kernel knows of them (through aya: names, run counts and run time).

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;

use anyhow::{Context, Result};

/// `key:\tvalue` lines of one fdinfo file.
pub fn fdinfo(text: &str) -> BTreeMap<&str, &str> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect()
}

/// What the BPF file descriptors of one process refer to.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HeldFds {
    /// Programs it holds an fd of, sorted, no repeats.
    pub programs: Vec<u32>,
    /// Program id → tracepoint name, from its BPF link fds.
    pub hooks: BTreeMap<u32, String>,
}

impl HeldFds {
    /// Adds what one fdinfo file says.
    fn add(&mut self, info: &BTreeMap<&str, &str>) {
        let Some(id) = info.get("prog_id").and_then(|v| v.parse::<u32>().ok()) else {
            return;
        };
        if let Some(tp) = info.get("tp_name") {
            self.hooks.insert(id, tp.to_string());
        }
        // A program fd, or a link fd keeping its program loaded.
        self.programs.push(id);
    }
}

/// The BPF programs and hooks process `pid` holds fds of; fds closing
/// meanwhile are skipped. An error when its fdinfo cannot be listed (it
/// exited).
pub fn held_by(pid: u32) -> Result<HeldFds> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut held = HeldFds::default();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let Ok(entry) = entry else { continue };
        if let Ok(text) = std::fs::read_to_string(entry.path()) {
            held.add(&fdinfo(&text));
        }
    }
    held.programs.sort_unstable();
    held.programs.dedup();
    Ok(held)
}

/// One loaded program, as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Program {
    pub id: u32,
    /// The kernel's name (at most 15 characters); `prog_<id>` when unreadable.
    pub name: String,
    /// Nanoseconds spent in the program while run-time statistics were on.
    pub run_time_ns: u64,
    /// Runs counted while run-time statistics were on.
    pub run_cnt: u64,
}

/// Every BPF program loaded in the kernel (those that unload while being
/// listed are skipped).
pub fn loaded_programs() -> Vec<Program> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| Program {
            id: p.id(),
            name: p
                .name_as_str()
                .map_or_else(|| format!("prog_{}", p.id()), str::to_string),
            run_time_ns: u64::try_from(p.run_time().as_nanos()).unwrap_or(u64::MAX),
            run_cnt: p.run_count(),
        })
        .collect()
}

/// The loaded programs with one of `ids`, by id.
pub fn programs_by_id(ids: &[u32]) -> BTreeMap<u32, Program> {
    loaded_programs()
        .into_iter()
        .filter(|p| ids.contains(&p.id))
        .map(|p| (p.id, p))
        .collect()
}

/// Run-time statistics (`run_time_ns`, `run_cnt`) on for as long as this
/// lives: the kernel counts while any such fd is open, whatever
/// `kernel.bpf_stats_enabled` says, and stops when the last one closes,
/// also when the process dies.
pub struct RunTimeStats(#[allow(dead_code)] OwnedFd);

impl RunTimeStats {
    pub fn enable() -> Result<RunTimeStats> {
        aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .map(RunTimeStats)
            .context("BPF_ENABLE_STATS (needs root and Linux >= 5.8)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_lines() {
        let m = fdinfo("pos:\t0\nprog_type:\t26\nprog_id:\t351\nrun_time_ns:\t10\n");
        assert_eq!(m.get("prog_id"), Some(&"351"));
        assert_eq!(m.get("run_time_ns"), Some(&"10"));
    }

    #[test]
    fn programs_and_links_are_told_apart() {
        let mut h = HeldFds::default();
        h.add(&fdinfo("pos:\t0\nprog_type:\t17\nprog_id:\t9\n"));
        h.add(&fdinfo(
            "pos:\t0\nlink_type:\traw_tracepoint\nlink_id:\t3\nprog_tag:\tab\nprog_id:\t9\ntp_name:\tinet_sock_set_state\n",
        ));
        h.add(&fdinfo("pos:\t0\nflags:\t02\nmap_type:\t27\nmap_id:\t4\n"));
        assert_eq!(h.programs, vec![9, 9]);
        assert_eq!(
            h.hooks.get(&9).map(String::as_str),
            Some("inet_sock_set_state")
        );
    }
}
