//! The metrics consumer's per-event work on one core: a recorded event
//! stream (`data/recorded.jsonl`, what a real `keepalive record` wrote)
//! counted into the Prometheus series, without and with the optional
//! `comm` and `port` labels. Also one scrape: encoding every series.
//!
//! Run: `cargo bench -p keepalive-user --bench metrics`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use keepalive::events::{Detail, Event, Owner, TimeoutCause};
use keepalive::metrics::labels::{LabelOptions, Labeler};
use keepalive::metrics::{Format, Metrics};
use serde_json::Value;

const RECORDED: &str = include_str!("data/recorded.jsonl");
const BATCH: usize = 16 * 1024;

fn event_of(v: &Value) -> Event {
    let u = |k: &str| v[k].as_u64().unwrap_or(0);
    let detail = match v["event"].as_str().unwrap() {
        "retransmit" => Detail::Retransmit {
            segs: u("segs") as u32,
            syn: v["syn"] == true,
            synack: v["synack"] == true,
            err: v["err"].as_i64().unwrap_or(0) as i32,
        },
        "reset_sent" => Detail::ResetSent {
            reason: v["reason"].as_str().map(str::to_string),
            no_socket: v["no_socket"] == true,
        },
        "reset_received" => Detail::ResetReceived,
        "keepalive_probe" => Detail::KeepaliveProbe {
            probe: u("probe") as u32,
        },
        "timeout" => Detail::Timeout {
            cause: match v["cause"].as_str() {
                Some("keepalive") => TimeoutCause::Keepalive,
                Some("user_timeout") => TimeoutCause::UserTimeout,
                _ => TimeoutCause::Retransmission,
            },
            probes_out: u("probes_out") as u32,
            user_timeout_ms: u("user_timeout_ms") as u32,
        },
        _ => Detail::StateChange { old: 1, new: 8 },
    };
    Event {
        ts_mono_ns: u("ts_mono_ns"),
        cookie: u("cookie"),
        netns: u("netns") as u32,
        saddr: v["saddr"].as_str().unwrap().parse().unwrap(),
        sport: u("sport") as u16,
        daddr: v["daddr"].as_str().unwrap().parse().unwrap(),
        dport: u("dport") as u16,
        state: 1,
        owner: v["comm"].as_str().map(|c| Owner {
            pid: u("pid") as u32,
            comm: c.into(),
        }),
        detail,
    }
}

fn count_events(c: &mut Criterion) {
    let recorded: Vec<Event> = RECORDED
        .lines()
        .map(|l| event_of(&serde_json::from_str(l).unwrap()))
        .collect();
    let batch: Vec<Event> = recorded.iter().cycle().take(BATCH).cloned().collect();
    let mut g = c.benchmark_group("metrics");
    g.throughput(Throughput::Elements(batch.len() as u64));
    for (name, opts) in [
        ("count_events", LabelOptions::default()),
        (
            "count_events_by_comm_and_port",
            LabelOptions {
                comm: true,
                port: true,
                limit: 64,
            },
        ),
    ] {
        let metrics = Metrics::new(&opts);
        let mut labeler = Labeler::new(opts);
        g.bench_function(name, |b| {
            b.iter(|| {
                for e in &batch {
                    let extra = labeler.labels(black_box(e));
                    metrics.observe(e, &extra);
                }
            })
        });
    }
    g.finish();
    let metrics = Metrics::new(&LabelOptions {
        comm: true,
        port: true,
        limit: 64,
    });
    let mut labeler = Labeler::new(LabelOptions {
        comm: true,
        port: true,
        limit: 64,
    });
    for e in &batch {
        metrics.observe(e, &labeler.labels(e));
    }
    c.bench_function("metrics/scrape_encode", |b| {
        b.iter(|| black_box(metrics.encode_as(Format::Prometheus)))
    });
}

criterion_group!(benches, count_events);
criterion_main!(benches);
