//! [`Clock`]: turns the kernel's CLOCK_MONOTONIC stamps into wall-clock
//! time. The bottom layer: everything that prints or ages a stamp uses it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
