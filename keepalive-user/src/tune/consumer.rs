//! How the [`Tuner`] rides the monitor engine: attach its programs when
//! the monitor starts, react to events and refreshes, restore on stop.

use super::*;

impl<C: Consumer + TunedSink> Consumer for Tuner<C> {
    fn started(&mut self, ctx: &mut Ctx) -> Result<Flow> {
        let ebpf = ctx
            .ebpf
            .as_deref_mut()
            .ok_or_else(|| anyhow!("tune: the eBPF object is not loaded"))?;
        let mut config = self.config();
        config.hz = ctx.hz as u32;
        let mut k = TuneKernel::attach(ebpf, &self.loaded.rules, config)
            .context("attaching the tuning programs")?;
        k.set_active(true)?;
        self.kernel = Some(k);
        let mut flow = self.notice("loaded", None, ctx.clock)?;
        if self.apply_walk(ebpf, ctx.clock)? == Flow::Stop {
            flow = Flow::Stop;
        }
        if self.inner.started(ctx)? == Flow::Stop {
            flow = Flow::Stop;
        }
        Ok(flow)
    }

    fn event(&mut self, ev: &Event, ctx: &Ctx) -> Result<Flow> {
        use crate::events::Detail;
        let mut evidence = None;
        if let Some(w) = self.watched.get_mut(&ev.cookie) {
            let w = &mut w.watch;
            evidence = match ev.detail {
                Detail::KeepaliveProbe { probe } => w.probe(probe, ev.ts_mono_ns),
                Detail::Timeout { cause, .. } => w.timed_out(cause),
                Detail::Retransmit { syn: false, .. }
                    if ev.state == keepalive_common::tcp_state::ESTABLISHED =>
                {
                    w.retransmit(ev.ts_mono_ns);
                    None
                }
                Detail::StateChange { new, .. } if new == keepalive_common::tcp_state::CLOSE => {
                    w.closed_ns = Some(ev.ts_mono_ns);
                    None
                }
                _ => None,
            };
        }
        if let Detail::StateChange { new, .. } = ev.detail
            && new == keepalive_common::tcp_state::CLOSE
        {
            self.rule_of.remove(&ev.cookie);
            self.idents.remove(&ev.cookie);
        }
        let mut flow = match evidence {
            Some(e) => self.learn(ev.cookie, e, ctx)?,
            None => Flow::Continue,
        };
        if self.inner.event(ev, ctx)? == Flow::Stop {
            flow = Flow::Stop;
        }
        Ok(flow)
    }

    fn verdict(&mut self, ch: &VerdictChange, mono_ns: u64, ctx: &Ctx) -> Result<Flow> {
        self.inner.verdict(ch, mono_ns, ctx)
    }

    fn lost(&mut self, count: u64, total: u64, mono_ns: u64, ctx: &Ctx) -> Result<Flow> {
        self.inner.lost(count, total, mono_ns, ctx)
    }

    fn refreshed(&mut self, ctx: &mut Ctx) -> Result<Flow> {
        self.inner.refreshed(ctx)
    }

    fn batch_done(&mut self, ctx: &mut Ctx) -> Result<Flow> {
        let reports = k_drain(&mut self.kernel);
        let mut flow = self.handle(&reports, ctx.clock)?;
        if !self.watched.is_empty() {
            if self.answered_probes(ctx)? == Flow::Stop {
                flow = Flow::Stop;
            }
            if self.look_at_retransmitting(ctx)? == Flow::Stop {
                flow = Flow::Stop;
            }
        }
        if self.rewalk_at.is_some_and(|t| Instant::now() >= t)
            && let Some(ebpf) = ctx.ebpf.as_deref_mut()
            && self.apply_walk(ebpf, ctx.clock)? == Flow::Stop
        {
            flow = Flow::Stop;
        }
        if self.inner.batch_done(ctx)? == Flow::Stop {
            flow = Flow::Stop;
        }
        Ok(flow)
    }

    /// Reloads the policy: a bad file keeps the running one and says why;
    /// a good one takes the old values back, then applies the new rules.
    /// Applying and restoring settings walks the sockets (also at stop).
    fn walks_sockets(&self) -> bool {
        true
    }

    /// Policy rules match the process name in the kernel (sock_ops and
    /// the tuning walk read the owner stored on the socket).
    fn owners_in_kernel(&self) -> bool {
        true
    }

    fn hangup(&mut self, ctx: &mut Ctx) -> Result<Flow> {
        let mut flow = self.inner.hangup(ctx)?;
        let Some(ebpf) = ctx.ebpf.as_deref_mut() else {
            return Ok(flow);
        };
        match load_policy(&self.opts.policy_path) {
            Err(e) => {
                let msg = format!("{e:#}");
                crate::diag!("policy reload refused, keeping the running policy: {msg}");
                if self.notice("reload_refused", Some(msg), ctx.clock)? == Flow::Stop {
                    flow = Flow::Stop;
                }
            }
            Ok(new) => {
                if self.restore(ebpf, ctx.clock)? == Flow::Stop {
                    flow = Flow::Stop;
                }
                self.loaded = new;
                self.generation += 1;
                let cfg = self.config();
                if let Some(k) = self.kernel.as_mut() {
                    k.config = TuneConfig {
                        hz: k.config.hz,
                        ..cfg
                    };
                    k.set_rules(&self.loaded.rules)?;
                    k.set_active(true)?;
                }
                if self.notice("reloaded", None, ctx.clock)? == Flow::Stop {
                    flow = Flow::Stop;
                }
                if self.apply_walk(ebpf, ctx.clock)? == Flow::Stop {
                    flow = Flow::Stop;
                }
            }
        }
        Ok(flow)
    }

    fn stopping(&mut self, ctx: &mut Ctx) -> Result<()> {
        let restored = match ctx.ebpf.as_deref_mut() {
            Some(ebpf) => self.restore(ebpf, ctx.clock).map(|_| ()),
            None => Ok(()),
        };
        let inner = self.inner.stopping(ctx);
        restored.and(inner)
    }

    fn finished(&mut self, totals: &Counters, table: Option<&ConnTable>) -> Result<()> {
        let c = self.counts;
        if self.summary_line {
            crate::diag!(
                "tune ended; tuned={} dry_run={} app_kept={} app_override={} enforced={} restored={} failed={} rate_limited={} adapted={}",
                c.tuned,
                c.dry_run,
                c.app_kept,
                c.app_override,
                c.enforced,
                c.restored,
                c.failed,
                c.rate_limited,
                c.adapted
            );
        }
        self.inner.finished(totals, table)
    }
}
