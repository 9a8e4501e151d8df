//! Which processes hold which sockets: from the kernel's owner walk
//! (`iter/task_file` rows, [`from_rows`]), or else the socket inodes
//! behind /proc/PID/fd/*, like `ss -p` ([`scan`]).

use std::collections::HashMap;

use keepalive_common::OwnerRow;

use super::packed::Owners;
use crate::events::{Comm, Owner};

/// `PROC_PID_INIT_INO`: the inode of the initial pid namespace.
const INIT_PID_NS_INODE: u64 = 0xEFFF_FFFC;

/// The owner walk reports pids as the initial pid namespace numbers them;
/// they are the pids /proc shows only when we run in that namespace (not
/// in a container with its own).
pub fn kernel_pids_are_ours() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid").is_ok_and(|m| m.ino() == INIT_PID_NS_INODE)
}

/// Socket inode -> processes, from the owner walk's rows (in pid order,
/// as [`scan`] finds them). Names come from /proc/PID/comm, read once per
/// process; a process that exited since the walk is left out, as
/// [`scan`] would not have seen it either.
pub fn from_rows(rows: &[OwnerRow]) -> HashMap<u64, Vec<Owner>> {
    Holders::from_rows(rows).into_map()
}

/// [`from_rows`], with the owner lists shared (same order, same owners).
pub fn shared_from_rows(rows: &[OwnerRow]) -> SharedOwners {
    Holders::from_rows(rows).into_shared()
}

/// /proc/PID/comm as bytes (a name need not be UTF-8, and may end in
/// spaces or contain a newline): the kernel adds one newline.
fn read_comm(pid: u32) -> Comm {
    let bytes = std::fs::read(format!("/proc/{pid}/comm")).unwrap_or_default();
    Comm::from_bytes(bytes.strip_suffix(b"\n").unwrap_or(&bytes))
}

/// Socket inode -> processes that have it open.
pub fn scan() -> HashMap<u64, Vec<Owner>> {
    Holders::scan().into_map()
}

/// Socket inode -> the processes that hold it, each list shared by every
/// socket with the same holders (usually: one list per process), so a
/// socket costs a few bytes however many there are. The default is no
/// look-up at all (`--no-owners`), which is not evidence of no owner.
#[derive(Default)]
pub struct SharedOwners {
    /// (inode, index in `lists`), sorted by inode.
    by_ino: Vec<(u64, u32)>,
    lists: Vec<Owners>,
    /// The holders were looked up (a socket not listed has none).
    scanned: bool,
}

impl SharedOwners {
    pub fn scanned(&self) -> bool {
        self.scanned
    }

    pub fn get(&self, ino: u64) -> Option<&Owners> {
        let i = self.by_ino.binary_search_by_key(&ino, |&(i, _)| i).ok()?;
        self.lists.get(self.by_ino[i].1 as usize)
    }
}

/// [`scan`], with the owner lists shared (same order, same owners).
pub fn scan_shared() -> SharedOwners {
    Holders::scan().into_shared()
}

/// Who holds which socket, as found: each process once, and a (socket
/// inode, index in `procs`) pair per descriptor, in the order found.
#[derive(Default)]
struct Holders {
    procs: Vec<Owner>,
    pairs: Vec<(u64, u32)>,
}

impl Holders {
    /// From the kernel owner walk's rows.
    fn from_rows(rows: &[OwnerRow]) -> Holders {
        let mut h = Holders {
            procs: Vec::new(),
            pairs: Vec::with_capacity(rows.len()),
        };
        // pid -> index in procs, None when it exited since the walk.
        let mut index_of: HashMap<u32, Option<u32>> = HashMap::new();
        // A process's rows come together: look it up once per run.
        let mut last: Option<(u32, Option<u32>)> = None;
        for r in rows {
            let index = match last {
                Some((pid, index)) if pid == r.pid => index,
                _ => {
                    let index = *index_of.entry(r.pid).or_insert_with(|| {
                        let bytes = std::fs::read(format!("/proc/{}/comm", r.pid)).ok()?;
                        Some(h.add(
                            r.pid,
                            Comm::from_bytes(bytes.strip_suffix(b"\n").unwrap_or(&bytes)),
                        ))
                    });
                    last.insert((r.pid, index)).1
                }
            };
            if let Some(i) = index {
                h.pairs.push((r.ino, i));
            }
        }
        h
    }

    /// From the socket links behind every /proc/PID/fd/*.
    fn scan() -> Holders {
        let mut h = Holders::default();
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return h;
        };
        for p in dir.flatten() {
            let name = p.file_name();
            let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Some(fds) = FdDir::open(pid) else {
                continue;
            };
            let mut index = None;
            for ino in fds.socket_inodes() {
                let i = *index.get_or_insert_with(|| h.add(pid, read_comm(pid)));
                h.pairs.push((ino, i));
            }
        }
        h
    }

    fn add(&mut self, pid: u32, comm: Comm) -> u32 {
        self.procs.push(Owner { pid, comm });
        (self.procs.len() - 1) as u32
    }

    /// A list per socket, its holders in the order found.
    fn into_map(self) -> HashMap<u64, Vec<Owner>> {
        let mut map: HashMap<u64, Vec<Owner>> = HashMap::with_capacity(self.pairs.len());
        for (ino, i) in self.pairs {
            let owner = &self.procs[i as usize];
            let owners = map.entry(ino).or_default();
            if !owners.iter().any(|o| o.pid == owner.pid) {
                owners.push(owner.clone());
            }
        }
        map
    }

    /// The lists shared by every socket with the same holders.
    fn into_shared(mut self) -> SharedOwners {
        // Indices grow in the order the processes were found, so a
        // socket's holders keep that order.
        self.pairs.sort_unstable();
        self.pairs.dedup();
        let procs = &self.procs;
        let mut lists: Vec<Owners> = Vec::new();
        let mut alone: HashMap<u32, u32> = HashMap::new();
        let mut shared: HashMap<Vec<u32>, u32> = HashMap::new();
        let mut by_ino = Vec::new();
        for run in self.pairs.chunk_by(|a, b| a.0 == b.0) {
            let mut add = |holders: &[(u64, u32)]| {
                let list = holders.iter().map(|&(_, i)| procs[i as usize].clone());
                lists.push(Owners::new(list.collect()));
                (lists.len() - 1) as u32
            };
            let list = if let [(_, i)] = run {
                *alone.entry(*i).or_insert_with(|| add(run))
            } else {
                let key: Vec<u32> = run.iter().map(|&(_, i)| i).collect();
                *shared.entry(key).or_insert_with(|| add(run))
            };
            by_ino.push((run[0].0, list));
        }
        SharedOwners {
            by_ino,
            lists,
            scanned: true,
        }
    }
}

/// An open /proc/PID/fd directory. Links are read relative to it
/// (readlinkat), which spares the kernel a full path walk per descriptor.
struct FdDir {
    fd: std::os::fd::OwnedFd,
    names: Vec<std::ffi::OsString>,
}

impl FdDir {
    fn open(pid: u32) -> Option<FdDir> {
        use std::os::fd::FromRawFd;
        let path = std::ffi::CString::new(format!("/proc/{pid}/fd")).ok()?;
        // SAFETY: valid C string; the returned fd is owned below.
        let raw = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            return None;
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        let names = std::fs::read_dir(format!("/proc/self/fd/{raw}"))
            .ok()?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        Some(FdDir { fd, names })
    }

    fn socket_inodes(&self) -> impl Iterator<Item = u64> + '_ {
        use std::os::fd::AsRawFd;
        use std::os::unix::ffi::OsStrExt;
        let mut buf = [0u8; 64];
        self.names.iter().filter_map(move |name| {
            let name = std::ffi::CString::new(name.as_bytes()).ok()?;
            // SAFETY: valid dir fd, C string and buffer of the given size.
            let n = unsafe {
                libc::readlinkat(
                    self.fd.as_raw_fd(),
                    name.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            if n <= 0 {
                return None;
            }
            socket_inode(std::str::from_utf8(&buf[..n as usize]).ok()?)
        })
    }
}

/// `socket:[12345]` -> 12345.
pub fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_socket_links_only() {
        assert_eq!(socket_inode("socket:[4026]"), Some(4026));
        assert_eq!(socket_inode("pipe:[4026]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
        assert_eq!(socket_inode("socket:[x]"), None);
    }

    #[test]
    fn shared_owners_are_those_of_scan() {
        // Three sockets of our own, held through both scans: the test
        // needs no other process's sockets (a fresh machine may have few).
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _peer = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let _accepted = l.accept().unwrap();
        let (plain, shared) = (scan(), scan_shared());
        let mut same = 0;
        for (ino, owners) in &plain {
            // Sockets can come and go between the two scans.
            if let Some(s) = shared.get(*ino) {
                assert_eq!(&s[..], &owners[..], "inode {ino}");
                same += 1;
            }
        }
        assert!(same >= 3, "only {same} sockets in both scans");
        // Ours share one list.
        let mine: Vec<_> = plain
            .iter()
            .filter(|(_, o)| o.iter().any(|o| o.pid == std::process::id()))
            .filter_map(|(ino, _)| shared.get(*ino).cloned())
            .collect();
        assert!(
            mine.windows(2)
                .all(|w| std::sync::Arc::ptr_eq(&w[0], &w[1]))
        );
    }

    #[test]
    fn finds_our_own_socket() {
        use std::os::unix::fs::MetadataExt;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&l));
        let ino = std::fs::metadata(&fd_path).unwrap().ino();
        let map = scan();
        let owners = map.get(&ino).expect("own socket not found");
        assert!(owners.iter().any(|o| o.pid == std::process::id()));
    }
}
