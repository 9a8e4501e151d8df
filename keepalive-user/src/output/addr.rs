//! IP addresses as the wire types write them, formatted on the stack: the
//! text of `IpAddr`'s `Display` without a `String` or the `fmt` machinery
//! per record (IPv4 by hand, from a table of the 256 octets' texts; IPv6,
//! rare on the hot path, through `Display` into a stack buffer).

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};

/// Longest `Ipv6Addr` text (`ffff:…:ffff`, 39 bytes) with room to spare.
const CAP: usize = 48;

/// An address's text, as `IpAddr::to_string` would give it.
pub struct AddrText {
    buf: [u8; CAP],
    len: usize,
}

impl AddrText {
    pub fn new(addr: IpAddr) -> AddrText {
        let mut t = AddrText {
            buf: [0; CAP],
            len: 0,
        };
        match addr {
            IpAddr::V4(a) => t.len = v4_text(a, &mut t.buf),
            // Cannot fail: the longest form fits the buffer.
            IpAddr::V6(a) => {
                let _ = write!(t, "{a}");
            }
        }
        t
    }

    /// The text's bytes (ASCII), for writers that take bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    pub fn as_str(&self) -> &str {
        // Only whole UTF-8 strings (ASCII, in fact) are ever written.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

impl std::fmt::Write for AddrText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        let room = self.buf.get_mut(self.len..end).ok_or(std::fmt::Error)?;
        room.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// Longest IPv4 text (`255.255.255.255`, 15 bytes) and a dot.
const V4_CAP: usize = 16;

/// Each octet's text and a dot (`0.`, `10.`, `255.`), zero-padded to 4
/// bytes, and its length with the dot.
const OCTET_DOT: [([u8; 4], u8); 256] = {
    let mut t = [([0u8; 4], 0u8); 256];
    let mut o = 0;
    while o < 256 {
        let (h, d, u) = ((o / 100) as u8, (o / 10 % 10) as u8, (o % 10) as u8);
        t[o] = if o >= 100 {
            ([b'0' + h, b'0' + d, b'0' + u, b'.'], 4)
        } else if o >= 10 {
            ([b'0' + d, b'0' + u, b'.', 0], 3)
        } else {
            ([b'0' + u, b'.', 0, 0], 2)
        };
        o += 1;
    }
    t
};

/// Writes an IPv4 address's text at the start of `buf` (at least
/// [`V4_CAP`] bytes) and returns its length: each octet's text and dot copied whole (4 bytes, a
/// constant-size copy) at the end of the last, the last dot cut off.
#[inline(always)]
fn v4_text(a: Ipv4Addr, buf: &mut [u8]) -> usize {
    let mut at = 0;
    for octet in a.octets() {
        let (text, len) = OCTET_DOT[usize::from(octet)];
        buf[at..at + 4].copy_from_slice(&text);
        at += usize::from(len);
    }
    at - 1
}

/// Appends an address's text (as [`AddrText`] has it) to `out`: IPv4
/// written in place (the buffer grows by the longest text, a
/// constant-size store, and is cut back), without the stack buffer of
/// `AddrText` and its copy of a length known only at run time.
#[inline]
pub fn push_addr(out: &mut Vec<u8>, addr: IpAddr) {
    match addr {
        IpAddr::V4(a) => {
            let start = out.len();
            out.extend_from_slice(&[0; V4_CAP]);
            let len = v4_text(a, &mut out[start..]);
            out.truncate(start + len);
        }
        IpAddr::V6(_) => out.extend_from_slice(AddrText::new(addr).as_bytes()),
    }
}

/// Serialises an address as its text (a JSON string), from the stack.
#[derive(Clone, Copy)]
pub struct AddrOut(pub IpAddr);

impl serde::Serialize for AddrOut {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(AddrText::new(self.0).as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    #[test]
    fn every_octet_in_every_position_reads_as_std_writes_it() {
        for o in 0..=255u8 {
            for pos in 0..4 {
                let mut octets = [1, 22, 133, 4];
                octets[pos] = o;
                let a = IpAddr::V4(Ipv4Addr::from(octets));
                assert_eq!(AddrText::new(a).as_str(), a.to_string());
            }
        }
    }

    #[test]
    fn appended_addresses_read_as_std_writes_them() {
        let mut v4 = (0..=255u8).map(|o| IpAddr::V4(Ipv4Addr::from([o, 22, 133, o])));
        let v6 = IpAddr::V6("2001:db8::8:800:200c:417a".parse().unwrap());
        for a in v4.by_ref().chain([v6]) {
            let mut out = b"x".to_vec();
            push_addr(&mut out, a);
            assert_eq!(out, format!("x{a}").into_bytes());
        }
    }

    #[test]
    fn ipv6_forms_read_as_std_writes_them() {
        for s in [
            "::",
            "::1",
            "fd00::2",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "::ffff:255.255.255.255",
            "2001:db8::8:800:200c:417a",
            "1:0:0:1:0:0:0:1",
        ] {
            let a: Ipv6Addr = s.parse().unwrap();
            assert_eq!(AddrText::new(IpAddr::V6(a)).as_str(), a.to_string());
        }
    }

    #[test]
    fn serialises_as_a_json_string() {
        let a = AddrOut("198.18.0.1".parse().unwrap());
        assert_eq!(serde_json::to_string(&a).unwrap(), "\"198.18.0.1\"");
        assert_eq!(serde_json::to_string(&Some(a)).unwrap(), "\"198.18.0.1\"");
        assert_eq!(serde_json::to_string(&None::<AddrOut>).unwrap(), "null");
    }
}
