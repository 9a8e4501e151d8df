//! `keepalive serve` against the live kernel: a real Prometheus scrapes it
//! and its counters must equal the kernel's own for a scenario between two
//! namespaces; the event file rotates and reopens without losing a line;
//! every bad configuration or busy address stops it before anything starts.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keepalive_tests::daemon::{Daemon, empty_config};
use keepalive_tests::http::{encode, free_port, get};
use keepalive_tests::*;
use serde_json::Value;

/// A scratch directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "keepalive-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The distribution's Prometheus, scraping one target every second.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        assert!(
            Path::new("/usr/bin/prometheus").exists(),
            "prometheus not installed: run `cargo xtask setup` (installs the prometheus package)"
        );
        let dir = TempDir::new("prom");
        let config = dir.0.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: keepalive\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new("/usr/bin/prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.0.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start prometheus");
        let p = Prometheus {
            child,
            addr,
            _dir: dir,
        };
        let ready = wait_for(Duration::from_secs(30), || {
            matches!(get(p.addr, "/-/ready", "*/*"), Ok((200, _)))
        });
        assert!(ready, "prometheus did not become ready on {addr}");
        p
    }

    /// One instant query; (labels, value) per series.
    fn query(&self, q: &str) -> Vec<(Value, f64)> {
        let (status, body) = get(
            self.addr,
            &format!("/api/v1/query?query={}", encode(q)),
            "application/json",
        )
        .unwrap();
        assert_eq!(status, 200, "query {q}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        v["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let value = s["value"][1].as_str().unwrap().parse().unwrap();
                (s["metric"].clone(), value)
            })
            .collect()
    }

    /// The single value of `q`.
    fn value(&self, q: &str) -> f64 {
        let r = self.query(q);
        assert_eq!(r.len(), 1, "{q}: {r:?}");
        r[0].1
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn port_of(l: &std::net::TcpListener) -> u16 {
    l.local_addr().unwrap().port()
}

/// A port nothing listens on in `pair.b` (a fresh namespace: nothing
/// else listens there on either family), unlike 9 that other tests use.
fn closed_port(pair: &Pair) -> u16 {
    port_of(&listen(&pair.b, &format!("{}:0", pair.b4)))
}

/// A connection from `pair.a` to listener `l` in `pair.b`: (client, server).
fn accept_from(pair: &Pair, l: &std::net::TcpListener) -> (TcpStream, TcpStream) {
    let client = connect_in(&pair.a, l.local_addr().unwrap()).unwrap();
    let (server, _) = l.accept().unwrap();
    (client, server)
}

/// `--addr` filters to this pair's own subnets only, so that other tests'
/// namespaces (and the host) do not count.
fn pair_filter(pair: &Pair) -> Vec<String> {
    let v4 = pair.a4.rsplit_once('.').unwrap().0;
    let v6 = pair.a6.trim_end_matches("::1");
    vec![
        "--addr".into(),
        format!("{v4}.0/24"),
        "--addr".into(),
        format!("{v6}::/64"),
    ]
}

#[test]
fn prometheus_scrapes_counters_equal_to_the_kernels() {
    exact(|| {
        let pair = Pair::new("pm");
        let (a0, b0) = (pair.a.counters(), pair.b.counters());
        // Every connection of the scenario goes to one of these ports, which
        // (with the pair's subnets) keeps other tests' namespaces out even
        // when they happen to use the same addresses.
        let l_idle = listen(&pair.b, &format!("{}:0", pair.b4));
        let l_data = listen(&pair.b, &format!("{}:0", pair.b4));
        let l_abort = listen(&pair.b, &format!("{}:0", pair.b4));
        let closed = closed_port(&pair);
        let mut args = vec!["--metrics".to_string(), "127.0.0.1:0".into()];
        args.extend(pair_filter(&pair));
        for p in [
            port_of(&l_idle),
            port_of(&l_data),
            port_of(&l_abort),
            closed,
        ] {
            args.extend(["--port".to_string(), p.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut serve = Daemon::start(&args);
        let prom = Prometheus::start(serve.metrics);

        // Keepalive probes: an idle connection probed every second.
        let idle = accept_from(&pair, &l_idle);
        set_keepalive(&idle.0, 1, 1, 5);
        // Retransmissions: data dropped for a while, then let through.
        let c = accept_from(&pair, &l_data);
        blackhole(&pair.b, Some(port_of(&l_data)));
        (&c.0).write_all(&[7u8; 3000]).unwrap();
        std::thread::sleep(Duration::from_millis(2500));
        unblackhole(&pair.b);
        let mut got = vec![0u8; 3000];
        c.1.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        (&c.1).read_exact(&mut got).unwrap();
        // Resets: a closed port (sent by b), over both families, and an abort (sent by a).
        for to in [
            format!("{}:{closed}", pair.b4),
            format!("[{}]:{closed}", pair.b6),
        ] {
            let to: SocketAddr = to.parse().unwrap();
            assert!(connect_in(&pair.a, to).is_err());
        }
        let r = accept_from(&pair, &l_abort);
        set_linger_zero(&r.0);
        drop(r);
        std::thread::sleep(Duration::from_millis(1000));
        drop(idle);
        std::thread::sleep(Duration::from_millis(300));
        let (a1, b1) = (pair.a.counters(), pair.b.counters());
        let end = unix_now();

        // Wait for a scrape taken after the scenario ended.
        let scraped = wait_for(Duration::from_secs(20), || {
            prom.query("timestamp(keepalive_probes_total)")
                .first()
                .is_some_and(|(_, ts)| *ts > end + 0.2)
        });
        assert!(scraped, "no scrape after the scenario");
        let kernel = |key: &str| (a0.delta(&a1, key) + b0.delta(&b1, key)) as f64;
        assert_eq!(prom.value("keepalive_events_lost_total"), 0.0);
        let probes = prom.value("keepalive_probes_total");
        let retrans = prom.value("keepalive_retransmits_total");
        let resets = prom.value("keepalive_resets_total{direction=\"sent\"}");
        assert!(kernel("TcpExt.TCPKeepAlive") >= 2.0, "no probes sent");
        assert!(kernel("Tcp.RetransSegs") >= 2.0, "no retransmissions");
        assert!(kernel("Tcp.OutRsts") >= 3.0, "too few resets");
        assert_eq!(
            probes,
            kernel("TcpExt.TCPKeepAlive"),
            "keepalive_probes_total"
        );
        assert_eq!(
            retrans,
            kernel("Tcp.RetransSegs"),
            "keepalive_retransmits_total"
        );
        assert_eq!(
            resets,
            kernel("Tcp.OutRsts"),
            "keepalive_resets_total{{direction=sent}}"
        );
        assert_eq!(prom.value("keepalive_events_lost_total"), 0.0);
        assert_eq!(prom.value("up{job=\"keepalive\"}"), 1.0);
        assert_eq!(
            prom.query("keepalive_build_info")[0].0["version"],
            env!("CARGO_PKG_VERSION")
        );

        // The exposition as plain scrapers get it passes promtool's lint.
        let (status, text) = get(serve.metrics, "/metrics", "text/plain").unwrap();
        assert_eq!(status, 200);
        let mut lint = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("promtool not installed: run `cargo xtask setup`");
        lint.stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = lint.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // The default 4 MiB, split among the online CPUs in powers of two
        // (docs: --ring-size): 4 MiB in all on 1, 2 or 4 CPUs, 3 MiB on 3.
        let cpus = std::fs::read_to_string("/sys/devices/system/cpu/online")
            .unwrap()
            .trim()
            .split(',')
            .map(|r| match r.split_once('-') {
                Some((a, b)) => b.parse::<u64>().unwrap() - a.parse::<u64>().unwrap() + 1,
                None => 1,
            })
            .sum::<u64>();
        let each = ((4u64 << 20) / cpus).max(1);
        let each = (1u64 << each.ilog2()).max(4096);
        assert!(
            text.contains(&format!("\nkeepalive_ring_size_bytes {}\n", cpus * each)),
            "{cpus} CPUs: {text}"
        );
        assert_eq!(get(serve.metrics, "/healthz", "*/*").unwrap().0, 200);
        assert_eq!(get(serve.metrics, "/readyz", "*/*").unwrap().0, 200);
        serve.stop();
        assert_eq!(serve.logged("stopped", "lost"), 0);
    });
}

/// Every line of every file in `dir`, parsed.
fn lines_in(dir: &Path) -> Vec<Value> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap();
        assert!(
            text.is_empty() || text.ends_with('\n'),
            "{} ends in a partial line",
            e.path().display()
        );
        for l in text.lines() {
            out.push(
                serde_json::from_str(l)
                    .unwrap_or_else(|err| panic!("{}: bad line {l:?}: {err}", e.path().display())),
            );
        }
    }
    out
}

#[test]
fn rotation_and_sighup_reopen_lose_no_line() {
    use std::os::unix::fs::PermissionsExt;
    let pair = Pair::new("rot");
    let dir = TempDir::new("rot");
    let file = dir.0.join("events.jsonl");
    let mut args = vec![
        "--metrics".to_string(),
        "127.0.0.1:0".into(),
        "--output".into(),
        file.display().to_string(),
        "--rotate-size".into(),
        "64KiB".into(),
        "--rotate-keep".into(),
        "1000".into(),
    ];
    args.extend(pair_filter(&pair));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut serve = Daemon::start(&args);
    let listener = listen(&pair.b, &format!("{}:0", pair.b4));
    let to = listener.local_addr().unwrap();
    for i in 0..400 {
        let c = connect_in(&pair.a, to).unwrap();
        let (s, _) = listener.accept().unwrap();
        drop(c);
        drop(s);
        if i == 200 {
            // What logrotate does: move the file away, then SIGHUP.
            std::fs::rename(&file, dir.0.join("moved.jsonl")).unwrap();
            serve.signal(libc::SIGHUP);
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    serve.stop();

    let files: Vec<PathBuf> = std::fs::read_dir(&dir.0)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(files.len() > 5, "expected several rotated files: {files:?}");
    assert!(dir.0.join("moved.jsonl").exists());
    for f in &files {
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640, "{}", f.display());
        assert!(
            std::fs::metadata(f).unwrap().len() <= 64 * 1024,
            "{} larger than the rotation size",
            f.display()
        );
    }
    let lines = lines_in(&dir.0);
    let events = lines
        .iter()
        .filter(|l| l["event"] != "verdict" && l["event"] != "lost")
        .count() as u64;
    let (emitted, received, lost) = (
        serve.logged("stopped", "emitted"),
        serve.logged("stopped", "received"),
        serve.logged("stopped", "lost"),
    );
    assert_eq!(lost, 0, "ring overflowed during the test");
    assert!(received >= 2000, "too few events: {received}");
    assert_eq!(emitted, received);
    assert_eq!(
        events, received,
        "event lines across all files vs events received"
    );
    assert_eq!(
        serve.logged("event file closed", "events_written"),
        received
    );
    assert!(
        serve
            .logs
            .iter()
            .any(|l| l["message"] == "SIGHUP: event file reopened"),
        "{:?}",
        serve.logs
    );
}

/// Runs `keepalive ARGS` to completion: (exit code, stderr lines).
fn run_keepalive(args: &[&str]) -> (i32, Vec<String>) {
    let out = Command::new(keepalive_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(str::to_string)
        .collect();
    (out.status.code().unwrap_or(-1), stderr)
}

#[test]
fn bad_config_is_refused_as_file_line_before_anything_starts() {
    require_root();
    let dir = TempDir::new("badcfg");
    let port = free_port();
    let cases = [
        (
            "[serve]\nmetrics = \"127.0.0.1:PORT\"\nmetric_labels = [\"comm\"]\n",
            3,
            "metric_labels",
        ),
        (
            "[serve]\nmetrics = \"127.0.0.1:PORT\"\n\nrotate_size = \"huge\"\n",
            4,
            "serve.rotate_size: invalid size `huge`",
        ),
        (
            "[serve]\nmetrics = \"localhost:PORT\"\n",
            2,
            "serve.metrics: invalid address",
        ),
        (
            "[serve]\nmetrics = \"127.0.0.1:PORT\"\nevents = [\"probe\"]\n",
            3,
            "serve.events: unknown event kind `probe`",
        ),
        (
            "[serve]\nmetrics = \"127.0.0.1:PORT\"\n[thresholds]\nidle = \"soon\"\n",
            4,
            "thresholds.idle: invalid duration",
        ),
        (
            "[serve]\nmetrics = \"127.0.0.1:PORT\"\nrotate_keep = \"five\"\n",
            3,
            "",
        ),
    ];
    for (text, line, what) in cases {
        let path = dir.0.join("keepalive.toml");
        std::fs::write(&path, text.replace("PORT", &port.to_string())).unwrap();
        let path_s = path.display().to_string();
        for check in [false, true] {
            let mut args = vec!["serve", "--config", &path_s];
            if check {
                args.push("--check-config");
            }
            let (code, stderr) = run_keepalive(&args);
            assert_eq!(code, 1, "{text}: {stderr:?}");
            assert_eq!(stderr.len(), 1, "one line: {stderr:?}");
            let prefix = format!("keepalive: error: {path_s}:{line}: ");
            assert!(
                stderr[0].starts_with(&prefix) && stderr[0].contains(what),
                "{text}: expected `{prefix}...{what}`, got {stderr:?}"
            );
        }
        // Nothing was left listening.
        std::net::TcpListener::bind(("127.0.0.1", port)).expect("metrics port still bound");
    }
    // The shipped default configuration is valid.
    let default = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/keepalive.toml");
    let (code, stderr) = run_keepalive(&[
        "serve",
        "--config",
        default.to_str().unwrap(),
        "--check-config",
    ]);
    assert_eq!(code, 0, "{stderr:?}");
}

#[test]
fn metrics_address_in_use_is_one_line_and_nothing_attached() {
    require_root();
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    let expected = format!(
        "keepalive: error: cannot listen for metrics on {addr}: address already in use (another keepalive or exporter?)"
    );
    let empty = empty_config().to_str().unwrap();
    for cmd in [
        vec!["serve", "--config", empty, "--metrics", &addr],
        vec!["record", "--format", "json", "--metrics", &addr],
    ] {
        // One line and nothing else: no "hooks attached" report, so
        // nothing was loaded or attached.
        let (code, stderr) = run_keepalive(&cmd);
        assert_eq!(code, 1, "{cmd:?}: {stderr:?}");
        assert_eq!(stderr, vec![expected.clone()], "{cmd:?}");
    }
}

#[test]
fn output_symlink_is_refused_and_its_target_untouched() {
    require_root();
    let dir = TempDir::new("symlink");
    let target = dir.0.join("target");
    std::fs::write(&target, "precious\n").unwrap();
    let link = dir.0.join("events.jsonl");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let (code, stderr) = run_keepalive(&[
        "serve",
        "--config",
        empty_config().to_str().unwrap(),
        "--metrics",
        "127.0.0.1:0",
        "--output",
        link.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{stderr:?}");
    assert_eq!(stderr.len(), 1, "{stderr:?}");
    assert!(
        stderr[0].starts_with(&format!(
            "keepalive: error: cannot create {}: is a symbolic link",
            link.display()
        )),
        "{stderr:?}"
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious\n");
}

#[test]
fn record_serves_metrics_too() {
    exact(|| {
        let pair = Pair::new("rm");
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let closed = closed_port(&pair);
        let mut args = vec!["--metrics".to_string(), addr.clone()];
        args.extend(pair_filter(&pair));
        args.extend(["--port".to_string(), closed.to_string()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut mon = Monitor::start(&args);
        let (a0, b0) = (pair.a.counters(), pair.b.counters());
        for to in [
            format!("{}:{closed}", pair.b4),
            format!("[{}]:{closed}", pair.b6),
        ] {
            let to: SocketAddr = to.parse().unwrap();
            assert!(connect_in(&pair.a, to).is_err());
        }
        std::thread::sleep(Duration::from_millis(300));
        let (a1, b1) = (pair.a.counters(), pair.b.counters());
        let sent = a0.delta(&a1, "Tcp.OutRsts") + b0.delta(&b1, "Tcp.OutRsts");
        assert_eq!(sent, 2);
        // The kernel has counted both; the engine publishes them once it has
        // drained the ring, which a loaded machine can delay past any fixed
        // sleep: scrape until the count is there (never above it), then the
        // stream must hold exactly as many.
        let line = format!("\nkeepalive_resets_total{{direction=\"sent\"}} {sent}\n");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let text = loop {
            let (status, text) = get(addr.parse().unwrap(), "/metrics", "text/plain").unwrap();
            assert_eq!(status, 200);
            if text.contains(&line) || std::time::Instant::now() > deadline {
                break text;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(text.contains(&line), "{text}");
        let events = mon.stop_lossless();
        assert_eq!(
            events.iter().filter(|e| e["event"] == "reset_sent").count() as i64,
            sent
        );
        let _ = TcpStream::connect(("127.0.0.1", port)).expect_err("endpoint still up after exit");
    });
}

#[test]
fn serve_applies_the_configs_rules_and_counts_them_in_metrics() {
    use keepalive_tests::testkit::sock::{self, KeepaliveSettings};
    use std::os::unix::fs::PermissionsExt;
    let pair = Pair::new("stn");
    let dir = TempDir::new("stune");
    let listener = listen(&pair.b, &format!("{}:0", pair.b4));
    let to = listener.local_addr().unwrap();
    let before = connect_in(&pair.a, to).unwrap();
    let (_before_srv, _) = listener.accept().unwrap();
    // One file: [serve], and a [[rule]] for exactly this listener.
    let config = dir.0.join("keepalive.toml");
    let events = dir.0.join("events.jsonl");
    std::fs::write(
        &config,
        format!(
            "[serve]\nmetrics = \"127.0.0.1:0\"\noutput = \"{}\"\n\n[[rule]]\nname = \"db\"\nremote = \"{}/32\"\nremote_port = {}\nkeepalive = true\nidle = \"7s\"\ninterval = \"3s\"\ncount = 4\n",
            events.display(),
            to.ip(),
            to.port()
        ),
    )
    .unwrap();
    // The policy's own rule: only root may change it.
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut serve = Daemon::start(&["--config", config.to_str().unwrap()]);
    let after = connect_in(&pair.a, to).unwrap();
    let (_after_srv, _) = listener.accept().unwrap();
    let want = KeepaliveSettings {
        enabled: true,
        idle_s: 7,
        intvl_s: 3,
        probes: 4,
    };
    let applied = wait_for(Duration::from_secs(10), || {
        sock::keepalive_settings(&before).unwrap() == want
            && sock::keepalive_settings(&after).unwrap() == want
    });
    assert!(applied, "the rule was not applied to both connections");
    let tuned = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("keepalive_tuned_total{rule=\"db\",action=\"tuned\"} "))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let counted = wait_for(Duration::from_secs(5), || {
        tuned(&get(serve.metrics, "/metrics", "text/plain").unwrap().1) == Some(2)
    });
    assert!(
        counted,
        "{}",
        get(serve.metrics, "/metrics", "text/plain").unwrap().1
    );
    serve.stop();
    let text = std::fs::read_to_string(&events).unwrap();
    let records: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &Value| v["event"] == "tuned" && v["action"] == "tuned")
        .collect();
    assert_eq!(records.len(), 2, "{text}");
    // Restored at exit, as tune does.
    assert!(!sock::keepalive_settings(&before).unwrap().enabled);
}
