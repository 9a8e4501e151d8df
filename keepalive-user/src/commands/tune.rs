//! `keepalive tune --policy FILE`: the monitor engine with a [`Tuner`]
//! around a line sink that writes only `tuned` and `policy` records, until
//! SIGINT/SIGTERM (SIGHUP reloads the policy).

use std::io::{self, ErrorKind, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::events::Event;
use crate::events::filter::Filter;
use crate::monitor::{self, Consumer, Counters, Ctx, Flow, MonitorOptions};
use crate::output::json::write_line;
use crate::output::{Clock, Format};
use crate::table::conn_table::ConnTable;
use crate::table::verdict::Thresholds;
use crate::tune::report::{Tuned, TunedOut, tuned_text};
use crate::tune::{
    PolicyNotice, PolicyOut, TuneOptions, TunedSink, Tuner, load_policy, policy_text,
};

pub struct TuneCommand {
    pub tune: TuneOptions,
    pub format: Format,
    pub output: Option<PathBuf>,
}

/// Writes `tuned` and `policy` records as lines, flushed after every batch.
pub struct TunedLines {
    out: Box<dyn Write>,
    format: Format,
    closed: bool,
    dry_run: bool,
}

impl TunedLines {
    fn write(&mut self, r: io::Result<()>) -> Result<Flow> {
        match r {
            Ok(()) => Ok(Flow::Continue),
            Err(e) if e.kind() == ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(Flow::Stop)
            }
            Err(e) => Err(e).context("writing tuned records"),
        }
    }
}

impl TunedSink for TunedLines {
    fn tuned(&mut self, t: &Tuned, clock: &Clock) -> Result<Flow> {
        if self.closed {
            return Ok(Flow::Stop);
        }
        let r = match self.format {
            Format::Json => write_line(&mut self.out, &TunedOut::new(t, clock)),
            Format::Text => writeln!(self.out, "{}", tuned_text(t, clock)),
        };
        self.write(r)
    }

    fn policy(&mut self, n: &PolicyNotice, mono_ns: u64, clock: &Clock) -> Result<Flow> {
        if self.closed {
            return Ok(Flow::Stop);
        }
        let r = match self.format {
            Format::Json => write_line(&mut self.out, &PolicyOut::new(n, mono_ns, clock)),
            Format::Text => writeln!(self.out, "{}", policy_text(n, mono_ns, clock)),
        };
        self.write(r)
    }
}

impl Consumer for TunedLines {
    fn started(&mut self, ctx: &mut Ctx) -> Result<Flow> {
        eprintln!(
            "keepalive: tuning{}; {} hooks attached (pid {})",
            if self.dry_run {
                " (dry run: nothing is changed)"
            } else {
                ""
            },
            ctx.hooks,
            std::process::id()
        );
        Ok(Flow::Continue)
    }

    fn event(&mut self, _ev: &Event, _ctx: &Ctx) -> Result<Flow> {
        Ok(Flow::Continue)
    }

    fn batch_done(&mut self, _ctx: &mut Ctx) -> Result<Flow> {
        if self.closed {
            return Ok(Flow::Stop);
        }
        let r = self.out.flush();
        self.write(r)
    }

    fn finished(&mut self, _totals: &Counters, _table: Option<&ConnTable>) -> Result<()> {
        if !self.closed {
            let r = self.out.flush();
            self.write(r)?;
        }
        Ok(())
    }
}

pub fn run(cmd: TuneCommand) -> Result<()> {
    // Everything wrong with the policy is refused before anything runs.
    let loaded = load_policy(&cmd.tune.policy_path)?;
    let out = super::record::open_output(&cmd.output)?;
    let lines = TunedLines {
        out,
        format: cmd.format,
        closed: false,
        dry_run: cmd.tune.dry_run,
    };
    let mut tuner = Tuner::new(lines, cmd.tune, loaded);
    let opts = MonitorOptions {
        filter: Filter::default(),
        ring_size: None,
        refresh: None,
        max_conns: 65536,
        thresholds: Thresholds::default(),
        final_walk: false,
    };
    monitor::run(opts, &mut tuner)?;
    Ok(())
}
