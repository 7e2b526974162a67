//! `Server` and `Client`, and `Service`, the base that holds what they share:
//! poll, run_forever, stop, broadcast, sessions, stats.
//!
//! Which thread runs callbacks: only the one inside `poll()` or
//! `run_forever()`, the polling thread. `stop()` shuts the engine down on
//! whichever thread calls it (sessions flush and close; no callback runs
//! meanwhile except on the polling thread), then the `on_disconnected` calls
//! that are left are delivered:
//!
//! - by `stop()` itself, if it is called on the thread that polls (or no thread
//!   ever polled);
//! - by the poll running on another thread, which `stop()` waits for: a
//!   `run_forever()` there delivers them and returns;
//! - by the next `poll()` of the polling thread, if it is between polls when
//!   another thread calls `stop()`; `running` stays True until then.
//!
//! A service collected while it runs warns (ResourceWarning) and shuts its
//! engine down on a thread of its own, never blocking with the GIL held.

use std::ffi::CString;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::ThreadId;

use pyo3::exceptions::{PyOSError, PyResourceWarning, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::pyclass::{PyTraverseError, PyVisit};
use pyo3::types::PyDict;

use super::dispatcher::{Delivery, Dispatcher};
use super::logging;
use super::options::{self, Port, Role, SessionCount};
use super::send_buffer::bytes_from_args;
use super::session::PySession;
use super::session_class::SessionClass;
use crate::config::{ServiceConfig, limits};
use crate::reason::DisconnectReason;
use crate::service::{self, ServiceShared};
use crate::session::SessionId;

/// The running engine a `Server` or `Client` owns once started.
enum Engine {
    Server(service::Server),
    Client(service::Client),
}

impl Engine {
    fn service_mut(&mut self) -> &mut service::Service {
        match self {
            Engine::Server(server) => server.service_mut(),
            Engine::Client(client) => client.service_mut(),
        }
    }
}

/// Where a service is in its life; it only moves forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
enum Phase {
    New = 0,
    Running = 1,
    /// `stop()` is shutting the engine down: sessions flush and close.
    Stopping = 2,
    /// The engine is down and every `Disconnected` is queued; some may not be
    /// delivered yet.
    Stopped = 3,
    /// Everything is delivered.
    Finished = 4,
}

/// What exists once the service has started.
struct Started {
    shared: Arc<ServiceShared>,
    dispatcher: Dispatcher,
    local_addr: Option<SocketAddr>,
}

/// The base of `Server` and `Client` (the lecture's `Service`).
#[pyclass(subclass, frozen, name = "Service", module = "servercore._core")]
pub struct PyService {
    class: SessionClass,
    config: ServiceConfig,
    address: (String, u16),
    started: OnceLock<Started>,
    engine: Mutex<Option<Engine>>,
    phase: AtomicU8,
    /// Signalled when the phase moves on: a second `stop()` waits for the first.
    phase_changed: (Mutex<()>, Condvar),
    /// The thread that last entered `poll()` or `run_forever()`.
    poller: Mutex<Option<ThreadId>>,
    stop_reason: DisconnectReason,
}

impl PyService {
    fn new(
        session_class: &Bound<'_, PyAny>,
        host: String,
        port: u16,
        options: Option<&Bound<'_, PyDict>>,
        role: Role,
    ) -> PyResult<Self> {
        let class = SessionClass::inspect(session_class)?;
        let mut config = options::service_config(options, role)?;
        config.session.framing = class.framing;
        config.session.report_sent = class.reports_sent;
        Ok(Self {
            class,
            config,
            address: (host, port),
            started: OnceLock::new(),
            engine: Mutex::new(None),
            phase: AtomicU8::new(Phase::New as u8),
            phase_changed: (Mutex::new(()), Condvar::new()),
            poller: Mutex::new(None),
            stop_reason: match role {
                Role::Server => DisconnectReason::ServerShutdown,
                Role::Client => DisconnectReason::ClosedLocally,
            },
        })
    }

    fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::New,
            1 => Phase::Running,
            2 => Phase::Stopping,
            3 => Phase::Stopped,
            _ => Phase::Finished,
        }
    }

    /// Moves the phase forward to `phase` (never back) and wakes who waits for it.
    fn advance(&self, phase: Phase) {
        let (lock, changed) = &self.phase_changed;
        let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        self.phase.fetch_max(phase as u8, Ordering::AcqRel);
        changed.notify_all();
    }

    fn wait_for_phase(&self, phase: Phase) {
        let (lock, changed) = &self.phase_changed;
        let mut guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        while self.phase() < phase {
            guard = changed.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn started(&self) -> PyResult<&Started> {
        self.started.get().ok_or_else(|| PyRuntimeError::new_err("not started: call start() first"))
    }

    fn resolve(&self) -> PyResult<SocketAddr> {
        let (host, port) = &self.address;
        (host.as_str(), *port)
            .to_socket_addrs()
            .map_err(|e| os_error(&e, &format!("cannot resolve {host}:{port}")))?
            .next()
            .ok_or_else(|| PyValueError::new_err(format!("{host} resolves to no address")))
    }

    /// Starts the engine made by `start` (with the GIL released); refuses a
    /// second start. `start` reports a failure as the error and what was tried.
    fn begin(
        &self,
        py: Python<'_>,
        start: impl FnOnce(ServiceConfig, SocketAddr) -> Result<Engine, (std::io::Error, String)> + Send,
    ) -> PyResult<()> {
        let claimed = self.phase.compare_exchange(
            Phase::New as u8,
            Phase::Running as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        if claimed.is_err() {
            return Err(PyRuntimeError::new_err(match self.phase() {
                Phase::Running => "already started",
                _ => "a stopped service cannot be started again; create a new one",
            }));
        }
        let started = self.start_engine(py, start);
        if started.is_err() {
            self.phase.store(Phase::New as u8, Ordering::Release);
        }
        started
    }

    fn start_engine(
        &self,
        py: Python<'_>,
        start: impl FnOnce(ServiceConfig, SocketAddr) -> Result<Engine, (std::io::Error, String)> + Send,
    ) -> PyResult<()> {
        logging::follow_python_level(py)?;
        let address = self.resolve()?;
        let config = self.config.clone();
        let started = py.detach(|| start(config, address));
        logging::flush(py)?;
        let mut engine = started.map_err(|(error, context)| os_error(&error, &context))?;
        let local_addr = match &engine {
            Engine::Server(server) => Some(server.local_addr()),
            Engine::Client(_) => None,
        };
        let shared = engine.service_mut().shared().clone();
        let dispatcher = Dispatcher::new(self.class.clone_ref(py), shared.clone());
        *self.engine.lock().unwrap_or_else(|e| e.into_inner()) = Some(engine);
        let _ = self.started.set(Started { shared, dispatcher, local_addr });
        Ok(())
    }

    /// This thread polls: callbacks belong to it from now on.
    fn note_poller(&self) {
        *self.poller.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::thread::current().id());
    }

    /// Delivers what is left once the engine is down; the service is finished.
    fn finish(&self, py: Python<'_>, started: &Started, delivery: &mut Delivery) -> PyResult<usize> {
        let delivered = started.dispatcher.drain(py, delivery)?;
        self.advance(Phase::Finished);
        Ok(delivered)
    }

    /// Shuts the engine down (or waits for the `stop()` that is doing it):
    /// sessions flush and close, and every `Disconnected` is queued.
    fn shut_down_engine(&self, py: Python<'_>, started: &Started) {
        let engine = py.detach(|| self.engine.lock().unwrap_or_else(|e| e.into_inner()).take());
        let Some(mut engine) = engine else {
            py.detach(|| self.wait_for_phase(Phase::Stopped));
            return;
        };
        self.advance(Phase::Stopping);
        let reason = self.stop_reason;
        py.detach(|| {
            engine.service_mut().shutdown(reason);
            drop(engine);
        });
        self.advance(Phase::Stopped);
        // A poll waiting on another thread looks up and delivers the rest.
        started.shared.interrupt_wait();
    }

    /// After the engine is down: the `on_disconnected` calls left are
    /// delivered on the polling thread (see the module docs).
    fn deliver_the_rest(&self, py: Python<'_>, started: &Started) -> PyResult<()> {
        let me = std::thread::current().id();
        let poller = *self.poller.lock().unwrap_or_else(|e| e.into_inner());
        match started.dispatcher.try_begin_delivery() {
            Some(mut delivery) => {
                if poller.is_none_or(|poller| poller == me) {
                    self.finish(py, started, &mut delivery)?;
                }
            }
            // Called from a callback: the poll that runs it delivers the rest.
            None if poller == Some(me) => {}
            None => started.dispatcher.wait_for_delivery_to_end(py),
        }
        logging::flush(py)
    }
}

#[pymethods]
impl PyService {
    /// Runs the callbacks of whatever has happened, waiting up to `timeout`
    /// seconds for something to happen (None: until it does). Returns the number
    /// of events handled.
    #[pyo3(signature = (timeout=None))]
    fn poll(&self, py: Python<'_>, timeout: Option<&Bound<'_, PyAny>>) -> PyResult<usize> {
        let timeout = options::optional_seconds("timeout", timeout, limits::WAIT)?;
        let started = self.started()?;
        let mut delivery = started.dispatcher.begin_delivery()?;
        self.note_poller();
        if self.phase() >= Phase::Stopped {
            // Nothing more can happen: whatever is left is delivered, no waiting.
            return self.finish(py, started, &mut delivery);
        }
        let stopped = || self.phase() >= Phase::Stopped;
        let delivered = started.dispatcher.poll(py, &mut delivery, timeout, stopped)?;
        if stopped() {
            // stop() was called meanwhile (a callback, another thread): the rest now.
            return Ok(delivered + self.finish(py, started, &mut delivery)?);
        }
        Ok(delivered)
    }

    /// Polls until `stop()` is called (from a callback or another thread), then
    /// delivers every `on_disconnected` and returns.
    fn run_forever(&self, py: Python<'_>) -> PyResult<()> {
        let started = self.started()?;
        let mut delivery = started.dispatcher.begin_delivery()?;
        self.note_poller();
        let stopped = || self.phase() >= Phase::Stopped;
        while !stopped() {
            started.dispatcher.poll(py, &mut delivery, None, stopped)?;
            py.check_signals()?;
        }
        self.finish(py, started, &mut delivery).map(drop)
    }

    /// Stops: no new sessions; every session is closed (flushing what was queued,
    /// bounded by the linger) and gets `on_disconnected` on the polling thread.
    /// Idempotent.
    fn stop(&self, py: Python<'_>) -> PyResult<()> {
        let Some(started) = self.started.get() else {
            // Never started: nothing runs, and nothing may start later.
            self.advance(Phase::Finished);
            return Ok(());
        };
        self.shut_down_engine(py, started);
        self.deliver_the_rest(py, started)
    }

    /// Queues one packet on every connected session: `broadcast(packet_id,
    /// payload)` or `broadcast(send_buffer)` (raw sessions: `broadcast(data)`).
    /// Encoded once, shared by all. Returns how many sessions it was queued on.
    #[pyo3(signature = (packet, payload=None, /, *, exclude=None))]
    fn broadcast(
        &self,
        packet: &Bound<'_, PyAny>,
        payload: Option<&Bound<'_, PyAny>>,
        exclude: Option<&Bound<'_, PySession>>,
    ) -> PyResult<usize> {
        let started = self.started()?;
        let session = &self.config.session;
        let bytes = bytes_from_args(
            session.framing,
            packet,
            payload,
            self.config.max_packet_size(),
            session.max_send_queue_bytes,
        )?;
        let exclude = exclude.map(|s| s.get().session_id()).transpose()?;
        Ok(started.shared.broadcast(&bytes, exclude.map(SessionId)).queued)
    }

    /// The connected sessions, oldest first (a snapshot).
    #[getter]
    fn sessions<'py>(&self, py: Python<'py>) -> Vec<Bound<'py, PyAny>> {
        self.started.get().map(|s| s.dispatcher.session_objects(py)).unwrap_or_default()
    }

    /// True from start() until stop() has finished and the last
    /// on_disconnected has been delivered.
    #[getter]
    fn running(&self) -> bool {
        self.started.get().is_some()
            && matches!(self.phase(), Phase::Running | Phase::Stopping | Phase::Stopped)
    }

    fn __len__(&self) -> usize {
        self.started.get().map_or(0, |s| s.dispatcher.session_count())
    }

    /// Counters and gauges; see the README for what each means.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let snapshot = self.started()?.shared.stats();
        let dict = PyDict::new(py);
        for (name, value) in snapshot.figures() {
            dict.set_item(name, value)?;
        }
        let disconnects = PyDict::new(py);
        for (reason, count) in snapshot.disconnects {
            disconnects.set_item(reason.name(), count)?;
        }
        dict.set_item("disconnects", disconnects)?;
        Ok(dict)
    }

    fn __enter__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, Self>> {
        if slf.get().phase() == Phase::New {
            slf.call_method0("start")?;
        }
        Ok(slf.clone())
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.stop(py)?;
        Ok(false)
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(self.class.cls())?;
        match self.started.get() {
            Some(started) => started.dispatcher.traverse(&visit),
            None => Ok(()),
        }
    }

    fn __clear__(&self) {
        if let Some(started) = self.started.get() {
            drop(started.dispatcher.forget_sessions());
        }
    }
}

impl Drop for PyService {
    /// A service collected while it runs: its engine is shut down on a thread
    /// of its own (that waits out the linger; this thread holds the GIL), and
    /// a ResourceWarning says so, like an unclosed socket's.
    fn drop(&mut self) {
        let Some(engine) = self.engine.get_mut().unwrap_or_else(|e| e.into_inner()).take() else { return };
        let what = match &engine {
            Engine::Server(server) => format!("Server on {}", server.local_addr()),
            Engine::Client(_) => format!("Client to {}:{}", self.address.0, self.address.1),
        };
        let reason = self.stop_reason;
        let stopper = std::thread::Builder::new().name("servercore-stop".into()).spawn(move || {
            let mut engine = engine;
            engine.service_mut().shutdown(reason);
        });
        if let Err(error) = stopper {
            log::error!(target: "servercore", "{what}: no thread to stop it on ({error}); its sessions stay open");
        }
        let message = format!(
            "servercore {what} was collected while running; its sessions were closed without \
             on_disconnected. Call stop(), or use `with`."
        );
        Python::attach(|py| {
            let message = CString::new(message).unwrap_or_default();
            let category = py.get_type::<PyResourceWarning>();
            if let Err(error) = PyErr::warn(py, category.as_any(), &message, 1) {
                error.write_unraisable(py, None);
            }
        });
    }
}

/// A listening service: accepts connections and makes a session object for each.
#[pyclass(extends = PyService, frozen, name = "Server", module = "servercore._core")]
pub struct PyServer;

#[pymethods]
impl PyServer {
    #[new]
    #[pyo3(
        signature = (session_class, host="127.0.0.1", port=Port(0), **options),
        text_signature = "(session_class, host='127.0.0.1', port=0, **options)"
    )]
    fn new(
        session_class: &Bound<'_, PyAny>,
        host: &str,
        port: Port,
        options: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<PyClassInitializer<Self>> {
        let base = PyService::new(session_class, host.to_owned(), port.0, options, Role::Server)?;
        Ok(PyClassInitializer::from(base).add_subclass(Self))
    }

    /// Binds and starts the I/O threads; `port` is then the real port.
    fn start(slf: &Bound<'_, Self>) -> PyResult<()> {
        slf.as_super().get().begin(slf.py(), |config, address| {
            service::Server::listen(config, address)
                .map(Engine::Server)
                .map_err(|e| (e, format!("cannot listen on {address}")))
        })
    }

    #[getter]
    fn host(slf: &Bound<'_, Self>) -> String {
        let base = slf.as_super().get();
        match base.started.get().and_then(|s| s.local_addr) {
            Some(addr) => addr.ip().to_string(),
            None => base.address.0.clone(),
        }
    }

    /// The port listened on (the real one once started, also with port=0).
    #[getter]
    fn port(slf: &Bound<'_, Self>) -> u16 {
        let base = slf.as_super().get();
        match base.started.get().and_then(|s| s.local_addr) {
            Some(addr) => addr.port(),
            None => base.address.1,
        }
    }

    fn __repr__(slf: &Bound<'_, Self>) -> String {
        let base = slf.as_super().get();
        format!(
            "<Server {}:{} sessions={} {}>",
            Self::host(slf),
            Self::port(slf),
            base.__len__(),
            if base.running() { "running" } else { "stopped" }
        )
    }
}

/// A connecting service (the lecture's DummyClient): `count` sessions to one server.
#[pyclass(extends = PyService, frozen, name = "Client", module = "servercore._core")]
pub struct PyClient {
    count: usize,
}

#[pymethods]
impl PyClient {
    #[new]
    #[pyo3(
        signature = (session_class, host="127.0.0.1", port=None, count=SessionCount(1), **options),
        text_signature = "(session_class, host='127.0.0.1', port=None, count=1, **options)"
    )]
    fn new(
        session_class: &Bound<'_, PyAny>,
        host: &str,
        port: Option<Port>,
        count: SessionCount,
        options: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<PyClassInitializer<Self>> {
        let Some(Port(port)) = port.filter(|p| p.0 != 0) else {
            return Err(PyValueError::new_err("Client needs the server's port (1 to 65535)"));
        };
        let base = PyService::new(session_class, host.to_owned(), port, options, Role::Client)?;
        Ok(PyClassInitializer::from(base).add_subclass(Self { count: count.0 }))
    }

    /// Connects all `count` sessions and returns when every attempt has finished.
    /// Raises ConnectionError if none connected; partial failures are logged and
    /// counted in stats()["connect_failed"].
    fn start(slf: &Bound<'_, Self>) -> PyResult<()> {
        let count = slf.get().count;
        slf.as_super().get().begin(slf.py(), |config, address| {
            let (client, report) = service::Client::connect(config, address, count)
                .map_err(|e| (e, format!("cannot start a client for {address}")))?;
            match report.first_error {
                Some(error) if report.connected == 0 => {
                    Err((error, format!("none of {count} connections to {address} succeeded")))
                }
                Some(error) => {
                    log::warn!(
                        target: "servercore",
                        "{} of {count} connections to {address} failed, first with: {error}",
                        report.failed
                    );
                    Ok(Engine::Client(client))
                }
                None => Ok(Engine::Client(client)),
            }
        })
    }

    #[getter]
    fn count(&self) -> usize {
        self.count
    }

    fn __repr__(slf: &Bound<'_, Self>) -> String {
        let base = slf.as_super().get();
        format!(
            "<Client to {}:{} sessions={}/{} {}>",
            base.address.0,
            base.address.1,
            base.__len__(),
            slf.get().count,
            if base.running() { "running" } else { "stopped" }
        )
    }
}

fn os_error(error: &std::io::Error, context: &str) -> PyErr {
    match error.raw_os_error() {
        Some(errno) => PyOSError::new_err((errno, format!("{context}: {error}"))),
        None => PyOSError::new_err(format!("{context}: {error}")),
    }
}
