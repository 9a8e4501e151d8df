//! The event file of `serve`: JSON lines appended to a file created 0640
//! without following a symlink, each line whole in one file, rotated by
//! size (`FILE.1` is the newest old file, up to `FILE.KEEP`) and reopened
//! on request (SIGHUP, after logrotate moved it away).

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub struct EventFile {
    path: PathBuf,
    out: BufWriter<File>,
    /// Bytes in the current file, written or buffered.
    size: u64,
    rotate_size: Option<u64>,
    keep: usize,
}

fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

fn numbered(path: &Path, n: usize) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

impl EventFile {
    pub fn open(path: &Path, rotate_size: Option<u64>, keep: usize) -> Result<EventFile> {
        let f = open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let size = f.metadata()?.len();
        Ok(EventFile {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(64 * 1024, f),
            size,
            rotate_size,
            keep,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one whole line (with its newline).
    pub fn write_line(&mut self, line: &[u8]) -> Result<()> {
        if let Some(limit) = self.rotate_size
            && self.size > 0
            && self.size + line.len() as u64 > limit
        {
            self.rotate()?;
        }
        self.out
            .write_all(line)
            .with_context(|| format!("writing {}", self.path.display()))?;
        self.size += line.len() as u64;
        Ok(())
    }

    pub fn flush(&mut self) -> Result<()> {
        self.out
            .flush()
            .with_context(|| format!("writing {}", self.path.display()))
    }

    /// Starts a new file at the path (the old one was moved away).
    pub fn reopen(&mut self) -> Result<()> {
        self.flush()?;
        let f =
            open(&self.path).with_context(|| format!("cannot reopen {}", self.path.display()))?;
        self.size = f.metadata()?.len();
        self.out = BufWriter::with_capacity(64 * 1024, f);
        Ok(())
    }

    /// FILE -> FILE.1 -> ... -> FILE.KEEP (dropped).
    fn rotate(&mut self) -> Result<()> {
        self.flush()?;
        if self.keep == 0 {
            std::fs::remove_file(&self.path).ok();
        } else {
            for n in (1..self.keep).rev() {
                let from = numbered(&self.path, n);
                if from.exists() {
                    std::fs::rename(&from, numbered(&self.path, n + 1))
                        .with_context(|| format!("rotating {}", from.display()))?;
                }
            }
            // Moved away already (logrotate before our SIGHUP): nothing to rename.
            match std::fs::rename(&self.path, numbered(&self.path, 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("rotating {}", self.path.display()));
                }
                _ => {}
            }
        }
        self.reopen()
    }
}
