//! keepalive: an eBPF TCP connection monitor.
//!
//! Data flows kernel → events → outputs: [`kernel`] loads the programs and
//! knows the running kernel, [`events`] decodes and filters what they emit,
//! [`output`] renders it, and the subcommands ([`record`], [`check`]) tie
//! them together.

pub mod check;
pub mod config;
pub mod events;
pub mod kernel;
pub mod output;
pub mod record;
pub mod snapshot;
pub mod table;
pub mod tune;
