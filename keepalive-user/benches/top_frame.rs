//! Frame time of `keepalive top` with 100k connections in the table:
//! what the UI thread does per frame (advance the model's clock, filter
//! and sort every connection, draw the visible rows) on a 200×50 screen,
//! plus the cost of taking in a full 100k-row table after a refresh.
//!
//! `cargo bench -p keepalive-user --bench top_frame [-- --conns N --frames N]`
//! prints p50/p99/max per scenario. The target is p99 <= 50 ms.

use std::time::{Duration, Instant};

use keepalive::events::{Detail, Event, Owner};
use keepalive::output::Clock;
use keepalive::table::verdict::{Dead, Orphaned, Unprotected, Verdict};
use keepalive::table::{
    Conn, ConnId, Keepalive, TCP_CLOSE_WAIT, TCP_ESTABLISHED, Timer, TimerKind,
};
use keepalive::top::app::{App, Key};
use keepalive::top::model::{Host, Model, Update};
use keepalive::top::ui::{Theme, draw};
use ratatui::Terminal;
use ratatui::backend::TestBackend;

const NS: u64 = 1_000_000_000;

/// A deterministic mix: 1% dead, 2% orphaned, 10% unprotected, the rest
/// healthy; a few hundred processes; IPv4 and IPv6 peers.
fn row(i: u64) -> (Conn, Verdict) {
    let v6 = i.is_multiple_of(7);
    let conn = Conn {
        id: ConnId {
            cookie: i + 1,
            netns: 4026531840,
            saddr: Some(if v6 {
                format!("fd00::{:x}", i % 65000 + 1).parse().unwrap()
            } else {
                format!("10.{}.{}.{}", i >> 16 & 255, i >> 8 & 255, i & 255)
                    .parse()
                    .unwrap()
            }),
            sport: 1024 + (i % 60000) as u16,
            daddr: Some(if v6 {
                "fd00::ffff".parse().unwrap()
            } else {
                format!("10.200.{}.{}", i % 13, i % 251).parse().unwrap()
            }),
            dport: [443, 5432, 6379, 8080, 9000][(i % 5) as usize],
            state: if i % 50 == 1 {
                TCP_CLOSE_WAIT
            } else {
                TCP_ESTABLISHED
            },
        },
        full: true,
        ino: 100_000 + i,
        owners: vec![Owner {
            pid: 1000 + (i % 400) as u32,
            comm: format!("worker-{}", i % 400).into(),
        }],
        keepalive: Keepalive {
            enabled: i % 10 != 3,
            idle_ms: 60_000,
            intvl_ms: 10_000,
            probes: 5,
        },
        probes_out: if i.is_multiple_of(100) {
            (i % 5) as u32 + 1
        } else {
            0
        },
        total_retrans: (i % 17) as u32,
        last_send_ms: i % 600_000,
        last_recv_ms: i % 600_000,
        last_ack_ms: i % 600_000,
        timer: Some(Timer {
            kind: TimerKind::Keepalive,
            fires_in_ms: (i % 60_000) as i64,
        }),
        ..Conn::default()
    };
    let verdict = match i % 100 {
        0 => Verdict::Dead(Dead::ProbesUnanswered {
            unanswered_probes: conn.probes_out,
            probes: 5,
            gives_up_in_ms: (i % 50_000) as i64,
        }),
        1 | 51 => Verdict::Orphaned(Orphaned::CloseWaitLeak {
            idle_ms: 60_000 + i % 1000,
        }),
        3 | 13 | 23 | 33 | 43 | 53 | 63 | 73 | 83 | 93 => {
            Verdict::Unprotected(Unprotected::KeepaliveOff {
                idle_ms: 60_000 + i % 1000,
            })
        }
        _ => Verdict::Healthy,
    };
    (conn, verdict)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// CPU time of this thread: on a shared machine wall time also counts the
/// time other processes held the CPU.
fn cpu_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Wall and CPU time of one run of `f`.
fn timed(f: impl FnOnce()) -> (Duration, Duration) {
    let (wall, cpu) = (Instant::now(), cpu_now());
    f();
    (wall.elapsed(), cpu_now() - cpu)
}

/// Prints wall and CPU percentiles; returns the CPU p99.
fn report(name: &str, times: Vec<(Duration, Duration)>) -> Duration {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut wall: Vec<Duration> = times.iter().map(|t| t.0).collect();
    let mut cpu: Vec<Duration> = times.iter().map(|t| t.1).collect();
    wall.sort();
    cpu.sort();
    println!(
        "{name:<42} cpu p50 {:>6.1} p99 {:>6.1} max {:>6.1} ms | wall p50 {:>6.1} p99 {:>7.1} ms ({} frames)",
        ms(percentile(&cpu, 0.50)),
        ms(percentile(&cpu, 0.99)),
        ms(*cpu.last().unwrap()),
        ms(percentile(&wall, 0.50)),
        ms(percentile(&wall, 0.99)),
        times.len()
    );
    percentile(&cpu, 0.99)
}

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n = arg(&args, "--conns", 100_000) as u64;
    let frames = arg(&args, "--frames", 200);
    let (w, h) = (200, 50);

    let rows: Vec<(Conn, Verdict)> = (0..n).map(row).collect();
    let mut model = Model::new(
        Host {
            hostname: "bench".into(),
            kernel: "6.18".into(),
        },
        Clock::fixed(0),
        2_000,
    );
    let t0 = 1_000 * NS;
    model.apply(Update::Started {
        rows: rows.clone(),
        hooks: 7,
        mono_ns: t0,
    });
    // A full event log and busy timelines.
    for i in 0..20_000u64 {
        let (c, _) = &rows[(i * 7919 % n) as usize];
        model.apply(Update::Event(Event {
            ts_mono_ns: t0 + i * 1_000_000,
            cookie: c.id.cookie,
            netns: c.id.netns,
            saddr: c.id.saddr.unwrap(),
            sport: c.id.sport,
            daddr: c.id.daddr.unwrap(),
            dport: c.id.dport,
            state: c.id.state,
            owner: c.owners.first().cloned(),
            detail: Detail::KeepaliveProbe {
                probe: (i % 5) as u32 + 1,
            },
        }));
    }
    let mut term = Terminal::new(TestBackend::new(w, h)).unwrap();
    let theme = Theme { color: true };
    println!("keepalive top, {n} connections, {w}x{h} screen");

    let mut frame = |app: &mut App, model: &mut Model, step: u64| {
        timed(|| {
            model.tick(t0 + 30 * NS + step * NS);
            app.sync(model);
            term.draw(|f| draw(f, app, model, &theme)).unwrap();
        })
    };

    let mut worst = Duration::ZERO;
    let mut app = App::default();
    let times: Vec<_> = (0..frames as u64)
        .map(|s| frame(&mut app, &mut model, s))
        .collect();
    worst = worst.max(report("connections, worst first", times));

    let mut app = App::default();
    for c in "/worker".chars().map(Key::Char) {
        app.key(c, &model);
    }
    app.key(Key::Enter, &model);
    let times: Vec<_> = (0..frames as u64)
        .map(|s| frame(&mut app, &mut model, s))
        .collect();
    worst = worst.max(report("connections, bare-word filter", times));

    let mut app = App::default();
    for c in "/10.200.3".chars().map(Key::Char) {
        app.key(c, &model);
    }
    app.key(Key::Enter, &model);
    let times: Vec<_> = (0..frames as u64)
        .map(|s| frame(&mut app, &mut model, s))
        .collect();
    worst = worst.max(report("connections, address filter (bare word)", times));

    let mut app = App::default();
    app.key(Key::Char('s'), &model);
    app.key(Key::Char('s'), &model);
    app.key(Key::Char('s'), &model);
    app.key(Key::Char('c'), &model);
    app.key(Key::End, &model);
    let times: Vec<_> = (0..frames as u64)
        .map(|s| frame(&mut app, &mut model, s))
        .collect();
    worst = worst.max(report("connections, by idle, scrolled to the end", times));

    let mut app = App::default();
    app.key(Key::Tab, &model);
    let times: Vec<_> = (0..frames as u64)
        .map(|s| frame(&mut app, &mut model, s))
        .collect();
    worst = worst.max(report("event log (20k events)", times));

    let mut app = App::default();
    app.sync(&model);
    app.key(Key::Enter, &model);
    let times: Vec<_> = (0..frames as u64)
        .map(|s| frame(&mut app, &mut model, s))
        .collect();
    worst = worst.max(report("detail view", times));

    // Taking in a refreshed table (the UI thread does it between frames).
    let times: Vec<_> = (0..(frames / 10).max(5))
        .map(|_| {
            let u = Update::Table { rows: rows.clone() };
            timed(|| model.apply(u))
        })
        .collect();
    report("take in a refreshed 100k table", times);

    println!(
        "frame CPU time p99, worst view: {:.1} ms (target <= 50 ms)",
        worst.as_secs_f64() * 1e3
    );
}
