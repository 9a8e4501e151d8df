//! `keepalive serve`: the long-running daemon. The monitor engine with
//! three consumers: the metrics (served over HTTP on a thread of their
//! own), the event file (JSON lines, rotated by size, reopened on SIGHUP)
//! and the log (`tracing`, on stderr or the journal).
//!
//! Everything that can be refused is checked before anything starts: the
//! configuration (errors as FILE:LINE), the metrics address (in use: one
//! line, nothing attached) and the event file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;

use crate::config::ServeSettings;
use crate::events::filter::Filter;
use crate::events::{Event, Kind};
use crate::metrics::consumer::MetricsConsumer;
use crate::metrics::labels::{DEFAULT_LIMIT, LabelOptions, parse_label_names};
use crate::metrics::{DEFAULT_ADDR, Metrics, http};
use crate::monitor::{self, Consumer, Counters, Ctx, Flow, MonitorOptions};
use crate::output::Clock;
use crate::output::file::{FileOptions, LineFile};
use crate::output::json::{EventOut, JsonRecord, LostOut, VerdictOut, write_line};
use crate::table::MatchesConn;
use crate::table::conn_table::{ConnTable, VerdictChange};
use crate::table::verdict::Thresholds;
use crate::tune::report::{Tuned, TunedOut};
use crate::tune::{
    DEFAULT_RATE_CAP, PolicyNotice, PolicyOut, TuneOptions, TunedSink, Tuner, load_policy,
    policy_text,
};

/// Defaults of the settings that have one.
pub const DEFAULT_REFRESH_MS: u64 = 5_000;
pub const DEFAULT_MAX_CONNS: usize = 262_144;
pub const DEFAULT_ROTATE_KEEP: u32 = 5;

/// What the command line said (`None`/empty: not given).
#[derive(Clone, Debug, Default)]
pub struct ServeFlags {
    pub metrics: Option<String>,
    pub metrics_labels: Vec<String>,
    pub metrics_label_limit: Option<usize>,
    pub output: Option<PathBuf>,
    pub rotate_size: Option<u64>,
    pub rotate_keep: Option<u32>,
    pub events: Vec<Kind>,
    pub refresh_ms: Option<u64>,
    pub max_conns: Option<usize>,
    pub ring_size: Option<u32>,
    pub ports: Vec<u16>,
    pub cidrs: Vec<ipnet::IpNet>,
    pub pids: Vec<u32>,
    pub policy: Option<PathBuf>,
}

/// Everything `serve` runs with, flags over the file over the defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct ServeOptions {
    pub metrics: String,
    pub labels: LabelOptions,
    pub output: Option<PathBuf>,
    /// Rotate the event file when it would grow past this many bytes.
    pub rotate_size: Option<u64>,
    pub rotate_keep: u32,
    /// Connections to watch (ports, addresses, owners) and, for the event
    /// file only, the kinds to write.
    pub filter: Filter,
    pub refresh: Option<Duration>,
    pub max_conns: usize,
    pub ring_size: Option<u32>,
    pub thresholds: Thresholds,
    pub policy: Option<PathBuf>,
}

fn pick<T>(flag: Vec<T>, file: Option<Vec<T>>) -> Vec<T> {
    if flag.is_empty() {
        file.unwrap_or_default()
    } else {
        flag
    }
}

/// Flags win over the file, the file over the defaults.
/// `config` is the file `file` came from: its own `[[rule]]` tables are
/// the policy when neither --policy nor `policy` names another file.
pub fn resolve(
    flags: ServeFlags,
    file: ServeSettings,
    config: Option<&std::path::Path>,
    thresholds: Thresholds,
) -> Result<ServeOptions, String> {
    let inline = (file.rules > 0)
        .then(|| config.map(PathBuf::from))
        .flatten();
    let limit = flags
        .metrics_label_limit
        .or(file.metrics_label_limit)
        .unwrap_or(DEFAULT_LIMIT);
    let labels = parse_label_names(&pick(flags.metrics_labels, file.metrics_labels), limit)?;
    let file_opts = FileOptions {
        append: true,
        rotate_size: flags.rotate_size.or(file.rotate_size),
        rotate_keep: flags
            .rotate_keep
            .or(file.rotate_keep)
            .unwrap_or(DEFAULT_ROTATE_KEEP),
    };
    file_opts.validate()?;

    let refresh_ms = flags
        .refresh_ms
        .or(file.refresh_ms)
        .unwrap_or(DEFAULT_REFRESH_MS);
    Ok(ServeOptions {
        metrics: flags
            .metrics
            .or(file.metrics.map(|a| a.to_string()))
            .unwrap_or_else(|| DEFAULT_ADDR.to_string()),
        labels,
        output: flags.output.or(file.output),
        rotate_size: file_opts.rotate_size,
        rotate_keep: file_opts.rotate_keep,
        filter: Filter {
            ports: pick(flags.ports, file.ports),
            cidrs: pick(flags.cidrs, file.cidrs),
            pids: pick(flags.pids, file.pids),
            kinds: pick(flags.events, file.events).into_iter().collect(),
            // Metrics count every state change; `record --to-state` narrows.
            to_states: Default::default(),
        },
        refresh: (refresh_ms > 0).then(|| Duration::from_millis(refresh_ms)),
        max_conns: flags
            .max_conns
            .or(file.max_conns)
            .unwrap_or(DEFAULT_MAX_CONNS),
        ring_size: flags.ring_size.or(file.ring_size),
        thresholds,
        policy: flags.policy.or(file.policy).or(inline),
    })
}

/// Writes events, verdict changes and lost records as JSON lines, each
/// line whole in one file; flushed after every batch.
struct EventFileSink {
    file: LineFile,
    /// Ports, addresses, owners and kinds, as `record` applies them.
    filter: Filter,
    /// Kernel events handed to the file (the file's share of `received`).
    events_written: u64,
}

impl EventFileSink {
    /// A failed write (disk full) stops the daemon with the count of lines
    /// written and not written: systemd restarts it, the loss is in the log.
    fn write(&mut self, record: &impl JsonRecord) -> Result<Flow> {
        self.file.line_with(|buf| write_line(buf, record))?;
        Ok(Flow::Continue)
    }
}

impl Consumer for EventFileSink {
    fn event(&mut self, ev: &Event, ctx: &Ctx) -> Result<Flow> {
        if !self.filter.matches(ev) {
            return Ok(Flow::Continue);
        }
        self.events_written += 1;
        self.write(&EventOut::new(ev, ctx.clock))
    }

    fn verdict(&mut self, ch: &VerdictChange, mono_ns: u64, ctx: &Ctx) -> Result<Flow> {
        let f = &self.filter;
        if !f.kinds.is_empty() && !f.kinds.contains(&Kind::Verdict) || !f.matches_conn(&ch.conn) {
            return Ok(Flow::Continue);
        }
        self.write(&VerdictOut::new(ch, mono_ns, ctx.clock))
    }

    fn lost(&mut self, count: u64, total: u64, mono_ns: u64, ctx: &Ctx) -> Result<Flow> {
        self.write(&LostOut::new(count, total, mono_ns, ctx.clock))
    }

    fn batch_done(&mut self, _ctx: &mut Ctx) -> Result<Flow> {
        self.file.flush()?;
        Ok(Flow::Continue)
    }

    fn hangup(&mut self, _ctx: &mut Ctx) -> Result<Flow> {
        self.file.reopen()?;
        tracing::info!(file = %self.file.name(), "SIGHUP: event file reopened");
        Ok(Flow::Continue)
    }

    fn finished(&mut self, _totals: &Counters, _table: Option<&ConnTable>) -> Result<()> {
        self.file.flush()?;
        Ok(())
    }
}

/// The daemon's consumers together: what a tuner wraps when there is a
/// policy, so its `tuned` records reach the file and the metrics too.
struct ServeCore {
    metrics: Arc<Metrics>,
    counting: MetricsConsumer,
    file: Option<EventFileSink>,
    log: ServeLog,
}

impl ServeCore {
    /// Calls `f` on each part in order; stops when any asks to.
    fn each(&mut self, mut f: impl FnMut(&mut dyn Consumer) -> Result<Flow>) -> Result<Flow> {
        let mut flow = f(&mut self.counting)?;
        if let Some(file) = self.file.as_mut()
            && f(file)? == Flow::Stop
        {
            flow = Flow::Stop;
        }
        if f(&mut self.log)? == Flow::Stop {
            flow = Flow::Stop;
        }
        Ok(flow)
    }
}

impl Consumer for ServeCore {
    fn started(&mut self, ctx: &mut Ctx) -> Result<Flow> {
        self.each(|c| c.started(ctx))
    }
    fn event(&mut self, ev: &Event, ctx: &Ctx) -> Result<Flow> {
        self.each(|c| c.event(ev, ctx))
    }
    fn verdict(&mut self, ch: &VerdictChange, mono_ns: u64, ctx: &Ctx) -> Result<Flow> {
        self.each(|c| c.verdict(ch, mono_ns, ctx))
    }
    fn lost(&mut self, count: u64, total: u64, mono_ns: u64, ctx: &Ctx) -> Result<Flow> {
        self.each(|c| c.lost(count, total, mono_ns, ctx))
    }
    fn refreshed(&mut self, ctx: &mut Ctx) -> Result<Flow> {
        self.each(|c| c.refreshed(ctx))
    }
    fn batch_done(&mut self, ctx: &mut Ctx) -> Result<Flow> {
        self.each(|c| c.batch_done(ctx))
    }
    fn hangup(&mut self, ctx: &mut Ctx) -> Result<Flow> {
        self.each(|c| c.hangup(ctx))
    }
    fn stopping(&mut self, ctx: &mut Ctx) -> Result<()> {
        self.each(|c| c.stopping(ctx).map(|()| Flow::Continue))
            .map(|_| ())
    }
    fn finished(&mut self, totals: &Counters, table: Option<&ConnTable>) -> Result<()> {
        self.each(|c| c.finished(totals, table).map(|()| Flow::Continue))
            .map(|_| ())
    }
}

impl TunedSink for ServeCore {
    fn tuned(&mut self, t: &Tuned, clock: &Clock) -> Result<Flow> {
        self.metrics.tuned(&t.rule, t.action.name());
        match self.file.as_mut() {
            Some(f) => f.write(&TunedOut::new(t, clock)),
            None => Ok(Flow::Continue),
        }
    }

    fn policy(&mut self, n: &PolicyNotice, mono_ns: u64, clock: &Clock) -> Result<Flow> {
        tracing::info!(notice = %policy_text(n, mono_ns, clock), "tuning policy");
        match self.file.as_mut() {
            Some(f) => f.write(&PolicyOut::new(n, mono_ns, clock)),
            None => Ok(Flow::Continue),
        }
    }
}

/// The daemon's own log lines: start, losses, stop.
struct ServeLog {
    metrics_addr: SocketAddr,
}

impl Consumer for ServeLog {
    fn started(&mut self, ctx: &mut Ctx) -> Result<Flow> {
        tracing::info!(
            hooks = ctx.hooks,
            pid = std::process::id(),
            metrics = %format!("http://{}/metrics", self.metrics_addr),
            "serving; hooks attached"
        );
        Ok(Flow::Continue)
    }

    fn event(&mut self, _ev: &Event, _ctx: &Ctx) -> Result<Flow> {
        Ok(Flow::Continue)
    }

    fn lost(&mut self, count: u64, total: u64, _mono_ns: u64, _ctx: &Ctx) -> Result<Flow> {
        tracing::warn!(
            count,
            total,
            "events lost: the ring buffer was full; raise ring_size"
        );
        Ok(Flow::Continue)
    }

    fn hangup(&mut self, _ctx: &mut Ctx) -> Result<Flow> {
        Ok(Flow::Continue)
    }

    fn finished(&mut self, t: &Counters, _table: Option<&ConnTable>) -> Result<()> {
        tracing::info!(
            emitted = t.emitted,
            received = t.received,
            lost = t.lost,
            tracked = t.tracked,
            evicted = t.evicted,
            "stopped"
        );
        Ok(())
    }
}

pub fn run(opts: ServeOptions) -> Result<()> {
    // Refuse before anything is attached: a bad policy, a busy address,
    // an output we may not write.
    let loaded = opts.policy.as_deref().map(load_policy).transpose()?;
    let listener = http::bind(&opts.metrics)?;
    let file = match &opts.output {
        Some(path) => Some(LineFile::create(
            path,
            FileOptions {
                append: true,
                rotate_size: opts.rotate_size,
                rotate_keep: opts.rotate_keep,
            },
        )?),
        None => None,
    };
    let metrics = Arc::new(Metrics::new(&opts.labels));
    let server = http::spawn(listener, metrics.clone())?;
    let core = ServeCore {
        metrics: metrics.clone(),
        counting: MetricsConsumer::new(metrics, opts.labels, &opts.filter),
        file: file.map(|file| EventFileSink {
            file,
            filter: opts.filter.clone(),
            events_written: 0,
        }),
        log: ServeLog {
            metrics_addr: server.addr,
        },
    };
    // Kinds select what the file gets; the metrics count every kind.
    let mut kernel_filter = opts.filter.clone();
    kernel_filter.kinds.clear();
    let monitor_opts = MonitorOptions {
        filter: kernel_filter,
        ring_size: opts.ring_size,
        refresh: opts.refresh,
        max_conns: opts.max_conns,
        thresholds: opts.thresholds,
        final_walk: false,
    };
    let (result, core) = match (opts.policy, loaded) {
        (Some(policy_path), Some(loaded)) => {
            let tune = TuneOptions {
                policy_path,
                dry_run: false,
                enforce: false,
                keep: false,
                rate_cap: DEFAULT_RATE_CAP,
            };
            let mut tuner = Tuner::new(core, tune, loaded);
            tuner.summary_line = false;
            let r = monitor::run(monitor_opts, &mut tuner);
            let c = tuner.counts;
            tracing::info!(
                tuned = c.tuned,
                app_kept = c.app_kept,
                app_override = c.app_override,
                restored = c.restored,
                failed = c.failed,
                rate_limited = c.rate_limited,
                "tuning ended"
            );
            (r, tuner.inner)
        }
        _ => {
            let mut core = core;
            let r = monitor::run(monitor_opts, &mut core);
            (r, core)
        }
    };
    if let Some(s) = &core.file {
        tracing::info!(
            events_written = s.events_written,
            lines_written = s.file.lines_written(),
            lines_unwritten = s.file.lines_unwritten(),
            "event file closed"
        );
    }
    drop(server);
    result.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let file = ServeSettings {
            metrics: Some("0.0.0.0:9100".parse().unwrap()),
            metrics_labels: Some(vec!["comm".into()]),
            rotate_size: Some(10_000),
            rotate_keep: Some(2),
            ports: Some(vec![5432]),
            events: Some(vec![Kind::Timeout]),
            refresh_ms: Some(0),
            ..ServeSettings::default()
        };
        let o = resolve(
            ServeFlags::default(),
            file.clone(),
            None,
            Thresholds::default(),
        )
        .unwrap();
        assert_eq!(o.metrics, "0.0.0.0:9100");
        assert!(o.labels.comm && !o.labels.port);
        assert_eq!(o.labels.limit, DEFAULT_LIMIT);
        assert_eq!(o.rotate_size, Some(10_000));
        assert_eq!(o.rotate_keep, 2);
        assert_eq!(o.filter.ports, vec![5432]);
        assert!(o.filter.kinds.contains(&Kind::Timeout));
        assert_eq!(o.refresh, None, "0 turns the table off");
        assert_eq!(o.max_conns, DEFAULT_MAX_CONNS);
        let flags = ServeFlags {
            metrics: Some("127.0.0.1:1".into()),
            metrics_labels: vec!["port".into()],
            rotate_keep: Some(9),
            ports: vec![80, 443],
            refresh_ms: Some(1000),
            ..ServeFlags::default()
        };
        let o = resolve(flags, file, None, Thresholds::default()).unwrap();
        assert_eq!(o.metrics, "127.0.0.1:1");
        assert!(!o.labels.comm && o.labels.port);
        assert_eq!(o.rotate_keep, 9);
        assert_eq!(o.filter.ports, vec![80, 443]);
        assert_eq!(o.refresh, Some(Duration::from_secs(1)));
    }

    #[test]
    fn defaults_without_a_file() {
        let o = resolve(
            ServeFlags::default(),
            ServeSettings::default(),
            None,
            Thresholds::default(),
        )
        .unwrap();
        assert_eq!(o.metrics, DEFAULT_ADDR);
        assert_eq!(o.output, None);
        assert_eq!(o.rotate_size, None);
        assert_eq!(o.rotate_keep, DEFAULT_ROTATE_KEEP);
        assert_eq!(o.refresh, Some(Duration::from_millis(DEFAULT_REFRESH_MS)));
        assert_eq!(
            o.labels,
            LabelOptions {
                comm: false,
                port: false,
                limit: DEFAULT_LIMIT
            }
        );
    }

    #[test]
    fn bad_label_flag_is_refused() {
        let flags = ServeFlags {
            metrics_labels: vec!["pid".into()],
            ..ServeFlags::default()
        };
        let e = resolve(flags, ServeSettings::default(), None, Thresholds::default()).unwrap_err();
        assert!(e.contains("unknown metrics label `pid`"), "{e}");
        let flags = ServeFlags {
            rotate_size: Some(10),
            ..ServeFlags::default()
        };
        let e = resolve(flags, ServeSettings::default(), None, Thresholds::default()).unwrap_err();
        assert!(e.starts_with("--rotate-size must be at least 4096"), "{e}");
        let file = ServeSettings {
            rules: 1,
            ..ServeSettings::default()
        };
        let cfg = std::path::Path::new("/etc/keepalive/keepalive.toml");
        let o = resolve(
            ServeFlags::default(),
            file.clone(),
            Some(cfg),
            Thresholds::default(),
        );
        assert_eq!(
            o.unwrap().policy,
            Some(cfg.to_path_buf()),
            "inline [[rule]] tables"
        );
        let flags = ServeFlags {
            policy: Some("/p.toml".into()),
            ..ServeFlags::default()
        };
        let o = resolve(flags, file, Some(cfg), Thresholds::default()).unwrap();
        assert_eq!(o.policy, Some(PathBuf::from("/p.toml")), "--policy wins");
    }
}
