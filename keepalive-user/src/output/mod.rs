//! Renders what the monitor learns for people (`text`) and programs
//! (`json`, one object per line; schema in docs/events.md): [`json`] holds
//! the wire types, [`text`] the lines, and this module what both share
//! (the output format, the clock, broken-pipe handling).

pub mod diag;
pub mod file;
pub mod json;
pub mod text;

use std::io;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

/// Converts the kernel's CLOCK_MONOTONIC stamps to wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// realtime - monotonic, in nanoseconds.
    offset_ns: i128,
}

fn clock_ns(id: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(id, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

impl Clock {
    pub fn now() -> Self {
        Clock {
            offset_ns: clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_MONOTONIC),
        }
    }

    pub fn fixed(offset_ns: i128) -> Self {
        Clock { offset_ns }
    }

    pub fn mono_now_ns() -> u64 {
        clock_ns(libc::CLOCK_MONOTONIC) as u64
    }

    pub fn wall(&self, mono_ns: u64) -> SystemTime {
        let real = (mono_ns as i128 + self.offset_ns).max(0) as u128;
        UNIX_EPOCH + Duration::from_nanos(real as u64)
    }

    pub fn rfc3339(&self, mono_ns: u64) -> String {
        self.rfc3339_display(mono_ns).to_string()
    }

    /// The same, to be written by `Display` without a `String`.
    pub fn rfc3339_display(&self, mono_ns: u64) -> humantime::Rfc3339Timestamp {
        humantime::format_rfc3339_micros(self.wall(mono_ns))
    }
}

/// `addr:port`, IPv6 in brackets, `*:port` when the address is unknown.
pub fn endpoint(addr: Option<std::net::IpAddr>, port: u16) -> String {
    match addr {
        Some(std::net::IpAddr::V6(a)) => format!("[{a}]:{port}"),
        Some(a) => format!("{a}:{port}"),
        None => format!("*:{port}"),
    }
}

#[cfg(test)]
mod golden;
