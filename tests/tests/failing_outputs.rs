//! stdout or stderr that cannot be written never makes keepalive panic or
//! abort, a lost diagnostic channel never stops the data channel or hides
//! a loss in it, and SIGHUP reopens the output file (log rotation) with
//! the totals still right.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use keepalive_tests::*;
use serde_json::Value;

/// Exit code (None: killed by a signal, e.g. SIGABRT) and stderr.
fn run_sh(cmd: &str) -> (Option<i32>, String) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn bin() -> String {
    keepalive_bin().display().to_string()
}

#[test]
fn check_to_a_full_stdout_is_an_error_not_a_panic() {
    require_root();
    let (code, err) = run_sh(&format!("{} check >/dev/full", bin()));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("writing the report: No space left on device"),
        "{err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("internal error"),
        "{err}"
    );
}

#[test]
fn errors_to_a_full_stderr_keep_their_exit_code() {
    // Formerly an abort (SIGABRT, rc 134): the error print panicked, and
    // so did the panic hook.
    let (code, _) = run_sh(&format!("{} snapshot --verdict bogus 2>/dev/full", bin()));
    assert_eq!(code, Some(2));
    let (code, _) = run_sh(&format!(
        "{} snapshot --config /nonexistent.toml 2>/dev/full",
        bin()
    ));
    assert_eq!(code, Some(1));
    for shell in ["bash", "zsh"] {
        let (code, err) = run_sh(&format!("{} completions {shell} >/dev/full", bin()));
        assert_eq!(code, Some(1), "{shell}: {err}");
        assert!(err.contains("No space left on device"), "{err}");
    }
    let (code, err) = run_sh(&format!("{} man >/dev/full", bin()));
    assert_eq!(code, Some(1), "{err}");
}

/// `record` with stderr on /dev/full records, and stops cleanly.
#[test]
fn record_with_a_full_stderr_records() {
    require_root();
    let ns = Netns::new("fullerr");
    let port = 30000 + (std::process::id() % 20000) as u16;
    let out = std::env::temp_dir().join(format!("ka-fullerr-{}.jsonl", std::process::id()));
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "exec {} record --format json --event state_change --refresh 0 --port {port} -o {} 2>/dev/full",
            bin(),
            out.display()
        ))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    // No ready line to wait for: wait for the output file, then for the
    // hooks (a connection's events appear).
    let seen = wait_for(Duration::from_secs(30), || {
        ns.churn_loopback(port, 1);
        std::fs::read_to_string(&out).is_ok_and(|t| t.lines().count() > 0)
    });
    assert!(
        seen,
        "no events written (exit {:?})",
        child.try_wait().ok().flatten()
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(0), "{st}");
    let _ = std::fs::remove_file(&out);
}

#[test]
fn a_stderr_reader_that_left_neither_stops_record_nor_hides_a_loss() {
    require_root();
    let ns = Netns::new("errpipe");
    let port = 30000 + (std::process::id() % 20000) as u16 + 7;
    let out = std::env::temp_dir().join(format!("ka-errpipe-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&out);
    let mut child = Command::new(keepalive_bin())
        .args([
            "record",
            "--format",
            "json",
            "--event",
            "state_change",
            "--refresh",
            "0",
            "--ring-size",
            "4096",
            "--port",
            &port.to_string(),
            "-o",
        ])
        .arg(&out)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read up to the ready line, then close the read end: every later
    // write to stderr fails with EPIPE.
    let mut stderr = child.stderr.take().unwrap();
    let mut seen = Vec::new();
    let ready = {
        use std::io::Read;
        let mut byte = [0u8; 1];
        loop {
            match stderr.read(&mut byte) {
                Ok(1) => {
                    seen.push(byte[0]);
                    if String::from_utf8_lossy(&seen).contains("hooks attached") && byte[0] == b'\n'
                    {
                        break true;
                    }
                }
                _ => break false,
            }
        }
    };
    assert!(ready, "{}", String::from_utf8_lossy(&seen));
    drop(stderr);
    // Stop it, queue far more events than a 4 KiB ring holds, resume it.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGSTOP) };
    ns.churn_loopback(port, 400);
    unsafe { libc::kill(child.id() as i32, libc::SIGCONT) };
    // The loss is noticed within a loss check (250 ms); give it time.
    let lost = wait_for(Duration::from_secs(10), || {
        std::fs::read_to_string(&out).is_ok_and(|t| t.contains("\"event\":\"lost\""))
    });
    let alive = child.try_wait().unwrap().is_none();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = child.wait().unwrap();
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let _ = std::fs::remove_file(&out);
    assert!(alive, "record died when stderr went away: {st}");
    assert!(lost, "no lost record in the output");
    assert_eq!(st.code(), Some(0), "{st}");
    let records: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let lost_total = records
        .iter()
        .filter(|v| v["event"] == "lost")
        .map(|v| v["lost_total"].as_u64().unwrap())
        .max()
        .unwrap();
    let events = records
        .iter()
        .filter(|v| v["event"] == "state_change")
        .count() as u64;
    // 400 connections: about 3,600 state changes, more than the ring and
    // the file together could have taken without a loss.
    assert!(
        lost_total > 0 && events > 0,
        "{lost_total} lost, {events} events"
    );
}

#[test]
fn sighup_reopens_the_output_and_the_totals_stay_right() {
    require_root();
    let ns = Netns::new("hup");
    let port = 30000 + (std::process::id() % 20000) as u16 + 13;
    let ports = port.to_string();
    let mut m = Monitor::start(&[
        "--event",
        "state_change",
        "--refresh",
        "0",
        "--port",
        &ports,
    ]);
    let out = m.output().to_path_buf();
    let rotated = out.with_extension("jsonl.1");
    ns.churn_loopback(port, 10);
    let lines = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    assert!(wait_for(Duration::from_secs(10), || lines(&out) >= 60));
    std::fs::rename(&out, &rotated).unwrap();
    m.signal(libc::SIGHUP).unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || out.exists()),
        "SIGHUP did not reopen {}",
        out.display()
    );
    assert_eq!(
        std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o640
    );
    ns.churn_loopback(port, 10);
    let after = m.stop_lossless();
    let before = lines(&rotated);
    let _ = std::fs::remove_file(&rotated);
    assert!(
        m.stderr.iter().any(|l| l.contains("SIGHUP: reopened")),
        "{:?}",
        m.stderr
    );
    assert!(
        before >= 60 && after.len() >= 60,
        "{before} then {}",
        after.len()
    );
    // Every event received went to one file or the other, whole.
    assert_eq!(
        (before + after.len()) as u64,
        m.summary("received"),
        "{:?}",
        m.stderr
    );
}

#[test]
fn sighup_then_stop_still_writes_the_table_dump() {
    require_root();
    let dump = std::env::temp_dir().join(format!("ka-hup-dump-{}.jsonl", std::process::id()));
    let mut m = Monitor::start(&["--table-dump", dump.to_str().unwrap()]);
    m.signal(libc::SIGHUP).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    m.stop();
    let rows = std::fs::read_to_string(&dump).unwrap();
    let _ = std::fs::remove_file(&dump);
    assert!(rows.lines().count() > 0, "empty table dump");
    assert!(m.summary("received") < u64::MAX);
}
