//! Least privilege after attach: once the programs are loaded and attached
//! and the table seeded, the monitor keeps only the capabilities its steady
//! state uses, empties the bounding, inheritable and ambient sets, and sets
//! NoNewPrivs, so a bug in the long-running part cannot be turned into
//! loading modules, overriding file permissions, reconfiguring the network
//! or regaining privileges through an exec.
//!
//! What stays, and why (with the connection table on; without it only
//! `CAP_BPF`, for the last item):
//! - `CAP_SYS_ADMIN`: each refresh walks the sockets of every network
//!   namespace, and iter/tcp only sees the namespace of the thread that
//!   reads it, so the walker joins each namespace (setns(CLONE_NEWNET)
//!   needs CAP_SYS_ADMIN). It also covers the bpf() link creation of the
//!   iterator (bpf_capable()).
//! - `CAP_SYS_PTRACE`: finding those namespaces and the owners of sockets
//!   means reading /proc/PID/ns/net and the /proc/PID/fd links of other
//!   users' processes (ptrace access checks).
//! - `CAP_DAC_READ_SEARCH`: listing /proc/PID/fd of other users'
//!   processes (mode 0500 directories).
//! - Creating the event ring of a CPU brought online after the start
//!   (`kernel::event_rings::RingAdder`): `CAP_SYS_ADMIN` covers it with
//!   the table on; without the table `CAP_BPF` stays for it alone (map
//!   creation; loading a tracing program would also need `CAP_PERFMON`,
//!   and reaching other processes' maps `CAP_SYS_ADMIN`).
//!
//! Capabilities belong to threads: this runs on the engine's thread before
//! its event loop starts, when no other thread exists; threads started
//! later (consumers' workers, namespace walkers) inherit the reduced sets.

use rustix::thread::{CapabilitySet, CapabilitySets};

/// What the steady state keeps when it walks sockets (see the module doc).
pub const KEPT_FOR_WALKS: CapabilitySet = CapabilitySet::SYS_ADMIN
    .union(CapabilitySet::SYS_PTRACE)
    .union(CapabilitySet::DAC_READ_SEARCH);

/// Highest capability number the kernel knows (CAP_LAST_CAP), read from
/// procfs; 40 (CAP_CHECKPOINT_RESTORE) when it cannot be read.
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
        .min(63)
}

/// The names of the capabilities in `set`, e.g. `CAP_SYS_ADMIN`.
pub fn names(set: CapabilitySet) -> Vec<&'static str> {
    const NAMES: [&str; 41] = [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_DAC_READ_SEARCH",
        "CAP_FOWNER",
        "CAP_FSETID",
        "CAP_KILL",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETPCAP",
        "CAP_LINUX_IMMUTABLE",
        "CAP_NET_BIND_SERVICE",
        "CAP_NET_BROADCAST",
        "CAP_NET_ADMIN",
        "CAP_NET_RAW",
        "CAP_IPC_LOCK",
        "CAP_IPC_OWNER",
        "CAP_SYS_MODULE",
        "CAP_SYS_RAWIO",
        "CAP_SYS_CHROOT",
        "CAP_SYS_PTRACE",
        "CAP_SYS_PACCT",
        "CAP_SYS_ADMIN",
        "CAP_SYS_BOOT",
        "CAP_SYS_NICE",
        "CAP_SYS_RESOURCE",
        "CAP_SYS_TIME",
        "CAP_SYS_TTY_CONFIG",
        "CAP_MKNOD",
        "CAP_LEASE",
        "CAP_AUDIT_WRITE",
        "CAP_AUDIT_CONTROL",
        "CAP_SETFCAP",
        "CAP_MAC_OVERRIDE",
        "CAP_MAC_ADMIN",
        "CAP_SYSLOG",
        "CAP_WAKE_ALARM",
        "CAP_BLOCK_SUSPEND",
        "CAP_AUDIT_READ",
        "CAP_PERFMON",
        "CAP_BPF",
        "CAP_CHECKPOINT_RESTORE",
    ];
    (0..64)
        .filter(|i| set.bits() & (1u64 << i) != 0)
        .map(|i| NAMES.get(i).copied().unwrap_or("CAP_UNKNOWN"))
        .collect()
}

/// What the steady state keeps without walks: the event ring of a CPU
/// brought online later still has to be created.
pub const KEPT_WITHOUT_WALKS: CapabilitySet = CapabilitySet::BPF;

/// The capabilities the steady state keeps: those for walks when the
/// table is on, [`KEPT_WITHOUT_WALKS`] otherwise.
pub fn steady_state(walks: bool) -> CapabilitySet {
    if walks {
        KEPT_FOR_WALKS
    } else {
        KEPT_WITHOUT_WALKS
    }
}

/// Drops every capability but `keep` from this thread (effective,
/// permitted, inheritable, ambient and bounding sets) and sets NoNewPrivs.
/// Returns what is kept.
pub fn drop_all_but(keep: CapabilitySet) -> anyhow::Result<CapabilitySet> {
    use anyhow::Context;
    use rustix::thread as t;
    let now = t::capabilities(None).context("reading our capabilities")?;
    // The bounding set first: dropping from it needs CAP_SETPCAP, which
    // goes with the rest below. Without CAP_SETPCAP (run with only
    // CAP_BPF+CAP_PERFMON) it stays as it is: NoNewPrivs already stops an
    // exec from gaining anything back.
    for i in 0..=last_cap() {
        let cap = CapabilitySet::from_bits_retain(1u64 << i);
        if !keep.contains(cap) && t::capability_is_in_bounding_set(cap).unwrap_or(false) {
            let _ = t::remove_capability_from_bounding_set(cap);
        }
    }
    t::clear_ambient_capability_set().context("clearing the ambient capabilities")?;
    let kept = now.permitted & keep;
    t::set_capabilities(
        None,
        CapabilitySets {
            effective: now.effective & kept,
            permitted: kept,
            inheritable: CapabilitySet::empty(),
        },
    )
    .context("dropping capabilities")?;
    t::set_no_new_privs(true).context("setting NoNewPrivs")?;
    Ok(kept)
}

/// For a thread that needs no privilege at all (a UI, an HTTP server):
/// drops every capability from it; a failure is logged, not fatal.
pub fn drop_all_in_this_thread(what: &str) {
    if let Err(e) = drop_all_but(CapabilitySet::empty()) {
        tracing::warn!("{what}: keeping capabilities: {e:#}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_set_names() {
        assert_eq!(
            names(KEPT_FOR_WALKS),
            ["CAP_DAC_READ_SEARCH", "CAP_SYS_PTRACE", "CAP_SYS_ADMIN"]
        );
        assert_eq!(KEPT_FOR_WALKS.bits(), 0x280004);
        assert_eq!(names(steady_state(false)), ["CAP_BPF"]);
        assert_eq!(steady_state(false).bits(), 1 << 39);
    }
}
