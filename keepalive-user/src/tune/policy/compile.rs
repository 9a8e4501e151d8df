//! Compiling parsed rules into the kernel's [`TuneRule`]s, resolving each
//! rule's cgroup path to its kernfs id and depth.

use super::*;

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
