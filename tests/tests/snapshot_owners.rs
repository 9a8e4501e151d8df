//! `keepalive snapshot` owners, filters and flags against the live kernel:
//! owners of connections opened by child processes, the verdict, pid, port
//! and address filters, and the errors for bad flags.
//!
//! Every test makes its own namespaces and only looks at rows in them (by
//! the `netns` field or by port). Waits poll for the condition they need
//! and are bounded; child processes are killed on drop.

mod common;

use common::*;

// ---------------------------------------------------------------------
// 4. Owners.

#[test]
fn connections_opened_by_other_processes_list_their_owners() {
    require_root();
    let pair = Pair::new("ow");
    let (na, nb) = (pair.a.inode(), pair.b.inode());
    let l = listen(&pair.b, &format!("{}:0", pair.b4));
    let lp = l.local_addr().unwrap().port();
    let lps = lp.to_string();

    // One process holding its connection.
    let mut single = PeerProcess::spawn(&pair.a, CONNECT_AND_HOLD, &[&pair.b4, &lps]);
    let single_port = single.line()[0] as u16;
    let (single_srv, _) = l.accept().unwrap();
    // A socket shared by a process and its forked child.
    let mut shared = PeerProcess::spawn(&pair.a, CONNECT_AND_HOLD_FORKED, &[&pair.b4, &lps]);
    let line = shared.line();
    let (shared_port, forked) = (line[0] as u16, line[1]);
    let (shared_srv, _) = l.accept().unwrap();
    let (single_pid, parent_pid) = (single.pid(), shared.pid());
    let comm = comm_of(single_pid);
    assert_eq!(comm, PEER_COMM);

    let rows = snapshot(&["--port", &lps]);
    let got = by_key(&rows, &[na, nb]);
    assert_eq!(got.len(), 4, "{got:#?}");
    let me = (std::process::id(), self_comm());
    let r = &got[&(na, single_port, lp)];
    assert_eq!(owners(r), vec![(single_pid, comm.clone())], "{r}");
    assert_eq!(r["verdict"], "healthy", "{r}");
    let r = &got[&(na, shared_port, lp)];
    let mut both = vec![(parent_pid, comm_of(parent_pid)), (forked, comm_of(forked))];
    both.sort();
    assert_eq!(owners(r), both, "{r}");
    assert!(both.iter().all(|o| o.1 == PEER_COMM));
    assert_eq!(r["verdict"], "healthy", "{r}");
    for srv in [&single_srv, &shared_srv] {
        let r = &got[&(nb, lp, peer_port(srv))];
        assert_eq!(owners(r), vec![me.clone()], "{r}");
        assert_eq!(r["cookie"], cookie(srv));
    }

    // The parent exits: its child alone holds the socket now.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(parent_pid as i32, libc::SIGKILL) };
    shared.wait_exit(Duration::from_secs(10));
    let rows = snapshot(&["--port", &lps]);
    let r = &by_key(&rows, &[na])[&(na, shared_port, lp)];
    assert_eq!(owners(r), vec![(forked, PEER_COMM.to_string())], "{r}");
    assert_eq!(r["verdict"], "healthy", "{r}");
    drop(shared);
    drop(single);
}

/// The owners come from the kernel's `iter/task_file` walk, not from a
/// readlink of every /proc/PID/fd link (seconds at 100k connections), and
/// it finds the same processes /proc names: a child's socket and the
/// test's own.
#[test]
fn owners_are_found_by_the_kernel_walk() {
    require_root();
    let pair = Pair::new("kw");
    let (na, nb) = (pair.a.inode(), pair.b.inode());
    let l = listen(&pair.b, &format!("{}:0", pair.b4));
    let lp = l.local_addr().unwrap().port();
    let lps = lp.to_string();
    let mut peer = PeerProcess::spawn(&pair.a, CONNECT_AND_HOLD, &[&pair.b4, &lps]);
    let peer_port = peer.line()[0] as u16;
    let (srv, _) = l.accept().unwrap();

    let mut cmd = Command::new(keepalive_bin());
    cmd.args(["snapshot", "--format", "json", "--port", &lps])
        .env("RUST_LOG", "keepalive=debug");
    let out = output_within(cmd, Duration::from_secs(30));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("found by kernel walk"), "{log}");
    let rows: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let got = by_key(&rows, &[na, nb]);
    assert_eq!(got.len(), 2, "{got:#?}");
    let r = &got[&(na, peer_port, lp)];
    assert_eq!(owners(r), vec![(peer.pid(), comm_of(peer.pid()))], "{r}");
    let r = &got[&(nb, lp, peer_port)];
    assert_eq!(owners(r), vec![(std::process::id(), self_comm())], "{r}");
    drop(srv);
    drop(peer);
}

// ---------------------------------------------------------------------
// 5. Filters.

#[test]
fn filters_select_by_verdict_pid_port_and_address() {
    require_root();
    let pair = Pair::new("fl");
    let (na, nb) = (pair.a.inode(), pair.b.inode());
    // Dead: a silenced peer with an unanswered probe (and 100 probes
    // before the kernel gives up, so it stays dead throughout).
    let dead = connect_pair(&pair, &pair.b4);
    let dead_port = dead.listener.local_addr().unwrap().port();
    set_keepalive(&dead.client, 1, 1, 100);
    blackhole(&pair.b, Some(dead_port));
    // Held by a child process.
    let l = listen(&pair.b, &format!("{}:0", pair.b4));
    let lp = l.local_addr().unwrap().port();
    let mut py = PeerProcess::spawn(&pair.a, CONNECT_AND_HOLD, &[&pair.b4, &lp.to_string()]);
    let py_port = py.line()[0] as u16;
    let (_py_srv, _) = l.accept().unwrap();
    // Plain healthy connection over IPv6.
    let v6 = connect_pair(&pair, &format!("[{}]", pair.b6));
    let v6_port = v6.listener.local_addr().unwrap().port();

    let dead_key = (na, local_port(&dead.client), dead_port);
    let ok = wait_for(Duration::from_secs(10), || {
        ss(&pair.a)
            .get(&(dead_key.1, dead_key.2))
            .and_then(|r| r.timer.clone())
            .is_some_and(|t| t.0 == "keepalive" && t.3 >= 1)
    });
    assert!(ok, "no unanswered keepalive probe: {:#?}", ss(&pair.a));

    let ours = |rows: &[Value]| -> BTreeSet<Key> { by_key(rows, &[na, nb]).into_keys().collect() };
    let all = snapshot(&[]);
    assert_eq!(ours(&all).len(), 6, "{all:#?}");

    // --verdict: only rows with that verdict, from the whole host.
    let rows = snapshot(&["--verdict", "dead"]);
    assert!(rows.iter().all(|r| r["verdict"] == "dead"), "{rows:#?}");
    assert_eq!(ours(&rows), BTreeSet::from([dead_key]), "{rows:#?}");
    let rows = snapshot(&["--verdict", "healthy", "--verdict", "orphaned"]);
    assert!(
        rows.iter()
            .all(|r| r["verdict"] == "healthy" || r["verdict"] == "orphaned"),
        "{rows:#?}"
    );
    assert_eq!(ours(&rows).len(), 5, "{rows:#?}");
    assert!(!ours(&rows).contains(&dead_key));

    // --pid: only rows that pid holds.
    let rows = snapshot(&["--pid", &py.pid().to_string()]);
    assert_eq!(
        rows.iter().map(key).collect::<Vec<_>>(),
        vec![(na, py_port, lp)],
        "{rows:#?}"
    );
    assert_eq!(owners(&rows[0]), vec![(py.pid(), comm_of(py.pid()))]);
    let me = std::process::id().to_string();
    let rows = snapshot(&["--pid", &me]);
    assert!(
        rows.iter()
            .all(|r| owners(r).iter().any(|o| o.0 == std::process::id())),
        "{rows:#?}"
    );
    // The child's client end is not ours; the other five are.
    assert_eq!(ours(&rows).len(), 5, "{rows:#?}");
    assert!(!ours(&rows).contains(&(na, py_port, lp)));

    // --port: the local or the remote port, so both ends.
    let rows = snapshot(&["--port", &v6_port.to_string()]);
    assert!(
        rows.iter()
            .all(|r| r["sport"] == v6_port || r["dport"] == v6_port),
        "{rows:#?}"
    );
    assert_eq!(
        ours(&rows),
        BTreeSet::from([
            (na, local_port(&v6.client), v6_port),
            (nb, v6_port, local_port(&v6.client)),
        ])
    );
    let rows = snapshot(&["--port", &v6_port.to_string(), "--port", &lp.to_string()]);
    assert_eq!(ours(&rows).len(), 4, "{rows:#?}");
    // Filters combine: port and verdict.
    let rows = snapshot(&["--port", &dead_port.to_string(), "--verdict", "dead"]);
    assert_eq!(
        rows.iter().map(key).collect::<Vec<_>>(),
        vec![dead_key],
        "{rows:#?}"
    );

    // --addr: either address in the CIDR.
    let rows = snapshot(&["--addr", &format!("{}/128", pair.a6)]);
    assert!(
        rows.iter()
            .all(|r| r["saddr"] == pair.a6.as_str() || r["daddr"] == pair.a6.as_str()),
        "{rows:#?}"
    );
    assert_eq!(ours(&rows).len(), 2, "{rows:#?}");
    drop(py);
}

// ---------------------------------------------------------------------
// 6. Bad flags.

#[test]
fn bad_snapshot_flags_fail_with_a_clear_message() {
    let run = |args: &[&str]| {
        let mut cmd = Command::new(keepalive_bin());
        cmd.arg("snapshot").args(args);
        let out = output_within(cmd, Duration::from_secs(30));
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(out.stdout.is_empty(), "{args:?} printed rows");
        assert!(
            !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
            "{err}"
        );
        err
    };
    let err = run(&["--verdict", "zombie"]);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("zombie"), "{err}");
    assert!(
        err.contains("dead, orphaned, unprotected, healthy"),
        "{err}"
    );
    let err = run(&["--verdict", "dead", "--verdict", "Dead"]);
    assert!(err.contains("'Dead'"), "{err}");

    for flag in [
        "--idle-threshold",
        "--close-wait-threshold",
        "--middlebox-timeout",
    ] {
        let err = run(&[flag, "abc"]);
        assert!(err.contains("invalid duration"), "{flag}: {err}");
        assert!(err.contains(flag), "{flag}: {err}");
    }
    let err = run(&["--dead-retransmits", "many"]);
    assert!(err.contains("--dead-retransmits"), "{err}");
}
