//! Shared helpers of the `snapshot_*` integration tests: running
//! `keepalive snapshot` bounded, reading `ss -tinoe` in a namespace, the
//! `ka-peer` child modes, and (in [`scenarios`]) the connections put into
//! each state the verdict rules know.
//!
//! Each test binary uses only part of this, hence unused helpers and
//! re-exports are allowed.

#![allow(dead_code, unused_imports)]

pub mod scenarios;

pub use scenarios::*;
pub use std::collections::{BTreeMap, BTreeSet};
pub use std::io::{Read, Write};
pub use std::net::{Shutdown, TcpListener, TcpStream};
pub use std::process::{Command, Output, Stdio};
pub use std::time::{Duration, Instant};

pub use keepalive_tests::testkit::sock;
pub use keepalive_tests::*;
pub use serde_json::Value;

// ---------------------------------------------------------------------
// Running commands, bounded.

/// Runs `cmd` to completion, killing it (and failing) after `limit`.
pub fn output_within(mut cmd: Command, limit: Duration) -> Output {
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
pub fn snapshot(args: &[&str]) -> Vec<Value> {
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
pub type Key = (u64, u16, u16);

pub fn key(row: &Value) -> Key {
    (
        row["netns"].as_u64().unwrap(),
        row["sport"].as_u64().unwrap() as u16,
        row["dport"].as_u64().unwrap() as u16,
    )
}

/// Rows of namespaces `ns`, by connection end; each end appears once.
pub fn by_key(rows: &[Value], ns: &[u64]) -> BTreeMap<Key, Value> {
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

pub fn self_comm() -> String {
    std::fs::read_to_string("/proc/self/comm")
        .unwrap()
        .trim_end()
        .to_string()
}

pub fn comm_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap()
        .trim_end()
        .to_string()
}

pub fn local_port(s: &TcpStream) -> u16 {
    s.local_addr().unwrap().port()
}

pub fn peer_port(s: &TcpStream) -> u16 {
    s.peer_addr().unwrap().port()
}

/// Owners of a row as (pid, comm), sorted.
pub fn owners(row: &Value) -> Vec<(u32, String)> {
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
pub struct Ss {
    pub state: String,
    pub recv_q: u64,
    pub send_q: u64,
    pub sport: u16,
    pub dport: u16,
    /// `timer:(kind,expiry,n)`: kind, expiry in ms, the resolution of the
    /// printed expiry in ms, n (retransmits for `on`, probes otherwise).
    pub timer: Option<(String, u64, u64, u64)>,
    pub ino: u64,
    /// `sk:` is the socket cookie in hex.
    pub cookie: u64,
    pub total_retrans: u64,
    pub backoff: u64,
    pub rto_ms: Option<f64>,
    pub lastsnd: u64,
    pub lastrcv: u64,
    pub lastack: u64,
    /// The `-i` line was there (full sockets only).
    pub info: bool,
}

/// ss's `print_ms_timer`: `296ms`, `1.200ms` (1.2 s), `9sec`, `59sec`,
/// `1min2sec`, `12min`; returns (ms, resolution ms) - the true value is in
/// [ms, ms + resolution).
pub fn parse_ss_ms(s: &str) -> (u64, u64) {
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

pub fn port_of(endpoint: &str) -> u16 {
    endpoint.rsplit(':').next().unwrap().parse().unwrap()
}

pub fn parse_ss(text: &str) -> Vec<Ss> {
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
pub fn ss(ns: &Netns) -> BTreeMap<(u16, u16), Ss> {
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
pub fn ss_state(s: &str) -> String {
    match s {
        "ESTAB" => "ESTABLISHED".into(),
        "SYN-RECV" => "SYN_RECV".into(),
        s => s.replace("FIN-WAIT-", "FIN_WAIT").replace('-', "_"),
    }
}

/// The snapshot's timer kind for an ss timer name.
pub fn ss_timer_kind(s: &str) -> &'static str {
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
pub const CONNECT_AND_EXIT: &str = "connect-exit";
pub const CONNECT_AND_HOLD: &str = "connect-hold";
pub const CONNECT_AND_HOLD_FORKED: &str = "connect-hold-fork";
pub const CONNECT_AND_LEAK: &str = "connect-leak";

/// `x` lies between the two observations (in either order), with `slack`.
pub fn between(x: u64, a: u64, b: u64, slack: u64) -> bool {
    x + slack >= a.min(b) && x <= a.max(b) + slack
}
