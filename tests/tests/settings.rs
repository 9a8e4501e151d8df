//! Every setting has a range, checked before anything is loaded, with an
//! error that names the flag (or FILE:LINE); combinations that could never
//! print anything are refused; configuration files are read only when they
//! are regular files of sane size.

use std::process::Command;
use std::time::Duration;

use keepalive_tests::*;

/// Runs keepalive with `args`; it must fail within 10 s with one line on
/// stderr that contains `expect`.
fn refused(args: &[&str], expect: &str) {
    let (code, err) = run_to_exit(args, Duration::from_secs(10));
    assert_ne!(code, 0, "{args:?} succeeded: {err:?}");
    assert_eq!(err.len(), 1, "{args:?}: {err:?}");
    assert!(
        err[0].contains(expect),
        "{args:?}: {:?} lacks {expect:?}",
        err[0]
    );
}

#[test]
fn record_settings_out_of_range_name_their_flag() {
    let refresh = "--refresh must be 0 (no connection table) or between 100ms and 1day";
    refused(
        &["record", "--refresh", "1ms"],
        &format!("{refresh}, got 1ms"),
    );
    // Below a millisecond used to turn the table off without a word.
    refused(
        &["record", "--refresh", "500us"],
        &format!("{refresh}, got 500us"),
    );
    refused(&["record", "--refresh", "2days"], refresh);
    refused(
        &["record", "--event", "verdict", "--refresh", "0"],
        "--event verdict needs the connection table, which --refresh 0 turns off",
    );
    refused(
        &["record", "--table-dump", "/tmp/never", "--refresh", "0"],
        "--table-dump needs the connection table",
    );
    let ring = "--ring-size must be a power of two between 4096 and 268435456 bytes";
    refused(
        &["record", "--ring-size", "2147483648"],
        &format!("{ring}, got 2147483648"),
    );
    refused(&["record", "--ring-size", "1000"], ring);
    refused(&["record", "--ring-size", "12288"], ring);
    let conns = "--max-conns must be between 1 and 4194304";
    for n in ["0", "100000000", "4294967295"] {
        refused(&["record", "--max-conns", n], &format!("{conns}, got {n}"));
    }
}

#[test]
fn thresholds_out_of_range_name_their_flag_or_line() {
    for cmd in ["record", "snapshot"] {
        refused(
            &[cmd, "--idle-threshold", "0"],
            "--idle-threshold must be between 1s and 30days, got 0s",
        );
        refused(
            &[cmd, "--middlebox-timeout", "100days"],
            "--middlebox-timeout must be between 1s and 30days",
        );
        refused(
            &[cmd, "--close-wait-threshold", "10ms"],
            "--close-wait-threshold must be between 1s and 30days, got 10ms",
        );
        refused(
            &[cmd, "--dead-retransmits", "0"],
            "--dead-retransmits must be between 1 and 255, got 0",
        );
    }
    let path = std::env::temp_dir().join(format!("ka-range-{}.toml", std::process::id()));
    let p = path.to_str().unwrap();
    std::fs::write(&path, "[thresholds]\nidle = \"1m\"\nclose_wait = \"0s\"\n").unwrap();
    refused(
        &["snapshot", "--config", p],
        &format!("{p}:3: thresholds.close_wait: must be between 1s and 30days, got 0s"),
    );
    std::fs::write(&path, "[thresholds]\n\ndead_retransmits = 1000\n").unwrap();
    refused(
        &["snapshot", "--config", p],
        &format!("{p}:3: thresholds.dead_retransmits: must be between 1 and 255, got 1000"),
    );
    let _ = std::fs::remove_file(&path);
}

#[test]
fn config_files_must_be_small_regular_files() {
    refused(
        &["snapshot", "--config", "/dev/zero"],
        "cannot read config /dev/zero: not a regular file",
    );
    // /dev/null is an empty configuration.
    let out = Command::new(keepalive_bin())
        .args(["record", "--config", "/dev/null", "--max-conns", "0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--max-conns must be between"), "{err}");
    let fifo = std::env::temp_dir().join(format!("ka-fifo-{}", std::process::id()));
    let _ = std::fs::remove_file(&fifo);
    run(&format!("mkfifo {}", fifo.display()));
    let f = fifo.to_str().unwrap();
    // Formerly hung forever waiting for a writer.
    refused(
        &["record", "--config", f],
        &format!("cannot read config {f}: not a regular file"),
    );
    let _ = std::fs::remove_file(&fifo);
    let big = std::env::temp_dir().join(format!("ka-big-{}.toml", std::process::id()));
    let mut text = String::from("[thresholds]\n");
    while text.len() <= 1 << 20 {
        text.push_str("# padding padding padding padding padding padding padding\n");
    }
    std::fs::write(&big, text).unwrap();
    let b = big.to_str().unwrap();
    refused(
        &["snapshot", "--config", b],
        &format!("cannot read config {b}: larger than 1024 KiB"),
    );
    std::fs::write(&big, b"[thresholds]\n# caf\xe9\n").unwrap();
    refused(
        &["snapshot", "--config", b],
        &format!("{b}:2: not UTF-8 text"),
    );
    let _ = std::fs::remove_file(&big);
}
