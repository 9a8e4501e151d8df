//! The loopback TCP load every phase runs (Rust std only, 127.0.0.1):
//! - *request/response*: persistent connections, each a client thread
//!   sending a 64-byte request and a server thread answering with 64
//!   bytes; transactions/s. No state changes happen, so this shows the
//!   cost of the always-on hooks (timers) and of sharing the CPUs.
//! - *connection churn*: client threads each connecting, sending one
//!   request, reading the response and closing, over and over, against
//!   two accepting server threads (the server closes first, so TIME_WAIT
//!   stays on the server side and ephemeral ports are not exhausted);
//!   connections/s, optionally paced to a fixed rate (the memory soak).

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;

use super::interrupted;

/// Request and response size in bytes.
pub const MSG: usize = 64;
/// Server threads of the churn workload.
pub const CHURN_SERVERS: usize = 2;
/// Bound on every blocking socket operation.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an idle churn server waits in accept() before checking for stop.
const ACCEPT_POLL: Duration = Duration::from_millis(100);

/// One workload run.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Sample {
    /// Completed transactions (request/response) or connections (churn).
    pub ops: u64,
    /// Failed attempts (timeouts, refused connections...).
    pub errors: u64,
    pub secs: f64,
}

impl Sample {
    pub fn rate(&self) -> f64 {
        if self.secs > 0.0 {
            self.ops as f64 / self.secs
        } else {
            0.0
        }
    }
}

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
pub fn request_response(conns: usize, dur: Duration) -> Result<Sample> {
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

/// Connect, one request/response, close; `clients` threads for `dur`, as
/// fast as they can or, with `rate`, at about that many connections/s.
pub fn churn(clients: usize, dur: Duration, rate: Option<f64>) -> Result<Sample> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1")?;
    let addr = listener.local_addr()?;
    testkit::sock::set_accept_timeout(&listener, ACCEPT_POLL)
        .context("setting SO_RCVTIMEO on the listener")?;
    let stop = AtomicBool::new(false);
    let deadline = Instant::now() + dur;
    // Each client's gap between connection starts when paced.
    let gap = rate.map(|r| Duration::from_secs_f64(clients as f64 / r.max(1e-3)));
    let (client_results, server_results) = thread::scope(|s| {
        let servers: Vec<_> = (0..CHURN_SERVERS)
            .map(|_| s.spawn(|| churn_server(&listener, &stop)))
            .collect();
        let cls: Vec<_> = (0..clients)
            .map(|_| s.spawn(move || churn_client(addr, deadline, gap)))
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
fn churn_client(addr: SocketAddr, deadline: Instant, gap: Option<Duration>) -> (u64, u64) {
    let (mut ok, mut errors) = (0, 0);
    let mut next = Instant::now();
    while Instant::now() < deadline && !interrupted() {
        if let Some(gap) = gap {
            if next >= deadline {
                break;
            }
            let now = Instant::now();
            if next > now {
                thread::sleep(next - now);
            }
            next += gap;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_run_on_loopback() {
        let rr = request_response(2, Duration::from_millis(200)).unwrap();
        assert!(rr.ops > 0 && rr.errors == 0, "{rr:?}");
        let ch = churn(2, Duration::from_millis(200), None).unwrap();
        assert!(ch.ops > 0 && ch.errors == 0, "{ch:?}");
    }

    #[test]
    fn paced_churn_never_exceeds_its_rate() {
        // 2 clients, 100 conn/s each: at most 100 starts each in 1 s
        // (a loaded machine may make fewer, never more).
        let ch = churn(2, Duration::from_millis(1000), Some(200.0)).unwrap();
        assert!(ch.ops > 0 && ch.ops <= 200, "{ch:?}");
    }
}
