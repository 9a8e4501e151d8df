//! Userspace decoding on one core: kernel records (`RawEvent`, as the ring
//! buffer hands them over) → decoded events → JSON lines, the per-event
//! work `keepalive record --format json` does after the drain.
//!
//! The input is recorded: `data/recorded.jsonl` holds 512 events a real
//! `keepalive record --format json` wrote on the test machine (every kind
//! the kernel emits, then state changes of loopback churn, the bulk of any
//! busy host), turned back into the raw records that produced them.
//! Throughput is reported in events (elements) per second, twice: per
//! second of wall time (`userspace/…`) and per second of the benchmark
//! thread's own CPU time (`userspace_cpu/…`, what one core does whatever
//! else the machine runs).
//!
//! Run: `cargo bench -p keepalive-user --bench decode` or
//! `cargo xtask bench --micro`.

use std::hint::black_box;
use std::net::IpAddr;
use std::time::Duration;

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use keepalive::events::{Kind, ResetReasons, decode, state_name};
use keepalive::output::Clock;
use keepalive::output::file::{FileOptions, LineFile};
use keepalive::output::json::{EventOut, write_line};
use keepalive::table::conn_table::ConnTable;
use keepalive::table::verdict::Thresholds;
use keepalive_common::{RawEvent, flags};
use serde_json::Value;

const RECORDED: &str = include_str!("data/recorded.jsonl");
/// Events per measured iteration (the recording, repeated).
const BATCH: usize = 16 * 1024;

/// The recorded events as raw kernel records, and the reset reason names
/// they use (indexed as the kernel's `enum sk_rst_reason`).
fn recorded() -> (Vec<RawEvent>, ResetReasons) {
    let mut reasons: Vec<Option<String>> = Vec::new();
    let raws = RECORDED
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).expect("a recorded JSON line");
            raw_of(&v, &mut reasons)
        })
        .collect();
    (raws, ResetReasons(reasons))
}

fn state_number(name: &str) -> u8 {
    (0..=15u8)
        .find(|&s| state_name(u32::from(s)) == name)
        .unwrap_or(0)
}

fn raw_of(v: &Value, reasons: &mut Vec<Option<String>>) -> RawEvent {
    let u = |k: &str| v[k].as_u64().unwrap_or(0);
    let name = v["event"].as_str().expect("event");
    let kind = Kind::ALL
        .into_iter()
        .find(|k| k.name() == name)
        .expect("a known kind");
    let mut r = RawEvent {
        ts_ns: u("ts_mono_ns"),
        cookie: u("cookie"),
        netns: u("netns") as u32,
        pid: u("pid") as u32,
        kind: kind.raw(),
        state: state_number(v["state"].as_str().unwrap_or("")),
        sport: u("sport") as u16,
        dport: u("dport") as u16,
        ..RawEvent::default()
    };
    for (field, out) in [("saddr", &mut r.saddr), ("daddr", &mut r.daddr)] {
        match v[field].as_str().and_then(|s| s.parse::<IpAddr>().ok()) {
            Some(IpAddr::V4(a)) => {
                r.family = 2;
                out[..4].copy_from_slice(&a.octets());
            }
            Some(IpAddr::V6(a)) => {
                r.family = 10;
                *out = a.octets();
            }
            None => {}
        }
    }
    if let Some(comm) = v["comm"].as_str() {
        let n = comm.len().min(r.comm.len() - 1);
        r.comm[..n].copy_from_slice(&comm.as_bytes()[..n]);
    }
    match kind {
        Kind::Retransmit => {
            r.segs = u("segs") as u16;
            r.err = v["err"].as_i64().unwrap_or(0) as i16;
            if v["syn"] == true {
                r.flags |= flags::SYN;
            }
        }
        Kind::ResetSent => {
            if let Some(reason) = v["reason"].as_str() {
                let at = reasons
                    .iter()
                    .position(|x| x.as_deref() == Some(reason))
                    .unwrap_or_else(|| {
                        reasons.push(Some(reason.to_string()));
                        reasons.len() - 1
                    });
                r.reason = at as u32;
                r.flags |= flags::HAS_REASON;
            }
            if v["no_socket"] == true {
                r.flags |= flags::NO_SOCKET;
            }
        }
        Kind::StateChange => {
            r.old_state = state_number(v["old_state"].as_str().unwrap_or(""));
            r.new_state = state_number(v["new_state"].as_str().unwrap_or(""));
        }
        Kind::KeepaliveProbe => r.probes_out = u("probe") as u8,
        Kind::Timeout => {
            r.probes_out = u("probes_out") as u8;
            r.user_timeout_ms = u("user_timeout_ms") as u32;
            if v["cause"] == "keepalive" {
                r.flags |= flags::IN_KEEPALIVE_TIMER;
            }
        }
        Kind::ResetReceived | Kind::Verdict => {}
    }
    r
}

/// The benchmark thread's own CPU time (CLOCK_THREAD_CPUTIME_ID) instead
/// of wall time: what one core spends, whatever else the machine runs
/// (the shared development machine is rarely quiet; wall time there
/// mostly measures the other tenants).
struct ThreadCpuTime {
    wall: WallTime,
}

fn thread_cpu_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

impl Measurement for ThreadCpuTime {
    type Intermediate = Duration;
    type Value = Duration;
    fn start(&self) -> Duration {
        thread_cpu_now()
    }
    fn end(&self, start: Duration) -> Duration {
        thread_cpu_now().saturating_sub(start)
    }
    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }
    fn zero(&self) -> Duration {
        Duration::ZERO
    }
    fn to_f64(&self, d: &Duration) -> f64 {
        d.as_nanos() as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        self.wall.formatter()
    }
}

fn decode_to_json_lines<M: Measurement>(c: &mut Criterion<M>, group: &str) {
    let (raws, reasons) = recorded();
    let batch: Vec<RawEvent> = raws.iter().cycle().take(BATCH).copied().collect();
    let clock = Clock::fixed(1_764_000_000_000_000_000);
    // The recording round-trips: every record decodes.
    assert!(raws.iter().all(|r| decode(r, &reasons).is_some()));

    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Elements(batch.len() as u64));
    let mut out = Vec::with_capacity(batch.len() * 400);
    g.bench_function("raw_to_json_line", |b| {
        b.iter(|| {
            out.clear();
            for r in &batch {
                if let Some(e) = decode(black_box(r), &reasons) {
                    write_line(&mut out, &EventOut::new(&e, &clock)).expect("a Vec takes it");
                }
            }
            black_box(out.len())
        })
    });
    g.bench_function("raw_to_event", |b| {
        b.iter(|| {
            batch
                .iter()
                .filter_map(|r| decode(black_box(r), &reasons))
                .count()
        })
    });
    // What `record --format json --output /dev/null` does per event after
    // the drain: decode, apply to the connection table (verdicts judged),
    // JSON into the line file, flushed every 64 events (a drain batch under
    // churn). Each round of the recording is a new set of connections (its
    // cookies moved on), and each iteration starts with an empty table, as
    // under churn every connection is new.
    let rounds: Vec<RawEvent> = (0..BATCH / raws.len())
        .flat_map(|round| {
            raws.iter().map(move |r| RawEvent {
                cookie: r.cookie + round as u64 * 1_000_000,
                ..*r
            })
        })
        .collect();
    let mut file = LineFile::create(std::path::Path::new("/dev/null"), FileOptions::default())
        .expect("/dev/null opens");
    // The table's part alone: decode, then apply to the table as the
    // engine does (the event's owner filled from the table).
    g.bench_function("raw_to_table", |b| {
        b.iter_batched_ref(
            || ConnTable::new(1 << 20, Thresholds::default()),
            |table| {
                for r in &rounds {
                    if let Some(mut e) = decode(black_box(r), &reasons) {
                        let ts = e.ts_mono_ns;
                        black_box(table.apply(&mut e, ts));
                        black_box(&e);
                    }
                }
            },
            BatchSize::LargeInput,
        )
    });
    g.bench_function("raw_to_table_and_file", |b| {
        b.iter_batched_ref(
            || ConnTable::new(1 << 20, Thresholds::default()),
            |table| {
                for (i, r) in rounds.iter().enumerate() {
                    if let Some(mut e) = decode(black_box(r), &reasons) {
                        let ts = e.ts_mono_ns;
                        black_box(table.apply(&mut e, ts));
                        file.line_with(|b| write_line(b, &EventOut::new(&e, &clock)))
                            .expect("/dev/null takes it");
                    }
                    if i % 64 == 63 {
                        file.flush().expect("/dev/null takes it");
                    }
                }
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn wall_time(c: &mut Criterion) {
    decode_to_json_lines(c, "userspace");
}

fn cpu_time(c: &mut Criterion<ThreadCpuTime>) {
    decode_to_json_lines(c, "userspace_cpu");
}

criterion_group!(wall, wall_time);
criterion_group! {
    name = cpu;
    config = Criterion::default().with_measurement(ThreadCpuTime { wall: WallTime });
    targets = cpu_time
}
criterion_main!(wall, cpu);
