//! `keepalive snapshot` against the live kernel: real connections between
//! two network namespaces put into each state the verdict rules know
//! (a live keepalive connection, a silenced peer, retransmissions into a
//! black hole, a FIN_WAIT2 orphan left by an exited process, CLOSE_WAIT
//! leaks, idle connections without keepalive, a zero window, unread data,
//! a socket no process holds), then one snapshot is checked connection by
//! connection: its exact verdict and reason, and its fields against what
//! `ss -tinoe` run in the same namespace and `getsockopt` in the owning
//! process say about the same socket. Owners of connections opened by
//! child processes, the filters and the errors for bad flags are checked
//! too.
//!
//! Every test makes its own namespaces and only looks at rows in them (by
//! the `netns` field or by port). Waits poll for the condition they need
//! and are bounded; child processes are killed on drop.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use keepalive_tests::testkit::sock;
use keepalive_tests::*;
use serde_json::Value;

// ---------------------------------------------------------------------
// Running commands, bounded.

/// Runs `cmd` to completion, killing it (and failing) after `limit`.
fn output_within(mut cmd: Command, limit: Duration) -> Output {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// `keepalive snapshot --format json ARGS`: one object per line.
fn snapshot(args: &[&str]) -> Vec<Value> {
    let mut cmd = Command::new(keepalive_bin());
    cmd.args(["snapshot", "--format", "json"]).args(args);
    let out = output_within(cmd, Duration::from_secs(30));
    assert!(
        out.status.success(),
        "keepalive snapshot {args:?} exited with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

/// A connection end: (netns inode, local port, remote port).
type Key = (u64, u16, u16);

fn key(row: &Value) -> Key {
    (
        row["netns"].as_u64().unwrap(),
        row["sport"].as_u64().unwrap() as u16,
        row["dport"].as_u64().unwrap() as u16,
    )
}

/// Rows of namespaces `ns`, by connection end; each end appears once.
fn by_key(rows: &[Value], ns: &[u64]) -> BTreeMap<Key, Value> {
    let mut map = BTreeMap::new();
    for r in rows
        .iter()
        .filter(|r| ns.contains(&r["netns"].as_u64().unwrap()))
    {
        let old = map.insert(key(r), r.clone());
        assert!(old.is_none(), "two rows for {:?}: {old:?} and {r}", key(r));
    }
    map
}

fn self_comm() -> String {
    std::fs::read_to_string("/proc/self/comm")
        .unwrap()
        .trim_end()
        .to_string()
}

fn comm_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap()
        .trim_end()
        .to_string()
}

fn local_port(s: &TcpStream) -> u16 {
    s.local_addr().unwrap().port()
}

fn peer_port(s: &TcpStream) -> u16 {
    s.peer_addr().unwrap().port()
}

/// Owners of a row as (pid, comm), sorted.
fn owners(row: &Value) -> Vec<(u32, String)> {
    let mut v: Vec<(u32, String)> = row["owners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["pid"].as_u64().unwrap() as u32,
                o["comm"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

// ---------------------------------------------------------------------
// `ss -tinoe` in a namespace.

/// One socket as `ss -tinoe` prints it.
#[derive(Clone, Debug, Default)]
struct Ss {
    state: String,
    recv_q: u64,
    send_q: u64,
    sport: u16,
    dport: u16,
    /// `timer:(kind,expiry,n)`: kind, expiry in ms, the resolution of the
    /// printed expiry in ms, n (retransmits for `on`, probes otherwise).
    timer: Option<(String, u64, u64, u64)>,
    ino: u64,
    /// `sk:` is the socket cookie in hex.
    cookie: u64,
    total_retrans: u64,
    backoff: u64,
    rto_ms: Option<f64>,
    lastsnd: u64,
    lastrcv: u64,
    lastack: u64,
    /// The `-i` line was there (full sockets only).
    info: bool,
}

/// ss's `print_ms_timer`: `296ms`, `1.200ms` (1.2 s), `9sec`, `59sec`,
/// `1min2sec`, `12min`; returns (ms, resolution ms) - the true value is in
/// [ms, ms + resolution).
fn parse_ss_ms(s: &str) -> (u64, u64) {
    let mut rest = s;
    let mut ms = 0;
    let mut res = 1;
    if let Some((m, r)) = rest.split_once("min") {
        let m: u64 = m.parse().unwrap();
        ms += m * 60_000;
        res = if m > 9 { 60_000 } else { 1000 };
        rest = r;
    }
    if let Some(x) = rest.strip_suffix("sec") {
        let secs: u64 = x.parse().unwrap();
        ms += secs * 1000;
        if secs > 9 {
            res = res.max(1000);
        }
    } else if let Some(x) = rest.strip_suffix("ms") {
        match x.split_once('.') {
            Some((secs, msecs)) => {
                ms += secs.parse::<u64>().unwrap() * 1000 + msecs.parse::<u64>().unwrap()
            }
            None => ms += x.parse::<u64>().unwrap(),
        }
    } else {
        assert!(rest.is_empty(), "unexpected ss time {s:?}");
    }
    (ms, res)
}

fn port_of(endpoint: &str) -> u16 {
    endpoint.rsplit(':').next().unwrap().parse().unwrap()
}

fn parse_ss(text: &str) -> Vec<Ss> {
    let mut rows: Vec<Ss> = Vec::new();
    for line in text.lines() {
        if line.starts_with(char::is_whitespace) {
            let Some(row) = rows.last_mut() else { continue };
            for w in line.split_whitespace() {
                row.info = true;
                let (k, v) = w.split_once(':').unwrap_or((w, ""));
                match k {
                    "retrans" => {
                        row.total_retrans = v.split('/').nth(1).unwrap().parse().unwrap();
                    }
                    "backoff" => row.backoff = v.parse().unwrap(),
                    "rto" => row.rto_ms = Some(v.parse().unwrap()),
                    "lastsnd" => row.lastsnd = v.parse().unwrap(),
                    "lastrcv" => row.lastrcv = v.parse().unwrap(),
                    "lastack" => row.lastack = v.parse().unwrap(),
                    _ => {}
                }
            }
            continue;
        }
        let w: Vec<&str> = line.split_whitespace().collect();
        if w.len() < 5 {
            continue;
        }
        let mut row = Ss {
            state: w[0].to_string(),
            recv_q: w[1].parse().unwrap(),
            send_q: w[2].parse().unwrap(),
            sport: port_of(w[3]),
            dport: port_of(w[4]),
            ..Ss::default()
        };
        for t in &w[5..] {
            if let Some(t) = t.strip_prefix("timer:(") {
                let f: Vec<&str> = t.trim_end_matches(')').split(',').collect();
                let (ms, res) = parse_ss_ms(f[1]);
                row.timer = Some((f[0].to_string(), ms, res, f[2].parse().unwrap()));
            } else if let Some(v) = t.strip_prefix("ino:") {
                row.ino = v.parse().unwrap();
            } else if let Some(v) = t.strip_prefix("sk:") {
                row.cookie = u64::from_str_radix(v, 16).unwrap();
            }
        }
        rows.push(row);
    }
    rows
}

/// `ss -tinoe` (all but listeners) in `ns`, by (local port, remote port).
fn ss(ns: &Netns) -> BTreeMap<(u16, u16), Ss> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name, "ss", "-tinoeH"]);
    // Every state but LISTEN (ss's default leaves out TIME-WAIT, SYN-RECV).
    cmd.args(["state", "all", "exclude", "listening"]);
    let out = output_within(cmd, Duration::from_secs(10));
    assert!(
        out.status.success(),
        "ss in {}: {}",
        ns.name,
        String::from_utf8_lossy(&out.stderr)
    );
    parse_ss(&String::from_utf8_lossy(&out.stdout))
        .into_iter()
        .map(|r| ((r.sport, r.dport), r))
        .collect()
}

/// The snapshot's state name for an ss state.
fn ss_state(s: &str) -> String {
    match s {
        "ESTAB" => "ESTABLISHED".into(),
        "SYN-RECV" => "SYN_RECV".into(),
        s => s.replace("FIN-WAIT-", "FIN_WAIT").replace('-', "_"),
    }
}

/// The snapshot's timer kind for an ss timer name.
fn ss_timer_kind(s: &str) -> &'static str {
    match s {
        "on" => "retransmit",
        "keepalive" => "keepalive",
        // iproute2 prints idiag_timer 4 (ICSK_TIME_PROBE0) as "persist";
        // some versions call it "probe".
        "persist" | "probe" => "zero_window_probe",
        other => panic!("unexpected ss timer kind {other}"),
    }
}

// ---------------------------------------------------------------------
// Child processes.

/// `ka-peer` modes (tests/src/bin/ka-peer.rs): connect to HOST PORT, print
/// the local port, then exit / hold the socket / fork and both hold it
/// (also printing the child's pid) / park it in flight on a unix socket
/// (SCM_RIGHTS, never received) and close its own fd, so the socket stays
/// open but no process has it in its fd table.
const CONNECT_AND_EXIT: &str = "connect-exit";
const CONNECT_AND_HOLD: &str = "connect-hold";
const CONNECT_AND_HOLD_FORKED: &str = "connect-hold-fork";
const CONNECT_AND_LEAK: &str = "connect-leak";

// ---------------------------------------------------------------------
// The scenarios.

/// One end of a connection and the verdict it must get with
/// `--idle-threshold 1s --close-wait-threshold 1s`.
struct End {
    what: String,
    netns: u64,
    sport: u16,
    dport: u16,
    /// The socket, when this test process holds it.
    sock: Option<TcpStream>,
    state: &'static str,
    verdict: &'static str,
    reason_code: &'static str,
}

impl End {
    fn key(&self) -> Key {
        (self.netns, self.sport, self.dport)
    }

    /// The verdict with the default thresholds (60 s idle and CLOSE_WAIT):
    /// nothing here has been idle or in CLOSE_WAIT that long.
    fn default_verdict(&self) -> (&'static str, &'static str) {
        match self.reason_code {
            "keepalive_off" | "keepalive_too_late" | "close_wait_leak" => ("healthy", "ok"),
            _ => (self.verdict, self.reason_code),
        }
    }
}

type Expect = (&'static str, &'static str, &'static str);

const HEALTHY: Expect = ("ESTABLISHED", "healthy", "ok");
const KEEPALIVE_OFF: Expect = ("ESTABLISHED", "unprotected", "keepalive_off");

struct Scenarios {
    ends: Vec<End>,
    _listeners: Vec<TcpListener>,
    _children: Vec<PeerProcess>,
    /// Set up; every scenario's last activity was before this.
    ready: Instant,
    pair: Pair,
}

impl Scenarios {
    fn end(&self, what: &str) -> &End {
        self.ends
            .iter()
            .find(|e| e.what == what)
            .unwrap_or_else(|| panic!("no end {what:?}"))
    }

    fn add(&mut self, what: &str, c: Conn, client: Expect, server: Expect) {
        let (na, nb) = (self.pair.a.inode(), self.pair.b.inode());
        let (cp, sp) = (local_port(&c.client), local_port(&c.server));
        self.ends.push(End {
            what: format!("{what}: client"),
            netns: na,
            sport: cp,
            dport: sp,
            sock: Some(c.client),
            state: client.0,
            verdict: client.1,
            reason_code: client.2,
        });
        self.ends.push(End {
            what: format!("{what}: server"),
            netns: nb,
            sport: sp,
            dport: cp,
            sock: Some(c.server),
            state: server.0,
            verdict: server.1,
            reason_code: server.2,
        });
        self._listeners.push(c.listener);
    }

    /// Every case in one pair of namespaces (clients in `a`, servers in
    /// `b`), with the verdict each end must get at `--idle-threshold 1s
    /// --close-wait-threshold 1s`:
    ///
    /// | case           | client (a)                      | server (b)                   |
    /// |----------------|---------------------------------|------------------------------|
    /// | live (IPv6)    | keepalive 1/1/5: healthy        | keepalive 1/1/5: healthy     |
    /// | silenced       | keepalive 1/1/5, peer black-holed: dead, probes_unanswered | no keepalive, idle: unprotected, keepalive_off |
    /// | retransmit     | 3000 bytes into a black hole: dead, retransmit_backoff | idle: unprotected, keepalive_off |
    /// | orphan         | child process closed and exited: FIN_WAIT2, orphaned, kernel_orphan | never closes: CLOSE_WAIT, orphaned, close_wait_leak |
    /// | close_wait     | shutdown(Write), still held: FIN_WAIT2, healthy | never closes: CLOSE_WAIT, orphaned, close_wait_leak |
    /// | idle           | no keepalive: unprotected, keepalive_off | the same                |
    /// | late_keepalive | keepalive 400/10/5: unprotected, keepalive_too_late | no keepalive: unprotected, keepalive_off |
    /// | unread         | keepalive 1/1/5, sent 1000 bytes: healthy | keepalive, never reads: healthy |
    /// | zero_window    | keepalive, window closed: healthy | keepalive, never reads: healthy |
    /// | leaked         | fd only in flight on a unix socket: orphaned, no_owner | idle: unprotected, keepalive_off |
    fn build(tag: &str) -> Scenarios {
        let pair = Pair::new(tag);
        // An orphan reaching FIN_WAIT2 stays a full socket (waiting on its
        // FIN_WAIT2 timer) only when tcp_fin_timeout exceeds 60 s; at the
        // default 60 s the kernel turns it into a timewait minisock at once
        // (see `fin_wait2_orphan_with_the_default_fin_timeout`).
        pair.a.sysctl("net.ipv4.tcp_fin_timeout", "120");
        let mut s = Scenarios {
            ends: Vec::new(),
            _listeners: Vec::new(),
            _children: Vec::new(),
            ready: Instant::now(),
            pair,
        };
        let (b4, b6) = (s.pair.b4.clone(), s.pair.b6.clone());

        // Live keepalive connection (IPv6), both ends probing a live peer.
        let c = connect_pair(&s.pair, &format!("[{b6}]"));
        set_keepalive(&c.client, 1, 1, 5);
        set_keepalive(&c.server, 1, 1, 5);
        s.add("live", c, HEALTHY, HEALTHY);

        // Silenced peer: the client's probes to this port are dropped. 60
        // probes keep it alive for the whole test, however slow the host.
        let c = connect_pair(&s.pair, &b4);
        set_keepalive(&c.client, 1, 1, 60);
        blackhole(&s.pair.b, Some(c.listener.local_addr().unwrap().port()));
        s.add(
            "silenced",
            c,
            ("ESTABLISHED", "dead", "probes_unanswered"),
            KEEPALIVE_OFF,
        );

        // Data into a black hole: RTO retransmissions back off.
        let c = connect_pair(&s.pair, &b4);
        blackhole(&s.pair.b, Some(c.listener.local_addr().unwrap().port()));
        (&c.client).write_all(&[7u8; 3000]).unwrap();
        s.add(
            "retransmit",
            c,
            ("ESTABLISHED", "dead", "retransmit_backoff"),
            KEEPALIVE_OFF,
        );

        // FIN_WAIT2 orphan: a child process connects, closes and exits;
        // the server never closes its end (which sits in CLOSE_WAIT).
        let l = listen(&s.pair.b, &format!("{b4}:0"));
        let lp = l.local_addr().unwrap().port();
        let mut py = PeerProcess::spawn(&s.pair.a, CONNECT_AND_EXIT, &[&b4, &lp.to_string()]);
        let cp = py.line()[0] as u16;
        assert!(py.wait_exit(Duration::from_secs(10)).success());
        let (server, _) = l.accept().unwrap();
        let na = s.pair.a.inode();
        s.ends.push(End {
            what: "orphan: client".into(),
            netns: na,
            sport: cp,
            dport: lp,
            sock: None,
            state: "FIN_WAIT2",
            verdict: "orphaned",
            reason_code: "kernel_orphan",
        });
        s.ends.push(End {
            what: "orphan: server".into(),
            netns: s.pair.b.inode(),
            sport: lp,
            dport: cp,
            sock: Some(server),
            state: "CLOSE_WAIT",
            verdict: "orphaned",
            reason_code: "close_wait_leak",
        });
        s._listeners.push(l);

        // CLOSE_WAIT leak: the client shuts down its side (and, still
        // holding the socket, sits in FIN_WAIT2); the server never closes.
        let c = connect_pair(&s.pair, &b4);
        c.client.shutdown(Shutdown::Write).unwrap();
        s.add(
            "close_wait",
            c,
            ("FIN_WAIT2", "healthy", "ok"),
            ("CLOSE_WAIT", "orphaned", "close_wait_leak"),
        );

        // Idle, keepalive off on both ends.
        let c = connect_pair(&s.pair, &b4);
        s.add("idle", c, KEEPALIVE_OFF, KEEPALIVE_OFF);

        // Keepalive on, but starting after the 350 s middlebox timeout.
        let c = connect_pair(&s.pair, &b4);
        set_keepalive(&c.client, 400, 10, 5);
        s.add(
            "late_keepalive",
            c,
            ("ESTABLISHED", "unprotected", "keepalive_too_late"),
            KEEPALIVE_OFF,
        );

        // Unread data: 1000 bytes sit in the server's receive queue.
        let c = connect_pair(&s.pair, &b4);
        set_keepalive(&c.client, 1, 1, 5);
        set_keepalive(&c.server, 1, 1, 5);
        (&c.client).write_all(&[1u8; 1000]).unwrap();
        s.add("unread", c, HEALTHY, HEALTHY);

        // Zero window: the server never reads, the client writes until its
        // send buffer is full and then probes the closed window.
        let c = connect_pair(&s.pair, &b4);
        set_keepalive(&c.client, 1, 1, 5);
        set_keepalive(&c.server, 1, 1, 5);
        c.client.set_nonblocking(true).unwrap();
        let chunk = vec![2u8; 65536];
        let mut sent = 0usize;
        loop {
            match (&c.client).write(&chunk) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("write: {e}"),
            }
            assert!(sent < 256 << 20, "the window never closed");
        }
        c.client.set_nonblocking(false).unwrap();
        s.add("zero_window", c, HEALTHY, HEALTHY);

        // No owner: a child parks the socket in flight on a unix socket.
        let l = listen(&s.pair.b, &format!("{b4}:0"));
        let lp = l.local_addr().unwrap().port();
        let mut py = PeerProcess::spawn(&s.pair.a, CONNECT_AND_LEAK, &[&b4, &lp.to_string()]);
        let cp = py.line()[0] as u16;
        let (server, _) = l.accept().unwrap();
        s.ends.push(End {
            what: "leaked: client".into(),
            netns: na,
            sport: cp,
            dport: lp,
            sock: None,
            state: "ESTABLISHED",
            verdict: "orphaned",
            reason_code: "no_owner",
        });
        s.ends.push(End {
            what: "leaked: server".into(),
            netns: s.pair.b.inode(),
            sport: lp,
            dport: cp,
            sock: Some(server),
            state: KEEPALIVE_OFF.0,
            verdict: KEEPALIVE_OFF.1,
            reason_code: KEEPALIVE_OFF.2,
        });
        s._listeners.push(l);
        s._children.push(py);

        // Wait until the closes and the zero window have happened.
        let (orphan, cw, zw) = (
            s.end("orphan: client").key(),
            s.end("close_wait: client").key(),
            s.end("zero_window: client").key(),
        );
        let ok = wait_for(Duration::from_secs(10), || {
            let a = ss(&s.pair.a);
            let st = |k: Key| a.get(&(k.1, k.2)).map(|r| r.state.clone());
            st(orphan).as_deref() == Some("FIN-WAIT-2")
                && st(cw).as_deref() == Some("FIN-WAIT-2")
                && a.get(&(zw.1, zw.2))
                    .and_then(|r| r.timer.as_ref())
                    .is_some_and(|t| t.0 == "persist" || t.0 == "probe")
        });
        assert!(ok, "scenarios did not settle: {:#?}", ss(&s.pair.a));
        s.ready = Instant::now();
        s
    }

    /// Waits until everything is past its threshold: idle > 1 s, at least
    /// one unanswered probe, three retransmissions.
    fn wait_until_judged(&self) {
        let (sil, rtx) = (
            self.end("silenced: client").key(),
            self.end("retransmit: client").key(),
        );
        let ok = wait_for(Duration::from_secs(10), || {
            if self.ready.elapsed() < Duration::from_millis(1200) {
                return false;
            }
            let a = ss(&self.pair.a);
            let timer = |k: Key| a.get(&(k.1, k.2)).and_then(|r| r.timer.clone());
            timer(sil).is_some_and(|t| t.0 == "keepalive" && t.3 >= 1)
                && timer(rtx).is_some_and(|t| t.0 == "on" && t.3 >= 3)
        });
        assert!(
            ok,
            "no unanswered probe / 3 retransmissions: {:#?}",
            ss(&self.pair.a)
        );
    }

    fn namespaces(&self) -> [u64; 2] {
        [self.pair.a.inode(), self.pair.b.inode()]
    }
}

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
// 2. Fields against ss.

/// `x` lies between the two observations (in either order), with `slack`.
fn between(x: u64, a: u64, b: u64, slack: u64) -> bool {
    x + slack >= a.min(b) && x <= a.max(b) + slack
}

#[test]
fn queues_timers_probes_and_retransmits_agree_with_ss() {
    require_root();
    let s = Scenarios::build("ss");
    s.wait_until_judged();
    let (na, nb) = (s.pair.a.inode(), s.pair.b.inode());
    // One jiffy at HZ=100, twice: both sides truncate jiffies to ms.
    const SLACK: u64 = 20;

    // ss, snapshot, ss: a value that is the same in both ss runs must be
    // exactly what the snapshot says; a counter must lie between them.
    let mut attempt = 0;
    let (before, rows, after, gap) = loop {
        attempt += 1;
        let timed = |ns: &Netns| {
            let t = Instant::now();
            (t, ss(ns), Instant::now())
        };
        let (b_a, b_b) = (timed(&s.pair.a), timed(&s.pair.b));
        let rows = snapshot(&[]);
        let (a_a, a_b) = (timed(&s.pair.a), timed(&s.pair.b));
        // Least and most time between the two ss runs, per namespace.
        let gap = [(&b_a, &a_a), (&b_b, &a_b)].map(|(b, a)| {
            (
                a.0.duration_since(b.2).as_millis() as u64,
                a.2.duration_since(b.0).as_millis() as u64,
            )
        });
        let (before, after) = ([b_a.1, b_b.1], [a_a.1, a_b.1]);
        let stable = (0..2).all(|i| {
            before[i].len() == after[i].len()
                && before[i].iter().all(|(k, b)| {
                    after[i].get(k).is_some_and(|a| {
                        (a.recv_q, a.send_q, &a.state) == (b.recv_q, b.send_q, &b.state)
                    })
                })
        });
        if stable {
            break (before, rows, after, gap);
        }
        assert!(attempt < 5, "queues kept moving: {before:#?} {after:#?}");
    };
    let got = by_key(&rows, &[na, nb]);

    // The same connection ends, minus what the snapshot leaves out.
    let mut seen = BTreeSet::new();
    for (i, ns) in [na, nb].into_iter().enumerate() {
        for (&(sport, dport), b) in &before[i] {
            if b.state == "TIME-WAIT" || b.state == "SYN-RECV" {
                continue;
            }
            let a = &after[i][&(sport, dport)];
            let k = (ns, sport, dport);
            seen.insert(k);
            let r = got
                .get(&k)
                .unwrap_or_else(|| panic!("ss shows {b:?} in {ns}; the snapshot does not"));
            let ctx = format!("{b:?}\n{a:?}\n{r}");
            let num = |f: &str| r[f].as_u64().unwrap_or_else(|| panic!("{f}: {ctx}"));

            assert_eq!(r["state"], ss_state(&b.state), "{ctx}");
            assert_eq!(num("ino"), b.ino, "ino: {ctx}");
            assert_eq!(num("cookie"), b.cookie, "cookie (ss sk:): {ctx}");
            assert_eq!(num("recv_queue"), b.recv_q, "Recv-Q: {ctx}");
            assert_eq!(num("send_queue"), b.send_q, "Send-Q: {ctx}");

            // The timer: kind, count (retransmits for `on`, probes for the
            // others) and expiry.
            match (&b.timer, &a.timer) {
                (None, None) => assert!(r["timer"].is_null(), "timer: {ctx}"),
                (Some(tb), Some(ta)) if tb.0 == ta.0 => {
                    let kind = ss_timer_kind(&tb.0);
                    assert_eq!(r["timer"]["kind"], kind, "timer kind: {ctx}");
                    let count = if kind == "retransmit" {
                        num("retransmits")
                    } else {
                        num("probes_out")
                    };
                    assert!(
                        between(count, tb.3, ta.3, 0),
                        "timer count {count} not between ss {} and {}: {ctx}",
                        tb.3,
                        ta.3
                    );
                    // Same timer instance (not re-armed in between: it
                    // came closer by the time between the ss runs): the
                    // snapshot's expiry lies between the two.
                    let (least, most) = gap[i];
                    let res = tb.2.max(ta.2);
                    let closer = tb.1 as i64 - ta.1 as i64;
                    if tb.3 == ta.3
                        && closer + (res + SLACK) as i64 >= least as i64
                        && closer <= (most + res + SLACK) as i64
                    {
                        let fires = r["timer"]["fires_in_ms"].as_i64().unwrap().max(0) as u64;
                        assert!(
                            fires + SLACK >= ta.1 && fires <= tb.1 + tb.2 + SLACK,
                            "fires_in_ms {fires} not within ss {}..{}: {ctx}",
                            ta.1,
                            tb.1 + tb.2
                        );
                    }
                }
                // A timer started or stopped between the two ss runs.
                _ => {}
            }
            if b.info && a.info {
                assert!(
                    between(num("total_retrans"), b.total_retrans, a.total_retrans, 0),
                    "total_retrans vs ss retrans:x/N: {ctx}"
                );
                if b.backoff == a.backoff {
                    assert_eq!(num("backoff"), b.backoff, "backoff: {ctx}");
                }
                if let (Some(rb), Some(ra)) = (b.rto_ms, a.rto_ms)
                    && rb == ra
                {
                    assert_eq!(num("rto_ms"), rb as u64, "rto: {ctx}");
                }
                for (field, vb, va) in [
                    ("last_send_ms", b.lastsnd, a.lastsnd),
                    ("last_recv_ms", b.lastrcv, a.lastrcv),
                    ("last_ack_ms", b.lastack, a.lastack),
                ] {
                    // Only while nothing happened in between: it grew by
                    // at least the time between the ss runs.
                    if va + SLACK >= vb + gap[i].0 {
                        assert!(
                            between(num(field), vb, va, SLACK),
                            "{field} not within ss {vb}..{va}: {ctx}"
                        );
                    }
                }
            }
        }
    }
    let all: BTreeSet<Key> = got.keys().copied().collect();
    assert_eq!(all, seen, "rows ss does not show");

    // The cases this is about, explicitly.
    let row = |what: &str| &got[&s.end(what).key()];
    let ss_of = |what: &str| {
        let e = s.end(what);
        let i = usize::from(e.netns == nb);
        &before[i][&(e.sport, e.dport)]
    };
    // Data into a black hole: Send-Q and a retransmit timer with retransmits.
    let r = row("retransmit: client");
    assert_eq!(
        (r["send_queue"].as_u64(), ss_of("retransmit: client").send_q),
        (Some(3000), 3000)
    );
    assert_eq!(r["timer"]["kind"], "retransmit");
    assert_eq!(ss_of("retransmit: client").timer.as_ref().unwrap().0, "on");
    assert!(r["retransmits"].as_u64().unwrap() >= 3, "{r}");
    assert!(r["total_retrans"].as_u64().unwrap() >= 3, "{r}");
    assert!(r["backoff"].as_u64().unwrap() >= 3, "{r}");
    // Unread data: Recv-Q.
    let r = row("unread: server");
    assert_eq!(
        (r["recv_queue"].as_u64(), ss_of("unread: server").recv_q),
        (Some(1000), 1000)
    );
    assert_eq!(row("unread: client")["send_queue"], 0);
    // Zero window: both queues, and the zero-window probe timer.
    let (c, sv) = (row("zero_window: client"), row("zero_window: server"));
    assert!(c["send_queue"].as_u64().unwrap() > 0, "{c}");
    assert!(sv["recv_queue"].as_u64().unwrap() > 0, "{sv}");
    assert_eq!(c["timer"]["kind"], "zero_window_probe", "{c}");
    // Keepalive: probes outstanding on the silenced client.
    let r = row("silenced: client");
    assert_eq!(r["timer"]["kind"], "keepalive");
    assert!(r["probes_out"].as_u64().unwrap() >= 1, "{r}");
    // The orphan: ino 0 in both, the FIN_WAIT2 timer shows as keepalive.
    let r = row("orphan: client");
    assert_eq!(
        (r["ino"].as_u64(), ss_of("orphan: client").ino),
        (Some(0), 0)
    );
    assert_eq!(r["timer"]["kind"], "keepalive", "{r}");
}

// ---------------------------------------------------------------------
// 3. Keepalive settings against getsockopt.

#[test]
fn keepalive_settings_agree_with_getsockopt() {
    require_root();
    let pair = Pair::new("ks");
    // Fallbacks come from the socket's own namespace: a's differ from b's
    // (which keeps the defaults 7200 s / 75 s / 9).
    pair.a.sysctl("net.ipv4.tcp_keepalive_time", "1234");
    pair.a.sysctl("net.ipv4.tcp_keepalive_intvl", "17");
    pair.a.sysctl("net.ipv4.tcp_keepalive_probes", "6");
    let (na, nb) = (pair.a.inode(), pair.b.inode());

    let own = connect_pair(&pair, &pair.b4);
    set_keepalive(&own.client, 7, 3, 4);
    let max = connect_pair(&pair, &format!("[{}]", pair.b6));
    set_keepalive(&max.client, 32767, 32767, 127);
    // SO_KEEPALIVE alone: everything from the namespace, on both ends.
    let sysctl = connect_pair(&pair, &pair.b4);
    sock::set_keepalive_enabled(&sysctl.client, true).unwrap();
    sock::set_keepalive_enabled(&sysctl.server, true).unwrap();
    // Only the idle time set: the rest from the namespace.
    let partial = connect_pair(&pair, &pair.b4);
    sock::set_keepalive_params(&partial.client, true, Some(45), None, None).unwrap();
    // Settings without SO_KEEPALIVE: off, settings still reported.
    let off = connect_pair(&pair, &pair.b4);
    sock::set_keepalive_params(&off.client, false, Some(50), None, Some(2)).unwrap();
    // Keepalive switched on, then off again.
    let toggled = connect_pair(&pair, &pair.b4);
    set_keepalive(&toggled.client, 9, 9, 9);
    sock::set_keepalive_enabled(&toggled.client, false).unwrap();

    let rows = snapshot(&[]);
    let got = by_key(&rows, &[na, nb]);
    let conns = [&own, &max, &sysctl, &partial, &off, &toggled];
    assert_eq!(got.len(), 2 * conns.len(), "{got:#?}");
    let mut checked = 0;
    for c in conns {
        for (s, ns) in [(&c.client, na), (&c.server, nb)] {
            let k = (ns, local_port(s), peer_port(s));
            let r = &got
                .get(&k)
                .unwrap_or_else(|| panic!("no row for {k:?}: {got:#?}"))["keepalive"];
            let k = sock::keepalive_settings(s).unwrap();
            let kernel = (
                k.enabled,
                k.idle_s * 1000,
                k.intvl_s * 1000,
                u64::from(k.probes),
            );
            let reported = (
                r["enabled"].as_bool().unwrap(),
                r["idle_ms"].as_u64().unwrap(),
                r["intvl_ms"].as_u64().unwrap(),
                r["probes"].as_u64().unwrap(),
            );
            assert_eq!(
                reported, kernel,
                "{k:?}: snapshot (enabled, idle_ms, intvl_ms, probes) vs getsockopt"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 12);

    // And the values themselves, so a getsockopt surprise cannot hide.
    let ka = |s: &TcpStream, ns: u64| {
        let r = &got[&(ns, local_port(s), peer_port(s))]["keepalive"];
        (
            r["enabled"].as_bool().unwrap(),
            r["idle_ms"].as_u64().unwrap(),
            r["intvl_ms"].as_u64().unwrap(),
            r["probes"].as_u64().unwrap(),
        )
    };
    assert_eq!(ka(&own.client, na), (true, 7_000, 3_000, 4));
    assert_eq!(ka(&max.client, na), (true, 32_767_000, 32_767_000, 127));
    assert_eq!(ka(&sysctl.client, na), (true, 1_234_000, 17_000, 6));
    assert_eq!(ka(&sysctl.server, nb), (true, 7_200_000, 75_000, 9));
    assert_eq!(ka(&partial.client, na), (true, 45_000, 17_000, 6));
    assert_eq!(ka(&off.client, na), (false, 50_000, 17_000, 2));
    assert_eq!(ka(&toggled.client, na), (false, 9_000, 9_000, 9));
    assert_eq!(ka(&own.server, nb), (false, 7_200_000, 75_000, 9));
}

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

// ---------------------------------------------------------------------
// The FIN_WAIT2 orphan at the default tcp_fin_timeout.

#[test]
fn fin_wait2_orphan_with_the_default_fin_timeout() {
    require_root();
    let pair = Pair::new("fw");
    pair.a.sysctl("net.ipv4.tcp_fin_timeout", "60");
    let na = pair.a.inode();
    let l = listen(&pair.b, &format!("{}:0", pair.b4));
    let lp = l.local_addr().unwrap().port();
    let mut py = PeerProcess::spawn(&pair.a, CONNECT_AND_EXIT, &[&pair.b4, &lp.to_string()]);
    let cp = py.line()[0] as u16;
    assert!(py.wait_exit(Duration::from_secs(10)).success());
    let (_server, _) = l.accept().unwrap();
    let ok = wait_for(Duration::from_secs(5), || {
        ss(&pair.a)
            .get(&(cp, lp))
            .is_some_and(|r| r.state == "FIN-WAIT-2")
    });
    // ss: `FIN-WAIT-2 0 0 ... timer:(timewait,59sec,0) ino:0`: with
    // tcp_fin_timeout <= 60 s the kernel keeps the orphan as a timewait
    // minisock in substate FIN_WAIT2 (tcp_rcv_state_process ->
    // tcp_time_wait(sk, TCP_FIN_WAIT2, tmo)).
    assert!(ok, "{:#?}", ss(&pair.a));
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
// `--all`: TIME_WAIT rows.

#[test]
fn time_wait_rows_with_all_agree_with_ss() {
    require_root();
    let pair = Pair::new("tw");
    let na = pair.a.inode();
    let c = connect_pair(&pair, &pair.b4);
    let (cp, lp) = (local_port(&c.client), local_port(&c.server));
    // The client closes first and ends in TIME_WAIT.
    drop(c.client);
    drop(c.server);
    let ok = wait_for(Duration::from_secs(5), || {
        ss(&pair.a)
            .get(&(cp, lp))
            .is_some_and(|r| r.state == "TIME-WAIT")
    });
    assert!(ok, "{:#?}", ss(&pair.a));
    let ss_row = ss(&pair.a)[&(cp, lp)].clone();

    // Hidden by default, listed with --all.
    let rows = snapshot(&["--port", &lp.to_string()]);
    assert!(by_key(&rows, &[na]).is_empty(), "{rows:#?}");
    let rows = snapshot(&["--all", "--port", &lp.to_string()]);
    let got = by_key(&rows, &[na]);
    let r = got
        .get(&(na, cp, lp))
        .unwrap_or_else(|| panic!("TIME_WAIT {cp}->{lp} missing: {rows:#?}"));
    assert_eq!(r["state"], "TIME_WAIT", "{r}");
    assert_eq!(r["verdict"], "healthy", "{r}");
    assert_eq!(r["cookie"], ss_row.cookie, "cookie vs ss sk: {r}");
    assert_eq!(r["owners"], serde_json::json!([]), "{r}");
    // A timewait minisock has no inode, queues or retransmission state
    // (`ss`: `TIME-WAIT 0 0 ... ino:0`); nothing read at full-socket
    // offsets of the smaller struct may leak into the row.
    assert_eq!(
        (
            r["ino"].as_u64(),
            r["recv_queue"].as_u64(),
            r["send_queue"].as_u64()
        ),
        (Some(ss_row.ino), Some(ss_row.recv_q), Some(ss_row.send_q)),
        "ino/Recv-Q/Send-Q vs ss {ss_row:?}: {r}"
    );
    for f in [
        "probes_out",
        "retransmits",
        "total_retrans",
        "backoff",
        "user_timeout_ms",
    ] {
        assert_eq!(r[f], 0, "{f}: {r}");
    }
}
