//! The Python side of dispatch: turns a batch of engine events into callbacks,
//! on the thread that calls `poll()`, under one GIL acquisition.
//!
//! The session objects live here, keyed by session id, from `Connected` to
//! `Disconnected`. The map's lock is only held to look an object up, never while
//! Python runs, so callbacks may freely use `server.sessions`, `send`,
//! `broadcast`, `disconnect` and `stop`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pyo3::exceptions::{PyException, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyType};
use rustc_hash::FxHashMap;

use super::logging;
use super::session::{PyPacketSession, PySession};
use crate::coalesce::WriteBatch;
use crate::config::Framing;
use crate::dispatch::Event;
use crate::reason::DisconnectReason;
use crate::service::ServiceShared;
use crate::session::{SessionHandle, SessionId};

/// How long `poll(None)` waits at a time before it looks for Ctrl-C.
const SIGNAL_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// Events delivered between two wakeups of the writers their callbacks sent to:
/// bounds the latency that coalescing adds to a long batch.
const WRITE_BATCH_EVENTS: usize = 256;

/// One callback of the session class, resolved once per class rather than
/// looked up per packet.
enum Callback {
    /// Not overridden: the base class's no-op (or, for `on_recv`, consume all).
    Default,
    /// A plain function in the class: called as `function(session, *args)`.
    Function(Py<PyAny>),
    /// Anything else (a descriptor of some kind): looked up on each call.
    Attribute(&'static str),
}

impl Callback {
    fn resolve(cls: &Bound<'_, PyType>, name: &'static str, base: &Bound<'_, PyType>) -> PyResult<Self> {
        let py = cls.py();
        let found = py.import("inspect")?.call_method1("getattr_static", (cls, name))?;
        let default = base.getattr("__dict__")?.get_item(name)?;
        if found.is(&default) {
            return Ok(Callback::Default);
        }
        if found.is_instance(&py.import("types")?.getattr("FunctionType")?)? {
            return Ok(Callback::Function(found.unbind()));
        }
        Ok(Callback::Attribute(name))
    }

    fn is_default(&self) -> bool {
        matches!(self, Callback::Default)
    }

    fn call0<'py>(&self, session: &Bound<'py, PyAny>) -> PyResult<()> {
        match self {
            Callback::Default => Ok(()),
            Callback::Function(function) => function.bind(session.py()).call1((session,)).map(drop),
            Callback::Attribute(name) => session.call_method0(*name).map(drop),
        }
    }

    fn call1<'py>(
        &self,
        session: &Bound<'py, PyAny>,
        a: impl IntoPyObject<'py>,
    ) -> PyResult<Bound<'py, PyAny>> {
        match self {
            Callback::Default => Ok(session.py().None().into_bound(session.py())),
            Callback::Function(function) => function.bind(session.py()).call1((session, a)),
            Callback::Attribute(name) => session.call_method1(*name, (a,)),
        }
    }

    fn call2<'py>(
        &self,
        session: &Bound<'py, PyAny>,
        a: impl IntoPyObject<'py>,
        b: impl IntoPyObject<'py>,
    ) -> PyResult<()> {
        match self {
            Callback::Default => Ok(()),
            Callback::Function(function) => function.bind(session.py()).call1((session, a, b)).map(drop),
            Callback::Attribute(name) => session.call_method1(*name, (a, b)).map(drop),
        }
    }
}

/// A session class and its callbacks.
pub struct SessionClass {
    cls: Py<PyType>,
    pub framing: Framing,
    on_connected: Callback,
    on_recv_packet: Callback,
    on_recv: Callback,
    on_send: Callback,
    on_disconnected: Callback,
}

impl SessionClass {
    pub fn inspect(cls: &Bound<'_, PyAny>) -> PyResult<Self> {
        let py = cls.py();
        let not_a_session = || {
            PyTypeError::new_err(format!(
                "the first argument must be a subclass of servercore.PacketSession or servercore.Session, got {}",
                cls.repr().map(|r| r.to_string()).unwrap_or_default()
            ))
        };
        let cls = cls.cast::<PyType>().map_err(|_| not_a_session())?;
        let session_base = py.get_type::<PySession>();
        let packet_base = py.get_type::<PyPacketSession>();
        if !cls.is_subclass(&session_base)? {
            return Err(not_a_session());
        }
        let framing = if cls.is_subclass(&packet_base)? { Framing::Packets } else { Framing::Raw };
        Ok(Self {
            cls: cls.clone().unbind(),
            framing,
            on_connected: Callback::resolve(cls, "on_connected", &session_base)?,
            on_recv_packet: if framing == Framing::Packets {
                Callback::resolve(cls, "on_recv_packet", &packet_base)?
            } else {
                Callback::Default
            },
            on_recv: Callback::resolve(cls, "on_recv", &session_base)?,
            on_send: Callback::resolve(cls, "on_send", &session_base)?,
            on_disconnected: Callback::resolve(cls, "on_disconnected", &session_base)?,
        })
    }

    /// Whether the engine should report completed writes at all.
    pub fn wants_sent_events(&self) -> bool {
        !self.on_send.is_default()
    }

    pub fn name(&self, py: Python<'_>) -> String {
        self.cls.bind(py).qualname().map(|n| n.to_string()).unwrap_or_default()
    }
}

/// A connected session's Python side: 16 bytes, since ten thousand idle
/// players each have one.
struct Entry {
    /// None if the session class raised when it was instantiated.
    object: Option<Py<PyAny>>,
    handle: Arc<SessionHandle>,
}

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
    fn handle(&self) -> &Arc<SessionHandle> {
        &self.current.as_ref().expect("a run is entered before its handle is used").handle
    }

    /// Ends the run: what it delivered no longer holds the session's reader back.
    fn end(&mut self) {
        if let Some(current) = self.current.take() {
            let (bytes, events) = current.received;
            if bytes > 0 || events > 0 {
                current.handle.release_received(bytes, events);
            }
        }
    }
}

/// Events taken from the engine and not yet delivered. A Ctrl-C in the middle
/// of a batch leaves the rest here for the next `poll`.
#[derive(Default)]
struct Delivery {
    pending: VecDeque<Event>,
    incoming: Vec<Event>,
}

pub struct Dispatcher {
    pub class: SessionClass,
    sessions: Mutex<FxHashMap<SessionId, Entry>>,
    /// Raw sessions: the bytes `on_recv` has not consumed yet, kept only while
    /// there are some.
    unconsumed: Mutex<FxHashMap<SessionId, BytesMut>>,
    delivery: Mutex<Delivery>,
    reasons: PyOnceLock<Vec<Py<PyAny>>>,
}

impl Dispatcher {
    pub fn new(class: SessionClass) -> Self {
        Self {
            class,
            sessions: Mutex::new(FxHashMap::default()),
            unconsumed: Mutex::new(FxHashMap::default()),
            delivery: Mutex::new(Delivery::default()),
            reasons: PyOnceLock::new(),
        }
    }

    /// Session objects the application has been told of and not yet said goodbye to.
    pub fn session_objects<'py>(&self, py: Python<'py>) -> Vec<Bound<'py, PyAny>> {
        let sessions = self.lock_sessions();
        let mut entries: Vec<(&SessionId, &Entry)> = sessions.iter().collect();
        entries.sort_by_key(|(id, _)| **id);
        entries.into_iter().filter_map(|(_, e)| e.object.as_ref().map(|o| o.bind(py).clone())).collect()
    }

    pub fn session_count(&self) -> usize {
        self.lock_sessions().values().filter(|e| e.object.is_some()).count()
    }

    /// Waits up to `timeout` (None: until something happens) for events and runs
    /// their callbacks. Returns how many events were delivered.
    pub fn poll(&self, py: Python<'_>, shared: &ServiceShared, timeout: Option<Duration>) -> PyResult<usize> {
        let mut delivery = self.lock_delivery()?;
        if delivery.pending.is_empty() {
            self.wait(py, shared, timeout, &mut delivery)?;
        }
        self.deliver_pending(py, shared, &mut delivery)
    }

    /// Delivers everything the engine still holds, without waiting. Used once
    /// the I/O threads are gone, so every `on_disconnected` arrives.
    pub fn drain(&self, py: Python<'_>, shared: &ServiceShared) -> PyResult<usize> {
        let mut delivery = match self.delivery.try_lock() {
            Ok(delivery) => delivery,
            // Inside a callback: the poll that is running delivers the rest.
            Err(TryLockError::WouldBlock) => return Ok(0),
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
        };
        let mut total = 0;
        loop {
            let Delivery { pending, incoming } = &mut *delivery;
            shared.events.wait(Some(Duration::ZERO), incoming);
            pending.extend(incoming.drain(..));
            if pending.is_empty() {
                return Ok(total);
            }
            total += self.deliver_pending(py, shared, &mut delivery)?;
        }
    }

    fn wait(
        &self,
        py: Python<'_>,
        shared: &ServiceShared,
        timeout: Option<Duration>,
        delivery: &mut Delivery,
    ) -> PyResult<()> {
        let incoming = &mut delivery.incoming;
        match timeout {
            Some(timeout) => {
                py.detach(|| shared.events.wait(Some(timeout), incoming));
            }
            None => loop {
                if py.detach(|| shared.events.wait(Some(SIGNAL_CHECK_INTERVAL), incoming)) > 0 {
                    break;
                }
                py.check_signals()?;
            },
        }
        delivery.pending.extend(delivery.incoming.drain(..));
        Ok(())
    }

    fn deliver_pending(
        &self,
        py: Python<'_>,
        shared: &ServiceShared,
        delivery: &mut Delivery,
    ) -> PyResult<usize> {
        logging::flush(py)?;
        // Answers given by these callbacks leave in one write per session.
        let writes = WriteBatch::begin();
        let mut run = Run::default();
        let (mut delivered, mut flushed_at) = (0, 0);
        while let Some(event) = delivery.pending.pop_front() {
            // What poll() reports: one per connect, packet, write, disconnect.
            delivered += match &event {
                Event::Packets { packets, .. } => packets.len(),
                _ => 1,
            };
            if let Err(error) = self.deliver(py, shared, event, &mut run, &mut delivery.pending) {
                run.end();
                return Err(error);
            }
            if delivered - flushed_at >= WRITE_BATCH_EVENTS {
                run.end();
                writes.flush(delivered - flushed_at);
                flushed_at = delivered;
            }
        }
        run.end();
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
    fn deliver(
        &self,
        py: Python<'_>,
        shared: &ServiceShared,
        event: Event,
        run: &mut Run,
        pending: &mut VecDeque<Event>,
    ) -> PyResult<()> {
        match event {
            Event::Connected(handle) => {
                run.end();
                self.connected(py, handle)
            }
            Event::Packets { session, packets } => {
                let Some(object) = self.receiving(py, run, session, packets.byte_len()) else {
                    return Ok(());
                };
                let object = object.bind(py);
                let handle = run.handle();
                for (delivered, (packet_id, payload)) in packets.iter().enumerate() {
                    // A callback may have closed the session: the rest is not wanted.
                    if !handle.delivers() {
                        shared.count_discarded((packets.len() - delivered) as u64);
                        break;
                    }
                    if self.class.on_recv_packet.is_default() {
                        break;
                    }
                    let payload = PyBytes::new(py, payload);
                    let result = self.class.on_recv_packet.call2(object, packet_id, payload);
                    if let Err(error) = self.check(py, result, handle, "on_recv_packet") {
                        let rest = packets.skip(delivered + 1);
                        if !rest.is_empty() {
                            // Still owed to the reader's backlog: the requeued
                            // rest releases itself (and the event) when delivered.
                            let received = &mut run.current.as_mut().expect("entered").received;
                            received.0 -= rest.byte_len();
                            received.1 -= 1;
                            pending.push_front(Event::Packets { session, packets: rest });
                        }
                        return Err(error);
                    }
                }
                Ok(())
            }
            Event::Received { session, data } => self.received(py, shared, run, session, data),
            Event::Sent { session, nbytes } => {
                let Some(Current { object: Some(object), handle, .. }) = self.enter(py, run, session) else {
                    return Ok(());
                };
                if !handle.delivers() {
                    return Ok(());
                }
                let object = object.clone_ref(py);
                let result = self.class.on_send.call1(object.bind(py), nbytes).map(drop);
                self.check(py, result, run.handle(), "on_send")
            }
            Event::Disconnected { session, reason } => {
                run.end();
                self.lock_unconsumed().remove(&session);
                let entry = self.lock_sessions().remove(&session);
                let Some(Entry { object: Some(object), handle, .. }) = entry else { return Ok(()) };
                let reason = self.reason(py, reason)?;
                let result = self.class.on_disconnected.call1(object.bind(py), reason).map(drop);
                self.check(py, result, &handle, "on_disconnected")
            }
        }
    }

    /// Makes `session` the current run's session, looking it up only if the run
    /// was another's.
    fn enter<'r>(&self, py: Python<'_>, run: &'r mut Run, session: SessionId) -> Option<&'r Current> {
        if run.current.as_ref().is_none_or(|current| current.id != session) {
            run.end();
            let sessions = self.lock_sessions();
            let entry = sessions.get(&session)?;
            run.current = Some(Current {
                id: session,
                object: entry.object.as_ref().map(|o| o.clone_ref(py)),
                handle: entry.handle.clone(),
                received: (0, 0),
            });
        }
        run.current.as_ref()
    }

    fn connected(&self, py: Python<'_>, handle: Arc<SessionHandle>) -> PyResult<()> {
        let created = self.class.cls.bind(py).call0().and_then(|object| {
            let session = object.cast::<PySession>().map_err(|_| {
                PyTypeError::new_err(format!("{}() did not return a Session", self.class.name(py)))
            })?;
            session.get().attach(handle.clone());
            Ok(object)
        });
        let object = created.as_ref().ok().map(|object| object.clone().unbind());
        let entry = Entry { object, handle: handle.clone() };
        self.lock_sessions().insert(handle.id(), entry);
        match created {
            Ok(object) => {
                handle.mark_announced();
                let result = self.class.on_connected.call0(&object);
                self.check(py, result, &handle, "on_connected")
            }
            Err(error) => self.check::<()>(py, Err(error), &handle, "__init__"),
        }
    }

    /// Books a received event of `len` bytes as delivered, and returns its
    /// session's object (which decides, by `delivers()`, what it still wants).
    fn receiving(&self, py: Python<'_>, run: &mut Run, session: SessionId, len: usize) -> Option<Py<PyAny>> {
        self.enter(py, run, session)?;
        let current = run.current.as_mut()?;
        current.received.0 += len;
        current.received.1 += 1;
        current.object.as_ref().map(|o| o.clone_ref(py))
    }

    fn received(
        &self,
        py: Python<'_>,
        shared: &ServiceShared,
        run: &mut Run,
        session: SessionId,
        data: Bytes,
    ) -> PyResult<()> {
        let Some(object) = self.receiving(py, run, session, data.len()) else { return Ok(()) };
        let handle = run.handle().clone();
        if !handle.delivers() {
            shared.count_discarded(1);
            return Ok(());
        }
        let mut unconsumed = self.lock_unconsumed().remove(&session).unwrap_or_default();
        unconsumed.extend_from_slice(&data);
        let consumed = match &self.class.on_recv {
            Callback::Default => unconsumed.len(),
            on_recv => {
                let shown = PyBytes::new(py, &unconsumed);
                let result = on_recv.call1(object.bind(py), shown).and_then(|consumed| {
                    let consumed: usize = consumed.extract().map_err(|_| {
                        PyTypeError::new_err(format!(
                            "on_recv must return how many bytes it consumed (0..{}), got {}",
                            unconsumed.len(),
                            consumed.repr().map(|r| r.to_string()).unwrap_or_default()
                        ))
                    })?;
                    if consumed > unconsumed.len() {
                        return Err(PyValueError::new_err(format!(
                            "on_recv returned {consumed}, but only {} bytes were given",
                            unconsumed.len()
                        )));
                    }
                    Ok(consumed)
                });
                match result {
                    Ok(consumed) => consumed,
                    Err(error) => return self.check::<()>(py, Err(error), &handle, "on_recv"),
                }
            }
        };
        let _ = unconsumed.split_to(consumed);
        let max = handle.max_packet_size();
        if unconsumed.len() > max {
            log::warn!(
                target: "servercore",
                "session {} ({}): on_recv left {} bytes unconsumed, over max_packet_size {max}",
                handle.id(),
                handle.peer(),
                unconsumed.len()
            );
            handle.close(DisconnectReason::PacketTooLarge);
            return Ok(());
        }
        if !unconsumed.is_empty() && handle.delivers() {
            self.lock_unconsumed().insert(session, unconsumed);
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
        let Err(error) = result else { return Ok(()) };
        if !error.is_instance_of::<PyException>(py) {
            return Err(error);
        }
        logging::flush(py)?;
        let closes = callback != "on_disconnected";
        let message = format!(
            "{}.{callback} raised in session {} ({}){}",
            self.class.name(py),
            handle.id(),
            handle.peer(),
            if closes { "; disconnecting it with CALLBACK_ERROR" } else { "" }
        );
        let kwargs = PyDict::new(py);
        kwargs.set_item("exc_info", error.into_value(py))?;
        logging::logger(py)?.call_method(intern!(py, "error"), (message,), Some(&kwargs))?;
        if closes {
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

    fn lock_sessions(&self) -> MutexGuard<'_, FxHashMap<SessionId, Entry>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_unconsumed(&self) -> MutexGuard<'_, FxHashMap<SessionId, BytesMut>> {
        self.unconsumed.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_delivery(&self) -> PyResult<MutexGuard<'_, Delivery>> {
        match self.delivery.try_lock() {
            Ok(delivery) => Ok(delivery),
            Err(TryLockError::Poisoned(e)) => Ok(e.into_inner()),
            Err(TryLockError::WouldBlock) => Err(PyRuntimeError::new_err(
                "poll() is already running: callbacks must not call poll() or run_forever(), \
                 and only one thread may poll a service",
            )),
        }
    }
}
