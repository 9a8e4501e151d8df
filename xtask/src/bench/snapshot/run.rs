//! One bounded, timed run of a command: wall time from just before the
//! spawn to the exit, user and system CPU time from wait4, killed after a
//! timeout.

use std::io::{self, BufRead, BufReader, ErrorKind, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::count::{LineCounter, Seen};
use crate::bench::{check_interrupted, interrupted};

/// Wall and CPU time of one run.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Timed {
    #[serde(rename = "wall_secs")]
    pub wall: f64,
    #[serde(rename = "user_secs")]
    pub user: f64,
    #[serde(rename = "sys_secs")]
    pub sys: f64,
}

/// Runs `argv` with stdout counted by `counter` (or sent to /dev/null),
/// killing it after `timeout`. Returns `None` on timeout; an error if it
/// fails. Wall time runs from just before the spawn to its exit.
pub fn run_bounded(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_runs_time_out() {
        let argv = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (t, _) = run_bounded(&argv(&["sleep", "5"]), Duration::from_millis(200), None).unwrap();
        assert!(t.is_none());
        let (t, _) = run_bounded(&argv(&["true"]), Duration::from_secs(5), None).unwrap();
        assert!(t.unwrap().wall < 5.0);
        assert!(run_bounded(&argv(&["false"]), Duration::from_secs(5), None).is_err());
    }
}
