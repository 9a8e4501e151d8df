//! The `keepalive` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use keepalive::commands::record::{self, RecordOptions};
use keepalive::commands::snapshot::{self, SnapshotOptions};
use keepalive::config;
use keepalive::events::Kind;
use keepalive::events::filter::{Filter, parse_cidr};
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
    #[arg(long, global = true, value_name = "LEVEL", default_value = "warn")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

/// Sends `tracing` diagnostics to stderr, filtered by `--log-level` (or
/// RUST_LOG when set). Data never goes there: it has its own outputs.
fn init_logging(level: &str) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.is_empty() => EnvFilter::try_new(env),
        _ => EnvFilter::try_new(level),
    }
    .map_err(|e| anyhow::anyhow!("invalid --log-level `{level}`: {e}"))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init()
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
        /// Ring buffer size in bytes (power of two, >= 4096; default 4 MiB).
        #[arg(long, value_name = "BYTES")]
        ring_size: Option<u32>,
        /// Re-read every connection from the kernel this often to keep the
        /// connection table and its verdicts current; 0 turns the table and
        /// `verdict` events off.
        #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
        refresh: u64,
        /// Most connections tracked at once; beyond it the least recently
        /// active is evicted (and counted).
        #[arg(long, value_name = "N", default_value = "262144")]
        max_conns: usize,
        /// At exit, write the connection table here (JSON lines, as `snapshot`).
        #[arg(long, value_name = "FILE")]
        table_dump: Option<PathBuf>,
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
        #[command(flatten)]
        tune: TuneArgs,
    },
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
    fn thresholds(&self) -> anyhow::Result<Thresholds> {
        let file = self
            .config
            .as_deref()
            .map(config::Loaded::load)
            .transpose()?;
        let flags = config::ThresholdFlags {
            idle_ms: self.idle_threshold,
            middlebox_idle_ms: self.middlebox_timeout,
            close_wait_ms: self.close_wait_threshold,
            dead_retransmits: self.dead_retransmits,
            no_owners: self.no_owners,
        };
        config::thresholds(&flags, file.as_ref())
    }
}

fn parse_duration(s: &str) -> Result<u64, String> {
    config::parse_duration(s)
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
        None => clap_mangen::Man::new(cmd)
            .render(&mut std::io::stdout())
            .map_err(|e| anyhow::anyhow!("writing the man page: {e}")),
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
    eprintln!("keepalive: {line}");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    // A bug must still end in one line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("keepalive: internal error: {info}; please report this");
    }));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    if let Err(e) = init_logging(&cli.log_level) {
        eprintln!("keepalive: error: {e:#}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Record {
            format,
            output,
            conn_filter,
            events,
            ring_size,
            refresh,
            max_conns,
            table_dump,
            thresholds,
            policy,
            tune,
        } => thresholds.thresholds().and_then(|thresholds| {
            record::run(RecordOptions {
                format,
                output,
                filter: conn_filter.filter(events),
                ring_size,
                refresh: (refresh > 0).then(|| std::time::Duration::from_millis(refresh)),
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
        Command::Tune {
            policy,
            format,
            output,
            tune,
        } => keepalive::commands::tune::run(keepalive::commands::tune::TuneCommand {
            tune: tune.options(policy),
            format,
            output,
        })
        .map(|()| true),
        Command::Check => keepalive::commands::check::run(),
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "keepalive", &mut std::io::stdout());
            Ok(true)
        }
        Command::Man { out_dir } => man(out_dir).map(|()| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        // The reader of our output went away (`| head`): not a failure.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keepalive: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
