//! Socket options the tests and the benchmark set and read, through
//! `socket2` (no raw setsockopt here).

use std::io;
use std::os::fd::AsFd;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};

/// A socket's keepalive settings as the kernel reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepaliveSettings {
    /// SO_KEEPALIVE.
    pub enabled: bool,
    /// TCP_KEEPIDLE, TCP_KEEPINTVL (seconds) and TCP_KEEPCNT.
    pub idle_s: u64,
    pub intvl_s: u64,
    pub probes: u32,
}

/// Sets the keepalive parameters given (seconds; `None` keeps the
/// namespace's default) and SO_KEEPALIVE to `enabled`.
pub fn set_keepalive_params(
    s: &impl AsFd,
    enabled: bool,
    idle_s: Option<u64>,
    intvl_s: Option<u64>,
    probes: Option<u32>,
) -> io::Result<()> {
    let sock = SockRef::from(s);
    let mut ka = TcpKeepalive::new();
    if let Some(v) = idle_s {
        ka = ka.with_time(Duration::from_secs(v));
    }
    if let Some(v) = intvl_s {
        ka = ka.with_interval(Duration::from_secs(v));
    }
    if let Some(v) = probes {
        ka = ka.with_retries(v);
    }
    // socket2 turns SO_KEEPALIVE on with the parameters; turning it off
    // again leaves the parameters set and the keepalive timer stopped.
    sock.set_tcp_keepalive(&ka)?;
    if !enabled {
        sock.set_keepalive(false)?;
    }
    Ok(())
}

/// SO_KEEPALIVE on with the given idle time, interval (seconds) and count.
pub fn set_keepalive(s: &impl AsFd, idle_s: u64, intvl_s: u64, probes: u32) -> io::Result<()> {
    set_keepalive_params(s, true, Some(idle_s), Some(intvl_s), Some(probes))
}

/// SO_KEEPALIVE alone, the parameters left as they are.
pub fn set_keepalive_enabled(s: &impl AsFd, on: bool) -> io::Result<()> {
    SockRef::from(s).set_keepalive(on)
}

pub fn keepalive_settings(s: &impl AsFd) -> io::Result<KeepaliveSettings> {
    let sock = SockRef::from(s);
    Ok(KeepaliveSettings {
        enabled: sock.keepalive()?,
        idle_s: sock.tcp_keepalive_time()?.as_secs(),
        intvl_s: sock.tcp_keepalive_interval()?.as_secs(),
        probes: sock.tcp_keepalive_retries()?,
    })
}

/// TCP_USER_TIMEOUT.
pub fn set_user_timeout(s: &impl AsFd, timeout: Duration) -> io::Result<()> {
    SockRef::from(s).set_tcp_user_timeout(Some(timeout))
}

/// TCP_USER_TIMEOUT as the kernel reports it (zero: none).
pub fn user_timeout(s: &impl AsFd) -> io::Result<Duration> {
    Ok(SockRef::from(s)
        .tcp_user_timeout()?
        .unwrap_or(Duration::ZERO))
}

/// SO_LINGER {on, 0}: close() sends a reset.
pub fn set_linger_zero(s: &impl AsFd) -> io::Result<()> {
    SockRef::from(s).set_linger(Some(Duration::ZERO))
}

/// The kernel's socket cookie (SO_COOKIE), the id the monitor reports.
pub fn cookie(s: &impl AsFd) -> io::Result<u64> {
    SockRef::from(s).cookie()
}

/// SO_RCVTIMEO on a listener, so that accept() gives up (EAGAIN) after `t`.
pub fn set_accept_timeout(l: &impl AsFd, t: Duration) -> io::Result<()> {
    SockRef::from(l).set_read_timeout(Some(t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn options_round_trip() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        set_keepalive(&c, 7, 3, 4).unwrap();
        let k = keepalive_settings(&c).unwrap();
        assert_eq!((k.enabled, k.idle_s, k.intvl_s, k.probes), (true, 7, 3, 4));
        set_keepalive_params(&c, false, Some(50), None, Some(2)).unwrap();
        let k = keepalive_settings(&c).unwrap();
        assert_eq!(
            (k.enabled, k.idle_s, k.intvl_s, k.probes),
            (false, 50, 3, 2)
        );
        set_linger_zero(&c).unwrap();
        set_user_timeout(&c, Duration::from_millis(1500)).unwrap();
        assert_ne!(cookie(&c).unwrap(), 0);
        set_accept_timeout(&l, Duration::from_millis(10)).unwrap();
        assert!(l.accept().is_ok());
        assert!(l.accept().is_err());
    }
}
