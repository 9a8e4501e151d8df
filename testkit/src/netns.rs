//! Network namespaces made with `ip netns add` (deleted on drop), commands
//! and threads run inside them, and veth pairs joining two of them.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Runs `cmd` (`what` names it in errors); its stdout, or an error with
/// its stderr.
fn stdout_of(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{what}`: run `cargo xtask setup`"))?;
    if !out.status.success() {
        bail!(
            "`{what}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `sh -c CMD`; its stdout.
pub fn sh(cmd: &str) -> Result<String> {
    stdout_of(Command::new("sh").arg("-c").arg(cmd), cmd)
}

/// Runs `ip ARGS` (iproute2).
pub fn ip(args: &[&str]) -> Result<()> {
    stdout_of(
        Command::new("ip").args(args),
        &format!("ip {}", args.join(" ")),
    )
    .map(drop)
}

/// A network namespace with `lo` up; deleted on drop.
#[derive(Debug)]
pub struct NamedNetns {
    pub name: String,
}

impl NamedNetns {
    pub fn create(name: &str) -> Result<NamedNetns> {
        ip(&["netns", "add", name])?;
        let ns = NamedNetns {
            name: name.to_string(),
        };
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `/run/netns/NAME`, the file that keeps it alive.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// The namespace's inode, the id the monitor reports as `netns`.
    pub fn inode(&self) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let path = self.path();
        Ok(std::fs::metadata(&path)
            .with_context(|| format!("stat {}", path.display()))?
            .ino())
    }

    /// Runs the shell command `cmd` inside the namespace; its stdout.
    pub fn exec(&self, cmd: &str) -> Result<String> {
        stdout_of(
            Command::new("ip").args(["netns", "exec", &self.name, "sh", "-c", cmd]),
            &format!("{cmd}` in `{}", self.name),
        )
    }

    /// Runs `f` on a new thread that has joined the namespace: sockets it
    /// creates live there.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let path = self.path();
        std::thread::spawn(move || -> Result<T> {
            join_netns(&path)?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("a thread in namespace {} panicked", self.name))?
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Moves the calling thread (the whole process, if single-threaded) into
/// the network namespace at `path`.
pub fn join_netns(path: &std::path::Path) -> Result<()> {
    let fd = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: setns on a valid namespace fd; affects only this thread.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("setns {}", path.display()));
    }
    Ok(())
}

/// The two ends of a veth link, named `ka`/`kb` + `tag`, one in each
/// namespace, with the given `addr/prefix` (IPv4 and IPv6 each) and up.
pub fn veth(
    a: &NamedNetns,
    b: &NamedNetns,
    tag: &str,
    a_addrs: &[&str],
    b_addrs: &[&str],
) -> Result<()> {
    let (va, vb) = (format!("kva{tag}"), format!("kvb{tag}"));
    ip(&[
        "link", "add", &va, "netns", &a.name, "type", "veth", "peer", "name", &vb, "netns", &b.name,
    ])?;
    for (ns, dev, addrs) in [(a, &va, a_addrs), (b, &vb, b_addrs)] {
        for addr in addrs {
            if addr.contains(':') {
                ip(&[
                    "-n", &ns.name, "-6", "addr", "add", addr, "dev", dev, "nodad",
                ])?;
            } else {
                ip(&["-n", &ns.name, "addr", "add", addr, "dev", dev])?;
            }
        }
        ip(&["-n", &ns.name, "link", "set", dev, "up"])?;
    }
    Ok(())
}
