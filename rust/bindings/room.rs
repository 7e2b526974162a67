//! `Room`: a group of sessions to broadcast to, kept in the engine
//! ([`crate::room`]). Each member's Python session object is kept with it, so
//! iterating a room gives the objects; a session leaves its rooms by itself
//! when it ends.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::pyclass::{PyTraverseError, PyVisit};
use pyo3::types::PyList;

use super::session::{PySession, broadcast_args};
use crate::room::{JoinError, Room};
use crate::session::SessionId;

#[pyclass(frozen, module = "servercore._core", name = "Room")]
pub struct PyRoom {
    room: Room<Py<PyAny>>,
}

fn session_of<'a, 'py>(session: &'a Bound<'py, PyAny>) -> PyResult<&'a Bound<'py, PySession>> {
    session.cast::<PySession>().map_err(|_| {
        PyTypeError::new_err(format!("a Room holds sessions, not {}", super::options::type_name(session)))
    })
}

impl PyRoom {
    /// A Python `Room` over an engine room (the bus keeps another handle on it).
    pub fn wrapping(room: Room<Py<PyAny>>) -> Self {
        Self { room }
    }
}

#[pymethods]
impl PyRoom {
    #[new]
    fn new() -> Self {
        Self { room: Room::default() }
    }

    /// Adds `session`. Returns whether it is a new member: False if it was one
    /// already, or has ended (it would have left at once).
    fn add(&self, session: &Bound<'_, PyAny>) -> PyResult<bool> {
        let handle = session_of(session)?.get().handle_arc()?;
        self.room.add(&handle, session.clone().unbind()).map_err(|error| match error {
            JoinError::OtherService => PyValueError::new_err(
                "a Room holds the sessions of one Server or Client; this session is another's",
            ),
        })
    }

    /// Takes `session` out; whether it was a member.
    fn remove(&self, session: &Bound<'_, PyAny>) -> PyResult<bool> {
        let id = session_of(session)?.get().session_id()?;
        Ok(self.room.remove(SessionId(id)).is_some())
    }

    /// Takes every session out.
    fn clear(&self) {
        drop(self.room.clear());
    }

    /// Queues one packet on every member (but `exclude`): `broadcast(packet_id,
    /// payload)` or `broadcast(send_buffer)`, encoded once. Returns how many
    /// sessions it was queued on.
    #[pyo3(signature = (packet, payload=None, /, *, exclude=None))]
    fn broadcast(
        &self,
        packet: &Bound<'_, PyAny>,
        payload: Option<&Bound<'_, PyAny>>,
        exclude: Option<&Bound<'_, PySession>>,
    ) -> PyResult<usize> {
        // Before its first member a room belongs to no service yet: there is
        // no framing to encode for, and no one to send to.
        let Some(context) = self.room.context() else { return Ok(0) };
        let (bytes, exclude) = broadcast_args(&context.config, packet, payload, exclude)?;
        Ok(self.room.broadcast(&bytes, exclude).queued)
    }

    fn __contains__(&self, session: &Bound<'_, PyAny>) -> bool {
        match session.cast::<PySession>().ok().and_then(|s| s.get().session_id().ok()) {
            Some(id) => self.room.contains(SessionId(id)),
            None => false,
        }
    }

    fn __len__(&self) -> usize {
        self.room.len()
    }

    /// The members, in the order they connected (a snapshot).
    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let members = self.room.values(|object| object.clone_ref(py));
        PyList::new(py, members)?.try_iter().map(Bound::into_any)
    }

    fn __repr__(&self) -> String {
        format!("<Room of {} sessions>", self.room.len())
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        self.room.try_for_each(|object| visit.call(object))
    }

    fn __clear__(&self) {
        drop(self.room.clear());
    }
}
