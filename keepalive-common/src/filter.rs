//! The kernel-side port and address filters as pure functions, so the
//! eBPF programs and host unit tests run the same code.
//!
//! Written for the verifier: loops have constant bounds and no early exit
//! from the loop body, so each stays one bounded walk.

use crate::{Cidr, MAX_CIDRS, MAX_PORTS};

/// True when `addr` (network order, IPv4 in the first 4 bytes) falls in
/// `cidr`: same family and the first `prefix_len` bits equal.
#[inline(always)]
pub fn in_cidr(addr: &[u8; 16], family: u8, cidr: &Cidr) -> bool {
    if cidr.family != family {
        return false;
    }
    let bits = cidr.prefix_len as usize;
    let mut i = 0;
    while i < 16 {
        let left = bits.saturating_sub(i * 8);
        if left == 0 {
            return true;
        }
        let mask: u8 = if left >= 8 {
            0xff
        } else {
            0xffu8 << (8 - left)
        };
        if (addr[i] ^ cidr.addr[i]) & mask != 0 {
            return false;
        }
        i += 1;
    }
    true
}

/// True when there is no port filter (all zero) or either port is listed.
#[inline(always)]
pub fn ports_match(ports: &[u16; MAX_PORTS], sport: u16, dport: u16) -> bool {
    if ports[0] == 0 {
        return true;
    }
    let mut hit = false;
    let mut i = 0;
    while i < MAX_PORTS {
        let p = ports[i];
        if p != 0 && (p == sport || p == dport) {
            hit = true;
        }
        i += 1;
    }
    hit
}

/// True when there is no address filter (`n == 0`) or either address
/// falls in one of the first `n` CIDRs.
#[inline(always)]
pub fn addrs_match(
    cidrs: &[Cidr; MAX_CIDRS],
    n: usize,
    family: u8,
    saddr: &[u8; 16],
    daddr: &[u8; 16],
) -> bool {
    if n == 0 {
        return true;
    }
    let mut hit = false;
    let mut i = 0;
    while i < MAX_CIDRS {
        if i < n && (in_cidr(saddr, family, &cidrs[i]) || in_cidr(daddr, family, &cidrs[i])) {
            hit = true;
        }
        i += 1;
    }
    hit
}

#[cfg(test)]
mod tests {
    use super::*;

    const AF_INET: u8 = 2;
    const AF_INET6: u8 = 10;

    fn v4(a: [u8; 4]) -> [u8; 16] {
        let mut r = [0; 16];
        r[..4].copy_from_slice(&a);
        r
    }

    fn cidr(family: u8, addr: [u8; 16], prefix_len: u8) -> Cidr {
        Cidr {
            addr,
            family,
            prefix_len,
            _pad: [0; 6],
        }
    }

    #[test]
    fn cidr_prefix_bits() {
        let net = cidr(AF_INET, v4([10, 1, 128, 0]), 17);
        assert!(in_cidr(&v4([10, 1, 128, 1]), AF_INET, &net));
        assert!(in_cidr(&v4([10, 1, 255, 255]), AF_INET, &net));
        assert!(!in_cidr(&v4([10, 1, 127, 255]), AF_INET, &net));
        assert!(!in_cidr(&v4([10, 2, 128, 1]), AF_INET, &net));
        let host = cidr(AF_INET, v4([127, 0, 0, 1]), 32);
        assert!(in_cidr(&v4([127, 0, 0, 1]), AF_INET, &host));
        assert!(!in_cidr(&v4([127, 0, 0, 2]), AF_INET, &host));
        let all = cidr(AF_INET, v4([0, 0, 0, 0]), 0);
        assert!(in_cidr(&v4([192, 0, 2, 1]), AF_INET, &all));
    }

    #[test]
    fn cidr_family_must_match() {
        let net = cidr(AF_INET, v4([0, 0, 0, 0]), 0);
        assert!(!in_cidr(&v4([0, 0, 0, 0]), AF_INET6, &net));
        let mut a6 = [0u8; 16];
        a6[0] = 0xfd;
        a6[15] = 1;
        let net6 = cidr(
            AF_INET6,
            [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            8,
        );
        assert!(in_cidr(&a6, AF_INET6, &net6));
        a6[0] = 0xfe;
        assert!(!in_cidr(&a6, AF_INET6, &net6));
        let host6 = cidr(AF_INET6, a6, 128);
        assert!(in_cidr(&a6, AF_INET6, &host6));
        a6[15] = 2;
        assert!(!in_cidr(&a6, AF_INET6, &host6));
    }

    #[test]
    fn ports_either_side() {
        let none = [0; MAX_PORTS];
        assert!(ports_match(&none, 1, 2));
        let mut some = [0; MAX_PORTS];
        some[0] = 7998;
        some[1] = 443;
        assert!(ports_match(&some, 7998, 40000));
        assert!(ports_match(&some, 40000, 443));
        assert!(!ports_match(&some, 40000, 80));
        // A zero port never matches a zero entry.
        assert!(!ports_match(&some, 0, 0));
        let full = [1, 2, 3, 4, 5, 6, 7, 8];
        assert!(ports_match(&full, 8, 9));
    }

    #[test]
    fn addrs_only_first_n_count() {
        let mut cidrs = [Cidr::default(); MAX_CIDRS];
        cidrs[0] = cidr(AF_INET, v4([10, 0, 0, 0]), 8);
        cidrs[1] = cidr(AF_INET, v4([192, 168, 0, 0]), 16);
        let (a, b) = (v4([10, 9, 9, 9]), v4([172, 16, 0, 1]));
        let c = v4([192, 168, 3, 4]);
        assert!(addrs_match(&cidrs, 0, AF_INET, &b, &b));
        assert!(addrs_match(&cidrs, 1, AF_INET, &a, &b));
        assert!(addrs_match(&cidrs, 1, AF_INET, &b, &a));
        assert!(!addrs_match(&cidrs, 1, AF_INET, &b, &c));
        assert!(addrs_match(&cidrs, 2, AF_INET, &b, &c));
        assert!(!addrs_match(&cidrs, 2, AF_INET, &b, &b));
    }
}
