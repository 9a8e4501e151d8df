//! The scenarios: real connections between two network namespaces put
//! into each state the verdict rules know, each end with the verdict it
//! must get.

use super::*;

// ---------------------------------------------------------------------
// The scenarios.

/// One end of a connection and the verdict it must get with
/// `--idle-threshold 1s --close-wait-threshold 1s`.
pub struct End {
    pub what: String,
    pub netns: u64,
    pub sport: u16,
    pub dport: u16,
    /// The socket, when this test process holds it.
    pub sock: Option<TcpStream>,
    pub state: &'static str,
    pub verdict: &'static str,
    pub reason_code: &'static str,
}

impl End {
    pub fn key(&self) -> Key {
        (self.netns, self.sport, self.dport)
    }

    /// The verdict with the default thresholds (60 s idle and CLOSE_WAIT):
    /// nothing here has been idle or in CLOSE_WAIT that long.
    pub fn default_verdict(&self) -> (&'static str, &'static str) {
        match self.reason_code {
            "keepalive_off" | "keepalive_too_late" | "close_wait_leak" => ("healthy", "ok"),
            _ => (self.verdict, self.reason_code),
        }
    }
}

pub type Expect = (&'static str, &'static str, &'static str);

pub const HEALTHY: Expect = ("ESTABLISHED", "healthy", "ok");
pub const KEEPALIVE_OFF: Expect = ("ESTABLISHED", "unprotected", "keepalive_off");

pub struct Scenarios {
    pub ends: Vec<End>,
    pub _listeners: Vec<TcpListener>,
    pub _children: Vec<PeerProcess>,
    /// Set up; every scenario's last activity was before this.
    pub ready: Instant,
    pub pair: Pair,
}

impl Scenarios {
    pub fn end(&self, what: &str) -> &End {
        self.ends
            .iter()
            .find(|e| e.what == what)
            .unwrap_or_else(|| panic!("no end {what:?}"))
    }

    pub fn add(&mut self, what: &str, c: Conn, client: Expect, server: Expect) {
        let (na, nb) = (self.pair.a.inode(), self.pair.b.inode());
        let (cp, sp) = (local_port(&c.client), local_port(&c.server));
        self.ends.push(End {
            what: format!("{what}: client"),
            netns: na,
            sport: cp,
            dport: sp,
            sock: Some(c.client),
            state: client.0,
            verdict: client.1,
            reason_code: client.2,
        });
        self.ends.push(End {
            what: format!("{what}: server"),
            netns: nb,
            sport: sp,
            dport: cp,
            sock: Some(c.server),
            state: server.0,
            verdict: server.1,
            reason_code: server.2,
        });
        self._listeners.push(c.listener);
    }

    /// Every case in one pair of namespaces (clients in `a`, servers in
    /// `b`), with the verdict each end must get at `--idle-threshold 1s
    /// --close-wait-threshold 1s`:
    ///
    /// | case           | client (a)                      | server (b)                   |
    /// |----------------|---------------------------------|------------------------------|
    /// | live (IPv6)    | keepalive 1/1/5: healthy        | keepalive 1/1/5: healthy     |
    /// | silenced       | keepalive 1/1/5, peer black-holed: dead, probes_unanswered | no keepalive, idle: unprotected, keepalive_off |
    /// | retransmit     | 3000 bytes into a black hole: dead, retransmit_backoff | idle: unprotected, keepalive_off |
    /// | orphan         | child process closed and exited: FIN_WAIT2, orphaned, kernel_orphan | never closes: CLOSE_WAIT, orphaned, close_wait_leak |
    /// | close_wait     | shutdown(Write), still held: FIN_WAIT2, healthy | never closes: CLOSE_WAIT, orphaned, close_wait_leak |
    /// | idle           | no keepalive: unprotected, keepalive_off | the same                |
    /// | late_keepalive | keepalive 400/10/5: unprotected, keepalive_too_late | no keepalive: unprotected, keepalive_off |
    /// | unread         | keepalive 1/1/5, sent 1000 bytes: healthy | keepalive, never reads: healthy |
    /// | zero_window    | keepalive, window closed: healthy | keepalive, never reads: healthy |
    /// | leaked         | fd only in flight on a unix socket: orphaned, no_owner | idle: unprotected, keepalive_off |
    pub fn build(tag: &str) -> Scenarios {
        let pair = Pair::new(tag);
        // An orphan reaching FIN_WAIT2 stays a full socket (waiting on its
        // FIN_WAIT2 timer) only when tcp_fin_timeout exceeds 60 s; at the
        // default 60 s the kernel turns it into a timewait minisock at once
        // (see `fin_wait2_orphan_with_the_default_fin_timeout`).
        pair.a.sysctl("net.ipv4.tcp_fin_timeout", "120");
        let mut s = Scenarios {
            ends: Vec::new(),
            _listeners: Vec::new(),
            _children: Vec::new(),
            ready: Instant::now(),
            pair,
        };
        let (b4, b6) = (s.pair.b4.clone(), s.pair.b6.clone());

        // Live keepalive connection (IPv6), both ends probing a live peer.
        let c = connect_pair(&s.pair, &format!("[{b6}]"));
        set_keepalive(&c.client, 1, 1, 5);
        set_keepalive(&c.server, 1, 1, 5);
        s.add("live", c, HEALTHY, HEALTHY);

        // Silenced peer: the client's probes to this port are dropped. 60
        // probes keep it alive for the whole test, however slow the host.
        let c = connect_pair(&s.pair, &b4);
        set_keepalive(&c.client, 1, 1, 60);
        blackhole(&s.pair.b, Some(c.listener.local_addr().unwrap().port()));
        s.add(
            "silenced",
            c,
            ("ESTABLISHED", "dead", "probes_unanswered"),
            KEEPALIVE_OFF,
        );

        // Data into a black hole: RTO retransmissions back off.
        let c = connect_pair(&s.pair, &b4);
        blackhole(&s.pair.b, Some(c.listener.local_addr().unwrap().port()));
        (&c.client).write_all(&[7u8; 3000]).unwrap();
        s.add(
            "retransmit",
            c,
            ("ESTABLISHED", "dead", "retransmit_backoff"),
            KEEPALIVE_OFF,
        );

        // FIN_WAIT2 orphan: a child process connects, closes and exits;
        // the server never closes its end (which sits in CLOSE_WAIT).
        let l = listen(&s.pair.b, &format!("{b4}:0"));
        let lp = l.local_addr().unwrap().port();
        let mut py = PeerProcess::spawn(&s.pair.a, CONNECT_AND_EXIT, &[&b4, &lp.to_string()]);
        let cp = py.line()[0] as u16;
        assert!(py.wait_exit(Duration::from_secs(10)).success());
        let (server, _) = l.accept().unwrap();
        let na = s.pair.a.inode();
        s.ends.push(End {
            what: "orphan: client".into(),
            netns: na,
            sport: cp,
            dport: lp,
            sock: None,
            state: "FIN_WAIT2",
            verdict: "orphaned",
            reason_code: "kernel_orphan",
        });
        s.ends.push(End {
            what: "orphan: server".into(),
            netns: s.pair.b.inode(),
            sport: lp,
            dport: cp,
            sock: Some(server),
            state: "CLOSE_WAIT",
            verdict: "orphaned",
            reason_code: "close_wait_leak",
        });
        s._listeners.push(l);

        // CLOSE_WAIT leak: the client shuts down its side (and, still
        // holding the socket, sits in FIN_WAIT2); the server never closes.
        let c = connect_pair(&s.pair, &b4);
        c.client.shutdown(Shutdown::Write).unwrap();
        s.add(
            "close_wait",
            c,
            ("FIN_WAIT2", "healthy", "ok"),
            ("CLOSE_WAIT", "orphaned", "close_wait_leak"),
        );

        // Idle, keepalive off on both ends.
        let c = connect_pair(&s.pair, &b4);
        s.add("idle", c, KEEPALIVE_OFF, KEEPALIVE_OFF);

        // Keepalive on, but starting after the 350 s middlebox timeout.
        let c = connect_pair(&s.pair, &b4);
        set_keepalive(&c.client, 400, 10, 5);
        s.add(
            "late_keepalive",
            c,
            ("ESTABLISHED", "unprotected", "keepalive_too_late"),
            KEEPALIVE_OFF,
        );

        // Unread data: 1000 bytes sit in the server's receive queue.
        let c = connect_pair(&s.pair, &b4);
        set_keepalive(&c.client, 1, 1, 5);
        set_keepalive(&c.server, 1, 1, 5);
        (&c.client).write_all(&[1u8; 1000]).unwrap();
        s.add("unread", c, HEALTHY, HEALTHY);

        // Zero window: the server never reads, the client writes until its
        // send buffer is full and then probes the closed window.
        let c = connect_pair(&s.pair, &b4);
        set_keepalive(&c.client, 1, 1, 5);
        set_keepalive(&c.server, 1, 1, 5);
        c.client.set_nonblocking(true).unwrap();
        let chunk = vec![2u8; 65536];
        let mut sent = 0usize;
        loop {
            match (&c.client).write(&chunk) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("write: {e}"),
            }
            assert!(sent < 256 << 20, "the window never closed");
        }
        c.client.set_nonblocking(false).unwrap();
        s.add("zero_window", c, HEALTHY, HEALTHY);

        // No owner: a child parks the socket in flight on a unix socket.
        let l = listen(&s.pair.b, &format!("{b4}:0"));
        let lp = l.local_addr().unwrap().port();
        let mut py = PeerProcess::spawn(&s.pair.a, CONNECT_AND_LEAK, &[&b4, &lp.to_string()]);
        let cp = py.line()[0] as u16;
        let (server, _) = l.accept().unwrap();
        s.ends.push(End {
            what: "leaked: client".into(),
            netns: na,
            sport: cp,
            dport: lp,
            sock: None,
            state: "ESTABLISHED",
            verdict: "orphaned",
            reason_code: "no_owner",
        });
        s.ends.push(End {
            what: "leaked: server".into(),
            netns: s.pair.b.inode(),
            sport: lp,
            dport: cp,
            sock: Some(server),
            state: KEEPALIVE_OFF.0,
            verdict: KEEPALIVE_OFF.1,
            reason_code: KEEPALIVE_OFF.2,
        });
        s._listeners.push(l);
        s._children.push(py);

        // Wait until the closes and the zero window have happened.
        let (orphan, cw, zw) = (
            s.end("orphan: client").key(),
            s.end("close_wait: client").key(),
            s.end("zero_window: client").key(),
        );
        let ok = wait_for(Duration::from_secs(10), || {
            let a = ss(&s.pair.a);
            let st = |k: Key| a.get(&(k.1, k.2)).map(|r| r.state.clone());
            st(orphan).as_deref() == Some("FIN-WAIT-2")
                && st(cw).as_deref() == Some("FIN-WAIT-2")
                && a.get(&(zw.1, zw.2))
                    .and_then(|r| r.timer.as_ref())
                    .is_some_and(|t| t.0 == "persist" || t.0 == "probe")
        });
        assert!(ok, "scenarios did not settle: {:#?}", ss(&s.pair.a));
        s.ready = Instant::now();
        s
    }

    /// Waits until everything is past its threshold: idle > 1 s, at least
    /// one unanswered probe, three retransmissions.
    pub fn wait_until_judged(&self) {
        let (sil, rtx) = (
            self.end("silenced: client").key(),
            self.end("retransmit: client").key(),
        );
        let ok = wait_for(Duration::from_secs(10), || {
            if self.ready.elapsed() < Duration::from_millis(1200) {
                return false;
            }
            let a = ss(&self.pair.a);
            let timer = |k: Key| a.get(&(k.1, k.2)).and_then(|r| r.timer.clone());
            timer(sil).is_some_and(|t| t.0 == "keepalive" && t.3 >= 1)
                && timer(rtx).is_some_and(|t| t.0 == "on" && t.3 >= 3)
        });
        assert!(
            ok,
            "no unanswered probe / 3 retransmissions: {:#?}",
            ss(&self.pair.a)
        );
    }

    pub fn namespaces(&self) -> [u64; 2] {
        [self.pair.a.inode(), self.pair.b.inode()]
    }
}
