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
//!
//! The consumer waits one of two ways: on the queue's condition variable
//! ([`EventQueue::wait`]), or on its [`WakeFd`] in an epoll set of its own
//! ([`EventQueue::begin_fd_wait`]), when it waits for sockets too.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::frame::PacketRun;
use crate::reason::DisconnectReason;
use crate::wake_fd::WakeFd;

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

pub struct EventQueue {
    state: Mutex<QueueState>,
    ready: Condvar,
    /// Signalled instead of `ready` while the consumer waits on descriptors.
    wake: Arc<WakeFd>,
    /// The consumer waits (either way), readable without the lock: an I/O
    /// thread holds its events back while the consumer is busy, and hands them
    /// over at once when it waits.
    consumer_waiting: AtomicBool,
}

#[derive(Default)]
struct QueueState {
    events: Vec<Event>,
    /// The consumer is blocked in `wait`: only then does a push pay for a wakeup.
    waiting: bool,
    /// The consumer waits on `wake`: a push signals it.
    fd_waiting: bool,
    /// Set by `interrupt` to end one wait early.
    interrupted: bool,
}

impl QueueState {
    fn move_events(&mut self, out: &mut Vec<Event>) -> usize {
        let moved = self.events.len();
        if out.is_empty() {
            std::mem::swap(&mut self.events, out);
        } else {
            out.append(&mut self.events);
        }
        moved
    }
}

impl EventQueue {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            state: Mutex::default(),
            ready: Condvar::new(),
            wake: Arc::new(WakeFd::new()?),
            consumer_waiting: AtomicBool::new(false),
        })
    }

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
        state.move_events(out)
    }

    /// Ends the consumer's current (or next) wait even if nothing is queued.
    pub fn interrupt(&self) {
        let mut state = self.lock();
        state.interrupted = true;
        state.waiting = false;
        if std::mem::take(&mut state.fd_waiting) {
            self.wake.signal();
        }
        self.consumer_waiting.store(false, Ordering::Relaxed);
        drop(state);
        self.ready.notify_all();
    }

    /// The descriptor a consumer waiting with [`begin_fd_wait`](Self::begin_fd_wait) watches.
    pub fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// The consumer's wake descriptor, for others that wake it too (reactors it serves inline).
    pub(crate) fn wake_handle(&self) -> Arc<WakeFd> {
        self.wake.clone()
    }

    /// The consumer is about to wait on [`wake_fd`](Self::wake_fd): pushes signal
    /// it from now on. Returns false, and does not start, if there is something
    /// to take already (events, or an interrupt).
    pub fn begin_fd_wait(&self) -> bool {
        let mut state = self.lock();
        if !state.events.is_empty() || std::mem::take(&mut state.interrupted) {
            return false;
        }
        state.fd_waiting = true;
        self.consumer_waiting.store(true, Ordering::Relaxed);
        true
    }

    /// The consumer no longer waits on the descriptor; its signals are taken.
    pub fn end_fd_wait(&self) {
        let mut state = self.lock();
        state.fd_waiting = false;
        self.consumer_waiting.store(false, Ordering::Relaxed);
        drop(state);
        self.wake.drain();
    }

    /// Moves whatever is queued to `out` without waiting; an interrupt stays
    /// pending for the wait it is meant to end.
    pub fn take(&self, out: &mut Vec<Event>) -> usize {
        let mut state = self.lock();
        state.move_events(out)
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
        if std::mem::take(&mut state.fd_waiting) {
            self.consumer_waiting.store(false, Ordering::Relaxed);
            drop(state);
            self.wake.signal();
        } else if state.waiting {
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
    use std::thread;

    fn sent(session: u64) -> Event {
        Event::Sent { session: SessionId(session), nbytes: 1 }
    }

    #[test]
    fn wait_returns_everything_queued_in_order() {
        let queue = EventQueue::new().unwrap();
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
        let queue = EventQueue::new().unwrap();
        let started = Instant::now();
        assert_eq!(queue.wait(Some(Duration::from_millis(50)), &mut Vec::new()), 0);
        assert!(started.elapsed() >= Duration::from_millis(50));
    }

    #[test]
    fn a_push_from_another_thread_wakes_the_waiting_consumer() {
        let queue = Arc::new(EventQueue::new().unwrap());
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
    fn a_push_signals_a_consumer_that_waits_on_the_descriptor_once() {
        let queue = EventQueue::new().unwrap();
        assert!(queue.begin_fd_wait());
        queue.push(sent(1));
        queue.push(sent(2));
        let mut poll = libc::pollfd { fd: queue.wake_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, no wait.
        assert_eq!(unsafe { libc::poll(&mut poll, 1, 0) }, 1, "the descriptor is readable");
        queue.end_fd_wait();
        assert!(!queue.begin_fd_wait(), "events are waiting: no wait begins");
        let mut out = Vec::new();
        assert_eq!(queue.wait(Some(Duration::ZERO), &mut out), 2);
    }

    #[test]
    fn interrupt_ends_a_wait_without_events() {
        let queue = Arc::new(EventQueue::new().unwrap());
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
