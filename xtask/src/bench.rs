//! `cargo xtask bench`: what the monitor costs, measured side by side in one
//! run.
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
}

/// Runs the benchmark with the release `keepalive` binary `bin`.
pub fn run(bin: &Path, args: &[String]) -> Result<()> {
    let opts = match Opts::try_parse_from(
        std::iter::once("cargo xtask bench".to_string()).chain(args.iter().cloned()),
    ) {
        Ok(o) => o,
        Err(e) if !e.use_stderr() => {
            // --help / --version
            print!("{e}");
            return Ok(());
        }
        Err(e) => {
            let msg = e.to_string();
            bail!("{}", msg.trim_start_matches("error: ").trim_end())
        }
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench loads eBPF programs and sets kernel.bpf_stats_enabled: run it as root");
    }
    if !bin.is_file() {
        bail!("{} does not exist", bin.display());
    }
    let _signals = SignalGuard::install();
    let cfg = Config {
        dur: Duration::from_secs(opts.seconds),
        rounds: opts.rounds as usize,
        conns: opts.conns as usize,
    };
    let report = measure(bin, &cfg)?;
    print!("{}", report.table(bin, &cfg));
    let path = summary_path(bin);
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(&path, format!("{}\n", report.json(bin, &cfg)))
        .with_context(|| format!("writing {}", path.display()))?;
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
        let (tx, lines) = mpsc::channel();
        // Ends when the child's stderr closes, i.e. when it exits.
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
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
    fn workloads_run_on_loopback() {
        let rr = request_response(2, Duration::from_millis(200)).unwrap();
        assert!(rr.ops > 0 && rr.errors == 0, "{rr:?}");
        let ch = churn(2, Duration::from_millis(200)).unwrap();
        assert!(ch.ops > 0 && ch.errors == 0, "{ch:?}");
    }
}
