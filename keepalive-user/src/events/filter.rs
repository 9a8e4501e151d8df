//! Which events the user asked for (`--port`, `--addr`, `--pid`, `--event`,
//! `--to-state`).
//!
//! The same filter is applied twice: the parts that fit are pushed into the
//! kernel ([`Filter::apply_to_kernel`]) so unwanted events never take ring
//! buffer space, and [`Filter::matches`] applies all of it in userspace.

use std::collections::BTreeSet;
use std::net::IpAddr;

use anyhow::{Result, anyhow};
use ipnet::IpNet;
use keepalive_common::{Cidr, Config, MAX_CIDRS, MAX_PORTS, tcp_state};

use super::{AF_INET, AF_INET6, Detail, Event, Kind};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub ports: Vec<u16>,
    pub cidrs: Vec<IpNet>,
    pub pids: Vec<u32>,
    /// Empty: every kind.
    pub kinds: BTreeSet<Kind>,
    /// State changes only into these states (`tcp_state` numbers); empty:
    /// into every state. Other kinds are not affected.
    pub to_states: BTreeSet<u32>,
}

/// Parses `--to-state`: a TCP state by its kernel name, in any case
/// (`close`, `ESTABLISHED`, `fin-wait1`).
pub fn parse_tcp_state(s: &str) -> Result<u32> {
    let wanted = s.replace('-', "_");
    (tcp_state::ESTABLISHED..=tcp_state::BOUND_INACTIVE)
        .find(|&n| tcp_state::name(n).eq_ignore_ascii_case(&wanted))
        .ok_or_else(|| {
            let names: Vec<&str> = (tcp_state::ESTABLISHED..=tcp_state::BOUND_INACTIVE)
                .map(tcp_state::name)
                .collect();
            anyhow!(
                "invalid TCP state `{s}`: expected one of {}",
                names.join(", ").to_lowercase()
            )
        })
}

/// Parses `--addr`: a CIDR (`10.0.0.0/8`, `fd00::/64`) or a bare address.
pub fn parse_cidr(s: &str) -> Result<IpNet> {
    if let Ok(n) = s.parse::<IpNet>() {
        return Ok(n.trunc());
    }
    s.parse::<IpAddr>().map(IpNet::from).map_err(|_| {
        anyhow!("invalid address `{s}`: expected an address or CIDR like 10.1.0.0/16 or fd00::/64")
    })
}

/// IPv4 addresses as an IPv6 socket sees them (`::ffff:a.b.c.d`) match IPv4 CIDRs.
fn unmapped(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(a),
        v4 => v4,
    }
}

impl Filter {
    pub fn matches(&self, e: &Event) -> bool {
        if !self.kinds.is_empty() && !self.kinds.contains(&e.kind()) {
            return false;
        }
        if let Detail::StateChange { new, .. } = e.detail
            && !self.to_states.is_empty()
            && !self.to_states.contains(&new)
        {
            return false;
        }
        self.matches_tuple(
            e.sport,
            e.dport,
            Some(e.saddr),
            Some(e.daddr),
            e.owner.iter().map(|o| o.pid),
        )
    }

    /// Port (either side), address (either side, IPv4-mapped too) and
    /// owner filters; an unknown owner fails a pid filter.
    pub fn matches_tuple(
        &self,
        sport: u16,
        dport: u16,
        saddr: Option<IpAddr>,
        daddr: Option<IpAddr>,
        mut owner_pids: impl Iterator<Item = u32>,
    ) -> bool {
        if !self.ports.is_empty() && !self.ports.iter().any(|&p| p == sport || p == dport) {
            return false;
        }
        if !self.cidrs.is_empty() {
            let hit = |a: Option<IpAddr>| {
                a.map(unmapped)
                    .is_some_and(|a| self.cidrs.iter().any(|n| n.contains(&a)))
            };
            if !hit(saddr) && !hit(daddr) {
                return false;
            }
        }
        self.pids.is_empty() || owner_pids.any(|pid| self.pids.contains(&pid))
    }

    /// Bit mask of kinds for the kernel.
    pub fn event_mask(&self) -> u32 {
        Kind::ALL
            .into_iter()
            .filter(|k| k.is_kernel() && (self.kinds.is_empty() || self.kinds.contains(k)))
            .fold(0, |m, k| m | (1 << k.raw()))
    }

    /// Bit mask of the states state changes are emitted into (0: all).
    pub fn state_mask(&self) -> u32 {
        self.to_states
            .iter()
            .filter(|&&s| s < 32)
            .fold(0, |m, s| m | (1 << s))
    }

    /// Pushes what fits of the filter into the kernel configuration.
    /// Anything that does not fit stays a userspace-only filter.
    pub fn apply_to_kernel(&self, cfg: &mut Config) {
        cfg.event_mask = self.event_mask();
        cfg.state_mask = self.state_mask();
        if !self.ports.is_empty() && self.ports.len() <= MAX_PORTS && !self.ports.contains(&0) {
            for (slot, p) in cfg.ports.iter_mut().zip(&self.ports) {
                *slot = *p;
            }
        }
        let mut cidrs = Vec::new();
        for c in &self.cidrs {
            match c {
                IpNet::V4(v4) => {
                    let mut a = [0u8; 16];
                    a[..4].copy_from_slice(&v4.addr().octets());
                    cidrs.push((AF_INET, a, v4.prefix_len()));
                    // the same hosts seen through an IPv6 socket
                    let mapped = v4.addr().to_ipv6_mapped().octets();
                    cidrs.push((AF_INET6, mapped, 96 + v4.prefix_len()));
                }
                IpNet::V6(v6) => cidrs.push((AF_INET6, v6.addr().octets(), v6.prefix_len())),
            }
        }
        if !cidrs.is_empty() && cidrs.len() <= MAX_CIDRS {
            cfg.n_cidrs = cidrs.len() as u32;
            for (slot, (family, addr, prefix_len)) in cfg.cidrs.iter_mut().zip(cidrs) {
                *slot = Cidr {
                    addr,
                    family,
                    prefix_len,
                    _pad: [0; 6],
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Detail, Owner};

    fn ev(saddr: &str, sport: u16, daddr: &str, dport: u16) -> Event {
        Event {
            ts_mono_ns: 0,
            cookie: 1,
            netns: 1,
            saddr: saddr.parse().unwrap(),
            sport,
            daddr: daddr.parse().unwrap(),
            dport,
            state: 1,
            owner: Some(Owner {
                pid: 10,
                comm: "x".into(),
            }),
            detail: Detail::KeepaliveProbe { probe: 1 },
        }
    }

    #[test]
    fn empty_filter_matches_everything() {
        assert!(Filter::default().matches(&ev("1.2.3.4", 1, "5.6.7.8", 2)));
    }

    #[test]
    fn port_matches_either_side() {
        let f = Filter {
            ports: vec![443],
            ..Default::default()
        };
        assert!(f.matches(&ev("1.2.3.4", 443, "5.6.7.8", 2)));
        assert!(f.matches(&ev("1.2.3.4", 1, "5.6.7.8", 443)));
        assert!(!f.matches(&ev("1.2.3.4", 1, "5.6.7.8", 2)));
    }

    #[test]
    fn cidr_matches_either_address_and_mapped_v4() {
        let f = Filter {
            cidrs: vec![parse_cidr("198.18.0.0/15").unwrap()],
            ..Default::default()
        };
        assert!(f.matches(&ev("198.19.255.255", 1, "5.6.7.8", 2)));
        assert!(f.matches(&ev("5.6.7.8", 1, "198.18.0.1", 2)));
        assert!(f.matches(&ev("::ffff:198.18.0.1", 1, "::1", 2)));
        assert!(!f.matches(&ev("198.20.0.0", 1, "5.6.7.8", 2)));
    }

    #[test]
    fn pid_filter_excludes_unknown_owner() {
        let f = Filter {
            pids: vec![10],
            ..Default::default()
        };
        let mut e = ev("1.1.1.1", 1, "2.2.2.2", 2);
        assert!(f.matches(&e));
        e.owner = None;
        assert!(!f.matches(&e));
    }

    #[test]
    fn kinds_and_mask() {
        let f = Filter {
            kinds: [Kind::Timeout].into_iter().collect(),
            ..Default::default()
        };
        assert!(!f.matches(&ev("1.1.1.1", 1, "2.2.2.2", 2)));
        assert_eq!(f.event_mask(), 1 << keepalive_common::kind::TIMEOUT);
        assert_eq!(Filter::default().event_mask().count_ones(), 6);
    }

    fn change(old: u32, new: u32) -> Event {
        Event {
            detail: Detail::StateChange { old, new },
            ..ev("1.1.1.1", 1, "2.2.2.2", 2)
        }
    }

    #[test]
    fn to_states_narrow_state_changes_only() {
        use tcp_state::{CLOSE, ESTABLISHED, FIN_WAIT1, LAST_ACK, SYN_SENT};
        let f = Filter {
            to_states: [CLOSE, ESTABLISHED].into_iter().collect(),
            ..Default::default()
        };
        assert!(f.matches(&change(LAST_ACK, CLOSE)));
        assert!(f.matches(&change(SYN_SENT, ESTABLISHED)));
        assert!(!f.matches(&change(ESTABLISHED, FIN_WAIT1)));
        // → SYN_SENT reaches userspace (it carries the owner) but is not shown.
        assert!(!f.matches(&change(CLOSE, SYN_SENT)));
        // Other kinds pass.
        assert!(f.matches(&ev("1.1.1.1", 1, "2.2.2.2", 2)));
        assert_eq!(f.state_mask(), 1 << CLOSE | 1 << ESTABLISHED);
        let mut cfg = Config::zeroed();
        f.apply_to_kernel(&mut cfg);
        assert_eq!(cfg.state_mask, 1 << CLOSE | 1 << ESTABLISHED);
        assert_eq!(cfg.event_mask, Filter::default().event_mask());
        assert_eq!(Filter::default().state_mask(), 0);
    }

    #[test]
    fn tcp_states_parse_by_kernel_name_in_any_case() {
        assert_eq!(parse_tcp_state("close").unwrap(), tcp_state::CLOSE);
        assert_eq!(
            parse_tcp_state("CLOSE_WAIT").unwrap(),
            tcp_state::CLOSE_WAIT
        );
        assert_eq!(parse_tcp_state("fin-wait1").unwrap(), tcp_state::FIN_WAIT1);
        for n in tcp_state::ESTABLISHED..=tcp_state::BOUND_INACTIVE {
            assert_eq!(parse_tcp_state(tcp_state::name(n)).unwrap(), n);
        }
        let e = parse_tcp_state("closed").unwrap_err().to_string();
        assert!(
            e.starts_with("invalid TCP state `closed`: expected one of established, syn_sent"),
            "{e}"
        );
        assert!(!e.contains('\n'));
    }

    #[test]
    fn parse_errors_are_clear() {
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert_eq!(parse_cidr("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse_cidr("fd00::1").unwrap().to_string(), "fd00::1/128");
    }

    #[test]
    fn kernel_config_gets_ports_and_mapped_cidrs() {
        let f = Filter {
            ports: vec![80, 443],
            cidrs: vec![parse_cidr("198.18.0.0/16").unwrap()],
            ..Default::default()
        };
        let mut cfg = Config::zeroed();
        f.apply_to_kernel(&mut cfg);
        assert_eq!(&cfg.ports[..3], &[80, 443, 0]);
        assert_eq!(cfg.n_cidrs, 2);
        assert_eq!(cfg.cidrs[0].family, AF_INET);
        assert_eq!(cfg.cidrs[0].prefix_len, 16);
        assert_eq!(cfg.cidrs[1].family, AF_INET6);
        assert_eq!(cfg.cidrs[1].prefix_len, 112);
    }

    #[test]
    fn too_many_ports_stay_in_userspace() {
        let f = Filter {
            ports: (1..=9).collect(),
            ..Default::default()
        };
        let mut cfg = Config::zeroed();
        f.apply_to_kernel(&mut cfg);
        assert_eq!(cfg.ports, [0; MAX_PORTS]);
    }
}
