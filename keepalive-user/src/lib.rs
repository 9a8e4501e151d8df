//! keepalive: an eBPF TCP connection monitor.
//!
//! Layers only point down: [`commands`] → [`monitor`] (the running engine)
//! and [`output`] → [`table`] (connections and verdicts) and [`events`]
//! (decoded kernel events) → [`kernel`] (BTF, symbols, loading the eBPF
//! programs). See docs/architecture.md.

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
