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

/// Why a policy file's permissions let a non-root user change it, if they do.
/// Pure: the caller passes what `stat` said about the file and its directory.
pub fn unsafe_permissions(file: Perm, dir: Perm) -> Option<String> {
    const WORLD_W: u32 = 0o002;
    const GROUP_W: u32 = 0o020;
    const STICKY: u32 = 0o1000;
    if file.uid != 0 {
        return Some(format!("owned by uid {}, not root", file.uid));
    }
    if file.mode & WORLD_W != 0 {
        return Some("writable by every user (chmod o-w)".into());
    }
    if file.mode & GROUP_W != 0 && file.gid != 0 {
        return Some(format!("writable by group {} (chmod g-w)", file.gid));
    }
    // Whoever may write the directory may replace the file, unless the
    // directory is sticky (then only the file's owner, root, may).
    if dir.mode & STICKY == 0 {
        if dir.uid != 0 {
            return Some(format!(
                "its directory is owned by uid {}, who can replace the file",
                dir.uid
            ));
        }
        if dir.mode & WORLD_W != 0 {
            return Some("its directory is writable by every user".into());
        }
        if dir.mode & GROUP_W != 0 && dir.gid != 0 {
            return Some(format!("its directory is writable by group {}", dir.gid));
        }
    }
    None
}

/// What `stat` says about ownership and mode.
#[derive(Clone, Copy, Debug)]
pub struct Perm {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

fn perm_of(p: &Path) -> Result<Perm> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).map_err(|e| anyhow!("cannot read policy {}: {e}", p.display()))?;
    Ok(Perm {
        uid: m.uid(),
        gid: m.gid(),
        mode: m.mode(),
    })
}

/// Reads, checks the permissions of, and parses a policy file.
pub fn load(path: &Path) -> Result<Policy> {
    let shown = path.display().to_string();
    let file = perm_of(path)?;
    let canon =
        std::fs::canonicalize(path).map_err(|e| anyhow!("cannot read policy {shown}: {e}"))?;
    let dir = perm_of(canon.parent().unwrap_or(Path::new("/")))?;
    if let Some(why) = unsafe_permissions(file, dir) {
        return Err(anyhow!(
            "{shown}:1: refusing a policy a non-root user could change: {why}"
        ));
    }
    let text = crate::config::read_config_text(path, "policy")?;
    parse(&text, &shown)
}

/// Resolves a rule's cgroup path to the kernfs id of that cgroup and its
/// depth below the root.
pub fn resolve_cgroup(mount: &Path, path: &str) -> Result<(u64, u32), String> {
    use std::os::unix::fs::MetadataExt;
    let rel = path.trim_matches('/');
    let full: PathBuf = mount.join(rel);
    let m = std::fs::metadata(&full)
        .map_err(|e| format!("cgroup {path} not found under {} ({e})", mount.display()))?;
    if !m.is_dir() {
        return Err(format!(
            "cgroup {path}: {} is not a directory",
            full.display()
        ));
    }
    let level = rel.split('/').filter(|p| !p.is_empty()).count() as u32;
    Ok((m.ino(), level))
}

/// Compiles the rules for the kernel. `cgroup` resolves a rule's cgroup
/// path to (kernfs id, depth). Errors name the rule's line.
pub fn compile(
    policy: &Policy,
    cgroup: impl Fn(&str) -> Result<(u64, u32), String>,
) -> Result<Vec<TuneRule>> {
    let mut out = Vec::with_capacity(policy.rules.len());
    for r in &policy.rules {
        let mut k = TuneRule {
            set: r.option_mask(),
            ..TuneRule::zeroed()
        };
        if let Some(p) = r.remote_port {
            k.criteria |= crit::REMOTE_PORT;
            (k.rport_lo, k.rport_hi) = (p.lo, p.hi);
        }
        if let Some(p) = r.local_port {
            k.criteria |= crit::LOCAL_PORT;
            (k.lport_lo, k.lport_hi) = (p.lo, p.hi);
        }
        if let Some(n) = r.remote {
            k.criteria |= crit::REMOTE;
            k.remote.prefix_len = n.prefix_len();
            match n.addr() {
                IpAddr::V4(a) => {
                    k.remote.family = crate::events::AF_INET;
                    k.remote.addr[..4].copy_from_slice(&a.octets());
                }
                IpAddr::V6(a) => {
                    k.remote.family = crate::events::AF_INET6;
                    k.remote.addr = a.octets();
                }
            }
        }
        if let Some(c) = &r.comm {
            k.criteria |= crit::COMM;
            k.comm[..c.len()].copy_from_slice(c.as_bytes());
        }
        if let Some(c) = &r.cgroup {
            k.criteria |= crit::CGROUP;
            (k.cgroup_id, k.cgroup_level) = cgroup(c).map_err(|why| {
                anyhow!("{}:{}: rule \"{}\": {why}", policy.source, r.line, r.name)
            })?;
        }
        if r.adaptive.is_some() {
            k.criteria |= crit::ADAPTIVE;
        }
        k.values = KaValues {
            keepalive: r.keepalive.map_or(0, u32::from),
            idle_s: r.idle_s.or(r.adaptive.map(|a| a.min_idle_s)).unwrap_or(0),
            intvl_s: r.interval_s.unwrap_or(0),
            cnt: r.count.unwrap_or(0),
            user_timeout_ms: r.user_timeout_ms.unwrap_or(0),
        };
        out.push(k);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use keepalive_common::tune::{Match, SockKey, first_match};

    fn err(text: &str) -> String {
        parse(text, "p.toml").unwrap_err().to_string()
    }

    const PG: &str = r#"
[[rule]]
name = "postgres"
remote_port = 5432
keepalive = true
idle = "30s"
interval = "10s"
count = 3
"#;

    #[test]
    fn the_issue_example_parses() {
        let p = parse(PG, "p.toml").unwrap();
        assert_eq!(p.rules.len(), 1);
        let r = &p.rules[0];
        assert_eq!(r.name, "postgres");
        assert_eq!(r.line, 3);
        assert_eq!(r.remote_port, Some(PortRange { lo: 5432, hi: 5432 }));
        assert_eq!(
            (r.idle_s, r.interval_s, r.count),
            (Some(30), Some(10), Some(3))
        );
        assert_eq!(r.keepalive, Some(true));
        assert_eq!(
            r.option_mask(),
            opt::KEEPALIVE | opt::IDLE | opt::INTVL | opt::CNT
        );
    }

    #[test]
    fn every_key() {
        let p = parse(
            r#"
[thresholds]
idle = "60s"
[serve]
listen = "127.0.0.1:9000"

[[rule]]
name = "all"
remote_port = "5432-5440"
local_port = 40000
remote = "10.0.0.0/8"
comm = "java"
cgroup = "/system.slice/app.service"
keepalive = true
interval = 10
count = 127
user_timeout = "1m30s"
adaptive = { min_idle = "20s", max_idle = "600s" }
"#,
            "p.toml",
        )
        .unwrap();
        let r = &p.rules[0];
        assert_eq!(r.remote_port, Some(PortRange { lo: 5432, hi: 5440 }));
        assert_eq!(
            r.local_port,
            Some(PortRange {
                lo: 40000,
                hi: 40000
            })
        );
        assert_eq!(r.remote, Some("10.0.0.0/8".parse().unwrap()));
        assert_eq!(r.comm.as_deref(), Some("java"));
        assert_eq!(r.cgroup.as_deref(), Some("/system.slice/app.service"));
        assert_eq!(r.interval_s, Some(10));
        assert_eq!(r.count, Some(127));
        assert_eq!(r.user_timeout_ms, Some(90_000));
        assert_eq!(
            r.adaptive,
            Some(Adaptive {
                min_idle_s: 20,
                max_idle_s: 600
            })
        );
        let k = compile(&p, |c| {
            assert_eq!(c, "/system.slice/app.service");
            Ok((99, 2))
        })
        .unwrap();
        assert_eq!(
            k[0].criteria,
            crit::REMOTE_PORT
                | crit::LOCAL_PORT
                | crit::REMOTE
                | crit::COMM
                | crit::CGROUP
                | crit::ADAPTIVE
        );
        assert_eq!((k[0].cgroup_id, k[0].cgroup_level), (99, 2));
        assert_eq!(k[0].values.idle_s, 20, "adaptive starts at the safe end");
        assert_eq!(&k[0].comm[..5], b"java\0");
    }

    #[test]
    fn errors_name_the_line() {
        let cases: &[(&str, &str)] = &[
            (
                "[[rule]]\nname = \"a\"\nidle = \"30s\"\nbogus = 1\n",
                "p.toml:4: ",
            ),
            (
                "[[rule]]\nname = \"a\"\nidle = \"40000s\"\n",
                "p.toml:3: rule \"a\": idle: 40000s out of the kernel's range (1s..=32767s)",
            ),
            (
                "[[rule]]\nname = \"a\"\nidle = \"0s\"\n",
                "p.toml:3: rule \"a\": idle: 0s out of",
            ),
            (
                "[[rule]]\nname = \"a\"\nidle = \"1500ms\"\n",
                "p.toml:3: rule \"a\": idle: 1500ms the kernel counts it in whole seconds",
            ),
            (
                "[[rule]]\nname = \"a\"\n\ninterval = \"32768s\"\n",
                "p.toml:4: rule \"a\": interval: 32768s out",
            ),
            (
                "[[rule]]\nname = \"a\"\ncount = 128\n",
                "p.toml:3: rule \"a\": count: 128 out of the kernel's range (1..=127)",
            ),
            (
                "[[rule]]\nname = \"a\"\ncount = 0\n",
                "p.toml:3: rule \"a\": count: 0 out",
            ),
            (
                "[[rule]]\nname = \"a\"\nuser_timeout = \"0s\"\n",
                "p.toml:3: rule \"a\": user_timeout: 0s out",
            ),
            (
                "[[rule]]\nname = \"a\"\nidle = \"soon\"\n",
                "p.toml:3: rule \"a\": idle: invalid duration `soon`",
            ),
            (
                "[[rule]]\nname = \"a\"\nremote_port = 70000\ncount = 1\n",
                "p.toml:3: rule \"a\": remote_port: 70000 is not a port",
            ),
            (
                "[[rule]]\nname = \"a\"\nremote_port = \"5440-5432\"\ncount = 1\n",
                "p.toml:3: rule \"a\": remote_port: range 5440-5432 is empty",
            ),
            (
                "[[rule]]\nname = \"a\"\nlocal_port = \"x\"\ncount = 1\n",
                "p.toml:3: rule \"a\": local_port: `x` is not a port",
            ),
            (
                "[[rule]]\nname = \"a\"\nremote = \"10.0.0.1/8\"\ncount = 1\n",
                "p.toml:3: rule \"a\": remote: `10.0.0.1/8` has bits set past its prefix; did you mean 10.0.0.0/8?",
            ),
            (
                "[[rule]]\nname = \"a\"\nremote = \"nope\"\ncount = 1\n",
                "p.toml:3: rule \"a\": remote: `nope` is not",
            ),
            (
                "[[rule]]\nname = \"a\"\ncomm = \"a-very-long-command\"\ncount = 1\n",
                "p.toml:3: rule \"a\": comm `a-very-long-command` is longer than 15 bytes and can match nothing",
            ),
            (
                "[[rule]]\nname = \"a\"\ncgroup = \"system.slice\"\ncount = 1\n",
                "p.toml:3: rule \"a\": cgroup `system.slice` must be an absolute path",
            ),
            (
                "[[rule]]\nname = \"a\"\nremote_port = 1\n",
                "p.toml:2: rule \"a\" changes nothing",
            ),
            (
                "[[rule]]\nremote_port = 1\ncount = 1\n",
                "p.toml:1: rule without `name`",
            ),
            (
                "[[rule]]\nname = \"a\"\ncount = 1\nremote_port = 1\n\n[[rule]]\nname = \"a\"\ncount = 2\nremote_port = 2\n",
                "p.toml:7: duplicate rule name \"a\" (first at line 2)",
            ),
            (
                "[[rule]]\nname = \"wide\"\nremote_port = \"1-100\"\ncount = 1\n[[rule]]\nname = \"narrow\"\nremote_port = 5\ncomm = \"x\"\ncount = 2\n",
                "p.toml:6: rule \"narrow\" can never apply: rule \"wide\" (line 2) comes first",
            ),
            (
                "[[rule]]\nname = \"all\"\ncount = 1\n[[rule]]\nname = \"b\"\nremote = \"10.0.0.0/8\"\ncount = 2\n",
                "p.toml:5: rule \"b\" can never apply: rule \"all\" (line 2) comes first and matches every connection it would (every connection)",
            ),
            (
                "[[rule]]\nname = \"a\"\nkeepalive = true\nidle = \"30s\"\nadaptive = { min_idle = \"20s\", max_idle = \"600s\" }\n",
                "p.toml:4: rule \"a\": idle and adaptive together",
            ),
            (
                "[[rule]]\nname = \"a\"\nkeepalive = true\nadaptive = { min_idle = \"600s\", max_idle = \"20s\" }\n",
                "p.toml:4: rule \"a\": adaptive: min_idle (600s) must be below max_idle (20s)",
            ),
            (
                "[[rule]]\nname = \"a\"\nadaptive = { min_idle = \"20s\", max_idle = \"60s\" }\n",
                "p.toml:3: rule \"a\": adaptive needs `keepalive = true`",
            ),
            (
                "[[rule]]\nname = \"a\"\nkeepalive = true\nadaptive = { min_idle = \"20s\", max = \"60s\" }\n",
                "p.toml:4: ",
            ),
            (
                "[[rules]]\nname = \"a\"\ncount = 1\n",
                "p.toml:1: unknown section `rules`: rules are `[[rule]]`",
            ),
            (
                "[thresholds]\nidle = \"5m\"\n",
                "p.toml:1: no [[rule]] in the policy",
            ),
            ("[[rule]]\nname = \"a\"\ncount = \n", "p.toml:3: "),
            (
                "[[rule]]\nname = \"a\"\nkeepalive = \"yes\"\n",
                "p.toml:3: ",
            ),
        ];
        for (text, want) in cases {
            let e = err(text);
            assert!(e.starts_with(want), "for {text:?}\n got: {e}\nwant: {want}");
        }
    }

    #[test]
    fn too_many_rules() {
        let text: String = (0..=MAX_RULES)
            .map(|i| {
                format!(
                    "[[rule]]\nname = \"r{i}\"\nremote_port = {}\ncount = 1\n",
                    i + 1
                )
            })
            .collect();
        let e = err(&text);
        assert!(e.contains("too many rules (17; at most 16)"), "{e}");
    }

    #[test]
    fn shadowing_needs_a_superset_on_every_criterion() {
        // Narrower first, wider second: both reachable.
        parse(
            "[[rule]]\nname = \"n\"\nremote_port = 5\ncount = 1\n[[rule]]\nname = \"w\"\nremote_port = \"1-100\"\ncount = 2\n",
            "p.toml",
        )
        .unwrap();
        // A cgroup parent covers its children but not a sibling with a common prefix.
        let base = "[[rule]]\nname = \"p\"\ncgroup = \"/a\"\ncount = 1\n[[rule]]\nname = \"c\"\ncount = 2\ncgroup = ";
        assert!(parse(&format!("{base}\"/a/b\"\n"), "p").is_err());
        parse(&format!("{base}\"/ab\"\n"), "p").unwrap();
        // Different comms do not shadow.
        parse(
            "[[rule]]\nname = \"a\"\ncomm = \"x\"\ncount = 1\n[[rule]]\nname = \"b\"\ncomm = \"y\"\ncount = 2\n",
            "p",
        )
        .unwrap();
    }

    #[test]
    fn compiled_rules_match_like_the_policy_says() {
        let p = parse(
            r#"
[[rule]]
name = "pg-java"
remote_port = "5432-5440"
comm = "java"
count = 5
[[rule]]
name = "pg"
remote_port = "5432-5440"
remote = "10.0.0.0/8"
count = 4
[[rule]]
name = "v6"
remote = "fd00::/16"
local_port = 22
count = 3
"#,
            "p",
        )
        .unwrap();
        let k = compile(&p, |_| unreachable!()).unwrap();
        let mut rules = [TuneRule::zeroed(); MAX_RULES];
        rules[..k.len()].copy_from_slice(&k);
        let n = k.len() as u32;
        let v4 = |a: [u8; 4], rport: u16, comm: Option<&str>| {
            let mut raddr = [0; 16];
            raddr[..4].copy_from_slice(&a);
            SockKey {
                family: 2,
                lport: 40000,
                rport,
                raddr,
                comm: comm.map(|c| {
                    let mut b = [0u8; 16];
                    b[..c.len()].copy_from_slice(c.as_bytes());
                    b
                }),
            }
        };
        assert_eq!(
            first_match(&rules, n, &v4([10, 1, 1, 1], 5433, Some("java")), |_| 0),
            Match::Rule(0)
        );
        assert_eq!(
            first_match(&rules, n, &v4([10, 1, 1, 1], 5433, Some("psql")), |_| 0),
            Match::Rule(1)
        );
        assert_eq!(
            first_match(&rules, n, &v4([10, 1, 1, 1], 5433, None), |_| 0),
            Match::NeedOwner(0)
        );
        assert_eq!(
            first_match(&rules, n, &v4([11, 1, 1, 1], 5433, Some("psql")), |_| 0),
            Match::None
        );
        assert_eq!(
            first_match(&rules, n, &v4([10, 1, 1, 1], 5441, Some("java")), |_| 0),
            Match::None
        );
        let mut s6 = SockKey {
            family: 10,
            lport: 22,
            rport: 50000,
            raddr: "fd00::9".parse::<std::net::Ipv6Addr>().unwrap().octets(),
            comm: None,
        };
        assert_eq!(first_match(&rules, n, &s6, |_| 0), Match::Rule(2));
        s6.lport = 23;
        assert_eq!(first_match(&rules, n, &s6, |_| 0), Match::None);
    }

    #[test]
    fn missing_cgroup_names_the_rule_line() {
        let p = parse(
            "[[rule]]\nname = \"svc\"\ncgroup = \"/nope.slice\"\ncount = 1\n",
            "p.toml",
        )
        .unwrap();
        let e = compile(&p, |c| {
            resolve_cgroup(Path::new("/nonexistent-cgroup-root"), c)
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("p.toml:2: rule \"svc\": cgroup /nope.slice not found"),
            "{e}"
        );
    }

    #[test]
    fn permissions() {
        let root_dir = Perm {
            uid: 0,
            gid: 0,
            mode: 0o40755,
        };
        let f = |uid, gid, mode| Perm { uid, gid, mode };
        assert_eq!(unsafe_permissions(f(0, 0, 0o100644), root_dir), None);
        assert_eq!(
            unsafe_permissions(f(0, 0, 0o100664), root_dir),
            None,
            "root group"
        );
        assert!(
            unsafe_permissions(f(1000, 0, 0o100600), root_dir)
                .unwrap()
                .contains("uid 1000")
        );
        assert!(
            unsafe_permissions(f(0, 0, 0o100646), root_dir)
                .unwrap()
                .contains("every user")
        );
        assert!(
            unsafe_permissions(f(0, 50, 0o100664), root_dir)
                .unwrap()
                .contains("group 50")
        );
        let user_dir = Perm {
            uid: 1000,
            gid: 1000,
            mode: 0o40755,
        };
        assert!(
            unsafe_permissions(f(0, 0, 0o100644), user_dir)
                .unwrap()
                .contains("directory")
        );
        let tmp = Perm {
            uid: 0,
            gid: 0,
            mode: 0o41777,
        };
        assert_eq!(
            unsafe_permissions(f(0, 0, 0o100644), tmp),
            None,
            "sticky /tmp"
        );
        let open_dir = Perm {
            uid: 0,
            gid: 0,
            mode: 0o40777,
        };
        assert!(unsafe_permissions(f(0, 0, 0o100644), open_dir).is_some());
    }
}
