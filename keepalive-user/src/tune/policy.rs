//! The tuning policy (`--policy FILE`, `[[rule]]` tables in TOML): parsing,
//! every check that refuses a bad file before anything is applied (as
//! `FILE:LINE: what is wrong`), and compiling the rules into the kernel's
//! [`TuneRule`]s. Matching itself is [`keepalive_common::tune::first_match`],
//! shared with the eBPF programs.
//!
//! ```toml
//! [[rule]]
//! name = "postgres"
//! remote_port = 5432          # or "5432-5440"; local_port likewise
//! remote = "10.0.0.0/8"       # CIDR or address
//! comm = "java"               # owner's command name (15 characters at most)
//! cgroup = "/system.slice/app.service"   # that cgroup and its descendants
//! keepalive = true            # SO_KEEPALIVE
//! idle = "30s"                # TCP_KEEPIDLE   1 s ..= 32767 s
//! interval = "10s"            # TCP_KEEPINTVL  1 s ..= 32767 s
//! count = 3                   # TCP_KEEPCNT    1 ..= 127
//! user_timeout = "60s"        # TCP_USER_TIMEOUT (ms precision)
//! adaptive = { min_idle = "20s", max_idle = "600s" }   # learn idle instead
//! ```
//!
//! The file may hold other sections (`[thresholds]`, `[serve]`): they are
//! left to their own readers.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow};
use ipnet::IpNet;
use keepalive_common::TASK_COMM_LEN;
use keepalive_common::tune::{KaValues, MAX_RULES, TuneRule, crit, opt};
use serde::Deserialize;
use toml::Spanned;

mod compile;
mod load;

pub use compile::{compile, resolve_cgroup};
pub use load::{Perm, load, unsafe_permissions};

/// The kernel's limits (include/net/tcp.h).
pub const MAX_KEEPIDLE_S: u64 = 32767;
pub const MAX_KEEPINTVL_S: u64 = 32767;
pub const MAX_KEEPCNT: i64 = 127;

/// A port or an inclusive range of ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    fn contains(&self, o: &PortRange) -> bool {
        self.lo <= o.lo && o.hi <= self.hi
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

/// Learn TCP_KEEPIDLE per destination within these bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Adaptive {
    pub min_idle_s: u32,
    pub max_idle_s: u32,
}

/// One rule, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    /// Line of the rule's name in the file.
    pub line: usize,
    pub remote_port: Option<PortRange>,
    pub local_port: Option<PortRange>,
    pub remote: Option<IpNet>,
    pub comm: Option<String>,
    /// Path below the cgroup v2 mount, as written.
    pub cgroup: Option<String>,
    pub keepalive: Option<bool>,
    pub idle_s: Option<u32>,
    pub interval_s: Option<u32>,
    pub count: Option<u32>,
    pub user_timeout_ms: Option<u32>,
    pub adaptive: Option<Adaptive>,
}

impl Rule {
    /// The options this rule sets, as [`opt`] bits.
    pub fn option_mask(&self) -> u8 {
        let mut m = 0;
        if self.keepalive.is_some() {
            m |= opt::KEEPALIVE;
        }
        if self.idle_s.is_some() || self.adaptive.is_some() {
            m |= opt::IDLE;
        }
        if self.interval_s.is_some() {
            m |= opt::INTVL;
        }
        if self.count.is_some() {
            m |= opt::CNT;
        }
        if self.user_timeout_ms.is_some() {
            m |= opt::USER_TIMEOUT;
        }
        m
    }

    /// True when every connection `other` matches, this rule matches too.
    fn covers(&self, other: &Rule) -> bool {
        fn covers<T>(
            mine: &Option<T>,
            theirs: &Option<T>,
            inside: impl Fn(&T, &T) -> bool,
        ) -> bool {
            match (mine, theirs) {
                (None, _) => true,
                (Some(_), None) => false,
                (Some(a), Some(b)) => inside(a, b),
            }
        }
        covers(&self.remote_port, &other.remote_port, PortRange::contains)
            && covers(&self.local_port, &other.local_port, PortRange::contains)
            && covers(&self.remote, &other.remote, |a, b| a.contains(b))
            && covers(&self.comm, &other.comm, |a, b| a == b)
            && covers(&self.cgroup, &other.cgroup, |a, b| {
                let (a, b) = (a.trim_end_matches('/'), b.trim_end_matches('/'));
                a.is_empty() || b == a || b.starts_with(&format!("{a}/"))
            })
    }

    /// The criteria, for people (`remote_port=5432 comm=java`).
    pub fn criteria_text(&self) -> String {
        let mut parts = Vec::new();
        if let Some(p) = self.remote_port {
            parts.push(format!("remote_port={p}"));
        }
        if let Some(p) = self.local_port {
            parts.push(format!("local_port={p}"));
        }
        if let Some(n) = self.remote {
            parts.push(format!("remote={n}"));
        }
        if let Some(c) = &self.comm {
            parts.push(format!("comm={c}"));
        }
        if let Some(c) = &self.cgroup {
            parts.push(format!("cgroup={c}"));
        }
        if parts.is_empty() {
            "every connection".into()
        } else {
            parts.join(" ")
        }
    }
}

/// A checked policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub rules: Vec<Rule>,
    /// Where it came from (for messages).
    pub source: String,
}

#[derive(Debug, Default, Deserialize)]
struct PolicyFile {
    #[serde(default)]
    rule: Vec<Spanned<RuleFile>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    name: Option<Spanned<String>>,
    remote_port: Option<Spanned<toml::Value>>,
    local_port: Option<Spanned<toml::Value>>,
    remote: Option<Spanned<String>>,
    comm: Option<Spanned<String>>,
    cgroup: Option<Spanned<String>>,
    keepalive: Option<Spanned<bool>>,
    idle: Option<Spanned<toml::Value>>,
    interval: Option<Spanned<toml::Value>>,
    count: Option<Spanned<i64>>,
    user_timeout: Option<Spanned<toml::Value>>,
    adaptive: Option<Spanned<AdaptiveFile>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdaptiveFile {
    min_idle: Spanned<toml::Value>,
    max_idle: Spanned<toml::Value>,
}

/// 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

struct Ctx<'a> {
    text: &'a str,
    name: &'a str,
}

impl Ctx<'_> {
    fn err<T>(&self, span: std::ops::Range<usize>, msg: impl std::fmt::Display) -> Result<T> {
        Err(anyhow!(
            "{}:{}: {msg}",
            self.name,
            line_of(self.text, span.start)
        ))
    }

    fn port(&self, rule: &str, key: &str, v: &Spanned<toml::Value>) -> Result<PortRange> {
        let bad = |why: String| -> Result<PortRange> {
            self.err(v.span(), format!("rule \"{rule}\": {key}: {why}"))
        };
        let range = match v.get_ref() {
            toml::Value::Integer(n) => match u16::try_from(*n).ok().filter(|p| *p != 0) {
                Some(p) => PortRange { lo: p, hi: p },
                None => return bad(format!("{n} is not a port (1..=65535)")),
            },
            toml::Value::String(s) => {
                let parse = |t: &str| t.trim().parse::<u16>().ok().filter(|p| *p != 0);
                let (lo, hi) = match s.split_once('-') {
                    Some((a, b)) => (parse(a), parse(b)),
                    None => (parse(s), parse(s)),
                };
                match (lo, hi) {
                    (Some(lo), Some(hi)) if lo <= hi => PortRange { lo, hi },
                    (Some(lo), Some(hi)) => {
                        return bad(format!("range {lo}-{hi} is empty (it matches nothing)"));
                    }
                    _ => {
                        return bad(format!(
                            "`{s}` is not a port or range (1..=65535, e.g. 5432 or \"5432-5440\")"
                        ));
                    }
                }
            }
            other => {
                return bad(format!(
                    "expected a port or \"LO-HI\", got {}",
                    other.type_str()
                ));
            }
        };
        Ok(range)
    }

    /// A duration as milliseconds: a string (`30s`, `5m`, `1h`) or an
    /// integer number of seconds.
    fn duration_ms(&self, rule: &str, key: &str, v: &Spanned<toml::Value>) -> Result<u64> {
        let bad = |why: String| -> Result<u64> {
            self.err(v.span(), format!("rule \"{rule}\": {key}: {why}"))
        };
        match v.get_ref() {
            toml::Value::String(s) => crate::config::parse_duration(s).or_else(bad),
            toml::Value::Integer(n) if *n >= 0 => Ok(*n as u64 * 1000),
            toml::Value::Integer(n) => bad(format!("{n} is negative")),
            other => bad(format!(
                "expected a duration like \"30s\", got {}",
                other.type_str()
            )),
        }
    }

    /// Whole seconds within `1..=max`.
    fn seconds(&self, rule: &str, key: &str, v: &Spanned<toml::Value>, max: u64) -> Result<u32> {
        let ms = self.duration_ms(rule, key, v)?;
        let why = if !ms.is_multiple_of(1000) {
            "the kernel counts it in whole seconds"
        } else if ms == 0 || ms / 1000 > max {
            "out of the kernel's range"
        } else {
            return Ok((ms / 1000) as u32);
        };
        self.err(
            v.span(),
            format!(
                "rule \"{rule}\": {key}: {} {why} (1s..={max}s)",
                show_ms(ms)
            ),
        )
    }
}

fn show_ms(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Parses and checks a policy. `name` is used in messages.
pub fn parse(text: &str, name: &str) -> Result<Policy> {
    let cx = Ctx { text, name };
    let file: PolicyFile = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(1);
        anyhow!("{name}:{line}: {}", e.message().trim())
    })?;
    // A misspelt section would silently tune nothing.
    if let Ok(table) = text.parse::<toml::Table>() {
        for key in table.keys() {
            if key != "rule" && key.eq_ignore_ascii_case("rule")
                || key.eq_ignore_ascii_case("rules")
            {
                let at = text.find(key.as_str()).unwrap_or(0);
                return cx.err(
                    at..at,
                    format!("unknown section `{key}`: rules are `[[rule]]`"),
                );
            }
        }
    }
    if file.rule.is_empty() {
        return Err(anyhow!(
            "{name}:1: no [[rule]] in the policy: nothing to tune"
        ));
    }
    if file.rule.len() > MAX_RULES {
        let extra = &file.rule[MAX_RULES];
        return cx.err(
            extra.span(),
            format!("too many rules ({}; at most {MAX_RULES})", file.rule.len()),
        );
    }
    let mut rules: Vec<Rule> = Vec::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    for r in &file.rule {
        let span = r.span();
        let r = r.get_ref();
        let Some(n) = &r.name else {
            return cx.err(span, "rule without `name` (every rule needs a unique name)");
        };
        let rname = n.get_ref().clone();
        if rname.trim().is_empty() {
            return cx.err(n.span(), "rule name is empty");
        }
        let line = line_of(text, n.span().start);
        if let Some(first) = names.get(&rname) {
            return cx.err(
                n.span(),
                format!("duplicate rule name \"{rname}\" (first at line {first})"),
            );
        }
        names.insert(rname.clone(), line);
        let rn = rname.as_str();
        let remote_port = r
            .remote_port
            .as_ref()
            .map(|v| cx.port(rn, "remote_port", v))
            .transpose()?;
        let local_port = r
            .local_port
            .as_ref()
            .map(|v| cx.port(rn, "local_port", v))
            .transpose()?;
        let remote = match &r.remote {
            None => None,
            Some(v) => Some(
                parse_remote(v.get_ref())
                    .or_else(|why| cx.err(v.span(), format!("rule \"{rn}\": remote: {why}")))?,
            ),
        };
        let comm = match &r.comm {
            None => None,
            Some(v) => {
                let c = v.get_ref();
                if c.is_empty() {
                    return cx.err(v.span(), format!("rule \"{rn}\": comm is empty"));
                }
                if c.len() > TASK_COMM_LEN - 1 {
                    return cx.err(
                        v.span(),
                        format!(
                            "rule \"{rn}\": comm `{c}` is longer than {} bytes and can match nothing (the kernel keeps the first {} of a command name)",
                            TASK_COMM_LEN - 1,
                            TASK_COMM_LEN - 1
                        ),
                    );
                }
                Some(c.clone())
            }
        };
        let cgroup = match &r.cgroup {
            None => None,
            Some(v) => {
                let c = v.get_ref();
                if !c.starts_with('/') || c.split('/').any(|p| p == "..") {
                    return cx.err(
                        v.span(),
                        format!(
                            "rule \"{rn}\": cgroup `{c}` must be an absolute path below the cgroup v2 mount, like /system.slice/app.service"
                        ),
                    );
                }
                Some(c.clone())
            }
        };
        let keepalive = r.keepalive.as_ref().map(|v| *v.get_ref());
        let idle_s = r
            .idle
            .as_ref()
            .map(|v| cx.seconds(rn, "idle", v, MAX_KEEPIDLE_S))
            .transpose()?;
        let interval_s = r
            .interval
            .as_ref()
            .map(|v| cx.seconds(rn, "interval", v, MAX_KEEPINTVL_S))
            .transpose()?;
        let count = match &r.count {
            None => None,
            Some(v) if (1..=MAX_KEEPCNT).contains(v.get_ref()) => Some(*v.get_ref() as u32),
            Some(v) => {
                return cx.err(
                    v.span(),
                    format!(
                        "rule \"{rn}\": count: {} out of the kernel's range (1..={MAX_KEEPCNT})",
                        v.get_ref()
                    ),
                );
            }
        };
        let user_timeout_ms = match &r.user_timeout {
            None => None,
            Some(v) => {
                let ms = cx.duration_ms(rn, "user_timeout", v)?;
                if ms == 0 || ms > i32::MAX as u64 {
                    return cx.err(
                        v.span(),
                        format!(
                            "rule \"{rn}\": user_timeout: {} out of the kernel's range (1ms..={}ms)",
                            show_ms(ms),
                            i32::MAX
                        ),
                    );
                }
                Some(ms as u32)
            }
        };
        let adaptive = match &r.adaptive {
            None => None,
            Some(a) => {
                let inner = a.get_ref();
                let min = cx.seconds(rn, "adaptive.min_idle", &inner.min_idle, MAX_KEEPIDLE_S)?;
                let max = cx.seconds(rn, "adaptive.max_idle", &inner.max_idle, MAX_KEEPIDLE_S)?;
                if min >= max {
                    return cx.err(
                        inner.min_idle.span(),
                        format!(
                            "rule \"{rn}\": adaptive: min_idle ({min}s) must be below max_idle ({max}s)"
                        ),
                    );
                }
                if let Some(i) = &r.idle {
                    return cx.err(
                        i.span(),
                        format!("rule \"{rn}\": idle and adaptive together: adaptive chooses idle, remove one"),
                    );
                }
                if keepalive != Some(true) {
                    return cx.err(
                        a.span(),
                        format!("rule \"{rn}\": adaptive needs `keepalive = true`"),
                    );
                }
                Some(Adaptive {
                    min_idle_s: min,
                    max_idle_s: max,
                })
            }
        };
        let rule = Rule {
            name: rname.clone(),
            line,
            remote_port,
            local_port,
            remote,
            comm,
            cgroup,
            keepalive,
            idle_s,
            interval_s,
            count,
            user_timeout_ms,
            adaptive,
        };
        if rule.option_mask() == 0 {
            return cx.err(
                n.span(),
                format!(
                    "rule \"{rn}\" changes nothing: set keepalive, idle, interval, count, user_timeout or adaptive"
                ),
            );
        }
        if let Some(earlier) = rules.iter().find(|e| e.covers(&rule)) {
            return cx.err(
                n.span(),
                format!(
                    "rule \"{rn}\" can never apply: rule \"{}\" (line {}) comes first and matches every connection it would ({})",
                    earlier.name,
                    earlier.line,
                    earlier.criteria_text()
                ),
            );
        }
        rules.push(rule);
    }
    Ok(Policy {
        rules,
        source: name.to_string(),
    })
}

fn parse_remote(s: &str) -> Result<IpNet, String> {
    if let Ok(net) = s.parse::<IpNet>() {
        if net.trunc() != net {
            return Err(format!(
                "`{s}` has bits set past its prefix; did you mean {}?",
                net.trunc()
            ));
        }
        return Ok(net);
    }
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("`{s}` is not an address or CIDR (e.g. 10.0.0.0/8, fd00::/64)"))
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
