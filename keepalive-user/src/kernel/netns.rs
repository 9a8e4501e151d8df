//! Finds every network namespace reachable from here (those of running
//! processes and those bind-mounted under /run/netns) and enters them.

use std::collections::HashSet;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use anyhow::{Result, anyhow};

/// One network namespace, by a path that refers to it.
#[derive(Clone, Debug)]
pub struct Netns {
    pub inode: u64,
    pub path: PathBuf,
}

impl Netns {
    /// Moves the calling thread into this namespace.
    pub fn enter(&self) -> Result<()> {
        let f = File::open(&self.path)?;
        // SAFETY: valid fd of a network namespace; affects only this thread.
        let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        if r != 0 {
            return Err(anyhow!(
                "setns {}: {}",
                self.path.display(),
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }
}

/// Every distinct namespace: our own first, then processes', then named ones.
pub fn reachable() -> Vec<Netns> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut add = |path: PathBuf| {
        if let Ok(m) = std::fs::metadata(&path)
            && seen.insert(m.ino())
        {
            out.push(Netns {
                inode: m.ino(),
                path,
            });
        }
    };
    add(PathBuf::from("/proc/self/ns/net"));
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            if e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
            {
                add(e.path().join("ns/net"));
            }
        }
    }
    for d in ["/run/netns", "/var/run/netns"] {
        if let Ok(dir) = std::fs::read_dir(d) {
            for e in dir.flatten() {
                add(e.path());
            }
        }
    }
    out
}
