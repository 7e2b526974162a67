//! `RouteTable`: packet ids to decoders and handlers, the engine half of
//! `servercore.packets.Router` (which subclasses it and adds `on()`).
//!
//! A session class whose `on_recv_packet` is `RoutedSession`'s is routed by
//! the dispatcher itself ([`route`]): per packet it reads the session's
//! `router` (so a session switches routers from the next packet on), decodes
//! the payload where it lies, and calls `handler(session, packet)`. No bytes
//! object for the payload, no Python frame between the engine and the
//! handler.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::pyclass::{PyTraverseError, PyVisit};
use pyo3::types::{PyBytes, PyDict, PyFrozenSet, PyTuple};
use std::sync::{Mutex, PoisonError};

use super::options::type_name;
use super::packet_layout::{DecodeError, MalformedPacket, PyPacketLayout};
use crate::reason::DisconnectReason;
use crate::session::SessionHandle;

/// How a payload becomes the handler's argument.
enum Decoder {
    /// A `Packet` class's compiled layout.
    Layout(Py<PyPacketLayout>),
    /// Any callable taking the payload's bytes (a protobuf message class's
    /// `FromString`); its MalformedPacket is a malformed packet.
    Callable(Py<PyAny>),
}

/// One packet type's entry: a Python object, so that the table is a dict.
#[pyclass(frozen, module = "servercore._core", name = "_Route")]
struct PyRoute {
    decoder: Decoder,
    handler: Py<PyAny>,
    /// The packet type's name, for messages.
    label: String,
}

#[pymethods]
impl PyRoute {
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.handler)?;
        match &self.decoder {
            Decoder::Layout(layout) => visit.call(layout),
            Decoder::Callable(decode) => visit.call(decode),
        }
    }
}

#[pyclass(subclass, frozen, module = "servercore._core", name = "RouteTable")]
pub struct PyRouteTable {
    /// Only read for messages and by `name`; settable.
    name: Mutex<String>,
    /// packet id -> `_Route`. A dict, guarded by the interpreter like any
    /// other: a dispatch takes its entry out (one reference) and a handler
    /// may register more routes meanwhile. A Mutex here showed in perf (its
    /// atomics, 12 % of the polling thread) and measured no faster.
    routes: Py<PyDict>,
}

impl PyRouteTable {
    fn route<'py>(&self, py: Python<'py>, packet_id: u16) -> PyResult<Option<Bound<'py, PyRoute>>> {
        let found = self.routes.bind(py).get_item(packet_id)?;
        Ok(found.map(|route| route.cast_into::<PyRoute>()).transpose()?)
    }

    /// Decodes `payload` and calls its handler with `(session, packet)`,
    /// returning what the handler returned. A packet without a handler here,
    /// or one that does not match its layout, is `reject`ed with the detail
    /// for the session's farewell line instead, and None is returned.
    fn route_packet<'py>(
        &self,
        session: &Bound<'py, PyAny>,
        packet_id: u16,
        payload: &[u8],
        reject: impl FnOnce(String) -> PyResult<()>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = session.py();
        let Some(route) = self.route(py, packet_id)? else {
            reject(format!("packet {packet_id}: no handler in {}", self.name()))?;
            return Ok(py.None().into_bound(py));
        };
        let route = route.get();
        let decoded = match &route.decoder {
            Decoder::Layout(layout) => layout.get().decode_payload(py, payload),
            Decoder::Callable(decode) => {
                decode.bind(py).call1((PyBytes::new(py, payload),)).map_err(|error| {
                    if error.is_instance_of::<MalformedPacket>(py) {
                        DecodeError::Malformed(error.value(py).to_string())
                    } else {
                        DecodeError::Python(error)
                    }
                })
            }
        };
        match decoded {
            Ok(packet) => route.handler.bind(py).call1((session, packet)),
            Err(DecodeError::Malformed(message)) => {
                reject(format!("{} (id {packet_id}): {message}", route.label))?;
                Ok(py.None().into_bound(py))
            }
            Err(DecodeError::Python(error)) => Err(error),
        }
    }
}

/// One packet of a routed session, from the dispatcher: through the table
/// that is the session's `router` now.
pub fn route<'py>(
    session: &Bound<'py, PyAny>,
    handle: &SessionHandle,
    packet_id: u16,
    payload: &[u8],
) -> PyResult<Bound<'py, PyAny>> {
    let router = session.getattr(intern!(session.py(), "router"))?;
    let table = router.cast::<PyRouteTable>().map_err(|_| not_a_router(session, &router))?;
    table.get().route_packet(session, packet_id, payload, |detail| {
        handle.close_with_detail(DisconnectReason::MalformedPacket, detail);
        Ok(())
    })
}

fn not_a_router(session: &Bound<'_, PyAny>, router: &Bound<'_, PyAny>) -> PyErr {
    let class = session.get_type().qualname().map(|n| n.to_string()).unwrap_or_default();
    PyTypeError::new_err(format!(
        "{class}.router must be a servercore.packets.Router, got {}",
        type_name(router)
    ))
}

#[pymethods]
impl PyRouteTable {
    /// The table, nameless until `__init__`: a subclass's `__new__`
    /// arguments are its own.
    #[new]
    #[pyo3(signature = (*_args, **_kwargs))]
    fn new(py: Python<'_>, _args: &Bound<'_, PyTuple>, _kwargs: Option<&Bound<'_, PyDict>>) -> Self {
        Self { name: Mutex::new("router".to_owned()), routes: PyDict::new(py).unbind() }
    }

    /// `Router(name="router")`; a subclass's `__init__` calls
    /// `super().__init__(name)`.
    #[pyo3(signature = (name = "router".to_owned()))]
    fn __init__(&self, name: String) {
        self.set_name(name);
    }

    /// The name in messages ("lobby: packet id 1 (Chat) already has a handler").
    #[getter]
    fn name(&self) -> String {
        self.name.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    #[setter]
    fn set_name(&self, name: String) {
        *self.name.lock().unwrap_or_else(PoisonError::into_inner) = name;
    }

    /// The ids this router handles: the server's `packet_ids`.
    #[getter]
    fn packet_ids<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyFrozenSet>> {
        PyFrozenSet::new(py, self.routes.bind(py).keys())
    }

    /// Refuses `packet_id` if it has a handler already.
    fn _check_free(&self, py: Python<'_>, packet_id: u16, label: &str) -> PyResult<()> {
        match self.route(py, packet_id)? {
            Some(route) => Err(PyValueError::new_err(format!(
                "{}: packet id {packet_id} ({label}) already has a handler ({})",
                self.name(),
                route.get().label
            ))),
            None => Ok(()),
        }
    }

    /// Registers `handler` for `packet_id`; `decoder` is a PacketLayout or a
    /// callable taking the payload.
    fn _add(
        &self,
        packet_id: u16,
        decoder: &Bound<'_, PyAny>,
        handler: &Bound<'_, PyAny>,
        label: String,
    ) -> PyResult<()> {
        let py = decoder.py();
        self._check_free(py, packet_id, &label)?;
        let decoder = match decoder.cast::<PyPacketLayout>() {
            Ok(layout) => Decoder::Layout(layout.clone().unbind()),
            Err(_) if decoder.is_callable() => Decoder::Callable(decoder.clone().unbind()),
            Err(_) => return Err(PyTypeError::new_err(format!("{label}: its decoder is not callable"))),
        };
        let route = PyRoute { decoder, handler: handler.clone().unbind(), label };
        self.routes.bind(py).set_item(packet_id, Bound::new(py, route)?)
    }

    /// Decodes and hands one packet to its handler; a payload that does not
    /// match (or an id without a handler) closes the session MALFORMED_PACKET
    /// instead.
    fn dispatch<'py>(
        &self,
        session: &Bound<'py, super::session::PySession>,
        packet_id: u16,
        payload: &Bound<'py, PyBytes>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.route_packet(session.as_any(), packet_id, payload.as_bytes(), |detail| {
            // Only a rejection needs the connection: a session object made
            // outside a server may still dispatch good packets (in a test).
            session.get().handle_arc()?.close_with_detail(DisconnectReason::MalformedPacket, detail);
            Ok(())
        })
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.routes)
    }
}
