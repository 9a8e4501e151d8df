//! `keepalive top`: a live terminal UI over the monitor engine.

pub mod app;
pub mod model;
pub mod query;
pub mod ui;

#[cfg(test)]
mod ui_tests;
