//! `keepalive` run as a child process: started, watched until it reports
//! its hooks attached, measured (CPU time, resident memory) and stopped by
//! a signal, its stderr kept for the report.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::lines::line_channel;

/// What `keepalive` prints on stderr once every hook is attached.
pub const READY_LINE: &str = "hooks attached";
/// What its final summary line (`stopped; emitted=.. received=.. lost=..`) contains.
pub const SUMMARY_LINE: &str = "stopped;";

/// A running `keepalive` child (`record` or any command that prints
/// [`READY_LINE`]); killed and reaped on drop unless stopped.
pub struct MonitorChild {
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    /// Every stderr line read so far.
    pub stderr: Vec<String>,
    /// From the spawn to the ready line.
    pub ready_after: Duration,
}

impl MonitorChild {
    /// Runs `bin ARGS` (stdin and stdout to /dev/null) and waits up to
    /// `within` for its ready line. `cancelled` is polled while waiting
    /// (a Ctrl-C flag); it fails the start when it turns true.
    pub fn start<I, S>(
        bin: &Path,
        args: I,
        within: Duration,
        cancelled: impl Fn() -> bool,
    ) -> Result<MonitorChild>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(bin);
        cmd.args(args);
        Self::spawn(cmd, within, cancelled)
    }

    /// Runs a prepared command (a shell wrapper, a changed environment)
    /// with stdin and stdout to /dev/null and waits up to `within` for its
    /// ready line, like [`MonitorChild::start`].
    pub fn spawn(
        mut cmd: Command,
        within: Duration,
        cancelled: impl Fn() -> bool,
    ) -> Result<MonitorChild> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
        let t0 = Instant::now();
        let lines = line_channel(child.stderr.take().expect("stderr is piped"));
        let mut mon = MonitorChild {
            child: Some(child),
            lines,
            stderr: Vec::new(),
            ready_after: Duration::ZERO,
        };
        if mon.read_until(READY_LINE, t0 + within, &cancelled) {
            mon.ready_after = t0.elapsed();
            return Ok(mon);
        }
        let why = match mon.child_mut().try_wait() {
            Ok(Some(status)) => format!("exited ({status})"),
            _ if cancelled() => "was interrupted".to_string(),
            _ => format!("did not attach its hooks within {} s", within.as_secs()),
        };
        bail!("keepalive {why}; its stderr:\n{}", mon.stderr.join("\n"));
    }

    /// Reads stderr lines (kept in [`Self::stderr`]) until one contains
    /// `needle`: true; false once `deadline` passes, `cancelled()` turns
    /// true or the child closes its stderr.
    fn read_until(
        &mut self,
        needle: &str,
        deadline: Instant,
        cancelled: impl Fn() -> bool,
    ) -> bool {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok(line) => {
                    let found = line.contains(needle);
                    self.stderr.push(line);
                    if found {
                        return true;
                    }
                }
                Err(RecvTimeoutError::Timeout) if !left.is_zero() && !cancelled() => {}
                Err(_) => return false,
            }
        }
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child
            .as_mut()
            .expect("the monitor was already stopped")
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .expect("the monitor was already stopped")
            .id()
    }

    /// Waits up to `within` for a stderr line containing `needle` (lines
    /// read on the way are kept in [`Self::stderr`] too).
    pub fn wait_line(&mut self, needle: &str, within: Duration) -> Result<()> {
        if self.stderr.iter().any(|l| l.contains(needle))
            || self.read_until(needle, Instant::now() + within, || false)
        {
            return Ok(());
        }
        bail!(
            "no stderr line with {needle:?} within {} s; its stderr:\n{}",
            within.as_secs(),
            self.stderr.join("\n")
        )
    }

    /// Sends `sig` without waiting.
    pub fn signal(&self, sig: i32) -> Result<()> {
        // SAFETY: kill(2) on our own child, which has not been reaped.
        if unsafe { libc::kill(self.pid() as libc::pid_t, sig) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("kill({}, {sig})", self.pid()));
        }
        Ok(())
    }

    /// Sends `sig`, waits up to `within` for the exit (then kills it), and
    /// reads the rest of its stderr. Returns how it exited.
    pub fn stop_with(&mut self, sig: i32, within: Duration) -> Result<ExitStatus> {
        self.signal(sig)?;
        self.wait_exit(within)
            .with_context(|| format!("after signal {sig}"))
    }

    /// Waits up to `within` for the child to exit by itself (then kills it
    /// and fails), and reads the rest of its stderr. Returns how it exited.
    pub fn wait_exit(&mut self, within: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(status) = self.child_mut().try_wait()? {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child_mut().kill();
                let _ = self.child_mut().wait();
                self.child = None;
                self.drain_stderr();
                bail!(
                    "keepalive did not exit within {} s; its stderr:\n{}",
                    within.as_secs(),
                    self.stderr.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        self.child = None;
        self.drain_stderr();
        Ok(status)
    }

    /// Reads what is left on stderr: the pipe closes when the child (and
    /// anything it forked) is gone.
    fn drain_stderr(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.stderr.push(line);
        }
    }

    /// `key=N` from its final summary line, once stopped.
    pub fn summary_field(&self, key: &str) -> Option<u64> {
        let line = self
            .stderr
            .iter()
            .rev()
            .find(|l| l.contains(SUMMARY_LINE))?;
        summary_field(line, key)
    }

    /// User + system CPU seconds it used so far (/proc/PID/stat).
    pub fn cpu_secs(&self) -> Result<f64> {
        cpu_secs(self.pid())
    }

    /// Its resident set size in bytes (VmRSS in /proc/PID/status).
    pub fn rss_bytes(&self) -> Result<u64> {
        rss_bytes(self.pid())
    }
}

impl Drop for MonitorChild {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `key=N` in a summary line such as `stopped; emitted=5, received=5, lost=0`.
pub fn summary_field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.trim_end_matches([',', ';']).parse().ok())
}

/// User + system CPU seconds process `pid` used so far.
pub fn cpu_secs(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
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

/// Resident set size of process `pid` in bytes.
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| anyhow!("no VmRSS in {path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_fields() {
        let l = "keepalive: stopped; emitted=12, received=10, lost=2";
        assert_eq!(summary_field(l, "emitted"), Some(12));
        assert_eq!(summary_field(l, "lost"), Some(2));
        assert_eq!(summary_field(l, "missing"), None);
    }

    #[test]
    fn own_cpu_and_memory() {
        let me = std::process::id();
        assert!(cpu_secs(me).unwrap() >= 0.0);
        assert!(rss_bytes(me).unwrap() > 0);
    }
}
