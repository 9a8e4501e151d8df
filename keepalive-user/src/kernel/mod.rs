//! Everything that touches the running kernel: BTF offsets, symbol
//! addresses, privileges, and loading/attaching the eBPF programs.

pub mod btf;
pub mod event_rings;
pub mod loader;
pub mod netns;
pub mod privileges;
pub mod symbols;

use std::path::PathBuf;

/// Capabilities the monitor needs when not running as root.
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Effective capabilities of the calling thread (CapEff of
/// /proc/thread-self/status: capabilities are per thread, and `top` drops
/// its UI thread's while the engine thread starts).
fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/thread-self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// `Ok` when this process may load and attach tracing programs.
pub fn check_privileges() -> anyhow::Result<()> {
    let caps = effective_caps();
    let has = |c: u32| caps & (1u64 << c) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    anyhow::bail!(
        "keepalive needs root (or CAP_BPF and CAP_PERFMON); running as uid {euid}: re-run with sudo"
    )
}

/// Where cgroup v2 is mounted, from /proc/mounts.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    cgroup2_from_mounts(&mounts)
}

pub fn cgroup2_from_mounts(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
    })
}

/// Where tracefs is mounted, if it is.
pub fn tracefs_mount() -> Option<PathBuf> {
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.join("events").is_dir())
}

pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_anywhere() {
        let m =
            "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_from_mounts(m),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(cgroup2_from_mounts("proc /proc proc rw 0 0\n"), None);
    }
}
