//! `keepalive tune` against the live kernel: a policy applied to
//! connections opened before it started and after, seen by the owning
//! process's own getsockopt and by the probes the kernel then sends
//! (TcpExt.TCPKeepAlive); non-matching sockets untouched; dry runs that
//! change nothing; exact restores; nothing left after SIGKILL; applications
//! that win, or lose to --enforce; every invalid policy refused.
//!
//! Every rule names the test's own listener (remote address /32 and its
//! kernel-chosen port), so a tune run here cannot touch anything else on
//! the host.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use keepalive_tests::testkit::child::MonitorChild;
use keepalive_tests::testkit::sock::{self, KeepaliveSettings};
use keepalive_tests::*;
use serde_json::Value;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A private directory for policy files and outputs (root-owned, 0755),
/// removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Dir {
        let p = std::env::temp_dir().join(format!(
            "ka-tune-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        Dir(p)
    }

    fn policy(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        p
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `keepalive tune --format json --output FILE`.
struct Tune {
    child: MonitorChild,
    out: PathBuf,
}

impl Tune {
    fn start(dir: &Dir, policy: &Path, extra: &[&str]) -> Tune {
        Tune::start_command("tune", dir, policy, extra)
    }

    /// `keepalive COMMAND --format json --policy POLICY --output FILE EXTRA`
    /// (`tune`, or `record` tuning while it records).
    fn start_command(command: &str, dir: &Dir, policy: &Path, extra: &[&str]) -> Tune {
        require_root();
        let out = dir.0.join(format!(
            "out-{}.jsonl",
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let args = [command, "--format", "json", "--policy"]
            .map(OsStr::new)
            .into_iter()
            .chain([policy.as_os_str(), OsStr::new("--output"), out.as_os_str()])
            .chain(extra.iter().map(OsStr::new));
        // Loading and walking every socket of every namespace (twice for
        // the monitor, once to tune) takes seconds on a loaded machine with
        // many sockets: a generous wait for readiness, not a timing test.
        let child = MonitorChild::start(&keepalive_bin(), args, Duration::from_secs(90), || false)
            .unwrap_or_else(|e| panic!("{e:#}"));
        Tune { child, out }
    }

    fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON {l:?}: {e}")))
            .collect()
    }

    /// `tuned` records about connection `cookie`.
    fn tuned(&self, cookie: u64) -> Vec<Value> {
        self.records()
            .into_iter()
            .filter(|r| r["event"] == "tuned" && r["cookie"].as_u64() == Some(cookie))
            .collect()
    }

    /// Waits until a `tuned` record with `action` exists for `cookie`.
    fn wait_action(&self, cookie: u64, action: &str) -> Value {
        self.wait_change(cookie, action, None)
    }

    /// Waits for a `tuned` record with `action` for `cookie` that changes
    /// `option` (any record when `None`).
    fn wait_change(&self, cookie: u64, action: &str, option: Option<&str>) -> Value {
        let mut found = None;
        wait_for(Duration::from_secs(30), || {
            found = self.tuned(cookie).into_iter().find(|r| {
                r["action"] == action
                    && option.is_none_or(|o| {
                        r["changes"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .any(|c| c["option"] == o)
                    })
            });
            found.is_some()
        });
        found.unwrap_or_else(|| {
            panic!(
                "no `{action}` record for cookie {cookie}: {:?}; stderr {:?}",
                self.records(),
                self.child.stderr
            )
        })
    }

    fn stop_with(&mut self, sig: i32) {
        let status = self
            .child
            .stop_with(sig, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{e:#}"));
        if sig != libc::SIGKILL {
            assert!(
                status.success(),
                "tune exited {status}: {:?}",
                self.child.stderr
            );
        }
    }
}

/// One rule for exactly the listener at `to`.
fn rule(to: std::net::SocketAddr, body: &str) -> String {
    format!(
        "[[rule]]\nname = \"test\"\nremote = \"{}/32\"\nremote_port = {}\n{body}\n",
        to.ip(),
        to.port()
    )
}

const FAST: &str = "keepalive = true\nidle = \"1s\"\ninterval = \"1s\"\ncount = 4";

fn settings(s: &TcpStream) -> KeepaliveSettings {
    sock::keepalive_settings(s).unwrap()
}

fn fast() -> KeepaliveSettings {
    KeepaliveSettings {
        enabled: true,
        idle_s: 1,
        intvl_s: 1,
        probes: 4,
    }
}

fn defaults(ns: &Netns) -> KeepaliveSettings {
    let read = |k: &str| {
        ns.exec(&format!("cat /proc/sys/net/ipv4/{k}"))
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    KeepaliveSettings {
        enabled: false,
        idle_s: read("tcp_keepalive_time"),
        intvl_s: read("tcp_keepalive_intvl"),
        probes: read("tcp_keepalive_probes") as u32,
    }
}

/// The change record of `option` in a `tuned` record: (old, new).
fn change(r: &Value, option: &str) -> (Value, Value) {
    let c = r["changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["option"] == option)
        .unwrap_or_else(|| panic!("no change of {option} in {r}"));
    (c["old"].clone(), c["new"].clone())
}

#[test]
fn existing_and_new_connections_get_the_rule_and_probe_at_its_pace() {
    let pair = Pair::new("tn");
    let listener = listen(&pair.b, &format!("{}:0", pair.b4));
    let to = listener.local_addr().unwrap();
    let before = connect_in(&pair.a, to).unwrap();
    let (_before_srv, _) = listener.accept().unwrap();
    let dflt = defaults(&pair.a);
    assert_eq!(settings(&before), dflt);
    let dir = Dir::new();
    let mut tune = Tune::start(&dir, &dir.policy("p.toml", &rule(to, FAST)), &[]);
    // Applied by the walk before the ready line.
    assert_eq!(settings(&before), fast(), "connection opened before tune");
    let r = tune.wait_action(cookie(&before), "tuned");
    assert_eq!(r["source"], "existing");
    assert_eq!(r["rule"], "test");
    assert_eq!(change(&r, "idle_s"), (dflt.idle_s.into(), 1.into()));
    assert_eq!(change(&r, "keepalive"), (false.into(), true.into()));
    assert_eq!(change(&r, "count"), (dflt.probes.into(), 4.into()));

    let after = connect_in(&pair.a, to).unwrap();
    let (_after_srv, _) = listener.accept().unwrap();
    assert_eq!(
        settings(&after),
        fast(),
        "connection opened after tune started"
    );
    let r = tune.wait_action(cookie(&after), "tuned");
    assert_eq!(r["source"], "new");

    // Both clients (and only they: the server side's remote port is not
    // the rule's) now send a probe every second of idleness, answered.
    let c0 = pair.a.counters();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_millis(5500));
    let secs = t0.elapsed().as_secs_f64();
    let probes = c0.delta(&pair.a.counters(), "TcpExt.TCPKeepAlive") as f64;
    assert!(
        (probes - 2.0 * secs).abs() <= 3.0,
        "{probes} probes from 2 connections in {secs:.1} s at idle 1 s"
    );
    assert_eq!(
        c0.delta(&pair.b.counters(), "TcpExt.TCPKeepAlive"),
        0,
        "the server side matches no rule"
    );
    tune.stop_with(libc::SIGTERM);
}

/// `tune --metrics`: a real scrape of its endpoint counts every `tuned`
/// record it wrote, by rule and action, and reports it ready.
#[test]
fn tune_metrics_count_every_tuned_record() {
    let pair = Pair::new("tm");
    let listener = listen(&pair.b, &format!("{}:0", pair.b4));
    let to = listener.local_addr().unwrap();
    let before = connect_in(&pair.a, to).unwrap();
    let (_before_srv, _) = listener.accept().unwrap();
    let dir = Dir::new();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", http::free_port()).parse().unwrap();
    let policy = dir.policy("p.toml", &rule(to, FAST));
    let mut tune = Tune::start(&dir, &policy, &["--metrics", &addr.to_string()]);
    tune.wait_action(cookie(&before), "tuned");
    let after = connect_in(&pair.a, to).unwrap();
    let (_after_srv, _) = listener.accept().unwrap();
    tune.wait_action(cookie(&after), "tuned");

    let (status, text) = http::get(addr, "/metrics", "text/plain").unwrap();
    assert_eq!(status, 200);
    assert_eq!(http::get(addr, "/readyz", "*/*").unwrap().0, 200);
    tune.stop_with(libc::SIGTERM);
    let sample = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    let written = |action: &str| {
        tune.records()
            .iter()
            .filter(|r| r["event"] == "tuned" && r["rule"] == "test" && r["action"] == action)
            .count() as f64
    };
    assert_eq!(written("tuned"), 2.0, "{:?}", tune.records());
    assert_eq!(
        sample("keepalive_tuned_total{rule=\"test\",action=\"tuned\"}"),
        written("tuned"),
        "{text}"
    );
}

#[test]
fn non_matching_untouched_and_dry_run_reports_the_same_changes() {
    let pair = Pair::new("td");
    let listener = listen(&pair.b, &format!("{}:0", pair.b4));
    let to = listener.local_addr().unwrap();
    let other_l = listen(&pair.b, &format!("{}:0", pair.b4));
    let matching = connect_in(&pair.a, to).unwrap();
    let (_m, _) = listener.accept().unwrap();
    let other = connect_in(&pair.a, other_l.local_addr().unwrap()).unwrap();
    let (_o, _) = other_l.accept().unwrap();
    let dflt = defaults(&pair.a);
    let dir = Dir::new();
    let policy = dir.policy("p.toml", &rule(to, FAST));

    let mut dry = Tune::start(&dir, &policy, &["--dry-run"]);
    let new_dry = connect_in(&pair.a, to).unwrap();
    let (_n, _) = listener.accept().unwrap();
    let existing = dry.wait_action(cookie(&matching), "dry_run");
    let new = dry.wait_action(cookie(&new_dry), "dry_run");
    assert_eq!(existing["dry_run"], true);
    assert_eq!(new["source"], "new");
    for s in [&matching, &new_dry, &other] {
        assert_eq!(settings(s), dflt, "a dry run changes nothing");
    }
    dry.stop_with(libc::SIGTERM);
    assert!(dry.tuned(cookie(&other)).is_empty());
    assert!(
        dry.records()
            .iter()
            .all(|r| r["event"] != "tuned" || r["action"] == "dry_run"),
        "{:?}",
        dry.records()
    );

    let mut real = Tune::start(&dir, &policy, &[]);
    let applied = real.wait_action(cookie(&matching), "tuned");
    assert_eq!(
        applied["changes"], existing["changes"],
        "the dry run said exactly this"
    );
    assert_eq!(settings(&matching), fast());
    assert_eq!(settings(&other), dflt, "no rule matches it");
    assert!(real.tuned(cookie(&other)).is_empty());
    real.stop_with(libc::SIGTERM);
}

#[test]
fn sigterm_restores_the_exact_original_values() {
    let pair = Pair::new("tr");
    // A namespace default that is not the kernel's, to see it come back.
    pair.a.sysctl("net.ipv4.tcp_keepalive_time", "600");
    let listener = listen(&pair.b, &format!("{}:0", pair.b4));
    let to = listener.local_addr().unwrap();
    let plain = connect_in(&pair.a, to).unwrap();
    let (_p, _) = listener.accept().unwrap();
    let own = connect_in(&pair.a, to).unwrap();
    let (_o, _) = listener.accept().unwrap();
    set_keepalive(&own, 100, 20, 5);
    let before_plain = settings(&plain);
    let before_own = settings(&own);
    assert_eq!(before_plain.idle_s, 600);
    let dir = Dir::new();
    let mut tune = Tune::start(
        &dir,
        &dir.policy(
            "p.toml",
            &rule(to, &format!("{FAST}\nuser_timeout = \"30s\"")),
        ),
        &["--enforce"],
    );
    assert_eq!(settings(&plain), fast());
    assert_eq!(
        settings(&own),
        fast(),
        "--enforce applies over the application's values"
    );
    let ut = |s: &TcpStream| sock::user_timeout(s).unwrap();
    assert_eq!(ut(&plain), Duration::from_secs(30));
    tune.stop_with(libc::SIGTERM);
    assert_eq!(settings(&plain), before_plain);
    assert_eq!(settings(&own), before_own);
    assert_eq!(ut(&plain), Duration::ZERO);
    let restored = tune
        .tuned(cookie(&plain))
        .into_iter()
        .find(|r| r["action"] == "restored")
        .expect("a restored record");
    assert_eq!(change(&restored, "idle_s"), (1.into(), 600.into()));
    let c = restored["changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["option"] == "idle_s")
        .unwrap();
    assert_eq!(
        c["new_from_sysctl"], true,
        "0 (the sysctl) came back as its value"
    );
    // A new connection after exit is untouched.
    let later = connect_in(&pair.a, to).unwrap();
    assert_eq!(settings(&later), before_plain);
}

#[test]
fn after_sigkill_new_sockets_are_untouched_and_nothing_is_attached() {
    let pair = Pair::new("tk");
    let listener = listen(&pair.b, &format!("{}:0", pair.b4));
    let to = listener.local_addr().unwrap();
    let dir = Dir::new();
    let mut tune = Tune::start(&dir, &dir.policy("p.toml", &rule(to, FAST)), &[]);
    let ours = prog_ids_held_by(tune.child.pid());
    let names: Vec<String> = keepalive_tests::testkit::bpf::programs_by_id(&ours)
        .into_values()
        .map(|p| p.name)
        .collect();
    for p in ["ka_tune_sockops", "ka_tune_setsock", "ka_tune_iter"] {
        assert!(
            names.iter().any(|n| n.starts_with(p)),
            "{p} not held by tune: {names:?}"
        );
    }
    let during = connect_in(&pair.a, to).unwrap();
    assert!(wait_for(Duration::from_secs(5), || settings(&during) == fast()));
    tune.stop_with(libc::SIGKILL);
    let gone = wait_for(Duration::from_secs(10), || {
        let loaded = loaded_prog_ids();
        ours.iter().all(|id| !loaded.contains(id))
    });
    assert!(gone, "programs {ours:?} still loaded after SIGKILL");
    let after = connect_in(&pair.a, to).unwrap();
    let (_a, _) = listener.accept().unwrap();
    assert_eq!(
        settings(&after),
        defaults(&pair.a),
        "nobody tunes new sockets"
    );
    // What was changed stays changed: nobody was left to restore it.
    assert_eq!(settings(&during), fast());
}

#[test]
fn the_application_wins_is_reported_and_enforce_reapplies() {
    let pair = Pair::new("ta");
    let listener = listen(&pair.b, &format!("{}:0", pair.b4));
    let to = listener.local_addr().unwrap();
    let own = connect_in(&pair.a, to).unwrap();
    let (_o, _) = listener.accept().unwrap();
    set_keepalive(&own, 100, 20, 5);
    let dir = Dir::new();
    let policy = dir.policy("p.toml", &rule(to, FAST));

    let mut tune = Tune::start(&dir, &policy, &[]);
    let r = tune.wait_action(cookie(&own), "app_kept");
    let kept: Vec<&str> = r["kept"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["option"].as_str().unwrap())
        .collect();
    assert_eq!(kept, ["idle_s", "interval_s", "count"]);
    assert_eq!(settings(&own).idle_s, 100, "its own values stay");
    // A connection we tuned, whose application changes its mind later.
    let later = connect_in(&pair.a, to).unwrap();
    let (_l, _) = listener.accept().unwrap();
    tune.wait_action(cookie(&later), "tuned");
    sock::set_keepalive_params(&later, true, Some(50), None, None).unwrap();
    // socket2 sets SO_KEEPALIVE (unchanged: also reported, it is now the
    // application's) before TCP_KEEPIDLE.
    let r = tune.wait_change(cookie(&later), "app_override", Some("idle_s"));
    assert_eq!(change(&r, "idle_s"), (1.into(), 50.into()));
    assert_eq!(r["source"], "application");
    assert_eq!(settings(&later).idle_s, 50);
    tune.stop_with(libc::SIGTERM);
    // Restore leaves the application's own choice alone.
    let s = settings(&later);
    assert_eq!(s.idle_s, 50);
    assert_eq!(s.intvl_s, defaults(&pair.a).intvl_s, "ours restored");

    let mut tune = Tune::start(&dir, &policy, &["--enforce"]);
    assert_eq!(settings(&own), fast(), "--enforce applies over its values");
    sock::set_keepalive_params(&own, true, Some(77), None, None).unwrap();
    let r = tune.wait_change(cookie(&own), "enforced", Some("idle_s"));
    assert_eq!(change(&r, "idle_s"), (77.into(), 1.into()));
    assert_eq!(
        settings(&own).idle_s,
        1,
        "the policy's value, not the application's"
    );
    tune.stop_with(libc::SIGTERM);
    let s = settings(&own);
    assert_eq!(
        (s.idle_s, s.intvl_s, s.probes),
        (100, 20, 5),
        "its original values back"
    );
}

#[test]
fn every_invalid_policy_is_refused_before_anything_changes() {
    let pair = Pair::new("ti");
    let listener = listen(&pair.b, &format!("{}:0", pair.b4));
    let to = listener.local_addr().unwrap();
    let conn = connect_in(&pair.a, to).unwrap();
    let (_c, _) = listener.accept().unwrap();
    let dflt = settings(&conn);
    let dir = Dir::new();
    let good = rule(to, FAST);
    let cases: Vec<(&str, String, u32, &str)> = vec![
        (
            "unknown key",
            format!("{good}colour = \"red\"\n"),
            0o644,
            ":9: unknown field `colour`",
        ),
        (
            "idle out of range",
            good.replace("\"1s\"\ninterval", "\"40000s\"\ninterval"),
            0o644,
            ":6: rule \"test\": idle: 40000s out of the kernel's range",
        ),
        (
            "count out of range",
            good.replace("count = 4", "count = 200"),
            0o644,
            ":8: rule \"test\": count: 200 out of the kernel's range",
        ),
        (
            "duplicate name",
            format!("{good}{good}"),
            0o644,
            ":10: duplicate rule name \"test\"",
        ),
        (
            "shadowed rule",
            format!(
                "{good}{}",
                good.replace("name = \"test\"", "name = \"second\"")
            ),
            0o644,
            ":10: rule \"second\" can never apply",
        ),
        (
            "empty port range",
            good.replace(
                &format!("remote_port = {}", to.port()),
                "remote_port = \"9-1\"",
            ),
            0o644,
            ":4: rule \"test\": remote_port: range 9-1 is empty",
        ),
        (
            "world-writable",
            good.clone(),
            0o666,
            ":1: refusing a policy a non-root user could change",
        ),
    ];
    for (what, text, mode, want) in cases {
        let p = dir.0.join(format!("{}.toml", what.replace(' ', "-")));
        std::fs::write(&p, &text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        let out = std::process::Command::new(keepalive_bin())
            .args(["tune", "--policy"])
            .arg(&p)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: accepted");
        let want = format!("keepalive: error: {}{want}", p.display());
        assert!(
            stderr.starts_with(&want),
            "{what}:\n got {stderr}\nwant {want}"
        );
        assert_eq!(stderr.lines().count(), 1, "{what}: one line: {stderr}");
        assert!(out.stdout.is_empty(), "{what}: nothing reported");
        assert_eq!(settings(&conn), dflt, "{what}: nothing changed");
    }
    // A file owned by another user.
    let p = dir.policy("owned.toml", &good);
    std::os::unix::fs::chown(&p, Some(65534), None).unwrap();
    let out = std::process::Command::new(keepalive_bin())
        .args(["tune", "--policy"])
        .arg(&p)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("owned by uid 65534, not root"), "{stderr}");
    assert_eq!(settings(&conn), dflt);
}

#[test]
fn sighup_reloads_and_a_bad_file_keeps_the_running_policy() {
    let pair = Pair::new("th");
    let listener = listen(&pair.b, &format!("{}:0", pair.b4));
    let to = listener.local_addr().unwrap();
    let conn = connect_in(&pair.a, to).unwrap();
    let (_c, _) = listener.accept().unwrap();
    let dir = Dir::new();
    let policy = dir.policy("p.toml", &rule(to, FAST));
    let mut tune = Tune::start(&dir, &policy, &[]);
    assert_eq!(settings(&conn), fast());
    std::fs::write(&policy, rule(to, "idle = \"99999s\"")).unwrap();
    tune.child.signal(libc::SIGHUP).unwrap();
    let refused = |t: &Tune| {
        t.records()
            .into_iter()
            .find(|r| r["event"] == "policy" && r["action"] == "reload_refused")
    };
    // A reload walks every socket twice (restore, apply): seconds on a
    // loaded host.
    assert!(wait_for(Duration::from_secs(30), || refused(&tune).is_some()));
    let r = refused(&tune).unwrap();
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains(":5: rule \"test\": idle: 99999s out of the kernel's range"),
        "{r}"
    );
    assert_eq!(settings(&conn), fast(), "the running policy stays");
    std::fs::write(&policy, rule(to, "keepalive = true\nidle = \"7s\"")).unwrap();
    tune.child.signal(libc::SIGHUP).unwrap();
    assert!(wait_for(Duration::from_secs(30), || settings(&conn).idle_s == 7));
    let s = settings(&conn);
    assert_eq!(
        (s.enabled, s.intvl_s, s.probes),
        (true, defaults(&pair.a).intvl_s, defaults(&pair.a).probes)
    );
    tune.stop_with(libc::SIGTERM);
    assert_eq!(settings(&conn), defaults(&pair.a));
}

#[test]
fn record_with_a_policy_writes_tuned_records_in_its_stream() {
    let pair = Pair::new("tp");
    let listener = listen(&pair.b, &format!("{}:0", pair.b4));
    let to = listener.local_addr().unwrap();
    let dir = Dir::new();
    let policy = dir.policy("p.toml", &rule(to, FAST));
    let mut mon = Tune::start_command(
        "record",
        &dir,
        &policy,
        &["--addr", &format!("{}/32", pair.b4)],
    );
    let conn = connect_in(&pair.a, to).unwrap();
    let (_c, _) = listener.accept().unwrap();
    assert!(wait_for(Duration::from_secs(5), || settings(&conn) == fast()));
    mon.stop_with(libc::SIGTERM);
    let events = mon.records();
    let c = cookie(&conn);
    let tuned: Vec<_> = events
        .iter()
        .filter(|e| e["event"] == "tuned" && e["cookie"].as_u64() == Some(c))
        .map(|e| e["action"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(tuned, ["tuned", "restored"]);
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "state_change" && e["cookie"].as_u64() == Some(c)),
        "the record stream goes on as usual"
    );
    assert_eq!(settings(&conn), defaults(&pair.a));
}

/// A client and a server namespace with a middlebox namespace between
/// them that forwards their traffic and silently drops every flow idle
/// for longer than `idle_limit_s`: conntrack with that established
/// timeout, no pick-up of mid-stream flows (`nf_conntrack_tcp_loose=0`),
/// and `ct state invalid drop`, as cloud NATs and load balancers behave.
struct Middlebox {
    client: Netns,
    _mb: Netns,
    server: Netns,
    server_ip: String,
}

impl Middlebox {
    fn new(tag: &str, idle_limit_s: u32) -> Middlebox {
        let client = Netns::new(&format!("{tag}c"));
        let mb = Netns::new(&format!("{tag}m"));
        let server = Netns::new(&format!("{tag}s"));
        let n = (std::process::id() + NEXT.fetch_add(1, Ordering::Relaxed)) % 250;
        let ip = |last: u32| format!("198.19.{n}.{last}");
        let veth = |a: &Netns, b: &Netns, side: &str, a_ip: String, b_ip: String| {
            keepalive_tests::testkit::netns::veth(
                a,
                b,
                &format!("{n}{side}"),
                &[&format!("{a_ip}/30")],
                &[&format!("{b_ip}/30")],
            )
            .unwrap_or_else(|e| panic!("{e:#}"));
        };
        veth(&client, &mb, "c", ip(1), ip(2));
        veth(&mb, &server, "s", ip(5), ip(6));
        client.exec(&format!("ip route add default via {}", ip(2)));
        server.exec(&format!("ip route add default via {}", ip(5)));
        mb.sysctl("net.ipv4.ip_forward", "1");
        // The ruleset first: `ct state` brings conntrack (and its sysctls)
        // into the namespace.
        mb.exec(
            "nft add table inet mb && nft \"add chain inet mb relay { type filter hook forward priority 0; policy accept; }\" && nft add rule inet mb relay ct state invalid drop",
        );
        mb.sysctl(
            "net.netfilter.nf_conntrack_tcp_timeout_established",
            &idle_limit_s.to_string(),
        );
        mb.sysctl("net.netfilter.nf_conntrack_tcp_loose", "0");
        Middlebox {
            client,
            _mb: mb,
            server,
            server_ip: ip(6),
        }
    }
}

/// A server that echoes every byte back, on its own thread.
fn echo_server(l: TcpListener) {
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 || c.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

/// Sends a byte and waits up to `wait` for it to come back.
fn echoes(s: &mut TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut b = [0u8; 1];
    s.write_all(b"x").is_ok() && matches!(s.read(&mut b), Ok(1))
}

#[test]
fn adaptive_learns_a_middleboxs_idle_timeout_and_later_connections_outlive_it() {
    // The middlebox forgets flows idle for more than LIMIT seconds.
    const LIMIT: u32 = 3;
    let net = Middlebox::new("tm", LIMIT);
    let listener = listen(&net.server, &format!("{}:0", net.server_ip));
    let to = listener.local_addr().unwrap();
    echo_server(listener);

    // Without tune: a connection idle past the limit is gone — its next
    // byte is never answered, only retransmitted.
    let mut plain = connect_in(&net.client, to).unwrap();
    assert!(echoes(&mut plain, Duration::from_secs(2)), "path works");
    std::thread::sleep(Duration::from_secs(u64::from(LIMIT) + 2));
    let c0 = net.client.counters();
    assert!(
        !echoes(&mut plain, Duration::from_secs(3)),
        "a connection idle for {}s through the middlebox still answered",
        LIMIT + 2
    );
    assert!(
        c0.delta(&net.client.counters(), "Tcp.RetransSegs") >= 1,
        "the unanswered byte is retransmitted"
    );
    drop(plain);

    // With an adaptive rule: connections opened one a second and left idle
    // (the learner steps the idle up on new connections while probes are
    // answered, and learns the limit from those that die).
    let dir = Dir::new();
    let policy = dir.policy(
        "p.toml",
        &rule(
            to,
            "keepalive = true\ninterval = \"1s\"\ncount = 2\nadaptive = { min_idle = \"1s\", max_idle = \"60s\" }",
        ),
    );
    let mut tune = Tune::start(&dir, &policy, &[]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let opener = {
        let stop = stop.clone();
        let client = net.client.path();
        std::thread::spawn(move || {
            keepalive_tests::testkit::netns::join_netns(&client).unwrap();
            let mut conns = Vec::new();
            while !stop.load(Ordering::Relaxed) && conns.len() < 60 {
                if let Ok(c) = TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
                    conns.push(c);
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    let learned = |t: &Tune| {
        t.records().into_iter().find(|r| {
            r["event"] == "tuned" && r["action"] == "adapted" && r["evidence"]["kind"] == "died"
        })
    };
    let found = wait_for(Duration::from_secs(60), || learned(&tune).is_some());
    stop.store(true, Ordering::Relaxed);
    opener.join().unwrap();
    assert!(
        found,
        "no adjustment from a death within 60 s: {:#?}; stderr {:?}",
        tune.records()
            .iter()
            .filter(|r| r["event"] == "tuned" && r["action"] == "adapted")
            .collect::<Vec<_>>(),
        tune.child.stderr
    );
    let r = learned(&tune).unwrap();
    let ev = &r["evidence"];
    let to_s = ev["to_s"].as_u64().unwrap();
    let died_at = ev["idle_s"].as_u64().unwrap();
    assert!(
        died_at > u64::from(LIMIT),
        "a death at idle {died_at}s, within the {LIMIT}s limit: {r}"
    );
    assert!(
        (1..u64::from(LIMIT)).contains(&to_s),
        "learned idle {to_s}s is not below the {LIMIT}s limit: {r}"
    );
    assert_eq!(change(&r, "idle_s").1, to_s);
    assert_eq!(ev["fatal_s"].as_u64(), Some(died_at));

    // A connection opened now gets the learned idle, and outlives the
    // limit by far: its keepalive probes keep the middlebox's entry fresh.
    let mut later = connect_in(&net.client, to).unwrap();
    assert_eq!(settings(&later).idle_s, to_s, "the learned idle");
    assert!(echoes(&mut later, Duration::from_secs(2)));
    std::thread::sleep(Duration::from_secs(2 * u64::from(LIMIT) + 1));
    assert!(
        echoes(&mut later, Duration::from_secs(3)),
        "idle {}s with the learned idle {to_s}s, and dead",
        2 * LIMIT + 1
    );
    tune.stop_with(libc::SIGTERM);
}

/// Writes `idle_s` as the learned TCP_KEEPIDLE for `to` (its /24 and
/// port) into the TUNE_ADAPT map of the running `keepalive` with `pid`:
/// the map is found through the process's own file descriptors, so a
/// tune run by anyone else on the host is never touched.
fn inject_learned_idle(pid: u32, to: std::net::SocketAddr, idle_s: u32) {
    use aya::maps::{HashMap, Map, MapData, MapInfo};
    let std::net::IpAddr::V4(ip) = to.ip() else {
        panic!("an IPv4 listener")
    };
    let mut key = [0u8; 20];
    key[..3].copy_from_slice(&ip.octets()[..3]);
    key[16] = libc::AF_INET as u8;
    key[18..20].copy_from_slice(&to.port().to_ne_bytes());
    let fdinfo = format!("/proc/{pid}/fdinfo");
    let ids = std::fs::read_dir(&fdinfo).unwrap().filter_map(|e| {
        let text = std::fs::read_to_string(e.ok()?.path()).ok()?;
        let line = text.lines().find(|l| l.starts_with("map_id:"))?;
        line["map_id:".len()..].trim().parse::<u32>().ok()
    });
    for id in ids {
        let Ok(info) = MapInfo::from_id(id) else {
            continue;
        };
        if info.name_as_str() != Some("TUNE_ADAPT") {
            continue;
        }
        let map = MapData::from_id(id).unwrap();
        let mut adapt: HashMap<_, [u8; 20], u32> = Map::HashMap(map).try_into().unwrap();
        adapt.insert(key, idle_s, 0).unwrap();
        return;
    }
    panic!("no TUNE_ADAPT map among the fds of keepalive {pid}");
}

#[test]
fn a_setsockopt_the_kernel_rejects_is_a_failed_record_and_a_kernel_log_line() {
    let pair = Pair::new("tf");
    let listener = listen(&pair.b, &format!("{}:0", pair.b4));
    let to = listener.local_addr().unwrap();
    let dir = Dir::new();
    let policy = dir.policy(
        "p.toml",
        &rule(
            to,
            "keepalive = true\nadaptive = { min_idle = \"1s\", max_idle = \"60s\" }",
        ),
    );
    let mut tune = Tune::start(&dir, &policy, &[]);
    // TCP_KEEPIDLE above MAX_TCP_KEEPIDLE (32767 s): the kernel's
    // bpf_setsockopt answers EINVAL. Only a learned value can get there.
    inject_learned_idle(tune.child.pid(), to, 40_000);
    let dflt = defaults(&pair.a);
    let conn = connect_in(&pair.a, to).unwrap();
    let (_srv, _) = listener.accept().unwrap();
    let c = cookie(&conn);
    let r = tune.wait_action(c, "tuned");
    let failed = r["failed"].as_array().unwrap();
    assert_eq!(failed.len(), 1, "{r}");
    assert_eq!(failed[0]["option"], "idle_s", "{r}");
    assert_eq!(failed[0]["error"], "EINVAL", "{r}");
    // The rest of the rule still applied; the idle stayed as it was.
    let s = settings(&conn);
    assert!(s.enabled, "keepalive set despite the failed idle");
    assert_eq!(s.idle_s, dflt.idle_s);
    tune.stop_with(libc::SIGTERM);
    let want = format!("bpf_setsockopt failed: cookie {c} ");
    let line = tune
        .child
        .stderr
        .iter()
        .find(|l| l.contains(&want))
        .unwrap_or_else(|| panic!("no kernel log line {want:?}: {:?}", tune.child.stderr));
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("errno 22"), "{line}");
}
