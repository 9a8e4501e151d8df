//! Kernel side of keepalive: small, boring programs that turn TCP
//! tracepoints into [`RawEvent`](keepalive_common::RawEvent)s on one ring buffer.
//!
//! Every struct offset comes from the configuration the daemon fills from
//! the running kernel's BTF before load ([`maps`]). Policy (what an event
//! means, causes, verdicts) lives in userspace; the only decisions taken
//! here are the cheap filters that save ring-buffer space.
//!
//! - [`maps`]: the configuration and every map;
//! - [`mem`]: reading kernel memory (struct fields, the connection tuple);
//! - [`emit`]: filtering and writing events to the ring;
//! - [`hooks::tcp`], [`hooks::timer`]: the tracepoint programs by family;
//! - [`iter`]: the `iter/tcp` program behind snapshots;
//! - [`iter_owners`]: the `iter/task_file` program that finds their owners;
//! - [`tune`], [`hooks::sockops`], [`hooks::setsockopt`], [`iter_tune`]:
//!   `keepalive tune` (policy maps, new connections, application
//!   overrides, the walk over existing connections); [`tune_log`]: the
//!   aya-log diagnostics of a failed `bpf_setsockopt`, tail-called.
// Built for bpfel-unknown-none by keepalive-user's build.rs; on the host
// it compiles as an empty binary so `cargo clippy --workspace` checks it.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[macro_use]
mod maps;
#[macro_use]
mod mem;
mod emit;
mod hooks;
mod iter;
mod iter_owners;
mod iter_tune;
mod tune;
mod tune_log;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
