//! Renders what the monitor learns for people (`text`) and programs
//! (`json`, one object per line; schema in docs/events.md): [`json`] holds
//! the wire types, [`text`] the lines, and this module what both share
//! (the output format, the clock, broken-pipe handling).

pub mod addr;
pub mod append;
pub mod diag;
pub mod file;
pub mod json;
pub mod text;

use std::io;

pub use json::SCHEMA_VERSION;

/// How records are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// True when the reader of our output went away (`| head`): the one write
/// error that is not a failure. main turns it into exit 0, once.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}

pub use crate::clock::Clock;

/// `addr:port`, IPv6 in brackets, `*:port` when the address is unknown.
pub fn endpoint(addr: Option<std::net::IpAddr>, port: u16) -> String {
    Endpoint(addr, port).to_string()
}

/// [`endpoint`] without the `String`: written where it is displayed.
pub struct Endpoint(pub Option<std::net::IpAddr>, pub u16);

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Endpoint(addr, port) = self;
        match addr {
            Some(a @ std::net::IpAddr::V6(_)) => {
                write!(f, "[{}]:{port}", addr::AddrText::new(*a).as_str())
            }
            Some(a) => write!(f, "{}:{port}", addr::AddrText::new(*a).as_str()),
            None => write!(f, "*:{port}"),
        }
    }
}

#[cfg(test)]
mod golden;
