//! The peer row: bpftrace on the same TCP tracepoints keepalive hooks
//! (state changes, retransmits, resets sent and received), printing one
//! JSON line per event, which this process reads and discards (counting
//! them), the way `keepalive record --output /dev/null` discards its own.
//! The obvious alternative to keepalive, measured on the same workloads.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::interrupted;

/// What it prints once every probe is attached (BEGIN runs after that).
const READY: &str = "ready";
/// How long bpftrace may take to compile and attach.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The script: the four TCP tracepoints, JSON lines with the fields each
/// one offers.
pub const SCRIPT: &str = r#"
BEGIN { printf("ready\n"); }
tracepoint:sock:inet_sock_set_state /args->protocol == 6/ {
  printf("{\"event\":\"state\",\"ts\":%llu,\"pid\":%d,\"comm\":\"%s\",\"sport\":%d,\"dport\":%d,\"old\":%d,\"new\":%d}\n",
         nsecs, pid, comm, args->sport, args->dport, args->oldstate, args->newstate);
}
tracepoint:tcp:tcp_retransmit_skb {
  printf("{\"event\":\"retransmit\",\"ts\":%llu,\"pid\":%d,\"comm\":\"%s\",\"sport\":%d,\"dport\":%d,\"state\":%d}\n",
         nsecs, pid, comm, args->sport, args->dport, args->state);
}
tracepoint:tcp:tcp_send_reset {
  printf("{\"event\":\"reset_sent\",\"ts\":%llu,\"pid\":%d,\"comm\":\"%s\",\"state\":%d,\"reason\":%d}\n",
         nsecs, pid, comm, args->state, args->reason);
}
tracepoint:tcp:tcp_receive_reset {
  printf("{\"event\":\"reset_received\",\"ts\":%llu,\"pid\":%d,\"comm\":\"%s\",\"sport\":%d,\"dport\":%d}\n",
         nsecs, pid, comm, args->sport, args->dport);
}
"#;

/// The command line, for the report.
pub fn argv() -> Vec<String> {
    ["bpftrace", "-e", "<peer script>"]
        .map(String::from)
        .to_vec()
}

/// A running bpftrace; killed on drop unless stopped.
pub struct Peer {
    child: Option<Child>,
    /// Lines counted after the ready line (its events).
    counted: Option<JoinHandle<u64>>,
    stderr: mpsc::Receiver<String>,
    /// From the spawn to the ready line (probes compiled and attached).
    pub ready_after: Duration,
}

impl Peer {
    /// Starts bpftrace on [`SCRIPT`] and waits until its probes are attached.
    pub fn start() -> Result<Peer> {
        Peer::start_script(SCRIPT)
    }

    /// Starts bpftrace on `script` (which prints [`READY`] from BEGIN) and
    /// waits until its probes are attached.
    pub fn start_script(script: &str) -> Result<Peer> {
        let t0 = Instant::now();
        let mut child = Command::new("bpftrace")
            .args(["-e", script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run bpftrace: `cargo xtask setup --bench` installs it")?;
        let stderr = testkit::line_channel(child.stderr.take().expect("stderr is piped"));
        let stdout = child.stdout.take().expect("stdout is piped");
        let (ready_tx, ready_rx) = mpsc::channel();
        let counted = thread::spawn(move || count_after_ready(stdout, ready_tx));
        let mut peer = Peer {
            child: Some(child),
            counted: Some(counted),
            stderr,
            ready_after: Duration::ZERO,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match ready_rx.recv_timeout(Duration::from_millis(200)) {
                Ok(()) => {
                    peer.ready_after = t0.elapsed();
                    return Ok(peer);
                }
                Err(mpsc::RecvTimeoutError::Timeout)
                    if Instant::now() < deadline && !interrupted() => {}
                Err(_) => {
                    let status = peer
                        .child
                        .as_mut()
                        .and_then(|c| c.try_wait().ok().flatten());
                    let err: Vec<String> = peer.stderr.try_iter().collect();
                    bail!(
                        "bpftrace did not attach its probes (exit {status:?}); its stderr:\n{}",
                        err.join("\n")
                    );
                }
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("bpftrace already stopped").id()
    }

    /// SIGINT, wait; returns (events printed, events bpftrace says it lost).
    pub fn stop(&mut self) -> Result<(u64, u64)> {
        let mut child = self.child.take().expect("bpftrace already stopped");
        // SAFETY: kill(2) on our own child, not reaped yet.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("bpftrace did not exit within 20 s of SIGINT");
            }
            thread::sleep(Duration::from_millis(20));
        }
        let events = self.counted.take().and_then(|h| h.join().ok()).unwrap_or(0);
        let lost = self.stderr.try_iter().filter_map(|l| lost_in(&l)).sum();
        Ok((events, lost))
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Reads `r` to the end: signals `ready` at the ready line, then counts
/// the lines after it.
fn count_after_ready(r: impl Read, ready: mpsc::Sender<()>) -> u64 {
    let mut r = BufReader::with_capacity(1 << 20, r);
    let mut line = String::new();
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return 0,
            Ok(_) if line.trim_end() == READY => break,
            Ok(_) => {}
        }
    }
    let _ = ready.send(());
    let mut n = 0;
    loop {
        let buf = match r.fill_buf() {
            Ok([]) | Err(_) => return n,
            Ok(buf) => buf,
        };
        n += buf.iter().filter(|&&b| b == b'\n').count() as u64;
        let len = buf.len();
        r.consume(len);
    }
}

/// `Lost 123 events` (bpftrace's report of a full perf buffer).
fn lost_in(line: &str) -> Option<u64> {
    let rest = line.trim().strip_prefix("Lost ")?;
    let (n, tail) = rest.split_once(' ')?;
    tail.starts_with("events").then(|| n.parse().ok())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_after_ready_are_counted() {
        let text = "Attaching 5 probes...\nready\n{\"a\":1}\n{\"a\":2}\n{\"a\":3}\n";
        let (tx, rx) = mpsc::channel();
        assert_eq!(count_after_ready(text.as_bytes(), tx), 3);
        assert!(rx.try_recv().is_ok());
        let (tx, rx) = mpsc::channel();
        assert_eq!(count_after_ready("Attaching\nERROR\n".as_bytes(), tx), 0);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn lost_events_lines() {
        assert_eq!(lost_in("Lost 1234 events"), Some(1234));
        assert_eq!(lost_in("Attaching 5 probes..."), None);
    }
}
