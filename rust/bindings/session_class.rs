//! A session class as a service sees it: how its bytes are framed, and how
//! its callbacks are called.
//!
//! Callbacks are looked up on the session object at every call, exactly as
//! `session.on_recv_packet(packet_id, payload)` in Python would: a method
//! assigned to one instance (`self.on_recv_packet = self.in_lobby`), a class
//! patched after the service was made (`unittest.mock.patch.object`), a
//! descriptor, all are honoured. The call is CPython's method call without a
//! bound method object (`PyObject_VectorcallMethod`) on an interned name, the
//! same work the interpreter does for that line of Python.
//!
//! Two things are decided once, when the service is made:
//! - whether the class overrides `on_send`. Reporting every write costs, so
//!   the engine reports writes only for a class that does; the README and
//!   the stub say so.
//! - whether it keeps `RoutedSession.on_recv_packet`. Then the engine routes
//!   its packets itself ([`super::router::route`]), through the session's
//!   `router`, which is read for every packet; an `on_recv_packet` assigned
//!   to one instance of such a class is not consulted.

use pyo3::exceptions::PyTypeError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyType;

use super::session::{PyPacketSession, PySession};
use crate::config::Framing;

pub struct SessionClass {
    cls: Py<PyType>,
    pub framing: Framing,
    /// The class overrides `on_send`: the engine reports completed writes.
    pub reports_sent: bool,
    /// The class's `on_recv_packet` is `RoutedSession`'s: the engine routes
    /// its packets itself (`router::route`).
    pub routes: bool,
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
        if !cls.is_subclass(&session_base)? {
            return Err(not_a_session());
        }
        let framing =
            if cls.is_subclass(&py.get_type::<PyPacketSession>())? { Framing::Packets } else { Framing::Raw };
        let on_send = cls.getattr(intern!(py, "on_send"))?;
        let base_on_send = session_base.getattr(intern!(py, "on_send"))?;
        let routes = framing == Framing::Packets
            && cls
                .getattr(intern!(py, "on_recv_packet"))?
                .getattr(intern!(py, "__servercore_routes__"))
                .is_ok_and(|marked| marked.is_truthy().unwrap_or(false));
        Ok(Self { cls: cls.clone().unbind(), framing, reports_sent: !on_send.is(&base_on_send), routes })
    }

    pub fn clone_ref(&self, py: Python<'_>) -> Self {
        Self {
            cls: self.cls.clone_ref(py),
            framing: self.framing,
            reports_sent: self.reports_sent,
            routes: self.routes,
        }
    }

    pub fn name(&self, py: Python<'_>) -> String {
        self.cls.bind(py).qualname().map(|n| n.to_string()).unwrap_or_default()
    }

    /// A new session object: the class called with no arguments.
    pub fn instantiate<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PySession>> {
        let object = self.cls.bind(py).call0()?;
        object
            .cast_into::<PySession>()
            .map_err(|_| PyTypeError::new_err(format!("{}() did not return a Session", self.name(py))))
    }

    pub fn cls(&self) -> &Py<PyType> {
        &self.cls
    }
}

/// The callbacks, by name, called on the session object. Each returns what
/// the callback returned: an `async def` callback's coroutine is run by the
/// asyncio driver.
pub mod callback {
    use pyo3::intern;
    use pyo3::prelude::*;

    pub fn on_connected<'py>(session: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        session.call_method0(intern!(session.py(), "on_connected"))
    }

    pub fn on_recv_packet<'py>(
        session: &Bound<'py, PyAny>,
        packet_id: u16,
        payload: Bound<'py, pyo3::types::PyBytes>,
    ) -> PyResult<Bound<'py, PyAny>> {
        session.call_method1(intern!(session.py(), "on_recv_packet"), (packet_id, payload))
    }

    pub fn on_recv<'py>(
        session: &Bound<'py, PyAny>,
        data: Bound<'py, pyo3::types::PyBytes>,
    ) -> PyResult<Bound<'py, PyAny>> {
        session.call_method1(intern!(session.py(), "on_recv"), (data,))
    }

    pub fn on_send<'py>(session: &Bound<'py, PyAny>, nbytes: usize) -> PyResult<Bound<'py, PyAny>> {
        session.call_method1(intern!(session.py(), "on_send"), (nbytes,))
    }

    pub fn on_disconnected<'py>(
        session: &Bound<'py, PyAny>,
        reason: Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        session.call_method1(intern!(session.py(), "on_disconnected"), (reason,))
    }

    /// The coroutine a callback returned, if it is an `async def` one; `None`
    /// (the common case, one comparison) for a plain callback's `None`.
    pub fn awaitable<'py>(returned: Bound<'py, PyAny>) -> Option<Bound<'py, PyAny>> {
        if returned.is_none() {
            return None;
        }
        // SAFETY: a type check on a live object.
        let coroutine = unsafe { pyo3::ffi::PyCoro_CheckExact(returned.as_ptr()) } != 0;
        (coroutine || returned.hasattr(intern!(returned.py(), "__await__")).unwrap_or(false))
            .then_some(returned)
    }
}
