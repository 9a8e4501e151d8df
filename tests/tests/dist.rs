//! What `dist/` ships, checked with the tools that consume it: the systemd
//! unit (`systemd-analyze verify`, and its capability set actually enough
//! to run the monitor), the Prometheus alert rules (`promtool`), the
//! Kubernetes manifest (the Kubernetes schemas), and the Debian package
//! (installed with dpkg, run from the installed path, removed and purged).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use keepalive_tests::daemon::Daemon;
use keepalive_tests::http::get;
use keepalive_tests::*;
use serde_json::Value;

fn dist() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist")
}

fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}; `cargo xtask setup` installs it"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The unit's `CapabilityBoundingSet=` (CAP_ names).
fn unit_caps(unit: &str) -> Vec<String> {
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit sets CapabilityBoundingSet");
    line.split_whitespace().map(str::to_string).collect()
}

/// `systemd-analyze verify` on `unit`: exit 0 and nothing said (it exits 0
/// on an unparsable setting, only warning about it).
fn verify_unit(unit: &Path, man: bool) {
    let mut cmd = Command::new("systemd-analyze");
    cmd.arg("verify");
    if !man {
        cmd.arg("--man=no");
    }
    let o = output(cmd.arg(unit));
    assert!(o.status.success(), "systemd-analyze verify: {}", text(&o));
    assert_eq!(text(&o).trim(), "", "systemd-analyze verify warned");
}

#[test]
fn systemd_unit_verifies() {
    let unit = std::fs::read_to_string(dist().join("systemd/keepalive.service")).unwrap();
    let dir = std::env::temp_dir().join(format!("keepalive-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("keepalive.service");
    // The installed path does not exist here; the built binary stands in.
    let bin = keepalive_bin();
    std::fs::write(
        &path,
        unit.replace("/usr/bin/keepalive", bin.to_str().unwrap()),
    )
    .unwrap();
    verify_unit(&path, false);
    for key in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "Restart=on-failure",
    ] {
        assert!(unit.lines().any(|l| l == key), "unit lacks {key}");
    }
    // A mistake is caught: verify is not a no-op.
    std::fs::write(
        &path,
        unit.replace("/usr/bin/keepalive", bin.to_str().unwrap())
            .replace("ProtectSystem=strict", "ProtectSystem=stricter"),
    )
    .unwrap();
    let o = output(
        Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&path),
    );
    assert!(text(&o).contains("stricter"), "{}", text(&o));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Capability numbers (include/uapi/linux/capability.h) of those the unit may name.
fn cap_number(name: &str) -> u32 {
    match name {
        "CAP_NET_ADMIN" => 12,
        "CAP_SYS_PTRACE" => 19,
        "CAP_SYS_ADMIN" => 21,
        "CAP_SYS_RESOURCE" => 24,
        "CAP_SYSLOG" => 34,
        "CAP_PERFMON" => 38,
        "CAP_BPF" => 39,
        other => panic!("the unit names {other}: add its number here"),
    }
}

/// `CapBnd` of a /proc/PID/status.
fn cap_bounding(status: &str) -> u64 {
    std::fs::read_to_string(status)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap()
}

#[test]
fn the_units_capabilities_are_enough_to_serve() {
    let unit = std::fs::read_to_string(dist().join("systemd/keepalive.service")).unwrap();
    let caps = unit_caps(&unit);
    let bounding = std::iter::once("-all".to_string())
        .chain(
            caps.iter()
                .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase())),
        )
        .collect::<Vec<_>>()
        .join(",");
    let setpriv = [
        "setpriv",
        "--no-new-privs",
        "--inh-caps",
        "-all",
        "--bounding-set",
        bounding.as_str(),
        "--",
    ];
    let pair = Pair::new("cap");
    let net = pair.a4.rsplit_once('.').unwrap().0.to_string() + ".0/24";
    // A port nothing listens on in b (a fresh namespace), and only it: other
    // tests' namespaces may share the pair's addresses.
    let closed = listen(&pair.b, &format!("{}:0", pair.b4))
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let mut serve = Daemon::start_with(
        &setpriv,
        &[
            "--metrics",
            "127.0.0.1:0",
            "--addr",
            &net,
            "--port",
            &closed,
        ],
    );
    // Its capabilities really are limited to the unit's (those this
    // machine grants us: a container may lack some).
    let unit_mask = caps.iter().fold(0u64, |m, c| m | 1 << cap_number(c));
    let bnd = cap_bounding(&format!("/proc/{}/status", serve.pid()));
    assert_eq!(
        bnd,
        unit_mask & cap_bounding("/proc/self/status"),
        "CapBnd {bnd:x}"
    );

    // Hooks work: resets from a closed port are counted as the kernel does.
    let b0 = pair.b.counters();
    for _ in 0..3 {
        let to: SocketAddr = format!("{}:{closed}", pair.b4).parse().unwrap();
        assert!(connect_in(&pair.a, to).is_err());
    }
    std::thread::sleep(Duration::from_millis(300));
    let sent = b0.delta(&pair.b.counters(), "Tcp.OutRsts");
    assert_eq!(sent, 3);
    let (status, body) = get(serve.metrics, "/metrics", "text/plain").unwrap();
    assert_eq!(status, 200);
    assert!(
        body.contains(&format!(
            "\nkeepalive_resets_total{{direction=\"sent\"}} {sent}\n"
        )),
        "{body}"
    );
    assert_eq!(get(serve.metrics, "/healthz", "*/*").unwrap().0, 200);
    serve.stop();

    // The socket walk enters other namespaces (CAP_SYS_ADMIN) and names
    // owners (CAP_SYS_PTRACE): a connection in the pair is found with its owner.
    let c = connect_pair(&pair, &pair.b4);
    let port = c.listener.local_addr().unwrap().port().to_string();
    let mut cmd = Command::new("setpriv");
    cmd.args(&setpriv[1..])
        .arg(keepalive_bin())
        .args(["snapshot", "--format", "json", "--port", &port]);
    let o = output(&mut cmd);
    assert!(o.status.success(), "{}", text(&o));
    let rows: Vec<Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "client and server rows: {rows:#?}");
    assert!(
        rows.iter()
            .all(|r| r["owners"][0]["pid"] == std::process::id()),
        "{rows:#?}"
    );
}

#[test]
fn alert_rules_pass_promtool_and_fire_after_five_minutes() {
    let rules = dist().join("prometheus/keepalive-alerts.yml");
    let o = output(
        Command::new("promtool")
            .args(["check", "rules"])
            .arg(&rules),
    );
    assert!(o.status.success(), "{}", text(&o));
    let o = output(
        Command::new("promtool")
            .args(["test", "rules"])
            .arg(dist().join("prometheus/keepalive-alerts.test.yml")),
    );
    assert!(o.status.success(), "{}", text(&o));
}

/// The `keepalive.toml: |` block of the ConfigMap, unindented.
fn configmap_toml(manifest: &str) -> String {
    let mut lines = manifest
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("keepalive.toml: |"));
    lines.next().expect("a keepalive.toml key in the ConfigMap");
    lines
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| l.strip_prefix("    ").unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn kubernetes_manifest_is_valid_and_agrees_with_the_unit() {
    let path = dist().join("kubernetes/keepalive.yaml");
    let o = output(
        Command::new("python3")
            .args(["-m", "kubernetes_validate", "--strict"])
            .arg(&path),
    );
    assert!(o.status.success(), "kubernetes-validate: {}", text(&o));
    assert_eq!(text(&o).matches(" passed ").count(), 3, "{}", text(&o));
    let manifest = std::fs::read_to_string(&path).unwrap();
    for needle in [
        "hostPID: true",
        "privileged: false",
        "path: /sys/kernel/btf",
        "path: /sys/fs/cgroup",
        "prometheus.io/scrape: \"true\"",
        "drop: [\"ALL\"]",
    ] {
        assert!(manifest.contains(needle), "manifest lacks {needle}");
    }
    // Same capabilities as the unit.
    let add = manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("add: "))
        .expect("capabilities to add");
    let mut k8s: Vec<String> = serde_json::from_str(add).unwrap();
    let unit = std::fs::read_to_string(dist().join("systemd/keepalive.service")).unwrap();
    let mut caps: Vec<String> = unit_caps(&unit)
        .iter()
        .map(|c| c.trim_start_matches("CAP_").to_string())
        .collect();
    k8s.sort();
    caps.sort();
    assert_eq!(k8s, caps);
    // Its configuration is one serve accepts.
    let dir = std::env::temp_dir().join(format!("keepalive-cm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let toml = dir.join("keepalive.toml");
    std::fs::write(&toml, configmap_toml(&manifest)).unwrap();
    let o = output(
        Command::new(keepalive_bin())
            .args(["serve", "--check-config", "--config"])
            .arg(&toml),
    );
    assert!(o.status.success(), "{}", text(&o));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Purges the package however the test ends.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg")
            .args(["-P", "keepalive"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn dpkg_status() -> String {
    let o = output(Command::new("dpkg-query").args(["-W", "-f=${Status}", "keepalive"]));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn debian_package_installs_runs_and_removes_cleanly() {
    require_root();
    let deb = std::env::var_os("KEEPALIVE_DEB").map(PathBuf::from).expect(
        "KEEPALIVE_DEB is not set: run `cargo xtask test` (it builds the package with `cargo xtask dist`)",
    );
    assert!(deb.is_file(), "{} missing", deb.display());
    assert!(
        !dpkg_status().contains("installed"),
        "a keepalive package is already installed; this test installs and removes its own"
    );
    let _guard = Installed;
    let o = output(Command::new("dpkg").arg("-i").arg(&deb));
    assert!(o.status.success(), "dpkg -i: {}", text(&o));
    assert_eq!(dpkg_status(), "install ok installed");

    let o = output(Command::new("/usr/bin/keepalive").arg("check"));
    assert!(o.status.success(), "keepalive check: {}", text(&o));
    assert!(
        text(&o).contains("keepalive record can run on this host"),
        "{}",
        text(&o)
    );
    let o = output(Command::new("/usr/bin/keepalive").args(["serve", "--check-config"]));
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "/etc/keepalive/keepalive.toml: ok"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata("/etc/keepalive/keepalive.toml")
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o640);
    let unit = [
        "/lib/systemd/system/keepalive.service",
        "/usr/lib/systemd/system/keepalive.service",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
    .expect("the unit installed");
    verify_unit(&unit, true);
    // Enabled on install, as Debian services are.
    assert!(
        Path::new("/etc/systemd/system/multi-user.target.wants/keepalive.service").exists(),
        "the unit was not enabled"
    );
    let files = [
        "/usr/share/man/man1/keepalive.1.gz",
        "/usr/share/man/man1/keepalive-serve.1.gz",
        "/usr/share/bash-completion/completions/keepalive",
        "/usr/share/zsh/vendor-completions/_keepalive",
        "/usr/share/fish/vendor_completions.d/keepalive.fish",
        "/usr/share/doc/keepalive/examples/keepalive-alerts.yml",
    ];
    for f in files {
        assert!(Path::new(f).is_file(), "{f} not installed");
    }
    let o = output(
        Command::new("bash").args(["-n", "/usr/share/bash-completion/completions/keepalive"]),
    );
    assert!(o.status.success(), "bash completion: {}", text(&o));
    let o = output(Command::new("man").args(["-w", "keepalive-serve"]));
    assert!(o.status.success(), "man -w keepalive-serve: {}", text(&o));

    let o = output(Command::new("dpkg").args(["-r", "keepalive"]));
    assert!(o.status.success(), "dpkg -r: {}", text(&o));
    assert!(!Path::new("/usr/bin/keepalive").exists());
    assert!(!unit.exists());
    for f in files {
        assert!(!Path::new(f).exists(), "{f} left after dpkg -r");
    }
    // Debian keeps changed-or-not configuration until purge.
    assert!(Path::new("/etc/keepalive/keepalive.toml").exists());
    let o = output(Command::new("dpkg").args(["-P", "keepalive"]));
    assert!(o.status.success(), "dpkg -P: {}", text(&o));
    assert!(
        !Path::new("/etc/keepalive").exists(),
        "/etc/keepalive left after purge"
    );
    // No trace of the unit's enablement or mask.
    for state in [
        "/etc/systemd/system/multi-user.target.wants/keepalive.service",
        "/etc/systemd/system/keepalive.service",
        "/var/lib/systemd/deb-systemd-helper-enabled/keepalive.service.dsh-also",
        "/var/lib/systemd/deb-systemd-helper-masked/keepalive.service",
    ] {
        assert!(!Path::new(state).exists(), "{state} left after purge");
    }
    assert!(!dpkg_status().contains("installed"));
}
