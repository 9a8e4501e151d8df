//! Prometheus metrics: host-level aggregates of what the monitor sees, with
//! bounded labels only (never one series per connection), the monitor's own
//! health, and the HTTP endpoint that serves them.
//!
//! [`Metrics`] holds the series; the engine thread updates them through the
//! [`consumer`] and the HTTP thread ([`http`]) encodes them, sharing one
//! `Arc` (the series are atomics, no lock on the event path but the
//! family's read lock).

pub mod consumer;
pub mod http;
pub mod labels;
pub mod process;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use prometheus_client::encoding::prometheus_text;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::events::{Detail, Event, Kind, TimeoutCause, counted_in_retranssegs};
use crate::table::verdict::Verdict;
use labels::ExtraLabels;

/// Default address of the endpoint: local only, as node_exporter's
/// textfile users expect; a DaemonSet or unit sets its own.
pub const DEFAULT_ADDR: &str = "127.0.0.1:9977";

/// Every (verdict, reason) pair the rules can give, so each is exported,
/// at 0 when no connection has it.
pub const VERDICT_REASONS: [(&str, &str); 9] = [
    ("dead", "probes_unanswered"),
    ("dead", "retransmit_backoff"),
    ("dead", "timed_out"),
    ("orphaned", "kernel_orphan"),
    ("orphaned", "close_wait_leak"),
    ("orphaned", "no_owner"),
    ("unprotected", "keepalive_off"),
    ("unprotected", "keepalive_too_late"),
    ("healthy", "ok"),
];

type Labels = Vec<(&'static str, String)>;

fn with(extra: &ExtraLabels, key: &'static str, value: &str) -> Labels {
    let mut v = Vec::with_capacity(extra.len() + 1);
    v.push((key, value.to_string()));
    v.extend(extra.iter().cloned());
    v
}

/// Is the monitor running and keeping up: what `/healthz` and `/readyz` answer.
#[derive(Debug, Default)]
pub struct Health {
    /// Hooks attached and the table seeded.
    pub attached: AtomicBool,
    /// Stop requested: hooks about to be (or already) detached.
    pub stopping: AtomicBool,
    /// CLOCK_MONOTONIC milliseconds of the last ring drain.
    pub last_drain_ms: AtomicU64,
}

/// Longest time without a ring drain that still counts as healthy. The
/// engine drains every few tens of milliseconds even when idle.
pub const DRAIN_STALE_MS: u64 = 5_000;

fn mono_ms() -> u64 {
    crate::output::Clock::mono_now_ns() / 1_000_000
}

impl Health {
    pub fn drained(&self) {
        self.last_drain_ms.store(mono_ms(), Ordering::Relaxed);
    }

    /// Ready: the hooks are attached and no stop was asked.
    pub fn ready(&self) -> Result<(), String> {
        if self.stopping.load(Ordering::Relaxed) {
            return Err("stopping".into());
        }
        if !self.attached.load(Ordering::Relaxed) {
            return Err("hooks not attached yet".into());
        }
        Ok(())
    }

    /// Healthy: ready, and the ring was drained recently.
    pub fn healthy(&self) -> Result<(), String> {
        self.ready()?;
        let age = mono_ms().saturating_sub(self.last_drain_ms.load(Ordering::Relaxed));
        if age > DRAIN_STALE_MS {
            return Err(format!("ring buffer not drained for {age} ms"));
        }
        Ok(())
    }
}

/// Exposition formats: OpenMetrics for scrapers that ask for it
/// (Prometheus does), the classic text format for everything else
/// (curl, promtool, older agents).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    Prometheus,
}

impl Format {
    /// The format an `Accept` header asks for.
    pub fn negotiate(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// Every series the endpoint exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub health: Arc<Health>,
    pub process: Arc<process::ProcessCollector>,
    probes: Family<Labels, Counter>,
    retransmits: Family<Labels, Counter>,
    retransmit_failures: Family<Labels, Counter>,
    resets: Family<Labels, Counter>,
    timeouts: Family<Labels, Counter>,
    events: Family<Labels, Counter>,
    /// `events` by kind, looked up once: no allocation per event.
    events_by_kind: Vec<(Kind, Counter)>,
    lost: Counter,
    connections: Family<Labels, Gauge>,
    tracked: Gauge,
    evicted: Counter,
    tuned: Family<Labels, Counter>,
}

impl Metrics {
    /// Series for `labels`; without optional labels every series exists
    /// from the start, at 0, so a query for "nothing happened" gets 0.
    pub fn new(labels: &labels::LabelOptions) -> Self {
        let process = Arc::new(process::ProcessCollector::default());
        let mut m = Metrics {
            registry: Registry::default(),
            health: Arc::new(Health::default()),
            process: process.clone(),
            probes: Family::default(),
            retransmits: Family::default(),
            retransmit_failures: Family::default(),
            resets: Family::default(),
            timeouts: Family::default(),
            events: Family::default(),
            events_by_kind: Vec::new(),
            lost: Counter::default(),
            connections: Family::default(),
            tracked: Gauge::default(),
            evicted: Counter::default(),
            tuned: Family::default(),
        };
        m.registry.register(
            "keepalive_probes",
            "Keepalive probes the kernel sent (TcpExt.TCPKeepAlive)",
            m.probes.clone(),
        );
        m.registry.register(
            "keepalive_retransmits",
            "Segments the kernel retransmitted (Tcp.RetransSegs)",
            m.retransmits.clone(),
        );
        m.registry.register(
            "keepalive_retransmit_failures",
            "Segments of retransmissions that failed (err != 0; those the IP layer refused are in keepalive_retransmits too)",
            m.retransmit_failures.clone(),
        );
        m.registry.register(
            "keepalive_resets",
            "TCP resets, by direction: sent (Tcp.OutRsts) or received",
            m.resets.clone(),
        );
        m.registry.register(
            "keepalive_timeouts",
            "Connections the kernel aborted with ETIMEDOUT, by cause",
            m.timeouts.clone(),
        );
        m.registry.register(
            "keepalive_events",
            "Kernel events received from the ring buffer, by kind",
            m.events.clone(),
        );
        m.registry.register(
            "keepalive_events_lost",
            "Events the kernel could not queue because the ring buffer was full",
            m.lost.clone(),
        );
        m.registry.register(
            "keepalive_connections",
            "Tracked connections by verdict and reason, at the last table refresh",
            m.connections.clone(),
        );
        m.registry.register(
            "keepalive_connections_tracked",
            "Connections in the monitor's table",
            m.tracked.clone(),
        );
        m.registry.register(
            "keepalive_connections_evicted",
            "Connections dropped from the table because it was full (--max-conns)",
            m.evicted.clone(),
        );
        m.registry.register(
            "keepalive_tuned",
            "Keepalive settings the tuning policy changed, by rule and action",
            m.tuned.clone(),
        );
        let build: Family<Labels, Gauge> = Family::default();
        build
            .get_or_create(&vec![("version", env!("CARGO_PKG_VERSION").to_string())])
            .set(1);
        m.registry.register(
            "keepalive_build_info",
            "Version of the running keepalive (always 1)",
            build,
        );
        m.registry.register_collector(Box::new(process));
        for (verdict, reason) in VERDICT_REASONS {
            m.connections
                .get_or_create(&vec![
                    ("verdict", verdict.into()),
                    ("reason", reason.into()),
                ])
                .set(0);
        }
        m.events_by_kind = Kind::ALL
            .into_iter()
            .filter(|k| k.is_kernel())
            .map(|k| {
                let labels = vec![("kind", k.name().to_string())];
                (k, m.events.get_or_create_owned(&labels))
            })
            .collect();
        if !labels.comm && !labels.port {
            let none = Vec::new();
            let _ = m.probes.get_or_create(&none);
            let _ = m.retransmits.get_or_create(&none);
            let _ = m.retransmit_failures.get_or_create(&none);
            for direction in ["sent", "received"] {
                let _ = m.resets.get_or_create(&with(&none, "direction", direction));
            }
            for cause in [
                TimeoutCause::Keepalive,
                TimeoutCause::Retransmission,
                TimeoutCause::UserTimeout,
            ] {
                let _ = m
                    .timeouts
                    .get_or_create(&with(&none, "cause", cause.name()));
            }
        }
        m
    }

    /// Counts one kernel event (already filtered by the caller).
    pub fn observe(&self, ev: &Event, extra: &ExtraLabels) {
        let kind = ev.kind();
        if let Some((_, c)) = self.events_by_kind.iter().find(|(k, _)| *k == kind) {
            c.inc();
        }
        match &ev.detail {
            Detail::KeepaliveProbe { .. } => {
                self.probes.get_or_create(extra).inc();
            }
            Detail::Retransmit { segs, err, .. } => {
                if counted_in_retranssegs(*err) {
                    self.retransmits
                        .get_or_create(extra)
                        .inc_by(u64::from(*segs));
                }
                if *err != 0 {
                    self.retransmit_failures
                        .get_or_create(extra)
                        .inc_by(u64::from(*segs));
                }
            }
            Detail::ResetSent { .. } => {
                self.resets
                    .get_or_create(&with(extra, "direction", "sent"))
                    .inc();
            }
            Detail::ResetReceived => {
                self.resets
                    .get_or_create(&with(extra, "direction", "received"))
                    .inc();
            }
            Detail::Timeout { cause, .. } => {
                self.timeouts
                    .get_or_create(&with(extra, "cause", cause.name()))
                    .inc();
            }
            Detail::StateChange { .. } => {}
        }
    }

    pub fn lost(&self, count: u64) {
        self.lost.inc_by(count);
    }

    /// Replaces the connection gauges with the verdicts of the table now;
    /// `evictions` is the table's running total.
    pub fn connections<'a>(&self, verdicts: impl Iterator<Item = &'a Verdict>, evictions: u64) {
        let mut counts: BTreeMap<(&'static str, &'static str), i64> =
            VERDICT_REASONS.iter().map(|&(v, r)| ((v, r), 0)).collect();
        let mut total = 0;
        for v in verdicts {
            *counts.entry((v.name(), v.reason_code())).or_default() += 1;
            total += 1;
        }
        for ((verdict, reason), n) in counts {
            self.connections
                .get_or_create(&vec![
                    ("verdict", verdict.into()),
                    ("reason", reason.into()),
                ])
                .set(n);
        }
        self.tracked.set(total);
        let seen = self.evicted.get();
        if evictions > seen {
            self.evicted.inc_by(evictions - seen);
        }
    }

    /// Counts one change the tuning policy made.
    pub fn tuned(&self, rule: &str, action: &str) {
        self.tuned
            .get_or_create(&vec![("rule", rule.into()), ("action", action.into())])
            .inc();
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        self.encode_as(Format::OpenMetrics)
    }

    pub fn encode_as(&self, format: Format) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = match format {
            Format::OpenMetrics => encode(&mut out, &self.registry),
            Format::Prometheus => prometheus_text::encode(&mut out, &self.registry),
        };
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Owner;
    use crate::table::verdict::{Dead, Orphaned};

    fn ev(detail: Detail) -> Event {
        Event {
            ts_mono_ns: 0,
            cookie: 1,
            netns: 1,
            saddr: "10.0.0.1".parse().unwrap(),
            sport: 40000,
            daddr: "10.0.0.2".parse().unwrap(),
            dport: 443,
            state: 1,
            owner: Some(Owner {
                pid: 7,
                comm: "curl".into(),
            }),
            detail,
        }
    }

    /// The value of the sample line `series` in `text`.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn events_add_up_per_family() {
        let m = Metrics::new(&labels::LabelOptions::default());
        let none = Vec::new();
        for _ in 0..3 {
            m.observe(&ev(Detail::KeepaliveProbe { probe: 1 }), &none);
        }
        let rt = |segs, err| Detail::Retransmit {
            segs,
            syn: false,
            synack: false,
            err,
        };
        m.observe(&ev(rt(2, 0)), &none);
        m.observe(&ev(rt(3, 0)), &none);
        m.observe(&ev(rt(1, -105)), &none); // -ENOBUFS: counted
        m.observe(&ev(rt(4, -16)), &none); // -EBUSY: not sent, not counted
        m.observe(
            &ev(Detail::ResetSent {
                reason: None,
                no_socket: true,
            }),
            &none,
        );
        m.observe(&ev(Detail::ResetReceived), &none);
        m.observe(&ev(Detail::ResetReceived), &none);
        m.observe(
            &ev(Detail::Timeout {
                cause: TimeoutCause::Keepalive,
                probes_out: 3,
                user_timeout_ms: 0,
            }),
            &none,
        );
        m.observe(&ev(Detail::StateChange { old: 1, new: 8 }), &none);
        m.lost(4);
        let t = m.encode();
        assert_eq!(sample(&t, "keepalive_probes_total"), Some(3.0), "{t}");
        assert_eq!(sample(&t, "keepalive_retransmits_total"), Some(6.0), "{t}");
        assert_eq!(sample(&t, "keepalive_retransmit_failures_total"), Some(5.0));
        assert_eq!(
            sample(&t, "keepalive_resets_total{direction=\"sent\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&t, "keepalive_resets_total{direction=\"received\"}"),
            Some(2.0)
        );
        assert_eq!(
            sample(&t, "keepalive_timeouts_total{cause=\"keepalive\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&t, "keepalive_events_total{kind=\"retransmit\"}"),
            Some(4.0)
        );
        assert_eq!(
            sample(&t, "keepalive_events_total{kind=\"state_change\"}"),
            Some(1.0)
        );
        assert_eq!(sample(&t, "keepalive_events_lost_total"), Some(4.0));
        assert!(t.contains("keepalive_build_info{version=\""), "{t}");
        assert!(t.ends_with("# EOF\n"));
    }

    #[test]
    fn optional_labels_split_the_series() {
        let m = Metrics::new(&labels::LabelOptions::default());
        let mut l = labels::Labeler::new(labels::LabelOptions {
            comm: true,
            port: true,
            limit: 8,
        });
        let e = ev(Detail::KeepaliveProbe { probe: 1 });
        m.observe(&e, &l.labels(&e));
        let t = m.encode();
        assert_eq!(
            sample(&t, "keepalive_probes_total{comm=\"curl\",port=\"443\"}"),
            Some(1.0),
            "{t}"
        );
        let e = ev(Detail::ResetReceived);
        m.observe(&e, &l.labels(&e));
        assert_eq!(
            sample(
                &m.encode(),
                "keepalive_resets_total{direction=\"received\",comm=\"curl\",port=\"443\"}"
            ),
            Some(1.0)
        );
    }

    #[test]
    fn connection_gauges_are_replaced_and_zeros_exported() {
        let m = Metrics::new(&labels::LabelOptions::default());
        let dead = Verdict::Dead(Dead::TimedOut {
            cause: TimeoutCause::Keepalive,
        });
        let leak = Verdict::Orphaned(Orphaned::CloseWaitLeak { idle_ms: 1 });
        m.connections([&dead, &dead, &leak, &Verdict::Healthy].into_iter(), 2);
        let t = m.encode();
        let g = |v: &str, r: &str| {
            sample(
                &t,
                &format!("keepalive_connections{{verdict=\"{v}\",reason=\"{r}\"}}"),
            )
        };
        assert_eq!(g("dead", "timed_out"), Some(2.0));
        assert_eq!(g("orphaned", "close_wait_leak"), Some(1.0));
        assert_eq!(g("healthy", "ok"), Some(1.0));
        assert_eq!(g("dead", "probes_unanswered"), Some(0.0));
        assert_eq!(sample(&t, "keepalive_connections_tracked"), Some(4.0));
        assert_eq!(sample(&t, "keepalive_connections_evicted_total"), Some(2.0));
        m.connections([&Verdict::Healthy].into_iter(), 5);
        let t = m.encode();
        let g = |v: &str, r: &str| {
            sample(
                &t,
                &format!("keepalive_connections{{verdict=\"{v}\",reason=\"{r}\"}}"),
            )
        };
        assert_eq!(g("dead", "timed_out"), Some(0.0));
        assert_eq!(sample(&t, "keepalive_connections_evicted_total"), Some(5.0));
    }

    #[test]
    fn tuned_counts_by_rule_and_action() {
        let m = Metrics::new(&labels::LabelOptions::default());
        m.tuned("db", "set_keepalive");
        m.tuned("db", "set_keepalive");
        assert_eq!(
            sample(
                &m.encode(),
                "keepalive_tuned_total{rule=\"db\",action=\"set_keepalive\"}"
            ),
            Some(2.0)
        );
    }

    #[test]
    fn health_needs_attached_hooks_and_a_recent_drain() {
        let h = Health::default();
        assert!(h.ready().is_err());
        h.attached.store(true, Ordering::Relaxed);
        assert!(h.ready().is_ok());
        assert!(h.healthy().is_err(), "never drained");
        h.drained();
        assert!(h.healthy().is_ok());
        h.stopping.store(true, Ordering::Relaxed);
        assert!(h.healthy().is_err() && h.ready().is_err());
    }
}
