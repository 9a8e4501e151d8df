//! Events come out in kernel time order when every CPU writes its own
//! ring: a connection whose state changes happen on two CPUs (its client
//! on one, its server on another, each handling the other's packets on
//! loopback) gets them in the order the kernel made them.

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};

use keepalive_tests::*;
use serde_json::Value;

/// Pins the calling thread to `cpu`.
fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET stays within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
            0,
            "pinning to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The CPUs this process may run on.
fn cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is valid output space for the call.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(
            libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set),
            0
        );
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

const CLIENTS: usize = 4;
const PER_CLIENT: usize = 250;

#[test]
fn a_connections_state_changes_come_out_in_order_with_two_cpus_producing() {
    // A state change hidden from every hook (tests/src/blind.rs) breaks a
    // connection's chain: such a failure runs again.
    exact(|| {
        let ns = Netns::new("order");
        let mut mon = Monitor::start(&["--refresh", "0", "--event", "state_change"]);
        let cpus = cpus();
        let (client_cpu, server_cpu) = (cpus[0], *cpus.last().unwrap());
        ns.enter(move || {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let to = l.local_addr().unwrap();
            std::thread::scope(|s| {
                let server = s.spawn(|| {
                    pin(server_cpu);
                    for _ in 0..CLIENTS * PER_CLIENT {
                        let (c, _) = l.accept().unwrap();
                        // The server closes first: its FIN is handled on the
                        // client's side in this CPU's softirq.
                        drop(c);
                    }
                });
                let clients: Vec<_> = (0..CLIENTS)
                    .map(|_| {
                        s.spawn(move || {
                            pin(client_cpu);
                            for _ in 0..PER_CLIENT {
                                let c = TcpStream::connect(to).unwrap();
                                let mut buf = [0u8; 1];
                                // Waits for the server's FIN, then closes.
                                let _ = std::io::Read::read(&mut &c, &mut buf);
                            }
                        })
                    })
                    .collect();
                clients.into_iter().for_each(|c| c.join().unwrap());
                server.join().unwrap();
            });
        });
        let events = mon.stop_lossless();
        let ours = of_kind(&events, ns.inode(), "state_change");

        // The stream is in time order...
        let stamps: Vec<u64> = ours
            .iter()
            .map(|e| e["ts_mono_ns"].as_u64().unwrap())
            .collect();
        let back = stamps.windows(2).position(|w| w[1] < w[0]);
        assert_eq!(
            back,
            None,
            "a record older than the one before it: {:#?}",
            back.map(|i| (ours[i], ours[i + 1]))
        );
        // ...and every connection's changes chain: each leaves the state the
        // one before it entered.
        let mut by_cookie: HashMap<u64, Vec<&Value>> = HashMap::new();
        for e in &ours {
            by_cookie
                .entry(e["cookie"].as_u64().unwrap())
                .or_default()
                .push(e);
        }
        for (cookie, changes) in &by_cookie {
            for w in changes.windows(2) {
                assert_eq!(
                    w[1]["old_state"], w[0]["new_state"],
                    "connection {cookie} out of order: {changes:#?}"
                );
            }
        }
        // Every connection was seen from both ends, the client's from its
        // SYN_SENT on.
        let opened = ours.iter().filter(|e| e["new_state"] == "SYN_SENT").count();
        assert_eq!(opened, CLIENTS * PER_CLIENT, "{:?}", mon.stderr);
        assert!(
            by_cookie.len() >= 2 * CLIENTS * PER_CLIENT,
            "{} connections",
            by_cookie.len()
        );
    });
}
