//! A process picks its own name: one with a newline, a quote and a
//! terminal escape sequence, or with bytes that are not UTF-8, must not
//! split an event over two lines or reach a terminal raw, and `record` and
//! `snapshot` must show it the same way.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use keepalive_tests::testkit::MonitorChild;
use keepalive_tests::*;
use serde_json::Value;

/// A `ka-peer` that renamed itself and holds a connection until dropped.
struct Renamed {
    child: Child,
    port: u16,
}

impl Renamed {
    fn spawn(ns: &Netns, name: &[u8], host: &str, port: u16) -> Renamed {
        let hex: String = name.iter().map(|b| format!("{b:02x}")).collect();
        // ka-peer renames itself (prctl PR_SET_NAME) before connecting.
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(peer_bin())
            .args(["connect-hold", host, &port.to_string()])
            .env("KA_PEER_NAME_HEX", hex)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("cannot run ka-peer");
        let lines = line_channel(child.stdout.take().unwrap());
        let port = lines
            .recv_timeout(Duration::from_secs(15))
            .ok()
            .and_then(|l| l.trim().parse().ok());
        let Some(port) = port else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ka-peer did not connect");
        };
        Renamed { child, port }
    }
}

impl Drop for Renamed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `record` in text or json to a file, filtered to `port`.
struct Record {
    child: MonitorChild,
    out: std::path::PathBuf,
}

impl Record {
    fn start(format: &str, port: u16) -> Record {
        let out = std::env::temp_dir().join(format!(
            "ka-names-{format}-{}-{port}.out",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&out);
        let port = port.to_string();
        let args = [
            "record",
            "--format",
            format,
            "--refresh",
            "0",
            "--port",
            &port,
            "-o",
        ];
        let child = MonitorChild::start(
            &keepalive_bin(),
            args.map(std::ffi::OsStr::new)
                .into_iter()
                .chain([out.as_os_str()]),
            Duration::from_secs(30),
            || false,
        )
        .unwrap_or_else(|e| panic!("record did not start: {e:#}"));
        Record { child, out }
    }

    fn stop(mut self) -> String {
        let st = self
            .child
            .stop_with(libc::SIGTERM, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{e:#}"));
        assert!(st.success(), "{st}: {:?}", self.child.stderr);
        let text = std::fs::read_to_string(&self.out).unwrap();
        let _ = std::fs::remove_file(&self.out);
        text
    }
}

fn snapshot(args: &[&str]) -> String {
    let out = Command::new(keepalive_bin())
        .arg("snapshot")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("snapshot wrote bytes that are not UTF-8")
}

/// Checks one name end to end; `shown` is how text output must show it,
/// `json` what the JSON string must hold.
fn check_name(name: &[u8], shown: &str, json: &str) {
    require_root();
    let pair = Pair::new("nm");
    let l = listen(&pair.b, &format!("{}:0", pair.b4));
    let lp = l.local_addr().unwrap().port();
    let text = Record::start("text", lp);
    let jsonl = Record::start("json", lp);
    let client = Renamed::spawn(&pair.a, name, &pair.b4, lp);
    let (_srv, _) = l.accept().unwrap();
    let lps = lp.to_string();
    let snap_text = snapshot(&["--port", &lps]);
    let snap_json = snapshot(&["--port", &lps, "--format", "json"]);
    // Let the monitors drain the connect's events before stopping them.
    std::thread::sleep(Duration::from_millis(300));
    let rec_text = text.stop();
    let rec_json = jsonl.stop();
    let cport = client.port;
    drop(client);

    // record, text: every line is one event (starts with a timestamp), no
    // control character anywhere, the name escaped.
    let ours: Vec<&str> = rec_text
        .lines()
        .filter(|l| l.contains(&format!(":{} > ", cport)))
        .collect();
    assert!(!ours.is_empty(), "no event for the connection:\n{rec_text}");
    for l in rec_text.lines() {
        assert!(l.starts_with("20"), "a line that is not an event: {l:?}");
    }
    assert!(
        !rec_text.chars().any(|c| c.is_control() && c != '\n'),
        "{rec_text:?}"
    );
    assert!(
        ours.iter().any(|l| l.ends_with(&format!(" comm={shown}"))),
        "{shown} not in {ours:#?}"
    );
    // snapshot, text: the owner column shows the same escaped name.
    let row = snap_text
        .lines()
        .find(|l| {
            l.split_whitespace()
                .nth(2)
                .is_some_and(|local| local.ends_with(&format!(":{cport}")))
        })
        .unwrap_or_else(|| panic!("no row for port {}:\n{snap_text}", cport));
    assert!(row.contains(&format!(" {shown}/")), "{row:?} lacks {shown}");
    assert!(!snap_text.chars().any(|c| c.is_control() && c != '\n'));
    // JSON: both carry the same string.
    let rec_comms: Vec<String> = rec_json
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["sport"] == cport)
        .filter_map(|v| v["comm"].as_str().map(str::to_string))
        .collect();
    assert!(
        rec_comms.iter().any(|c| c == json),
        "{json:?} not in {rec_comms:?}"
    );
    let snap_comm = snap_json
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|v| v["sport"] == cport)
        .map(|v| v["owners"][0]["comm"].clone())
        .unwrap();
    assert_eq!(snap_comm, json, "{snap_json}");
}

#[test]
fn a_name_with_newline_quote_and_escape_sequence_stays_on_one_line() {
    check_name(
        b"a\nb\"c\x1b[31mX",
        "a\\nb\"c\\x1b[31mX",
        "a\nb\"c\x1b[31mX",
    );
}

#[test]
fn a_name_that_is_not_utf8_is_shown_alike_by_record_and_snapshot() {
    check_name(
        b"q\xff\xfez w",
        "q\\xff\\xfez\\x20w",
        "q\u{fffd}\u{fffd}z w",
    );
}
