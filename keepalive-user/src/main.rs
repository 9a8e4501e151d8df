//! The `keepalive` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keepalive::events::Kind;
use keepalive::events::filter::{Filter, parse_cidr, parse_kind};
use keepalive::record::{self, Format, RecordOptions};

#[derive(Parser)]
#[command(
    name = "keepalive",
    version,
    about = "Watch every TCP connection from the kernel: keepalive probes, retransmits, resets, timeouts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Stream TCP events as they happen (one line per event).
    Record {
        /// Output format.
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
        /// Write to FILE instead of stdout (flushed per line).
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Only connections with this local or remote port (repeatable).
        #[arg(long, value_name = "PORT")]
        port: Vec<u16>,
        /// Only connections with an address in CIDR (repeatable).
        #[arg(long, value_name = "CIDR", value_parser = parse_cidr)]
        addr: Vec<ipnet::IpNet>,
        /// Only connections owned by PID (learned at connect; repeatable).
        #[arg(long, value_name = "PID")]
        pid: Vec<u32>,
        /// Only these event kinds (repeatable): retransmit, reset_sent,
        /// reset_received, state_change, keepalive_probe, timeout.
        #[arg(long = "event", value_name = "KIND", value_parser = parse_kind)]
        events: Vec<Kind>,
        /// Ring buffer size in bytes (power of two, >= 4096; default 4 MiB).
        #[arg(long, value_name = "BYTES")]
        ring_size: Option<u32>,
    },
    /// Diagnose whether this host can run the monitor, hook by hook.
    Check,
}

fn main() -> ExitCode {
    // A bug must still end in one line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("keepalive: internal error: {info}; please report this");
    }));
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Record {
            format,
            output,
            port,
            addr,
            pid,
            events,
            ring_size,
        } => record::run(RecordOptions {
            format,
            output,
            filter: Filter {
                ports: port,
                cidrs: addr,
                pids: pid,
                kinds: events.into_iter().collect(),
            },
            ring_size,
        })
        .map(|()| true),
        Command::Check => keepalive::check::run(),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("keepalive: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
