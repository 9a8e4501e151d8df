//! Helpers for the root integration tests: network namespaces joined by a
//! veth pair, nftables black holes, the kernel's own per-namespace counters,
//! sockets opened inside a namespace, and the `keepalive` binary run as a
//! child process.
//!
//! Everything here talks to the live kernel. A missing prerequisite (not
//! root, no binary, no `ip`/`nft`) is a test failure with a message saying
//! what to do, never a silent skip.

pub mod blind;
pub mod daemon;
pub mod http;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::{MonitorChild, NamedNetns, sock};

pub use blind::exact;
pub use testkit;
pub use testkit::line_channel;

/// Fails the test unless we are root and have the tools the tests need.
pub fn require_root() {
    assert!(
        testkit::is_root(),
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
    testkit::netns::sh(cmd).unwrap_or_else(|e| panic!("{e:#}"))
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// How long a starting monitor may take to say it is ready. Generous on
/// purpose: on a loaded 2-core machine the verifier and the first socket
/// walk (every TCP socket of the host, 400k of them while a memory bench
/// holds connections) took 20-30 s, and a readiness wait only costs time
/// when it fails.
pub const READY_WITHIN: Duration = Duration::from_secs(90);

/// A network namespace with `lo` up, deleted on drop; `name` and `path()`
/// come from the kit's [`NamedNetns`].
pub struct Netns(NamedNetns);

impl std::ops::Deref for Netns {
    type Target = NamedNetns;
    fn deref(&self) -> &NamedNetns {
        &self.0
    }
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!(
            "ka-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        Netns(NamedNetns::create(&name).unwrap_or_else(|e| panic!("{e:#}")))
    }

    /// Runs a shell command inside the namespace.
    pub fn exec(&self, cmd: &str) -> String {
        self.0.exec(cmd).unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        self.exec(&format!("sysctl -qw {key}={value}"));
    }

    /// Inode of the namespace, as the monitor reports it in `netns`.
    pub fn inode(&self) -> u64 {
        self.0.inode().unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Runs `f` on a thread that has joined this namespace; sockets it
    /// creates live in the namespace.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.0.enter(f).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Makes `n` loopback connections to a listener of its own on `port`
    /// inside the namespace, closing each right away (six or so state
    /// changes per connection). Returns the listener's cookie and every
    /// connection's client and server cookies.
    pub fn churn_loopback(&self, port: u16, n: usize) -> (u64, Vec<u64>) {
        self.churn_loopback_on(port, n, None)
    }

    /// [`Self::churn_loopback`] from a thread that runs only on CPU `cpu`
    /// (when given): loopback delivers a segment in the sender's context,
    /// so both ends' state changes happen on that CPU.
    pub fn churn_loopback_on(&self, port: u16, n: usize, cpu: Option<usize>) -> (u64, Vec<u64>) {
        self.enter(move || {
            if let Some(cpu) = cpu {
                pin_to_cpu(cpu);
            }
            let l = TcpListener::bind(("127.0.0.1", port)).unwrap();
            let mut sockets = Vec::with_capacity(2 * n);
            for _ in 0..n {
                let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
                let (s, _) = l.accept().unwrap();
                sockets.extend([cookie(&c), cookie(&s)]);
                drop(c);
                drop(s);
            }
            (cookie(&l), sockets)
        })
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

/// Runs the calling thread on CPU `cpu` only.
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes in it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is this thread; the set is initialised.
    let r = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) };
    assert_eq!(
        r,
        0,
        "sched_setaffinity(CPU {cpu}): {}",
        std::io::Error::last_os_error()
    );
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
        let (a4, b4) = (format!("198.18.{n}.1"), format!("198.18.{n}.2"));
        // In the kernel's (and the monitor's) canonical form: for n = 0,
        // `fd00:ca::1`, not `fd00:ca:0::1`, or string comparisons fail.
        let v6 = |host: u8| {
            format!("fd00:ca:{n}::{host}")
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .to_string()
        };
        let (a6, b6) = (v6(1), v6(2));
        testkit::netns::veth(
            &a,
            &b,
            &n.to_string(),
            &[&format!("{a4}/24"), &format!("{a6}/64")],
            &[&format!("{b4}/24"), &format!("{b6}/64")],
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
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

/// Turns keepalive on with the given idle/interval (seconds) and count.
pub fn set_keepalive(s: &TcpStream, idle: i32, intvl: i32, cnt: i32) {
    let secs = |v: i32| u64::try_from(v).expect("keepalive times are positive");
    let cnt = u32::try_from(cnt).expect("keepalive count is positive");
    sock::set_keepalive(s, secs(idle), secs(intvl), cnt)
        .unwrap_or_else(|e| panic!("setting keepalive {idle}/{intvl}/{cnt}: {e}"));
}

/// SO_KEEPALIVE off: the kernel deletes the keepalive timer.
pub fn set_keepalive_off(s: &TcpStream) {
    sock::set_keepalive_enabled(s, false)
        .unwrap_or_else(|e| panic!("turning SO_KEEPALIVE off: {e}"));
}

pub fn set_user_timeout(s: &TcpStream, ms: i32) {
    let ms = u64::try_from(ms).expect("TCP_USER_TIMEOUT is positive");
    sock::set_user_timeout(s, Duration::from_millis(ms))
        .unwrap_or_else(|e| panic!("TCP_USER_TIMEOUT {ms}: {e}"));
}

/// SO_LINGER {on, 0}: close() sends a reset.
pub fn set_linger_zero(s: &TcpStream) {
    sock::set_linger_zero(s).unwrap_or_else(|e| panic!("SO_LINGER: {e}"));
}

/// The kernel's socket cookie (SO_COOKIE), the id the monitor reports.
pub fn cookie(fd: &impl AsFd) -> u64 {
    sock::cookie(fd).unwrap_or_else(|e| panic!("SO_COOKIE: {e}"))
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

/// A running `keepalive record --format json`, writing to a file. Its
/// stderr lines (`stderr`) and `pid()` come from the kit's [`MonitorChild`].
pub struct Monitor {
    child: MonitorChild,
    out: PathBuf,
}

impl std::ops::Deref for Monitor {
    type Target = MonitorChild;
    fn deref(&self) -> &MonitorChild {
        &self.child
    }
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
        let args = ["record", "--format", "json", "--output"]
            .map(OsStr::new)
            .into_iter()
            .chain([out.as_os_str()])
            .chain(extra.iter().map(OsStr::new));
        let child = MonitorChild::start(&keepalive_bin(), args, READY_WITHIN, || false)
            .unwrap_or_else(|e| panic!("{e:#}"));
        Monitor { child, out }
    }

    /// Sends `sig` and waits for exit; returns the events written.
    pub fn stop_with(&mut self, sig: i32) -> Vec<Value> {
        let status = self
            .child
            .stop_with(sig, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{e:#}"));
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

    /// Waits up to `within` for a stderr line containing `needle`.
    pub fn wait_stderr(&mut self, needle: &str, within: Duration) {
        self.child
            .wait_line(needle, within)
            .unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// The file it writes to.
    pub fn output(&self) -> &Path {
        &self.out
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
        assert_eq!(
            self.summary("skipped"),
            0,
            "{}: {:?}",
            blind::SKIPPED_RUNS,
            self.stderr
        );
        assert_eq!(
            self.summary("undecoded"),
            0,
            "records of an unknown kind in the ring: {:?}",
            self.stderr
        );
        // Every event the kernel counted as emitted reached userspace or
        // was counted as lost: nothing vanished between the hook and the
        // engine (the summary is read after detach and the final drain).
        let (emitted, received) = (self.summary("emitted"), self.summary("received"));
        assert_eq!(
            emitted,
            received + self.summary("lost"),
            "emitted != received + lost: {:?}",
            self.stderr
        );
        events
    }

    /// Events written so far: the whole lines. A running monitor writes
    /// whole lines, but a read can land in the middle of a write (seen in
    /// a loop under load: a line cut at byte 176); the rest of that line
    /// is the next read's.
    pub fn events(&self) -> Vec<Value> {
        let mut bytes = Vec::new();
        if let Ok(mut f) = File::open(&self.out) {
            f.read_to_end(&mut bytes).unwrap();
        }
        // Cut before decoding: the cut can split a character.
        let whole = bytes
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(&[][..], |end| &bytes[..=end]);
        std::str::from_utf8(whole)
            .expect("the monitor writes UTF-8 lines")
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
            .collect()
    }

    /// `key=value` from the final "stopped" line on stderr.
    pub fn summary(&self, key: &str) -> u64 {
        assert!(
            self.stderr
                .iter()
                .any(|l| l.contains(testkit::child::SUMMARY_LINE)),
            "no summary line in stderr: {:?}",
            self.stderr
        );
        self.child
            .summary_field(key)
            .unwrap_or_else(|| panic!("no {key}= in the summary line: {:?}", self.stderr))
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.out);
    }
}

/// The cookies of the sockets whose `→ CLOSE` is among `events` in
/// namespace `netns`, sorted.
pub fn closed_cookies(events: &[Value], netns: u64) -> Vec<u64> {
    let mut cks: Vec<u64> = of_kind(events, netns, "state_change")
        .into_iter()
        .filter(|e| e["new_state"] == "CLOSE")
        .map(|e| e["cookie"].as_u64().unwrap())
        .collect();
    cks.sort_unstable();
    cks
}

/// Waits up to 10 s for `mon` to have written more than `n` `→ CLOSE`s in
/// namespace `netns` (after a churn, the last FIN/ACK exchanges may still
/// be on their way).
pub fn wait_for_closes(mon: &Monitor, netns: u64, n: usize) {
    wait_for(Duration::from_secs(10), || {
        closed_cookies(&mon.events(), netns).len() > n
    });
}

/// Each of the `n` connections a churn opened in `netns` (two sockets each:
/// `Tcp.ActiveOpens + PassiveOpens` from `before` to `after`), and their
/// listener, has exactly one `→ CLOSE` in `events`.
pub fn assert_one_close_per_socket(
    (before, after): (&Counters, &Counters),
    events: &[Value],
    netns: u64,
    (listener, mut sockets): (u64, Vec<u64>),
    n: usize,
    context: &str,
) {
    let opened = before.delta(after, "Tcp.ActiveOpens") + before.delta(after, "Tcp.PassiveOpens");
    assert_eq!(opened, 2 * n as i64);
    sockets.push(listener);
    sockets.sort_unstable();
    assert_eq!(
        closed_cookies(events, netns),
        sockets,
        "one CLOSE per socket: {context}"
    );
}

/// Events of `kind` in namespace `netns`.
pub fn of_kind<'a>(events: &'a [Value], netns: u64, kind: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["event"] == kind && e["netns"].as_u64() == Some(netns))
        .collect()
}

/// The segments of `retransmit` records that the kernel counted in
/// `Tcp.RetransSegs`: those handed to the IP layer (`err` 0) or failing
/// there (a queue's drop is `1`, an output error a negative errno), not
/// those the kernel gave up on before counting (-EBUSY, -EINVAL, -ENOMEM,
/// -EHOSTUNREACH, -EAGAIN; docs/events.md, `retransmit`).
pub fn counted_retrans_segs(retransmits: &[&Value]) -> i64 {
    const GIVEN_UP: [i64; 5] = [
        -libc::EBUSY as i64,
        -libc::EINVAL as i64,
        -libc::ENOMEM as i64,
        -libc::EHOSTUNREACH as i64,
        -libc::EAGAIN as i64,
    ];
    retransmits
        .iter()
        .filter(|e| !GIVEN_UP.contains(&e["err"].as_i64().unwrap()))
        .map(|e| e["segs"].as_i64().unwrap())
        .sum()
}

/// Names of the BPF programs currently loaded whose name starts with `ka_`.
pub fn loaded_keepalive_programs() -> Vec<String> {
    testkit::bpf::loaded_programs()
        .into_iter()
        .map(|p| p.name)
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

/// IDs of the BPF programs a process holds open (from /proc/PID/fdinfo);
/// none once it has exited.
pub fn prog_ids_held_by(pid: u32) -> Vec<u32> {
    testkit::bpf::held_by(pid)
        .map(|h| h.programs)
        .unwrap_or_default()
}

/// IDs of every BPF program loaded in the kernel.
pub fn loaded_prog_ids() -> Vec<u32> {
    testkit::bpf::loaded_programs()
        .into_iter()
        .map(|p| p.id)
        .collect()
}

/// Kernel-side filter to the addresses [`Pair`] uses, so that a busy host
/// cannot crowd the test's events out of the ring buffer.
pub const PAIR_ONLY: [&str; 4] = ["--addr", "198.18.0.0/15", "--addr", "fd00:ca::/32"];

/// What `ka-peer` (tests/src/bin/ka-peer.rs) shows as its comm.
pub const PEER_COMM: &str = "ka-peer";

/// The `ka-peer` helper: $KEEPALIVE_PEER_BIN, else next to the test
/// binary's directory (target/<profile>/ka-peer; cargo builds it with the
/// tests).
pub fn peer_bin() -> PathBuf {
    let p = std::env::var_os("KEEPALIVE_PEER_BIN")
        .map(PathBuf::from)
        .or_else(|| {
            let exe = std::env::current_exe().ok()?;
            // target/<profile>/deps/<test> -> target/<profile>/ka-peer
            Some(exe.parent()?.parent()?.join(PEER_COMM))
        })
        .unwrap_or_else(|| PathBuf::from(PEER_COMM));
    assert!(
        p.is_file(),
        "{} not found: it is built with the tests (`cargo xtask test`)",
        p.display()
    );
    p
}

/// `ka-peer MODE ARGS` run inside a namespace in its own process group
/// (the whole group is killed on drop). Modes: `connect-exit`,
/// `connect-hold`, `connect-hold-fork`, `connect-leak` (see the binary).
pub struct PeerProcess {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl PeerProcess {
    pub fn spawn(ns: &Netns, mode: &str, args: &[&str]) -> PeerProcess {
        use std::os::unix::process::CommandExt;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(peer_bin())
            .arg(mode)
            .args(args)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("cannot run ip netns exec NS ka-peer");
        let lines = line_channel(child.stdout.take().unwrap());
        PeerProcess { child, lines }
    }

    /// `ip netns exec` execs ka-peer, so this is ka-peer's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next line it prints, as whitespace-separated numbers.
    pub fn line(&mut self) -> Vec<u32> {
        let l = self
            .lines
            .recv_timeout(Duration::from_secs(15))
            .unwrap_or_else(|_| {
                panic!(
                    "ka-peer printed nothing (exit {:?})",
                    self.child.try_wait().ok().flatten()
                )
            });
        l.split_whitespace()
            .map(|w| w.parse().unwrap_or_else(|_| panic!("ka-peer said {l:?}")))
            .collect()
    }

    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "ka-peer {} did not exit",
                self.pid()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        // SAFETY: signalling the process group of our own child.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `keepalive ARGS` that must end by itself within `limit` (a bad
/// flag, a refused file): its exit code and stderr lines. One still running
/// after `limit` (it took the bait and started recording) is killed and
/// fails the test.
pub fn run_to_exit(args: &[&str], limit: Duration) -> (i32, Vec<String>) {
    let mut child = std::process::Command::new(keepalive_bin())
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting keepalive");
    let rx = line_channel(child.stderr.take().expect("stderr is piped"));
    let exited = wait_for(limit, || child.try_wait().ok().flatten().is_some());
    if !exited {
        let _ = child.kill();
    }
    let code = child.wait().ok().and_then(|s| s.code()).unwrap_or(-1);
    let err: Vec<String> = rx.iter().collect();
    assert!(exited, "{args:?} kept running: {err:?}");
    (code, err)
}
