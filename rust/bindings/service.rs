//! `Server` and `Client`, and `Service`, the base that holds what they share:
//! poll, run_forever, stop, broadcast, sessions, stats.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use pyo3::exceptions::{PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

use super::dispatch::{Dispatcher, SessionClass};
use super::logging;
use super::send_buffer::packet_from_args;
use super::session::PySession;
use crate::config::{Keepalive, ServiceConfig};
use crate::frame::{HEADER_SIZE, MAX_WIRE_PACKET_SIZE};
use crate::reason::DisconnectReason;
use crate::service::{self, ServiceShared};

/// What `run_forever` waits at most per poll, so `stop()` from another thread
/// and Ctrl-C are noticed promptly.
const RUN_FOREVER_POLL: Duration = Duration::from_millis(100);

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

/// The base of `Server` and `Client` (the lecture's `Service`).
#[pyclass(subclass, frozen, name = "Service", module = "servercore._core")]
pub struct PyService {
    dispatcher: Dispatcher,
    config: ServiceConfig,
    address: (String, u16),
    shared: OnceLock<Arc<ServiceShared>>,
    engine: Mutex<Option<Engine>>,
    /// A server's bound address, once started.
    local_addr: OnceLock<SocketAddr>,
    stopped: AtomicBool,
    stop_reason: DisconnectReason,
}

impl PyService {
    fn new(
        session_class: &Bound<'_, PyAny>,
        host: String,
        port: u16,
        options: Option<&Bound<'_, PyDict>>,
        client: bool,
    ) -> PyResult<Self> {
        let class = SessionClass::inspect(session_class)?;
        let mut config = parse_options(options, client)?;
        config.session.framing = class.framing;
        config.session.report_sent = class.wants_sent_events();
        Ok(Self {
            dispatcher: Dispatcher::new(class),
            config,
            address: (host, port),
            shared: OnceLock::new(),
            engine: Mutex::new(None),
            local_addr: OnceLock::new(),
            stopped: AtomicBool::new(false),
            stop_reason: if client {
                DisconnectReason::ClosedLocally
            } else {
                DisconnectReason::ServerShutdown
            },
        })
    }

    fn shared(&self) -> PyResult<&Arc<ServiceShared>> {
        self.shared.get().ok_or_else(|| PyRuntimeError::new_err("not started: call start() first"))
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
        if self.stopped.load(Ordering::Acquire) {
            return Err(PyRuntimeError::new_err(
                "a stopped service cannot be started again; create a new one",
            ));
        }
        let mut engine = self.engine.lock().unwrap_or_else(|e| e.into_inner());
        if engine.is_some() {
            return Err(PyRuntimeError::new_err("already started"));
        }
        logging::follow_python_level(py)?;
        let address = self.resolve()?;
        let config = self.config.clone();
        let started = py.detach(|| start(config, address));
        logging::flush(py)?;
        let mut started = started.map_err(|(error, context)| os_error(&error, &context))?;
        if let Engine::Server(server) = &started {
            let _ = self.local_addr.set(server.local_addr());
        }
        let _ = self.shared.set(started.service_mut().shared().clone());
        *engine = Some(started);
        Ok(())
    }

    fn stop_engine(&self, py: Python<'_>) -> PyResult<()> {
        let engine = self.engine.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.stopped.store(true, Ordering::Release);
        if let Some(mut engine) = engine {
            let reason = self.stop_reason;
            py.detach(|| engine.service_mut().shutdown(reason));
            if let Some(shared) = self.shared.get() {
                // Wakes a run_forever() waiting on another thread.
                shared.events.interrupt();
            }
        }
        if let Some(shared) = self.shared.get() {
            self.dispatcher.drain(py, shared)?;
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
    fn poll(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<usize> {
        let timeout = timeout.map(|t| seconds("timeout", t, true)).transpose()?;
        let shared = self.shared()?.clone();
        if self.stopped.load(Ordering::Acquire) {
            // Nothing more can happen: whatever is left is delivered, no waiting.
            return self.dispatcher.drain(py, &shared);
        }
        let delivered = self.dispatcher.poll(py, &shared, timeout)?;
        if self.stopped.load(Ordering::Acquire) {
            // stop() was called from a callback of this batch: deliver the rest now.
            return Ok(delivered + self.dispatcher.drain(py, &shared)?);
        }
        Ok(delivered)
    }

    /// Polls until `stop()` is called (from a callback or another thread).
    fn run_forever(&self, py: Python<'_>) -> PyResult<()> {
        let shared = self.shared()?.clone();
        while !self.stopped.load(Ordering::Acquire) {
            self.dispatcher.poll(py, &shared, Some(RUN_FOREVER_POLL))?;
            py.check_signals()?;
        }
        self.dispatcher.drain(py, &shared)?;
        Ok(())
    }

    /// Stops: no new sessions; every session is closed (flushing what was queued,
    /// bounded by the linger) and gets `on_disconnected`. Idempotent.
    fn stop(&self, py: Python<'_>) -> PyResult<()> {
        self.stop_engine(py)
    }

    /// Queues one packet on every connected session: `broadcast(packet_id,
    /// payload)` or `broadcast(send_buffer)`. Encoded once, shared by all.
    /// Returns how many sessions it was queued on.
    #[pyo3(signature = (packet, payload=None, /, *, exclude=None))]
    fn broadcast(
        &self,
        packet: &Bound<'_, PyAny>,
        payload: Option<&Bound<'_, PyAny>>,
        exclude: Option<&Bound<'_, PySession>>,
    ) -> PyResult<usize> {
        let shared = self.shared()?;
        let packet = packet_from_args(packet, payload, self.config.max_packet_size())?;
        let exclude = exclude.map(|s| s.getattr("id")?.extract::<u64>()).transpose()?;
        Ok(shared.broadcast(&packet, exclude.map(crate::session::SessionId)).queued)
    }

    /// The connected sessions, oldest first (a snapshot).
    #[getter]
    fn sessions<'py>(&self, py: Python<'py>) -> Vec<Bound<'py, PyAny>> {
        self.dispatcher.session_objects(py)
    }

    #[getter]
    fn running(&self) -> bool {
        self.shared.get().is_some() && !self.stopped.load(Ordering::Acquire)
    }

    fn __len__(&self) -> usize {
        self.dispatcher.session_count()
    }

    /// Counters and gauges; see the README for what each means.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let snapshot = match self.shared.get() {
            Some(shared) => shared.stats(),
            None => return Err(PyRuntimeError::new_err("not started: call start() first")),
        };
        let dict = PyDict::new(py);
        let figures: [(&str, u64); 18] = [
            ("sessions", snapshot.sessions as u64),
            ("accepted", snapshot.accepted),
            ("connected", snapshot.connected),
            ("connect_failed", snapshot.connect_failed),
            ("rejected", snapshot.rejected),
            ("packets_in", snapshot.packets_in),
            ("bytes_in", snapshot.bytes_in),
            ("packets_out", snapshot.packets_out),
            ("bytes_out", snapshot.bytes_out),
            ("send_queue_bytes", snapshot.send_queue_bytes as u64),
            ("pending_recv_bytes", snapshot.pending_recv_bytes as u64),
            ("pending_events", snapshot.pending_events as u64),
            ("packets_discarded", snapshot.packets_discarded),
            ("pool_chunk_size", snapshot.pool.chunk_size as u64),
            ("pool_chunks", snapshot.pool.chunks as u64),
            ("pool_chunks_in_use", snapshot.pool.chunks_in_use as u64),
            ("pool_buffers_encoded", snapshot.pool.buffers_encoded),
            ("pool_bytes_encoded", snapshot.pool.bytes_encoded),
        ];
        for (name, value) in figures {
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
        if slf.get().shared.get().is_none() {
            slf.call_method0("start")?;
        }
        Ok(slf.clone())
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.stop_engine(py)?;
        Ok(false)
    }
}

/// A listening service: accepts connections and makes a session object for each.
#[pyclass(extends = PyService, frozen, name = "Server", module = "servercore._core")]
pub struct PyServer;

#[pymethods]
impl PyServer {
    #[new]
    #[pyo3(signature = (session_class, host="127.0.0.1", port=0, **options))]
    fn new(
        session_class: &Bound<'_, PyAny>,
        host: &str,
        port: u16,
        options: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<PyClassInitializer<Self>> {
        let base = PyService::new(session_class, host.to_owned(), port, options, false)?;
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
        match base.local_addr.get() {
            Some(addr) => addr.ip().to_string(),
            None => base.address.0.clone(),
        }
    }

    /// The port listened on (the real one once started, also with port=0).
    #[getter]
    fn port(slf: &Bound<'_, Self>) -> u16 {
        let base = slf.as_super().get();
        match base.local_addr.get() {
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
    #[pyo3(signature = (session_class, host="127.0.0.1", port=None, count=1, **options))]
    fn new(
        session_class: &Bound<'_, PyAny>,
        host: &str,
        port: Option<u16>,
        count: usize,
        options: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<PyClassInitializer<Self>> {
        let Some(port) = port.filter(|p| *p != 0) else {
            return Err(PyValueError::new_err("Client needs the server's port"));
        };
        if count == 0 {
            return Err(PyValueError::new_err("count must be at least 1"));
        }
        let base = PyService::new(session_class, host.to_owned(), port, options, true)?;
        Ok(PyClassInitializer::from(base).add_subclass(Self { count }))
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

fn seconds(name: &str, value: f64, zero_ok: bool) -> PyResult<Duration> {
    if !value.is_finite() || value < 0.0 || (!zero_ok && value == 0.0) {
        let bound = if zero_ok { "0 or more" } else { "more than 0" };
        return Err(PyValueError::new_err(format!("{name} must be {bound} seconds (or None), got {value}")));
    }
    Ok(Duration::from_secs_f64(value))
}

/// The keyword options of `Server(...)` and `Client(...)`.
fn parse_options(options: Option<&Bound<'_, PyDict>>, client: bool) -> PyResult<ServiceConfig> {
    let mut config = ServiceConfig::default();
    let Some(options) = options else { return Ok(config) };
    let session = &mut config.session;
    for (key, value) in options.iter() {
        let key: String = key.cast::<PyString>()?.to_string();
        let none = value.is_none();
        match key.as_str() {
            "io_threads" if none => {}
            "io_threads" => config.io_threads = positive(&key, &value)?,
            "max_sessions" => config.max_sessions = positive(&key, &value)?,
            "backlog" => config.backlog = positive(&key, &value)?,
            "max_packet_size" => {
                let size: usize = value.extract()?;
                if !(HEADER_SIZE..=MAX_WIRE_PACKET_SIZE).contains(&size) {
                    return Err(PyValueError::new_err(format!(
                        "max_packet_size must be between {HEADER_SIZE} and {MAX_WIRE_PACKET_SIZE}, got {size}"
                    )));
                }
                session.frame_limits.max_packet_size = size;
            }
            "max_send_queue_bytes" => session.max_send_queue_bytes = positive(&key, &value)?,
            "max_pending_recv_bytes" => session.max_pending_recv_bytes = positive(&key, &value)?,
            "packet_timeout" => {
                session.packet_timeout =
                    (!none).then(|| seconds(&key, value.extract()?, false)).transpose()?
            }
            "idle_timeout" => {
                session.idle_timeout = (!none).then(|| seconds(&key, value.extract()?, false)).transpose()?
            }
            "linger" => session.linger = seconds(&key, value.extract()?, true)?,
            "max_packets_per_second" => {
                session.max_packets_per_second = (!none).then(|| positive(&key, &value)).transpose()?
            }
            "packet_ids" if none => session.frame_limits.allowed_ids = None,
            "packet_ids" => {
                let mut ids = Vec::new();
                for id in value.try_iter()? {
                    ids.push(super::send_buffer::packet_id_from(&id?)?);
                }
                session.frame_limits.allowed_ids = Some(ids.into_iter().collect());
            }
            "nodelay" => session.nodelay = value.extract()?,
            "keepalive" => {
                session.keepalive = value.extract::<bool>()?.then(Keepalive::default);
            }
            "connect_timeout" if client => config.connect_timeout = seconds(&key, value.extract()?, false)?,
            _ => {
                let kind = if client { "Client" } else { "Server" };
                return Err(PyTypeError::new_err(format!(
                    "{kind}() got an unexpected keyword argument '{key}'"
                )));
            }
        }
    }
    if session.max_send_queue_bytes < session.frame_limits.max_packet_size {
        return Err(PyValueError::new_err(format!(
            "max_send_queue_bytes ({}) must hold at least one packet of max_packet_size ({})",
            session.max_send_queue_bytes, session.frame_limits.max_packet_size
        )));
    }
    Ok(config)
}

fn positive<T: TryFrom<u64>>(name: &str, value: &Bound<'_, PyAny>) -> PyResult<T> {
    let number: i64 = value.extract().map_err(|_| PyTypeError::new_err(format!("{name} must be an int")))?;
    u64::try_from(number)
        .ok()
        .filter(|n| *n > 0)
        .and_then(|n| T::try_from(n).ok())
        .ok_or_else(|| PyValueError::new_err(format!("{name} must be a positive int in range, got {number}")))
}
