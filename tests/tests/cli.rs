//! The command line fails cleanly: bad input gives one line on stderr and a
//! non-zero exit, never a panic or a backtrace.

use std::process::{Command, Stdio};

use keepalive_tests::*;

fn run_bin(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(keepalive_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_clean_failure(args: &[&str], expect: &str) {
    let (code, _, err) = run_bin(args);
    assert_ne!(code, 0, "{args:?} succeeded");
    assert!(
        err.contains(expect),
        "{args:?}: stderr {err:?} lacks {expect:?}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
}

#[test]
fn bad_flags_are_one_line_errors() {
    assert_clean_failure(
        &["record", "--event", "probe"],
        "invalid value 'probe' for '--event <KIND>'",
    );
    assert_clean_failure(&["record", "--addr", "10.0.0.0/99"], "invalid address");
    assert_clean_failure(&["record", "--port", "http"], "invalid value");
    assert_clean_failure(
        &["record", "--ring-size", "1000"],
        "--ring-size must be a power of two",
    );
    assert_clean_failure(&["frobnicate"], "unrecognized subcommand");
}

#[test]
fn unwritable_output_is_a_one_line_error() {
    require_root();
    let (code, _, err) = run_bin(&["record", "--output", "/nonexistent/dir/out.jsonl"]);
    assert_ne!(code, 0);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("cannot create /nonexistent/dir/out.jsonl"),
        "{err}"
    );
}

#[test]
fn not_root_is_a_one_line_error() {
    require_root();
    // Drop to nobody with no capabilities.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(keepalive_bin())
        .arg("record")
        .output()
        .expect("setpriv (util-linux) is needed for this test");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("needs root"), "{err}");
}

#[test]
fn check_passes_here_and_lists_every_hook() {
    require_root();
    let (code, out, err) = run_bin(&["check"]);
    assert_eq!(code, 0, "check failed here:\n{out}{err}");
    for tp in [
        "inet_sock_set_state",
        "tcp_retransmit_skb",
        "tcp_send_reset",
        "tcp_receive_reset",
        "inet_sk_error_report",
        "timer_expire_entry",
        "timer_expire_exit",
    ] {
        assert!(
            out.contains(&format!("ok   tp_btf/{tp}")),
            "{tp} not ok:\n{out}"
        );
    }
}

#[test]
fn closed_stdout_ends_quietly() {
    require_root();
    // `keepalive record | head -1`: the reader goes away after one line.
    let ns = Netns::new("pipe");
    let _ = std::fs::remove_file("/tmp/ka-pipe-err");
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{} record --format json --event state_change 2>/tmp/ka-pipe-err | head -1",
            keepalive_bin().display()
        ))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let ready = wait_for(std::time::Duration::from_secs(60), || {
        std::fs::read_to_string("/tmp/ka-pipe-err").is_ok_and(|e| e.contains("hooks attached"))
    });
    assert!(ready, "keepalive did not start");
    // Make a few connections so the monitor has something to write.
    ns.enter(|| {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        for _ in 0..5 {
            let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let _s = l.accept().unwrap();
        }
    });
    let done = wait_for(std::time::Duration::from_secs(10), || {
        child.try_wait().unwrap().is_some()
    });
    assert!(done, "keepalive kept running after its reader closed");
    let err = std::fs::read_to_string("/tmp/ka-pipe-err").unwrap_or_default();
    assert!(!err.contains("error") && !err.contains("panicked"), "{err}");
}

#[test]
fn bad_config_names_file_and_line() {
    let path = std::env::temp_dir().join(format!("ka-bad-{}.toml", std::process::id()));
    std::fs::write(
        &path,
        "[thresholds]\nidle = \"1m\"\n\nclose_wait = \"later\"\n",
    )
    .unwrap();
    let p = path.to_str().unwrap();
    assert_clean_failure(
        &["snapshot", "--config", p],
        &format!("{p}:4: thresholds.close_wait: invalid duration `later`"),
    );
    assert_clean_failure(
        &["record", "--config", p],
        &format!("{p}:4: thresholds.close_wait"),
    );
    std::fs::write(&path, "[thresholds]\nidel = \"1m\"\n").unwrap();
    assert_clean_failure(
        &["snapshot", "--config", p],
        &format!("{p}:2: unknown field `idel`"),
    );
    let _ = std::fs::remove_file(&path);
}
