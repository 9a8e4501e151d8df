//! [`Clock`]: turns the kernel's CLOCK_MONOTONIC stamps into wall-clock
//! time. The bottom layer: everything that prints or ages a stamp uses it.

use std::cell::Cell;
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
        self.rfc3339_display(mono_ns).as_str().to_string()
    }

    /// The same on the stack, to be written without a `String` (the hot
    /// path writes a million of these a second).
    pub fn rfc3339_display(&self, mono_ns: u64) -> Rfc3339 {
        let real = (mono_ns as i128 + self.offset_ns).max(0) as u128;
        Rfc3339::from_unix_ns(real as u64)
    }
}

/// A UTC time as RFC 3339 with microseconds, `2025-11-24T16:00:01.001234Z`,
/// byte for byte what `humantime::format_rfc3339_micros` writes (the tests
/// hold it to that), formatted on the stack without `fmt` machinery.
#[derive(Clone, Copy)]
pub struct Rfc3339([u8; 27]);

/// "00" "01" … "99": decimal text two digits at a time, for the
/// timestamps here and the integers of a JSON line (`output::append`).
pub(crate) const DIGIT_PAIRS: [[u8; 2]; 100] = {
    let mut t = [[0u8; 2]; 100];
    let mut i = 0;
    while i < 100 {
        t[i] = [b'0' + (i / 10) as u8, b'0' + (i % 10) as u8];
        i += 1;
    }
    t
};

/// `2025-11-24T16:00:01.`: a second's text, up to the fraction.
type SecondText = [u8; 20];

thread_local! {
    /// The second this thread formatted last, and its text. Consecutive
    /// events nearly always share their second, and the date and time of
    /// day were most of a timestamp's cost (a profile under churn: 4 % of
    /// the engine thread), so only the sub-second digits are formatted
    /// per event. `u64::MAX` (no second of a `u64` of nanoseconds) until
    /// the first.
    static LAST_SECOND: Cell<(u64, SecondText)> = const { Cell::new((u64::MAX, [0; 20])) };
}

/// Two digits of `v % 100` at `b[at..at + 2]`.
#[inline(always)]
fn put2(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 2].copy_from_slice(&DIGIT_PAIRS[(v % 100) as usize]);
}

/// The text of second `secs` since the Unix epoch, up to the fraction.
fn second_text(secs: u64) -> SecondText {
    let (year, month, day) = civil_from_days(secs / 86_400);
    let sod = secs % 86_400;
    let mut b = *b"0000-00-00T00:00:00.";
    // Two digits at a time: half the divisions of one at a time.
    put2(&mut b, 0, year / 100);
    put2(&mut b, 2, year);
    put2(&mut b, 5, month);
    put2(&mut b, 8, day);
    put2(&mut b, 11, sod / 3600);
    put2(&mut b, 14, sod / 60 % 60);
    put2(&mut b, 17, sod % 60);
    b
}

impl Rfc3339 {
    /// From nanoseconds since the Unix epoch (any `u64`: years 1970–2554).
    pub fn from_unix_ns(ns: u64) -> Rfc3339 {
        let secs = ns / 1_000_000_000;
        let second = LAST_SECOND.with(|last| match last.get() {
            (s, text) if s == secs => text,
            _ => {
                let text = second_text(secs);
                last.set((secs, text));
                text
            }
        });
        Self::from_second(second, ns)
    }

    /// `second` (the text of `ns`'s second) and `ns`'s microseconds.
    #[inline(always)]
    fn from_second(second: SecondText, ns: u64) -> Rfc3339 {
        let micros = (ns % 1_000_000_000) / 1_000;
        let mut b = *b"0000-00-00T00:00:00.000000Z";
        b[..20].copy_from_slice(&second);
        put2(&mut b, 20, micros / 10_000);
        put2(&mut b, 22, micros / 100);
        put2(&mut b, 24, micros);
        Rfc3339(b)
    }

    /// The text's bytes (ASCII), for writers that take bytes.
    pub fn as_bytes(&self) -> &[u8; 27] {
        &self.0
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII digits and separators are ever written.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl serde::Serialize for Rfc3339 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl std::fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Days since 1970-01-01 -> (year, month, day) of the proleptic Gregorian
/// calendar (H. Hinnant's `civil_from_days`, for non-negative days).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn humantime_micros(ns: u64) -> String {
        humantime::format_rfc3339_micros(UNIX_EPOCH + Duration::from_nanos(ns)).to_string()
    }

    #[test]
    fn rfc3339_matches_humantime_at_calendar_edges() {
        let day = 86_400_000_000_000u64;
        for ns in [
            0,
            1,
            999,
            1_000,
            59_999_999_999,
            day - 1,
            day,
            // 2000-02-28/29, 2000-03-01 (a leap century), 2100-03-01 (not).
            951_696_000_000_000_000,
            951_782_400_000_000_000,
            951_868_800_000_000_000,
            4_107_542_400_000_000_000,
            1_764_000_000_123_456_789,
            u64::MAX,
        ] {
            assert_eq!(
                Rfc3339::from_unix_ns(ns).to_string(),
                humantime_micros(ns),
                "{ns}"
            );
        }
    }

    #[test]
    fn rfc3339_matches_humantime_every_day_for_six_centuries() {
        let day = 86_400_000_000_000u64;
        let days = u64::MAX / day;
        for d in 0..=days {
            // A different time of day each day, down to the nanosecond.
            let ns = d * day + (d * 7_919_000_013_579) % day;
            assert_eq!(
                Rfc3339::from_unix_ns(ns).to_string(),
                humantime_micros(ns),
                "day {d}"
            );
        }
    }

    /// The text of `ns` computed whole, without the cached second.
    fn uncached(ns: u64) -> String {
        let second = second_text(ns / 1_000_000_000);
        Rfc3339::from_second(second, ns).to_string()
    }

    #[test]
    fn cached_second_matches_the_whole_computation_across_boundaries() {
        let s = 1_000_000_000u64;
        let day = 86_400 * s;
        // Ends of seconds, minutes, days, months and years, leap days
        // (2024-02-29, 2000-02-29, none in 2100), and the last second.
        let edges = [
            s,
            60 * s,
            day,
            1_706_745_600 * s, // 2024-02-01
            1_709_164_800 * s, // 2024-02-29
            1_709_251_200 * s, // 2024-03-01
            1_735_689_600 * s, // 2025-01-01
            951_782_400 * s,   // 2000-02-29
            4_107_542_400 * s, // 2100-03-01
            u64::MAX / s * s,  // 2554-07-21T23:34:33
        ];
        let mut stamps = Vec::new();
        for e in edges {
            // Either side of the boundary, in order, then back across it
            // (the cache holds one second and must not serve it for
            // another), down to the nanosecond.
            for d in [3 * s, s + 1, s, s - 1, 1_000, 1, 0] {
                stamps.push(e.saturating_sub(d));
            }
            for d in [0, 1, 999, 1_000, s - 1, s, s + 1] {
                stamps.push(e.saturating_add(d));
            }
            stamps.extend([e - 1, e, e - 1, e.saturating_add(999_999_999), e]);
        }
        // Random stamps, each followed by a few in the same second or the next.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..50_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            stamps.push(x);
            stamps.push(x.saturating_add(x % 1_500_000_000));
        }
        stamps.push(u64::MAX);
        for ns in stamps {
            let cached = Rfc3339::from_unix_ns(ns).to_string();
            assert_eq!(cached, uncached(ns), "{ns}");
            assert_eq!(cached, humantime_micros(ns), "{ns}");
        }
    }

    #[test]
    fn wall_clock_text_is_the_offset_stamp() {
        let c = Clock::fixed(1_764_000_000_000_000_000);
        assert_eq!(c.rfc3339(1_001_234_567), "2025-11-24T16:00:01.001234Z");
        // Before the epoch: clamped to it, as `wall` does.
        assert_eq!(Clock::fixed(-5).rfc3339(1), "1970-01-01T00:00:00.000000Z");
    }
}
