//! A reactor is one I/O thread's share of the sessions: their connections,
//! served over the reactor's own epoll set (a `mio::Poll`).
//!
//! Why not a tokio task and a tokio registration per connection: an idle
//! session would pay tokio's task cell and its readiness slot (about 640 bytes,
//! both cache-line aligned) for doing nothing. Here an idle session is its
//! [`Connection`] in a slab; the kernel keeps its place in the epoll set, and
//! it costs nothing until its socket, its doorbell or its deadline says so.
//! One `epoll_wait` hands the reactor every ready socket at once, like the
//! C servers this library descends from.
//!
//! Who serves a reactor: its I/O thread's tokio task, or the application
//! thread itself. The task watches the reactor's epoll set through a watch set
//! of its own (an epoll set holding just that one), whose descriptor tokio
//! watches. When the application thread waits for events and nothing is
//! waiting for it, it takes every reactor and serves them inline, waiting in
//! an epoll set of its own over the reactors' sets: a request is then read,
//! handed to its callback and answered on one thread, as in a single-threaded
//! event loop, with no hand-off between threads. A round that finds more than
//! a few sessions ready is load: the reactors go back to their tasks, which
//! serve in parallel with the callbacks, and the application thread waits for
//! their events. While the application thread serves a reactor, the task's
//! watch set is disarmed, so a ready socket does not wake the I/O thread for
//! nothing. After a wait the watch stays disarmed: the application thread is
//! usually back within microseconds, after its callbacks, and picks up what
//! arrived meanwhile, as a single-threaded event loop would. Doorbells, new
//! connections and deadlines wake the task at any time, and a task that serves
//! arms its watch itself. A watchdog arms the watch of a reactor the
//! application thread has left alone for `LEND_LIMIT`, so no socket goes
//! unwatched longer; a consumer that knows it is leaving for longer arms them
//! at once ([`Reactors::release`]).
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
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::task::{Context, Poll};
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Token};
use slab::Slab;
use tokio::io::unix::AsyncFd;
use tokio::time::{Instant, Sleep};

use crate::clock::Tick;

use crate::connection::{self, Connection, Served};
use crate::context::SessionContext;
use crate::doorbell::{Doorbell, RingList};
use crate::events::{Event, EventQueue};
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

/// Sessions ready at once that the application thread still serves inline;
/// more is load, better served by the I/O threads while it runs callbacks.
const INLINE_SESSIONS: usize = 64;

/// How long the sockets of a reactor the application thread has handed back
/// may go unwatched before the I/O thread watches them again. The watchdog
/// wakes the I/O thread this often (the CPU it costs is measured in BENCHMARKS.md).
const LEND_LIMIT: Duration = Duration::from_millis(25);

/// Bytes a lingering session reads and discards at a time.
const DISCARD_SIZE: usize = 4096;

/// The application thread's wake descriptor in its epoll set.
const WAKE_TOKEN: Token = Token(usize::MAX);

/// What other threads hand a reactor.
pub(crate) struct Mailbox {
    rings: Arc<RingList>,
    /// Connections to take in; `None` once the reactor is gone, so that a late
    /// one is closed (and reported) at once instead of waiting forever.
    arrivals: Mutex<Option<Vec<Connection>>>,
    registry: Arc<SessionRegistry>,
}

impl Mailbox {
    fn new(registry: Arc<SessionRegistry>, rings: RingList) -> Self {
        Self { rings: Arc::new(rings), arrivals: Mutex::new(Some(Vec::new())), registry }
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

/// One reactor: what it serves, and how to reach it.
pub(crate) struct Reactor {
    core: Mutex<Core>,
    mailbox: Arc<Mailbox>,
    /// The task's view of the epoll set; disarmed while the application thread serves.
    watch: WatchSet,
    /// The deadline the task's timer is set to, so that whoever hands the
    /// reactor back knows whether the task must be woken for a nearer one.
    task_timer: Mutex<Option<Instant>>,
}

impl Reactor {
    /// The reactor's state, if nobody is serving it right now.
    fn try_core(&self) -> Option<MutexGuard<'_, Core>> {
        match self.core.try_lock() {
            Ok(core) => Some(core),
            Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }
}

/// A service's reactors, one per I/O thread; new sessions are dealt round-robin.
pub(crate) struct Reactors {
    reactors: Box<[Arc<Reactor>]>,
    next: AtomicUsize,
    /// The application thread's epoll set over every reactor's set and its
    /// wake descriptor; held while it serves them inline.
    inline: Mutex<Inline>,
    /// Whether the application thread may serve the reactors itself.
    inline_io: bool,
    /// The service is shutting down: its tasks must be able to take their
    /// reactors, so the application thread no longer serves them.
    stopping: AtomicBool,
    /// The set the application thread waits on while it serves the reactors:
    /// a lone reactor's own set, else the inline set over theirs; either holds
    /// the wake descriptor too.
    app_fd: RawFd,
    /// The last inline wait handed the reactors back lent, not loaded: their
    /// sockets are the application thread's to watch (see [`Reactors::app_fd`]).
    lent: AtomicBool,
}

struct Inline {
    poll: mio::Poll,
    events: Events,
}

impl Reactors {
    /// Starts `count` reactors on `runtime` for sessions that share `context`
    /// and are listed in `registry`.
    pub(crate) fn start(
        runtime: &tokio::runtime::Handle,
        count: usize,
        inline_io: bool,
        context: &Arc<SessionContext>,
        registry: &Arc<SessionRegistry>,
    ) -> io::Result<Self> {
        let _entered = runtime.enter();
        let count = count.max(1);
        // The application thread waits in one reactor's own set when there is
        // one, else in a set over all of theirs; either holds its wake descriptor.
        let inline = Inline { poll: mio::Poll::new()?, events: Events::with_capacity(count + 1) };
        let app_wake = context.events.wake_handle();
        let wake_fd = app_wake.as_raw_fd();
        if count > 1 {
            watch_level_triggered(&inline.poll, wake_fd, WAKE_TOKEN)?;
        }
        let mut reactors = Vec::with_capacity(count);
        let mut app_fd = inline.poll.as_raw_fd();
        for index in 0..count {
            let mailbox = Arc::new(Mailbox::new(registry.clone(), RingList::new(app_wake.clone())));
            let core = Core::new(context.clone(), registry.clone())?;
            let epoll_fd = core.poll.as_raw_fd();
            if count > 1 {
                inline.poll.registry().register(
                    &mut SourceFd(&epoll_fd),
                    Token(index),
                    Interest::READABLE,
                )?;
            } else {
                watch_level_triggered(&core.poll, wake_fd, WAKE_TOKEN)?;
                app_fd = epoll_fd;
            }
            let watch = WatchSet::new(epoll_fd)?;
            let reactor =
                Arc::new(Reactor { core: Mutex::new(core), mailbox, watch, task_timer: Mutex::new(None) });
            runtime.spawn(Task::new(reactor.clone())?.run());
            reactors.push(reactor);
        }
        let reactors: Box<[Arc<Reactor>]> = reactors.into();
        if inline_io {
            runtime.spawn(watchdog(reactors.clone()));
        }
        Ok(Self {
            reactors,
            next: AtomicUsize::new(0),
            inline: Mutex::new(inline),
            inline_io,
            stopping: AtomicBool::new(false),
            app_fd,
            lent: AtomicBool::new(false),
        })
    }

    /// The mailbox of the reactor that takes the next session.
    pub(crate) fn next(&self) -> &Arc<Mailbox> {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.reactors.len();
        &self.reactors[index].mailbox
    }

    /// The application thread waits up to `timeout` for events and moves them
    /// to `out`. If nothing is waiting and no reactor is being served, it
    /// serves them all itself while it waits (see the module docs); otherwise
    /// it waits on the queue for the I/O threads. The reactors it served stay
    /// unwatched by their tasks until [`release`](Self::release).
    pub(crate) fn wait(&self, events: &EventQueue, timeout: Option<Duration>, out: &mut Vec<Event>) -> usize {
        if !self.inline_io || self.stopping.load(Ordering::SeqCst) {
            return events.wait(timeout, out);
        }
        // Takes, not waits: a pending interrupt is for the wait below.
        let taken = events.take(out);
        if taken > 0 {
            return taken;
        }
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let handed_back = match self.inline.try_lock() {
            Ok(mut inline) => self.serve_inline(&mut inline, events, deadline),
            Err(_) => true,
        };
        self.lent.store(!handed_back, Ordering::SeqCst);
        let taken = events.take(out);
        if taken > 0 || !handed_back {
            return taken;
        }
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        events.wait(left, out)
    }

    /// For an application thread that waits in an event loop of its own
    /// rather than in [`wait`](Self::wait): the descriptor to watch for as long
    /// as the reactors are lent to it, so that a ready socket wakes it, not an
    /// I/O thread. It is readable when one of their sockets is ready or the
    /// wake descriptor is signalled; the thread then serves them with a `wait`
    /// whose timeout is zero. None when the I/O threads serve the sockets (the
    /// thread then watches the wake descriptor alone).
    pub(crate) fn app_fd(&self) -> Option<RawFd> {
        let lent =
            self.inline_io && self.lent.load(Ordering::SeqCst) && !self.stopping.load(Ordering::SeqCst);
        lent.then_some(self.app_fd)
    }

    /// The service is shutting down: the application thread stops serving the
    /// reactors (woken if it waits in them) and waits for the tasks from now
    /// on, so that they can take their reactors and end their sessions.
    pub(crate) fn stop_inline(&self, events: &EventQueue) {
        self.stopping.store(true, Ordering::SeqCst);
        events.interrupt();
        self.release();
    }

    /// The application thread leaves for longer than a round of callbacks:
    /// the I/O threads watch every socket again, now.
    pub(crate) fn release(&self) {
        self.lent.store(false, Ordering::SeqCst);
        for reactor in self.reactors.iter() {
            reactor.watch.arm();
        }
    }

    /// Serves every reactor on this thread until there are events, `deadline`
    /// passes, or the load is more than inline serving should take. Returns
    /// whether the reactors were handed back to their tasks with work (or
    /// could not be taken at all): then their events are still to come.
    fn serve_inline(&self, inline: &mut Inline, events: &EventQueue, deadline: Option<Instant>) -> bool {
        let mut cores = Vec::with_capacity(self.reactors.len());
        for reactor in self.reactors.iter() {
            match reactor.try_core() {
                Some(core) => cores.push(core),
                // A task is serving: its events are on their way. The others
                // stay with their tasks too, so they must be watched again
                // (a previous wait may have lent them).
                None => {
                    drop(cores);
                    self.release();
                    return true;
                }
            }
        }
        for reactor in self.reactors.iter() {
            reactor.watch.take_for_app();
            reactor.mailbox.rings.begin_inline();
        }
        let mut loaded = false;
        // The sockets were asked at least once in this wait: a wait whose
        // deadline has passed (poll(0)) still reads what has arrived.
        let mut looked = false;
        loop {
            // Shutdown: the tasks are to take their reactors and end their sessions.
            if self.stopping.load(Ordering::SeqCst) {
                break;
            }
            let mut ready = 0;
            let now = Instant::now();
            for (core, reactor) in cores.iter_mut().zip(self.reactors.iter()) {
                reactor.mailbox.rings.look_inline();
                core.take_arrivals(&reactor.mailbox);
                core.take_rings(&reactor.mailbox.rings);
                core.sessions.list_due(Tick::from_instant(now));
                ready += core.sessions.ready.len();
            }
            if ready > INLINE_SESSIONS {
                loaded = true;
                break;
            }
            if ready > 0 {
                for core in cores.iter_mut() {
                    core.sessions.serve_listed(SERVES_PER_POLL);
                }
                if events.is_empty() {
                    continue;
                }
                break;
            }
            let passed = deadline.is_some_and(|d| now >= d);
            if !events.is_empty() || (passed && looked) {
                break;
            }
            // Nothing to do: wait for the sockets (at once if some are ready
            // already), the wake descriptor, or the nearest deadline.
            let nearest = cores.iter().filter_map(|core| core.next_deadline()).min();
            let until = match (deadline, nearest) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let timeout = until.map(|until| until.saturating_duration_since(now));
            looked = true;
            if !events.begin_fd_wait() {
                break;
            }
            match &mut cores[..] {
                // One reactor: its own set holds the wake descriptor, so one
                // epoll_wait waits for both and lists the sockets.
                [core] => {
                    core.take_ready_sockets(timeout);
                }
                cores => {
                    inline.wait(timeout);
                    for core in cores.iter_mut() {
                        core.take_ready_sockets(Some(Duration::ZERO));
                    }
                }
            }
            events.end_fd_wait();
        }
        // Its signals are this thread's alone; none may keep the reactors' sets
        // readable once their tasks watch them again.
        events.end_fd_wait();
        let mut owed = Vec::with_capacity(cores.len());
        for (core, reactor) in cores.iter_mut().zip(self.reactors.iter()) {
            let rung = reactor.mailbox.rings.end_inline();
            let task_timer = *reactor.task_timer.lock().unwrap_or_else(|e| e.into_inner());
            let sooner = core.next_deadline().is_some_and(|at| task_timer.is_none_or(|timer| at < timer));
            owed.push(loaded || rung || sooner || !core.sessions.ready.is_empty());
            reactor.watch.lend();
        }
        drop(cores);
        // Woken once their state is free, so they can take it.
        for (reactor, owed) in self.reactors.iter().zip(owed) {
            if owed {
                reactor.mailbox.rings.wake_task();
            }
        }
        loaded
    }
}

/// Adds `fd` to `set` level-triggered (mio only registers edge-triggered): the
/// wake descriptor is reported for as long as it is signalled and not drained,
/// so a look that does not drain it cannot swallow the wakeup of the wait after.
fn watch_level_triggered(set: &mio::Poll, fd: RawFd, token: Token) -> io::Result<()> {
    let mut event = libc::epoll_event { events: libc::EPOLLIN as u32, u64: token.0 as u64 };
    // SAFETY: both descriptors are open; `event` lives through the call.
    let result = unsafe { libc::epoll_ctl(set.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) };
    if result < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

impl Inline {
    /// Blocks until a reactor's set or the wake descriptor is readable, or
    /// `timeout` passes (`None`: no limit).
    fn wait(&mut self, timeout: Option<Duration>) {
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => log::error!(target: "servercore", "inline wait: epoll_wait failed: {error}"),
        }
    }
}

/// What a reactor serves, whoever serves it: its epoll set and its sessions.
struct Core {
    poll: mio::Poll,
    events: Events,
    sessions: Sessions,
    /// Buffers swapped with the mailbox's, so that taking them is one lock.
    rung: Vec<u32>,
    arrivals: Vec<Connection>,
}

/// The sessions of one reactor and what it owes them.
struct Sessions {
    context: Arc<SessionContext>,
    registry: Arc<SessionRegistry>,
    slab: Slab<Box<Connection>>,
    /// One entry per armed deadline; entries whose session moved on are skipped.
    deadlines: BinaryHeap<Reverse<(Tick, usize, SessionId)>>,
    /// Sessions to serve, each once however many times it was rung or reported
    /// ready, in the order they asked. A session that used its turns with work
    /// left goes to the back.
    ready: VecDeque<usize>,
    discard: Box<[u8]>,
}

impl Sessions {
    fn list(&mut self, key: usize) {
        if let Some(connection) = self.slab.get_mut(key)
            && connection.list()
        {
            self.ready.push_back(key);
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
    fn list_due(&mut self, now: Tick) {
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

impl Core {
    fn new(context: Arc<SessionContext>, registry: Arc<SessionRegistry>) -> io::Result<Self> {
        Ok(Self {
            poll: mio::Poll::new()?,
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
        })
    }

    /// Takes in the connections handed over since the last look; each is
    /// served once (a doorbell rung before it arrived is answered then).
    fn take_arrivals(&mut self, mailbox: &Mailbox) {
        if let Some(arrivals) = mailbox.arrivals.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            std::mem::swap(arrivals, &mut self.arrivals);
        }
        for mut connection in self.arrivals.drain(..) {
            let entry = self.sessions.slab.vacant_entry();
            let key = entry.key();
            let registered = self.poll.registry().register(
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

    fn take_rings(&mut self, rings: &RingList) {
        rings.take(&mut self.rung);
        for key in self.rung.drain(..) {
            self.sessions.list(key as usize);
        }
    }

    /// Lists every socket the epoll set reports ready, waiting up to `timeout`
    /// for one (`None`: no limit); returns whether it listed any.
    fn take_ready_sockets(&mut self, timeout: Option<Duration>) -> bool {
        loop {
            match self.poll.poll(&mut self.events, timeout) {
                Ok(()) => break,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    log::error!(target: "servercore", "reactor: epoll_wait failed: {error}");
                    return false;
                }
            }
        }
        let mut listed = false;
        for event in self.events.iter() {
            let key = event.token().0;
            // The application thread's wake descriptor (in a lone reactor's set) is not a socket.
            let Some(connection) = self.sessions.slab.get_mut(key) else { continue };
            listed = true;
            // A closed or failed socket is "ready": the next read or write says how.
            let failed = event.is_error();
            connection.note_ready(
                event.is_readable() || event.is_read_closed() || failed,
                event.is_writable() || event.is_write_closed() || failed,
                event.is_read_closed() || failed,
            );
            self.sessions.list(key);
        }
        listed
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.sessions.deadlines.peek().map(|&Reverse((at, ..))| at.to_instant())
    }

    /// Ends every connection, with `fallback` as the reason of those that
    /// have none of their own.
    fn retire_all(&mut self, fallback: DisconnectReason) {
        let slab = std::mem::take(&mut self.sessions.slab);
        let arrivals = std::mem::take(&mut self.arrivals);
        for mut connection in slab.into_iter().map(|(_, boxed)| *boxed).chain(arrivals) {
            connection.seal(fallback);
            retire(connection, &self.sessions.registry);
        }
        connection::queue_events(&self.sessions.context.events);
    }
}

/// An epoll set holding one other epoll set, the reactor's: what the task
/// watches (through tokio) to learn that the reactor's sockets are ready. It is
/// disarmed while the application thread serves the reactor, and armed again
/// when the task serves, when the application thread leaves, or by the
/// watchdog: one system call, no wakeup.
struct WatchSet {
    fd: OwnedFd,
    watched: RawFd,
    state: Mutex<WatchState>,
}

struct WatchState {
    armed: bool,
    /// When the application thread last handed the reactor back, if it has
    /// not taken it again since and the watch is still disarmed.
    lent_at: Option<Instant>,
}

impl WatchSet {
    fn new(watched: RawFd) -> io::Result<Self> {
        // SAFETY: no pointers; a non-negative result is a new descriptor we own.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let set = Self { fd, watched, state: Mutex::new(WatchState { armed: true, lent_at: None }) };
        set.control(libc::EPOLL_CTL_ADD, Self::ARMED)?;
        Ok(set)
    }

    const ARMED: u32 = (libc::EPOLLIN | libc::EPOLLET) as u32;

    /// The application thread serves the reactor: its readiness no longer reaches the task.
    fn take_for_app(&self) {
        let mut state = self.lock();
        state.lent_at = None;
        if std::mem::take(&mut state.armed) {
            self.set(0);
        }
    }

    /// The application thread handed the reactor back, for now.
    fn lend(&self) {
        let mut state = self.lock();
        if !state.armed {
            state.lent_at = Some(Instant::now());
        }
    }

    /// Readiness reaches the task again; what is ready now is reported at once.
    fn arm(&self) {
        let mut state = self.lock();
        state.lent_at = None;
        if !std::mem::replace(&mut state.armed, true) {
            self.set(Self::ARMED);
        }
    }

    /// Arms the set if the application thread has left the reactor alone
    /// since at least `limit` before `now`.
    fn arm_if_left(&self, now: Instant, limit: Duration) {
        let left = self.lock().lent_at.is_some_and(|at| now.duration_since(at) >= limit);
        if left {
            self.arm();
        }
    }

    /// Takes what the set reports, so that the next readiness is a new edge.
    fn drain(&self) {
        let mut event = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: room for one event; no wait.
        unsafe { libc::epoll_wait(self.fd.as_raw_fd(), &mut event, 1, 0) };
    }

    fn set(&self, events: u32) {
        if let Err(error) = self.control(libc::EPOLL_CTL_MOD, events) {
            log::error!(target: "servercore", "reactor: changing the watch set failed: {error}");
        }
    }

    fn control(&self, op: libc::c_int, events: u32) -> io::Result<()> {
        let mut event = libc::epoll_event { events, u64: 0 };
        // SAFETY: both descriptors are open; `event` lives through the call.
        let result = unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, self.watched, &mut event) };
        if result < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    fn lock(&self) -> MutexGuard<'_, WatchState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Arms the watch sets of reactors the application thread handed back and
/// has left alone for `LEND_LIMIT`: their sockets are never unwatched longer.
async fn watchdog(reactors: Box<[Arc<Reactor>]>) {
    let mut ticks = tokio::time::interval(LEND_LIMIT);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        ticks.tick().await;
        let now = Instant::now();
        for reactor in reactors.iter() {
            reactor.watch.arm_if_left(now, LEND_LIMIT);
        }
    }
}

/// The watch set's descriptor, as tokio sees it.
struct WatchFd(RawFd);

impl AsRawFd for WatchFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// The I/O thread's side of a reactor: a tokio task that serves it when its
/// sockets, its doorbells or its deadlines say so, unless the application
/// thread is serving it.
struct Task {
    // Field order matters: `readiness` deregisters the descriptor before
    // `reactor`, which may be the last owner of its watch set, closes it.
    readiness: AsyncFd<WatchFd>,
    reactor: Arc<Reactor>,
    /// Set to the nearest deadline of any session.
    timer: Pin<Box<Sleep>>,
    timer_at: Option<Instant>,
}

impl Task {
    fn new(reactor: Arc<Reactor>) -> io::Result<Self> {
        let watch = WatchFd(reactor.watch.fd.as_raw_fd());
        // SAFETY: the descriptor belongs to the reactor's watch set, which the
        // task's `reactor` keeps open, unchanged, until after `readiness` is dropped.
        let readiness = unsafe { AsyncFd::register_with_interest(watch, tokio::io::Interest::READABLE)? };
        Ok(Self { readiness, reactor, timer: Box::pin(tokio::time::sleep(Duration::ZERO)), timer_at: None })
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
    /// budget is used up (ready). While the application thread serves the
    /// reactor, waits for it to hand the reactor back.
    fn serve_until_idle(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let reactor = self.reactor.clone();
        let rings = &reactor.mailbox.rings;
        let mut core = match reactor.try_core() {
            Some(core) => core,
            None => {
                // The application thread serves it. Whatever woke us, the task
                // must be registered with every source when it hands back: the
                // rings now, the watch set (disarmed meanwhile) too.
                rings.wait_for_reactor(cx.waker());
                // Disarmed meanwhile, the watch set reports nothing new: a
                // readiness found here is an old one, and clearing it is enough.
                reactor.watch.drain();
                let registered = (0..4).any(|_| self.register_readiness(cx));
                if !registered {
                    // Readiness kept coming: asked to run again rather than
                    // left unregistered with the watch set.
                    cx.waker().wake_by_ref();
                }
                *reactor.task_timer.lock().unwrap_or_else(|e| e.into_inner()) = None;
                match reactor.try_core() {
                    Some(core) => core,
                    None => return Poll::Pending,
                }
            }
        };
        // The task serves: it watches the sockets from now on.
        reactor.watch.arm();
        let mut budget = SERVES_PER_POLL;
        for _ in 0..ROUNDS_PER_POLL {
            rings.start_looking(cx.waker());
            core.take_arrivals(&reactor.mailbox);
            core.take_rings(rings);
            let sockets_ready = self.take_ready_sockets(&mut core, cx);
            let deadline_passed = self.take_deadlines(&mut core, cx);
            if core.sessions.ready.is_empty() && !sockets_ready && !deadline_passed {
                // Every source has the waker: the mailbox, the epoll set, the timer.
                *reactor.task_timer.lock().unwrap_or_else(|e| e.into_inner()) = self.timer_at;
                return Poll::Pending;
            }
            budget -= core.sessions.serve_listed(budget);
            if budget == 0 {
                break;
            }
        }
        Poll::Ready(())
    }

    /// Lists every socket the epoll set reports ready. Returns whether it
    /// reported any; when it has none, tokio has the task's waker for it.
    fn take_ready_sockets(&mut self, core: &mut Core, cx: &mut Context<'_>) -> bool {
        // The epoll set is asked first, not tokio: while the reactor stays busy
        // the runtime polls its own driver only between the reactor's polls,
        // and sockets need not wait for that. Tokio is asked only when the set
        // is empty; a readiness it reports is cleared and the set asked again,
        // so an event between the empty wait and the clear is not lost.
        loop {
            // Drained before the look, never after: a socket that becomes ready
            // after the look must leave the watch set readable for tokio to see.
            self.reactor.watch.drain();
            if core.take_ready_sockets(Some(Duration::ZERO)) {
                return true;
            }
            if self.register_readiness(cx) {
                return false;
            }
        }
    }

    /// Registers the task for the watch set's next readiness; returns false if
    /// it says something became ready meanwhile (look at the sockets again).
    fn register_readiness(&mut self, cx: &mut Context<'_>) -> bool {
        match self.readiness.poll_read_ready(cx) {
            Poll::Pending => true,
            Poll::Ready(Ok(mut guard)) => {
                guard.clear_ready();
                false
            }
            Poll::Ready(Err(error)) => {
                log::error!(target: "servercore", "reactor: waiting for readiness failed: {error}");
                true
            }
        }
    }

    /// Lists the sessions whose deadline passed and sets the timer to the next
    /// one. Returns whether the timer says another has passed already.
    fn take_deadlines(&mut self, core: &mut Core, cx: &mut Context<'_>) -> bool {
        core.sessions.list_due(Tick::now());
        let Some(next) = core.next_deadline() else {
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

impl Drop for Task {
    /// The runtime is shutting down (or the task panicked): every session the
    /// reactor serves or was handed ends here, with the service's stop reason
    /// if it is stopping. Connections handed over later end as they arrive.
    fn drop(&mut self) {
        let mut core = self.reactor.core.lock().unwrap_or_else(|e| e.into_inner());
        let fallback = core.sessions.registry.closed_with().unwrap_or(DisconnectReason::Reset);
        let arrivals = self.reactor.mailbox.arrivals.lock().unwrap_or_else(|e| e.into_inner()).take();
        core.arrivals.extend(arrivals.into_iter().flatten());
        core.retire_all(fallback);
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
        Arc::new(SessionContext::new(SessionConfig::default()).unwrap())
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
        let reactors = Reactors::start(runtime.handle(), 1, true, &context, &registry).unwrap();
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
        let reactors = Reactors::start(runtime.handle(), 2, true, &context(), &registry).unwrap();
        let dealt: Vec<*const Mailbox> = (0..4).map(|_| Arc::as_ptr(reactors.next())).collect();
        assert_ne!(dealt[0], dealt[1]);
        assert_eq!(dealt[0], dealt[2]);
        assert_eq!(dealt[1], dealt[3]);
    }
}
