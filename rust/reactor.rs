//! A reactor is one I/O thread's share of the sessions: a tokio task that
//! serves many connections over its own epoll set (a `mio::Poll`), whose one
//! descriptor tokio watches.
//!
//! Why not a tokio task and a tokio registration per connection: an idle
//! session would pay tokio's task cell and its readiness slot (about 640 bytes,
//! both cache-line aligned) for doing nothing. Here an idle session is its
//! [`Connection`] in a slab; the kernel keeps its place in the epoll set, and
//! it costs nothing until its socket, its doorbell or its deadline says so.
//! One `epoll_wait` hands the reactor every ready socket at once, like the
//! C servers this library descends from.
//!
//! Other threads reach a reactor through its [`Mailbox`]: connections to take
//! in, and the doorbells of sessions whose send queue or reader has work.
//!
//! A connection leaves the service here, whichever way it ends: the reactor
//! drops it (which closes the socket and queues its `Disconnected`), then takes
//! it out of the registry. So an empty registry means every farewell is queued.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use mio::{Events, Interest, Token};
use slab::Slab;
use tokio::io::unix::AsyncFd;
use tokio::time::{Instant, Sleep};

use crate::connection::{self, Connection, Served};
use crate::context::SessionContext;
use crate::doorbell::{Doorbell, RingList};
use crate::reason::DisconnectReason;
use crate::registry::SessionRegistry;
use crate::session::SessionId;

/// Readiness events taken per `epoll_wait`.
const EVENTS_PER_WAIT: usize = 1024;

/// Sessions served in one poll of the reactor's task before it yields the
/// thread to the runtime's other tasks and its driver (the accept loop,
/// timers). A serve can take tens of microseconds when its socket takes a long
/// backlog, so this bounds how long a new connection waits for its accept.
const SERVES_PER_POLL: usize = 128;

/// Rounds over the sources in one poll, so that the poll ends even if they
/// keep reporting without anything to serve.
const ROUNDS_PER_POLL: usize = 16;

/// Bytes a lingering session reads and discards at a time.
const DISCARD_SIZE: usize = 4096;

/// What other threads hand a reactor.
pub(crate) struct Mailbox {
    rings: Arc<RingList>,
    /// Connections to take in; `None` once the reactor is gone, so that a late
    /// one is closed (and reported) at once instead of waiting forever.
    arrivals: Mutex<Option<Vec<Connection>>>,
    registry: Arc<SessionRegistry>,
}

impl Mailbox {
    fn new(registry: Arc<SessionRegistry>) -> Self {
        Self { rings: Arc::default(), arrivals: Mutex::new(Some(Vec::new())), registry }
    }

    /// A doorbell for a session this reactor will serve.
    pub(crate) fn doorbell(&self) -> Doorbell {
        Doorbell::new(self.rings.clone())
    }

    /// Hands a connection to the reactor.
    pub(crate) fn adopt(&self, connection: Connection) {
        let mut arrivals = self.arrivals.lock().unwrap_or_else(|e| e.into_inner());
        let Some(waiting) = arrivals.as_mut() else {
            drop(arrivals);
            // The reactor is gone: the connection ends here, and is reported.
            retire(connection, &self.registry);
            return;
        };
        waiting.push(connection);
        drop(arrivals);
        self.rings.wake();
    }
}

/// A service's reactors, one per I/O thread; new sessions are dealt round-robin.
pub(crate) struct Reactors {
    mailboxes: Box<[Arc<Mailbox>]>,
    next: AtomicUsize,
}

impl Reactors {
    /// Starts `count` reactors on `runtime` for sessions that share `context`
    /// and are listed in `registry`.
    pub(crate) fn start(
        runtime: &tokio::runtime::Handle,
        count: usize,
        context: &Arc<SessionContext>,
        registry: &Arc<SessionRegistry>,
    ) -> io::Result<Self> {
        let _entered = runtime.enter();
        let count = count.max(1);
        let mut mailboxes = Vec::with_capacity(count);
        for _ in 0..count {
            let mailbox = Arc::new(Mailbox::new(registry.clone()));
            runtime.spawn(Reactor::new(mailbox.clone(), context.clone(), registry.clone())?.run());
            mailboxes.push(mailbox);
        }
        Ok(Self { mailboxes: mailboxes.into(), next: AtomicUsize::new(0) })
    }

    /// The mailbox of the reactor that takes the next session.
    pub(crate) fn next(&self) -> &Arc<Mailbox> {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.mailboxes.len();
        &self.mailboxes[index]
    }
}

struct Reactor {
    mailbox: Arc<Mailbox>,
    poll: AsyncFd<mio::Poll>,
    events: Events,
    sessions: Sessions,
    /// Buffers swapped with the mailbox's, so that taking them is one lock.
    rung: Vec<u32>,
    arrivals: Vec<Connection>,
    /// Set to the nearest deadline of any session.
    timer: Pin<Box<Sleep>>,
    timer_at: Option<Instant>,
}

/// The sessions of one reactor and what it owes them.
struct Sessions {
    context: Arc<SessionContext>,
    registry: Arc<SessionRegistry>,
    slab: Slab<Box<Connection>>,
    /// One entry per armed deadline; entries whose session moved on are skipped.
    deadlines: BinaryHeap<Reverse<(Instant, usize, SessionId)>>,
    /// Sessions to serve, each once however many times it was rung or reported
    /// ready, in the order they asked. A session that used its turns with work
    /// left goes to the back.
    ready: VecDeque<usize>,
    discard: Box<[u8]>,
}

impl Sessions {
    fn list(&mut self, key: usize) {
        if let Some(connection) = self.slab.get_mut(key) {
            if connection.list() {
                self.ready.push_back(key);
            }
        }
    }

    /// Serves up to `budget` sessions from the front of the queue; returns how
    /// many. Their events go to the application after each session while it
    /// waits for them (latency), else in one batch at the end (one lock, one
    /// wakeup, one GIL acquisition for the lot).
    fn serve_listed(&mut self, budget: usize) -> usize {
        let mut served = 0;
        while served < budget {
            if self.context.events.consumer_waiting() {
                connection::queue_events(&self.context.events);
            }
            let Some(key) = self.ready.pop_front() else { break };
            let Some(connection) = self.slab.get_mut(key) else { continue };
            connection.unlist();
            served += 1;
            match connection.serve(&mut self.discard) {
                Served::Waiting => {}
                Served::Busy => {
                    connection.list();
                    self.ready.push_back(key);
                }
                Served::Done => {
                    retire(*self.slab.remove(key), &self.registry);
                    continue;
                }
            }
            if let Some(at) = connection.deadline_to_arm() {
                self.deadlines.push(Reverse((at, key, connection.handle().id())));
            }
        }
        connection::queue_events(&self.context.events);
        served
    }

    /// Lists the sessions whose deadline is at or before `now`.
    fn list_due(&mut self, now: Instant) {
        while let Some(&Reverse((at, key, id))) = self.deadlines.peek() {
            if at > now {
                break;
            }
            self.deadlines.pop();
            let Some(connection) = self.slab.get_mut(key) else { continue };
            if connection.handle().id() == id && connection.deadline_passed(at) {
                self.list(key);
            }
        }
    }
}

impl Reactor {
    fn new(
        mailbox: Arc<Mailbox>,
        context: Arc<SessionContext>,
        registry: Arc<SessionRegistry>,
    ) -> io::Result<Self> {
        // SAFETY: a `mio::Poll` owns its epoll descriptor and keeps it, unchanged,
        // until it is dropped with the `AsyncFd`.
        let poll =
            unsafe { AsyncFd::register_with_interest(mio::Poll::new()?, tokio::io::Interest::READABLE)? };
        Ok(Self {
            mailbox,
            poll,
            events: Events::with_capacity(EVENTS_PER_WAIT),
            sessions: Sessions {
                context,
                registry,
                slab: Slab::new(),
                deadlines: BinaryHeap::new(),
                ready: VecDeque::new(),
                discard: vec![0; DISCARD_SIZE].into_boxed_slice(),
            },
            rung: Vec::new(),
            arrivals: Vec::new(),
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            timer_at: None,
        })
    }

    async fn run(mut self) {
        loop {
            std::future::poll_fn(|cx| self.serve_until_idle(cx)).await;
            // Still busy. `yield_now` hands the waker to the scheduler, which
            // wakes it after the other ready tasks and the runtime's own I/O and
            // timer drivers: waking ourselves would run us again at once, and a
            // reactor that is never idle would starve the accept loop.
            tokio::task::yield_now().await;
        }
    }

    /// Serves until every source is idle (pending, with the waker) or the
    /// budget is used up (ready).
    fn serve_until_idle(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let mut budget = SERVES_PER_POLL;
        for _ in 0..ROUNDS_PER_POLL {
            self.mailbox.rings.start_looking(cx.waker());
            self.take_arrivals();
            self.take_rings();
            let sockets_ready = self.take_ready_sockets(cx);
            let deadline_passed = self.take_deadlines(cx);
            if self.sessions.ready.is_empty() && !sockets_ready && !deadline_passed {
                // Every source has the waker: the mailbox, the epoll set, the timer.
                return Poll::Pending;
            }
            budget -= self.sessions.serve_listed(budget);
            if budget == 0 {
                break;
            }
        }
        Poll::Ready(())
    }

    /// Takes in the connections handed over since the last look; each is
    /// served once (a doorbell rung before it arrived is answered then).
    fn take_arrivals(&mut self) {
        if let Some(arrivals) = self.mailbox.arrivals.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            std::mem::swap(arrivals, &mut self.arrivals);
        }
        for mut connection in self.arrivals.drain(..) {
            let entry = self.sessions.slab.vacant_entry();
            let key = entry.key();
            let registered = self.poll.get_ref().registry().register(
                connection.stream_mut(),
                Token(key),
                Interest::READABLE | Interest::WRITABLE,
            );
            if let Err(error) = registered {
                connection.refuse(&error);
                retire(connection, &self.sessions.registry);
                continue;
            }
            let key32 = u32::try_from(key).expect("fewer than 2^32 sessions per reactor");
            connection.handle().connect_doorbell(key32);
            // Boxed in the slab: a grown slab then costs a pointer per free slot.
            entry.insert(Box::new(connection));
            self.sessions.list(key);
        }
    }

    fn take_rings(&mut self) {
        self.mailbox.rings.take(&mut self.rung);
        for key in self.rung.drain(..) {
            self.sessions.list(key as usize);
        }
    }

    /// Lists every socket the epoll set reports ready. Returns whether it
    /// reported any; when it has none, tokio has the task's waker for it.
    fn take_ready_sockets(&mut self, cx: &mut Context<'_>) -> bool {
        // The epoll set is asked first, not tokio: while the reactor stays busy
        // the runtime polls its own driver only between the reactor's polls,
        // and sockets need not wait for that. Tokio is asked only when the set
        // is empty; a readiness it reports is cleared and the set asked again,
        // so an event between the empty wait and the clear is not lost.
        loop {
            if self.wait_for_events() {
                self.list_events();
                return true;
            }
            match self.poll.poll_read_ready_mut(cx) {
                Poll::Pending => return false,
                Poll::Ready(Ok(mut guard)) => guard.clear_ready(),
                Poll::Ready(Err(error)) => {
                    log::error!(target: "servercore", "reactor: waiting for readiness failed: {error}");
                    return false;
                }
            }
        }
    }

    /// One `epoll_wait` that does not block; returns whether it found events.
    fn wait_for_events(&mut self) -> bool {
        loop {
            match self.poll.get_mut().poll(&mut self.events, Some(Duration::ZERO)) {
                Ok(()) => return !self.events.is_empty(),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    log::error!(target: "servercore", "reactor: epoll_wait failed: {error}");
                    return false;
                }
            }
        }
    }

    fn list_events(&mut self) {
        for event in self.events.iter() {
            let key = event.token().0;
            let Some(connection) = self.sessions.slab.get_mut(key) else { continue };
            // A closed or failed socket is "ready": the next read or write says how.
            let failed = event.is_error();
            connection.note_ready(
                event.is_readable() || event.is_read_closed() || failed,
                event.is_writable() || event.is_write_closed() || failed,
            );
            self.sessions.list(key);
        }
    }

    /// Lists the sessions whose deadline passed and sets the timer to the next
    /// one. Returns whether the timer says another has passed already.
    fn take_deadlines(&mut self, cx: &mut Context<'_>) -> bool {
        self.sessions.list_due(Instant::now());
        let Some(&Reverse((next, ..))) = self.sessions.deadlines.peek() else {
            self.timer_at = None;
            return false;
        };
        if self.timer_at != Some(next) {
            self.timer.as_mut().reset(next);
            self.timer_at = Some(next);
        }
        self.timer.as_mut().poll(cx).is_ready()
    }
}

impl Drop for Reactor {
    /// The runtime is shutting down (or the reactor panicked): every session
    /// it serves or was handed ends here, with the service's stop reason if it
    /// is stopping. Connections handed over later end as they arrive.
    fn drop(&mut self) {
        let registry = &self.sessions.registry;
        let fallback = registry.closed_with().unwrap_or(DisconnectReason::Reset);
        let arrivals = self.mailbox.arrivals.lock().unwrap_or_else(|e| e.into_inner()).take();
        let slab = std::mem::take(&mut self.sessions.slab);
        for mut connection in slab.into_iter().map(|(_, boxed)| *boxed).chain(arrivals.into_iter().flatten())
        {
            connection.seal(fallback);
            retire(connection, registry);
        }
        connection::queue_events(&self.sessions.context.events);
    }
}

/// Ends a connection: dropping it closes the socket and queues its
/// `Disconnected`; then it leaves the registry.
fn retire(connection: Connection, registry: &SessionRegistry) {
    let id = connection.handle().id();
    drop(connection);
    registry.remove(id);
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    use super::*;
    use crate::config::SessionConfig;
    use crate::events::Event;
    use crate::session::SessionHandle;

    fn context() -> Arc<SessionContext> {
        Arc::new(SessionContext::new(SessionConfig::default()))
    }

    /// An accepted socket, ready for a reactor, and its peer.
    fn accepted() -> (mio::net::TcpStream, std::net::SocketAddr, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (stream, peer) = listener.accept().unwrap();
        stream.set_nonblocking(true).unwrap();
        (mio::net::TcpStream::from_std(stream), peer, client)
    }

    #[test]
    fn a_connection_handed_to_a_stopped_reactor_is_closed_and_reported_at_once() {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let (context, registry) = (context(), Arc::new(SessionRegistry::default()));
        let reactors = Reactors::start(runtime.handle(), 1, &context, &registry).unwrap();
        drop(runtime);
        let (stream, peer, mut client) = accepted();
        let mailbox = reactors.next();
        let handle = Arc::new(SessionHandle::new(
            SessionId(1),
            peer,
            stream.as_raw_fd(),
            mailbox.doorbell(),
            context.clone(),
        ));
        assert!(registry.insert(handle.clone()));
        mailbox.adopt(Connection::new(stream, handle));
        let mut events = Vec::new();
        context.events.wait(Some(Duration::from_secs(1)), &mut events);
        assert!(
            matches!(events.as_slice(), [Event::Disconnected { session: SessionId(1), .. }]),
            "one Disconnected, at once"
        );
        client.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        assert_eq!(std::io::Read::read(&mut client, &mut [0u8; 1]).unwrap(), 0, "the socket is closed");
        assert!(registry.is_empty(), "and the session left the registry");
    }

    #[test]
    fn sessions_are_dealt_to_the_reactors_in_turn() {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let registry = Arc::new(SessionRegistry::default());
        let reactors = Reactors::start(runtime.handle(), 2, &context(), &registry).unwrap();
        let dealt: Vec<*const Mailbox> = (0..4).map(|_| Arc::as_ptr(reactors.next())).collect();
        assert_ne!(dealt[0], dealt[1]);
        assert_eq!(dealt[0], dealt[2]);
        assert_eq!(dealt[1], dealt[3]);
    }
}
