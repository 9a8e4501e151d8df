//! Least privilege: once attached, a running `record` keeps only the
//! capabilities its walks need (without the table only CAP_BPF, for the
//! ring of a CPU brought online later), in every set, with
//! NoNewPrivs set, and `check` says which.

use std::process::Command;

use keepalive_tests::*;

/// `Key:` of /proc/PID/status.
fn status(pid: u32, key: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// CAP_DAC_READ_SEARCH | CAP_SYS_PTRACE | CAP_SYS_ADMIN.
const WALK_CAPS: &str = "0000000000280004";

#[test]
fn a_running_record_keeps_only_what_its_walks_need() {
    let pair = Pair::new("caps");
    let mut mon = Monitor::start(&["--refresh", "1s", PAIR_ONLY[0], PAIR_ONLY[1]]);
    let pid = mon.pid();
    // Dropped right after the ready line (consumers attach first).
    assert!(wait_for(std::time::Duration::from_secs(5), || status(
        pid, "CapEff"
    )
        == WALK_CAPS));
    // Every thread of the process, not just the first.
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let tid: u32 = task.unwrap().file_name().to_str().unwrap().parse().unwrap();
        for key in ["CapEff", "CapPrm", "CapBnd"] {
            assert_eq!(status(tid, key), WALK_CAPS, "{key} of thread {tid}");
        }
        assert_eq!(status(tid, "CapInh"), "0000000000000000");
        assert_eq!(status(tid, "CapAmb"), "0000000000000000");
        assert_eq!(status(tid, "NoNewPrivs"), "1");
    }
    // The walks still work with what is left: a new connection is found
    // by a refresh and its verdict reported.
    let c = connect_pair(&pair, &pair.b4);
    let ck = cookie(&c.client);
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let events = mon.stop_lossless();
    assert!(mon.summary("tracked") > 0, "{:?}", mon.stderr);
    assert!(
        events.iter().any(|e| e["cookie"] == ck),
        "no event for the new connection"
    );
    drop(c);
}

/// CAP_BPF (39): the event ring of a CPU brought online later.
const RING_CAPS: &str = "0000008000000000";

#[test]
fn without_the_table_only_what_makes_a_ring_is_kept() {
    let mut mon = Monitor::start(&["--refresh", "0", PAIR_ONLY[0], PAIR_ONLY[1]]);
    let pid = mon.pid();
    assert!(wait_for(std::time::Duration::from_secs(5), || status(
        pid, "CapEff"
    )
        == RING_CAPS));
    for key in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(status(pid, key), RING_CAPS, "{key}");
    }
    assert_eq!(status(pid, "NoNewPrivs"), "1");
    mon.stop_lossless();
}

#[test]
fn check_reports_the_capabilities_it_keeps() {
    require_root();
    let out = Command::new(keepalive_bin()).arg("check").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("ok   privileges after attach")
                && l.contains("keeps CAP_DAC_READ_SEARCH, CAP_SYS_PTRACE, CAP_SYS_ADMIN")
                && l.contains("NoNewPrivs")),
        "{text}"
    );
}
