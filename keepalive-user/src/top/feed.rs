//! [`Feed`]: the monitor engine's consumer for `keepalive top`. It runs on
//! the engine's thread and only copies what the screen needs into a
//! bounded channel, never waiting for the UI: when the UI falls behind,
//! updates are dropped and counted (shown in the header), and the engine
//! keeps draining the ring at full speed.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::time::{Duration, Instant};

use anyhow::Result;

use super::model::{Totals, Update};
use crate::events::Event;
use crate::events::filter::Filter;
use crate::monitor::{Consumer, Counters, Ctx, Flow};
use crate::output::Clock;
use crate::table::Conn;
use crate::table::MatchesConn;
use crate::table::conn_table::{ConnTable, VerdictChange};
use crate::table::verdict::Verdict;
use crate::tune::report::Tuned;
use crate::tune::{PolicyNotice, TunedSink};

/// Updates the channel holds before the engine starts dropping them.
pub const CHANNEL_CAP: usize = 1 << 16;
/// How often the totals are sent.
const TOTALS_EVERY: Duration = Duration::from_millis(250);

pub struct Feed {
    tx: SyncSender<Update>,
    filter: Filter,
    /// Connections events touched since the last batch.
    touched: HashSet<u64>,
    /// Set by the UI when the user quits.
    quit: Arc<AtomicBool>,
    /// Updates dropped because the channel was full.
    dropped: Arc<AtomicU64>,
    totals_sent: Instant,
}

fn totals(c: &Counters) -> Totals {
    Totals {
        emitted: c.emitted,
        received: c.received,
        lost: c.lost,
        evicted: c.evicted,
        tracked: c.tracked,
    }
}

/// The table's connections that pass the command-line filter.
fn rows(table: Option<&ConnTable>, filter: &Filter) -> Vec<(Conn, Verdict)> {
    table
        .into_iter()
        .flat_map(|t| t.conns())
        .filter(|(c, _)| filter.matches_conn(c))
        .map(|(c, v)| (c.clone(), v.clone()))
        .collect()
}

impl Feed {
    pub fn new(
        tx: SyncSender<Update>,
        filter: Filter,
        quit: Arc<AtomicBool>,
        dropped: Arc<AtomicU64>,
    ) -> Feed {
        Feed {
            tx,
            filter,
            touched: HashSet::new(),
            quit,
            dropped,
            totals_sent: Instant::now(),
        }
    }

    /// Hands an update over without waiting.
    fn offer(&self, u: Update) {
        if let Err(TrySendError::Full(_)) = self.tx.try_send(u) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// `--policy`: the tuner's records go to the screen like events do.
impl TunedSink for Feed {
    fn tuned(&mut self, t: &Tuned, _clock: &Clock) -> Result<Flow> {
        self.offer(Update::Tuned(Box::new(t.clone())));
        Ok(Flow::Continue)
    }

    fn policy(&mut self, n: &PolicyNotice, _mono_ns: u64, _clock: &Clock) -> Result<Flow> {
        self.offer(Update::Policy(n.clone()));
        Ok(Flow::Continue)
    }
}

impl Consumer for Feed {
    fn started(&mut self, ctx: &mut Ctx) -> Result<Flow> {
        let u = Update::Started {
            rows: rows(ctx.table, &self.filter),
            hooks: ctx.hooks,
            mono_ns: Clock::mono_now_ns(),
        };
        // The UI waits for this one before it takes the screen.
        Ok(match self.tx.send(u) {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Stop,
        })
    }

    fn event(&mut self, ev: &Event, _ctx: &Ctx) -> Result<Flow> {
        if self.filter.matches(ev) {
            self.touched.insert(ev.cookie);
            self.offer(Update::Event(ev.clone()));
        }
        Ok(Flow::Continue)
    }

    fn verdict(&mut self, change: &VerdictChange, mono_ns: u64, _ctx: &Ctx) -> Result<Flow> {
        if self.filter.matches_conn(&change.conn) {
            self.offer(Update::Verdict {
                change: change.clone(),
                mono_ns,
            });
        }
        Ok(Flow::Continue)
    }

    fn lost(&mut self, count: u64, total: u64, mono_ns: u64, _ctx: &Ctx) -> Result<Flow> {
        self.offer(Update::Lost {
            count,
            total,
            mono_ns,
        });
        Ok(Flow::Continue)
    }

    fn refreshed(&mut self, ctx: &mut Ctx) -> Result<Flow> {
        self.touched.clear();
        self.offer(Update::Table {
            rows: rows(ctx.table, &self.filter),
        });
        Ok(Flow::Continue)
    }

    fn batch_done(&mut self, ctx: &mut Ctx) -> Result<Flow> {
        if !self.touched.is_empty()
            && let Some(t) = ctx.table
        {
            // Only live connections: a closed one's last state came with
            // its events.
            let touched: Vec<(Conn, Verdict)> = self
                .touched
                .drain()
                .filter_map(|cookie| Some((t.get(cookie)?, t.verdict(cookie)?)))
                .filter(|(c, _)| self.filter.matches_conn(c))
                .map(|(c, v)| (c.clone(), v.clone()))
                .collect();
            if !touched.is_empty() {
                self.offer(Update::Rows(touched));
            }
        }
        if self.totals_sent.elapsed() >= TOTALS_EVERY {
            self.totals_sent = Instant::now();
            self.offer(Update::Totals(totals(&ctx.counters)));
        }
        Ok(if self.quit.load(Ordering::Relaxed) {
            Flow::Stop
        } else {
            Flow::Continue
        })
    }

    /// The terminal went away.
    fn hangup(&mut self, _ctx: &mut Ctx) -> Result<Flow> {
        Ok(Flow::Stop)
    }

    fn finished(&mut self, t: &Counters, _table: Option<&ConnTable>) -> Result<()> {
        self.offer(Update::Totals(totals(t)));
        self.offer(Update::Stopped);
        Ok(())
    }
}
