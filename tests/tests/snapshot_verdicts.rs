//! `keepalive snapshot` verdicts against the live kernel: real connections
//! between two network namespaces put into each state the verdict rules
//! know (a live keepalive connection, a silenced peer, retransmissions into
//! a black hole, a FIN_WAIT2 orphan left by an exited process, CLOSE_WAIT
//! leaks, idle connections without keepalive, a zero window, unread data,
//! a socket no process holds), each checked for its exact verdict and
//! reason; and the FIN_WAIT2 orphan at the default `tcp_fin_timeout`.
//!
//! Every test makes its own namespaces and only looks at rows in them (by
//! the `netns` field or by port). Waits poll for the condition they need
//! and are bounded; child processes are killed on drop.

mod common;

use common::*;

// ---------------------------------------------------------------------
// 1. Verdicts.

#[test]
fn each_scenario_gets_exactly_its_verdict_and_nothing_else_is_flagged() {
    require_root();
    let s = Scenarios::build("vd");
    s.wait_until_judged();
    let rows = snapshot(&["--idle-threshold", "1s", "--close-wait-threshold", "1s"]);
    let got = by_key(&rows, &s.namespaces());

    // Exactly these connection ends exist in the two namespaces.
    let want: BTreeSet<Key> = s.ends.iter().map(End::key).collect();
    let have: BTreeSet<Key> = got.keys().copied().collect();
    assert_eq!(
        have,
        want,
        "unexpected rows: {:#?}\nmissing: {:?}",
        have.difference(&want).map(|k| &got[k]).collect::<Vec<_>>(),
        s.ends
            .iter()
            .filter(|e| !have.contains(&e.key()))
            .map(|e| &e.what)
            .collect::<Vec<_>>()
    );
    let me = (std::process::id(), self_comm());
    for e in &s.ends {
        let r = &got[&e.key()];
        let what = &e.what;
        assert_eq!(
            (r["state"].as_str(), r["verdict"].as_str()),
            (Some(e.state), Some(e.verdict)),
            "{what}: {r}"
        );
        assert_eq!(r["reason_code"], e.reason_code, "{what}: {r}");
        assert_eq!(r["v"], 1, "{what}: {r}");
        if let Some(sock) = &e.sock {
            assert_eq!(r["cookie"], cookie(sock), "{what}: cookie vs SO_COOKIE");
            assert_eq!(owners(r), vec![me.clone()], "{what}: {r}");
            assert_eq!(r["kernel_orphan"], false, "{what}: {r}");
            assert_ne!(r["ino"], 0, "{what}: {r}");
        }
        if e.verdict == "healthy" {
            assert_eq!(r["reason"], "ok", "{what}: {r}");
        }
    }

    let row = |what: &str| &got[&s.end(what).key()];
    let reason = |what: &str| row(what)["reason"].as_str().unwrap().to_string();

    let live = row("live: client");
    assert_eq!(live["saddr"], s.pair.a6.as_str());
    assert_eq!(live["daddr"], s.pair.b6.as_str());
    assert_eq!(live["keepalive"]["enabled"], true);
    assert_eq!(live["timer"]["kind"], "keepalive", "{live}");

    let sil = row("silenced: client");
    let n = sil["probes_out"].as_u64().unwrap();
    assert!(n >= 1, "{sil}");
    assert_eq!(sil["timer"]["kind"], "keepalive", "{sil}");
    assert!(
        reason("silenced: client").starts_with(&format!("{n} of 60 keepalive probes unanswered")),
        "{sil}"
    );

    let rtx = row("retransmit: client");
    let n = rtx["retransmits"].as_u64().unwrap();
    assert!(n >= 3, "{rtx}");
    assert_eq!(rtx["timer"]["kind"], "retransmit", "{rtx}");
    assert_eq!(rtx["send_queue"], 3000, "{rtx}");
    assert!(
        reason("retransmit: client").starts_with(&format!("{n} retransmissions without an ACK")),
        "{rtx}"
    );

    let orphan = row("orphan: client");
    assert_eq!(orphan["kernel_orphan"], true, "{orphan}");
    assert_eq!(orphan["owners"], serde_json::json!([]), "{orphan}");
    assert_eq!(orphan["ino"], 0, "{orphan}");
    assert!(
        reason("orphan: client")
            .contains("kernel holds it in FIN_WAIT2 waiting for the peer's FIN"),
        "{orphan}"
    );
    for what in ["orphan: server", "close_wait: server"] {
        assert!(reason(what).contains("CLOSE_WAIT leak"), "{}", row(what));
    }
    for what in ["idle: client", "idle: server", "retransmit: server"] {
        assert!(reason(what).contains("with keepalive off"), "{}", row(what));
        assert_eq!(row(what)["keepalive"]["enabled"], false);
    }
    assert!(
        reason("late_keepalive: client")
            .contains("keepalive starts after 400s, later than the 350s middlebox idle timeout"),
        "{}",
        row("late_keepalive: client")
    );
    let leaked = row("leaked: client");
    assert_eq!(leaked["owners"], serde_json::json!([]), "{leaked}");
    assert_eq!(leaked["kernel_orphan"], false, "{leaked}");
    assert_ne!(leaked["ino"], 0, "{leaked}");
    assert!(
        reason("leaked: client").contains("no process holds it"),
        "{leaked}"
    );

    // The same sockets with the default thresholds: only what does not
    // depend on them stays flagged.
    let rows = snapshot(&[]);
    let got = by_key(&rows, &s.namespaces());
    for e in &s.ends {
        let r = got
            .get(&e.key())
            .unwrap_or_else(|| panic!("{} missing with default thresholds: {rows:#?}", e.what));
        assert_eq!(
            (r["verdict"].as_str(), r["reason_code"].as_str()),
            (Some(e.default_verdict().0), Some(e.default_verdict().1)),
            "{} with default thresholds: {r}",
            e.what
        );
    }
}

// ---------------------------------------------------------------------
// The FIN_WAIT2 orphan at the default tcp_fin_timeout.

/// A FIN_WAIT2 orphan at the default `tcp_fin_timeout`, in namespace `a`
/// of `pair`: a process connected to `l` (in `b`), closed and exited.
struct Fw2Orphan {
    pair: Pair,
    na: u64,
    l: TcpListener,
    lp: u16,
    /// The orphan's local port.
    cp: u16,
    /// The server's end, held open so the orphan waits for its FIN.
    _server: TcpStream,
}

/// Makes a [`Fw2Orphan`] and waits until `ss` shows it in FIN-WAIT-2.
fn fin_wait2_orphan(tag: &str) -> Fw2Orphan {
    require_root();
    let pair = Pair::new(tag);
    pair.a.sysctl("net.ipv4.tcp_fin_timeout", "60");
    let na = pair.a.inode();
    let l = listen(&pair.b, &format!("{}:0", pair.b4));
    let lp = l.local_addr().unwrap().port();
    let mut py = PeerProcess::spawn(&pair.a, CONNECT_AND_EXIT, &[&pair.b4, &lp.to_string()]);
    let cp = py.line()[0] as u16;
    assert!(py.wait_exit(Duration::from_secs(10)).success());
    let (server, _) = l.accept().unwrap();
    let ok = wait_for(Duration::from_secs(5), || {
        ss(&pair.a)
            .get(&(cp, lp))
            .is_some_and(|r| r.state == "FIN-WAIT-2")
    });
    assert!(ok, "{:#?}", ss(&pair.a));
    Fw2Orphan {
        pair,
        na,
        l,
        lp,
        cp,
        _server: server,
    }
}

#[test]
fn fin_wait2_orphan_with_the_default_fin_timeout() {
    let o = fin_wait2_orphan("fw");
    let (pair, na, lp, cp) = (&o.pair, o.na, o.lp, o.cp);
    // ss: `FIN-WAIT-2 0 0 ... timer:(timewait,59sec,0) ino:0`: with
    // tcp_fin_timeout <= 60 s the kernel keeps the orphan as a timewait
    // minisock in substate FIN_WAIT2 (tcp_rcv_state_process ->
    // tcp_time_wait(sk, TCP_FIN_WAIT2, tmo)).
    let ss_row = ss(&pair.a)[&(cp, lp)].clone();
    assert_eq!((ss_row.ino, ss_row.recv_q, ss_row.send_q), (0, 0, 0));

    let rows = snapshot(&["--port", &lp.to_string()]);
    let got = by_key(&rows, &[na]);
    // A timewait minisock whose skc_state reads TIME_WAIT (substate
    // FIN_WAIT2): it must still be reported as the FIN_WAIT2 orphan it is,
    // like `ss` (FIN-WAIT-2, ino:0, queues 0).
    let r = got.get(&(na, cp, lp)).unwrap_or_else(|| {
        panic!("FIN_WAIT2 orphan {cp}->{lp} (ss: {ss_row:?}) missing from the snapshot: {rows:#?}")
    });
    assert_eq!(r["state"], "FIN_WAIT2", "{r}");
    assert_eq!(r["verdict"], "orphaned", "{r}");
    assert_eq!(r["reason_code"], "kernel_orphan", "{r}");
    assert_eq!(r["kernel_orphan"], true, "{r}");
    assert_eq!(r["owners"], serde_json::json!([]), "{r}");
    assert_eq!(
        (
            r["ino"].as_u64(),
            r["recv_queue"].as_u64(),
            r["send_queue"].as_u64()
        ),
        (Some(0), Some(0), Some(0)),
        "{r}"
    );
    assert!(r["reason"].as_str().unwrap().contains("FIN_WAIT2"), "{r}");
}

// ---------------------------------------------------------------------
// The monitor's walks keep what its table tracks, and only that.

/// The monitor's socket walks skip TIME_WAIT and request sockets in the
/// kernel (`Config::walk_tracked_only`; its table would drop them), but
/// not the FIN_WAIT2 orphan kept as a timewait minisock: `record
/// --table-dump` still judges that one, while a TIME_WAIT socket next to
/// it is in `snapshot --all` (whose walk writes every socket) and not in
/// the table.
#[test]
fn the_monitors_walks_keep_the_fin_wait2_orphan_and_skip_time_wait() {
    let o = fin_wait2_orphan("tw");
    let (pair, na, lp, cp) = (&o.pair, o.na, o.lp, o.cp);
    // TIME_WAIT beside it: the client closes first, then the server.
    let closed = connect_in(&pair.a, o.l.local_addr().unwrap()).unwrap();
    let tw_port = closed.local_addr().unwrap().port();
    let (server, _) = o.l.accept().unwrap();
    drop(closed);
    drop(server);
    let ok = wait_for(Duration::from_secs(5), || {
        ss(&pair.a)
            .get(&(tw_port, lp))
            .is_some_and(|r| r.state == "TIME-WAIT")
    });
    assert!(ok, "{:#?}", ss(&pair.a));
    let all = snapshot(&["--all", "--port", &lp.to_string()]);
    let got = by_key(&all, &[na]);
    assert_eq!(got[&(na, tw_port, lp)]["state"], "TIME_WAIT", "{all:#?}");

    let dump = std::env::temp_dir().join(format!("ka-tw-dump-{}.jsonl", std::process::id()));
    let port = lp.to_string();
    let mut m = Monitor::start(&[
        "--port",
        &port,
        "--refresh",
        "300ms",
        "--table-dump",
        dump.to_str().unwrap(),
    ]);
    // At least one refresh walk after the one at start.
    std::thread::sleep(Duration::from_millis(1000));
    m.stop();
    let text = std::fs::read_to_string(&dump).unwrap();
    let _ = std::fs::remove_file(&dump);
    let rows: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let table = by_key(&rows, &[na]);
    let r = table.get(&(na, cp, lp)).unwrap_or_else(|| {
        panic!("the FIN_WAIT2 orphan {cp}->{lp} is not in the table: {rows:#?}")
    });
    assert_eq!(r["state"], "FIN_WAIT2", "{r}");
    assert_eq!(r["verdict"], "orphaned", "{r}");
    assert_eq!(r["reason_code"], "kernel_orphan", "{r}");
    assert!(
        !table.contains_key(&(na, tw_port, lp)),
        "a TIME_WAIT socket in the table: {rows:#?}"
    );
}
