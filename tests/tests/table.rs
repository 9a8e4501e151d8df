//! The daemon's connection table: verdict changes appear in the event
//! stream as they happen, and the per-connection counters the kernel keeps
//! stay exact even when the ring buffer overflows.

use std::io::{Read, Write};
use std::time::Duration;

use keepalive_tests::*;
use serde_json::Value;

#[test]
fn a_silenced_peer_turns_dead_in_the_stream() {
    exact(|| {
        let pair = Pair::new("vd");
        let mut mon = Monitor::start(&[
            "--refresh",
            "1s",
            PAIR_ONLY[0],
            PAIR_ONLY[1],
            PAIR_ONLY[2],
            PAIR_ONLY[3],
        ]);
        let c = connect_pair(&pair, &pair.b4);
        let ck = cookie(&c.client);
        // Silence first, so that no probe is answered (`nft` can be slow).
        blackhole(&pair.b, None);
        set_keepalive(&c.client, 1, 1, 3);
        c.client
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut buf = [0u8; 8];
        let err = (&c.client).read(&mut buf).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ETIMEDOUT));
        let events = mon.stop();

        let verdicts: Vec<&Value> = events
            .iter()
            .filter(|e| e["event"] == "verdict" && e["cookie"] == ck)
            .collect();
        let codes: Vec<(&str, &str)> = verdicts
            .iter()
            .map(|v| {
                (
                    v["new"].as_str().unwrap(),
                    v["reason_code"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            codes,
            vec![("dead", "probes_unanswered"), ("dead", "timed_out")],
            "{:#?}",
            events
                .iter()
                .filter(|e| e["cookie"] == ck)
                .map(|e| (e["event"].as_str().unwrap(), e["reason_code"].as_str()))
                .collect::<Vec<_>>()
        );
        assert_eq!(verdicts[0]["old"], "healthy");
        assert!(
            verdicts[0]["reason"]
                .as_str()
                .unwrap()
                .contains("1 of 3 keepalive probes unanswered"),
            "{verdicts:#?}"
        );
        assert!(
            verdicts[1]["reason"]
                .as_str()
                .unwrap()
                .contains("keepalive")
        );
    });
}

/// Bytes written but not yet acknowledged by the peer (SIOCOUTQ).
fn unacked_bytes(s: &std::net::TcpStream) -> i32 {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: valid fd and a pointer to an int, as SIOCOUTQ expects.
    let r = unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    assert_eq!(r, 0, "SIOCOUTQ: {}", std::io::Error::last_os_error());
    n
}

fn disable_keepalive(s: &std::net::TcpStream) {
    testkit::sock::set_keepalive_enabled(s, false).unwrap();
}

#[test]
fn table_counters_stay_exact_when_the_ring_overflows() {
    exact(|| {
        let pair = Pair::new("tx");
        let storm = Netns::new("storm");
        let dump = std::env::temp_dir().join(format!("ka-table-{}.jsonl", std::process::id()));
        let dump_s = dump.to_str().unwrap().to_string();
        let mut mon = Monitor::start(&[
            "--ring-size",
            "4096",
            "--refresh",
            "1s",
            "--table-dump",
            &dump_s,
        ]);

        let prober = connect_pair(&pair, &pair.b4);
        let sender = connect_pair(&pair, &pair.b4);
        let (prober_ck, sender_ck) = (cookie(&prober.client), cookie(&sender.client));
        let a0 = pair.a.counters();
        set_keepalive(&prober.client, 1, 1, 30);
        blackhole(&pair.b, None);
        (&sender.client).write_all(&[1u8; 2000]).unwrap();

        // The consumer stalls while a storm fills the tiny ring; probes and
        // retransmits keep happening meanwhile.
        // SAFETY: signalling our own child.
        unsafe { libc::kill(mon.pid() as i32, libc::SIGSTOP) };
        storm.enter(|| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let to = l.local_addr().unwrap();
            for _ in 0..1500 {
                let c = std::net::TcpStream::connect(to).unwrap();
                let (s, _) = l.accept().unwrap();
                drop(c);
                drop(s);
            }
        });
        std::thread::sleep(Duration::from_millis(3000));
        unsafe { libc::kill(mon.pid() as i32, libc::SIGCONT) };

        // Quiesce both connections so the kernel counters stop moving.
        disable_keepalive(&prober.client);
        unblackhole(&pair.b);
        let mut got = vec![0u8; 2000];
        sender
            .server
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        (&sender.server).read_exact(&mut got).unwrap();
        // Until the sender has its data acknowledged, its retransmit timer
        // may still fire and count one more after `a1`.
        assert!(
            wait_for(Duration::from_secs(10), || unacked_bytes(&sender.client)
                == 0),
            "the sender's data was never acknowledged"
        );
        let a1 = pair.a.counters();
        let events = mon.stop();

        assert!(
            mon.summary("lost") > 0,
            "the ring did not overflow: {:?}",
            mon.stderr
        );
        let rows: Vec<Value> = std::fs::read_to_string(&dump)
            .expect("no table dump")
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let _ = std::fs::remove_file(&dump);
        let row = |ck: u64| {
            rows.iter()
                .find(|r| r["cookie"] == ck)
                .unwrap_or_else(|| panic!("cookie {ck} not in the table dump"))
        };
        let probes = a0.delta(&a1, "TcpExt.TCPKeepAlive");
        let retrans = a0.delta(&a1, "Tcp.RetransSegs");
        assert!(
            probes >= 2 && retrans >= 2,
            "probes {probes} retrans {retrans}"
        );
        assert_eq!(
            row(prober_ck)["counters"]["probes"],
            probes,
            "{:#?}",
            row(prober_ck)
        );
        // What the stream still has of the sender's retransmissions (it lost
        // some), to tell a local transmit failure (err 1: a backlog full of
        // the storm's packets) from a missed one.
        let sender_rt: Vec<&Value> = events
            .iter()
            .filter(|e| e["event"] == "retransmit" && e["cookie"] == sender_ck)
            .collect();
        assert_eq!(
            row(sender_ck)["counters"]["retransmit_segs"],
            retrans,
            "{:#?}\nstreamed: {sender_rt:#?}\nTcpExt.TCPRetransFail delta {}\nmonitor: {:?}",
            row(sender_ck),
            a0.delta(&a1, "TcpExt.TCPRetransFail"),
            mon.stderr
        );
        // The stream itself lost some of them: the table did not rely on it.
        let streamed = events
            .iter()
            .filter(|e| e["event"] == "keepalive_probe" && e["cookie"] == prober_ck)
            .count() as i64;
        assert!(streamed <= probes);
    });
}
