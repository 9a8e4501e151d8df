//! The ring buffer's reader: a thread of its own that copies the kernel's
//! event records out of the ring into chunks for the engine, so the ring
//! keeps draining while the engine walks the sockets, judges, writes or
//! waits for a CPU.
//!
//! The kernel drops an event only when its ring is full. Copying a record
//! out costs a fraction of handling it, so with a reader of its own the
//! ring stays near empty and the backlog waits in this process instead.
//! That backlog is bounded: at most [`queue_chunks`] chunks of [`CHUNK`]
//! records (about as many bytes as the kernel's ring, at least two
//! chunks) wait for the engine. When they are all taken the thread stops
//! reading, the ring fills, and the kernel counts what it cannot queue,
//! as it did before: no loss is silent, memory stays bounded. Chunks are
//! handed back after use, so the reader allocates only until it has as
//! many as the queue holds.
//!
//! A walk of the sockets must see the table after every event queued
//! before it: [`Drain::flush`] asks the thread to read the ring empty and
//! answer with a marker after the last record, and the engine applies
//! everything up to the marker before it walks.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use aya::maps::{MapData, RingBuf};
use keepalive_common::RawEvent;
use rustix::event::{EventfdFlags, PollFd, PollFlags, Timespec, eventfd, poll};
use tokio::sync::mpsc;

use super::kernel_maps;

/// Records per chunk (96 KiB of events): the thread sends a chunk when it
/// is full or when the ring reads empty.
pub(super) const CHUNK: usize = 1024;

/// Chunks that may wait for the engine: as many bytes as the kernel's ring
/// of `ring_bytes`, and at least two (one filling while one waits).
pub(super) fn queue_chunks(ring_bytes: usize) -> usize {
    (ring_bytes / (CHUNK * size_of::<RawEvent>())).max(2)
}

/// Records copied out of the ring, in the kernel's order.
pub(super) struct Chunk {
    pub events: Vec<RawEvent>,
    /// Records too short to be a [`RawEvent`] (received, not decodable).
    pub short: u64,
}

/// What the thread sends the engine.
pub(super) enum Msg {
    Records(Chunk),
    /// Every record the ring held when the flush was asked came before.
    Flushed,
}

/// Requests from the engine, read by the thread after each wakeup.
struct Requests {
    /// Flushes asked so far; the thread answers each with [`Msg::Flushed`].
    flushes: AtomicU64,
    /// The programs are detached: read the ring empty once more and stop.
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
    /// Starts reading `ring`, waking up when the kernel says so and at
    /// least every `poll_every` (the kernel wakes readers only once its
    /// wakeup threshold of bytes is queued).
    pub(super) fn start(
        ring: RingBuf<MapData>,
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
                        ring,
                        tx,
                        spares,
                        requests,
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

    /// Asks for every record the ring holds now; the answer is a
    /// [`Msg::Flushed`] after the last of them.
    pub(super) fn flush(&self) {
        self.requests.flushes.fetch_add(1, Ordering::Release);
        self.requests.wake();
    }

    /// The programs are detached (the ring no longer grows): the thread
    /// reads it empty, whatever the queue's bound, and stops;
    /// [`Drain::recv`] returns the rest, then `None`.
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
    ring: RingBuf<MapData>,
    tx: mpsc::Sender<Msg>,
    spares: std::sync::mpsc::Receiver<Vec<RawEvent>>,
    requests: Arc<Requests>,
}

/// The engine stopped taking messages: nothing more to do.
struct Gone;

impl Reader {
    fn run(&mut self, poll_every: Duration) -> Result<()> {
        let timeout = Timespec::try_from(poll_every).context("the ring poll interval")?;
        let mut answered = 0u64;
        loop {
            // Read the requests before the ring: a flush asked from here on
            // is answered after this reading of the ring, or the next.
            let finish = self.requests.finish.load(Ordering::Acquire);
            let flushes = self.requests.flushes.load(Ordering::Acquire);
            if self.read_all().is_err() {
                return Ok(());
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
            let ring = self.ring.as_fd();
            let mut fds = [
                PollFd::new(&ring, PollFlags::IN),
                PollFd::new(&self.requests.wake, PollFlags::IN),
            ];
            match poll(&mut fds, Some(&timeout)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e).context("polling the ring buffer"),
            }
            if !fds[1].revents().is_empty() {
                let mut count = [0u8; 8];
                // Resets the counter; EAGAIN (nothing to read) is fine.
                let _ = rustix::io::read(&self.requests.wake, &mut count);
            }
        }
    }

    /// Copies every record the ring holds into chunks and sends them. A
    /// send waits while the queue is full: the ring then fills and the
    /// kernel counts what it cannot queue.
    fn read_all(&mut self) -> Result<(), Gone> {
        loop {
            let mut chunk = Chunk {
                events: self
                    .spares
                    .try_recv()
                    .unwrap_or_else(|_| Vec::with_capacity(CHUNK)),
                short: 0,
            };
            while chunk.events.len() < CHUNK {
                let Some(item) = self.ring.next() else { break };
                match kernel_maps::parse(&item) {
                    Some(ev) => chunk.events.push(ev),
                    None => chunk.short += 1,
                }
            }
            let full = chunk.events.len() == CHUNK;
            if chunk.events.is_empty() && chunk.short == 0 {
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
