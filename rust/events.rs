//! What crosses from the I/O threads to the application: events about
//! sessions, named by their id, in batches.
//!
//! I/O threads never run application code: they append events to one queue, a
//! batch under one lock (a read's worth of packets when the consumer is
//! waiting, a reactor's whole round of sessions when it is busy anyway). The
//! application thread takes everything queued in one swap and runs the
//! callbacks (in Python: one GIL acquisition for the whole batch). Each
//! session's events are appended by the one reactor that serves it, so a single
//! queue keeps them in order: `Connected` first, packets in arrival order,
//! `Disconnected` last.
//!
//! Events are plain data: they name a session, they do not own it. A queue that
//! nobody drains (a service dropped without a last look) then holds bytes, never
//! a session and through it the service.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::frame::PacketRun;
use crate::reason::DisconnectReason;

/// A session's number, unique within its service, counting from 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Debug)]
pub enum Event {
    /// A new session; the first event of every session. Its handle is in the
    /// service's registry until its `Disconnected` has been queued.
    Connected { session: SessionId },
    /// Whole, checked packets, in arrival order (packet framing). The consumer
    /// calls [`SessionHandle::release_received`] with the run's byte length
    /// once they are handled, or the session's reader stays paused.
    Packets { session: SessionId, packets: PacketRun },
    /// Bytes as they came off the socket (raw framing); released like packets.
    Received { session: SessionId, data: Bytes },
    /// A write handed `nbytes` to the kernel (only when asked for).
    Sent { session: SessionId, nbytes: usize },
    /// The last event of every session, after its socket is closed.
    Disconnected { session: SessionId, reason: DisconnectReason },
}

impl Event {
    pub fn session_id(&self) -> SessionId {
        match self {
            Event::Connected { session }
            | Event::Packets { session, .. }
            | Event::Received { session, .. }
            | Event::Sent { session, .. }
            | Event::Disconnected { session, .. } => *session,
        }
    }
}

#[derive(Default)]
pub struct EventQueue {
    state: Mutex<QueueState>,
    ready: Condvar,
    /// `QueueState::waiting`, readable without the lock: an I/O thread holds
    /// its events back while the consumer is busy, and hands them over at once
    /// when it waits.
    consumer_waiting: AtomicBool,
}

#[derive(Default)]
struct QueueState {
    events: Vec<Event>,
    /// The consumer is blocked in `wait`: only then does a push pay for a wakeup.
    waiting: bool,
    /// Set by `interrupt` to end one `wait` early.
    interrupted: bool,
}

impl EventQueue {
    pub fn push(&self, event: Event) {
        let mut state = self.lock();
        state.events.push(event);
        self.wake_consumer(state);
    }

    /// Appends a batch (emptying `events`) under one lock.
    pub fn push_all(&self, events: &mut Vec<Event>) {
        if events.is_empty() {
            return;
        }
        let mut state = self.lock();
        if state.events.is_empty() {
            std::mem::swap(&mut state.events, events);
        } else {
            state.events.append(events);
        }
        self.wake_consumer(state);
    }

    /// Waits until events are queued or `timeout` passes (`None`: no limit), then
    /// moves all of them to the end of `out`. Returns how many were moved.
    pub fn wait(&self, timeout: Option<Duration>, out: &mut Vec<Event>) -> usize {
        // A timeout too far away to be an instant is no limit at all.
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut state = self.lock();
        while state.events.is_empty() && !state.interrupted {
            state.waiting = true;
            self.consumer_waiting.store(true, Ordering::Relaxed);
            state = match deadline {
                None => self.ready.wait(state).unwrap_or_else(|e| e.into_inner()),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    self.ready.wait_timeout(state, deadline - now).unwrap_or_else(|e| e.into_inner()).0
                }
            };
        }
        state.waiting = false;
        self.consumer_waiting.store(false, Ordering::Relaxed);
        state.interrupted = false;
        let moved = state.events.len();
        if out.is_empty() {
            std::mem::swap(&mut state.events, out);
        } else {
            out.append(&mut state.events);
        }
        moved
    }

    /// Ends the consumer's current (or next) `wait` even if nothing is queued.
    pub fn interrupt(&self) {
        let mut state = self.lock();
        state.interrupted = true;
        state.waiting = false;
        self.consumer_waiting.store(false, Ordering::Relaxed);
        drop(state);
        self.ready.notify_all();
    }

    pub fn len(&self) -> usize {
        self.lock().events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the consumer is blocked waiting for events (a hint: it may be
    /// about to return or to wait).
    pub fn consumer_waiting(&self) -> bool {
        self.consumer_waiting.load(Ordering::Relaxed)
    }

    fn wake_consumer(&self, mut state: std::sync::MutexGuard<'_, QueueState>) {
        if state.waiting {
            state.waiting = false;
            self.consumer_waiting.store(false, Ordering::Relaxed);
            drop(state);
            self.ready.notify_one();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::thread;

    fn sent(session: u64) -> Event {
        Event::Sent { session: SessionId(session), nbytes: 1 }
    }

    #[test]
    fn wait_returns_everything_queued_in_order() {
        let queue = EventQueue::default();
        queue.push(sent(1));
        queue.push_all(&mut vec![sent(2), sent(3)]);
        let mut out = Vec::new();
        assert_eq!(queue.wait(Some(Duration::ZERO), &mut out), 3);
        let ids: Vec<u64> = out.iter().map(|e| e.session_id().0).collect();
        assert_eq!(ids, [1, 2, 3]);
        assert!(queue.is_empty());
    }

    #[test]
    fn wait_gives_up_at_the_timeout() {
        let queue = EventQueue::default();
        let started = Instant::now();
        assert_eq!(queue.wait(Some(Duration::from_millis(50)), &mut Vec::new()), 0);
        assert!(started.elapsed() >= Duration::from_millis(50));
    }

    #[test]
    fn a_push_from_another_thread_wakes_the_waiting_consumer() {
        let queue = Arc::new(EventQueue::default());
        let producer = {
            let queue = queue.clone();
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(20));
                queue.push(sent(7));
            })
        };
        let mut out = Vec::new();
        assert_eq!(queue.wait(Some(Duration::from_secs(5)), &mut out), 1);
        producer.join().unwrap();
    }

    #[test]
    fn interrupt_ends_a_wait_without_events() {
        let queue = Arc::new(EventQueue::default());
        let interrupter = {
            let queue = queue.clone();
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(20));
                queue.interrupt();
            })
        };
        let started = Instant::now();
        assert_eq!(queue.wait(None, &mut Vec::new()), 0);
        assert!(started.elapsed() < Duration::from_secs(5));
        interrupter.join().unwrap();
    }
}
