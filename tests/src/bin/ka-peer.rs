//! `ka-peer`: the other process of the integration tests, run inside a
//! network namespace (`ip netns exec NS ka-peer MODE HOST PORT`). It
//! connects to HOST:PORT, prints its local port on stdout, then:
//! - `connect-exit`: closes and exits (leaving an orphan in FIN_WAIT2);
//! - `connect-hold`: holds the socket for a minute;
//! - `connect-hold-fork`: forks first, so both processes hold the socket,
//!   and prints the child's pid after the port;
//! - `connect-leak`: parks the socket as an fd in flight on a unix socket
//!   (SCM_RIGHTS, never received) and closes its own fd, so the socket
//!   stays open in no process's fd table; then waits a minute.
//!
//! With `KA_PEER_NAME_HEX` set, it first renames itself to those bytes
//! (prctl PR_SET_NAME), as a process with a hostile name would.

use std::io::Write;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::process::ExitCode;
use std::time::Duration;

const HOLD: Duration = Duration::from_secs(60);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, host, port] = args.as_slice() else {
        eprintln!(
            "usage: ka-peer connect-exit|connect-hold|connect-hold-fork|connect-leak HOST PORT"
        );
        return ExitCode::from(2);
    };
    match run(mode, host, port) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ka-peer: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(mode: &str, host: &str, port: &str) -> Result<(), String> {
    if let Ok(hex) = std::env::var("KA_PEER_NAME_HEX") {
        rename(&hex)?;
    }
    let to: SocketAddr = (
        host,
        port.parse::<u16>()
            .map_err(|e| format!("port {port}: {e}"))?,
    )
        .to_socket_addrs()
        .map_err(|e| format!("{host}:{port}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host}:{port}: no address"))?;
    let s = TcpStream::connect_timeout(&to, Duration::from_secs(5))
        .map_err(|e| format!("connecting to {to}: {e}"))?;
    let local = s.local_addr().map_err(|e| e.to_string())?.port();
    match mode {
        "connect-exit" => {
            say(&local.to_string())?;
            drop(s);
            Ok(())
        }
        "connect-hold" => {
            say(&local.to_string())?;
            std::thread::sleep(HOLD);
            Ok(())
        }
        "connect-hold-fork" => {
            // SAFETY: single-threaded process; the child only sleeps and exits.
            let pid = unsafe { libc::fork() };
            if pid < 0 {
                return Err(format!("fork: {}", std::io::Error::last_os_error()));
            }
            if pid == 0 {
                std::thread::sleep(HOLD);
                // SAFETY: leaves without running the parent's exit handlers.
                unsafe { libc::_exit(0) };
            }
            say(&format!("{local} {pid}"))?;
            std::thread::sleep(HOLD);
            Ok(())
        }
        "connect-leak" => {
            let (u1, _u2) = UnixDatagram::pair().map_err(|e| e.to_string())?;
            send_fd(&u1, s.as_raw_fd())?;
            drop(s);
            say(&local.to_string())?;
            std::thread::sleep(HOLD);
            Ok(())
        }
        other => Err(format!("unknown mode {other}")),
    }
}

/// Sets our comm to the bytes `hex` spells (at most 15 are kept).
fn rename(hex: &str) -> Result<(), String> {
    let mut name = (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|e| format!("KA_PEER_NAME_HEX: {e}"))?;
    name.push(0);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string (up to 16 bytes).
    let r = unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr(), 0, 0, 0) };
    if r != 0 {
        return Err(format!("prctl: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn say(line: &str) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(|e| format!("stdout: {e}"))
}

/// Sends `fd` with one byte over `u` (SCM_RIGHTS). std has no stable API
/// for ancillary data yet.
fn send_fd(u: &UnixDatagram, fd: i32) -> Result<(), String> {
    let mut byte = [b'x'];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(size_of::<i32>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: a zeroed msghdr is valid; every pointer set below outlives
    // the sendmsg call, and the control buffer has room for one cmsg with
    // one int (CMSG_SPACE).
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<i32>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>(), fd);
        if libc::sendmsg(u.as_raw_fd(), &msg, 0) != 1 {
            return Err(format!(
                "sendmsg SCM_RIGHTS: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}
