//! Engine events turned into callbacks, on the thread that polls, under one
//! GIL acquisition per batch.
//!
//! The session objects live in the engine's [`Inbox`], keyed by session id,
//! from `Connected` to `Disconnected`. Its lock is only held to look an object
//! up, never while Python runs, so callbacks may freely use `server.sessions`,
//! `send`, `broadcast`, `disconnect` and `stop`.
//!
//! An `async def` callback returns a coroutine. Under an asyncio loop the
//! dispatcher hands it to the loop's driver (`servercore/_aio.py`) as a task
//! and the session waits for it: its later events are parked, in order, and
//! delivered when the task has finished (`resume`), so packet n+1's handler
//! starts after packet n's has ended and `on_disconnected` comes last. Parked
//! packets still weigh on the session's reader backlog: past
//! `max_pending_recv_bytes` the reader stops and TCP slows that peer alone.
//! Under `poll()` there is no loop to run it: the coroutine is closed and
//! the session ends with CALLBACK_ERROR.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::pyclass::{PyTraverseError, PyVisit};
use pyo3::sync::PyOnceLock;
use pyo3::types::PyBytes;
use rustc_hash::FxHashMap;

use super::logging;
use super::router;
use super::scheduler::Scheduler;
use super::session_class::{SessionClass, callback};
use crate::coalesce::WriteBatch;
use crate::events::Event;
use crate::frame::PacketRun;
use crate::inbox::Inbox;
use crate::reason::DisconnectReason;
use crate::service::ServiceShared;
use crate::session::{SessionHandle, SessionId};

/// The longest a wait for events goes without looking for Ctrl-C.
const SIGNAL_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// Events delivered between two wakeups of the writers their callbacks sent to:
/// bounds the latency that coalescing adds to a long batch.
const WRITE_BATCH_EVENTS: usize = 256;

/// What the dispatcher keeps per session: its object (None if the session
/// class raised when it was called), 8 bytes beside the engine's handle.
type SessionInbox = Inbox<Option<Py<PyAny>>>;

/// The session whose events are being delivered. A read's worth of packets
/// from one session arrives as a run of consecutive events: the run looks the
/// session up once, and gives the reader back its backlog once.
#[derive(Default)]
struct Run {
    current: Option<Current>,
}

struct Current {
    id: SessionId,
    object: Option<Py<PyAny>>,
    handle: Arc<SessionHandle>,
    /// Bytes and events received in this run, not yet released to the reader.
    received: (usize, usize),
}

impl Run {
    /// The undelivered rest of the current run's packet event, to be delivered
    /// later: it stays owed to the reader's backlog until then (its later
    /// delivery books it again). `None` if nothing is left.
    fn give_back(&mut self, rest: PacketRun) -> Option<PacketRun> {
        if rest.is_empty() {
            return None;
        }
        let received = &mut self.current.as_mut().expect("a packet run is being delivered").received;
        received.0 -= rest.byte_len();
        received.1 -= 1;
        Some(rest)
    }

    /// Ends the run: what it delivered no longer holds the session's reader back.
    fn end(&mut self) {
        if let Some(current) = self.current.take() {
            let (bytes, events) = current.received;
            if bytes > 0 || events > 0 {
                SessionInbox::release(&current.handle, bytes, events);
            }
        }
    }
}

/// A session whose async callback is running: its later events wait here.
struct Awaiting {
    handle: Arc<SessionHandle>,
    parked: VecDeque<Event>,
    /// `on_connected` is the callback: the session is announced (receives
    /// broadcasts) once it has finished.
    announce: bool,
}

/// Events taken from the engine and not yet delivered. A Ctrl-C in the middle
/// of a batch leaves the rest here for the next `poll`.
#[derive(Default)]
pub struct Delivery {
    pending: VecDeque<Event>,
    incoming: Vec<Event>,
    /// Sessions waiting for an async callback (only ever under asyncio).
    awaiting: FxHashMap<SessionId, Awaiting>,
}

impl Delivery {
    /// Whether some session still waits for an async callback to finish.
    pub fn awaits_callbacks(&self) -> bool {
        !self.awaiting.is_empty()
    }
}

/// One delivery's state: the session run, what is left to deliver, and who
/// runs async callbacks (the asyncio driver; none under `poll()`).
struct Turn<'a, 'py> {
    run: Run,
    pending: &'a mut VecDeque<Event>,
    awaiting: &'a mut FxHashMap<SessionId, Awaiting>,
    runner: Option<&'a Bound<'py, PyAny>>,
}

impl Delivery {
    fn take_incoming(&mut self) {
        self.pending.extend(self.incoming.drain(..));
    }
}

pub struct Dispatcher {
    class: SessionClass,
    shared: Arc<ServiceShared>,
    inbox: Mutex<SessionInbox>,
    /// Raw sessions: the bytes `on_recv` has not consumed yet, kept only while
    /// there are some.
    unconsumed: Mutex<FxHashMap<SessionId, BytesMut>>,
    delivery: Mutex<Delivery>,
    reasons: PyOnceLock<Vec<Py<PyAny>>>,
    /// Timers and posted calls, run in the same deliveries as the callbacks.
    jobs: Arc<Scheduler>,
}

impl Dispatcher {
    pub fn new(class: SessionClass, shared: Arc<ServiceShared>, jobs: Arc<Scheduler>) -> Self {
        Self {
            class,
            inbox: Mutex::new(shared.inbox()),
            shared,
            jobs,
            unconsumed: Mutex::new(FxHashMap::default()),
            delivery: Mutex::new(Delivery::default()),
            reasons: PyOnceLock::new(),
        }
    }

    /// Session objects the application has been told of and not yet said goodbye to.
    pub fn session_objects<'py>(&self, py: Python<'py>) -> Vec<Bound<'py, PyAny>> {
        let inbox = self.lock_inbox();
        let mut known: Vec<_> = inbox.iter().filter_map(|(id, k)| Some((*id, k.state.as_ref()?))).collect();
        known.sort_by_key(|(id, _)| *id);
        known.into_iter().map(|(_, object)| object.bind(py).clone()).collect()
    }

    pub fn session_count(&self) -> usize {
        self.lock_inbox().iter().filter(|(_, k)| k.state.is_some()).count()
    }

    /// The right to deliver: one thread at a time, and never from inside a
    /// callback (which would deliver events out of order).
    pub fn begin_delivery(&self) -> PyResult<MutexGuard<'_, Delivery>> {
        match self.delivery.try_lock() {
            Ok(delivery) => Ok(delivery),
            Err(TryLockError::Poisoned(e)) => Ok(e.into_inner()),
            Err(TryLockError::WouldBlock) => Err(PyRuntimeError::new_err(
                "poll() is already running: callbacks must not call poll() or run_forever(), \
                 and only one thread may poll a service",
            )),
        }
    }

    /// The right to deliver if nobody holds it; `None` while a poll runs.
    pub fn try_begin_delivery(&self) -> Option<MutexGuard<'_, Delivery>> {
        match self.delivery.try_lock() {
            Ok(delivery) => Some(delivery),
            Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// Waits, without the GIL, until the poll running on another thread ends.
    pub fn wait_for_delivery_to_end(&self, py: Python<'_>) {
        py.detach(|| drop(self.delivery.lock()));
    }

    /// Waits up to `timeout` (None: until something happens, or `give_up`
    /// says to stop waiting) for events and runs their callbacks. Ctrl-C is
    /// noticed within 100 ms however long the wait. Returns how many events
    /// were delivered.
    pub fn poll(
        &self,
        py: Python<'_>,
        delivery: &mut Delivery,
        timeout: Option<Duration>,
        give_up: impl Fn() -> bool,
    ) -> PyResult<usize> {
        if delivery.pending.is_empty() {
            self.wait(py, delivery, timeout, give_up)?;
        }
        let ran = self.jobs.run_due(py)?;
        Ok(ran + self.deliver_pending(py, delivery, None)?)
    }

    /// Delivers what is pending and what the engine holds now, without
    /// waiting: an asyncio loop's turn. At light load that serves the
    /// reactors' ready sockets first, on this thread, as a `poll(0)` does.
    pub fn deliver_ready(
        &self,
        py: Python<'_>,
        delivery: &mut Delivery,
        runner: &Bound<'_, PyAny>,
    ) -> PyResult<usize> {
        let mut delivered = self.jobs.run_due(py)?;
        // A second round if the first found events while the I/O threads
        // served the sockets: its look, with nothing queued, is what hands the
        // sockets to this thread at light load (then the loop watches them).
        for _ in 0..2 {
            let incoming = &mut delivery.incoming;
            let taken = py.detach(|| self.shared.wait_events_in_poll(Some(Duration::ZERO), incoming));
            delivery.take_incoming();
            delivered += self.deliver_pending(py, delivery, Some(runner))?;
            if taken == 0 || self.shared.sockets_lent() {
                break;
            }
        }
        Ok(delivered)
    }

    /// An async callback of `session` has ended (`error`: what it raised, if
    /// anything): its session's parked events are delivered, up to the next
    /// async callback.
    pub fn resume(
        &self,
        py: Python<'_>,
        delivery: &mut Delivery,
        runner: &Bound<'_, PyAny>,
        session: SessionId,
        callback: &str,
        error: Option<PyErr>,
    ) -> PyResult<usize> {
        let Some(awaiting) = delivery.awaiting.remove(&session) else { return Ok(0) };
        if let Some(error) = error {
            self.check::<()>(py, Err(error), &awaiting.handle, callback)?;
        }
        if awaiting.announce {
            SessionInbox::announce(&awaiting.handle);
        }
        // Older than anything still pending for this session.
        for event in awaiting.parked.into_iter().rev() {
            delivery.pending.push_front(event);
        }
        self.deliver_pending(py, delivery, Some(runner))
    }

    /// Delivers everything the engine holds, without waiting.
    pub fn drain(
        &self,
        py: Python<'_>,
        delivery: &mut Delivery,
        runner: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<usize> {
        let mut total = 0;
        loop {
            self.shared.take_events(&mut delivery.incoming);
            delivery.take_incoming();
            // Calls posted before the stop still run, before the last on_disconnected.
            let ran = self.jobs.run_due(py)?;
            if delivery.pending.is_empty() && ran == 0 {
                return Ok(total);
            }
            total += ran + self.deliver_pending(py, delivery, runner)?;
        }
    }

    fn wait(
        &self,
        py: Python<'_>,
        delivery: &mut Delivery,
        timeout: Option<Duration>,
        give_up: impl Fn() -> bool,
    ) -> PyResult<()> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        loop {
            let slice = match deadline {
                Some(deadline) => {
                    deadline.saturating_duration_since(Instant::now()).min(SIGNAL_CHECK_INTERVAL)
                }
                None => SIGNAL_CHECK_INTERVAL,
            };
            // Until the next timer or posted call, at most.
            let slice = self.jobs.wait_limit(Some(slice));
            let incoming = &mut delivery.incoming;
            if py.detach(|| self.shared.wait_events_in_poll(slice, incoming)) > 0 {
                break;
            }
            let now = Instant::now();
            if self.jobs.is_due(now) || deadline.is_some_and(|deadline| now >= deadline) || give_up() {
                break;
            }
            py.check_signals()?;
        }
        delivery.take_incoming();
        Ok(())
    }

    fn deliver_pending(
        &self,
        py: Python<'_>,
        delivery: &mut Delivery,
        runner: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<usize> {
        logging::flush(py)?;
        // Answers given by these callbacks leave in one write per session (or,
        // in a batch of a few packets, each at once).
        let packets = delivery.pending.iter().map(|event| match event {
            Event::Packets { packets, .. } => packets.len(),
            _ => 1,
        });
        let writes = WriteBatch::begin(packets.sum());
        let mut turn = Turn {
            run: Run::default(),
            pending: &mut delivery.pending,
            awaiting: &mut delivery.awaiting,
            runner,
        };
        let (mut delivered, mut flushed_at) = (0, 0);
        while let Some(event) = turn.pending.pop_front() {
            // What poll() reports: one per connect, packet, write, disconnect.
            delivered += match &event {
                Event::Packets { packets, .. } => packets.len(),
                _ => 1,
            };
            if let Err(error) = self.deliver(py, event, &mut turn) {
                turn.run.end();
                return Err(error);
            }
            if delivered - flushed_at >= WRITE_BATCH_EVENTS {
                turn.run.end();
                writes.flush(delivered - flushed_at);
                flushed_at = delivered;
            }
        }
        turn.run.end();
        // A batch that needed an intermediate flush was not light, whatever its tail.
        writes.flush(if flushed_at > 0 { WRITE_BATCH_EVENTS } else { delivered });
        drop(writes);
        logging::flush(py)?;
        Ok(delivered)
    }

    /// Runs one event's callback. Only a BaseException that is not an Exception
    /// (KeyboardInterrupt, SystemExit) comes back as an error: it stops `poll`.
    /// An error in the middle of a packet run puts the rest of the run back
    /// at the front of `pending`, for the next `poll`.
    fn deliver(&self, py: Python<'_>, event: Event, turn: &mut Turn<'_, '_>) -> PyResult<()> {
        if let Some(awaiting) = turn.awaiting.get_mut(&event.session_id()) {
            // Its async callback is still running: this waits its turn.
            awaiting.parked.push_back(event);
            return Ok(());
        }
        match event {
            Event::Connected { session } => {
                turn.run.end();
                self.connected(py, session, turn)
            }
            Event::Packets { session, packets } => {
                let Some(current) = self.receiving(py, &mut turn.run, session, packets.byte_len()) else {
                    self.lock_inbox().discard(packets.len() as u64, packets.byte_len(), 1);
                    return Ok(());
                };
                let Some(object) = current.object.as_ref().map(|o| o.clone_ref(py)) else { return Ok(()) };
                let object = object.bind(py);
                let handle = current.handle.clone();
                for (delivered, (packet_id, payload)) in packets.iter().enumerate() {
                    // A callback may have closed the session: the rest is not wanted.
                    if !handle.delivers() {
                        self.shared.count_discarded((packets.len() - delivered) as u64);
                        break;
                    }
                    let returned = if self.class.routes {
                        router::route(object, &handle, packet_id, payload)
                    } else {
                        callback::on_recv_packet(object, packet_id, PyBytes::new(py, payload))
                    };
                    let returned = match returned {
                        Ok(returned) => returned,
                        Err(error) => {
                            // Only a KeyboardInterrupt or SystemExit comes back from
                            // `check`; the rest of the run is then for the next poll.
                            let result = self.check::<()>(py, Err(error), &handle, "on_recv_packet");
                            if result.is_err()
                                && let Some(rest) = turn.run.give_back(packets.skip(delivered + 1))
                            {
                                turn.pending.push_front(Event::Packets { session, packets: rest });
                            }
                            return result;
                        }
                    };
                    if let Some(coroutine) = callback::awaitable(returned)
                        && self.spawn(py, turn, coroutine, &handle, "on_recv_packet", false)?
                    {
                        // The rest of the read waits for this packet's handler.
                        if let Some(rest) = turn.run.give_back(packets.skip(delivered + 1)) {
                            let awaiting = turn.awaiting.get_mut(&session).expect("just spawned");
                            awaiting.parked.push_back(Event::Packets { session, packets: rest });
                        }
                        return Ok(());
                    }
                }
                Ok(())
            }
            Event::Received { session, data } => self.received(py, &mut turn.run, session, data),
            Event::Sent { session, nbytes } => {
                // Reported for every write, also after a local close: the sum
                // of on_send is what the kernel took.
                let Some(Current { object: Some(object), handle, .. }) =
                    self.enter(py, &mut turn.run, session)
                else {
                    return Ok(());
                };
                let (object, handle) = (object.clone_ref(py), handle.clone());
                match callback::on_send(object.bind(py), nbytes) {
                    Ok(returned) => self.await_if_async(py, turn, returned, &handle, "on_send"),
                    Err(error) => self.check::<()>(py, Err(error), &handle, "on_send"),
                }
            }
            Event::Disconnected { session, reason } => {
                turn.run.end();
                self.lock_unconsumed().remove(&session);
                let known = self.lock_inbox().remove(session);
                let Some(known) = known else { return Ok(()) };
                let Some(object) = known.state else { return Ok(()) };
                let reason = self.reason(py, reason)?;
                match callback::on_disconnected(object.bind(py), reason) {
                    // Nothing comes after it; the driver awaits its task at shutdown.
                    Ok(returned) => self.await_if_async(py, turn, returned, &known.handle, "on_disconnected"),
                    Err(error) => self.check::<()>(py, Err(error), &known.handle, "on_disconnected"),
                }
            }
        }
    }

    /// What a callback returned: a coroutine is spawned (and its session
    /// waits for it), anything else is ignored.
    fn await_if_async(
        &self,
        py: Python<'_>,
        turn: &mut Turn<'_, '_>,
        returned: Bound<'_, PyAny>,
        handle: &Arc<SessionHandle>,
        callback: &str,
    ) -> PyResult<()> {
        match callback::awaitable(returned) {
            Some(coroutine) => self.spawn(py, turn, coroutine, handle, callback, false).map(drop),
            None => Ok(()),
        }
    }

    /// Hands an async callback's coroutine to the asyncio driver as a task;
    /// its session waits for it (see the module docs). Returns whether it
    /// was spawned: under `poll()` there is no loop, and the session ends
    /// with CALLBACK_ERROR.
    fn spawn(
        &self,
        py: Python<'_>,
        turn: &mut Turn<'_, '_>,
        coroutine: Bound<'_, PyAny>,
        handle: &Arc<SessionHandle>,
        callback: &str,
        announce: bool,
    ) -> PyResult<bool> {
        let spawned = match turn.runner {
            Some(runner) => runner.call_method1(intern!(py, "_spawn"), (&coroutine, handle.id().0, callback)),
            None => {
                // Never to be awaited: closed, so that Python does not warn about it too.
                let _ = coroutine.call_method0(intern!(py, "close"));
                Err(PyTypeError::new_err(format!(
                    "{callback} returned a coroutine: async callbacks run only while an asyncio loop \
                     drives the service (await server.serve_forever(), or async with), not under poll()"
                )))
            }
        };
        match spawned {
            Ok(_) => {
                let awaiting = Awaiting { handle: handle.clone(), parked: VecDeque::new(), announce };
                turn.awaiting.insert(handle.id(), awaiting);
                Ok(true)
            }
            Err(error) => self.check::<()>(py, Err(error), handle, callback).map(|()| false),
        }
    }

    /// `Connected`: the session object is made and its `on_connected` runs;
    /// only then does the session receive broadcasts, so whatever
    /// `on_connected` sent comes first (an async one's: once it has finished).
    /// A session that closed before this look is never announced.
    fn connected(&self, py: Python<'_>, session: SessionId, turn: &mut Turn<'_, '_>) -> PyResult<()> {
        let Some(handle) = self.lock_inbox().connected(session) else { return Ok(()) };
        let created = self.class.instantiate(py).inspect(|object| object.get().attach(handle.clone()));
        let object = created.as_ref().ok().map(|object| object.clone().into_any().unbind());
        self.lock_inbox().admit(handle.clone(), object);
        let outcome = match created {
            Ok(object) => match callback::on_connected(object.as_any()) {
                Ok(returned) => match callback::awaitable(returned) {
                    Some(coroutine) => {
                        if self.spawn(py, turn, coroutine, &handle, "on_connected", true)? {
                            // Announced by `resume`, once it has finished.
                            return Ok(());
                        }
                        Ok(())
                    }
                    None => Ok(()),
                },
                Err(error) => self.check::<()>(py, Err(error), &handle, "on_connected"),
            },
            Err(error) => self.check::<()>(py, Err(error), &handle, "__init__"),
        };
        SessionInbox::announce(&handle);
        outcome
    }

    /// Makes `session` the current run's session, looking it up only if the run
    /// was another's. `None` if the application never knew it.
    fn enter<'r>(&self, py: Python<'_>, run: &'r mut Run, session: SessionId) -> Option<&'r Current> {
        if run.current.as_ref().is_none_or(|current| current.id != session) {
            run.end();
            let inbox = self.lock_inbox();
            let known = inbox.get(session)?;
            run.current = Some(Current {
                id: session,
                object: known.state.as_ref().map(|o| o.clone_ref(py)),
                handle: known.handle.clone(),
                received: (0, 0),
            });
        }
        run.current.as_ref()
    }

    /// Books a received event of `len` bytes as delivered, to be released
    /// when the run ends; the run's session, if the application knows it.
    fn receiving<'r>(
        &self,
        py: Python<'_>,
        run: &'r mut Run,
        session: SessionId,
        len: usize,
    ) -> Option<&'r Current> {
        self.enter(py, run, session)?;
        let current = run.current.as_mut()?;
        current.received.0 += len;
        current.received.1 += 1;
        Some(current)
    }

    fn received(&self, py: Python<'_>, run: &mut Run, session: SessionId, data: Bytes) -> PyResult<()> {
        let Some(current) = self.receiving(py, run, session, data.len()) else {
            self.lock_inbox().discard(0, data.len(), 1);
            return Ok(());
        };
        let handle = current.handle.clone();
        let Some(object) = current.object.as_ref().map(|o| o.clone_ref(py)) else { return Ok(()) };
        if !handle.delivers() {
            self.shared.count_discarded(1);
            return Ok(());
        }
        // What on_recv left last time, then the new bytes, in one `bytes`:
        // copied once from the engine's buffers, and only the part left
        // unconsumed again is kept.
        let leftover = self.lock_unconsumed().remove(&session);
        let shown = match &leftover {
            None => PyBytes::new(py, &data),
            Some(left) => PyBytes::new_with(py, left.len() + data.len(), |buf| {
                buf[..left.len()].copy_from_slice(left);
                buf[left.len()..].copy_from_slice(&data);
                Ok(())
            })?,
        };
        let total = shown.as_bytes().len();
        let consumed = callback::on_recv(object.bind(py), shown.clone()).and_then(|consumed| {
            let consumed: usize = consumed.extract().map_err(|_| {
                PyTypeError::new_err(format!(
                    "on_recv must return how many bytes it consumed (0..{total}), got {}",
                    consumed.repr().map(|r| r.to_string()).unwrap_or_default()
                ))
            })?;
            if consumed > total {
                return Err(PyValueError::new_err(format!(
                    "on_recv returned {consumed}, but only {total} bytes were given"
                )));
            }
            Ok(consumed)
        });
        let consumed = match consumed {
            Ok(consumed) => consumed,
            Err(error) => return self.check::<()>(py, Err(error), &handle, "on_recv"),
        };
        let left = total - consumed;
        let max = handle.max_packet_size();
        if left > max {
            log::warn!(
                target: "servercore",
                "session {} ({}): on_recv left {left} bytes unconsumed, over max_packet_size {max}",
                handle.id(),
                handle.peer()
            );
            handle.close(DisconnectReason::PacketTooLarge);
            return Ok(());
        }
        if left > 0 && handle.delivers() {
            let rest = BytesMut::from(&shown.as_bytes()[consumed..]);
            self.lock_unconsumed().insert(session, rest);
        }
        Ok(())
    }

    /// A callback's outcome: an Exception is logged with its traceback and costs
    /// its session (CALLBACK_ERROR); KeyboardInterrupt and SystemExit go on up.
    fn check<T>(
        &self,
        py: Python<'_>,
        result: PyResult<T>,
        handle: &SessionHandle,
        callback: &str,
    ) -> PyResult<()> {
        let closes = callback != "on_disconnected";
        let raised = logging::log_exception(py, result, || {
            format!(
                "{}.{callback} raised in session {} ({}){}",
                self.class.name(py),
                handle.id(),
                handle.peer(),
                if closes { "; disconnecting it with CALLBACK_ERROR" } else { "" }
            )
        })?;
        if raised && closes {
            handle.close(DisconnectReason::CallbackError);
        }
        Ok(())
    }

    /// The `DisconnectReason` enum member for `reason`.
    fn reason<'py>(&self, py: Python<'py>, reason: DisconnectReason) -> PyResult<Bound<'py, PyAny>> {
        let members = self.reasons.get_or_try_init(py, || -> PyResult<_> {
            let enum_type = py.import("servercore._reason")?.getattr("DisconnectReason")?;
            DisconnectReason::ALL.iter().map(|r| Ok(enum_type.call1((r.code(),))?.unbind())).collect()
        })?;
        Ok(members[usize::from(reason.code() - 1)].bind(py).clone())
    }

    /// For the garbage collector: the session objects this service holds.
    pub fn traverse(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        // A collection that runs while the inbox is locked skips it: it is
        // locked only for a lookup, never across Python code that could drop
        // the last outside reference.
        if let Ok(inbox) = self.inbox.try_lock() {
            for (_, known) in inbox.iter() {
                visit.call(&known.state)?;
            }
        }
        self.jobs.traverse(visit)?;
        visit.call(self.class.cls())
    }

    /// Forgets every session object: the service is being collected.
    pub fn forget_sessions(&self) -> Vec<Py<PyAny>> {
        self.lock_inbox().clear().into_iter().filter_map(|known| known.state).collect()
    }

    fn lock_inbox(&self) -> MutexGuard<'_, SessionInbox> {
        self.inbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_unconsumed(&self) -> MutexGuard<'_, FxHashMap<SessionId, BytesMut>> {
        self.unconsumed.lock().unwrap_or_else(|e| e.into_inner())
    }
}
