//! `cargo xtask bench`: what the monitor costs, measured side by side in one
//! run; `cargo xtask bench --snapshot`: `keepalive snapshot` against `ss`
//! (below).
//!
//! **Workloads** (Rust std only, 127.0.0.1, never any other address):
//! - *request/response*: `--conns` persistent connections, each a client
//!   thread sending a 64-byte request and a server thread answering with
//!   64 bytes; measured in transactions/s. No state changes happen, so this
//!   shows the cost of the always-on hooks (timers) and of sharing the CPUs
//!   with the monitor process.
//! - *connection churn*: `--conns` client threads each connecting, sending
//!   one request, reading the response and closing, over and over, against
//!   two accepting server threads (the server closes first, so TIME_WAIT
//!   stays on the server side and ephemeral ports are not exhausted);
//!   measured in connections/s. Every connection fires the state hooks
//!   several times and produces events the monitor must format.
//!
//! **Phases**: a short warm-up, then `--rounds` rounds of *baseline* (no
//! monitor) followed by *monitor* (`keepalive record --format json --output
//! /dev/null` as a child, measured only once it has printed "hooks
//! attached"; stopped with SIGTERM afterwards). Alternating the phases
//! cancels slow drift (thermal, page cache, TIME_WAIT buildup); the report
//! compares the medians. The monitor's own CPU time and the events it
//! emitted/lost are reported per phase.
//!
//! **Kernel-side cost**: a final monitor phase runs both workloads again
//! with `kernel.bpf_stats_enabled=1` (the old value is restored at the end,
//! on errors and on Ctrl-C too) and reads `run_time_ns`/`run_cnt` of the
//! monitor's programs from `/proc/<monitor>/fdinfo` before and after each
//! workload. Stats are kept off during the throughput rounds because
//! collecting them has a cost of its own. Program names come from the
//! kernel (`BPF_PROG_GET_FD_BY_ID` + `BPF_OBJ_GET_INFO_BY_FD`; truncated to
//! 15 characters there) and hooks from the monitor's BPF link fds.
//!
//! Results: a table on stdout and `<target dir>/bench/summary.json`.
//! Targets: monitor/baseline throughput >= 0.99, <= 100 ns per program run.
//! Missing a target is reported, not an error: the numbers are noisy on
//! small machines and are for people to judge.
//!
//! **Snapshot benchmark** (`cargo xtask bench --snapshot [--conns
//! 10000,100000] [--rounds 5] [--timeout 60]`): how long `keepalive
//! snapshot` takes next to `ss` with many connections. For each N of
//! `--conns`, a network namespace `ka-bench-<pid>` is made (`ip netns add`,
//! `lo` up; deleted at the end, on errors and Ctrl-C too) and one helper
//! process (this binary re-executed as the hidden `cargo xtask
//! bench-hold-conns`) enters it, sets its `net.ipv4.ip_local_port_range`
//! to "1024 65535", raises RLIMIT_NOFILE to 2N + 64 (`fs.nr_open` is
//! raised too if needed and restored afterwards), listens on 127.0.0.1-4 x
//! 4+ ports (below 1024, outside that range), then connects and accepts N
//! connections: 2N ESTABLISHED sockets, held until the benchmark ends (the
//! helper also dies with it). Without CAP_SYS_RESOURCE (e.g. in a
//! container) RLIMIT_NOFILE cannot go above its hard limit, so the
//! connections are spread over as many helpers (each on its own ports) as
//! that limit requires; the report says how many and why.
//!
//! Then these commands run, one untimed check run each (output counted:
//! how many sockets each listed, how many of the test namespace's 2N, how
//! many attributed to a helper), then `--rounds` timed rounds, each
//! running every command once with stdout to /dev/null, the order rotating
//! from round to round:
//! - `ip netns exec NS ss -tanoi`
//! - `ip netns exec NS ss -tanoip` (with processes, the fair comparison to
//!   keepalive's owner scan)
//! - `keepalive snapshot --all --format json`
//! - `keepalive snapshot --all --format json --no-owners` (without the
//!   /proc owner scan)
//! - `ip netns exec NS true` (what `ip netns exec` adds to the ss times)
//!
//! Each run is bounded by `--timeout` seconds; a command exceeding it is
//! killed, reported as "timeout" and not run again at that N. keepalive
//! snapshot walks every network namespace on the host, which is more work
//! than ss in one namespace; the report says how many it saw. Results: the
//! median wall time per command and N, the ratios ss / keepalive, CPU
//! times and the check counts, on stdout and in
//! `<target dir>/bench/snapshot.json`.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::fs;
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;

/// Request and response size in bytes.
const MSG: usize = 64;
/// Bound on every blocking socket operation.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an idle churn server waits in accept() before checking for stop.
const ACCEPT_POLL: Duration = Duration::from_millis(100);
/// Server threads of the churn workload.
const CHURN_SERVERS: usize = 2;
/// How long the monitor may take to attach its hooks.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the monitor may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Quiet time before each measurement (lets the previous phase settle).
const SETTLE: Duration = Duration::from_millis(300);
/// Throughput with the monitor / without, at least.
const RATIO_TARGET: f64 = 0.99;
/// Nanoseconds per program run, at most.
const NS_PER_RUN_TARGET: f64 = 100.0;
const BPF_STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";
/// The monitor's programs (keepalive-user/src/kernel/loader.rs), to undo the
/// kernel's 15-character truncation of names in the report.
const PROGRAMS: &[&str] = &[
    "ka_state",
    "ka_retransmit",
    "ka_reset_sent",
    "ka_reset_received",
    "ka_error",
    "ka_timer_entry",
    "ka_timer_exit",
];

#[derive(Parser, Debug)]
#[command(
    name = "cargo xtask bench",
    about = "Measure the monitor's overhead on loopback TCP workloads (needs root)"
)]
struct Opts {
    /// Seconds per workload per phase.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=600))]
    seconds: u64,
    /// Baseline/monitor rounds (alternating).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=50))]
    rounds: u64,
    /// Connections (request/response) and client threads (churn).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=256))]
    conns: u64,
    /// Run the snapshot benchmark instead: `keepalive snapshot` against
    /// `ss -tanoi`/`ss -tanoip` on 10k and 100k connections. It has its own
    /// --conns (a list), --rounds and --timeout: see
    /// `cargo xtask bench --snapshot --help`.
    #[arg(long)]
    snapshot: bool,
}

/// Runs the benchmark with the release `keepalive` binary `bin`.
pub fn run(bin: &Path, args: &[String]) -> Result<()> {
    if wants_snapshot(args) {
        return run_snapshot(bin, args);
    }
    let Some(opts) = parse_opts::<Opts>("cargo xtask bench", args)? else {
        return Ok(());
    };
    require_root_and(
        bin,
        "bench loads eBPF programs and sets kernel.bpf_stats_enabled",
    )?;
    let _signals = SignalGuard::install();
    let cfg = Config {
        dur: Duration::from_secs(opts.seconds),
        rounds: opts.rounds as usize,
        conns: opts.conns as usize,
    };
    let report = measure(bin, &cfg)?;
    print!("{}", report.table(bin, &cfg));
    write_summary(&summary_path(bin), &report.json(bin, &cfg))
}

/// Parses the benchmark's own options; `None` after printing `--help`.
fn parse_opts<T: Parser>(name: &str, args: &[String]) -> Result<Option<T>> {
    match T::try_parse_from(std::iter::once(name.to_string()).chain(args.iter().cloned())) {
        Ok(o) => Ok(Some(o)),
        Err(e) if !e.use_stderr() => {
            // --help / --version
            print!("{e}");
            Ok(None)
        }
        Err(e) => {
            let msg = e.to_string();
            bail!("{}", msg.trim_start_matches("error: ").trim_end())
        }
    }
}

/// Fails unless we are root (`why` says what needs it) and `bin` exists.
fn require_root_and(bin: &Path, why: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{why}: run it as root");
    }
    if !bin.is_file() {
        bail!("{} does not exist", bin.display());
    }
    Ok(())
}

/// Writes a report's JSON to `path` (creating its directory) and says where.
fn write_summary(path: &Path, json: &impl fmt::Display) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(path, format!("{json}\n")).with_context(|| format!("writing {}", path.display()))?;
    println!("summary: {}", path.display());
    Ok(())
}

struct Config {
    dur: Duration,
    rounds: usize,
    conns: usize,
}

/// `<target>/bench/summary.json`, `<target>` being where `bin` was built.
fn summary_path(bin: &Path) -> PathBuf {
    let target = bin
        .canonicalize()
        .ok()
        .and_then(|b| Some(b.parent()?.parent()?.to_path_buf()))
        .unwrap_or_else(|| PathBuf::from("target"));
    target.join("bench").join("summary.json")
}

// ---------------------------------------------------------------------------
// Orchestration

/// One workload run.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    /// Completed transactions (request/response) or connections (churn).
    ops: u64,
    /// Failed attempts (timeouts, refused connections...).
    errors: u64,
    secs: f64,
}

impl Sample {
    fn rate(&self) -> f64 {
        if self.secs > 0.0 {
            self.ops as f64 / self.secs
        } else {
            0.0
        }
    }
}

/// What the monitor did during one phase.
#[derive(Clone, Copy, Debug, Default)]
struct MonitorUse {
    /// CPU time (user + system) the monitor used while measuring.
    cpu_secs: f64,
    wall_secs: f64,
    /// From its "stopped; emitted=.. received=.. lost=.." line.
    emitted: Option<u64>,
    lost: Option<u64>,
}

struct Phase {
    round: usize,
    rr: Sample,
    churn: Sample,
    /// `None` for a baseline phase.
    monitor: Option<MonitorUse>,
}

/// One program's counters over one workload.
#[derive(Clone, Copy, Debug, Default)]
struct Runs {
    run_time_ns: u64,
    run_cnt: u64,
}

impl Runs {
    fn ns_per_run(&self) -> Option<f64> {
        (self.run_cnt > 0).then(|| self.run_time_ns as f64 / self.run_cnt as f64)
    }
}

struct ProgCost {
    prog_id: u32,
    /// The kernel's name (at most 15 characters).
    kernel_name: String,
    /// Full name when the kernel's is a truncation of a known program.
    name: String,
    hook: Option<String>,
    rr: Runs,
    churn: Runs,
}

struct KernelCost {
    /// bpf_stats_enabled was already on before we started.
    stats_were_on: bool,
    rr: Sample,
    churn: Sample,
    programs: Vec<ProgCost>,
}

struct Report {
    phases: Vec<Phase>,
    cost: KernelCost,
}

fn check_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

fn measure(bin: &Path, cfg: &Config) -> Result<Report> {
    let stats_were_on = fs::read_to_string(BPF_STATS_SYSCTL)
        .map(|s| s.trim() != "0")
        .unwrap_or(false);
    eprintln!(
        "bench: {} round(s) x (baseline, monitor), {} s per workload, {} connections",
        cfg.rounds,
        cfg.dur.as_secs(),
        cfg.conns
    );
    eprintln!("bench: warming up");
    request_response(cfg.conns, cfg.dur.min(Duration::from_secs(1)))?;

    let mut phases = Vec::new();
    for round in 1..=cfg.rounds {
        for monitored in [false, true] {
            check_interrupted()?;
            let name = if monitored { "monitor" } else { "baseline" };
            eprintln!("bench: round {round}/{}: {name}", cfg.rounds);
            let phase = if monitored {
                let mut mon = Monitor::start(bin)?;
                thread::sleep(SETTLE);
                let cpu0 = mon.cpu_secs()?;
                let t0 = Instant::now();
                let (rr, churn) = workloads(cfg)?;
                let wall_secs = t0.elapsed().as_secs_f64();
                let cpu_secs = mon.cpu_secs()? - cpu0;
                let (emitted, lost) = mon.stop()?;
                Phase {
                    round,
                    rr,
                    churn,
                    monitor: Some(MonitorUse {
                        cpu_secs,
                        wall_secs,
                        emitted,
                        lost,
                    }),
                }
            } else {
                thread::sleep(SETTLE);
                let (rr, churn) = workloads(cfg)?;
                Phase {
                    round,
                    rr,
                    churn,
                    monitor: None,
                }
            };
            phases.push(phase);
        }
    }
    check_interrupted()?;
    eprintln!("bench: kernel-side cost (bpf_stats_enabled=1)");
    let cost = kernel_cost(bin, cfg, stats_were_on)?;
    Ok(Report { phases, cost })
}

/// Both workloads, one after the other.
fn workloads(cfg: &Config) -> Result<(Sample, Sample)> {
    let rr = request_response(cfg.conns, cfg.dur)?;
    check_interrupted()?;
    thread::sleep(SETTLE);
    let churn = churn(cfg.conns, cfg.dur)?;
    check_interrupted()?;
    Ok((rr, churn))
}

fn kernel_cost(bin: &Path, cfg: &Config, stats_were_on: bool) -> Result<KernelCost> {
    let mut mon = Monitor::start(bin)?;
    let _stats = BpfStats::enable()?;
    let pid = mon.pid();
    let names = prog_names(pid)?;
    if names.is_empty() {
        bail!("found no ka_* BPF programs among the monitor's (pid {pid}) file descriptors");
    }
    thread::sleep(SETTLE);
    let s0 = prog_counters(pid)?;
    let rr = request_response(cfg.conns, cfg.dur)?;
    let s1 = prog_counters(pid)?;
    check_interrupted()?;
    thread::sleep(SETTLE);
    let s2 = prog_counters(pid)?;
    let churn = churn(cfg.conns, cfg.dur)?;
    let s3 = prog_counters(pid)?;
    check_interrupted()?;
    mon.stop()?;
    let programs = names
        .into_iter()
        .map(|(prog_id, (kernel_name, hook))| {
            let delta = |a: &BTreeMap<u32, Runs>, b: &BTreeMap<u32, Runs>| {
                let a = a.get(&prog_id).copied().unwrap_or_default();
                let b = b.get(&prog_id).copied().unwrap_or_default();
                Runs {
                    run_time_ns: b.run_time_ns.saturating_sub(a.run_time_ns),
                    run_cnt: b.run_cnt.saturating_sub(a.run_cnt),
                }
            };
            ProgCost {
                prog_id,
                name: full_name(&kernel_name),
                kernel_name,
                hook,
                rr: delta(&s0, &s1),
                churn: delta(&s2, &s3),
            }
        })
        .collect();
    Ok(KernelCost {
        stats_were_on,
        rr,
        churn,
        programs,
    })
}

fn full_name(kernel_name: &str) -> String {
    PROGRAMS
        .iter()
        .find(|p| **p == kernel_name || (kernel_name.len() == 15 && p.starts_with(kernel_name)))
        .map_or_else(|| kernel_name.to_string(), |p| p.to_string())
}

// ---------------------------------------------------------------------------
// Workloads

fn io_timeouts(s: &TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))
}

/// Accepts one connection from a non-blocking listener within `timeout`.
fn accept_within(l: &TcpListener, timeout: Duration) -> Result<TcpStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e).context("accepting a benchmark connection"),
        }
    }
}

fn join<T>(h: thread::ScopedJoinHandle<'_, T>) -> Result<T> {
    h.join().map_err(|_| anyhow!("a benchmark thread panicked"))
}

/// Persistent connections, 64-byte request → 64-byte response.
fn request_response(conns: usize, dur: Duration) -> Result<Sample> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1")?;
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let mut pairs = Vec::with_capacity(conns);
    for _ in 0..conns {
        let client = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .with_context(|| format!("connecting to {addr}"))?;
        let server = accept_within(&listener, IO_TIMEOUT)?;
        io_timeouts(&client)?;
        io_timeouts(&server)?;
        pairs.push((client, server));
    }
    drop(listener);
    let deadline = Instant::now() + dur;
    let results = thread::scope(|s| {
        let handles: Vec<_> = pairs
            .into_iter()
            .map(|(client, server)| {
                (
                    s.spawn(move || echo_server(server)),
                    s.spawn(move || rr_client(client, deadline)),
                )
            })
            .collect();
        // Join everything before looking at errors, so no thread outlives us.
        handles
            .into_iter()
            .map(|(srv, cli)| (join(srv), join(cli)))
            .collect::<Vec<_>>()
    });
    let mut sample = Sample {
        secs: dur.as_secs_f64(),
        ..Sample::default()
    };
    for (srv, cli) in results {
        let _ = srv?;
        match cli? {
            Ok(n) => sample.ops += n,
            Err(_) => sample.errors += 1,
        }
    }
    if sample.ops == 0 {
        bail!("the request/response workload completed no transaction");
    }
    Ok(sample)
}

fn rr_client(mut s: TcpStream, deadline: Instant) -> io::Result<u64> {
    let req = [0x5a_u8; MSG];
    let mut resp = [0_u8; MSG];
    let mut n = 0;
    while Instant::now() < deadline && !interrupted() {
        s.write_all(&req)?;
        s.read_exact(&mut resp)?;
        n += 1;
    }
    // Dropping `s` closes it; the server sees EOF and returns.
    Ok(n)
}

/// Answers every 64-byte request until EOF (or an error/timeout).
fn echo_server(mut s: TcpStream) -> io::Result<()> {
    let mut buf = [0_u8; MSG];
    loop {
        match s.read_exact(&mut buf) {
            Ok(()) => s.write_all(&buf)?,
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// Sets SO_RCVTIMEO on a listener so accept() returns EAGAIN when idle.
fn set_accept_timeout(l: &TcpListener, t: Duration) -> Result<()> {
    let tv = libc::timeval {
        tv_sec: t.as_secs() as libc::time_t,
        tv_usec: t.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: valid fd and a pointer to a timeval of the given size.
    let r = unsafe {
        libc::setsockopt(
            l.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error()).context("setting SO_RCVTIMEO on the listener");
    }
    Ok(())
}

/// Connect, one request/response, close; `clients` threads for `dur`.
fn churn(clients: usize, dur: Duration) -> Result<Sample> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1")?;
    let addr = listener.local_addr()?;
    set_accept_timeout(&listener, ACCEPT_POLL)?;
    let stop = AtomicBool::new(false);
    let deadline = Instant::now() + dur;
    let (client_results, server_results) = thread::scope(|s| {
        let servers: Vec<_> = (0..CHURN_SERVERS)
            .map(|_| s.spawn(|| churn_server(&listener, &stop)))
            .collect();
        let cls: Vec<_> = (0..clients)
            .map(|_| s.spawn(move || churn_client(addr, deadline)))
            .collect();
        let c: Vec<_> = cls.into_iter().map(join).collect();
        // Clients are done (each bounded by the deadline plus I/O
        // timeouts); now the servers may stop.
        stop.store(true, Ordering::Relaxed);
        let sv: Vec<_> = servers.into_iter().map(join).collect();
        (c, sv)
    });
    let mut sample = Sample {
        secs: dur.as_secs_f64(),
        ..Sample::default()
    };
    for r in client_results {
        let (ok, errors) = r?;
        sample.ops += ok;
        sample.errors += errors;
    }
    for r in server_results {
        sample.errors += r?;
    }
    if sample.ops == 0 {
        bail!("the churn workload completed no connection");
    }
    Ok(sample)
}

/// Returns (connections completed, failed attempts).
fn churn_client(addr: SocketAddr, deadline: Instant) -> (u64, u64) {
    let (mut ok, mut errors) = (0, 0);
    while Instant::now() < deadline && !interrupted() {
        match one_connection(addr) {
            Ok(()) => ok += 1,
            Err(_) => {
                errors += 1;
                thread::sleep(Duration::from_millis(1));
            }
        }
    }
    (ok, errors)
}

fn one_connection(addr: SocketAddr) -> io::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    io_timeouts(&s)?;
    s.write_all(&[0x5a_u8; MSG])?;
    let mut resp = [0_u8; MSG];
    s.read_exact(&mut resp)?;
    // Wait for the server's FIN so it closes first (TIME_WAIT on its side).
    if s.read(&mut resp)? != 0 {
        return Err(io::Error::other("unexpected data after the response"));
    }
    Ok(())
}

/// Serves one request per connection until `stop`; returns failures.
fn churn_server(l: &TcpListener, stop: &AtomicBool) -> u64 {
    let mut errors = 0;
    while !stop.load(Ordering::Relaxed) {
        match l.accept() {
            Ok((mut s, _)) => {
                let mut buf = [0_u8; MSG];
                let served = io_timeouts(&s)
                    .and_then(|()| s.read_exact(&mut buf))
                    .and_then(|()| s.write_all(&buf));
                if served.is_err() {
                    errors += 1;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(_) => {
                errors += 1;
                thread::sleep(Duration::from_millis(1));
            }
        }
    }
    errors
}

// ---------------------------------------------------------------------------
// The monitor process

/// `keepalive record` running as a child; killed on drop unless stopped.
struct Monitor {
    child: Child,
    stopped: bool,
    lines: mpsc::Receiver<String>,
}

impl Monitor {
    /// Starts the monitor and waits until its hooks are attached.
    fn start(bin: &Path) -> Result<Monitor> {
        let mut child = Command::new(bin)
            .args(["record", "--format", "json", "--output", "/dev/null"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let lines = line_channel(stderr);
        let mut mon = Monitor {
            child,
            stopped: false,
            lines,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match mon.lines.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(line) if line.contains("hooks attached") => return Ok(mon),
                Ok(line) => seen.push(line),
                Err(mpsc::RecvTimeoutError::Timeout) if !left.is_zero() && !interrupted() => {}
                Err(_) => {
                    let why = match mon.child.try_wait() {
                        Ok(Some(status)) => format!("exited ({status})"),
                        _ if interrupted() => "was interrupted".to_string(),
                        _ => format!("did not attach within {} s", READY_TIMEOUT.as_secs()),
                    };
                    bail!("the monitor {why}; its stderr:\n{}", seen.join("\n"));
                }
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// User + system CPU seconds used so far (/proc/<pid>/stat).
    fn cpu_secs(&self) -> Result<f64> {
        let path = format!("/proc/{}/stat", self.pid());
        let stat = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        // Fields after "(comm)": state is field 3, utime 14, stime 15.
        let after = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .ok_or_else(|| anyhow!("unexpected {path}"))?;
        let f: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| -> Result<f64> {
            f.get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .map(|v| v as f64)
                .ok_or_else(|| anyhow!("unexpected {path}"))
        };
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        Ok((ticks(11)? + ticks(12)?) / hz)
    }

    /// SIGTERM, wait, and parse its final "emitted=.. lost=.." line.
    fn stop(&mut self) -> Result<(Option<u64>, Option<u64>)> {
        // SAFETY: plain kill(2) on our own child, which has not been reaped.
        unsafe { libc::kill(self.pid() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline {
                bail!(
                    "the monitor did not exit within {} s of SIGTERM",
                    STOP_TIMEOUT.as_secs()
                );
            }
            thread::sleep(Duration::from_millis(20));
        };
        self.stopped = true;
        let mut lines = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(2);
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            lines.push(line);
        }
        if !status.success() {
            bail!(
                "the monitor exited with {status}; its stderr:\n{}",
                lines.join("\n")
            );
        }
        let field = |key: &str| {
            lines.iter().rev().find_map(|l| {
                let rest = &l[l.find(key)? + key.len()..];
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                digits.parse().ok()
            })
        };
        Ok((field("emitted="), field("lost=")))
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// BPF statistics

/// Turns kernel.bpf_stats_enabled on; restores the old value on drop.
struct BpfStats {
    old: String,
}

impl BpfStats {
    fn enable() -> Result<BpfStats> {
        let old = fs::read_to_string(BPF_STATS_SYSCTL)
            .with_context(|| format!("reading {BPF_STATS_SYSCTL}"))?
            .trim()
            .to_string();
        fs::write(BPF_STATS_SYSCTL, "1").with_context(|| format!("writing {BPF_STATS_SYSCTL}"))?;
        Ok(BpfStats { old })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Err(e) = fs::write(BPF_STATS_SYSCTL, &self.old) {
            eprintln!(
                "bench: could not restore {BPF_STATS_SYSCTL} to {}: {e}",
                self.old
            );
        }
    }
}

/// `key:\tvalue` lines of one fdinfo file.
fn fdinfo(text: &str) -> BTreeMap<&str, &str> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect()
}

/// Every fdinfo file of `pid`, parsed; fds closing meanwhile are skipped.
fn each_fdinfo(pid: u32, mut f: impl FnMut(&BTreeMap<&str, &str>)) -> Result<()> {
    let dir = format!("/proc/{pid}/fdinfo");
    for entry in fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let Ok(text) = fs::read_to_string(entry?.path()) else {
            continue;
        };
        f(&fdinfo(&text));
    }
    Ok(())
}

/// run_time_ns/run_cnt of every BPF program `pid` holds an fd of.
fn prog_counters(pid: u32) -> Result<BTreeMap<u32, Runs>> {
    let mut out = BTreeMap::new();
    each_fdinfo(pid, |m| {
        if !m.contains_key("prog_type") {
            return;
        }
        let num = |k: &str| m.get(k).and_then(|v| v.parse::<u64>().ok());
        if let (Some(id), Some(run_time_ns), Some(run_cnt)) =
            (num("prog_id"), num("run_time_ns"), num("run_cnt"))
        {
            out.insert(
                id as u32,
                Runs {
                    run_time_ns,
                    run_cnt,
                },
            );
        }
    })?;
    Ok(out)
}

/// prog_id → (kernel name, tracepoint) of the monitor's `ka_*` programs.
/// Programs whose name cannot be read are kept, named `prog_<id>`.
fn prog_names(pid: u32) -> Result<BTreeMap<u32, (String, Option<String>)>> {
    let mut progs = Vec::new();
    let mut hooks = BTreeMap::new();
    each_fdinfo(pid, |m| {
        let Some(id) = m.get("prog_id").and_then(|v| v.parse::<u32>().ok()) else {
            return;
        };
        if m.contains_key("prog_type") {
            progs.push(id);
        } else if let Some(tp) = m.get("tp_name") {
            hooks.insert(id, tp.to_string());
        }
    })?;
    Ok(progs
        .into_iter()
        .filter_map(|id| {
            let name = match prog_name(id) {
                Some(n) if n.starts_with("ka_") => n,
                Some(_) => return None,
                None => format!("prog_{id}"),
            };
            Some((id, (name, hooks.get(&id).cloned())))
        })
        .collect())
}

const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
/// Offset of `name` in `struct bpf_prog_info` (linux/bpf.h), and its size.
const PROG_INFO_NAME: std::ops::Range<usize> = 64..80;

/// The kernel's name of BPF program `id`, via the bpf(2) syscall.
fn prog_name(id: u32) -> Option<String> {
    #[repr(C)]
    struct GetFdById {
        prog_id: u32,
        next_id: u32,
        open_flags: u32,
    }
    #[repr(C)]
    struct GetInfo {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let attr = GetFdById {
        prog_id: id,
        next_id: 0,
        open_flags: 0,
    };
    // SAFETY: bpf(2) reads `size` bytes of a valid, initialised attr.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_GET_FD_BY_ID,
            &attr as *const GetFdById,
            size_of::<GetFdById>(),
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: the kernel just returned this fd to us.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // Zeroed and larger than the fields we read; the kernel accepts a
    // longer buffer when the excess is zero and fills what it knows.
    let mut info = [0_u64; 32];
    let attr = GetInfo {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: attr points to `info`, writable for info_len bytes.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &attr as *const GetInfo,
            size_of::<GetInfo>(),
        )
    };
    if r < 0 {
        return None;
    }
    let bytes: Vec<u8> = info.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let raw = &bytes[PROG_INFO_NAME];
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    Some(String::from_utf8_lossy(&raw[..end]).into_owned())
}

// ---------------------------------------------------------------------------
// Ctrl-C: stop the workloads so the guards run (monitor killed, sysctl
// restored) instead of dying with kernel.bpf_stats_enabled left on.

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Catches SIGINT/SIGTERM while the benchmark runs; restores on drop.
struct SignalGuard {
    old: Vec<(libc::c_int, libc::sigaction)>,
}

impl SignalGuard {
    fn install() -> SignalGuard {
        let mut old = Vec::new();
        for sig in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: sigaction with zeroed (then filled) structs; the
            // handler only stores to an atomic, which is async-signal-safe.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
                libc::sigemptyset(&mut sa.sa_mask);
                let mut prev: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, &sa, &mut prev) == 0 {
                    old.push((sig, prev));
                }
            }
        }
        SignalGuard { old }
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        for (sig, prev) in &self.old {
            // SAFETY: restores a disposition sigaction gave us.
            unsafe { libc::sigaction(*sig, prev, std::ptr::null_mut()) };
        }
    }
}

// ---------------------------------------------------------------------------
// Reporting

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Medians (baseline, monitor) of one workload's rate.
fn medians(phases: &[Phase], rate: impl Fn(&Phase) -> f64) -> (f64, f64) {
    let pick = |monitored: bool| {
        median(
            phases
                .iter()
                .filter(|p| p.monitor.is_some() == monitored)
                .map(&rate)
                .collect(),
        )
    };
    (pick(false), pick(true))
}

fn ratio(base: f64, with: f64) -> f64 {
    if base > 0.0 { with / base } else { 0.0 }
}

fn verdict(ok: bool) -> &'static str {
    if ok { "ok" } else { "MISSED" }
}

fn opt_num(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_string(), |n| n.to_string())
}

/// BPF nanoseconds per operation of the workload.
fn bpf_ns_per_op(programs: &[ProgCost], sample: &Sample, runs: impl Fn(&ProgCost) -> Runs) -> f64 {
    let ns: u64 = programs.iter().map(|p| runs(p).run_time_ns).sum();
    if sample.ops > 0 {
        ns as f64 / sample.ops as f64
    } else {
        0.0
    }
}

impl Report {
    fn table(&self, bin: &Path, cfg: &Config) -> String {
        let mut o = String::new();
        let _ = self.write_table(&mut o, bin, cfg);
        o
    }

    fn write_table(&self, o: &mut String, bin: &Path, cfg: &Config) -> fmt::Result {
        writeln!(
            o,
            "\nkeepalive bench: {} round(s), {} s per workload per phase, {} connections, {MSG} B request/response on 127.0.0.1",
            cfg.rounds,
            cfg.dur.as_secs(),
            cfg.conns
        )?;
        writeln!(
            o,
            "monitor: {} record --format json --output /dev/null\n",
            bin.display()
        )?;
        writeln!(
            o,
            "{:<5} {:<8} {:>12} {:>13} {:>7} {:>12} {:>10} {:>6}",
            "round", "phase", "rr tx/s", "churn conn/s", "errors", "monitor cpu", "events", "lost"
        )?;
        for p in &self.phases {
            let (cpu, events, lost) = match &p.monitor {
                Some(m) => (
                    format!("{:.1}%", 100.0 * m.cpu_secs / m.wall_secs.max(1e-9)),
                    opt_num(m.emitted),
                    opt_num(m.lost),
                ),
                None => ("-".into(), "-".into(), "-".into()),
            };
            writeln!(
                o,
                "{:<5} {:<8} {:>12.0} {:>13.0} {:>7} {:>12} {:>10} {:>6}",
                p.round,
                if p.monitor.is_some() {
                    "monitor"
                } else {
                    "baseline"
                },
                p.rr.rate(),
                p.churn.rate(),
                p.rr.errors + p.churn.errors,
                cpu,
                events,
                lost
            )?;
        }
        writeln!(
            o,
            "\nthroughput, median of {} (monitor cpu: share of one CPU)",
            cfg.rounds
        )?;
        writeln!(
            o,
            "{:<24} {:>12} {:>12} {:>8}   target >= {RATIO_TARGET}",
            "workload", "baseline", "monitor", "ratio"
        )?;
        for (label, (b, m)) in [
            (
                "request/response tx/s",
                medians(&self.phases, |p| p.rr.rate()),
            ),
            (
                "connection churn conn/s",
                medians(&self.phases, |p| p.churn.rate()),
            ),
        ] {
            let r = ratio(b, m);
            writeln!(
                o,
                "{label:<24} {b:>12.0} {m:>12.0} {r:>8.4}   {}",
                verdict(r >= RATIO_TARGET)
            )?;
        }

        let c = &self.cost;
        writeln!(
            o,
            "\nkernel-side cost: separate monitor phase with kernel.bpf_stats_enabled=1 ({} s request/response at {:.0} tx/s, {} s churn at {:.0} conn/s)",
            cfg.dur.as_secs(),
            c.rr.rate(),
            cfg.dur.as_secs(),
            c.churn.rate()
        )?;
        if c.stats_were_on {
            writeln!(
                o,
                "note: bpf_stats_enabled was already 1, so the throughput rounds ran with statistics on"
            )?;
        }
        writeln!(
            o,
            "{:<18} {:>7} {:<22} {:>11} {:>9} {:>11} {:>9}   target <= {NS_PER_RUN_TARGET} ns/run",
            "program", "prog_id", "hook", "rr runs", "ns/run", "churn runs", "ns/run"
        )?;
        let ns = |r: &Runs| {
            r.ns_per_run()
                .map_or_else(|| "-".into(), |v| format!("{v:.1}"))
        };
        for p in &c.programs {
            let worst = [p.rr.ns_per_run(), p.churn.ns_per_run()]
                .into_iter()
                .flatten()
                .fold(None, |acc: Option<f64>, v| {
                    Some(acc.map_or(v, |a| a.max(v)))
                });
            writeln!(
                o,
                "{:<18} {:>7} {:<22} {:>11} {:>9} {:>11} {:>9}   {}",
                p.name,
                p.prog_id,
                p.hook.as_deref().unwrap_or("-"),
                p.rr.run_cnt,
                ns(&p.rr),
                p.churn.run_cnt,
                ns(&p.churn),
                worst.map_or("not run", |w| verdict(w <= NS_PER_RUN_TARGET))
            )?;
        }
        writeln!(
            o,
            "BPF time per operation: {:.1} ns per request/response transaction, {:.1} ns per churned connection\n",
            bpf_ns_per_op(&c.programs, &c.rr, |p| p.rr),
            bpf_ns_per_op(&c.programs, &c.churn, |p| p.churn)
        )
    }

    fn json(&self, bin: &Path, cfg: &Config) -> Json {
        use Json::{Arr, F, O, S, U};
        let sample = |s: &Sample| {
            O(vec![
                ("ops", U(s.ops)),
                ("errors", U(s.errors)),
                ("secs", F(s.secs)),
                ("per_sec", F(s.rate())),
            ])
        };
        let phases = self
            .phases
            .iter()
            .map(|p| {
                let m = p.monitor.as_ref();
                O(vec![
                    ("round", U(p.round as u64)),
                    (
                        "phase",
                        S(if m.is_some() { "monitor" } else { "baseline" }.into()),
                    ),
                    ("request_response", sample(&p.rr)),
                    ("churn", sample(&p.churn)),
                    ("monitor_cpu_secs", Json::opt(m.map(|m| m.cpu_secs), F)),
                    ("monitor_wall_secs", Json::opt(m.map(|m| m.wall_secs), F)),
                    ("events_emitted", Json::opt(m.and_then(|m| m.emitted), U)),
                    ("events_lost", Json::opt(m.and_then(|m| m.lost), U)),
                ])
            })
            .collect();
        let cmp = |(b, m): (f64, f64)| {
            let r = ratio(b, m);
            O(vec![
                ("baseline", F(b)),
                ("monitor", F(m)),
                ("ratio", F(r)),
                ("meets_target", Json::Bool(r >= RATIO_TARGET)),
            ])
        };
        let runs = |r: &Runs| {
            O(vec![
                ("run_cnt", U(r.run_cnt)),
                ("run_time_ns", U(r.run_time_ns)),
                ("ns_per_run", Json::opt(r.ns_per_run(), F)),
            ])
        };
        let c = &self.cost;
        let programs = c
            .programs
            .iter()
            .map(|p| {
                O(vec![
                    ("name", S(p.name.clone())),
                    ("kernel_name", S(p.kernel_name.clone())),
                    ("prog_id", U(p.prog_id as u64)),
                    ("hook", Json::opt(p.hook.clone(), S)),
                    ("request_response", runs(&p.rr)),
                    ("churn", runs(&p.churn)),
                ])
            })
            .collect();
        O(vec![
            ("schema", U(1)),
            (
                "config",
                O(vec![
                    ("seconds", U(cfg.dur.as_secs())),
                    ("rounds", U(cfg.rounds as u64)),
                    ("conns", U(cfg.conns as u64)),
                    ("msg_bytes", U(MSG as u64)),
                    ("churn_servers", U(CHURN_SERVERS as u64)),
                    ("bin", S(bin.display().to_string())),
                    (
                        "monitor_args",
                        Arr(["record", "--format", "json", "--output", "/dev/null"]
                            .iter()
                            .map(|a| S(a.to_string()))
                            .collect()),
                    ),
                ]),
            ),
            ("phases", Arr(phases)),
            (
                "median",
                O(vec![
                    (
                        "request_response_tps",
                        cmp(medians(&self.phases, |p| p.rr.rate())),
                    ),
                    ("churn_cps", cmp(medians(&self.phases, |p| p.churn.rate()))),
                ]),
            ),
            ("ratio_target", F(RATIO_TARGET)),
            (
                "bpf",
                O(vec![
                    ("stats_were_enabled", Json::Bool(c.stats_were_on)),
                    ("request_response", sample(&c.rr)),
                    ("churn", sample(&c.churn)),
                    ("programs", Arr(programs)),
                    (
                        "ns_per_transaction",
                        F(bpf_ns_per_op(&c.programs, &c.rr, |p| p.rr)),
                    ),
                    (
                        "ns_per_churned_connection",
                        F(bpf_ns_per_op(&c.programs, &c.churn, |p| p.churn)),
                    ),
                    ("ns_per_run_target", F(NS_PER_RUN_TARGET)),
                ]),
            ),
        ])
    }
}

/// Just enough JSON for the summary.
enum Json {
    Null,
    Bool(bool),
    U(u64),
    F(f64),
    S(String),
    Arr(Vec<Json>),
    O(Vec<(&'static str, Json)>),
}

impl Json {
    fn opt<T>(v: Option<T>, f: impl FnOnce(T) -> Json) -> Json {
        v.map_or(Json::Null, f)
    }
}

fn json_str(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    f.write_char('"')?;
    for c in s.chars() {
        match c {
            '"' => f.write_str("\\\"")?,
            '\\' => f.write_str("\\\\")?,
            '\n' => f.write_str("\\n")?,
            c if (c as u32) < 0x20 => write!(f, "\\u{:04x}", c as u32)?,
            c => f.write_char(c)?,
        }
    }
    f.write_char('"')
}

impl fmt::Display for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Json::Null => f.write_str("null"),
            Json::Bool(b) => write!(f, "{b}"),
            Json::U(n) => write!(f, "{n}"),
            Json::F(x) if x.is_finite() => {
                // Rounded to keep the file readable; integral values stay floats.
                let r = (x * 1000.0).round() / 1000.0;
                if r.fract() == 0.0 {
                    write!(f, "{r:.1}")
                } else {
                    write!(f, "{r}")
                }
            }
            Json::F(_) => f.write_str("null"),
            Json::S(s) => json_str(f, s),
            Json::Arr(items) => {
                f.write_char('[')?;
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_char(',')?;
                    }
                    write!(f, "{v}")?;
                }
                f.write_char(']')
            }
            Json::O(fields) => {
                f.write_char('{')?;
                for (i, (k, v)) in fields.iter().enumerate() {
                    if i > 0 {
                        f.write_char(',')?;
                    }
                    json_str(f, k)?;
                    write!(f, ":{v}")?;
                }
                f.write_char('}')
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Snapshot benchmark: `cargo xtask bench --snapshot`

/// Largest `--conns` value (twice as many sockets).
const MAX_SNAPSHOT_CONNS: u64 = 500_000;
/// The helper listens on each of these addresses...
const HOLD_ADDRS: [[u8; 4]; 4] = [
    [127, 0, 0, 1],
    [127, 0, 0, 2],
    [127, 0, 0, 3],
    [127, 0, 0, 4],
];
/// ...on ports HOLD_BASE_PORT.. (in the test namespace only), below the
/// ephemeral range so that no helper's client takes a port another helper
/// is about to listen on.
const HOLD_BASE_PORT: u16 = 101;
/// Listening ports end below this (the start of HOLD_PORT_RANGE).
const HOLD_PORTS_END: u16 = 1024;
/// Connections per (address, port) destination at most, well below the
/// 64512 ports of the ephemeral range the helper sets.
const CONNS_PER_DEST: u64 = 25_000;
/// The ephemeral port range in the test namespace.
const HOLD_PORT_RANGE: &str = "1024 65535";
const PORT_RANGE_SYSCTL: &str = "/proc/sys/net/ipv4/ip_local_port_range";
const NR_OPEN_SYSCTL: &str = "/proc/sys/fs/nr_open";
/// File descriptors a helper needs beyond its sockets (listeners, stdio).
const HOLD_SPARE_FDS: u64 = 64;
/// CAP_SYS_RESOURCE, needed to raise RLIMIT_NOFILE above its hard limit.
const CAP_SYS_RESOURCE: u32 = 24;
/// Bound on one connect() or accept() of the helper.
const HOLD_IO_TIMEOUT: Duration = Duration::from_secs(5);
/// The hidden xtask subcommand running the helper (main.rs).
const HOLD_SUBCOMMAND: &str = "bench-hold-conns";
/// Counts the snapshot bench runs when none is given.
const DEFAULT_SNAPSHOT_CONNS: &str = "10000,100000";

#[derive(Parser, Debug)]
#[command(
    name = "cargo xtask bench --snapshot",
    about = "Time `keepalive snapshot` against `ss -tanoi`/`ss -tanoip` on N established loopback \
             connections (2N sockets) held by a helper process in a test network namespace \
             (needs root)"
)]
struct SnapshotOpts {
    /// Selects this benchmark (instead of the monitor overhead one).
    #[arg(long)]
    snapshot: bool,
    /// Connection counts to measure, comma-separated; each makes 2x sockets
    /// (client and server ends), all ESTABLISHED.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = DEFAULT_SNAPSHOT_CONNS,
        value_parser = clap::value_parser!(u64).range(1..=MAX_SNAPSHOT_CONNS)
    )]
    conns: Vec<u64>,
    /// Timed rounds per count; every round runs each command once, the
    /// order rotating from round to round.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=50))]
    rounds: u64,
    /// Seconds one command may run before it is killed and reported as
    /// "timeout" (and not run again at that count).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=600))]
    timeout: u64,
}

/// Whether `args` (those of `cargo xtask bench`) select the snapshot bench.
fn wants_snapshot(args: &[String]) -> bool {
    args.iter()
        .take_while(|a| *a != "--")
        .any(|a| a == "--snapshot")
}

struct SnapConfig {
    conns: Vec<u64>,
    rounds: usize,
    timeout: Duration,
}

fn run_snapshot(bin: &Path, args: &[String]) -> Result<()> {
    let Some(opts) = parse_opts::<SnapshotOpts>("cargo xtask bench --snapshot", args)? else {
        return Ok(());
    };
    debug_assert!(opts.snapshot);
    require_root_and(
        bin,
        "bench --snapshot creates a network namespace and loads eBPF programs",
    )?;
    for tool in ["ip", "ss"] {
        let found = Command::new(tool)
            .arg("-V")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            bail!("`{tool} -V` failed: bench --snapshot needs iproute2 (ip, ss)");
        }
    }
    let exe = std::env::current_exe().context("locating the xtask binary for the helper")?;
    let _signals = SignalGuard::install();
    let cfg = SnapConfig {
        conns: opts.conns,
        rounds: opts.rounds as usize,
        timeout: Duration::from_secs(opts.timeout),
    };
    let mut sizes = Vec::new();
    for &n in &cfg.conns {
        check_interrupted()?;
        sizes.push(snapshot_size(bin, &exe, n, &cfg)?);
    }
    let report = SnapReport {
        sizes,
        ss_version: ss_version(),
    };
    print!("{}", report.table(bin, &cfg));
    write_summary(
        &summary_path(bin).with_file_name("snapshot.json"),
        &report.json(bin, &cfg),
    )
}

fn ss_version() -> String {
    Command::new("ss")
        .arg("-V")
        .stdin(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// The commands timed against each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tool {
    Ss,
    SsProcs,
    Snapshot,
    SnapshotNoOwners,
    /// `ip netns exec NS true`: what `ip netns exec` adds to the ss times.
    NetnsExec,
}

const TOOLS: [Tool; 5] = [
    Tool::Ss,
    Tool::SsProcs,
    Tool::Snapshot,
    Tool::SnapshotNoOwners,
    Tool::NetnsExec,
];

impl Tool {
    /// Key in snapshot.json.
    fn key(self) -> &'static str {
        match self {
            Tool::Ss => "ss_tanoi",
            Tool::SsProcs => "ss_tanoip",
            Tool::Snapshot => "snapshot",
            Tool::SnapshotNoOwners => "snapshot_no_owners",
            Tool::NetnsExec => "netns_exec_true",
        }
    }

    /// Column heading.
    fn label(self) -> &'static str {
        match self {
            Tool::Ss => "ss -tanoi",
            Tool::SsProcs => "ss -tanoip",
            Tool::Snapshot => "snapshot",
            Tool::SnapshotNoOwners => "--no-owners",
            Tool::NetnsExec => "netns exec",
        }
    }

    fn is_ss(self) -> bool {
        matches!(self, Tool::Ss | Tool::SsProcs)
    }

    /// The whole command line.
    fn argv(self, bin: &Path, netns: &str) -> Vec<String> {
        let ns = |rest: &[&str]| {
            ["ip", "netns", "exec", netns]
                .iter()
                .chain(rest)
                .map(|s| s.to_string())
                .collect()
        };
        let ka = |rest: &[&str]| {
            std::iter::once(bin.display().to_string())
                .chain(
                    ["snapshot", "--all", "--format", "json"]
                        .iter()
                        .chain(rest)
                        .map(|s| s.to_string()),
                )
                .collect()
        };
        match self {
            Tool::Ss => ns(&["ss", "-tanoi"]),
            Tool::SsProcs => ns(&["ss", "-tanoip"]),
            Tool::Snapshot => ka(&[]),
            Tool::SnapshotNoOwners => ka(&["--no-owners"]),
            Tool::NetnsExec => ns(&["true"]),
        }
    }
}

/// What one command listed (from its untimed check run).
#[derive(Clone, Debug, Default, PartialEq)]
struct Seen {
    lines: u64,
    /// Sockets listed: ss's unindented lines less the header; snapshot's lines.
    sockets: u64,
    /// ESTABLISHED sockets of the test namespace.
    ours: u64,
    /// Of those, the ones attributed to a helper process.
    owned: u64,
    /// Distinct network namespaces among the rows (snapshot only).
    namespaces: u64,
}

/// Classifies the output lines of one command.
struct LineCounter {
    ss: bool,
    netns_inode: u64,
    helper_pids: Vec<u64>,
    namespaces: std::collections::HashSet<u64>,
    seen: Seen,
}

impl LineCounter {
    fn new(tool: Tool, netns_inode: u64, helper_pids: &[u32]) -> LineCounter {
        LineCounter {
            ss: tool.is_ss(),
            netns_inode,
            helper_pids: helper_pids.iter().map(|&p| p.into()).collect(),
            namespaces: Default::default(),
            seen: Seen::default(),
        }
    }

    fn line(&mut self, line: &[u8]) {
        let s = &mut self.seen;
        s.lines += 1;
        let text = String::from_utf8_lossy(line);
        if self.ss {
            // With -i every socket has a second, indented line; the first
            // line of all is the header.
            if s.lines > 1 && !text.starts_with([' ', '\t']) && !text.trim().is_empty() {
                s.sockets += 1;
            }
            if text.starts_with("ESTAB") {
                s.ours += 1;
                if has_number(&text, "pid=", &self.helper_pids) {
                    s.owned += 1;
                }
            }
            return;
        }
        s.sockets += 1;
        let netns = numbers_after(&text, "\"netns\":").next();
        if let Some(ino) = netns {
            self.namespaces.insert(ino);
        }
        if netns == Some(self.netns_inode) && text.contains("\"state\":\"ESTABLISHED\"") {
            s.ours += 1;
            if has_number(&text, "\"pid\":", &self.helper_pids) {
                s.owned += 1;
            }
        }
    }

    fn finish(mut self) -> Seen {
        self.seen.namespaces = self.namespaces.len() as u64;
        self.seen
    }
}

/// The numbers right after each `key` in `text`.
fn numbers_after<'a>(text: &'a str, key: &'a str) -> impl Iterator<Item = u64> + 'a {
    text.match_indices(key).filter_map(move |(at, _)| {
        let rest = &text[at + key.len()..];
        let end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        rest[..end].parse().ok()
    })
}

/// Whether `key` is followed by one of `ns` somewhere in `text`.
fn has_number(text: &str, key: &str, ns: &[u64]) -> bool {
    numbers_after(text, key).any(|v| ns.contains(&v))
}

/// Wall and CPU time of one run.
#[derive(Clone, Copy, Debug, Default)]
struct Timed {
    wall: f64,
    user: f64,
    sys: f64,
}

/// One command at one connection count.
struct ToolResult {
    tool: Tool,
    argv: Vec<String>,
    /// The untimed first run (also the warm-up): what it listed and took.
    seen: Option<Seen>,
    first: Option<Timed>,
    /// The timed rounds.
    runs: Vec<Timed>,
    timed_out: bool,
}

impl ToolResult {
    fn median(&self, f: impl Fn(&Timed) -> f64) -> Option<f64> {
        (!self.timed_out && !self.runs.is_empty())
            .then(|| median(self.runs.iter().map(f).collect()))
    }

    fn wall(&self) -> Option<f64> {
        self.median(|t| t.wall)
    }

    /// Whether the check run listed what it should have.
    fn complete(&self, conns: u64) -> Option<bool> {
        let s = self.seen.as_ref()?;
        let want = 2 * conns;
        Some(match self.tool {
            Tool::Ss | Tool::SnapshotNoOwners => s.ours == want,
            Tool::SsProcs | Tool::Snapshot => s.ours == want && s.owned == want,
            Tool::NetnsExec => true,
        })
    }
}

struct SizeResult {
    conns: u64,
    /// Seconds the helper took to make the connections.
    setup_secs: f64,
    netns: String,
    netns_inode: u64,
    helper_pids: Vec<u32>,
    /// Why the connections are spread over several helpers, if they are.
    split: Option<String>,
    tools: Vec<ToolResult>,
}

impl SizeResult {
    fn tool(&self, t: Tool) -> &ToolResult {
        self.tools
            .iter()
            .find(|r| r.tool == t)
            .expect("every tool is measured")
    }

    /// Median wall time of `num` over that of `den`.
    fn ratio(&self, num: Tool, den: Tool) -> Option<f64> {
        let (n, d) = (self.tool(num).wall()?, self.tool(den).wall()?);
        (d > 0.0).then(|| n / d)
    }
}

/// The (numerator, denominator) pairs of the ratio table.
const RATIOS: [(Tool, Tool); 3] = [
    (Tool::Ss, Tool::Snapshot),
    (Tool::SsProcs, Tool::Snapshot),
    (Tool::Ss, Tool::SnapshotNoOwners),
];

fn snapshot_size(bin: &Path, exe: &Path, conns: u64, cfg: &SnapConfig) -> Result<SizeResult> {
    let name = format!("ka-bench-{}", std::process::id());
    eprintln!("bench --snapshot: {conns} connections in network namespace {name}");
    let ns = NamedNetns::create(&name)?;
    let netns_inode = {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(ns.path())
            .with_context(|| format!("stat {}", ns.path().display()))?
            .ino()
    };
    let (per_helper, split) = conns_per_helper(conns)?;
    let helpers = conns.div_ceil(per_helper);
    let fds = 2 * conns.min(per_helper) + HOLD_SPARE_FDS;
    let nr_open: u64 = fs::read_to_string(NR_OPEN_SYSCTL)
        .with_context(|| format!("reading {NR_OPEN_SYSCTL}"))?
        .trim()
        .parse()
        .with_context(|| format!("parsing {NR_OPEN_SYSCTL}"))?;
    let _nr_open = if fds > nr_open {
        eprintln!("bench --snapshot: raising fs.nr_open from {nr_open} to {fds} for the helper");
        Some(Sysctl::set(NR_OPEN_SYSCTL, &fds.to_string())?)
    } else {
        None
    };
    if let Some(why) = &split {
        eprintln!("bench --snapshot: {why}: {helpers} helper processes");
    }
    let t0 = Instant::now();
    let mut holders = Vec::new();
    let mut first_port = u64::from(HOLD_BASE_PORT);
    for h in 0..helpers {
        // Spread evenly: the first `conns % helpers` get one more.
        let n = conns / helpers + u64::from(h < conns % helpers);
        let ports = n.div_ceil(HOLD_ADDRS.len() as u64 * CONNS_PER_DEST).max(4);
        if first_port + ports > u64::from(HOLD_PORTS_END) {
            bail!(
                "{helpers} helper processes need more listening ports than {HOLD_BASE_PORT}..{HOLD_PORTS_END}: use a smaller --conns"
            );
        }
        holders.push(Holder::spawn(exe, &ns.path(), n, first_port as u16, ports)?);
        first_port += ports;
    }
    for h in &mut holders {
        h.wait_ready()?;
    }
    let setup_secs = t0.elapsed().as_secs_f64();
    let helper_pids: Vec<u32> = holders.iter().map(Holder::pid).collect();
    eprintln!(
        "bench --snapshot: {} helper(s) (pid {}) hold {conns} connections ({} sockets), made in {setup_secs:.2} s",
        holders.len(),
        helper_pids
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(","),
        2 * conns,
    );
    let mut tools: Vec<ToolResult> = TOOLS
        .iter()
        .map(|&tool| ToolResult {
            tool,
            argv: tool.argv(bin, &name),
            seen: None,
            first: None,
            runs: Vec::new(),
            timed_out: false,
        })
        .collect();
    // Untimed first runs: a warm-up, and the check of what each command lists.
    for t in &mut tools {
        check_interrupted()?;
        let counter = LineCounter::new(t.tool, netns_inode, &helper_pids);
        let (timed, seen) = run_bounded(&t.argv, cfg.timeout, Some(counter))?;
        match timed {
            Some(first) => {
                t.first = Some(first);
                t.seen = seen;
            }
            None => t.timed_out = true,
        }
        eprintln!(
            "bench --snapshot: check {:<12} {}",
            t.tool.label(),
            match (&t.first, &t.seen) {
                (Some(f), Some(s)) if t.tool != Tool::NetnsExec => format!(
                    "{:.3} s, {} sockets listed, {} of the {} test sockets ESTABLISHED, {} owned by a helper",
                    f.wall,
                    s.sockets,
                    s.ours,
                    2 * conns,
                    s.owned
                ),
                (Some(f), _) => format!("{:.3} s", f.wall),
                _ => format!("timeout (> {} s)", cfg.timeout.as_secs()),
            }
        );
    }
    for round in 0..cfg.rounds {
        eprintln!(
            "bench --snapshot: {conns} connections, round {}/{}",
            round + 1,
            cfg.rounds
        );
        for k in 0..tools.len() {
            let i = (round + k) % tools.len();
            let t = &mut tools[i];
            if t.timed_out {
                continue;
            }
            check_interrupted()?;
            match run_bounded(&t.argv, cfg.timeout, None)?.0 {
                Some(timed) => t.runs.push(timed),
                None => t.timed_out = true,
            }
        }
    }
    drop(holders);
    drop(ns);
    Ok(SizeResult {
        conns,
        setup_secs,
        netns: name,
        netns_inode,
        helper_pids,
        split,
        tools,
    })
}

/// How many connections one helper process can hold, and why that is
/// fewer than `conns` if it is: without CAP_SYS_RESOURCE a process cannot
/// raise RLIMIT_NOFILE above the hard limit it inherited.
fn conns_per_helper(conns: u64) -> Result<(u64, Option<String>)> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    if cap_eff & (1 << CAP_SYS_RESOURCE) != 0 {
        return Ok((conns, None));
    }
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills a valid rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    let per = (lim.rlim_max.saturating_sub(HOLD_SPARE_FDS) / 2).max(1);
    if per >= conns {
        return Ok((conns, None));
    }
    Ok((
        per,
        Some(format!(
            "no CAP_SYS_RESOURCE and an RLIMIT_NOFILE hard limit of {}, so one process holds at most {per} connections ({} fds)",
            lim.rlim_max,
            2 * per
        )),
    ))
}

/// Runs `argv` with stdout counted by `counter` (or sent to /dev/null),
/// killing it after `timeout`. Returns `None` on timeout; an error if it
/// fails. Wall time runs from just before the spawn to its exit.
fn run_bounded(
    argv: &[String],
    timeout: Duration,
    counter: Option<LineCounter>,
) -> Result<(Option<Timed>, Option<Seen>)> {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .stdout(if counter.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let what = argv.join(" ");
    let t0 = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    let pid = child.id() as libc::pid_t;
    let out = match (child.stdout.take(), counter) {
        (Some(stdout), Some(mut counter)) => Some(thread::spawn(move || {
            let mut r = BufReader::with_capacity(1 << 20, stdout);
            let mut line = Vec::with_capacity(4096);
            loop {
                line.clear();
                match r.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => counter.line(&line),
                }
            }
            counter.finish()
        })),
        _ => None,
    };
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let err = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = (&mut stderr).take(16 * 1024).read_to_end(&mut v);
        let _ = io::copy(&mut stderr, &mut io::sink());
        v
    });
    let waited = wait_bounded(pid, t0, timeout);
    // `child` was reaped by wait_bounded (or is being killed); std's Child
    // neither waits nor kills on drop.
    drop(child);
    let seen = out.and_then(|h| h.join().ok());
    let stderr = err.join().unwrap_or_default();
    let (status, timed) = waited.with_context(|| format!("waiting for {what}"))?;
    let Some(timed) = timed else {
        return Ok((None, None));
    };
    if !status.success() {
        bail!(
            "{what} failed ({status}): {}",
            String::from_utf8_lossy(&stderr).trim()
        );
    }
    Ok((Some(timed), seen))
}

/// Waits for child `pid` (spawned at `t0`) at most until `t0 + timeout`,
/// then kills it; reaps it either way. `None`: it was killed.
fn wait_bounded(
    pid: libc::pid_t,
    t0: Instant,
    timeout: Duration,
) -> Result<(std::process::ExitStatus, Option<Timed>)> {
    use std::os::unix::process::ExitStatusExt;
    // SAFETY: pidfd_open on our own child, not reaped yet.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let pidfd = if raw >= 0 {
        // SAFETY: the kernel just returned this fd to us.
        Ok(unsafe { OwnedFd::from_raw_fd(raw as i32) })
    } else {
        Err(io::Error::last_os_error())
    };
    let deadline = t0 + timeout;
    let mut killed = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let fd = match &pidfd {
            Ok(fd) if !left.is_zero() && !interrupted() => fd,
            _ => {
                // SAFETY: our child, not reaped yet (only this function reaps).
                unsafe { libc::kill(pid, libc::SIGKILL) };
                killed = true;
                break;
            }
        };
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r > 0 {
            break;
        }
        // r == 0: the deadline (checked above); r < 0: EINTR.
    }
    let wall = t0.elapsed().as_secs_f64();
    let mut status = 0;
    // SAFETY: zeroed rusage is a valid out-parameter.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: blocking wait4 on our own child with valid out-pointers.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if r == pid {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            return Err(e).context("wait4");
        }
    }
    let secs = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    let status = std::process::ExitStatus::from_raw(status);
    if killed {
        check_interrupted()?;
        if let Err(e) = pidfd {
            return Err(e).context("pidfd_open (needs Linux >= 5.3)");
        }
        return Ok((status, None));
    }
    Ok((
        status,
        Some(Timed {
            wall,
            user: secs(ru.ru_utime),
            sys: secs(ru.ru_stime),
        }),
    ))
}

/// `ip ARGS`, failing with its stderr.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A network namespace made with `ip netns add` and `lo` up; deleted on drop.
struct NamedNetns {
    name: String,
}

impl NamedNetns {
    fn create(name: &str) -> Result<NamedNetns> {
        ip(&["netns", "add", name])?;
        let ns = NamedNetns {
            name: name.to_string(),
        };
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "delete", &self.name]) {
            eprintln!("bench: {e:#}");
        }
    }
}

/// A sysctl (a /proc/sys path) set for the benchmark; restored on drop.
struct Sysctl {
    path: &'static str,
    old: String,
}

impl Sysctl {
    fn set(path: &'static str, value: &str) -> Result<Sysctl> {
        let old = fs::read_to_string(path)
            .with_context(|| format!("reading {path}"))?
            .trim()
            .to_string();
        fs::write(path, value).with_context(|| format!("writing {value} to {path}"))?;
        Ok(Sysctl { path, old })
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        if let Err(e) = fs::write(self.path, &self.old) {
            eprintln!(
                "bench: could not restore {} to {}: {e}",
                self.path, self.old
            );
        }
    }
}

/// A helper process holding connections; killed on drop.
struct Holder {
    child: Child,
    lines: mpsc::Receiver<String>,
    conns: u64,
    started: Instant,
}

impl Holder {
    /// Starts `exe bench-hold-conns` making `conns` connections to
    /// 127.0.0.1-4 x ports `first_port..first_port + ports`.
    fn spawn(exe: &Path, netns: &Path, conns: u64, first_port: u16, ports: u64) -> Result<Holder> {
        let mut child = Command::new(exe)
            .arg(HOLD_SUBCOMMAND)
            .arg("--netns")
            .arg(netns)
            .args([
                "--conns",
                &conns.to_string(),
                "--first-port",
                &first_port.to_string(),
                "--ports",
                &ports.to_string(),
            ])
            // Closing our end (or dying) ends the helper.
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {} {HOLD_SUBCOMMAND}", exe.display()))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let lines = line_channel(stdout);
        Ok(Holder {
            child,
            lines,
            conns,
            started: Instant::now(),
        })
    }

    /// Waits until the helper holds its connections.
    fn wait_ready(&mut self) -> Result<()> {
        let limit = hold_time_limit(self.conns) + Duration::from_secs(10);
        let deadline = self.started + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok(line) if line.starts_with("ready") => return Ok(()),
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) if !left.is_zero() && !interrupted() => {}
                Err(_) => {
                    let why = match self.child.try_wait() {
                        Ok(Some(status)) => format!("exited ({status}); see its error above"),
                        _ if interrupted() => "was interrupted".to_string(),
                        _ => format!("was not ready within {} s", limit.as_secs()),
                    };
                    bail!("the connection helper (pid {}) {why}", self.pid());
                }
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How long the helper may take to make `conns` connections.
fn hold_time_limit(conns: u64) -> Duration {
    Duration::from_secs(60) + Duration::from_millis(conns)
}

#[derive(Parser, Debug)]
#[command(name = "cargo xtask bench-hold-conns")]
struct HoldOpts {
    /// Network namespace file to enter (/run/netns/NAME).
    #[arg(long)]
    netns: PathBuf,
    /// Connections to make (2x sockets).
    #[arg(long)]
    conns: u64,
    /// First listening port.
    #[arg(long)]
    first_port: u16,
    /// Listening ports per loopback address.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1000))]
    ports: u16,
}

/// The helper of `bench --snapshot` (the hidden `cargo xtask
/// bench-hold-conns`): enters the namespace, widens its ephemeral port
/// range, raises RLIMIT_NOFILE, listens on 127.0.0.1-4 x `--ports` ports,
/// connects and accepts `--conns` connections, prints `ready <seconds>` and
/// holds every socket until its stdin closes (or it is killed; it also dies
/// with its parent).
pub fn hold_conns(args: &[String]) -> Result<()> {
    let o = HoldOpts::try_parse_from(
        std::iter::once(HOLD_SUBCOMMAND.to_string()).chain(args.iter().cloned()),
    )?;
    // SAFETY: prctl with integer arguments; we exit if the bench dies.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    let ns = fs::File::open(&o.netns).with_context(|| format!("opening {}", o.netns.display()))?;
    // SAFETY: a valid namespace fd; we are single-threaded, so the whole
    // process moves into it.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("setns {}", o.netns.display()));
    }
    drop(ns);
    // /proc/sys/net is that of the opener's namespace: this changes the
    // test namespace only.
    fs::write(PORT_RANGE_SYSCTL, HOLD_PORT_RANGE)
        .with_context(|| format!("writing {PORT_RANGE_SYSCTL} in the test namespace"))?;
    let fds = 2 * o.conns + HOLD_SPARE_FDS;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills a valid rlimit.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    if lim.rlim_cur < fds {
        lim.rlim_cur = fds;
        lim.rlim_max = lim.rlim_max.max(fds);
        // SAFETY: a valid rlimit; raising the hard limit needs
        // CAP_SYS_RESOURCE.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error()).with_context(|| {
                format!(
                    "raising RLIMIT_NOFILE to {fds} (fs.nr_open too low, or no CAP_SYS_RESOURCE?)"
                )
            });
        }
    }
    let mut listeners = Vec::new();
    for port in 0..o.ports {
        for a in HOLD_ADDRS {
            let addr = SocketAddr::from((a, o.first_port + port));
            let l = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
            set_accept_timeout(&l, HOLD_IO_TIMEOUT)?;
            listeners.push((addr, l));
        }
    }
    let t0 = Instant::now();
    let deadline = t0 + hold_time_limit(o.conns);
    let mut socks = Vec::with_capacity(2 * o.conns as usize);
    for i in 0..o.conns {
        let (addr, l) = &listeners[i as usize % listeners.len()];
        let c = TcpStream::connect_timeout(addr, HOLD_IO_TIMEOUT)
            .with_context(|| format!("connection {} of {} to {addr}", i + 1, o.conns))?;
        let (s, _) = l
            .accept()
            .with_context(|| format!("accepting connection {} on {addr}", i + 1))?;
        socks.push(c);
        socks.push(s);
        if i % 1024 == 1023 && Instant::now() > deadline {
            bail!(
                "made only {} of {} connections in {} s",
                i + 1,
                o.conns,
                hold_time_limit(o.conns).as_secs()
            );
        }
    }
    {
        let mut out = io::stdout().lock();
        writeln!(out, "ready {:.3}", t0.elapsed().as_secs_f64())?;
        out.flush()?;
    }
    // Hold everything until the bench closes our stdin (or kills us).
    let _ = io::copy(&mut io::stdin().lock(), &mut io::sink());
    drop(socks);
    Ok(())
}

// Snapshot benchmark reporting

struct SnapReport {
    sizes: Vec<SizeResult>,
    ss_version: String,
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "timeout".to_string(), |s| format!("{:.1}", s * 1000.0))
}

fn ratio_str(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |r| format!("{r:.2}"))
}

/// Key of a ratio in snapshot.json.
fn ratio_key(num: Tool, den: Tool) -> &'static str {
    match (num, den) {
        (Tool::Ss, Tool::Snapshot) => "ss_tanoi_over_snapshot",
        (Tool::SsProcs, Tool::Snapshot) => "ss_tanoip_over_snapshot",
        (Tool::Ss, Tool::SnapshotNoOwners) => "ss_tanoi_over_snapshot_no_owners",
        _ => "other",
    }
}

const SNAPSHOT_NOTE: &str = "keepalive snapshot walks every network namespace on the host and \
    resolves owners over all of /proc, so it does more work than ss, which lists only the test \
    namespace; the ss times include `ip netns exec` (its own row: `ip netns exec NS true`)";

impl SnapReport {
    fn table(&self, bin: &Path, cfg: &SnapConfig) -> String {
        let mut o = String::new();
        let _ = self.write_table(&mut o, bin, cfg);
        o
    }

    fn write_table(&self, o: &mut String, bin: &Path, cfg: &SnapConfig) -> fmt::Result {
        writeln!(
            o,
            "\nkeepalive snapshot vs ss: N established loopback connections (2N sockets) held by helper processes in a test network namespace; {} timed round(s) per N, commands in rotating order, stdout to /dev/null",
            cfg.rounds
        )?;
        writeln!(o, "keepalive: {}; {}", bin.display(), self.ss_version)?;
        if let Some(s) = self.sizes.first() {
            for t in &s.tools {
                writeln!(o, "  {:<12} {}", t.tool.label(), t.argv.join(" "))?;
            }
        }
        writeln!(o, "note: {SNAPSHOT_NOTE}")?;
        for s in &self.sizes {
            if let Some(seen) = &s.tool(Tool::Snapshot).seen {
                writeln!(
                    o,
                    "      at N={}: snapshot listed {} sockets in {} namespaces (ss: {} in the test namespace)",
                    s.conns,
                    seen.sockets,
                    seen.namespaces,
                    s.tool(Tool::Ss).seen.as_ref().map_or(0, |x| x.sockets)
                )?;
            }
            writeln!(
                o,
                "      at N={}: {} helper process(es){}",
                s.conns,
                s.helper_pids.len(),
                s.split
                    .as_ref()
                    .map_or_else(String::new, |why| format!(" ({why})"))
            )?;
        }

        writeln!(o, "\nmedian wall time, ms")?;
        write!(o, "{:>8} {:>8}", "N", "sockets")?;
        for t in TOOLS {
            write!(o, " {:>12}", t.label())?;
        }
        writeln!(o, " {:>9}", "setup s")?;
        for s in &self.sizes {
            write!(o, "{:>8} {:>8}", s.conns, 2 * s.conns)?;
            for t in TOOLS {
                write!(o, " {:>12}", ms(s.tool(t).wall()))?;
            }
            writeln!(o, " {:>9.2}", s.setup_secs)?;
        }

        writeln!(
            o,
            "\nratio ss / keepalive (median wall time; > 1: keepalive is faster)"
        )?;
        write!(o, "{:>8}", "N")?;
        for (n, d) in RATIOS {
            write!(o, " {:>26}", format!("{} / {}", n.label(), d.label()))?;
        }
        writeln!(o)?;
        for s in &self.sizes {
            write!(o, "{:>8}", s.conns)?;
            for (n, d) in RATIOS {
                write!(o, " {:>26}", ratio_str(s.ratio(n, d)))?;
            }
            writeln!(o)?;
        }

        writeln!(
            o,
            "\nper command: medians of the timed rounds; first = the untimed first run, whose output was counted (listed: sockets; test: ESTABLISHED test-namespace sockets; owned: of those, attributed to a helper process; ns: namespaces with sockets among its rows)"
        )?;
        writeln!(
            o,
            "{:>8} {:<12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>4}  check",
            "N",
            "command",
            "wall ms",
            "min ms",
            "max ms",
            "user ms",
            "sys ms",
            "first ms",
            "listed",
            "test",
            "owned",
            "ns"
        )?;
        for s in &self.sizes {
            for t in &s.tools {
                let min = (!t.timed_out && !t.runs.is_empty())
                    .then(|| t.runs.iter().map(|r| r.wall).fold(f64::INFINITY, f64::min));
                let max = (!t.timed_out && !t.runs.is_empty())
                    .then(|| t.runs.iter().map(|r| r.wall).fold(0.0, f64::max));
                let seen = t.seen.clone().unwrap_or_default();
                let check = match t.complete(s.conns) {
                    _ if t.tool == Tool::NetnsExec => "-",
                    Some(true) => "ok",
                    Some(false) => "INCOMPLETE",
                    None => "timeout",
                };
                let count = |v: u64| {
                    if t.seen.is_none() || t.tool == Tool::NetnsExec {
                        "-".to_string()
                    } else {
                        v.to_string()
                    }
                };
                writeln!(
                    o,
                    "{:>8} {:<12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>4}  {}",
                    s.conns,
                    t.tool.label(),
                    ms(t.wall()),
                    ms(min),
                    ms(max),
                    ms(t.median(|r| r.user)),
                    ms(t.median(|r| r.sys)),
                    ms(t.first.map(|f| f.wall)),
                    count(seen.sockets),
                    count(seen.ours),
                    count(seen.owned),
                    if t.tool.is_ss() || t.seen.is_none() || t.tool == Tool::NetnsExec {
                        "-".to_string()
                    } else {
                        seen.namespaces.to_string()
                    },
                    check
                )?;
            }
        }
        writeln!(o)
    }

    fn json(&self, bin: &Path, cfg: &SnapConfig) -> Json {
        use Json::{Arr, F, O, S, U};
        let timed = |t: &Timed| {
            O(vec![
                ("wall_secs", F(t.wall)),
                ("user_secs", F(t.user)),
                ("sys_secs", F(t.sys)),
            ])
        };
        let sizes = self
            .sizes
            .iter()
            .map(|s| {
                let commands = s
                    .tools
                    .iter()
                    .map(|t| {
                        let listed =
                            t.seen
                                .as_ref()
                                .filter(|_| t.tool != Tool::NetnsExec)
                                .map(|v| {
                                    O(vec![
                                        ("lines", U(v.lines)),
                                        ("sockets", U(v.sockets)),
                                        ("test_established", U(v.ours)),
                                        ("owned_by_helper", U(v.owned)),
                                        ("namespaces", U(v.namespaces)),
                                    ])
                                });
                        (
                            t.tool.key(),
                            O(vec![
                                ("argv", Arr(t.argv.iter().cloned().map(S).collect())),
                                ("timed_out", Json::Bool(t.timed_out)),
                                ("median_wall_secs", Json::opt(t.wall(), F)),
                                ("median_user_secs", Json::opt(t.median(|r| r.user), F)),
                                ("median_sys_secs", Json::opt(t.median(|r| r.sys), F)),
                                ("first_run", Json::opt(t.first.as_ref(), timed)),
                                ("listed", listed.unwrap_or(Json::Null)),
                                (
                                    "complete",
                                    Json::opt(
                                        t.complete(s.conns).filter(|_| t.tool != Tool::NetnsExec),
                                        Json::Bool,
                                    ),
                                ),
                                ("runs", Arr(t.runs.iter().map(timed).collect())),
                            ]),
                        )
                    })
                    .collect();
                let ratios = RATIOS
                    .iter()
                    .map(|&(n, d)| (ratio_key(n, d), Json::opt(s.ratio(n, d), F)))
                    .collect();
                O(vec![
                    ("conns", U(s.conns)),
                    ("sockets", U(2 * s.conns)),
                    ("netns", S(s.netns.clone())),
                    ("netns_inode", U(s.netns_inode)),
                    (
                        "helper_pids",
                        Arr(s.helper_pids.iter().map(|&p| U(p.into())).collect()),
                    ),
                    ("helpers_why", Json::opt(s.split.clone(), S)),
                    ("setup_secs", F(s.setup_secs)),
                    ("commands", O(commands)),
                    ("ratios", O(ratios)),
                ])
            })
            .collect();
        O(vec![
            ("schema", U(1)),
            (
                "config",
                O(vec![
                    ("conns", Arr(cfg.conns.iter().map(|&n| U(n)).collect())),
                    ("rounds", U(cfg.rounds as u64)),
                    ("timeout_secs", U(cfg.timeout.as_secs())),
                    ("bin", S(bin.display().to_string())),
                    ("ss_version", S(self.ss_version.clone())),
                ]),
            ),
            ("note", S(SNAPSHOT_NOTE.to_string())),
            ("sizes", Arr(sizes)),
        ])
    }
}

/// Lines read from `r` on a thread, until it closes (the child exits).
fn line_channel(r: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, lines) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_and_even() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
    }

    #[test]
    fn truncated_names_are_expanded() {
        assert_eq!(full_name("ka_reset_receiv"), "ka_reset_received");
        assert_eq!(full_name("ka_state"), "ka_state");
        assert_eq!(full_name("ka_other"), "ka_other");
    }

    #[test]
    fn fdinfo_lines() {
        let m = fdinfo("pos:\t0\nprog_type:\t26\nprog_id:\t351\nrun_time_ns:\t10\n");
        assert_eq!(m.get("prog_id"), Some(&"351"));
        assert_eq!(m.get("run_time_ns"), Some(&"10"));
    }

    #[test]
    fn json_is_escaped() {
        let j = Json::O(vec![
            ("a", Json::S("x\"y\\\n".into())),
            ("b", Json::F(1.0)),
            ("c", Json::F(f64::NAN)),
            (
                "d",
                Json::Arr(vec![Json::U(1), Json::Null, Json::Bool(true)]),
            ),
        ]);
        assert_eq!(
            j.to_string(),
            r#"{"a":"x\"y\\\n","b":1.0,"c":null,"d":[1,null,true]}"#
        );
    }

    #[test]
    fn snapshot_options() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(wants_snapshot(&args(&["--rounds", "2", "--snapshot"])));
        assert!(!wants_snapshot(&args(&[
            "--rounds",
            "2",
            "--",
            "--snapshot"
        ])));
        assert!(!wants_snapshot(&args(&["--conns", "4"])));
        let o = SnapshotOpts::try_parse_from(["b", "--snapshot"]).unwrap();
        assert_eq!(o.conns, vec![10_000, 100_000]);
        assert_eq!(o.rounds, 5);
        let o = SnapshotOpts::try_parse_from(["b", "--snapshot", "--conns", "10,20,30"]).unwrap();
        assert_eq!(o.conns, vec![10, 20, 30]);
        assert!(SnapshotOpts::try_parse_from(["b", "--conns", "0"]).is_err());
    }

    #[test]
    fn ss_lines_are_counted() {
        let mut c = LineCounter::new(Tool::SsProcs, 7, &[42]);
        for l in [
            "State  Recv-Q Send-Q Local Address:Port Peer Address:Port Process",
            "LISTEN 0      128    127.0.0.1:5001     0.0.0.0:*         users:((\"xtask\",pid=42,fd=3))",
            "\t cubic cwnd:10",
            "ESTAB  0      0      127.0.0.1:40000    127.0.0.1:5001    users:((\"xtask\",pid=42,fd=4))",
            "\t cubic wscale:7,7 rto:201",
            "ESTAB  0      0      127.0.0.1:5001     127.0.0.1:40000   users:((\"xtask\",pid=420,fd=5))",
        ] {
            c.line(format!("{l}\n").as_bytes());
        }
        let s = c.finish();
        assert_eq!((s.lines, s.sockets, s.ours, s.owned), (6, 3, 2, 1));
    }

    #[test]
    fn snapshot_lines_are_counted() {
        let mut c = LineCounter::new(Tool::Snapshot, 7, &[42]);
        for l in [
            r#"{"netns":7,"owners":[{"pid":42,"comm":"xtask"}],"state":"ESTABLISHED"}"#,
            r#"{"netns":7,"owners":[{"comm":"xtask","pid":421}],"state":"ESTABLISHED"}"#,
            r#"{"netns":7,"owners":[],"state":"LISTEN"}"#,
            r#"{"netns":77,"owners":[{"comm":"xtask","pid":42}],"state":"ESTABLISHED"}"#,
            r#"{"netns":7,"owners":[{"pid":1,"comm":"x"},{"pid":42,"comm":"y"}],"state":"ESTABLISHED"}"#,
        ] {
            c.line(format!("{l}\n").as_bytes());
        }
        let s = c.finish();
        assert_eq!(
            (s.lines, s.sockets, s.ours, s.owned, s.namespaces),
            (5, 5, 3, 2, 2)
        );
    }

    #[test]
    fn bounded_runs_time_out() {
        let argv = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (t, _) = run_bounded(&argv(&["sleep", "5"]), Duration::from_millis(200), None).unwrap();
        assert!(t.is_none());
        let (t, _) = run_bounded(&argv(&["true"]), Duration::from_secs(5), None).unwrap();
        assert!(t.unwrap().wall < 5.0);
        assert!(run_bounded(&argv(&["false"]), Duration::from_secs(5), None).is_err());
    }

    #[test]
    fn workloads_run_on_loopback() {
        let rr = request_response(2, Duration::from_millis(200)).unwrap();
        assert!(rr.ops > 0 && rr.errors == 0, "{rr:?}");
        let ch = churn(2, Duration::from_millis(200)).unwrap();
        assert!(ch.ops > 0 && ch.errors == 0, "{ch:?}");
    }
}
