//! Writer coalescing: while the application thread runs a batch of callbacks,
//! the sends they make are not written one packet at a time.
//!
//! A callback that answers 32 packets of one session with 32 sends would
//! otherwise wake that session's driver on the first send, and the driver,
//! racing the callbacks on another core, would write the answers in many small
//! writes. Inside a [`WriteBatch`] the sessions owed a write are collected
//! instead and written when the batch ends (or every few hundred events, which
//! bounds the latency this adds): one gathered write per session per batch.

use std::cell::{Cell, RefCell};
use std::sync::Arc;

use bytes::Bytes;

use crate::send_queue::Push;
use crate::session::SessionHandle;

/// Up to this many sessions owed at the end of a light batch are written by
/// the batch's own thread: one syscall each and no thread hop, which is what
/// keeps a request-answer round trip short. Under load, a thread doing every
/// write would be the bottleneck, and the drivers take over.
const WRITE_HERE_SESSIONS: usize = 32;

/// A batch of more events than this is load: its writes go to the drivers.
const LIGHT_BATCH_EVENTS: usize = 64;

/// A batch of at most this many events (packets) writes each send through at
/// once, when its session has nothing queued: a request answered by one
/// packet leaves at once, uncopied, as from a single-threaded event loop.
/// Bigger batches coalesce, one write per session.
const WRITE_THROUGH_EVENTS: usize = 4;

thread_local! {
    /// Sessions owed a write by sends made on this thread inside a batch.
    static OWED: RefCell<Option<Vec<Arc<SessionHandle>>>> = const { RefCell::new(None) };
    /// Sends made on this thread write through (see `send_parts`).
    static WRITE_THROUGH: Cell<bool> = const { Cell::new(true) };
}

/// While alive, sends made on this thread defer their writes until
/// [`flush`](Self::flush) or drop, unless the batch is light enough for them to
/// write through. Batches may nest; the outermost one owns the writes.
pub struct WriteBatch {
    outermost: bool,
}

impl WriteBatch {
    /// A batch of about `events` events (packets, connects, disconnects).
    pub fn begin(events: usize) -> Self {
        let outermost = OWED.with_borrow_mut(|owed| {
            if owed.is_some() {
                return false;
            }
            *owed = Some(Vec::new());
            true
        });
        if outermost {
            WRITE_THROUGH.set(events <= WRITE_THROUGH_EVENTS);
        }
        Self { outermost }
    }

    /// Hands over everything owed so far; the batch goes on. After a light
    /// batch (`events` delivered since the last flush) a few sessions are
    /// written by this thread at once; otherwise the drivers write them, in
    /// parallel.
    pub fn flush(&self, events: usize) {
        if !self.outermost {
            return;
        }
        let owed = OWED.with_borrow_mut(|owed| owed.as_mut().map(std::mem::take).unwrap_or_default());
        let write_here = events <= LIGHT_BATCH_EVENTS && owed.len() <= WRITE_HERE_SESSIONS;
        for handle in owed {
            if write_here {
                handle.write_now();
            } else {
                handle.hand_over();
            }
        }
    }
}

impl Drop for WriteBatch {
    fn drop(&mut self) {
        // Owed writes left by a batch that ended without its final flush (an
        // error stopped it) are weighed by their number alone.
        self.flush(0);
        if self.outermost {
            OWED.with_borrow_mut(|owed| *owed = None);
            WRITE_THROUGH.set(true);
        }
    }
}

/// Sends `parts` (a header and a payload, or raw bytes) on `handle`: written
/// through at once, uncopied, outside a batch or in a light one, when nothing
/// is queued before them; else copied into the pool (`encode`) and sent like
/// [`send`].
pub fn send_parts(handle: &Arc<SessionHandle>, parts: &[&[u8]], encode: impl FnOnce() -> Bytes) -> Push {
    if WRITE_THROUGH.get()
        && let Some(outcome) = handle.write_through(parts)
    {
        return outcome;
    }
    send(handle, encode())
}

/// Queues `packet` on `handle` like [`SessionHandle::send`], but inside a
/// [`WriteBatch`] the write waits for the end of the batch: one gathered write
/// per session however many packets the batch's callbacks sent it.
pub fn send(handle: &Arc<SessionHandle>, packet: Bytes) -> Push {
    let (outcome, owed) = handle.queue_for_caller(packet);
    if owed {
        write_or_defer(handle);
    }
    outcome
}

/// Writes what the caller just queued on `handle` (whose writer was idle):
/// now, or at the end of the current batch if there is one.
fn write_or_defer(handle: &Arc<SessionHandle>) {
    let deferred = OWED.with_borrow_mut(|owed| match owed {
        Some(owed) => {
            owed.push(handle.clone());
            true
        }
        None => false,
    });
    if !deferred {
        handle.write_now();
    }
}
