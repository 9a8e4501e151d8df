//! `keepalive tune --policy FILE`: the monitor engine with a [`Tuner`]
//! around a line sink that writes only `tuned` and `policy` records, until
//! SIGINT/SIGTERM (SIGHUP reloads the policy).

use std::path::PathBuf;

use anyhow::Result;

use super::record::LineSink;
use crate::events::filter::Filter;
use crate::monitor::{self, MonitorOptions};
use crate::output::Format;
use crate::table::verdict::Thresholds;
use crate::tune::{TuneOptions, Tuner, load_policy};

pub struct TuneCommand {
    pub tune: TuneOptions,
    pub format: Format,
    pub output: Option<PathBuf>,
}

pub fn run(cmd: TuneCommand) -> Result<()> {
    // Everything wrong with the policy is refused before anything runs.
    let loaded = load_policy(&cmd.tune.policy_path)?;
    let out = super::record::open_output(&cmd.output)?;
    let lines =
        LineSink::new(out, cmd.format, Filter::default(), None).tuning_only(cmd.tune.dry_run);
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
    match tuner.inner.take_error() {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}
