//! keepalive: an eBPF TCP connection monitor.
//!
//! Layers only point down (no module imports one above it):
//! [`commands`] → consumers ([`top`], [`tune`], [`metrics`]) → [`monitor`]
//! (the running engine) → [`output`] → [`table`] (connections and
//! verdicts) → [`kernel`] (BTF, symbols, loading the eBPF programs) →
//! [`events`] (decoded kernel events, filters) → [`clock`].
//! See docs/architecture.md.

pub mod clock;
pub mod commands;
pub mod config;
pub mod events;
pub mod kernel;
pub mod metrics;
pub mod monitor;
pub mod output;
pub mod table;
pub mod top;
pub mod tune;

#[cfg(test)]
mod fuzz;
