//! `keepalive serve` run as a child process for the tests: started with
//! JSON logs, ready once it logs its hooks attached (which names the
//! metrics address it bound), stopped with a signal.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{keepalive_bin, line_channel, require_root};

pub struct Daemon {
    child: Option<Child>,
    stderr_rx: mpsc::Receiver<String>,
    /// Log lines (JSON objects) read so far.
    pub logs: Vec<Value>,
    pub metrics: SocketAddr,
}

impl Daemon {
    /// Runs `PREFIX... keepalive serve --log-format json ARGS` and waits
    /// for it to attach its hooks.
    pub fn start_with(prefix: &[&str], args: &[&str]) -> Daemon {
        require_root();
        let bin = keepalive_bin();
        let mut cmd = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        cmd.args(["serve", "--log-format", "json"]);
        // Only what the test says: not a configuration the host may have.
        if !args.contains(&"--config") {
            cmd.arg("--config").arg(empty_config());
        }
        let mut child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start keepalive serve");
        let stderr_rx = line_channel(child.stderr.take().unwrap());
        let mut d = Daemon {
            child: Some(child),
            stderr_rx,
            logs: Vec::new(),
            metrics: "0.0.0.0:0".parse().unwrap(),
        };
        let deadline = Instant::now() + crate::READY_WITHIN;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = d.stderr_rx.recv_timeout(left) else {
                let status = d.child.as_mut().unwrap().try_wait().ok().flatten();
                panic!(
                    "keepalive serve did not attach its hooks (exit {status:?}); logs: {:?}",
                    d.logs
                );
            };
            let v: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
            let ready = v["message"] == "serving; hooks attached";
            if ready {
                let url = v["metrics"].as_str().expect("metrics address in the log");
                d.metrics = url
                    .trim_start_matches("http://")
                    .trim_end_matches("/metrics")
                    .parse()
                    .unwrap();
            }
            d.logs.push(v);
            if ready {
                return d;
            }
        }
    }

    pub fn start(args: &[&str]) -> Daemon {
        Self::start_with(&[], args)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid() as i32, sig) };
    }

    /// SIGTERM, wait, and collect the remaining log lines; asserts a clean exit.
    pub fn stop(&mut self) {
        let mut child = self.child.take().expect("already stopped");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().unwrap();
        while let Ok(line) = self.stderr_rx.recv_timeout(Duration::from_secs(5)) {
            if let Ok(v) = serde_json::from_str(&line) {
                self.logs.push(v);
            } else {
                panic!("log line is not JSON: {line}");
            }
        }
        assert!(
            status.success(),
            "serve exited with {status}; logs: {:?}",
            self.logs
        );
    }

    /// A numeric field of the log line with `message`.
    pub fn logged(&self, message: &str, field: &str) -> u64 {
        self.logs
            .iter()
            .find(|l| l["message"] == message)
            .and_then(|l| l[field].as_u64())
            .unwrap_or_else(|| panic!("no `{message}` log with {field}: {:?}", self.logs))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// An empty configuration file (config files must be regular files), made
/// once per test process: serve then reads only what the test says, not a
/// configuration the host may have in /etc/keepalive.
pub fn empty_config() -> &'static std::path::Path {
    static PATH: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("ka-empty-config-{}.toml", std::process::id()));
        std::fs::write(&p, "").expect("writing an empty config file");
        p
    })
}
