//! `keepalive tune --policy FILE`: the monitor engine with a [`Tuner`]
//! around a line sink that writes only `tuned` and `policy` records, until
//! SIGINT/SIGTERM (SIGHUP reloads the policy); with `--metrics`, the
//! Prometheus metrics of `record --metrics`, the `tuned` records counted.

use std::path::PathBuf;

use anyhow::Result;

use super::record::{LineSink, MetricsEndpoint, run_metered};
use crate::events::filter::Filter;
use crate::monitor::MonitorOptions;
use crate::output::Format;
use crate::table::verdict::Thresholds;
use crate::tune::{TuneOptions, Tuner, load_policy};

pub struct TuneCommand {
    pub tune: TuneOptions,
    pub format: Format,
    pub output: Option<PathBuf>,
    /// Serve Prometheus metrics on this address while tuning.
    pub metrics: Option<String>,
}

pub fn run(cmd: TuneCommand) -> Result<()> {
    // Everything wrong with the policy is refused before anything runs.
    let loaded = load_policy(&cmd.tune.policy_path)?;
    let endpoint = MetricsEndpoint::bind(cmd.metrics.as_deref())?;
    let out = super::record::open_output(&cmd.output)?;
    let lines = LineSink::new(out, cmd.format, Filter::default(), None)
        .tuning_only(cmd.tune.dry_run)
        .counting_tuned(endpoint.as_ref().map(|e| e.metrics.clone()));
    let mut tuner = Tuner::new(lines, cmd.tune, loaded);
    let opts = MonitorOptions {
        filter: Filter::default(),
        ring_size: None,
        refresh: None,
        max_conns: 65536,
        thresholds: Thresholds::default(),
        final_walk: false,
    };
    run_metered(opts, &mut tuner, endpoint)?;
    match tuner.inner.take_error() {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}
