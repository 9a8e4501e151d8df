//! The `keepalive` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use keepalive::commands::record::{self, RecordOptions};
use keepalive::commands::snapshot::{self, SnapshotOptions};
use keepalive::config;
use keepalive::diag;
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
        // Its fallback for a failed write is eprintln!, which panics when
        // stderr is gone: a lost diagnostic must not stop the monitor.
        .log_internal_errors(false)
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
        /// Ring buffer size in bytes (a power of two from 4096 to 256 MiB;
        /// default 4 MiB).
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
        #[command(flatten)]
        thresholds: ThresholdArgs,
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
    if let Err(e) = init_logging(&cli.log_level) {
        diag!("error: {e:#}");
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
        } => thresholds.thresholds().and_then(|thresholds| {
            record::run(RecordOptions {
                format,
                output,
                filter: conn_filter.filter(events),
                ring_size,
                refresh: (!refresh.is_zero()).then_some(refresh),
                max_conns,
                thresholds,
                table_dump,
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
