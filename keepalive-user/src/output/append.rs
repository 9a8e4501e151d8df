//! Appending the short pieces of a JSON line (integers, names, process
//! names) to a line buffer with copies of a constant size, for the
//! per-event writer ([`super::json::ObjectWriter`]).
//!
//! Why: a copy whose length is not known where it is compiled is a call
//! to libc's `memmove`, and every integer (itoa's digits), name and
//! process name was one. Under churn those calls were the largest single
//! part of a line (a profile of the engine thread: 7 % of it in `memmove`
//! from the identity fields alone). Here the buffer grows by a fixed
//! width, the text is copied in as two overlapping pieces of a fixed size,
//! and the buffer is cut back to the text's end.

use crate::clock::DIGIT_PAIRS;

/// Longest text [`push_short`] copies without `memmove`.
pub const SHORT: usize = 32;

/// Most digits of a `u64` (`18446744073709551615`).
const U64_DIGITS: usize = 20;

/// Appends `v` in decimal, as `Display` writes it.
///
/// Not itoa: it writes into a buffer of its own, and copying the digits
/// out reads them back right after their 2-byte stores, a load the CPU
/// cannot forward from them (it waits for them to reach the cache; in a
/// profile, the largest part of the identity fields). Here the digits are
/// written in place: the buffer grows by the widest number (a
/// constant-size store), the digits go in from the last, four at a time,
/// and the buffer is cut back.
#[inline(always)]
pub fn push_u64(out: &mut Vec<u8>, v: u64) {
    let len = v.checked_ilog10().map_or(1, |l| l as usize + 1);
    let start = out.len();
    out.extend_from_slice(&[0; U64_DIGITS]);
    let digits = &mut out[start..start + len];
    let mut end = len;
    let mut v = v;
    if v >= 100_000_000 {
        // The last eight digits as two halves that do not wait on each
        // other (a stamp in nanoseconds has 13 to 16 digits).
        let low = (v % 100_000_000) as u32;
        v /= 100_000_000;
        let (a, b) = ((low / 10_000) as usize, (low % 10_000) as usize);
        end -= 8;
        digits[end..end + 2].copy_from_slice(&DIGIT_PAIRS[a / 100]);
        digits[end + 2..end + 4].copy_from_slice(&DIGIT_PAIRS[a % 100]);
        digits[end + 4..end + 6].copy_from_slice(&DIGIT_PAIRS[b / 100]);
        digits[end + 6..end + 8].copy_from_slice(&DIGIT_PAIRS[b % 100]);
    }
    while v >= 10_000 {
        let r = (v % 10_000) as usize;
        v /= 10_000;
        end -= 4;
        digits[end..end + 2].copy_from_slice(&DIGIT_PAIRS[r / 100]);
        digits[end + 2..end + 4].copy_from_slice(&DIGIT_PAIRS[r % 100]);
    }
    let mut v = v as usize;
    if v >= 100 {
        end -= 2;
        digits[end..end + 2].copy_from_slice(&DIGIT_PAIRS[v % 100]);
        v /= 100;
    }
    if v >= 10 {
        digits[..2].copy_from_slice(&DIGIT_PAIRS[v]);
    } else {
        digits[0] = b'0' + v as u8;
    }
    out.truncate(start + len);
}

/// Appends `v` in decimal, `-` first when negative.
#[inline]
pub fn push_i64(out: &mut Vec<u8>, v: i64) {
    if v < 0 {
        out.push(b'-');
    }
    push_u64(out, v.unsigned_abs());
}

/// Appends `s` with copies of a constant size when it is at most
/// [`SHORT`] bytes (a name, a process name): the buffer grows by `SHORT`,
/// `s` is copied in as two overlapping fixed-size pieces (its first and
/// last 16, 8, 4 or 2 bytes), and the buffer is cut back to its end.
/// Longer text is appended as usual.
#[inline]
pub fn push_short(out: &mut Vec<u8>, s: &[u8]) {
    let n = s.len();
    if n > SHORT {
        out.extend_from_slice(s);
        return;
    }
    let start = out.len();
    out.extend_from_slice(&[0; SHORT]);
    let dst = &mut out[start..start + SHORT];
    if n >= 16 {
        dst[..16].copy_from_slice(&s[..16]);
        dst[n - 16..n].copy_from_slice(&s[n - 16..]);
    } else if n >= 8 {
        dst[..8].copy_from_slice(&s[..8]);
        dst[n - 8..n].copy_from_slice(&s[n - 8..]);
    } else if n >= 4 {
        dst[..4].copy_from_slice(&s[..4]);
        dst[n - 4..n].copy_from_slice(&s[n - 4..]);
    } else if n >= 2 {
        dst[..2].copy_from_slice(&s[..2]);
        dst[n - 2..n].copy_from_slice(&s[n - 2..]);
    } else if n == 1 {
        // Not a loop over the bytes: the compiler makes one a `memcpy`.
        dst[0] = s[0];
    }
    out.truncate(start + n);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_read_as_display_writes_them() {
        let mut edges = vec![0u64, u64::MAX, u64::MAX - 1];
        // Every power of ten, and one either side: each digit count's edges.
        for p in 0..=19 {
            let t = 10u64.pow(p);
            edges.extend([t - 1, t, t + 1]);
        }
        // And a pseudo-random spread over every magnitude (xorshift).
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            edges.push(x >> (x % 64));
        }
        for v in edges {
            let mut out = b"x".to_vec();
            push_u64(&mut out, v);
            assert_eq!(out, format!("x{v}").into_bytes());
            for s in [v as i64, (v as i64).wrapping_neg()] {
                let mut out = b"x".to_vec();
                push_i64(&mut out, s);
                assert_eq!(out, format!("x{s}").into_bytes());
            }
        }
        let mut out = Vec::new();
        push_i64(&mut out, i64::MIN);
        assert_eq!(out, i64::MIN.to_string().into_bytes());
    }

    #[test]
    fn short_text_of_every_length_is_appended_whole() {
        let text: Vec<u8> = (0..=SHORT as u8 + 8).map(|b| b'a' + b % 26).collect();
        for n in 0..text.len() {
            for before in [0, 1, 7] {
                let mut out = vec![b'-'; before];
                push_short(&mut out, &text[..n]);
                assert_eq!(out[..before], vec![b'-'; before]);
                assert_eq!(&out[before..], &text[..n], "{n} after {before}");
            }
        }
    }
}
