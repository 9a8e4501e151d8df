//! The live terminal UI (`keepalive top`), a consumer of the monitor
//! engine: [`feed`] copies what the engine learns into a bounded channel,
//! [`model`] is what the UI knows, [`app`] the screen state and keys,
//! [`query`] the `/` filter, [`ui`] the drawing, [`term`] the terminal.

pub mod app;
pub mod feed;
pub mod model;
pub mod query;
pub mod term;
pub mod ui;

#[cfg(test)]
mod ui_tests;
