//! The event rings' reader: a thread of its own that copies the kernel's
//! event records out of the per-CPU rings, merges them back into time
//! order ([`super::merge`]) and hands them to the engine in chunks, so the
//! rings keep draining while the engine walks the sockets, judges, writes
//! or waits for a CPU.
//!
//! The kernel drops an event only when its CPU's ring is full. Copying a
//! record out costs a fraction of handling it, so with a reader of its own
//! the rings stay near empty and the backlog waits in this process
//! instead. That backlog is bounded: at most [`queue_chunks`] chunks of
//! [`CHUNK`] records (about as many bytes as the kernel's rings, at least
//! two chunks) wait for the engine, and a pass reads at most a ring's
//! worth from each ring. When the chunks are all taken the thread stops
//! reading, the rings fill, and the kernel counts what it cannot queue:
//! no loss is silent, memory stays bounded. Chunks are handed back after
//! use, so the reader allocates only until it has as many as the queue
//! holds.
//!
//! Records reach the engine in `ts_ns` order, each held until every ring
//! was read [`MARGIN_NS`] past it: a record waits at most a poll interval
//! and the margin, where one ring made it wait at most the interval.
//!
//! A walk of the sockets must see the table after every event queued
//! before it: [`Drain::flush`] asks the thread to read every ring empty
//! and answer with a marker after the last record stamped before the
//! flush, and the engine applies everything up to the marker before it
//! walks. [`Drain::finish`] releases everything.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use aya::maps::{MapData, RingBuf};
use keepalive_common::{EventHead, RawEvent};
use rustix::event::{EventfdFlags, PollFd, PollFlags, Timespec, eventfd, poll};
use tokio::sync::mpsc;

use super::kernel_maps;
use super::merge::{MARGIN_NS, Merge};
use crate::kernel::event_rings::{ONLINE_CHECK, RingAdder};
use crate::output::Clock;

/// Records per chunk (96 KiB of events): the thread sends a chunk when it
/// is full or when a pass has released all it can.
pub(super) const CHUNK: usize = 1024;

/// Chunks that may wait for the engine: as many bytes as the kernel's rings
/// of `ring_bytes` together, and at least two (one filling while one
/// waits).
pub(super) fn queue_chunks(ring_bytes: usize) -> usize {
    (ring_bytes / (CHUNK * size_of::<RawEvent>())).max(2)
}

/// Records copied out of the rings, in the kernel's time order.
pub(super) struct Chunk {
    pub events: Vec<RawEvent>,
    /// Records too short to be a [`RawEvent`] (received, not decodable).
    pub short: u64,
}

/// What the thread sends the engine.
pub(super) enum Msg {
    Records(Chunk),
    /// Every record the rings held when the flush was asked came before.
    Flushed,
}

/// Requests from the engine, read by the thread after each wakeup.
struct Requests {
    /// Flushes asked so far; the thread answers each with [`Msg::Flushed`].
    flushes: AtomicU64,
    /// The programs are detached: read the rings empty once more, release
    /// everything held and stop.
    finish: AtomicBool,
    /// Wakes the thread out of its poll.
    wake: OwnedFd,
}

impl Requests {
    fn wake(&self) {
        // A full eventfd counter (2^64 - 2 wakeups unread) is still a
        // pending wakeup: nothing to handle.
        let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
    }
}

/// The reading thread and the engine's end of its queue.
pub(super) struct Drain {
    queue: mpsc::Receiver<Msg>,
    spare: std::sync::mpsc::Sender<Vec<RawEvent>>,
    requests: Arc<Requests>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Drain {
    /// Starts reading `rings` (one per CPU that has one, `ring_bytes_each`
    /// bytes each), waking up when the kernel says so and at least every
    /// `poll_every` (the kernel wakes readers only once a ring's wakeup
    /// threshold of bytes is queued); `adder` gives CPUs brought online
    /// later their rings, which it reads from then on.
    pub(super) fn start(
        rings: Vec<RingBuf<MapData>>,
        adder: RingAdder,
        ring_bytes_each: u32,
        chunks: usize,
        poll_every: Duration,
    ) -> Result<Drain> {
        let (tx, queue) = mpsc::channel(chunks.max(2));
        let (spare, spares) = std::sync::mpsc::channel();
        let wake = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
            .context("creating the ring reader's wakeup eventfd")?;
        let requests = Arc::new(Requests {
            flushes: AtomicU64::new(0),
            finish: AtomicBool::new(false),
            wake,
        });
        let thread = std::thread::Builder::new()
            .name("ka-ring".into())
            .spawn({
                let requests = Arc::clone(&requests);
                move || {
                    let mut reader = Reader {
                        merge: Merge::new(rings.len(), MARGIN_NS),
                        rings,
                        adder,
                        online_checked: std::time::Instant::now(),
                        per_pass: ring_records(ring_bytes_each),
                        tx,
                        spares,
                        spare: None,
                        requests,
                        short: 0,
                    };
                    reader.run(poll_every)
                }
            })
            .context("starting the ring buffer reader thread")?;
        Ok(Drain {
            queue,
            spare,
            requests,
            thread: Some(thread),
        })
    }

    /// The next message; `None` once the thread stopped (finished, or
    /// failed: [`Drain::join`] tells which).
    pub(super) async fn recv(&mut self) -> Option<Msg> {
        self.queue.recv().await
    }

    /// Most messages the queue holds.
    pub(super) fn capacity(&self) -> usize {
        self.queue.max_capacity()
    }

    /// A message already waiting, if any.
    pub(super) fn try_recv(&mut self) -> Option<Msg> {
        self.queue.try_recv().ok()
    }

    /// Hands a used chunk back to the thread.
    pub(super) fn recycle(&self, mut chunk: Chunk) {
        chunk.events.clear();
        // The thread may have stopped: the chunk is then just freed.
        let _ = self.spare.send(chunk.events);
    }

    /// Asks for every record the rings hold now; the answer is a
    /// [`Msg::Flushed`] after the last of them.
    pub(super) fn flush(&self) {
        self.requests.flushes.fetch_add(1, Ordering::Release);
        self.requests.wake();
    }

    /// The programs are detached (the rings no longer grow): the thread
    /// reads them empty, whatever the queue's bound, releases everything
    /// and stops; [`Drain::recv`] returns the rest, then `None`.
    pub(super) fn finish(&self) {
        self.requests.finish.store(true, Ordering::Release);
        self.requests.wake();
    }

    /// Waits for the stopped thread; its error, if it failed.
    pub(super) fn join(&mut self) -> Result<()> {
        match self.thread.take().map(JoinHandle::join) {
            None => Ok(()),
            Some(Ok(res)) => res,
            Some(Err(_)) => Err(anyhow!("the ring buffer reader thread panicked")),
        }
    }
}

impl Drop for Drain {
    /// On an early return (an error): the thread stops at its next send or
    /// wakeup and is joined, so none is left behind.
    fn drop(&mut self) {
        self.queue.close();
        self.finish();
        // Unblocks a send waiting for room: closing makes it fail.
        while self.queue.try_recv().is_ok() {}
        let _ = self.join();
    }
}

/// The thread's side.
struct Reader {
    rings: Vec<RingBuf<MapData>>,
    adder: RingAdder,
    /// When [`Reader::add_rings`] last looked.
    online_checked: std::time::Instant,
    /// Most records a pass reads from one ring.
    per_pass: usize,
    merge: Merge,
    tx: mpsc::Sender<Msg>,
    spares: std::sync::mpsc::Receiver<Vec<RawEvent>>,
    /// A chunk's vector a pass had nothing to send in.
    spare: Option<Vec<RawEvent>>,
    requests: Arc<Requests>,
    /// Records too short to decode, read and not yet reported.
    short: u64,
}

/// The engine stopped taking messages: nothing more to do.
struct Gone;

impl Reader {
    fn run(&mut self, poll_every: Duration) -> Result<()> {
        let mut answered = 0u64;
        loop {
            // Read the requests before the rings: a flush asked from here
            // on is answered after this reading of the rings, or the next.
            let finish = self.requests.finish.load(Ordering::Acquire);
            let flushes = self.requests.flushes.load(Ordering::Acquire);
            if self.online_checked.elapsed() >= ONLINE_CHECK {
                self.online_checked = std::time::Instant::now();
                self.add_rings();
            }
            let pass_ns = Clock::mono_now_ns();
            let read_empty = self.read_pass(pass_ns);
            // A flush takes every record stamped before it was asked
            // (before this pass), a finish everything, once the rings read
            // empty; otherwise what every ring was read past, the margin
            // back.
            let upto = match (read_empty, finish, flushes > answered) {
                (true, true, _) => u64::MAX,
                (true, false, true) => pass_ns.max(self.merge.watermark()),
                _ => self.merge.watermark(),
            };
            if self.send_released(upto).is_err() {
                return Ok(());
            }
            if !read_empty {
                // A ring held more than a pass takes: read on at once.
                continue;
            }
            if flushes > answered {
                answered = flushes;
                if self.tx.blocking_send(Msg::Flushed).is_err() {
                    return Ok(());
                }
            }
            if finish {
                return Ok(());
            }
            self.wait(poll_every)?;
        }
    }

    /// Gives the CPUs brought online since the last look their rings, and
    /// reads them from now on. Their events before this were counted as
    /// lost by the kernel (no ring to write to); a ring that cannot be made
    /// leaves it so, with a warning.
    fn add_rings(&mut self) {
        let missing = match self.adder.missing() {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!("looking for CPUs brought online: {e:#}");
                return;
            }
        };
        for cpu in missing {
            match self.adder.add(cpu) {
                Ok(ring) => {
                    self.rings.push(ring);
                    self.merge.add_ring();
                    tracing::info!(cpu, "a CPU came online: its event ring is installed");
                }
                Err(e) => tracing::warn!(
                    cpu,
                    "a CPU came online but has no event ring: its events are counted as lost: {e:#}"
                ),
            }
        }
    }

    /// Sleeps until a ring's wakeup, a request, or `poll_every`. Held
    /// records wait for the next pass like the rest: waking for each one
    /// due would wake the engine (and its writes) a thousand times a
    /// second under load, for a few milliseconds less delay.
    fn wait(&mut self, poll_every: Duration) -> Result<()> {
        let timeout = Timespec::try_from(poll_every).context("the ring poll interval")?;
        let mut fds: Vec<PollFd> = self
            .rings
            .iter()
            .map(|r| PollFd::new(r, PollFlags::IN))
            .collect();
        fds.push(PollFd::new(&self.requests.wake, PollFlags::IN));
        match poll(&mut fds, Some(&timeout)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e).context("polling the event rings"),
        }
        if fds.last().is_some_and(|f| !f.revents().is_empty()) {
            let mut count = [0u8; 8];
            // Resets the counter; EAGAIN (nothing to read) is fine.
            let _ = rustix::io::read(&self.requests.wake, &mut count);
        }
        Ok(())
    }

    /// Copies at most a ring's worth of records out of each ring into the
    /// merge; true when every ring read empty (the merge then knows each
    /// was read past `pass_ns`).
    fn read_pass(&mut self, pass_ns: u64) -> bool {
        let mut all_empty = true;
        for (i, ring) in self.rings.iter_mut().enumerate() {
            let mut taken = 0;
            let mut empty = false;
            while taken < self.per_pass {
                let Some(item) = ring.next() else {
                    empty = true;
                    break;
                };
                taken += 1;
                match kernel_maps::parse(&item) {
                    Some(ev) => self.merge.push(i, ev),
                    None => self.short += 1,
                }
            }
            if empty {
                self.merge.read_empty(i, pass_ns);
            } else {
                all_empty = false;
            }
        }
        all_empty
    }

    /// Sends the held records stamped up to `upto`, in chunks, with the
    /// short records read so far. A send waits while the queue is full:
    /// the rings then fill and the kernel counts what it cannot queue.
    fn send_released(&mut self, upto: u64) -> Result<(), Gone> {
        loop {
            let events = self.spare.take().unwrap_or_else(|| {
                self.spares
                    .try_recv()
                    .unwrap_or_else(|_| Vec::with_capacity(CHUNK))
            });
            let mut chunk = Chunk {
                events,
                short: std::mem::take(&mut self.short),
            };
            self.merge.release(upto, &mut chunk.events, CHUNK);
            let full = chunk.events.len() == CHUNK;
            if chunk.events.is_empty() && chunk.short == 0 {
                self.spare = Some(chunk.events);
                return Ok(());
            }
            self.tx
                .blocking_send(Msg::Records(chunk))
                .map_err(|_| Gone)?;
            if !full {
                return Ok(());
            }
        }
    }
}

/// Most records a ring of `bytes` holds (every record is at least a
/// header and an [`EventHead`]): a pass reads no more than that from it.
fn ring_records(bytes: u32) -> usize {
    bytes as usize / (EventHead::SIZE + 8) + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_holds_about_the_ring_and_at_least_two_chunks() {
        let chunk_bytes = CHUNK * size_of::<RawEvent>();
        assert_eq!(queue_chunks(4096), 2);
        assert_eq!(queue_chunks(4 << 20), (4 << 20) / chunk_bytes);
        assert!(queue_chunks(4 << 20) * chunk_bytes <= 4 << 20);
        assert_eq!(queue_chunks(256 << 20), (256 << 20) / chunk_bytes);
    }
}
