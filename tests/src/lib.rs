//! Helpers for the root integration tests: network namespaces joined by a
//! veth pair, nftables black holes, the kernel's own per-namespace counters,
//! sockets opened inside a namespace, and the `keepalive` binary run as a
//! child process.
//!
//! Everything here talks to the live kernel. A missing prerequisite (not
//! root, no binary, no `ip`/`nft`) is a test failure with a message saying
//! what to do, never a silent skip.

pub mod daemon;
pub mod http;

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Fails the test unless we are root and have the tools the tests need.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "integration tests need root (network namespaces, nftables, eBPF): run `cargo xtask test` as root"
    );
    for tool in ["ip", "nft", "ss"] {
        let ok = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        assert!(
            ok,
            "`{tool}` not found: run `cargo xtask setup` (installs iproute2 and nftables)"
        );
    }
    assert!(
        Path::new("/sys/kernel/btf/vmlinux").exists(),
        "the kernel has no BTF (/sys/kernel/btf/vmlinux); keepalive needs CONFIG_DEBUG_INFO_BTF=y"
    );
}

/// The `keepalive` binary under test: $KEEPALIVE_BIN, else target/release.
pub fn keepalive_bin() -> PathBuf {
    let p = std::env::var_os("KEEPALIVE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .unwrap()
                .join("target/release/keepalive")
        });
    assert!(
        p.is_file(),
        "{} not found: build it with `cargo xtask build --release` or run `cargo xtask test`",
        p.display()
    );
    p
}

pub fn run(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!(
            "ka-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run(&format!("ip netns add {name}"));
        let ns = Netns { name };
        ns.exec("ip link set lo up");
        ns
    }

    /// Runs a shell command inside the namespace.
    pub fn exec(&self, cmd: &str) -> String {
        run(&format!("ip netns exec {} sh -c '{}'", self.name, cmd))
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        self.exec(&format!("sysctl -qw {key}={value}"));
    }

    /// Inode of the namespace, as the monitor reports it in `netns`.
    pub fn inode(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/run/netns/{}", self.name))
            .unwrap()
            .ino()
    }

    /// Runs `f` on a thread that has joined this namespace; sockets it
    /// creates live in the namespace.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let fd = File::open(&path).unwrap();
            // SAFETY: setns on a valid namespace fd affects only this thread.
            let r = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    }

    /// The kernel's TCP counters in this namespace: `Tcp.RetransSegs`,
    /// `TcpExt.TCPKeepAlive`, ... from /proc/net/snmp and /proc/net/netstat.
    pub fn counters(&self) -> Counters {
        let mut map = HashMap::new();
        for file in ["/proc/net/snmp", "/proc/net/netstat"] {
            let text = self.exec(&format!("cat {file}"));
            let lines: Vec<&str> = text.lines().collect();
            for pair in lines.chunks(2) {
                if pair.len() < 2 {
                    continue;
                }
                let names: Vec<&str> = pair[0].split_whitespace().collect();
                let values: Vec<&str> = pair[1].split_whitespace().collect();
                let prefix = names[0].trim_end_matches(':');
                for (n, v) in names.iter().zip(&values).skip(1) {
                    map.insert(format!("{prefix}.{n}"), v.parse::<i64>().unwrap_or(0));
                }
            }
        }
        Counters(map)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[derive(Clone, Debug)]
pub struct Counters(pub HashMap<String, i64>);

impl Counters {
    pub fn get(&self, key: &str) -> i64 {
        *self
            .0
            .get(key)
            .unwrap_or_else(|| panic!("kernel counter {key} not found"))
    }

    /// `after - self` for `key`.
    pub fn delta(&self, after: &Counters, key: &str) -> i64 {
        after.get(key) - self.get(key)
    }
}

static SUBNET: AtomicU32 = AtomicU32::new(0);

/// Two namespaces `a` and `b` joined by a veth pair, with addresses
/// 198.18.N.1 / 198.18.N.2 and fd00:ka:N::1 / ::2 (test-only ranges).
pub struct Pair {
    pub a: Netns,
    pub b: Netns,
    pub a4: String,
    pub b4: String,
    pub a6: String,
    pub b6: String,
}

impl Pair {
    pub fn new(tag: &str) -> Pair {
        let a = Netns::new(&format!("{tag}a"));
        let b = Netns::new(&format!("{tag}b"));
        let n = (std::process::id() + SUBNET.fetch_add(1, Ordering::Relaxed)) % 250;
        let (va, vb) = (format!("kva{n}"), format!("kvb{n}"));
        run(&format!(
            "ip link add {va} netns {} type veth peer name {vb} netns {}",
            a.name, b.name
        ));
        let (a4, b4) = (format!("198.18.{n}.1"), format!("198.18.{n}.2"));
        let (a6, b6) = (format!("fd00:ca:{n}::1"), format!("fd00:ca:{n}::2"));
        a.exec(&format!(
            "ip addr add {a4}/24 dev {va} && ip -6 addr add {a6}/64 dev {va} nodad && ip link set {va} up"
        ));
        b.exec(&format!(
            "ip addr add {b4}/24 dev {vb} && ip -6 addr add {b6}/64 dev {vb} nodad && ip link set {vb} up"
        ));
        Pair {
            a,
            b,
            a4,
            b4,
            a6,
            b6,
        }
    }
}

/// Drops every TCP packet arriving in `ns` (a silent peer / black hole),
/// optionally only for one destination port.
pub fn blackhole(ns: &Netns, dport: Option<u16>) {
    let rule = match dport {
        Some(p) => format!("tcp dport {p} drop"),
        None => "meta l4proto tcp drop".to_string(),
    };
    ns.exec(&format!(
        "nft add table inet ka && nft \"add chain inet ka in {{ type filter hook input priority 0; policy accept; }}\" && nft add rule inet ka in {rule}"
    ));
}

pub fn unblackhole(ns: &Netns) {
    ns.exec("nft delete table inet ka");
}

fn setsockopt_int(fd: i32, level: i32, opt: i32, v: i32) {
    // SAFETY: valid fd and a pointer to an int of the given size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&v as *const i32).cast(),
            size_of::<i32>() as u32,
        )
    };
    assert_eq!(
        r,
        0,
        "setsockopt {level}/{opt}: {}",
        std::io::Error::last_os_error()
    );
}

/// Turns keepalive on with the given idle/interval (seconds) and count.
pub fn set_keepalive(s: &TcpStream, idle: i32, intvl: i32, cnt: i32) {
    let fd = s.as_raw_fd();
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, idle);
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, intvl);
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, cnt);
}

pub fn set_user_timeout(s: &TcpStream, ms: i32) {
    setsockopt_int(s.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, ms);
}

/// SO_LINGER {on, 0}: close() sends a reset.
pub fn set_linger_zero(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd and linger struct.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            size_of::<libc::linger>() as u32,
        )
    };
    assert_eq!(r, 0);
}

/// The kernel's socket cookie (SO_COOKIE), the id the monitor reports.
pub fn cookie(fd: &impl AsRawFd) -> u64 {
    let mut v: u64 = 0;
    let mut len = size_of::<u64>() as u32;
    // SAFETY: valid fd, pointer and length.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut v as *mut u64).cast(),
            &mut len,
        )
    };
    assert_eq!(r, 0, "SO_COOKIE: {}", std::io::Error::last_os_error());
    v
}

/// A connected client (in `pair.a`) and its accepted peer (in `pair.b`).
pub struct Conn {
    pub client: TcpStream,
    pub server: TcpStream,
    pub listener: TcpListener,
}

pub fn listen(ns: &Netns, addr: &str) -> TcpListener {
    let addr: SocketAddr = addr.parse().unwrap();
    ns.enter(move || TcpListener::bind(addr).unwrap())
}

pub fn connect_in(ns: &Netns, to: SocketAddr) -> std::io::Result<TcpStream> {
    ns.enter(move || TcpStream::connect_timeout(&to, Duration::from_secs(5)))
}

/// Connects from `a` to a fresh listener in `b` on `b_addr` (`ip` or `[ip6]`).
pub fn connect_pair(pair: &Pair, b_ip: &str) -> Conn {
    let listener = listen(&pair.b, &format!("{b_ip}:0"));
    let to = listener.local_addr().unwrap();
    let client = connect_in(&pair.a, to).unwrap();
    let (server, _) = listener.accept().unwrap();
    Conn {
        client,
        server,
        listener,
    }
}

/// A running `keepalive record --format json`, writing to a file.
pub struct Monitor {
    child: Option<Child>,
    out: PathBuf,
    stderr_rx: mpsc::Receiver<String>,
    pub stderr: Vec<String>,
}

impl Monitor {
    /// Starts the monitor and waits for its "hooks attached" line.
    pub fn start(extra: &[&str]) -> Monitor {
        require_root();
        let out = std::env::temp_dir().join(format!(
            "keepalive-test-{}-{}.jsonl",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let mut child = Command::new(keepalive_bin())
            .args(["record", "--format", "json", "--output"])
            .arg(&out)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start keepalive");
        let rx = line_channel(child.stderr.take().unwrap());
        let mut m = Monitor {
            child: Some(child),
            out,
            stderr_rx: rx,
            stderr: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match m.stderr_rx.recv_timeout(left) {
                Ok(line) => {
                    let ready = line.contains("hooks attached");
                    m.stderr.push(line);
                    if ready {
                        return m;
                    }
                }
                Err(_) => {
                    let status = m.child.as_mut().unwrap().try_wait().ok().flatten();
                    panic!(
                        "keepalive did not report its hooks attached (exit {status:?}); stderr: {:?}",
                        m.stderr
                    );
                }
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends `sig` and waits for exit; returns the events written.
    pub fn stop_with(&mut self, sig: i32) -> Vec<Value> {
        let mut child = self.child.take().expect("monitor already stopped");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, sig) };
        let status = child.wait().unwrap();
        while let Ok(line) = self.stderr_rx.recv_timeout(Duration::from_secs(5)) {
            self.stderr.push(line);
        }
        if sig == libc::SIGTERM || sig == libc::SIGINT {
            assert!(
                status.success(),
                "keepalive exited with {status}; stderr: {:?}",
                self.stderr
            );
        }
        self.events()
    }

    pub fn stop(&mut self) -> Vec<Value> {
        self.stop_with(libc::SIGTERM)
    }

    /// Stops and checks that the kernel dropped nothing, so that exact
    /// comparisons with kernel counters fail for the right reason.
    pub fn stop_lossless(&mut self) -> Vec<Value> {
        let events = self.stop();
        assert_eq!(
            self.summary("lost"),
            0,
            "the ring buffer overflowed during the test: {:?}",
            self.stderr
        );
        events
    }

    /// Events written so far.
    pub fn events(&self) -> Vec<Value> {
        let mut text = String::new();
        if let Ok(mut f) = File::open(&self.out) {
            f.read_to_string(&mut text).unwrap();
        }
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
            .collect()
    }

    /// `key=value` from the final "stopped" line on stderr.
    pub fn summary(&self, key: &str) -> u64 {
        let line = self
            .stderr
            .iter()
            .find(|l| l.contains("stopped;"))
            .unwrap_or_else(|| panic!("no summary line in stderr: {:?}", self.stderr));
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .and_then(|v| v.trim_end_matches(',').parse().ok())
            .unwrap_or_else(|| panic!("no {key}= in {line}"))
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.out);
    }
}

/// Events of `kind` in namespace `netns`.
pub fn of_kind<'a>(events: &'a [Value], netns: u64, kind: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["event"] == kind && e["netns"].as_u64() == Some(netns))
        .collect()
}

/// Names of the BPF programs currently loaded whose name starts with `ka_`.
pub fn loaded_keepalive_programs() -> Vec<String> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter_map(|p| p.name_as_str().map(str::to_string))
        .filter(|n| n.starts_with("ka_"))
        .collect()
}

/// Waits up to `limit` for `cond`, polling.
pub fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

/// IDs of the BPF programs a process holds open (from /proc/PID/fdinfo).
pub fn prog_ids_held_by(pid: u32) -> Vec<u32> {
    let mut ids = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return ids;
    };
    for e in dir.flatten() {
        if let Ok(text) = std::fs::read_to_string(e.path())
            && let Some(id) = text
                .lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|v| v.trim().parse().ok())
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// IDs of every BPF program loaded in the kernel.
pub fn loaded_prog_ids() -> Vec<u32> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| p.id())
        .collect()
}

/// Kernel-side filter to the addresses [`Pair`] uses, so that a busy host
/// cannot crowd the test's events out of the ring buffer.
pub const PAIR_ONLY: [&str; 4] = ["--addr", "198.18.0.0/15", "--addr", "fd00:ca::/32"];

/// Lines read from `r` on a thread, until it closes (the child exits).
pub fn line_channel(r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}
