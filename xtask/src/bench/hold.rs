//! The connections of `bench --snapshot` (and of the memory soak): helper
//! processes (this binary re-executed as the hidden `cargo xtask
//! bench-hold-conns`) that enter a test namespace, set its
//! `net.ipv4.ip_local_port_range` to "1024 65535", raise RLIMIT_NOFILE to
//! 2N + 64 (`fs.nr_open` is raised too if needed and restored
//! afterwards), listen on 127.0.0.1-4 x 4+ ports (below 1024, outside that
//! range), then connect and accept N connections and hold them until the
//! benchmark ends (a helper also dies with it). Without CAP_SYS_RESOURCE
//! (e.g. in a container) RLIMIT_NOFILE cannot go above its hard limit, so
//! the connections are spread over as many helpers (each on its own
//! ports) as that limit requires.

use std::fs;
use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;

use testkit::NamedNetns;

use super::{HOLD_SUBCOMMAND, interrupted};

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

/// N connections held by helper processes in a namespace; the helpers are
/// killed (and `fs.nr_open` restored) on drop.
pub struct Held {
    holders: Vec<Holder>,
    /// Seconds the helpers took to make the connections.
    pub setup_secs: f64,
    /// Why the connections are spread over several helpers, if they are.
    pub split: Option<String>,
    _nr_open: Option<Sysctl>,
}

impl Held {
    /// Makes `conns` connections in `ns`; `who` prefixes the progress lines.
    pub fn make(ns: &NamedNetns, conns: u64, who: &str) -> Result<Held> {
        let exe = std::env::current_exe().context("locating the xtask binary for the helper")?;
        let (per_helper, split) = conns_per_helper(conns)?;
        let helpers = conns.div_ceil(per_helper);
        let fds = 2 * conns.min(per_helper) + HOLD_SPARE_FDS;
        let nr_open: u64 = fs::read_to_string(NR_OPEN_SYSCTL)
            .with_context(|| format!("reading {NR_OPEN_SYSCTL}"))?
            .trim()
            .parse()
            .with_context(|| format!("parsing {NR_OPEN_SYSCTL}"))?;
        let _nr_open = if fds > nr_open {
            eprintln!("{who}: raising fs.nr_open from {nr_open} to {fds} for the helper");
            Some(Sysctl::set(NR_OPEN_SYSCTL, &fds.to_string())?)
        } else {
            None
        };
        if let Some(why) = &split {
            eprintln!("{who}: {why}: {helpers} helper processes");
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
            holders.push(Holder::spawn(
                &exe,
                &ns.path(),
                n,
                first_port as u16,
                ports,
            )?);
            first_port += ports;
        }
        for h in &mut holders {
            h.wait_ready()?;
        }
        let held = Held {
            holders,
            setup_secs: t0.elapsed().as_secs_f64(),
            split,
            _nr_open,
        };
        eprintln!(
            "{who}: {} helper(s) (pid {}) hold {conns} connections ({} sockets), made in {:.2} s",
            held.holders.len(),
            held.pids()
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(","),
            2 * conns,
            held.setup_secs
        );
        Ok(held)
    }

    pub fn pids(&self) -> Vec<u32> {
        self.holders.iter().map(Holder::pid).collect()
    }
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
        let lines = testkit::line_channel(stdout);
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
    // Single-threaded, so the whole process moves into the namespace.
    testkit::netns::join_netns(&o.netns)?;
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
            testkit::sock::set_accept_timeout(&l, HOLD_IO_TIMEOUT)
                .context("setting SO_RCVTIMEO on a listener")?;
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
