//! What a kernel [`TuneReport`] means, as a `tuned` record: decoding
//! (pure, unit-tested), the JSON wire type and the text line. Every change,
//! every failure, every option an application kept and every restore is one
//! record, in the same stream conventions as `record`'s events.

use std::net::IpAddr;

use keepalive_common::tune::{KaValues, TuneReport, opt, report, tflags};
use serde::Serialize;
use serde_json::{Value, json};

use crate::events::{AF_INET, AF_INET6, Owner, state_name};
use crate::output::json::{ConnIdentityOut, JsonRecord, key, write_conn_record};
use crate::output::{Clock, endpoint};
use crate::table::ConnId;

/// What happened to a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Options set.
    Tuned,
    /// Would have been set (`--dry-run`).
    DryRun,
    /// The rule matched but the application's own values won.
    AppKept,
    /// The application changed an option we had set; it keeps its value.
    AppOverride,
    /// The application tried to change an option we had set; `--enforce`
    /// gave it the policy's value instead.
    Enforced,
    /// Our values were taken back.
    Restored,
    /// Over the changes-per-second cap; retried on a later walk.
    RateLimited,
    /// Every option the rule sets failed to apply.
    Failed,
    /// An adaptive rule learned a new idle for a destination (new
    /// connections to it get it); `evidence` says why.
    Adapted,
}

/// Where the socket was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// At connection establishment (sock_ops).
    New,
    /// In a walk over existing sockets.
    Existing,
    /// In the application's own setsockopt call.
    Application,
    /// What the adaptive learner saw on this connection.
    Learned,
}

/// One option's change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Change {
    pub option: &'static str,
    pub old: Value,
    pub new: Value,
    /// The old value was the namespace's sysctl (the socket had none of its own).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub old_from_sysctl: bool,
    /// The new value is the sysctl's current value (restoring a socket
    /// that had none of its own: setsockopt cannot set "none" back).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub new_from_sysctl: bool,
}

/// An option the rule sets that was left at the application's value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Kept {
    pub option: &'static str,
    pub value: Value,
}

/// An option `bpf_setsockopt` refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Failure {
    pub option: &'static str,
    pub error: String,
}

/// A decoded tuning report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tuned {
    pub ts_mono_ns: u64,
    pub id: ConnId,
    pub owner: Option<Owner>,
    pub action: Action,
    pub source: Source,
    pub rule: String,
    pub changes: Vec<Change>,
    pub kept: Vec<Kept>,
    pub failed: Vec<Failure>,
    /// Why this value (adaptive rules): the evidence behind a learned idle.
    pub evidence: Option<Value>,
}

/// The option names used in records.
pub fn option_name(bit: u8) -> &'static str {
    match bit {
        opt::KEEPALIVE => "keepalive",
        opt::IDLE => "idle_s",
        opt::INTVL => "interval_s",
        opt::CNT => "count",
        _ => "user_timeout_ms",
    }
}

fn value_of(bit: u8, v: u32) -> Value {
    if bit == opt::KEEPALIVE {
        json!(v != 0)
    } else {
        json!(v)
    }
}

/// The sysctl that stands for a 0 of option `bit`, if one does.
fn sysctl_of(r: &TuneReport, bit: u8) -> Option<u32> {
    match bit {
        opt::IDLE => Some(r.sysctl_idle_s),
        opt::INTVL => Some(r.sysctl_intvl_s),
        opt::CNT => Some(r.sysctl_cnt),
        _ => None,
    }
}

/// An option's value as the socket behaves: a 0 timer parameter is the sysctl's.
fn effective(r: &TuneReport, bit: u8, v: u32) -> (Value, bool) {
    match sysctl_of(r, bit) {
        Some(s) if v == 0 => (value_of(bit, s), true),
        _ => (value_of(bit, v), false),
    }
}

fn errno_name(err: i32) -> String {
    match -err {
        libc::EINVAL => "EINVAL".into(),
        libc::ENOMEM => "ENOMEM".into(),
        libc::EPERM => "EPERM".into(),
        libc::ENOPROTOOPT => "ENOPROTOOPT".into(),
        libc::EOPNOTSUPP => "EOPNOTSUPP".into(),
        e => format!("errno {e}"),
    }
}

/// The address of a report, as events decode theirs; `None` for a socket
/// of neither family.
fn addr(family: u8, raw: &[u8; 16]) -> Option<IpAddr> {
    (family == AF_INET || family == AF_INET6).then(|| crate::events::addr(family, raw))
}

fn bits(mask: u8) -> impl Iterator<Item = u8> {
    opt::ORDER
        .into_iter()
        .filter(move |b| mask & b != 0)
        .collect::<Vec<_>>()
        .into_iter()
}

/// Decodes a report; `rule_name(n)` names rule number `n` (0-based).
/// `None` for reports that are not for people (owner lookups).
pub fn decode(r: &TuneReport, rule_name: impl Fn(usize) -> Option<String>) -> Option<Tuned> {
    let source = match r.what {
        report::APP_OVERRIDE | report::ENFORCED => Source::Application,
        _ if r.flags & tflags::NEW != 0 => Source::New,
        _ => Source::Existing,
    };
    let mut action = match r.what {
        report::TUNED => Action::Tuned,
        report::DRY_RUN => Action::DryRun,
        report::APP_KEPT => Action::AppKept,
        report::APP_OVERRIDE => Action::AppOverride,
        report::ENFORCED => Action::Enforced,
        report::RESTORED => Action::Restored,
        report::RATE_LIMITED => Action::RateLimited,
        _ => return None,
    };
    // The owner's name may come without a pid (found in /proc by userspace).
    let owner = (r.pid != 0 || r.comm[0] != 0).then(|| Owner {
        pid: r.pid,
        comm: crate::events::comm::Comm::from_bytes(&r.comm),
    });
    let changed = r.set & !r.failed;
    let changes = bits(changed)
        .map(|bit| {
            let (old, old_from_sysctl) = match r.what {
                // An application's own call: raw values on both sides.
                report::APP_OVERRIDE | report::ENFORCED | report::RESTORED => {
                    (value_of(bit, r.old.get(bit)), false)
                }
                _ => effective(r, bit, r.old.get(bit)),
            };
            let (new, new_from_sysctl) = match r.what {
                report::APP_OVERRIDE | report::ENFORCED => (value_of(bit, r.new.get(bit)), false),
                _ => effective(r, bit, r.new.get(bit)),
            };
            Change {
                option: option_name(bit),
                old,
                new,
                old_from_sysctl,
                new_from_sysctl,
            }
        })
        .collect();
    let kept = bits(r.kept)
        .map(|bit| Kept {
            option: option_name(bit),
            value: value_of(bit, r.old.get(bit)),
        })
        .collect();
    let failed: Vec<Failure> = bits(r.failed)
        .map(|bit| Failure {
            option: option_name(bit),
            error: errno_name(r.err),
        })
        .collect();
    if !failed.is_empty() && changed == 0 {
        action = Action::Failed;
    }
    Some(Tuned {
        ts_mono_ns: r.ts_ns,
        id: ConnId {
            cookie: r.cookie,
            netns: r.netns,
            saddr: addr(r.family, &r.saddr),
            sport: r.sport,
            daddr: addr(r.family, &r.daddr),
            dport: r.dport,
            state: r.state as u32,
        },
        owner,
        action,
        source,
        rule: (r.rule as usize)
            .checked_sub(1)
            .and_then(rule_name)
            .unwrap_or_else(|| format!("#{}", r.rule)),
        changes,
        kept,
        failed,
        evidence: None,
    })
}

/// A `tuned` record as serialised (schema in docs/tuning.md): the
/// connection's identity as every record has it, then the tuning fields.
pub struct TunedOut<'a> {
    id: ConnIdentityOut<'a>,
    tuned: &'a Tuned,
}

impl<'a> TunedOut<'a> {
    pub fn new(t: &'a Tuned, clock: &Clock) -> Self {
        TunedOut {
            id: ConnIdentityOut {
                ts: clock.rfc3339_display(t.ts_mono_ns),
                ts_mono_ns: t.ts_mono_ns,
                id: t.id,
                pid: t.owner.as_ref().map(|o| o.pid).filter(|p| *p != 0),
                comm: t.owner.as_ref().map(|o| o.comm.as_str()),
            },
            tuned: t,
        }
    }
}

impl JsonRecord for TunedOut<'_> {
    fn write_json(&self, out: &mut Vec<u8>) -> std::io::Result<()> {
        let t = self.tuned;
        write_conn_record(out, "tuned", &self.id, |w| {
            w.serde(key!("action"), &t.action)?;
            w.serde(key!("source"), &t.source)?;
            w.text(key!("rule"), &t.rule)?;
            w.bool(key!("dry_run"), t.action == Action::DryRun)?;
            w.serde(key!("changes"), &t.changes)?;
            w.serde(key!("kept"), &t.kept)?;
            w.serde(key!("failed"), &t.failed)?;
            match &t.evidence {
                Some(evidence) => w.serde(key!("evidence"), evidence),
                None => Ok(()),
            }
        })
    }
}

fn show(v: &Value, option: &str) -> String {
    match (v, option) {
        (Value::Bool(b), _) => if *b { "on" } else { "off" }.into(),
        (v, "idle_s" | "interval_s") => format!("{v}s"),
        (v, "user_timeout_ms") => format!("{v}ms"),
        (v, _) => v.to_string(),
    }
}

impl Action {
    /// The name records use (`tuned`, `dry_run`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Action::Tuned => "tuned",
            Action::DryRun => "dry_run",
            Action::AppKept => "app_kept",
            Action::AppOverride => "app_override",
            Action::Enforced => "enforced",
            Action::Restored => "restored",
            Action::RateLimited => "rate_limited",
            Action::Failed => "failed",
            Action::Adapted => "adapted",
        }
    }
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::New => "new",
            Source::Existing => "existing",
            Source::Application => "application",
            Source::Learned => "learned",
        }
    }
}

/// What was done, without when and to which connection: `tuned
/// rule=db (existing) idle 7200s(sysctl)->30s ...` (text lines, `top`'s log).
pub fn tuned_summary(t: &Tuned) -> String {
    let mut s = format!("{} rule={} ({})", t.action.name(), t.rule, t.source.name());
    for c in &t.changes {
        let tag = |from: bool| if from { "(sysctl)" } else { "" };
        s += &format!(
            " {} {}{}->{}{}",
            c.option.trim_end_matches("_s").trim_end_matches("_ms"),
            show(&c.old, c.option),
            tag(c.old_from_sysctl),
            show(&c.new, c.option),
            tag(c.new_from_sysctl),
        );
    }
    for k in &t.kept {
        s += &format!(" kept {}={}", k.option, show(&k.value, k.option));
    }
    for f in &t.failed {
        s += &format!(" failed {}={}", f.option, f.error);
    }
    if let Some(e) = &t.evidence {
        s += &format!(" evidence={e}");
    }
    s
}

/// One `tuned` record as a line of text.
pub fn tuned_text(t: &Tuned, clock: &Clock) -> String {
    let mut s = format!(
        "{} {:<15} {} > {} {} cookie={} {}",
        clock.rfc3339(t.ts_mono_ns),
        "tuned",
        endpoint(t.id.saddr, t.id.sport),
        endpoint(t.id.daddr, t.id.dport),
        state_name(t.id.state),
        t.id.cookie,
        tuned_summary(t),
    );
    if let Some(o) = &t.owner {
        if o.pid != 0 {
            s += &format!(" pid={}", o.pid);
        }
        s += &format!(" comm={}", o.comm);
    }
    s
}

/// The values a `TuneReport` carries, for tests and callers that need them raw.
pub fn values(r: &TuneReport) -> (KaValues, KaValues) {
    (r.old, r.new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::json;

    fn rep(what: u8) -> TuneReport {
        let mut r = TuneReport {
            what,
            rule: 1,
            family: 2,
            sport: 40000,
            dport: 5432,
            state: 1,
            cookie: 7,
            ts_ns: 1_000_000_000,
            sysctl_idle_s: 7200,
            sysctl_intvl_s: 75,
            sysctl_cnt: 9,
            ..TuneReport::default()
        };
        r.saddr[..4].copy_from_slice(&[10, 0, 0, 1]);
        r.daddr[..4].copy_from_slice(&[10, 0, 0, 2]);
        r
    }

    fn names(i: usize) -> Option<String> {
        ["postgres"].get(i).map(|s| s.to_string())
    }

    #[test]
    fn action_and_source_names_are_the_records_names() {
        use Action::*;
        for a in [
            Tuned,
            DryRun,
            AppKept,
            AppOverride,
            Enforced,
            Restored,
            RateLimited,
            Failed,
            Adapted,
        ] {
            assert_eq!(serde_json::to_value(a).unwrap(), a.name());
        }
        for s in [
            Source::New,
            Source::Existing,
            Source::Application,
            Source::Learned,
        ] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.name());
        }
    }

    #[test]
    fn tuned_shows_sysctl_defaults_as_old_values() {
        let mut r = rep(report::TUNED);
        r.flags = tflags::NEW;
        r.set = opt::KEEPALIVE | opt::IDLE | opt::INTVL | opt::CNT;
        r.new = KaValues {
            keepalive: 1,
            idle_s: 30,
            intvl_s: 10,
            cnt: 3,
            user_timeout_ms: 0,
        };
        let t = decode(&r, names).unwrap();
        assert_eq!(t.action, Action::Tuned);
        assert_eq!(t.source, Source::New);
        assert_eq!(t.rule, "postgres");
        let idle = t.changes.iter().find(|c| c.option == "idle_s").unwrap();
        assert_eq!(
            (idle.old.clone(), idle.new.clone()),
            (json!(7200), json!(30))
        );
        assert!(idle.old_from_sysctl);
        let ka = t.changes.iter().find(|c| c.option == "keepalive").unwrap();
        assert_eq!(
            (ka.old.clone(), ka.new.clone()),
            (json!(false), json!(true))
        );
        let v: Value =
            serde_json::from_str(&json::to_string(&TunedOut::new(&t, &Clock::fixed(0)))).unwrap();
        assert_eq!(v["event"], "tuned");
        assert_eq!(v["action"], "tuned");
        assert_eq!(v["source"], "new");
        assert_eq!(v["dry_run"], false);
        assert_eq!(v["daddr"], "10.0.0.2");
        // Applied in the order the kernel sets them: timers, then keepalive.
        let order: Vec<_> = t.changes.iter().map(|c| c.option).collect();
        assert_eq!(order, ["idle_s", "interval_s", "count", "keepalive"]);
        let line = tuned_text(&t, &Clock::fixed(0));
        assert!(
            line.contains("tuned rule=postgres (new) idle 7200s(sysctl)->30s interval 75s(sysctl)->10s count 9(sysctl)->3 keepalive off->on"),
            "{line}"
        );
    }

    #[test]
    fn failures_kept_and_restores() {
        let mut r = rep(report::TUNED);
        r.set = opt::IDLE | opt::USER_TIMEOUT;
        r.failed = opt::USER_TIMEOUT;
        r.err = -libc::EINVAL;
        r.kept = opt::CNT;
        r.old.cnt = 5;
        r.new.idle_s = 30;
        let t = decode(&r, names).unwrap();
        assert_eq!(t.action, Action::Tuned, "one option still changed");
        assert_eq!(
            t.failed,
            vec![Failure {
                option: "user_timeout_ms",
                error: "EINVAL".into()
            }]
        );
        assert_eq!(
            t.kept,
            vec![Kept {
                option: "count",
                value: json!(5)
            }]
        );
        r.set = opt::USER_TIMEOUT;
        assert_eq!(decode(&r, names).unwrap().action, Action::Failed);

        let mut r = rep(report::RESTORED);
        r.set = opt::IDLE;
        r.old.idle_s = 30;
        r.new.idle_s = 0;
        let t = decode(&r, names).unwrap();
        assert_eq!(t.action, Action::Restored);
        assert_eq!(t.changes[0].old, json!(30));
        assert_eq!(t.changes[0].new, json!(7200));
        assert!(t.changes[0].new_from_sysctl);

        let mut r = rep(report::APP_OVERRIDE);
        r.set = opt::IDLE;
        r.old.idle_s = 30;
        r.new.idle_s = 100;
        let t = decode(&r, names).unwrap();
        assert_eq!(
            (t.action, t.source),
            (Action::AppOverride, Source::Application)
        );
        assert_eq!(
            (t.changes[0].old.clone(), t.changes[0].new.clone()),
            (json!(30), json!(100))
        );
        assert!(decode(&rep(report::NEED_OWNER), names).is_none());
    }

    /// The `tuned` record's bytes, field order included (docs/tuning.md):
    /// pinned as they were before the identity fields became shared.
    #[test]
    fn tuned_record_bytes_are_the_schema() {
        let mut t = Tuned {
            ts_mono_ns: 1_001_234_567,
            id: ConnId {
                cookie: 9,
                netns: 4026531840,
                saddr: Some("10.0.0.1".parse().unwrap()),
                sport: 40000,
                daddr: Some("fd00::2".parse().unwrap()),
                dport: 5432,
                state: 1,
            },
            owner: Some(Owner {
                pid: 77,
                comm: "pg \"x\"".into(),
            }),
            action: Action::DryRun,
            source: Source::Existing,
            rule: "postgres".into(),
            changes: vec![Change {
                option: "idle_s",
                old: json!(7200),
                new: json!(30),
                old_from_sysctl: true,
                new_from_sysctl: false,
            }],
            kept: vec![Kept {
                option: "count",
                value: json!(3),
            }],
            failed: vec![Failure {
                option: "user_timeout_ms",
                error: "EINVAL".into(),
            }],
            evidence: Some(json!({"idle_s": 30})),
        };
        let clock = Clock::fixed(1_764_000_000_000_000_000);
        let line = |t: &Tuned| json::to_string(&TunedOut::new(t, &clock));
        assert_eq!(
            line(&t),
            r#"{"v":1,"event":"tuned","ts":"2025-11-24T16:00:01.001234Z","ts_mono_ns":1001234567,"cookie":9,"netns":4026531840,"saddr":"10.0.0.1","sport":40000,"daddr":"fd00::2","dport":5432,"state":"ESTABLISHED","pid":77,"comm":"pg \"x\"","action":"dry_run","source":"existing","rule":"postgres","dry_run":true,"changes":[{"option":"idle_s","old":7200,"new":30,"old_from_sysctl":true}],"kept":[{"option":"count","value":3}],"failed":[{"option":"user_timeout_ms","error":"EINVAL"}],"evidence":{"idle_s":30}}"#
        );
        t.owner = Some(Owner {
            pid: 0,
            comm: "x".into(),
        });
        t.id.daddr = None;
        t.evidence = None;
        t.action = Action::Tuned;
        assert_eq!(
            line(&t),
            r#"{"v":1,"event":"tuned","ts":"2025-11-24T16:00:01.001234Z","ts_mono_ns":1001234567,"cookie":9,"netns":4026531840,"saddr":"10.0.0.1","sport":40000,"daddr":null,"dport":5432,"state":"ESTABLISHED","pid":null,"comm":"x","action":"tuned","source":"existing","rule":"postgres","dry_run":false,"changes":[{"option":"idle_s","old":7200,"new":30,"old_from_sysctl":true}],"kept":[{"option":"count","value":3}],"failed":[{"option":"user_timeout_ms","error":"EINVAL"}]}"#
        );
    }
}
