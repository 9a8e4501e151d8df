//! The engine consumer that feeds [`Metrics`]: counts every event that
//! passes the user's filters, replaces the verdict gauges after each table
//! refresh, and keeps the health state `/healthz` and `/readyz` report.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Result;

use super::Metrics;
use super::labels::{LabelOptions, Labeler};
use crate::events::Event;
use crate::events::filter::Filter;
use crate::monitor::{Consumer, Ctx, Flow};
use crate::table::MatchesConn;
use crate::table::conn_table::ConnTable;

pub struct MetricsConsumer {
    metrics: Arc<Metrics>,
    labeler: Labeler,
    /// Ports, addresses and owners; event kinds do not apply to metrics.
    filter: Filter,
}

impl MetricsConsumer {
    pub fn new(metrics: Arc<Metrics>, labels: LabelOptions, filter: &Filter) -> Self {
        let mut filter = filter.clone();
        filter.kinds.clear();
        MetricsConsumer {
            metrics,
            labeler: Labeler::new(labels),
            filter,
        }
    }

    fn connections(&self, table: Option<&ConnTable>) {
        if let Some(t) = table {
            let verdicts = t
                .conns()
                .filter(|(c, _)| self.filter.matches_conn(c))
                .map(|(_, v)| v);
            self.metrics.connections(verdicts, t.evictions);
        }
    }
}

impl Consumer for MetricsConsumer {
    fn started(&mut self, ctx: &mut Ctx) -> Result<Flow> {
        self.metrics.process.watch_own_ring();
        self.connections(ctx.table);
        let h = &self.metrics.health;
        h.drained();
        h.attached.store(true, Ordering::Relaxed);
        Ok(Flow::Continue)
    }

    fn event(&mut self, ev: &Event, _ctx: &Ctx) -> Result<Flow> {
        if self.filter.matches(ev) {
            let extra = self.labeler.labels(ev);
            self.metrics.observe(ev, &extra);
        }
        Ok(Flow::Continue)
    }

    fn lost(&mut self, count: u64, _total: u64, _mono_ns: u64, _ctx: &Ctx) -> Result<Flow> {
        self.metrics.lost(count);
        Ok(Flow::Continue)
    }

    fn refreshed(&mut self, ctx: &mut Ctx) -> Result<Flow> {
        self.connections(ctx.table);
        Ok(Flow::Continue)
    }

    fn batch_done(&mut self, _ctx: &mut Ctx) -> Result<Flow> {
        self.metrics.health.drained();
        Ok(Flow::Continue)
    }

    fn stopping(&mut self, _ctx: &mut Ctx) -> Result<()> {
        self.metrics.health.stopping.store(true, Ordering::Relaxed);
        Ok(())
    }
}
