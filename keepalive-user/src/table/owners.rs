//! Which processes hold which sockets: the socket inodes behind
//! /proc/PID/fd/*, like `ss -p`.

use std::collections::HashMap;

use crate::events::Owner;

/// Socket inode -> processes that have it open.
pub fn scan() -> HashMap<u64, Vec<Owner>> {
    let mut map: HashMap<u64, Vec<Owner>> = HashMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return map;
    };
    for p in procs.flatten() {
        let name = p.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let mut comm: Option<String> = None;
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let Some(ino) = socket_inode(target.as_os_str().to_str().unwrap_or("")) else {
                continue;
            };
            let comm = comm
                .get_or_insert_with(|| {
                    std::fs::read_to_string(p.path().join("comm"))
                        .map(|s| s.trim_end().to_string())
                        .unwrap_or_default()
                })
                .clone();
            let owners = map.entry(ino).or_default();
            if !owners.iter().any(|o| o.pid == pid) {
                owners.push(Owner { pid, comm });
            }
        }
    }
    map
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
