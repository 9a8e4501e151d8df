//! The `keepalive` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use keepalive::commands::record::{self, RecordOptions};
use keepalive::commands::serve;
use keepalive::commands::snapshot::{self, SnapshotOptions};
use keepalive::commands::top::{self, TopOptions};
use keepalive::config;
use keepalive::config::LogFormat;
use keepalive::diag;
use keepalive::events::Kind;
use keepalive::events::filter::{Filter, parse_cidr};
use keepalive::metrics::DEFAULT_ADDR;
use keepalive::output::{Format, is_broken_pipe};
use keepalive::table::verdict::{Thresholds, VerdictKind};

#[derive(Parser)]
#[command(
    name = "keepalive",
    version,
    about = "Watch every TCP connection from the kernel: keepalive probes, retransmits, resets, timeouts"
)]
struct Cli {
    /// Diagnostics on stderr: error, warn, info, debug or trace (or a
    /// tracing filter such as `keepalive=debug`); RUST_LOG works too.
    /// [default: info for `serve`, warn otherwise]
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<String>,
    /// Log lines as text for people or JSON objects for machines
    /// [default: text; `serve` reads log_format from its config].
    #[arg(long, global = true, value_enum, value_name = "FORMAT")]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

/// Sends `tracing` diagnostics to stderr, filtered by `--log-level` (or
/// RUST_LOG when set). Data never goes there: it has its own outputs.
fn init_logging(level: &str, format: LogFormat) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.is_empty() => EnvFilter::try_new(env),
        _ => EnvFilter::try_new(level),
    }
    .map_err(|e| anyhow::anyhow!("invalid --log-level `{level}`: {e}"))?;
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        // Its fallback for a failed write is eprintln!, which panics when
        // stderr is gone: a lost diagnostic must not stop the monitor.
        .log_internal_errors(false);
    match format {
        LogFormat::Text => fmt.try_init(),
        LogFormat::Json => fmt.json().flatten_event(true).try_init(),
    }
    .map_err(|e| anyhow::anyhow!("installing the log subscriber: {e}"))
}

#[derive(Subcommand)]
enum Command {
    /// Stream TCP events as they happen (one line per event).
    Record {
        /// Output format.
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
        /// Write to FILE instead of stdout (whole lines, flushed after every batch).
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
        #[command(flatten)]
        conn_filter: ConnFilterArgs,
        /// Only these event kinds (repeatable): retransmit, reset_sent,
        /// reset_received, state_change, keepalive_probe, timeout, verdict.
        #[arg(long = "event", value_name = "KIND", value_enum)]
        events: Vec<Kind>,
        /// Only state changes into STATE (repeatable; close, established,
        /// close_wait, fin_wait1...): filtered in the kernel, so the others
        /// cost no ring space. `--to-state close` is one line per
        /// connection end. Other kinds are not affected.
        #[arg(long = "to-state", value_name = "STATE", value_parser = parse_tcp_state)]
        to_states: Vec<u32>,
        /// Bytes of the event ring buffers, all CPUs together (a power of two
        /// from 4096 to 256 MiB; default 4 MiB): each online CPU gets an
        /// equal share, at least a page.
        #[arg(long, value_name = "BYTES")]
        ring_size: Option<u32>,
        /// Re-read every connection from the kernel this often (100ms to
        /// 24h) to keep the connection table and its verdicts current; 0
        /// turns the table, `verdict` events and --table-dump off.
        #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
        refresh: std::time::Duration,
        /// Most connections tracked at once (1 to 4194304); beyond it the
        /// least recently active is evicted (and counted).
        #[arg(long, value_name = "N", default_value = "262144")]
        max_conns: usize,
        /// At exit, write the connection table here (JSON lines, as `snapshot`).
        #[arg(long, value_name = "FILE")]
        table_dump: Option<PathBuf>,
        /// Also serve Prometheus metrics on ADDR while recording (as
        /// `serve`; `--metrics` alone: 127.0.0.1:9977).
        #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = DEFAULT_ADDR)]
        metrics: Option<String>,
        #[command(flatten)]
        thresholds: ThresholdArgs,
        /// Also tune connections with this policy while recording (as
        /// `keepalive tune`; `tuned` records join the stream).
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
        #[command(flatten)]
        tune: TuneArgs,
    },
    /// Apply a keepalive policy to live TCP connections, new and already
    /// open, without touching the applications; report every change, and
    /// put the original values back on exit (SIGHUP reloads the policy).
    Tune {
        /// The policy: TOML with [[rule]] tables (see docs/tuning.md).
        #[arg(long, value_name = "FILE")]
        policy: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
        /// Write to FILE instead of stdout.
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Also serve Prometheus metrics on ADDR while tuning (as
        /// `record --metrics`, `keepalive_tuned_total` included;
        /// `--metrics` alone: 127.0.0.1:9977).
        #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = DEFAULT_ADDR)]
        metrics: Option<String>,
        #[command(flatten)]
        tune: TuneArgs,
    },
    /// Run as a service: the monitor, Prometheus metrics on --metrics, and
    /// every event as a JSON line in --output (rotated by size, reopened
    /// on SIGHUP). Settings come from the [serve] table of --config
    /// (/etc/keepalive/keepalive.toml when it exists); flags override it.
    Serve(Box<ServeArgs>),
    /// Show every TCP connection now, with keepalive settings, probes,
    /// retransmits, idle times and a verdict (dead, orphaned, unprotected,
    /// healthy) with its reason, worst first.
    Snapshot {
        /// Output format (json: one object per connection).
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
        #[command(flatten)]
        conn_filter: ConnFilterArgs,
        /// Only this verdict (repeatable): dead, orphaned, unprotected, healthy.
        #[arg(long, value_name = "VERDICT", value_enum)]
        verdict: Vec<VerdictKind>,
        /// Also show listeners, TIME_WAIT and half-open (SYN_RECV) sockets.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        thresholds: ThresholdArgs,
    },
    /// Live terminal UI: connections worst first with verdicts and reasons,
    /// a detail view with each connection's probe timeline, the event log,
    /// filters (`/`), sorting (`s`), help (`?`).
    Top {
        #[command(flatten)]
        conn_filter: ConnFilterArgs,
        /// Re-read every connection from the kernel this often (events
        /// update the screen in between).
        #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
        refresh: u64,
        /// Redraw the screen this often.
        #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
        interval: u64,
        /// Most connections tracked at once; beyond it the least recently
        /// active is evicted (and counted).
        #[arg(long, value_name = "N", default_value = "262144")]
        max_conns: usize,
        #[command(flatten)]
        thresholds: ThresholdArgs,
        /// Also tune connections with this policy while showing them (as
        /// `keepalive tune`); the RULE column says which rule tuned a row.
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
        #[command(flatten)]
        tune: TuneArgs,
    },
    /// Diagnose whether this host can run the monitor, hook by hook.
    Check,
    /// Print the shell completion script for SHELL to stdout, e.g.
    /// `keepalive completions bash > /etc/bash_completion.d/keepalive`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout, or with --out-dir write
    /// keepalive.1 and a keepalive-COMMAND.1 page for each command there.
    Man {
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Serve /metrics, /healthz and /readyz on ADDR [default: 127.0.0.1:9977].
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Extra labels on the event counters: comm, port (comma-separated or
    /// repeated), each capped at --metrics-label-limit values.
    #[arg(long, value_name = "LABELS", value_delimiter = ',')]
    metrics_labels: Vec<String>,
    /// Most distinct values of each extra label; the rest are counted
    /// under `_overflow` [default: 64].
    #[arg(long, value_name = "N")]
    metrics_label_limit: Option<usize>,
    /// Write every event as a JSON line to FILE (created 0640; a symlink
    /// is refused).
    #[arg(long, short, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Rotate --output when it would grow past SIZE (e.g. 100MiB, 1G).
    #[arg(long, value_name = "SIZE", value_parser = config::parse_size)]
    rotate_size: Option<u64>,
    /// Rotated files to keep (FILE.1 newest) [default: 5].
    #[arg(long, value_name = "N")]
    rotate_keep: Option<u32>,
    /// Only these event kinds in --output (repeatable); metrics count all.
    #[arg(long = "event", value_name = "KIND", value_enum)]
    events: Vec<Kind>,
    #[command(flatten)]
    conn_filter: ConnFilterArgs,
    /// Bytes of the per-CPU event rings together (power of two, >= 4096; default 4 MiB).
    #[arg(long, value_name = "BYTES", value_parser = parse_ring_size)]
    ring_size: Option<u32>,
    /// Re-read every connection this often (verdict gauges) [default: 5s]; 0: never.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    refresh: Option<u64>,
    /// Most connections tracked at once [default: 262144].
    #[arg(long, value_name = "N")]
    max_conns: Option<usize>,
    /// Tune connections with this policy (TOML [[rule]] tables, as
    /// `keepalive tune`; default: the config's own [[rule]] tables), and
    /// count the changes in keepalive_tuned_total{rule,action}.
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// Only check the configuration and the flags, then exit (0: valid).
    #[arg(long)]
    check_config: bool,
    #[command(flatten)]
    thresholds: ThresholdArgs,
}

/// Where `serve` looks for its configuration when --config is not given.
const SERVE_CONFIG: &str = "/etc/keepalive/keepalive.toml";

impl ServeArgs {
    /// The config file to read: --config, else the system one if present.
    fn config_path(&self) -> Option<PathBuf> {
        self.thresholds.config.clone().or_else(|| {
            let p = PathBuf::from(SERVE_CONFIG);
            p.exists().then_some(p)
        })
    }

    fn options(self, file: Option<&config::Loaded>) -> anyhow::Result<serve::ServeOptions> {
        let config = file.and(self.config_path());
        let settings = file
            .map(config::Loaded::serve)
            .transpose()?
            .unwrap_or_default();
        let thresholds = config::thresholds(&self.thresholds.flags(), file)?;
        let flags = serve::ServeFlags {
            metrics: self.metrics,
            metrics_labels: self.metrics_labels,
            metrics_label_limit: self.metrics_label_limit,
            output: self.output,
            rotate_size: self.rotate_size,
            rotate_keep: self.rotate_keep,
            events: self.events,
            refresh_ms: self.refresh,
            max_conns: self.max_conns,
            ring_size: self.ring_size,
            ports: self.conn_filter.port,
            cidrs: self.conn_filter.addr,
            pids: self.conn_filter.pid,
            policy: self.policy,
        };
        serve::resolve(flags, settings, config.as_deref(), thresholds).map_err(anyhow::Error::msg)
    }
}

fn parse_ring_size(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| format!("invalid ring size `{s}`: expected a number of bytes"))?;
    config::check_ring_size(n)
}

/// How a policy is applied.
#[derive(clap::Args)]
struct TuneArgs {
    /// Compute and report the changes, change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Apply over applications' own keepalive settings, and rewrite the
    /// ones they set later (default: applications win, and it is reported).
    #[arg(long)]
    enforce: bool,
    /// Leave the new values on the connections at exit (default: restore).
    #[arg(long)]
    keep: bool,
    /// At most this many socket changes per second, all together (0: no cap).
    #[arg(long, value_name = "N", default_value_t = keepalive::tune::DEFAULT_RATE_CAP)]
    max_changes_per_second: u32,
}

impl TuneArgs {
    fn options(&self, policy: PathBuf) -> keepalive::tune::TuneOptions {
        keepalive::tune::TuneOptions {
            policy_path: policy,
            dry_run: self.dry_run,
            enforce: self.enforce,
            keep: self.keep,
            rate_cap: self.max_changes_per_second,
        }
    }
}

/// Which connections to show.
#[derive(clap::Args)]
struct ConnFilterArgs {
    /// Only connections with this local or remote port (repeatable).
    #[arg(long, value_name = "PORT")]
    port: Vec<u16>,
    /// Only connections with an address in CIDR (repeatable).
    #[arg(long, value_name = "CIDR", value_parser = parse_cidr)]
    addr: Vec<ipnet::IpNet>,
    /// Only connections owned by PID (repeatable; `record` learns owners at
    /// connect(), `snapshot` from /proc).
    #[arg(long, value_name = "PID")]
    pid: Vec<u32>,
}

impl ConnFilterArgs {
    fn filter(self, kinds: Vec<Kind>) -> Filter {
        Filter {
            ports: self.port,
            cidrs: self.addr,
            pids: self.pid,
            kinds: kinds.into_iter().collect(),
            to_states: Default::default(),
        }
    }
}

/// Verdict thresholds (durations like 90s, 5m, 1h30m, 500ms). Flags win
/// over `--config`, which wins over the defaults.
#[derive(clap::Args)]
struct ThresholdArgs {
    /// TOML file with a [thresholds] table (idle, middlebox_timeout,
    /// close_wait, dead_retransmits).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Established and idle this long without working keepalive: unprotected [default: 60s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    idle_threshold: Option<u64>,
    /// NAT/load-balancer idle timeout keepalive must beat [default: 350s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    middlebox_timeout: Option<u64>,
    /// CLOSE_WAIT this long: a leak [default: 60s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    close_wait_threshold: Option<u64>,
    /// Consecutive unanswered retransmissions that make a connection dead [default: 3].
    #[arg(long, value_name = "N")]
    dead_retransmits: Option<u32>,
    /// Skip the /proc scan for owning processes (faster; no `no_owner` verdicts).
    #[arg(long)]
    no_owners: bool,
}

impl ThresholdArgs {
    fn flags(&self) -> config::ThresholdFlags {
        config::ThresholdFlags {
            idle_ms: self.idle_threshold,
            middlebox_idle_ms: self.middlebox_timeout,
            close_wait_ms: self.close_wait_threshold,
            dead_retransmits: self.dead_retransmits,
            no_owners: self.no_owners,
        }
    }

    fn thresholds(&self) -> anyhow::Result<Thresholds> {
        let file = self
            .config
            .as_deref()
            .map(config::Loaded::load)
            .transpose()?;
        config::thresholds(&self.flags(), file.as_ref())
    }
}

fn parse_tcp_state(s: &str) -> Result<u32, String> {
    keepalive::events::filter::parse_tcp_state(s).map_err(|e| format!("{e:#}"))
}

fn parse_duration(s: &str) -> Result<u64, String> {
    config::parse_duration(s)
}

/// Writes all of `bytes` to stdout; the error keeps its io::Error, so a
/// reader that went away (`| head`) is told apart.
fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .context("writing to stdout")
}

/// Man pages generated from the command definitions, so they never drift.
fn man(out_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let cmd = Cli::command();
    match out_dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir)
                .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
            clap_mangen::generate_to(cmd, &dir)
                .map_err(|e| anyhow::anyhow!("writing man pages to {}: {e}", dir.display()))
        }
        None => {
            let mut page = Vec::new();
            clap_mangen::Man::new(cmd)
                .render(&mut page)
                .map_err(|e| anyhow::anyhow!("rendering the man page: {e}"))?;
            write_stdout(&page)
        }
    }
}

/// Help and version go out as clap writes them; a usage error becomes one
/// line on stderr (the message, its tip or the possible values) and exit 2.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        let _ = e.print();
        return ExitCode::from(2);
    }
    let text = e.render().to_string();
    let line = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    diag!("{line}");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    // A bug must still end in one line, not a backtrace.
    // The hook itself must not panic when stderr is gone (that aborts).
    std::panic::set_hook(Box::new(|info| {
        diag!("internal error: {info}; please report this");
    }));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    // serve's config may set the log format, so it is read first; any
    // error in it stops everything before it starts.
    let serve_config = match &cli.command {
        Command::Serve(args) => match args.config_path().map(|p| config::Loaded::load(&p)) {
            Some(Err(e)) => {
                diag!("error: {e:#}");
                return ExitCode::FAILURE;
            }
            Some(Ok(l)) => Some(l),
            None => None,
        },
        _ => None,
    };
    let (default_level, file_format) = match &cli.command {
        Command::Serve(_) => (
            "info",
            serve_config
                .as_ref()
                .and_then(|c| c.serve().ok())
                .and_then(|s| s.log_format),
        ),
        _ => ("warn", None),
    };
    let level = cli.log_level.as_deref().unwrap_or(default_level);
    let format = cli.log_format.or(file_format).unwrap_or_default();
    // Diagnostics on stderr would be drawn over the screen of `top`; what
    // matters there (lost events) is on the screen itself.
    let on_screen = matches!(cli.command, Command::Top { .. });
    if !on_screen && let Err(e) = init_logging(level, format) {
        diag!("error: {e:#}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Serve(args) if args.check_config => {
            let path = args.config_path();
            args.options(serve_config.as_ref())
                .and_then(|o| {
                    // The policy is checked as tune checks it (FILE:LINE).
                    if let Some(p) = &o.policy {
                        keepalive::tune::load_policy(p)?;
                    }
                    Ok(o)
                })
                .map(|_| match path {
                    Some(p) => format!("{}: ok\n", p.display()),
                    None => "flags ok (no config file)\n".to_string(),
                })
                .and_then(|line| write_stdout(line.as_bytes()))
                .map(|()| true)
        }
        Command::Serve(args) => args
            .options(serve_config.as_ref())
            .and_then(serve::run)
            .map(|()| true),
        Command::Record {
            format,
            output,
            conn_filter,
            events,
            to_states,
            ring_size,
            refresh,
            max_conns,
            table_dump,
            metrics,
            thresholds,
            policy,
            tune,
        } => thresholds.thresholds().and_then(|thresholds| {
            record::run(RecordOptions {
                metrics,
                format,
                output,
                filter: Filter {
                    to_states: to_states.into_iter().collect(),
                    ..conn_filter.filter(events)
                },
                ring_size,
                refresh: (!refresh.is_zero()).then_some(refresh),
                max_conns,
                thresholds,
                table_dump,
                tune: policy.map(|p| tune.options(p)),
            })
            .map(|()| true)
        }),
        Command::Snapshot {
            format,
            conn_filter,
            verdict,
            all,
            thresholds,
        } => thresholds.thresholds().and_then(|thresholds| {
            snapshot::run(SnapshotOptions {
                format,
                filter: conn_filter.filter(Vec::new()),
                verdicts: verdict,
                thresholds,
                all,
            })
            .map(|()| true)
        }),
        Command::Top {
            conn_filter,
            refresh,
            interval,
            max_conns,
            thresholds,
            policy,
            tune,
        } => thresholds.thresholds().and_then(|thresholds| {
            top::run(TopOptions {
                filter: conn_filter.filter(Vec::new()),
                refresh: std::time::Duration::from_millis(refresh),
                interval: std::time::Duration::from_millis(interval),
                max_conns,
                thresholds,
                tune: policy.map(|p| tune.options(p)),
            })
            .map(|()| true)
        }),
        Command::Tune {
            policy,
            format,
            output,
            metrics,
            tune,
        } => keepalive::commands::tune::run(keepalive::commands::tune::TuneCommand {
            tune: tune.options(policy),
            format,
            output,
            metrics,
        })
        .map(|()| true),
        Command::Check => keepalive::commands::check::run(),
        Command::Completions { shell } => {
            // Generated in memory: clap_complete panics when its writer fails.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "keepalive", &mut script);
            write_stdout(&script).map(|()| true)
        }
        Command::Man { out_dir } => man(out_dir).map(|()| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        // The reader of our output went away (`| head`): not a failure.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            diag!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
