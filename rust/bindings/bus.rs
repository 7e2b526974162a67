//! `Bus`: a server's link to the other workers and machines of its cluster,
//! over Redis Pub/Sub ([`crate::bus`]). Publishing queues for the engine and
//! never waits for Redis; what arrives is fanned out in the engine.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use pyo3::exceptions::{PyConnectionError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::options;
use super::room::PyRoom;
use super::service::PyServer;
use super::session::{PySession, broadcast_args};
use crate::bus::{Bus, BusConfig, BusError, SessionAddress};
use crate::config::{SessionConfig, limits};
use crate::events::SessionId;
use crate::room::Room;

/// Every bus of this process, for the metrics (`_bus_stats`).
static LIVE: Mutex<Vec<Weak<Bus>>> = Mutex::new(Vec::new());

#[pyclass(frozen, module = "servercore._core", name = "Bus")]
pub struct PyBus {
    bus: Arc<Bus>,
    session: SessionConfig,
    rooms: Mutex<HashMap<String, Py<PyRoom>>>,
}

fn bus_error(error: BusError) -> PyErr {
    match error {
        BusError::Url(detail) => PyValueError::new_err(format!(
            "bus url {detail} (write redis://host:port/db, e.g. redis://127.0.0.1:6379/0)"
        )),
        BusError::Unavailable(detail) => PyConnectionError::new_err(format!("bus: {detail}")),
    }
}

/// This process's default name in the cluster: host and pid.
fn default_node() -> String {
    let mut name = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that.
    let host = match unsafe { libc::gethostname(name.as_mut_ptr().cast(), name.len()) } {
        0 => String::from_utf8_lossy(name.split(|&b| b == 0).next().unwrap_or_default()).into_owned(),
        _ => "host".to_owned(),
    };
    format!("{host}-{}", std::process::id())
}

#[pymethods]
impl PyBus {
    #[new]
    #[pyo3(signature = (server, url, *, prefix="servercore", node=None, directory_ttl=None, max_queued_publishes=None))]
    fn new(
        server: &Bound<'_, PyServer>,
        url: &str,
        prefix: &str,
        node: Option<String>,
        directory_ttl: Option<&Bound<'_, PyAny>>,
        max_queued_publishes: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let ttl = options::optional_seconds("directory_ttl", directory_ttl, limits::TIMEOUT)?
            .unwrap_or(Duration::from_secs(30));
        let queued = match max_queued_publishes {
            Some(value) => options::count("max_queued_publishes", value, limits::MAX_SESSIONS)?,
            None => 100_000,
        };
        let node = node.unwrap_or_else(default_node);
        if node.is_empty() || prefix.is_empty() {
            return Err(PyValueError::new_err("bus: node and prefix must not be empty"));
        }
        let base = server.as_super().get();
        let (shared, runtime) = base.engine_parts()?;
        let config = BusConfig {
            url: url.to_owned(),
            prefix: prefix.to_owned(),
            node,
            directory_ttl: ttl,
            max_queued_publishes: queued as usize,
        };
        let bus = Arc::new(Bus::start(config, shared, runtime).map_err(bus_error)?);
        let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|bus| bus.strong_count() > 0);
        live.push(Arc::downgrade(&bus));
        Ok(Self { bus, session: base.session_config().clone(), rooms: Mutex::default() })
    }

    /// This server's name in the cluster.
    #[getter]
    fn node(&self) -> &str {
        self.bus.node()
    }

    /// Whether Redis is reachable now (publishing and subscribed).
    #[getter]
    fn connected(&self) -> bool {
        self.bus.is_connected()
    }

    /// Publishes a packet to every session of every server on the bus
    /// (`broadcast(packet_id, payload)` or `broadcast(send_buffer)`). False,
    /// at once and counted, while Redis is unreachable.
    #[pyo3(signature = (packet, payload=None, /))]
    fn broadcast(&self, packet: &Bound<'_, PyAny>, payload: Option<&Bound<'_, PyAny>>) -> PyResult<bool> {
        let (bytes, _) = broadcast_args(&self.session, packet, payload, None)?;
        Ok(self.bus.broadcast(bytes))
    }

    /// Publishes a packet to the members of the room `name` on every server.
    #[pyo3(signature = (name, packet, payload=None, /))]
    fn publish(
        &self,
        name: &str,
        packet: &Bound<'_, PyAny>,
        payload: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        let (bytes, _) = broadcast_args(&self.session, packet, payload, None)?;
        Ok(self.bus.publish_to_room(name, bytes))
    }

    /// The room `name` here: what any server publishes to `name` reaches its
    /// members. The same Room each time.
    fn room(&self, py: Python<'_>, name: &str) -> PyResult<Py<PyRoom>> {
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(room) = rooms.get(name) {
            return Ok(room.clone_ref(py));
        }
        let room: Room<Py<PyAny>> = Room::default();
        self.bus.attach_room(name, std::sync::Arc::new(room.clone()));
        let object = Py::new(py, PyRoom::wrapping(room))?;
        rooms.insert(name.to_owned(), object.clone_ref(py));
        Ok(object)
    }

    /// Stops fanning out the room `name` here and unsubscribes from it (a
    /// match that ended); whether there was one. Its members stay in the
    /// Room object, which no longer receives what is published to `name`.
    fn close_room(&self, name: &str) -> bool {
        self.rooms.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
        self.bus.detach_room(name)
    }

    /// `session`'s address in the cluster ("node/id"), for `send_to`.
    fn address(&self, session: &Bound<'_, PySession>) -> PyResult<String> {
        Ok(self.bus.address_of(SessionId(session.get().session_id()?)).to_string())
    }

    /// Sends a packet to one session anywhere, by its address. Whether it was
    /// published; delivery is at most once (a session gone meanwhile gets nothing).
    #[pyo3(signature = (address, packet, payload=None, /))]
    fn send_to(
        &self,
        address: &str,
        packet: &Bound<'_, PyAny>,
        payload: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        let address: SessionAddress =
            address.parse().map_err(|error| PyValueError::new_err(format!("bus address {error}")))?;
        let (bytes, _) = broadcast_args(&self.session, packet, payload, None)?;
        Ok(self.bus.send_to(&address, bytes))
    }

    /// Puts `name` -> `session`'s address in the cluster's directory, kept
    /// alive while the session lives (a heartbeat every third of
    /// `directory_ttl`) and removed after it ends. Whether it was queued.
    fn register(&self, name: &str, session: &Bound<'_, PySession>) -> PyResult<bool> {
        Ok(self.bus.register(name, SessionId(session.get().session_id()?)))
    }

    /// The address registered for `name` anywhere in the cluster, or None.
    /// Asks Redis (a round trip; ConnectionError if it does not answer).
    #[pyo3(signature = (name, timeout=None))]
    fn lookup(
        &self,
        py: Python<'_>,
        name: &str,
        timeout: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Option<String>> {
        let timeout =
            options::optional_seconds("timeout", timeout, limits::TIMEOUT)?.unwrap_or(Duration::from_secs(1));
        let found = py.detach(|| self.bus.lookup(name, timeout)).map_err(bus_error)?;
        Ok(found.map(|address| address.to_string()))
    }

    /// The bus's counters: published, publish_failed, received, delivered,
    /// malformed, reconnects; and connected.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        stats_dict(py, &self.bus)
    }

    /// Stops the bus's tasks (also when the server stops, or the bus is collected).
    fn close(&self) {
        self.bus.close();
    }

    fn __repr__(&self) -> String {
        let state = if self.bus.is_connected() { "connected" } else { "disconnected" };
        format!("<Bus {} {state}>", self.bus.node())
    }
}

fn stats_dict<'py>(py: Python<'py>, bus: &Bus) -> PyResult<Bound<'py, PyDict>> {
    let stats = bus.stats();
    let dict = PyDict::new(py);
    for (key, counter) in [
        ("published", &stats.published),
        ("publish_failed", &stats.publish_failed),
        ("received", &stats.received),
        ("delivered", &stats.delivered),
        ("malformed", &stats.malformed),
        ("reconnects", &stats.reconnects),
    ] {
        dict.set_item(key, counter.load(Ordering::Relaxed))?;
    }
    dict.set_item("connected", bus.is_connected())?;
    dict.set_item("node", bus.node())?;
    Ok(dict)
}

/// The stats of every bus of this process still open (servercore.metrics).
#[pyfunction]
pub fn _bus_stats(py: Python<'_>) -> PyResult<Vec<Bound<'_, PyDict>>> {
    let live: Vec<Arc<Bus>> =
        LIVE.lock().unwrap_or_else(|e| e.into_inner()).iter().filter_map(Weak::upgrade).collect();
    live.iter().filter(|bus| !bus.is_closed()).map(|bus| stats_dict(py, bus)).collect()
}
