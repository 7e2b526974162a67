//! `Session` and `PacketSession`: the base classes game code subclasses.
//!
//! Instances are made by a `Server` or `Client`, one per connection, by calling
//! the session class with no arguments; the connection is attached right after.
//! `send` and `disconnect` only touch the Rust handle: they never call back into
//! Python, so nothing can re-enter game code from inside them.

use std::marker::PhantomData;
use std::mem::ManuallyDrop;
use std::ops::Deref;
use std::ptr;
use std::sync::Arc;
use std::sync::atomic::{AtomicPtr, Ordering};

use bytes::Bytes;
use pyo3::exceptions::{PyRuntimeError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple, PyType};

use super::send_buffer::{bytes_from_args, with_wire_parts};
use crate::coalesce;
use crate::config::{Framing, SessionConfig};
use crate::reason::DisconnectReason;
use crate::send_buffer::SendBufferPool;
use crate::send_queue::Push;
use crate::session::{SessionHandle, SessionId};

/// What `broadcast(...)` was given (a service's or a room's), for sessions
/// configured by `config`: the bytes, encoded once, and the session to skip.
pub fn broadcast_args(
    config: &SessionConfig,
    packet: &Bound<'_, PyAny>,
    payload: Option<&Bound<'_, PyAny>>,
    exclude: Option<&Bound<'_, PySession>>,
) -> PyResult<(Bytes, Option<SessionId>)> {
    let max_packet = config.frame_limits.max_packet_size;
    let bytes = bytes_from_args(config.framing, packet, payload, max_packet, config.max_send_queue_bytes)?;
    let exclude = exclude.map(|s| s.get().session_id()).transpose()?;
    Ok((bytes, exclude.map(SessionId)))
}

/// A connection's byte stream; override `on_recv` and return how many bytes you
/// consumed. The lecture's `Session`.
#[pyclass(subclass, frozen, name = "Session", module = "servercore._core")]
#[derive(Default)]
pub struct PySession {
    handle: HandleSlot,
}

impl PySession {
    pub fn attach(&self, handle: Arc<SessionHandle>) {
        // The object was created for this connection a moment ago.
        self.handle.set(handle);
    }

    /// Queues what `send` was given, as bytes for the wire of `framing`.
    fn send_as(
        &self,
        framing: Framing,
        first: &Bound<'_, PyAny>,
        payload: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        let handle = self.handle()?;
        let (max_packet, max_queue) = (handle.max_packet_size(), handle.max_send_queue_bytes());
        let outcome = with_wire_parts(framing, first, payload, max_packet, max_queue, |parts, shared| {
            coalesce::send_parts(&handle, parts, || match shared {
                Some(bytes) => bytes.clone(),
                None => SendBufferPool::global().copy_parts(parts),
            })
        })?;
        Ok(outcome == Push::Queued)
    }

    pub fn session_id(&self) -> PyResult<u64> {
        Ok(self.handle()?.id().0)
    }

    /// The session's handle, counted: for what keeps it (a room).
    pub fn handle_arc(&self) -> PyResult<Arc<SessionHandle>> {
        let handle = self.handle()?;
        Ok(Arc::clone(&handle))
    }

    fn handle(&self) -> PyResult<HandleRef<'_>> {
        self.handle.get().ok_or_else(|| {
            PyRuntimeError::new_err(
                "this session has no connection: sessions are created by a Server or Client, \
                 which call the session class for each connection",
            )
        })
    }
}

#[pymethods]
impl PySession {
    #[new]
    #[pyo3(signature = (*_args, **_kwargs))]
    fn new(_args: &Bound<'_, PyTuple>, _kwargs: Option<&Bound<'_, PyDict>>) -> Self {
        // Arguments belong to the subclass's __init__.
        Self::default()
    }

    /// The session's number, unique within its server or client.
    #[getter]
    fn id(&self) -> PyResult<u64> {
        Ok(self.handle()?.id().0)
    }

    /// The peer's `(host, port)`.
    #[getter]
    fn peer(&self) -> PyResult<(String, u16)> {
        let peer = self.handle()?.peer();
        Ok((peer.ip().to_string(), peer.port()))
    }

    /// Bytes queued on this session and not yet taken by the kernel: how far
    /// the peer is behind. At `max_send_queue_bytes` the session is cut.
    #[getter]
    fn send_queue_bytes(&self) -> usize {
        self.handle.get().map_or(0, |h| h.send_queue_bytes())
    }

    /// True until the session starts closing.
    #[getter]
    fn connected(&self) -> bool {
        self.handle.get().is_some_and(|h| h.is_connected())
    }

    /// Queues bytes to go on the wire as they are: any bytes-like object or a
    /// `SendBuffer`. Returns False if the session is closing (or this send
    /// overflowed its queue, which closes it with SEND_QUEUE_FULL). Never blocks.
    #[pyo3(signature = (data, payload=None, /))]
    fn send(&self, data: &Bound<'_, PyAny>, payload: Option<&Bound<'_, PyAny>>) -> PyResult<bool> {
        self.send_as(Framing::Raw, data, payload)
    }

    /// Closes the session after flushing what was already queued (bounded by the
    /// linger). Idempotent; `on_disconnected` follows exactly once, after the
    /// socket is closed. Returns whether this call started the close.
    fn disconnect(&self) -> PyResult<bool> {
        Ok(self.handle()?.close(DisconnectReason::ClosedLocally))
    }

    /// For `servercore.packets.Router`: closes the session with
    /// MALFORMED_PACKET, `detail` (which packet, what was wrong) in its one
    /// farewell log line. Whether this call closed it.
    fn _reject_malformed(&self, detail: String) -> PyResult<bool> {
        Ok(self.handle()?.close_with_detail(DisconnectReason::MalformedPacket, detail))
    }

    fn on_connected(&self) {}

    /// Raw sessions: called with every unconsumed byte so far; return how many
    /// were consumed. The rest is shown again with the next bytes.
    fn on_recv(&self, data: &Bound<'_, PyBytes>) -> usize {
        data.as_bytes().len()
    }

    /// Called after a write handed `nbytes` to the kernel; only if overridden.
    #[allow(unused_variables)]
    fn on_send(&self, nbytes: usize) {}

    #[allow(unused_variables)]
    fn on_disconnected(&self, reason: &Bound<'_, PyAny>) {}

    fn __repr__(slf: &Bound<'_, Self>) -> PyResult<String> {
        let class = slf.get_type().qualname()?;
        Ok(match slf.get().handle.get() {
            None => format!("<{class} (not connected to a service)>"),
            Some(h) => format!(
                "<{class} id={} peer={} {}>",
                h.id(),
                h.peer(),
                if h.is_connected() { "connected" } else { "disconnected" }
            ),
        })
    }
}

/// A session that speaks `[size u16][id u16][payload]`: packets are checked and
/// cut in Rust and delivered whole to `on_recv_packet`. `on_recv` is sealed.
#[pyclass(extends = PySession, subclass, frozen, name = "PacketSession", module = "servercore._core")]
pub struct PyPacketSession;

#[pymethods]
impl PyPacketSession {
    #[new]
    #[pyo3(signature = (*_args, **_kwargs))]
    fn new(_args: &Bound<'_, PyTuple>, _kwargs: Option<&Bound<'_, PyDict>>) -> PyClassInitializer<Self> {
        PyClassInitializer::from(PySession::default()).add_subclass(PyPacketSession)
    }

    /// Queues a packet: `send(packet_id, payload)` or `send(send_buffer)`.
    /// Returns False if the session is closing (or this send overflowed its
    /// queue, which closes it with SEND_QUEUE_FULL). Never blocks.
    #[pyo3(signature = (packet, payload=None, /))]
    fn send(
        slf: &Bound<'_, Self>,
        packet: &Bound<'_, PyAny>,
        payload: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        slf.as_super().get().send_as(Framing::Packets, packet, payload)
    }

    /// Seals `on_recv`: framing is done in Rust, where a lying header costs
    /// nothing but its own session. An `on_recv` from anywhere in the class's
    /// ancestry (a mixin, say) would be silently ignored, so it is refused.
    #[classmethod]
    #[pyo3(signature = (**_kwargs))]
    fn __init_subclass__(cls: &Bound<'_, PyType>, _kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<()> {
        let py = cls.py();
        let found = py.import("inspect")?.call_method1("getattr_static", (cls, "on_recv"))?;
        let sealed = py.get_type::<PySession>().getattr("__dict__")?.get_item("on_recv")?;
        if !found.is(&sealed) {
            return Err(PyTypeError::new_err(format!(
                "{}: PacketSession.on_recv is sealed (found one in {}); override \
                 on_recv_packet(packet_id, payload) instead, or subclass Session to handle the raw \
                 byte stream",
                cls.qualname()?,
                defining_class(cls, "on_recv")?
            )));
        }
        Ok(())
    }

    #[allow(unused_variables)]
    fn on_recv_packet(&self, packet_id: u16, payload: &Bound<'_, PyBytes>) {}
}

/// The name of the first class in `cls`'s method resolution order whose own
/// namespace defines `name`.
fn defining_class(cls: &Bound<'_, PyType>, name: &str) -> PyResult<String> {
    for klass in cls.getattr("__mro__")?.try_iter()? {
        let klass = klass?;
        if klass.getattr("__dict__")?.contains(name)? {
            return Ok(klass.getattr("__qualname__")?.to_string());
        }
    }
    Ok(cls.qualname()?.to_string())
}

/// A session object's handle, set once when its connection is attached: one
/// word (a `OnceLock<Arc<_>>` takes two, and each of ten thousand session
/// objects pays for it: it decides the object's allocation size class).
#[derive(Default)]
struct HandleSlot(AtomicPtr<SessionHandle>);

impl HandleSlot {
    /// Keeps `handle` unless one is set already.
    fn set(&self, handle: Arc<SessionHandle>) {
        let raw = Arc::into_raw(handle).cast_mut();
        if self.0.compare_exchange(ptr::null_mut(), raw, Ordering::AcqRel, Ordering::Acquire).is_err() {
            // SAFETY: `raw` came from `Arc::into_raw` just above and was not stored.
            drop(unsafe { Arc::from_raw(raw) });
        }
    }

    fn get(&self) -> Option<HandleRef<'_>> {
        let raw = self.0.load(Ordering::Acquire);
        // SAFETY: a non-null pointer came from `Arc::into_raw` in `set`, and the
        // slot keeps that reference until it is dropped, which the borrow of
        // `self` in the returned guard outlives. The guard never drops it.
        (!raw.is_null())
            .then(|| HandleRef { arc: ManuallyDrop::new(unsafe { Arc::from_raw(raw) }), slot: PhantomData })
    }
}

impl Drop for HandleSlot {
    fn drop(&mut self) {
        let raw = *self.0.get_mut();
        if !raw.is_null() {
            // SAFETY: the reference `set` stored, released exactly once, here.
            drop(unsafe { Arc::from_raw(raw) });
        }
    }
}

/// The slot's handle, borrowed: an `Arc` that is not counted and never dropped.
struct HandleRef<'a> {
    arc: ManuallyDrop<Arc<SessionHandle>>,
    slot: PhantomData<&'a HandleSlot>,
}

impl Deref for HandleRef<'_> {
    type Target = Arc<SessionHandle>;

    fn deref(&self) -> &Arc<SessionHandle> {
        &self.arc
    }
}
