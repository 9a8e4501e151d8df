//! The `/` filter of `keepalive top`: keywords (`port:N`, `addr:CIDR`,
//! `comm:NAME`, `pid:N`, `verdict:V`, `state:S`) and bare words, parsed
//! once and matched against connections and log entries.
//!
//! Terms with the same keyword are alternatives (`port:80 port:443`);
//! different keywords and bare words must all match.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::events::filter::parse_cidr;
use crate::events::{Owner, state_name};

/// What a query is matched against: a connection or a log entry.
pub struct Subject<'a> {
    pub saddr: Option<IpAddr>,
    pub sport: u16,
    pub daddr: Option<IpAddr>,
    pub dport: u16,
    pub state: u32,
    pub owners: &'a [Owner],
    /// Verdict name, when there is one.
    pub verdict: Option<&'static str>,
    /// Further words bare words may match (reason code, event kind).
    pub words: &'a [&'a str],
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Query {
    ports: Vec<u16>,
    cidrs: Vec<IpNet>,
    comms: Vec<String>,
    pids: Vec<u32>,
    verdicts: Vec<String>,
    states: Vec<String>,
    /// ASCII lower case, as the text they are matched against.
    words: Vec<String>,
    /// Some word has a character of an address, port or pid.
    numeric: bool,
}

const VERDICTS: [&str; 4] = ["dead", "orphaned", "unprotected", "healthy"];

/// Every TCP state name, lower case, as `state:` accepts them.
fn known_state(s: &str) -> bool {
    (1..=13).any(|n| state_name(n).eq_ignore_ascii_case(s))
}

fn unmapped(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(a),
        v4 => v4,
    }
}

impl Query {
    /// Parses the filter line; the error names the bad term.
    pub fn parse(text: &str) -> Result<Query, String> {
        let mut q = Query::default();
        for term in text.split_whitespace() {
            let Some((key, value)) = term.split_once(':') else {
                q.words.push(term.to_ascii_lowercase());
                continue;
            };
            match key {
                "port" => q.ports.push(
                    value
                        .parse()
                        .map_err(|_| format!("`{term}`: expected a port number"))?,
                ),
                "addr" => q.cidrs.push(parse_cidr(value).map_err(|_| {
                    format!("`{term}`: expected an address or CIDR like 10.0.0.0/8")
                })?),
                "comm" if !value.is_empty() => q.comms.push(value.to_lowercase()),
                "pid" => q.pids.push(
                    value
                        .parse()
                        .map_err(|_| format!("`{term}`: expected a process id"))?,
                ),
                "verdict" => {
                    let v = value.to_lowercase();
                    if !VERDICTS.contains(&v.as_str()) {
                        return Err(format!("`{term}`: expected one of {}", VERDICTS.join(", ")));
                    }
                    q.verdicts.push(v);
                }
                "state" => {
                    if !known_state(value) {
                        return Err(format!(
                            "`{term}`: expected a TCP state like established or close_wait"
                        ));
                    }
                    q.states.push(value.to_uppercase());
                }
                "comm" => return Err(format!("`{term}`: expected a process name")),
                // An IPv6 address, a `host:port` or any other word with a colon.
                _ => q.words.push(term.to_ascii_lowercase()),
            }
        }
        q.numeric = q
            .words
            .iter()
            .any(|w| w.contains(|c: char| c.is_ascii_digit() || "[]:.*".contains(c)));
        Ok(q)
    }

    pub fn is_empty(&self) -> bool {
        *self == Query::default()
    }

    /// Whether the query names a state explicitly (listeners are hidden otherwise).
    pub fn wants_state(&self, state: u32) -> bool {
        self.states.iter().any(|s| s == state_name(state))
    }

    pub fn matches(&self, s: &Subject) -> bool {
        if !self.ports.is_empty() && !self.ports.iter().any(|&p| p == s.sport || p == s.dport) {
            return false;
        }
        if !self.cidrs.is_empty() {
            let hit = |a: Option<IpAddr>| {
                a.map(unmapped)
                    .is_some_and(|a| self.cidrs.iter().any(|n| n.contains(&a)))
            };
            if !hit(s.saddr) && !hit(s.daddr) {
                return false;
            }
        }
        if !self.pids.is_empty() && !s.owners.iter().any(|o| self.pids.contains(&o.pid)) {
            return false;
        }
        if !self.comms.is_empty()
            && !s.owners.iter().any(|o| {
                let comm = o.comm.to_lowercase();
                self.comms.iter().any(|c| comm.contains(c.as_str()))
            })
        {
            return false;
        }
        if !self.verdicts.is_empty()
            && !s
                .verdict
                .is_some_and(|v| self.verdicts.iter().any(|w| w == v))
        {
            return false;
        }
        if !self.states.is_empty() && !self.wants_state(s.state) {
            return false;
        }
        if self.words.is_empty() {
            return true;
        }
        // One buffer reused for every row: a filter over 100k connections
        // must not allocate 100k strings per frame.
        thread_local! {
            static HAY: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
        }
        HAY.with_borrow_mut(|hay| {
            haystack(s, hay, self.numeric);
            self.words.iter().all(|w| hay.contains(w.as_str()))
        })
    }
}

/// Everything a bare word may match, ASCII lower case, space separated.
/// Appends a number in decimal, without the formatting machinery.
fn push_u32(h: &mut String, mut n: u32) {
    let mut digits = [0u8; 10];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    h.extend(digits[i..].iter().map(|&d| d as char));
}

/// Addresses, ports and pids are written only when some word could match
/// them (`numeric`): formatting them is most of the cost.
fn haystack(s: &Subject, h: &mut String, numeric: bool) {
    h.clear();
    if numeric {
        for (a, p) in [(s.saddr, s.sport), (s.daddr, s.dport)] {
            // As the screen shows them: IPv4-mapped ones as IPv4.
            match a.map(unmapped) {
                Some(IpAddr::V4(v4)) => {
                    for (i, o) in v4.octets().into_iter().enumerate() {
                        if i > 0 {
                            h.push('.');
                        }
                        push_u32(h, u32::from(o));
                    }
                }
                Some(IpAddr::V6(v6)) => {
                    use std::fmt::Write;
                    let _ = write!(h, "[{v6}]");
                }
                None => h.push('*'),
            }
            h.push(':');
            push_u32(h, u32::from(p));
            h.push(' ');
        }
    }
    let lower = |h: &mut String, text: &str| {
        h.push_str(text);
        h.push(' ');
    };
    lower(h, state_name(s.state));
    lower(h, s.verdict.unwrap_or(""));
    for o in s.owners {
        h.push_str(&o.comm);
        if numeric {
            h.push('/');
            push_u32(h, o.pid);
        }
        h.push(' ');
    }
    for w in s.words {
        lower(h, w);
    }
    h.make_ascii_lowercase();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject<'a>(owners: &'a [Owner], words: &'a [&'a str]) -> Subject<'a> {
        Subject {
            saddr: Some("198.18.0.1".parse().unwrap()),
            sport: 40000,
            daddr: Some("::ffff:10.1.2.3".parse().unwrap()),
            dport: 5432,
            state: 1,
            owners,
            verdict: Some("dead"),
            words,
        }
    }

    fn owners() -> Vec<Owner> {
        vec![Owner {
            pid: 4242,
            comm: "postgres".into(),
        }]
    }

    fn m(q: &str) -> bool {
        let o = owners();
        Query::parse(q)
            .unwrap()
            .matches(&subject(&o, &["probes_unanswered"]))
    }

    #[test]
    fn empty_query_matches_everything() {
        assert!(Query::parse("").unwrap().is_empty());
        assert!(Query::parse("   ").unwrap().is_empty());
        assert!(m(""));
    }

    #[test]
    fn keywords_match_their_field() {
        assert!(m("port:5432"));
        assert!(m("port:40000"));
        assert!(!m("port:80"));
        assert!(
            m("addr:10.0.0.0/8"),
            "IPv4-mapped peer matches an IPv4 CIDR"
        );
        assert!(m("addr:198.18.0.1"));
        assert!(!m("addr:192.168.0.0/16"));
        assert!(m("comm:post"));
        assert!(m("comm:POSTGRES"));
        assert!(!m("comm:nginx"));
        assert!(m("pid:4242"));
        assert!(!m("pid:1"));
        assert!(m("verdict:dead"));
        assert!(m("verdict:DEAD"));
        assert!(!m("verdict:healthy"));
        assert!(m("state:established"));
        assert!(m("state:ESTABLISHED"));
        assert!(!m("state:close_wait"));
    }

    #[test]
    fn same_keyword_is_or_different_keywords_are_and() {
        assert!(m("port:80 port:5432"));
        assert!(!m("port:80 port:443"));
        assert!(m("port:5432 verdict:dead"));
        assert!(!m("port:5432 verdict:healthy"));
        assert!(m("verdict:healthy verdict:dead comm:postgres"));
    }

    #[test]
    fn bare_words_match_anything_shown() {
        assert!(m("postgres"));
        assert!(m("4242"));
        assert!(m("postgres/4242"));
        assert!(m("10.1.2.3:5432"));
        assert!(m(":40000"));
        assert!(m("10.1.2.3"));
        assert!(m("unanswered"));
        assert!(m("established dead"));
        assert!(!m("established healthy"));
        assert!(!m("nginx"));
        // An IPv6 word with colons is a bare word, not a keyword.
        let o = owners();
        let mut v6 = subject(&o, &[]);
        v6.daddr = Some("fd00::2".parse().unwrap());
        assert!(Query::parse("[fd00::2]:5432").unwrap().matches(&v6));
        assert!(Query::parse("fd00::").unwrap().matches(&v6));
        assert!(m("198.18.0.1:40000"));
    }

    #[test]
    fn bad_terms_say_what_was_expected() {
        let e = Query::parse("port:http").unwrap_err();
        assert_eq!(e, "`port:http`: expected a port number");
        assert!(Query::parse("port:70000").is_err());
        assert!(
            Query::parse("addr:10.0.0.0/33")
                .unwrap_err()
                .contains("CIDR")
        );
        assert!(Query::parse("pid:-1").is_err());
        let e = Query::parse("verdict:sick").unwrap_err();
        assert!(e.contains("dead, orphaned, unprotected, healthy"), "{e}");
        assert!(Query::parse("state:dancing").is_err());
        assert!(Query::parse("comm:").is_err());
    }

    #[test]
    fn unknown_owner_fails_owner_keywords() {
        let q = Query::parse("pid:4242").unwrap();
        assert!(!q.matches(&subject(&[], &[])));
        let q = Query::parse("comm:postgres").unwrap();
        assert!(!q.matches(&subject(&[], &[])));
    }

    #[test]
    fn wants_state_only_when_named() {
        let q = Query::parse("state:listen").unwrap();
        assert!(q.wants_state(10));
        assert!(!Query::parse("port:1").unwrap().wants_state(10));
    }
}
