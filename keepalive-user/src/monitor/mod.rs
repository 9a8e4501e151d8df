//! The monitor engine: loads and attaches the eBPF programs, drains the
//! per-CPU event rings, keeps the connection table, refreshes it from the kernel,
//! accounts for every lost event and handles signals. What it learns goes
//! to a [`Consumer`] (`record`'s line sink, `top`, `tune`, `serve`), so
//! every command sees the same stream, judged by the same table.
//!
//! The engine runs on the calling thread in its own current-thread tokio
//! runtime. The rings are read beside it by a thread of its own ([`drain`]),
//! so a walk of the sockets or a descheduled engine does not make the
//! kernel drop events. A consumer that needs to render or serve at its own pace (a
//! TUI, an HTTP endpoint) copies what it needs and does the slow work on
//! another thread: ingestion never waits for it.

mod drain;
mod heap;
mod kernel_maps;
mod merge;
mod owners;

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::signal::unix::{SignalKind, signal};

use crate::events::filter::Filter;
use crate::events::{Event, Kind, ResetReasons, decode};
use crate::kernel::event_rings::{self, RingPlan};
use crate::kernel::{check_privileges, loader, privileges};
use crate::output::Clock;
use crate::table::conn_table::{ConnTable, VerdictChange};
use crate::table::owners::SharedOwners;
use crate::table::verdict::Thresholds;
use crate::table::walk::{self, TableWalk};
use drain::{Chunk, Drain, Msg};
use keepalive_common::RawEvent;
use kernel_maps::KernelMaps;
use owners::ConnectOwners;

/// How often the kernel's drop counters are read.
const LOSS_CHECK: Duration = Duration::from_millis(250);

/// What to run.
#[derive(Clone, Debug)]
pub struct MonitorOptions {
    /// Filters applied in the kernel (ports, CIDRs, kinds); pids are
    /// matched by consumers, since owners are known only in userspace.
    pub filter: Filter,
    /// Bytes of the event rings, all CPUs together ([`event_rings`] splits
    /// them); `None`: the default.
    pub ring_size: Option<u32>,
    /// How often the connection table is re-read from the kernel; `None`
    /// turns the table (and verdict changes) off.
    pub refresh: Option<Duration>,
    /// Most connections tracked at once.
    pub max_conns: usize,
    pub thresholds: Thresholds,
    /// Walk the sockets once more after stopping, so [`Consumer::finished`]
    /// sees the table as it was at the end (table dumps).
    pub final_walk: bool,
}

/// Shortest table refresh: a walk of every socket costs real CPU on a busy
/// host, and the verdicts move in seconds.
pub const MIN_REFRESH: Duration = Duration::from_millis(100);
pub const MAX_REFRESH: Duration = Duration::from_secs(24 * 3600);
/// `--ring-size` values accepted (a power of two in between): the total
/// of the per-CPU rings.
pub const MIN_RING_SIZE: u32 = 4096;
pub const MAX_RING_SIZE: u32 = 256 << 20;
/// Most connections the table (and the kernel's counter map) may hold:
/// about 1 GiB of kernel and user memory together at the top.
pub const MAX_CONNS_LIMIT: usize = 1 << 22;

impl MonitorOptions {
    /// Checks every setting against its range before anything is loaded;
    /// errors name the flag.
    pub fn validate(&self) -> Result<()> {
        if let Some(size) = self.ring_size
            && (!(MIN_RING_SIZE..=MAX_RING_SIZE).contains(&size) || !size.is_power_of_two())
        {
            anyhow::bail!(
                "--ring-size must be a power of two between {MIN_RING_SIZE} and {MAX_RING_SIZE} bytes, got {size}"
            );
        }
        if let Some(every) = self.refresh
            && !(MIN_REFRESH..=MAX_REFRESH).contains(&every)
        {
            anyhow::bail!(
                "--refresh must be 0 (no connection table) or between {} and {}, got {}",
                humantime::format_duration(MIN_REFRESH),
                humantime::format_duration(MAX_REFRESH),
                humantime::format_duration(every)
            );
        }
        if !(1..=MAX_CONNS_LIMIT).contains(&self.max_conns) {
            anyhow::bail!(
                "--max-conns must be between 1 and {MAX_CONNS_LIMIT}, got {}",
                self.max_conns
            );
        }
        Ok(())
    }
}

/// Whether the monitor keeps running after a consumer call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Stop cleanly (the output was closed, the user quit).
    Stop,
}

/// Running totals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Events the kernel emitted (placed in the ring or counted as lost);
    /// read at every loss check and at the end.
    pub emitted: u64,
    /// Events read from the ring.
    pub received: u64,
    /// Of those, records this build could not decode (a kind it does not
    /// know): counted and warned about, never dropped silently.
    pub undecoded: u64,
    /// Events the kernel could not queue.
    pub lost: u64,
    /// Of those, events on a CPU brought online after the start, before
    /// its ring was installed.
    pub lost_no_ring: u64,
    /// Hook runs the kernel skipped (the program re-entered on its CPU),
    /// read when the programs are detached: events that may be missing.
    pub skipped: u64,
    /// Connections dropped from the table at its cap.
    pub evicted: u64,
    /// Connections in the table.
    pub tracked: u64,
}

/// What a consumer can see and use while the monitor runs.
pub struct Ctx<'a> {
    /// The connection table (`None` with refresh off).
    pub table: Option<&'a ConnTable>,
    /// The loaded eBPF object: programs and maps beyond the monitor's own
    /// (tuning) are reached through it. `None` only during the final drain,
    /// after the programs were detached.
    pub ebpf: Option<&'a mut aya::Ebpf>,
    pub clock: &'a Clock,
    pub counters: Counters,
    /// The kernel's tick rate (jiffies per second), from the first walk.
    pub hz: u64,
    pub started: Instant,
    /// Hooks attached.
    pub hooks: usize,
}

/// Receives what the monitor learns. Every method but [`Consumer::event`]
/// has a default that does nothing.
pub trait Consumer {
    /// Once, after the hooks are attached and the table is seeded, before
    /// any event.
    fn started(&mut self, _ctx: &mut Ctx) -> Result<Flow> {
        Ok(Flow::Continue)
    }
    /// Every decoded kernel event, after the table applied it (owner filled
    /// from the table when the kernel had none). Not filtered: consumers
    /// apply their own [`Filter`].
    fn event(&mut self, ev: &Event, ctx: &Ctx) -> Result<Flow>;
    /// A connection's verdict changed (after an event or a refresh).
    fn verdict(&mut self, _change: &VerdictChange, _mono_ns: u64, _ctx: &Ctx) -> Result<Flow> {
        Ok(Flow::Continue)
    }
    /// The kernel could not queue `count` more events (`total` so far).
    fn lost(&mut self, _count: u64, _total: u64, _mono_ns: u64, _ctx: &Ctx) -> Result<Flow> {
        Ok(Flow::Continue)
    }
    /// After each periodic refresh of the table from the kernel.
    fn refreshed(&mut self, _ctx: &mut Ctx) -> Result<Flow> {
        Ok(Flow::Continue)
    }
    /// After each batch drained from the ring (at most every poll
    /// interval): flush, hand over, check flags.
    fn batch_done(&mut self, _ctx: &mut Ctx) -> Result<Flow> {
        Ok(Flow::Continue)
    }
    /// Whether this consumer walks the sockets itself after `started`
    /// (with [`crate::kernel::loader::walk_sockets`]): the capabilities
    /// that needs are then kept after attach.
    fn walks_sockets(&self) -> bool {
        false
    }
    /// Whether programs this consumer attaches read connection owners in
    /// the kernel (tune matches policy rules by process name there): the
    /// hooks then keep each connecting process on its socket, at the cost
    /// of an allocation per outgoing connection.
    fn owners_in_kernel(&self) -> bool {
        false
    }
    /// SIGHUP: reopen files, reload configuration.
    fn hangup(&mut self, _ctx: &mut Ctx) -> Result<Flow> {
        Ok(Flow::Continue)
    }
    /// Stopping (signal or [`Flow::Stop`]); the programs are still
    /// attached, so this is the place to undo changes made through them.
    fn stopping(&mut self, _ctx: &mut Ctx) -> Result<()> {
        Ok(())
    }
    /// After the programs are detached and the ring drained for the last
    /// time, with the final totals and (after the final walk, if asked)
    /// the table.
    fn finished(&mut self, _totals: &Counters, _table: Option<&ConnTable>) -> Result<()> {
        Ok(())
    }
}

/// Several consumers, called in order; the monitor stops when any of them
/// asks to.
#[derive(Default)]
pub struct Fanout<'a>(pub Vec<&'a mut dyn Consumer>);

fn all(
    consumers: &mut [&mut dyn Consumer],
    mut f: impl FnMut(&mut dyn Consumer) -> Result<Flow>,
) -> Result<Flow> {
    let mut flow = Flow::Continue;
    for c in consumers.iter_mut() {
        if f(&mut **c)? == Flow::Stop {
            flow = Flow::Stop;
        }
    }
    Ok(flow)
}

impl Consumer for Fanout<'_> {
    fn started(&mut self, ctx: &mut Ctx) -> Result<Flow> {
        all(&mut self.0, |c| c.started(ctx))
    }
    fn event(&mut self, ev: &Event, ctx: &Ctx) -> Result<Flow> {
        all(&mut self.0, |c| c.event(ev, ctx))
    }
    fn verdict(&mut self, ch: &VerdictChange, mono_ns: u64, ctx: &Ctx) -> Result<Flow> {
        all(&mut self.0, |c| c.verdict(ch, mono_ns, ctx))
    }
    fn lost(&mut self, count: u64, total: u64, mono_ns: u64, ctx: &Ctx) -> Result<Flow> {
        all(&mut self.0, |c| c.lost(count, total, mono_ns, ctx))
    }
    fn refreshed(&mut self, ctx: &mut Ctx) -> Result<Flow> {
        all(&mut self.0, |c| c.refreshed(ctx))
    }
    fn batch_done(&mut self, ctx: &mut Ctx) -> Result<Flow> {
        all(&mut self.0, |c| c.batch_done(ctx))
    }
    fn hangup(&mut self, ctx: &mut Ctx) -> Result<Flow> {
        all(&mut self.0, |c| c.hangup(ctx))
    }
    fn walks_sockets(&self) -> bool {
        self.0.iter().any(|c| c.walks_sockets())
    }
    fn owners_in_kernel(&self) -> bool {
        self.0.iter().any(|c| c.owners_in_kernel())
    }
    fn stopping(&mut self, ctx: &mut Ctx) -> Result<()> {
        // Every consumer gets to clean up, even when one fails.
        let mut first_err = None;
        for c in self.0.iter_mut() {
            if let Err(e) = c.stopping(ctx) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
    fn finished(&mut self, totals: &Counters, table: Option<&ConnTable>) -> Result<()> {
        let mut first_err = None;
        for c in self.0.iter_mut() {
            if let Err(e) = c.finished(totals, table) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// The state of a running monitor, apart from the ring (which the
/// [`Drain`] thread reads).
struct Engine {
    /// `None` once detached.
    ebpf: Option<aya::Ebpf>,
    maps: KernelMaps,
    table: Option<ConnTable>,
    /// Owners of connections by cookie, learned at `connect()`, when there
    /// is no table (which learns and keeps them itself, closed connections
    /// included, as tombstones).
    connect_owners: Option<ConnectOwners>,
    reasons: ResetReasons,
    clock: Clock,
    counters: Counters,
    started: Instant,
    hooks: usize,
    hz: u64,
    thresholds: Thresholds,
}

impl Engine {
    fn ctx(&mut self) -> Ctx<'_> {
        if let Some(t) = &self.table {
            self.counters.tracked = t.len() as u64;
            self.counters.evicted = t.evictions;
        }
        Ctx {
            table: self.table.as_ref(),
            ebpf: self.ebpf.as_mut(),
            clock: &self.clock,
            counters: self.counters,
            hz: self.hz,
            started: self.started,
            hooks: self.hooks,
        }
    }

    /// One record from the ring.
    fn record(&mut self, raw: &RawEvent, consumer: &mut dyn Consumer) -> Result<Flow> {
        self.counters.received += 1;
        let mono_ns = raw.ts_ns;
        let Some(mut ev) = decode(raw, &self.reasons) else {
            if self.counters.undecoded == 0 {
                tracing::warn!(
                    kind = raw.kind,
                    "a kernel record of a kind this build does not know: skipped (counted as undecoded)"
                );
            }
            self.counters.undecoded += 1;
            return Ok(Flow::Continue);
        };
        if let Some(owners) = self.connect_owners.as_mut() {
            owners.fill(&mut ev);
        }
        // The table knows the `connect()` owner (from the `→ SYN_SENT`
        // record), and the holders of connections opened before the
        // monitor started from the walk: applying the event gives it the
        // owner when it has none.
        let change = self.table.as_mut().and_then(|t| t.apply(&mut ev, mono_ns));
        let ctx = self.ctx();
        let mut flow = consumer.event(&ev, &ctx)?;
        if let Some(ch) = change
            && consumer.verdict(&ch, mono_ns, &ctx)? == Flow::Stop
        {
            flow = Flow::Stop;
        }
        Ok(flow)
    }

    /// Handles a chunk's records from `*next` on; on [`Flow::Stop`]
    /// `*next` is the first record not handled (the final drain takes it).
    fn apply(
        &mut self,
        chunk: &Chunk,
        next: &mut usize,
        consumer: &mut dyn Consumer,
    ) -> Result<Flow> {
        if *next == 0 {
            // Records too short to decode count as received, once.
            self.counters.received += chunk.short;
        }
        while let Some(raw) = chunk.events.get(*next) {
            *next += 1;
            if self.record(raw, consumer)? == Flow::Stop {
                return Ok(Flow::Stop);
            }
        }
        Ok(Flow::Continue)
    }

    /// Handles a chunk's records from `next` on, all of them, whatever the
    /// consumer answers (the final drain).
    fn apply_all(
        &mut self,
        chunk: &Chunk,
        mut next: usize,
        consumer: &mut dyn Consumer,
    ) -> Result<()> {
        loop {
            let _ = self.apply(chunk, &mut next, consumer)?;
            if next >= chunk.events.len() {
                return Ok(());
            }
        }
    }

    /// Handles a chunk from the reader; a chunk the consumer stopped in
    /// the middle of is kept in `unfinished` for the final drain, any other
    /// goes back to the reader.
    fn take(
        &mut self,
        chunk: Chunk,
        drain: &Drain,
        unfinished: &mut Option<(Chunk, usize)>,
        consumer: &mut dyn Consumer,
    ) -> Result<Flow> {
        let mut next = 0;
        let flow = self.apply(&chunk, &mut next, consumer)?;
        if next < chunk.events.len() {
            *unfinished = Some((chunk, next));
        } else {
            drain.recycle(chunk);
        }
        Ok(flow)
    }

    /// Handles `first` and the chunks already waiting behind it (up to a
    /// queue's worth), then tells the consumer the batch is done.
    fn batch(
        &mut self,
        first: Chunk,
        drain: &mut Drain,
        unfinished: &mut Option<(Chunk, usize)>,
        consumer: &mut dyn Consumer,
    ) -> Result<Flow> {
        let mut flow = self.take(first, drain, unfinished, consumer)?;
        let mut left = drain.capacity();
        while flow == Flow::Continue && left > 0 {
            left -= 1;
            match drain.try_recv() {
                Some(Msg::Records(chunk)) => {
                    flow = self.take(chunk, drain, unfinished, consumer)?
                }
                // Only a flush asks for one, and the flush waits for it.
                Some(Msg::Flushed) => {}
                None => break,
            }
        }
        let mut ctx = self.ctx();
        if consumer.batch_done(&mut ctx)? == Flow::Stop {
            flow = Flow::Stop;
        }
        Ok(flow)
    }

    /// Applies every record the kernel had queued when called (the reader
    /// reads the ring empty and answers with a marker), then tells the
    /// consumer the batch is done.
    async fn flush(
        &mut self,
        drain: &mut Drain,
        unfinished: &mut Option<(Chunk, usize)>,
        consumer: &mut dyn Consumer,
    ) -> Result<Flow> {
        drain.flush();
        let mut flow = Flow::Continue;
        while flow == Flow::Continue {
            match drain.recv().await {
                Some(Msg::Records(chunk)) => {
                    flow = self.take(chunk, drain, unfinished, consumer)?
                }
                Some(Msg::Flushed) => break,
                None => return Err(reader_stopped(drain)),
            }
        }
        let mut ctx = self.ctx();
        if consumer.batch_done(&mut ctx)? == Flow::Stop {
            flow = Flow::Stop;
        }
        Ok(flow)
    }

    /// Reads the kernel's drop and emit counters; reports new losses.
    fn check_loss(&mut self, consumer: &mut dyn Consumer) -> Result<Flow> {
        self.counters.emitted = self.maps.emitted();
        let (total, no_ring) = self.maps.dropped();
        if total <= self.counters.lost {
            return Ok(Flow::Continue);
        }
        let count = total - self.counters.lost;
        self.counters.lost = total;
        self.counters.lost_no_ring = no_ring;
        tracing::debug!(
            count,
            total,
            no_ring,
            "events lost (ring buffer full, or on a CPU without its ring yet)"
        );
        let ctx = self.ctx();
        consumer.lost(count, total, Clock::mono_now_ns(), &ctx)
    }

    /// Re-reads every socket and the kernel's per-connection counters.
    fn refresh(&mut self, consumer: &mut dyn Consumer) -> Result<Flow> {
        if self.table.is_none() {
            return Ok(Flow::Continue);
        }
        let Some(ebpf) = self.ebpf.as_mut() else {
            return Ok(Flow::Continue);
        };
        let (Some(table), walked_ns) = (self.table.as_mut(), Clock::mono_now_ns()) else {
            return Ok(Flow::Continue);
        };
        let mut walk = TableWalk::new(table, walked_ns);
        loader::for_each_socket(ebpf, |r| walk.add(r))?;
        let owners = walk::owners_if(ebpf, self.thresholds.owners_known);
        let now = Clock::mono_now_ns();
        let changes = Self::judge_walk(walk, owners, now);
        let flow = self.report(changes, now, consumer);
        // The kernel's counters after the changes are reported, so that each
        // shows its connection as the walk found it.
        self.update_stats();
        heap::release();
        if flow? == Flow::Stop {
            return Ok(Flow::Stop);
        }
        let mut ctx = self.ctx();
        consumer.refreshed(&mut ctx)
    }

    /// Hands a refresh's verdict changes to the consumer, each with its
    /// connection as the table holds it.
    fn report(
        &mut self,
        changes: Vec<Change>,
        now: u64,
        consumer: &mut dyn Consumer,
    ) -> Result<Flow> {
        let ctx = self.ctx();
        for ch in changes {
            let ch = match ch {
                Change::Whole(ch) => *ch,
                Change::Kept { cookie, old, new } => {
                    let Some(conn) = ctx.table.and_then(|t| t.get(cookie)) else {
                        continue;
                    };
                    VerdictChange { conn, old, new }
                }
            };
            if consumer.verdict(&ch, now, &ctx)? == Flow::Stop {
                return Ok(Flow::Stop);
            }
        }
        Ok(Flow::Continue)
    }

    /// Replaces the table's view with a walk of the sockets; returns the
    /// verdict changes, without copies of connections the table holds (a
    /// refresh can change every verdict at once, when many connections
    /// cross the idle threshold together).
    fn judge_walk(walk: TableWalk, owners: SharedOwners, now: u64) -> Vec<Change> {
        let mut changes = Vec::new();
        walk.finish(owners, now, |ch, kept| {
            changes.push(if kept {
                Change::Kept {
                    cookie: ch.conn.id.cookie,
                    old: ch.old,
                    new: ch.new,
                }
            } else {
                Change::Whole(Box::new(ch))
            })
        });
        changes
    }

    /// The kernel's per-connection counters, into the table.
    fn update_stats(&mut self) {
        if let Some(table) = self.table.as_mut() {
            for (cookie, s) in self.maps.conn_stats() {
                table.set_stats(cookie, s);
            }
        }
    }
}

/// A verdict change found by a refresh, kept until it is reported.
enum Change {
    /// The table holds the connection as the change shows it.
    Kept {
        cookie: u64,
        old: crate::table::verdict::Verdict,
        new: crate::table::verdict::Verdict,
    },
    /// A connection beyond the table's cap (rare: boxed, so the others
    /// stay small).
    Whole(Box<VerdictChange>),
}

/// The reader thread ended while the monitor runs: its error.
fn reader_stopped(drain: &mut Drain) -> anyhow::Error {
    match drain.join() {
        Err(e) => e.context("reading the ring buffer"),
        Ok(()) => anyhow::anyhow!("the ring buffer reader stopped early"),
    }
}

/// Loads, attaches, seeds the table and runs until SIGINT/SIGTERM or a
/// consumer's [`Flow::Stop`]; then detaches, drains what is left, and
/// returns the totals. Blocks the calling thread.
pub fn run(opts: MonitorOptions, consumer: &mut dyn Consumer) -> Result<Counters> {
    opts.validate()?;
    heap::configure();
    check_privileges()?;
    loader::ensure_object()?;
    // Verdicts are judged from every kind of kernel event.
    let mut kernel_filter = opts.filter.clone();
    if opts.filter.kinds.contains(&Kind::Verdict) {
        kernel_filter.kinds.clear();
    }
    let mut info = loader::kernel_info(&kernel_filter, loader::Use::Monitor)?;
    info.config.owner_storage = consumer.owners_in_kernel() as u32;
    // The kernel's BTF, held until the consumers have attached what they
    // attach; then it is freed (it is most of an idle monitor's memory).
    let btf = loader::aya_btf()?;
    let plan = RingPlan::for_host(opts.ring_size.unwrap_or(loader::DEFAULT_RING_BYTES))?;
    let mut ebpf = loader::load(
        &info.config,
        loader::Sizes {
            ring_each: Some(plan.bytes_each),
            // The kernel keeps counters for as many connections as the table.
            stats: Some(u32::try_from(opts.max_conns).unwrap_or(u32::MAX)),
        },
    )?;
    // Before any hook runs, so no event finds its CPU without a ring.
    let rings = event_rings::create(&mut ebpf, &plan)?;
    let mut table = opts
        .refresh
        .map(|_| ConnTable::new(opts.max_conns, opts.thresholds));
    // The first row tells the kernel's tick rate.
    let mut first = None;
    let hooks = match table.as_mut() {
        Some(t) => {
            let mut walk = TableWalk::new(t, Clock::mono_now_ns());
            let hooks = loader::attach_all(&mut ebpf, |r| {
                first.get_or_insert(*r);
                walk.add(r)
            })?;
            let owners = walk::owners_if(&mut ebpf, opts.thresholds.owners_known);
            // What the table holds at the start is no change.
            walk.finish(owners, Clock::mono_now_ns(), |_, _| {});
            hooks
        }
        None => loader::attach_all(&mut ebpf, |r| {
            first.get_or_insert(*r);
        })?,
    };
    let maps = KernelMaps::take(&mut ebpf)?;
    let engine = Engine {
        ebpf: Some(ebpf),
        maps,
        connect_owners: table.is_none().then(|| ConnectOwners::new(opts.max_conns)),
        table,
        reasons: info.reset_reasons,
        clock: Clock::now(),
        counters: Counters::default(),
        started: Instant::now(),
        hooks,
        hz: walk::hz_of(first.as_slice()),
        thresholds: opts.thresholds,
    };
    heap::release();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the event loop")?;
    rt.block_on(event_loop(engine, rings, plan, opts, consumer, btf))
}

async fn event_loop(
    mut engine: Engine,
    (rings, adder): (
        Vec<aya::maps::RingBuf<aya::maps::MapData>>,
        event_rings::RingAdder,
    ),
    plan: RingPlan,
    opts: MonitorOptions,
    consumer: &mut dyn Consumer,
    btf: std::sync::Arc<aya::Btf>,
) -> Result<Counters> {
    let mut sigint = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing a SIGHUP handler")?;
    // Consumers hear from the engine at least every poll interval (flush,
    // hand over, check flags), and the kernel's loss counters are read
    // every LOSS_CHECK.
    let mut tick = tokio::time::interval(loader::POLL_INTERVAL);
    let mut loss_checked = Instant::now();
    let mut refresh = tokio::time::interval(opts.refresh.unwrap_or(Duration::from_secs(3600)));
    refresh.tick().await;

    let mut flow = {
        let mut ctx = engine.ctx();
        consumer.started(&mut ctx)?
    };
    drop(btf);
    // Everything that needed full privileges is done (the consumers
    // attached their own programs in `started`): keep only what the walks
    // need, if anything walks (kernel::privileges says what and why).
    let walks = engine.table.is_some() || opts.final_walk || consumer.walks_sockets();
    let kept = privileges::drop_all_but(privileges::steady_state(walks))?;
    tracing::debug!(kept = ?privileges::names(kept), "capabilities dropped after attach");
    // Started after the drop, so the reader has no more capabilities than
    // the engine (they are per thread). Records wait in the kernel's rings
    // until then, as they did before the reader existed. The queue holds
    // about as many bytes as the rings (drain::queue_chunks).
    let mut drain = Drain::start(
        rings,
        adder,
        plan.bytes_each,
        drain::queue_chunks(plan.total()),
        loader::POLL_INTERVAL,
    )?;
    // A chunk the consumer stopped in the middle of, and where.
    let mut unfinished = None;
    while flow == Flow::Continue {
        flow = tokio::select! {
            msg = drain.recv() => match msg {
                Some(Msg::Records(chunk)) => engine.batch(chunk, &mut drain, &mut unfinished, consumer)?,
                Some(Msg::Flushed) => Flow::Continue,
                None => return Err(reader_stopped(&mut drain)),
            },
            _ = tick.tick() => {
                let mut flow = {
                    let mut ctx = engine.ctx();
                    consumer.batch_done(&mut ctx)?
                };
                if flow == Flow::Continue && loss_checked.elapsed() >= LOSS_CHECK {
                    loss_checked = Instant::now();
                    flow = engine.check_loss(consumer)?;
                }
                flow
            }
            _ = refresh.tick() => {
                // Events queued so far happened before this walk: the
                // table takes them first, so a verdict tells the numbers
                // of the moment it changed, not those of a later walk.
                match engine.flush(&mut drain, &mut unfinished, consumer).await? {
                    Flow::Continue => engine.refresh(consumer)?,
                    stop => stop,
                }
            }
            _ = sighup.recv() => {
                let mut ctx = engine.ctx();
                consumer.hangup(&mut ctx)?
            }
            _ = sigint.recv() => Flow::Stop,
            _ = sigterm.recv() => Flow::Stop,
        };
    }

    // Undo first (programs still attached), then take the last look at the
    // sockets if asked, then detach so the counters stop moving, drain what
    // is already in the ring and account for drops: emitted == received + lost.
    let stopping = {
        let mut ctx = engine.ctx();
        consumer.stopping(&mut ctx)
    };
    let final_walk = match engine.ebpf.as_mut() {
        Some(ebpf) if engine.table.is_some() && opts.final_walk => {
            // Owners too, while the owner walk can still run.
            let owners_known = engine.thresholds.owners_known;
            Some(loader::walk_sockets(ebpf).map(|rows| (rows, walk::owners_if(ebpf, owners_known))))
        }
        _ => None,
    };
    // Detach: the programs and links go with the object; the maps we took
    // stay readable.
    if let Some(ebpf) = engine.ebpf.take() {
        engine.counters.skipped = loader::skipped_runs(&ebpf);
        drop(ebpf);
    }
    if engine.counters.skipped > 0 {
        tracing::warn!(
            skipped = engine.counters.skipped,
            "the kernel skipped hook runs (a program re-entered on its CPU): events may be missing"
        );
    }
    // Every record left is handled, whatever the consumer answers, so that
    // emitted == received + lost holds.
    if let Some((chunk, next)) = unfinished.take() {
        engine.apply_all(&chunk, next, consumer)?;
    }
    drain.finish();
    while let Some(msg) = drain.recv().await {
        if let Msg::Records(chunk) = msg {
            engine.apply_all(&chunk, 0, consumer)?;
        }
    }
    drain.join().context("reading the ring buffer")?;
    {
        let mut ctx = engine.ctx();
        let _ = consumer.batch_done(&mut ctx)?;
    }
    let _ = engine.check_loss(consumer)?;
    engine.counters.emitted = engine.maps.emitted();
    if let (Some(Ok((records, owners))), Some(table)) = (final_walk, engine.table.as_mut()) {
        // After the last events, as they are older than the walk. Nobody
        // reads verdict changes after the stream ended.
        let now = Clock::mono_now_ns();
        let mut walk = TableWalk::new(table, now);
        records.iter().for_each(|r| walk.add(r));
        walk.finish(owners, now, |_, _| {});
        engine.update_stats();
    }
    let _ = engine.ctx();
    let totals = engine.counters;
    let finished = consumer.finished(&totals, engine.table.as_ref());
    stopping?;
    finished?;
    Ok(totals)
}
