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
//! A service is driven either by `poll()` / `run_forever()` (blocking) or by
//! an asyncio loop (`serve_forever()`, `async with`; `servercore/_aio.py`),
//! never both: the first to drive it claims it. Under asyncio the loop's thread
//! is the polling thread; it is woken through the engine's wake descriptor
//! (`loop.add_reader`), and a `stop()` on it does not block the loop: the
//! engine shuts down on a thread of its own and the loop delivers the rest.
//!
//! A service collected while it runs warns (ResourceWarning) and shuts its
//! engine down on a thread of its own, never blocking with the GIL held.

use std::ffi::CString;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::ThreadId;
use std::time::Duration;

use pyo3::exceptions::{PyOSError, PyResourceWarning, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::pyclass::{PyTraverseError, PyVisit};
use pyo3::types::{PyDict, PyTuple};

use super::dispatcher::{Delivery, Dispatcher};
use super::logging;
use super::options::{self, Port, Role, SessionCount};
use super::scheduler::{PyTimer, Scheduler};
use super::session::{PySession, broadcast_args};
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
    fn service(&self) -> &service::Service {
        match self {
            Engine::Server(server) => server.service(),
            Engine::Client(client) => client.service(),
        }
    }

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

/// Where a service is in its life, shared with a thread that stops its engine.
struct Lifecycle {
    phase: AtomicU8,
    /// Signalled when the phase moves on: a second `stop()` waits for the first.
    changed: (Mutex<()>, Condvar),
}

impl Lifecycle {
    fn new() -> Self {
        Self { phase: AtomicU8::new(Phase::New as u8), changed: (Mutex::new(()), Condvar::new()) }
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
        let (lock, changed) = &self.changed;
        let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        self.phase.fetch_max(phase as u8, Ordering::AcqRel);
        changed.notify_all();
    }

    fn wait_for(&self, phase: Phase) {
        let (lock, changed) = &self.changed;
        let mut guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        while self.phase() < phase {
            guard = changed.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// What drives a service's callbacks; claimed once, for good.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Driver {
    Unclaimed = 0,
    /// `poll()` and `run_forever()`.
    Blocking = 1,
    /// An asyncio loop: `serve_forever()`, `async with`.
    Asyncio = 2,
}

/// Shuts `engine` down (sessions flush and close, within `grace` if given,
/// else the linger; every `Disconnected` is queued), then moves the service
/// to `Stopped` and wakes its poll.
fn stop_engine(
    mut engine: Engine,
    reason: DisconnectReason,
    grace: Option<Duration>,
    lifecycle: &Lifecycle,
    shared: &ServiceShared,
) {
    match grace {
        Some(grace) => engine.service_mut().shutdown_within(reason, grace),
        None => engine.service_mut().shutdown(reason),
    }
    drop(engine);
    lifecycle.advance(Phase::Stopped);
    // A poll waiting on another thread (or an asyncio loop) looks up and delivers the rest.
    shared.interrupt_wait();
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
    lifecycle: Arc<Lifecycle>,
    driver: AtomicU8,
    /// The thread that last entered `poll()` or `run_forever()` (or delivered
    /// for an asyncio loop).
    poller: Mutex<Option<ThreadId>>,
    stop_reason: DisconnectReason,
    /// The asyncio driver (`servercore/_aio.py`) while an event loop drives the service.
    aio_driver: Mutex<Option<Py<PyAny>>>,
    /// Timers and posted calls; they may be made before `start()`.
    jobs: Arc<Scheduler>,
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
            lifecycle: Arc::new(Lifecycle::new()),
            driver: AtomicU8::new(Driver::Unclaimed as u8),
            poller: Mutex::new(None),
            stop_reason: match role {
                Role::Server => DisconnectReason::ServerShutdown,
                Role::Client => DisconnectReason::ClosedLocally,
            },
            aio_driver: Mutex::new(None),
            jobs: Arc::new(Scheduler::default()),
        })
    }

    fn phase(&self) -> Phase {
        self.lifecycle.phase()
    }

    fn advance(&self, phase: Phase) {
        self.lifecycle.advance(phase);
    }

    /// Claims the service for `driver`, or says why it cannot be.
    fn claim(&self, driver: Driver) -> PyResult<()> {
        let claimed = self.driver.compare_exchange(
            Driver::Unclaimed as u8,
            driver as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        match claimed {
            Ok(_) => Ok(()),
            Err(held) if held == driver as u8 => Ok(()),
            Err(_) => Err(PyRuntimeError::new_err(match driver {
                Driver::Blocking => {
                    "this service is driven by an asyncio loop (serve_forever() or async with): \
                     poll() and run_forever() cannot drive it too"
                }
                _ => {
                    "this service is driven by poll() or run_forever(): an asyncio loop \
                     (serve_forever() or async with) cannot drive it too; use a new service"
                }
            })),
        }
    }

    fn driven_by(&self, driver: Driver) -> bool {
        self.driver.load(Ordering::Acquire) == driver as u8
    }

    fn on_polling_thread(&self) -> bool {
        *self.poller.lock().unwrap_or_else(|e| e.into_inner()) == Some(std::thread::current().id())
    }

    /// Timers and posted calls need a callable, and a service that will still poll.
    fn accepts_jobs(&self, callback: &Bound<'_, PyAny>) -> PyResult<()> {
        if !callback.is_callable() {
            return Err(PyTypeError::new_err(format!(
                "callback must be callable, got {}",
                options::type_name(callback)
            )));
        }
        if self.phase() >= Phase::Finished {
            return Err(PyRuntimeError::new_err("the service has finished: nothing would run this callback"));
        }
        Ok(())
    }

    fn schedule(
        &self,
        py: Python<'_>,
        delay: Duration,
        interval: Option<Duration>,
        callback: &Bound<'_, PyAny>,
        args: &Bound<'_, PyTuple>,
    ) -> PyResult<Py<PyTimer>> {
        self.accepts_jobs(callback)?;
        let timer =
            self.jobs.schedule(py, delay, interval, callback.clone().unbind(), args.clone().unbind())?;
        // A wait that is already under way ends early enough for it.
        if let Some(started) = self.started.get() {
            started.shared.interrupt_wait();
        }
        Ok(timer)
    }

    /// What a bus attaches to: the running engine's shared state and runtime.
    pub(crate) fn engine_parts(&self) -> PyResult<(Arc<ServiceShared>, tokio::runtime::Handle)> {
        let started = self.started()?;
        let engine = self.engine.lock().unwrap_or_else(|e| e.into_inner());
        let runtime = engine.as_ref().and_then(|engine| engine.service().runtime());
        let runtime = runtime.ok_or_else(|| PyRuntimeError::new_err("the server has stopped"))?;
        Ok((started.shared.clone(), runtime))
    }

    pub(crate) fn session_config(&self) -> &crate::config::SessionConfig {
        &self.config.session
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
        let claimed = self.lifecycle.phase.compare_exchange(
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
            self.lifecycle.phase.store(Phase::New as u8, Ordering::Release);
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
        let dispatcher = Dispatcher::new(self.class.clone_ref(py), shared.clone(), self.jobs.clone());
        *self.engine.lock().unwrap_or_else(|e| e.into_inner()) = Some(engine);
        let _ = self.started.set(Started { shared, dispatcher, local_addr });
        Ok(())
    }

    /// Under asyncio: once the engine is down, delivers the rest; whether the
    /// service is finished.
    fn finish_if_stopped(
        &self,
        py: Python<'_>,
        started: &Started,
        delivery: &mut Delivery,
        driver: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        if self.phase() >= Phase::Stopped {
            self.finish(py, started, delivery, Some(driver))?;
        }
        logging::flush(py)?;
        Ok(self.phase() == Phase::Finished)
    }

    /// This thread polls: callbacks belong to it from now on.
    fn note_poller(&self) {
        *self.poller.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::thread::current().id());
    }

    /// Delivers what is left once the engine is down; the service is
    /// finished, unless async callbacks still run (under asyncio): the last
    /// events of their sessions wait for them.
    fn finish(
        &self,
        py: Python<'_>,
        started: &Started,
        delivery: &mut Delivery,
        runner: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<usize> {
        let delivered = started.dispatcher.drain(py, delivery, runner)?;
        if !delivery.awaits_callbacks() {
            self.advance(Phase::Finished);
            // Nothing runs after the last on_disconnected.
            self.jobs.clear();
        }
        Ok(delivered)
    }

    /// The engine, for the `stop()` that takes it; `None` once taken.
    fn take_engine(&self, py: Python<'_>) -> Option<Engine> {
        let engine = py.detach(|| self.engine.lock().unwrap_or_else(|e| e.into_inner()).take());
        if engine.is_some() {
            self.advance(Phase::Stopping);
        }
        engine
    }

    /// Shuts the engine down (or waits for the `stop()` that is doing it):
    /// sessions flush and close, and every `Disconnected` is queued.
    fn shut_down_engine(&self, py: Python<'_>, started: &Started) {
        match self.take_engine(py) {
            Some(engine) => {
                py.detach(|| stop_engine(engine, self.stop_reason, None, &self.lifecycle, &started.shared))
            }
            None => py.detach(|| self.lifecycle.wait_for(Phase::Stopped)),
        }
    }

    /// `stop()` on an asyncio loop's thread: the engine shuts down on a thread
    /// of its own while the loop goes on delivering; the loop finishes once it
    /// is down. Blocking here would stall every other task for the linger.
    fn shut_down_engine_in_background(&self, py: Python<'_>, started: &Started, grace: Option<Duration>) {
        let Some(engine) = self.take_engine(py) else { return };
        let (reason, lifecycle, shared) = (self.stop_reason, self.lifecycle.clone(), started.shared.clone());
        let stopper = std::thread::Builder::new()
            .name("servercore-stop".into())
            .spawn(move || stop_engine(engine, reason, grace, &lifecycle, &shared));
        if let Err(error) = stopper {
            // The closure, and the engine in it, were dropped: the engine's
            // own drop shut it down, here.
            log::error!(target: "servercore", "no thread to stop the engine on ({error}); stopped in place");
            self.advance(Phase::Stopped);
            started.shared.interrupt_wait();
        }
    }

    /// After the engine is down: the `on_disconnected` calls left are
    /// delivered on the polling thread (see the module docs).
    fn deliver_the_rest(&self, py: Python<'_>, started: &Started) -> PyResult<()> {
        let me = std::thread::current().id();
        let poller = *self.poller.lock().unwrap_or_else(|e| e.into_inner());
        match started.dispatcher.try_begin_delivery() {
            Some(mut delivery) => {
                if poller.is_none_or(|poller| poller == me) {
                    self.finish(py, started, &mut delivery, None)?;
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
        self.claim(Driver::Blocking)?;
        let mut delivery = started.dispatcher.begin_delivery()?;
        self.note_poller();
        if self.phase() >= Phase::Stopped {
            // Nothing more can happen: whatever is left is delivered, no waiting.
            return self.finish(py, started, &mut delivery, None);
        }
        let stopped = || self.phase() >= Phase::Stopped;
        let delivered = started.dispatcher.poll(py, &mut delivery, timeout, stopped)?;
        if stopped() {
            // stop() was called meanwhile (a callback, another thread): the rest now.
            return Ok(delivered + self.finish(py, started, &mut delivery, None)?);
        }
        Ok(delivered)
    }

    /// Polls until `stop()` is called (from a callback or another thread), then
    /// delivers every `on_disconnected` and returns. On the main thread,
    /// SIGTERM and SIGINT drain the service meanwhile (`servercore/_drain.py`):
    /// no new sessions, `on_stopping()`, every session flushes within
    /// `shutdown_grace`; a second signal cuts the flushing short.
    #[pyo3(signature = (*, on_stopping=None))]
    fn run_forever<'py>(
        slf: &Bound<'py, Self>,
        on_stopping: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        if let Some(hook) = on_stopping.filter(|hook| !hook.is_callable()) {
            return Err(PyTypeError::new_err(format!(
                "on_stopping must be callable, got {}",
                options::type_name(hook)
            )));
        }
        let py = slf.py();
        py.import(intern!(py, "servercore._drain"))?
            .call_method1(intern!(py, "run_forever"), (slf, on_stopping))
    }

    /// For `run_forever()`: polls until the service has stopped, then delivers
    /// the rest.
    fn _serve(&self, py: Python<'_>) -> PyResult<()> {
        let started = self.started()?;
        self.claim(Driver::Blocking)?;
        let mut delivery = started.dispatcher.begin_delivery()?;
        self.note_poller();
        let stopped = || self.phase() >= Phase::Stopped;
        while !stopped() {
            started.dispatcher.poll(py, &mut delivery, None, stopped)?;
            py.check_signals()?;
        }
        self.finish(py, started, &mut delivery, None).map(drop)
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
        if self.driven_by(Driver::Asyncio) && self.on_polling_thread() {
            self.shut_down_engine_in_background(py, started, None);
            return logging::flush(py);
        }
        self.shut_down_engine(py, started);
        self.deliver_the_rest(py, started)
    }

    /// Calls `callback(*args)` once, `delay` seconds from now, on the polling
    /// thread (in a `poll()`, or on the event loop that drives the service).
    #[pyo3(signature = (delay, callback, /, *args))]
    fn call_later(
        &self,
        py: Python<'_>,
        delay: &Bound<'_, PyAny>,
        callback: &Bound<'_, PyAny>,
        args: &Bound<'_, PyTuple>,
    ) -> PyResult<Py<PyTimer>> {
        let delay = options::seconds("delay", delay, limits::WAIT)?;
        self.schedule(py, delay, None, callback, args)
    }

    /// Calls `callback(*args)` every `interval` seconds at a fixed rate, the
    /// first time one interval from now, on the polling thread.
    #[pyo3(signature = (interval, callback, /, *args))]
    fn call_every(
        &self,
        py: Python<'_>,
        interval: &Bound<'_, PyAny>,
        callback: &Bound<'_, PyAny>,
        args: &Bound<'_, PyTuple>,
    ) -> PyResult<Py<PyTimer>> {
        let interval = options::seconds("interval", interval, limits::TIMEOUT)?;
        self.schedule(py, interval, Some(interval), callback, args)
    }

    /// Calls `callback(*args)` on the polling thread at its next delivery, in
    /// the order posted. Callable from any thread; wakes a waiting `poll()`.
    #[pyo3(signature = (callback, /, *args))]
    fn post(&self, callback: &Bound<'_, PyAny>, args: &Bound<'_, PyTuple>) -> PyResult<()> {
        self.accepts_jobs(callback)?;
        self.jobs.post(callback.clone().unbind(), args.clone().unbind());
        if let Some(started) = self.started.get() {
            started.shared.interrupt_wait();
        }
        Ok(())
    }

    /// For `run_forever()`'s first SIGTERM or SIGINT, on the polling thread:
    /// no new sessions; `on_stopping()` (an exception is logged); then the
    /// engine shuts down on a thread of its own, every session flushing within
    /// `shutdown_grace`, while this thread goes on delivering.
    fn _begin_drain(&self, py: Python<'_>, on_stopping: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let started = self.started()?;
        if let Some(engine) = self.engine.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            engine.service_mut().stop_accepting();
        }
        if let Some(hook) = on_stopping {
            logging::log_exception(py, hook.call0(), || "on_stopping raised; draining anyway".to_owned())?;
        }
        self.shut_down_engine_in_background(py, started, Some(self.config.shutdown_grace));
        logging::flush(py)
    }

    /// For `run_forever()`'s second signal: the drain stops waiting for
    /// sessions to flush; they are cut now, each reported.
    fn _hurry_drain(&self) {
        if let Some(started) = self.started.get() {
            started.shared.hurry_shutdown();
        }
    }

    /// The seconds a drain gives sessions to flush (the `shutdown_grace` option).
    #[getter]
    fn _shutdown_grace(&self) -> f64 {
        self.config.shutdown_grace.as_secs_f64()
    }

    /// Serves until `stop()` (from a callback, a task or another thread), on
    /// the running asyncio loop: a coroutine. Cancelling it stops the service
    /// and delivers every `on_disconnected` before the cancellation goes on.
    fn serve_forever<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        aio(slf.py())?.call_method1(intern!(slf.py(), "serve_forever"), (slf,))
    }

    fn __aenter__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        let needs_start = slf.get().phase() == Phase::New;
        aio(slf.py())?.call_method1(intern!(slf.py(), "enter"), (slf, needs_start))
    }

    #[pyo3(signature = (*_exc))]
    fn __aexit__<'py>(
        slf: &Bound<'py, Self>,
        _exc: &Bound<'py, pyo3::types::PyTuple>,
    ) -> PyResult<Bound<'py, PyAny>> {
        aio(slf.py())?.call_method1(intern!(slf.py(), "exit"), (slf,))
    }

    /// For the asyncio driver, before the loop goes back to waiting (claims the
    /// service for asyncio): the descriptor to watch until the next call, or
    /// None if there is something to deliver already (deliver now, not on a
    /// descriptor).
    fn _aio_arm(&self) -> PyResult<Option<i32>> {
        let started = self.started()?;
        self.claim(Driver::Asyncio)?;
        self.note_poller();
        if self.phase() >= Phase::Stopped {
            return Ok(None);
        }
        Ok(started.shared.begin_fd_wait())
    }

    /// For the asyncio driver: seconds until the next timer or posted call is
    /// due (0: now), or None if there is none.
    fn _aio_next_job(&self) -> Option<f64> {
        self.jobs.next_due().map(|due| due.saturating_duration_since(std::time::Instant::now()).as_secs_f64())
    }

    /// For the asyncio driver (`driver`, which runs async callbacks), when the
    /// descriptor is readable: delivers what is there. Returns True once
    /// everything is delivered for good (the service is finished).
    fn _aio_deliver(&self, py: Python<'_>, driver: &Bound<'_, PyAny>) -> PyResult<bool> {
        let started = self.started()?;
        self.claim(Driver::Asyncio)?;
        let mut delivery = started.dispatcher.begin_delivery()?;
        self.note_poller();
        started.shared.end_fd_wait();
        if self.phase() < Phase::Stopped {
            started.dispatcher.deliver_ready(py, &mut delivery, driver)?;
        }
        self.finish_if_stopped(py, started, &mut delivery, driver)
    }

    /// For the asyncio driver: an async callback of session `session_id` has
    /// ended, having raised `error` (None: returned, or was cancelled). Its
    /// session's waiting events are delivered. Returns True once the service
    /// is finished.
    #[pyo3(signature = (driver, session_id, callback, error=None))]
    fn _aio_resume(
        &self,
        py: Python<'_>,
        driver: &Bound<'_, PyAny>,
        session_id: u64,
        callback: &str,
        error: Option<Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        let started = self.started()?;
        let mut delivery = started.dispatcher.begin_delivery()?;
        let error = error.map(PyErr::from_value);
        started.dispatcher.resume(py, &mut delivery, driver, SessionId(session_id), callback, error)?;
        self.finish_if_stopped(py, started, &mut delivery, driver)
    }

    /// The asyncio driver attached to this service, if any.
    #[getter(_aio_driver)]
    fn aio_driver(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.aio_driver.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|d| d.clone_ref(py))
    }

    #[setter(_aio_driver)]
    fn set_aio_driver(&self, driver: Option<Py<PyAny>>) {
        let old = std::mem::replace(&mut *self.aio_driver.lock().unwrap_or_else(|e| e.into_inner()), driver);
        drop(old);
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
        let (bytes, exclude) = broadcast_args(&self.config.session, packet, payload, exclude)?;
        Ok(started.shared.broadcast(&bytes, exclude).queued)
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
        if let Ok(driver) = self.aio_driver.try_lock() {
            visit.call(&*driver)?;
        }
        match self.started.get() {
            Some(started) => started.dispatcher.traverse(&visit),
            None => Ok(()),
        }
    }

    fn __clear__(&self) {
        drop(self.aio_driver.lock().unwrap_or_else(|e| e.into_inner()).take());
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

/// The asyncio side of a service, written in Python: `servercore/_aio.py`.
fn aio(py: Python<'_>) -> PyResult<Bound<'_, PyModule>> {
    py.import(intern!(py, "servercore._aio"))
}

fn os_error(error: &std::io::Error, context: &str) -> PyErr {
    match error.raw_os_error() {
        Some(errno) => PyOSError::new_err((errno, format!("{context}: {error}"))),
        None => PyOSError::new_err(format!("{context}: {error}")),
    }
}
