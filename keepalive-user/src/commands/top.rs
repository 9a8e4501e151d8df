//! `keepalive top`: the monitor engine on its own thread with a
//! [`Feed`] consumer, the screen on this one, joined by a bounded channel
//! so drawing never holds up draining the kernel's ring buffer.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{RecvTimeoutError, sync_channel};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

use crate::events::filter::Filter;
use crate::monitor::{self, MonitorOptions};
use crate::output::Clock;
use crate::table::verdict::Thresholds;
use crate::top::feed::{self, Feed};
use crate::top::model::{Host, Model, Update};
use crate::top::term;
use crate::tune::{TuneOptions, Tuner, load_policy};

pub struct TopOptions {
    pub filter: Filter,
    /// How often the table is re-read from the kernel.
    pub refresh: Duration,
    /// How often the screen is redrawn.
    pub interval: Duration,
    pub max_conns: usize,
    pub thresholds: Thresholds,
    /// Tune connections with this policy while showing them (`--policy`).
    pub tune: Option<TuneOptions>,
}

fn join(engine: JoinHandle<Result<()>>) -> Result<()> {
    engine
        .join()
        .map_err(|_| anyhow!("the monitor thread panicked"))?
}

pub fn run(opts: TopOptions) -> Result<()> {
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        bail!(
            "top needs a terminal (stdin and stdout are not both a TTY): use `keepalive record` for a stream of events or `keepalive snapshot` for a table"
        );
    }
    if opts.interval < Duration::from_millis(50) {
        bail!("--interval must be at least 50ms");
    }
    if opts.refresh < Duration::from_millis(100) {
        bail!("--refresh must be at least 100ms");
    }
    // Everything wrong with the policy is refused before anything runs.
    let policy = match &opts.tune {
        Some(t) => Some(load_policy(&t.policy_path)?),
        None => None,
    };
    let (tx, rx) = sync_channel(feed::CHANNEL_CAP);
    let quit = Arc::new(AtomicBool::new(false));
    let dropped = Arc::new(AtomicU64::new(0));
    let mut feed = Feed::new(tx, opts.filter.clone(), quit.clone(), dropped.clone());
    let monitor_opts = MonitorOptions {
        filter: opts.filter,
        ring_size: None,
        refresh: Some(opts.refresh),
        max_conns: opts.max_conns,
        thresholds: opts.thresholds,
        final_walk: false,
    };
    let tune = opts.tune.zip(policy);
    let engine = std::thread::Builder::new()
        .name("monitor".into())
        .spawn(move || match tune {
            // The tuner wraps the feed: its records reach the screen
            // through it, and the feed sees every event as before.
            Some((t, loaded)) => {
                monitor::run(monitor_opts, &mut Tuner::new(feed, t, loaded)).map(|_| ())
            }
            None => monitor::run(monitor_opts, &mut feed).map(|_| ()),
        })
        .context("starting the monitor thread")?;
    // The screen is taken only once the monitor runs, so a startup error
    // (not root, no BTF) is a plain line on a normal terminal.
    // The tuner reports the policy and the connections it tuned at start
    // before the monitor says it started: kept for the model.
    let mut early = Vec::new();
    let first = loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(u @ Update::Started { .. }) => break u,
            Ok(u @ (Update::Tuned(_) | Update::Policy(_))) => early.push(u),
            Ok(_) => {}
            Err(RecvTimeoutError::Timeout) if !engine.is_finished() => {}
            Err(_) => {
                join(engine)?;
                bail!("the monitor stopped before it started");
            }
        }
    };
    let mut model = Model::new(Host::read(), Clock::now(), opts.refresh.as_millis() as u64);
    model.apply(first);
    for u in early {
        model.apply(u);
    }
    let shown = term::run_ui(&rx, &mut model, opts.interval, &dropped, &engine);
    // The screen is back; now detach (the engine notices within a poll).
    quit.store(true, Ordering::Relaxed);
    drop(rx);
    let stopped = join(engine);
    shown.and(stopped)
}
