//! The kit the integration tests (`tests/`) and `cargo xtask bench` share:
//! `keepalive` run as a child ([`child`]), the lines a child prints
//! ([`lines`]), network namespaces and veth pairs ([`netns`]), the BPF
//! programs a process holds and what they cost ([`bpf`]), and socket
//! options set and read through `socket2` ([`sock`]).
//!
//! Everything returns `Result` with a message saying what failed; the
//! tests' own library turns those into assertions.

pub mod bpf;
pub mod child;
pub mod lines;
pub mod netns;
pub mod sock;

pub use child::MonitorChild;
pub use lines::line_channel;
pub use netns::NamedNetns;

/// Whether this process runs as root (euid 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
