//! Nothing is lost silently and nothing is left behind: ring-buffer
//! overflow is accounted for exactly, and no program stays loaded after
//! the monitor ends, by SIGTERM or SIGKILL.

use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use keepalive_tests::*;

#[test]
fn a_tiny_ring_buffer_counts_every_dropped_event() {
    let ns = Netns::new("loss");
    let mut mon = Monitor::start(&["--ring-size", "4096"]);
    // A consumer that stalls (stopped here) while a storm of short
    // connections (~10 state changes each) fills the 4 KiB ring.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(mon.pid() as i32, libc::SIGSTOP) };
    ns.enter(|| {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let to = l.local_addr().unwrap();
        for _ in 0..1500 {
            let c = TcpStream::connect(to).unwrap();
            let (s, _) = l.accept().unwrap();
            drop(c);
            drop(s);
        }
    });
    unsafe { libc::kill(mon.pid() as i32, libc::SIGCONT) };
    std::thread::sleep(Duration::from_millis(300));
    let events = mon.stop();

    let emitted = mon.summary("emitted");
    let received = mon.summary("received");
    let lost = mon.summary("lost");
    assert!(
        lost > 0,
        "the storm did not overflow a 4 KiB ring: {:?}",
        mon.stderr
    );
    assert_eq!(emitted, received + lost, "{:?}", mon.stderr);
    let lost_records: u64 = events
        .iter()
        .filter(|e| e["event"] == "lost")
        .map(|e| e["lost"].as_u64().unwrap())
        .sum();
    assert_eq!(lost_records, lost, "lost records in the stream");
    let event_lines = events
        .iter()
        .filter(|e| e["event"] != "lost" && e["event"] != "verdict")
        .count() as u64;
    assert_eq!(event_lines, received);
    assert!(
        mon.stderr
            .iter()
            .any(|l| l.contains("lost") && l.contains("ring buffer full")),
        "no loss report on stderr: {:?}",
        mon.stderr
    );
}

fn no_programs_after(sig: i32) {
    let mut mon = Monitor::start(&[]);
    // This monitor's own programs, whatever else runs on the host.
    let ours = prog_ids_held_by(mon.pid());
    assert_eq!(
        ours.len(),
        10,
        "programs held while running (8 hooks + the socket and owner iterators): {ours:?}"
    );
    let loaded = loaded_prog_ids();
    assert!(ours.iter().all(|id| loaded.contains(id)));
    let names = loaded_keepalive_programs();
    assert!(names.len() >= 9, "{names:?}");
    mon.stop_with(sig);
    let gone = wait_for(Duration::from_secs(10), || {
        let loaded = loaded_prog_ids();
        ours.iter().all(|id| !loaded.contains(id))
    });
    assert!(
        gone,
        "programs {ours:?} still loaded after signal {sig}: {:?}",
        loaded_keepalive_programs()
    );
}

#[test]
fn nothing_stays_loaded_after_sigterm() {
    no_programs_after(libc::SIGTERM);
}

#[test]
fn nothing_stays_loaded_after_sigkill() {
    no_programs_after(libc::SIGKILL);
}

#[test]
fn sigint_stops_cleanly_with_a_summary() {
    let mut mon = Monitor::start(&[]);
    mon.stop_with(libc::SIGINT);
    assert!(
        mon.stderr.iter().any(|l| l.contains("stopped;")),
        "{:?}",
        mon.stderr
    );
}

/// A CPU taken offline for as long as this lives, brought back online on
/// drop (a failing test included).
struct OfflineCpu(usize);

impl OfflineCpu {
    fn online_file(cpu: usize) -> String {
        format!("/sys/devices/system/cpu/cpu{cpu}/online")
    }

    /// The highest-numbered online CPU that can be taken offline (CPU 0
    /// usually cannot), taken offline; `None` on a machine with one CPU
    /// or without CPU hotplug.
    fn take() -> Option<OfflineCpu> {
        let online = std::fs::read_to_string("/sys/devices/system/cpu/online").ok()?;
        let last = online
            .trim()
            .split(',')
            .filter_map(|r| r.rsplit('-').next()?.parse::<usize>().ok())
            .max()?;
        if last == 0 || std::fs::write(Self::online_file(last), "0").is_err() {
            return None;
        }
        Some(OfflineCpu(last))
    }

    fn bring_online(&self) {
        std::fs::write(Self::online_file(self.0), "1")
            .unwrap_or_else(|e| panic!("bringing CPU {} back online: {e}", self.0));
    }
}

impl Drop for OfflineCpu {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::online_file(self.0), "1");
    }
}

/// A CPU brought online after the monitor started gets an event ring of
/// its own: every socket of connections made only on that CPU has its
/// `→ CLOSE` written, and the kernel dropped nothing (without the ring
/// every event there was counted as lost).
#[test]
fn a_cpu_brought_online_after_start_gets_a_ring_and_loses_nothing() {
    a_cpu_brought_online_loses_nothing(&[]);
}

/// The same without the table, where the monitor keeps only `CAP_BPF`
/// after attaching: enough to create the ring.
#[test]
fn a_cpu_brought_online_gets_a_ring_without_the_table_too() {
    a_cpu_brought_online_loses_nothing(&["--refresh", "0"]);
}

fn a_cpu_brought_online_loses_nothing(extra: &[&str]) {
    const PORT: u16 = 7995;
    const N: usize = 50;
    let Some(offline) = OfflineCpu::take() else {
        eprintln!("skipped: this machine cannot take a CPU offline (one CPU, or no CPU hotplug)");
        return;
    };
    let cpu = offline.0;
    let ns = Netns::new("hot");
    let args = [&["--port", "7995", "--log-level", "info"], extra].concat();
    let mut mon = Monitor::start(&args);
    offline.bring_online();
    mon.wait_stderr("its event ring is installed", Duration::from_secs(5));
    let c0 = ns.counters();
    let (listener, sockets) = ns.churn_loopback_on(PORT, N, Some(cpu));
    let inode = ns.inode();
    wait_for_closes(&mon, inode, 2 * N);
    let c1 = ns.counters();
    let events = mon.stop_lossless();
    drop(offline);

    assert_one_close_per_socket((&c0, &c1), &events, inode, (listener, sockets), N, "");
    assert!(
        mon.stderr.iter().any(|l| l.contains(&format!("cpu={cpu}"))),
        "the ring installed is not CPU {cpu}'s: {:?}",
        mon.stderr
    );
}
