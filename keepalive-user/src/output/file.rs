//! Files we write lines to (`record --output`, `--table-dump`, `serve
//! --output`) and stdout: opened without following links, created 0640,
//! written in whole lines only, reopened on SIGHUP, optionally rotated by
//! size.
//!
//! We run as root and are often pointed at shared directories such as
//! /tmp, so the last path component is opened with `O_NOFOLLOW` (a planted
//! symlink is refused), a new file is created with `O_EXCL`, an existing
//! regular file is checked on the opened descriptor (not by name) before it
//! is truncated: one with more than one hard link, or one in a sticky
//! directory owned by a user other than us and the directory's owner, is
//! refused. Character devices and FIFOs (`/dev/null`, a named pipe) are
//! written as streams.
//!
//! Lines are buffered and written when the buffer fills or on
//! [`LineFile::flush`]. When a write fails part-way (disk full, quota), a
//! regular file is cut back to the end of the last whole line, so a reader
//! never sees half a line; the error says how many lines were written and
//! how many were not.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, ErrorKind, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

/// Mode of the files we create: events carry process names and addresses.
pub const FILE_MODE: u32 = 0o640;

/// Written to the file once this much is buffered, whatever the caller's
/// flush rhythm.
const FLUSH_AT: usize = 256 * 1024;

/// How to open and grow a file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileOptions {
    /// Keep what the file holds and write after it (else truncate it).
    pub append: bool,
    /// Rotate before a line would take the file past this many bytes.
    pub rotate_size: Option<u64>,
    /// Rotated files kept (`FILE.1` newest … `FILE.N`); 0 keeps none (the
    /// file is emptied instead).
    pub rotate_keep: u32,
}

impl FileOptions {
    /// Checks the rotation settings; errors name the flags.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(size) = self.rotate_size
            && size < MIN_ROTATE_SIZE
        {
            return Err(format!(
                "--rotate-size must be at least {MIN_ROTATE_SIZE} bytes, got {size}"
            ));
        }
        if self.rotate_keep > MAX_ROTATE_KEEP {
            return Err(format!(
                "--rotate-keep must be at most {MAX_ROTATE_KEEP}, got {}",
                self.rotate_keep
            ));
        }
        Ok(())
    }
}

/// Smallest rotation size: a few lines' worth, so rotation never runs per line.
pub const MIN_ROTATE_SIZE: u64 = 4096;
/// Most rotated files kept.
pub const MAX_ROTATE_KEEP: u32 = 1000;

/// What the descriptor is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// A regular file: truncated on a partial write, rotatable.
    Regular,
    /// stdout, a character device or a FIFO: written as a stream.
    Stream,
}

/// A write that failed; `lines_written` made it to the file whole, the
/// `lines_unwritten` did not (none was written in part).
#[derive(Debug)]
pub struct WriteError {
    pub what: String,
    pub source: io::Error,
    pub lines_written: u64,
    pub lines_unwritten: u64,
}

impl WriteError {
    /// The reader went away (`| head`): not an error to report.
    pub fn is_broken_pipe(&self) -> bool {
        self.source.kind() == ErrorKind::BrokenPipe
    }
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "writing {}: {} ({} whole lines written, {} not written)",
            self.what, self.source, self.lines_written, self.lines_unwritten
        )
    }
}

impl std::error::Error for WriteError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// A file (or stdout) written in whole lines.
pub struct LineFile {
    /// `None` for stdout.
    path: Option<PathBuf>,
    file: File,
    target: Target,
    opts: FileOptions,
    buf: Vec<u8>,
    /// Lines in `buf`.
    buffered: u64,
    /// Lines written whole, over the life of this writer (all files).
    written: u64,
    /// Bytes in the current file as of the last flush (regular files).
    size: u64,
    /// Set once a write failed: later lines are counted, not written.
    failed: bool,
    /// Lines refused after the failure.
    dropped: u64,
}

fn errno_io(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

/// `PATH` split into an opened parent directory and the last component.
fn split(path: &Path) -> io::Result<(OwnedFd, OsString)> {
    let name = path
        .file_name()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| io::Error::new(ErrorKind::InvalidInput, "not a file name"))?;
    if path.as_os_str().as_bytes().ends_with(b"/") {
        return Err(io::Error::new(ErrorKind::InvalidInput, "not a file name"));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = rustix::fs::open(
        parent,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno_io)?;
    Ok((dir, name.to_os_string()))
}

/// Opens `name` in `dir` for writing without following a link: creates it
/// (0640) or opens what is there after checking it is safe to write.
fn open_in(dir: &OwnedFd, name: &OsStr, truncate: bool) -> io::Result<(File, Target)> {
    let base = OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::APPEND;
    // A name that disappears between the two opens is retried; one that
    // keeps flipping is someone playing games.
    for _ in 0..8 {
        match rustix::fs::openat(
            dir,
            name,
            base | OFlags::CREATE | OFlags::EXCL,
            Mode::from_raw_mode(FILE_MODE),
        ) {
            Ok(fd) => return Ok((File::from(fd), Target::Regular)),
            Err(Errno::EXIST) => {}
            Err(e) => return Err(errno_io(e)),
        }
        // NONBLOCK: opening a FIFO nobody reads fails instead of hanging.
        let fd = match rustix::fs::openat(dir, name, base | OFlags::NONBLOCK, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => continue,
            Err(Errno::LOOP) => {
                return Err(io::Error::new(
                    ErrorKind::InvalidInput,
                    "is a symbolic link; refusing to follow it",
                ));
            }
            Err(Errno::NXIO) => {
                return Err(io::Error::new(
                    ErrorKind::InvalidInput,
                    "is a FIFO with no reader",
                ));
            }
            Err(e) => return Err(errno_io(e)),
        };
        let file = File::from(fd);
        let meta = file.metadata()?;
        let ft = meta.file_type();
        use std::os::unix::fs::FileTypeExt;
        if ft.is_char_device() || ft.is_fifo() {
            rustix::fs::fcntl_setfl(&file, OFlags::APPEND).map_err(errno_io)?;
            return Ok((file, Target::Stream));
        }
        if !ft.is_file() {
            return Err(io::Error::new(
                ErrorKind::InvalidInput,
                "is not a regular file, character device or FIFO",
            ));
        }
        rustix::fs::fcntl_setfl(&file, OFlags::APPEND).map_err(errno_io)?;
        check_regular(dir, &meta)?;
        if truncate {
            file.set_len(0)?;
        }
        return Ok((file, Target::Regular));
    }
    Err(io::Error::new(
        ErrorKind::InvalidInput,
        "keeps appearing and disappearing; refusing to write it",
    ))
}

/// Refuses an existing regular file that another user may have planted.
fn check_regular(dir: &OwnedFd, meta: &std::fs::Metadata) -> io::Result<()> {
    if meta.nlink() > 1 {
        return Err(io::Error::new(
            ErrorKind::InvalidInput,
            format!(
                "has {} hard links; refusing to write a file that is also elsewhere",
                meta.nlink()
            ),
        ));
    }
    let dir_meta = rustix::fs::fstat(dir).map_err(errno_io)?;
    let sticky = dir_meta.st_mode & libc::S_ISVTX != 0;
    let me = rustix::process::geteuid().as_raw();
    if sticky && meta.uid() != me && meta.uid() != dir_meta.st_uid {
        return Err(io::Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "is owned by uid {} in a sticky directory (anyone could have planted it); remove it or write elsewhere",
                meta.uid()
            ),
        ));
    }
    Ok(())
}

impl LineFile {
    /// Creates (or truncates, or appends to) `path`. The error names the
    /// file and says why, e.g. `cannot create /tmp/x: is a symbolic link;
    /// refusing to follow it`.
    pub fn create(path: &Path, opts: FileOptions) -> anyhow::Result<LineFile> {
        opts.validate().map_err(anyhow::Error::msg)?;
        let (file, target) = split(path)
            .and_then(|(dir, name)| open_in(&dir, &name, !opts.append))
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
        let size = if target == Target::Regular {
            file.metadata().map(|m| m.len()).unwrap_or(0)
        } else {
            0
        };
        Ok(LineFile {
            path: Some(path.to_path_buf()),
            file,
            target,
            opts,
            buf: Vec::with_capacity(64 * 1024),
            buffered: 0,
            written: 0,
            size,
            failed: false,
            dropped: 0,
        })
    }

    /// Our stdout (a duplicate of fd 1), written as a stream.
    pub fn stdout() -> io::Result<LineFile> {
        let fd = io::stdout().as_fd().try_clone_to_owned()?;
        Ok(LineFile {
            path: None,
            file: File::from(fd),
            target: Target::Stream,
            opts: FileOptions::default(),
            buf: Vec::with_capacity(64 * 1024),
            buffered: 0,
            written: 0,
            size: 0,
            failed: false,
            dropped: 0,
        })
    }

    /// What this writes to, for messages.
    pub fn name(&self) -> String {
        match &self.path {
            Some(p) => p.display().to_string(),
            None => "stdout".into(),
        }
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Lines written whole so far.
    pub fn lines_written(&self) -> u64 {
        self.written
    }

    /// Lines that were not written (after a failure), including those
    /// still buffered.
    pub fn lines_unwritten(&self) -> u64 {
        self.dropped + if self.failed { self.buffered } else { 0 }
    }

    /// Adds one line (`line` without or with its trailing newline).
    pub fn write_line(&mut self, line: &[u8]) -> Result<(), WriteError> {
        self.line_with(|b| {
            b.extend_from_slice(line);
            Ok(())
        })
    }

    /// Adds one line that `f` writes into the buffer (e.g. with
    /// `serde_json::to_writer`); a newline is added when `f` did not end
    /// with one. When `f` fails, nothing of the line is kept.
    pub fn line_with(
        &mut self,
        f: impl FnOnce(&mut Vec<u8>) -> io::Result<()>,
    ) -> Result<(), WriteError> {
        if self.failed {
            self.dropped += 1;
            return Ok(());
        }
        let start = self.buf.len();
        if let Err(e) = f(&mut self.buf) {
            self.buf.truncate(start);
            return Err(self.error(e));
        }
        if self.buf.last() != Some(&b'\n') {
            self.buf.push(b'\n');
        }
        self.buffered += 1;
        let len = (self.buf.len() - start) as u64;
        if let Some(limit) = self.opts.rotate_size
            && self.target == Target::Regular
            && self.size + start as u64 + len > limit
            && self.size + start as u64 > 0
        {
            // The new line goes to the next file: write what came before it.
            let line = self.buf.split_off(start);
            self.buffered -= 1;
            if let Err(mut e) = self.flush() {
                self.dropped += 1;
                e.lines_unwritten += 1;
                return Err(e);
            }
            self.rotate().map_err(|e| {
                self.failed = true;
                self.dropped += 1;
                self.error(e)
            })?;
            self.buf = line;
            self.buffered = 1;
        }
        if self.buf.len() >= FLUSH_AT {
            self.flush()?;
        }
        Ok(())
    }

    fn error(&self, source: io::Error) -> WriteError {
        WriteError {
            what: self.name(),
            source,
            lines_written: self.written,
            lines_unwritten: self.lines_unwritten(),
        }
    }

    /// Writes every buffered line. On failure nothing is written in part:
    /// a regular file is cut back to its last whole line, the lines not
    /// written are counted, and later lines are dropped (and counted).
    pub fn flush(&mut self) -> Result<(), WriteError> {
        if self.failed {
            return Err(self.error(io::Error::other("an earlier write failed")));
        }
        if self.buf.is_empty() {
            return Ok(());
        }
        // Someone may have truncated the file (copytruncate): the size on
        // disk is where our bytes land (O_APPEND).
        if self.target == Target::Regular {
            self.size = self.file.metadata().map(|m| m.len()).unwrap_or(self.size);
        }
        let mut done = 0;
        let result = loop {
            if done == self.buf.len() {
                break Ok(());
            }
            match self.file.write(&self.buf[done..]) {
                Ok(0) => break Err(io::Error::from(ErrorKind::WriteZero)),
                Ok(n) => done += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        match result {
            Ok(()) => {
                // Everything made it: the lines are the ones counted in.
                self.written += self.buffered;
                self.size += done as u64;
                self.buf.clear();
                self.buffered = 0;
                Ok(())
            }
            Err(e) => {
                // Whole lines that made it (counted only here: scanning the
                // buffer on every flush cost more than the write).
                let whole = match self.buf[..done].iter().rposition(|&b| b == b'\n') {
                    Some(i) => i + 1,
                    None => 0,
                };
                let whole_lines = self.buf[..whole].iter().filter(|&&b| b == b'\n').count() as u64;
                self.written += whole_lines;
                if whole < done && self.target == Target::Regular {
                    // Best effort: truncating frees space, so it works on a
                    // full disk; if it fails the error below still stands.
                    let _ = self.file.set_len(self.size + whole as u64);
                }
                self.size += whole as u64;
                self.buffered -= whole_lines;
                self.failed = true;
                let err = self.error(e);
                self.dropped += self.buffered;
                self.buffered = 0;
                self.buf.clear();
                Err(err)
            }
        }
    }

    /// SIGHUP: flushes, then opens the path again (log rotation moved or
    /// removed the old file), appending if it exists. Stdout stays.
    pub fn reopen(&mut self) -> anyhow::Result<()> {
        self.flush().map_err(anyhow::Error::new)?;
        let Some(path) = self.path.clone() else {
            return Ok(());
        };
        let (file, target) = split(&path)
            .and_then(|(dir, name)| open_in(&dir, &name, false))
            .map_err(|e| anyhow::anyhow!("cannot reopen {}: {e}", path.display()))?;
        self.size = file.metadata().map(|m| m.len()).unwrap_or(0);
        self.file = file;
        self.target = target;
        Ok(())
    }

    /// Moves FILE to FILE.1 (FILE.1 to FILE.2, …, dropping the oldest) and
    /// starts an empty FILE.
    fn rotate(&mut self) -> io::Result<()> {
        let Some(path) = self.path.clone() else {
            return Ok(());
        };
        let (dir, name) = split(&path)?;
        let keep = self.opts.rotate_keep;
        if keep == 0 {
            self.file.set_len(0)?;
            self.size = 0;
            return Ok(());
        }
        let numbered = |i: u32| {
            let mut n = name.clone();
            n.push(format!(".{i}"));
            n
        };
        match rustix::fs::unlinkat(&dir, numbered(keep), rustix::fs::AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(e) => return Err(errno_io(e)),
        }
        for i in (1..keep).rev() {
            match rustix::fs::renameat(&dir, numbered(i), &dir, numbered(i + 1)) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(e) => return Err(errno_io(e)),
            }
        }
        match rustix::fs::renameat(&dir, &name, &dir, numbered(1)) {
            // Moved away already (logrotate, before its SIGHUP reached us):
            // our lines so far are in that file; start the new one.
            Ok(()) | Err(Errno::NOENT) => {}
            Err(e) => return Err(errno_io(e)),
        }
        let (file, target) = open_in(&dir, &name, true)?;
        self.file = file;
        self.target = target;
        self.size = 0;
        Ok(())
    }
}

impl Drop for LineFile {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

#[cfg(test)]
#[path = "file_tests.rs"]
mod tests;
