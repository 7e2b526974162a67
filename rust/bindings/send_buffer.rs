//! `SendBuffer`, and the argument forms `send` and `broadcast` accept.
//!
//! A `PacketSession` sends packets: `(packet_id, payload)` or a framed
//! `SendBuffer`. A raw `Session` sends bytes as they are: any bytes-like
//! object, or a `SendBuffer` (framed or raw; on a raw stream a packet is bytes
//! too). Either way the bytes are copied into pooled memory once.

use bytes::Bytes;
use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyInt, PyType};

use super::options::{self, type_name};
use super::packet_layout::PyPacketLayout;
use crate::config::Framing;
use crate::frame::{HEADER_SIZE, MAX_WIRE_PACKET_SIZE, encode_header};
use crate::send_buffer::SendBufferPool;

/// Encoded bytes, immutable, sendable to any number of sessions: each one
/// queues a reference to the same pooled memory. Either one packet,
/// `[size][id][payload]` (`SendBuffer(packet_id, payload)`), or raw bytes for
/// raw sessions (`SendBuffer.raw(data)`).
#[pyclass(frozen, name = "SendBuffer", module = "servercore._core")]
pub struct PySendBuffer {
    bytes: Bytes,
    framed: bool,
}

#[pymethods]
impl PySendBuffer {
    #[new]
    fn new(packet_id: &Bound<'_, PyAny>, payload: &Bound<'_, PyAny>) -> PyResult<Self> {
        let id = options::packet_id(packet_id)?;
        Ok(Self { bytes: encode(id, payload, MAX_WIRE_PACKET_SIZE)?, framed: true })
    }

    /// Raw bytes, no header: what a raw `Session` puts on the wire as it is.
    #[classmethod]
    fn raw(_cls: &Bound<'_, PyType>, data: &Bound<'_, PyAny>) -> PyResult<Self> {
        Ok(Self { bytes: with_payload(data, |bytes| SendBufferPool::global().copy(bytes))?, framed: false })
    }

    /// The packet's id; None for raw bytes.
    #[getter]
    fn packet_id(&self) -> Option<u16> {
        self.framed.then(|| u16::from_le_bytes([self.bytes[2], self.bytes[3]]))
    }

    /// Bytes on the wire (a packet's header included).
    #[getter]
    fn size(&self) -> usize {
        self.bytes.len()
    }

    /// The packet's payload, or all of the raw bytes.
    #[getter]
    fn payload<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.bytes[if self.framed { HEADER_SIZE } else { 0 }..])
    }

    fn __len__(&self) -> usize {
        self.bytes.len()
    }

    /// The bytes as they go on the wire.
    fn __bytes__<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.bytes)
    }

    fn __repr__(&self) -> String {
        match self.packet_id() {
            Some(id) => format!("SendBuffer(packet_id={id}, size={})", self.bytes.len()),
            None => format!("SendBuffer.raw(size={})", self.bytes.len()),
        }
    }
}

/// Encodes `payload` into the pool, checking it against `max_packet_size`.
pub fn encode(packet_id: u16, payload: &Bound<'_, PyAny>, max_packet_size: usize) -> PyResult<Bytes> {
    with_payload(payload, |bytes| {
        check_packet_size(bytes.len(), max_packet_size)?;
        SendBufferPool::global().encode(packet_id, bytes).map_err(|e| PyValueError::new_err(e.to_string()))
    })?
}

/// What `send(...)` and `broadcast(...)` were given, as bytes for the wire of
/// a session with `framing`. A packet is checked against `max_packet_size`;
/// anything against `max_bytes`, the most one session may have queued.
pub fn bytes_from_args(
    framing: Framing,
    first: &Bound<'_, PyAny>,
    payload: Option<&Bound<'_, PyAny>>,
    max_packet_size: usize,
    max_bytes: usize,
) -> PyResult<Bytes> {
    let bytes = match framing {
        Framing::Packets => packet_from_args(first, payload, max_packet_size)?,
        Framing::Raw => raw_from_args(first, payload)?,
    };
    check_queue_room(bytes.len(), max_bytes)?;
    Ok(bytes)
}

/// Runs `f` over what `send(...)` was given, as the parts of its bytes on the
/// wire for a session with `framing`, checked like [`bytes_from_args`]: a
/// header and the caller's own payload buffer, uncopied; raw bytes; or the
/// bytes of a `SendBuffer`, which `f` also gets as the shared `Bytes` they are
/// (to queue without copying). `f` may write the parts straight to a socket.
pub fn with_wire_parts<R>(
    framing: Framing,
    first: &Bound<'_, PyAny>,
    payload: Option<&Bound<'_, PyAny>>,
    max_packet_size: usize,
    max_bytes: usize,
    f: impl FnOnce(&[&[u8]], Option<&Bytes>) -> R,
) -> PyResult<R> {
    if first.cast::<PySendBuffer>().is_ok() {
        let bytes = bytes_from_args(framing, first, payload, max_packet_size, max_bytes)?;
        return Ok(f(&[&bytes], Some(&bytes)));
    }
    match framing {
        Framing::Packets => {
            let typed = match payload {
                None => typed_packet(first)?,
                Some(_) => None,
            };
            let (id, payload) = match (typed, payload) {
                (Some((id, encoded)), _) => (id, encoded),
                (None, payload) => (options::packet_id(first)?, payload.ok_or_else(|| alone(first))?.clone()),
            };
            with_payload(&payload, |data| {
                check_packet_size(data.len(), max_packet_size)?;
                Ok(f(&[&encode_header(id, data.len()), data], None))
            })?
        }
        Framing::Raw => {
            if payload.is_some() || first.is_instance_of::<PyInt>() {
                return Err(raw_sends_bytes());
            }
            with_payload(first, |data| {
                check_queue_room(data.len(), max_bytes)?;
                Ok(f(&[data], None))
            })?
        }
    }
}

/// A typed packet (`servercore.packets.Packet`) encodes itself: its
/// `__servercore_packet__()` gives `(packet_id, payload)`, and a class whose
/// encoding is its compiled layout is encoded by it directly. None for
/// anything that is not a packet (an int, a buffer).
fn typed_packet<'py>(packet: &Bound<'py, PyAny>) -> PyResult<Option<(u16, Bound<'py, PyAny>)>> {
    if packet.is_instance_of::<PyInt>() {
        return Ok(None);
    }
    let py = packet.py();
    if let Ok(layout) = packet.get_type().getattr(pyo3::intern!(py, "__servercore_layout__"))
        && let Ok(layout) = layout.cast::<PyPacketLayout>()
        && let Some(packet_id) = layout.get().packet_id
    {
        return Ok(Some((packet_id, layout.get().encode_payload(packet)?.into_any())));
    }
    let Ok(encode) = packet.getattr(pyo3::intern!(py, "__servercore_packet__")) else { return Ok(None) };
    let (id, payload): (Bound<'py, PyAny>, Bound<'py, PyAny>) = encode.call0()?.extract()?;
    Ok(Some((options::packet_id(&id)?, payload)))
}

fn alone(packet: &Bound<'_, PyAny>) -> PyErr {
    PyTypeError::new_err(format!(
        "expected a SendBuffer, or a packet id and a payload; got {} alone",
        type_name(packet)
    ))
}

fn raw_sends_bytes() -> PyErr {
    PyTypeError::new_err(
        "a raw Session sends bytes as they are: send(data); subclass PacketSession to send \
         (packet_id, payload) packets",
    )
}

fn check_packet_size(payload_len: usize, max_packet_size: usize) -> PyResult<()> {
    let size = HEADER_SIZE + payload_len;
    if size > max_packet_size {
        return Err(PyValueError::new_err(format!(
            "payload of {payload_len} bytes makes a {size}-byte packet, over max_packet_size \
             {max_packet_size} (header of {HEADER_SIZE} included); split it or raise max_packet_size"
        )));
    }
    Ok(())
}

fn check_queue_room(len: usize, max_bytes: usize) -> PyResult<()> {
    if len > max_bytes {
        return Err(PyValueError::new_err(format!(
            "{len} bytes can never be sent: max_send_queue_bytes is {max_bytes}; send them in parts or \
             raise max_send_queue_bytes"
        )));
    }
    Ok(())
}

/// A packet session's forms: a framed `SendBuffer`, or an id and a payload.
fn packet_from_args(
    packet: &Bound<'_, PyAny>,
    payload: Option<&Bound<'_, PyAny>>,
    max_packet_size: usize,
) -> PyResult<Bytes> {
    if let Ok(buffer) = packet.cast::<PySendBuffer>() {
        let buffer = buffer.get();
        if payload.is_some() {
            return Err(PyTypeError::new_err("pass either a SendBuffer or (packet_id, payload), not both"));
        }
        if !buffer.framed {
            return Err(PyTypeError::new_err(
                "a SendBuffer.raw() holds raw bytes, not a packet: a PacketSession sends packets \
                 (SendBuffer(packet_id, payload)); raw bytes are for a raw Session",
            ));
        }
        if buffer.bytes.len() > max_packet_size {
            return Err(PyValueError::new_err(format!(
                "SendBuffer of {} bytes is over this service's max_packet_size {max_packet_size}",
                buffer.bytes.len()
            )));
        }
        return Ok(buffer.bytes.clone());
    }
    if payload.is_none()
        && let Some((id, payload)) = typed_packet(packet)?
    {
        return encode(id, &payload, max_packet_size);
    }
    let payload = payload.ok_or_else(|| alone(packet))?;
    encode(options::packet_id(packet)?, payload, max_packet_size)
}

/// A raw session's forms: bytes-like data, or a `SendBuffer`.
fn raw_from_args(data: &Bound<'_, PyAny>, payload: Option<&Bound<'_, PyAny>>) -> PyResult<Bytes> {
    if payload.is_some() || data.is_instance_of::<PyInt>() {
        return Err(raw_sends_bytes());
    }
    if let Ok(buffer) = data.cast::<PySendBuffer>() {
        return Ok(buffer.get().bytes.clone());
    }
    with_payload(data, |bytes| SendBufferPool::global().copy(bytes))
}

/// Runs `f` over the bytes of any bytes-like object without copying them first.
/// `f` must not run Python code (a bytearray could be resized under it).
pub(super) fn with_payload<R>(payload: &Bound<'_, PyAny>, f: impl FnOnce(&[u8]) -> R) -> PyResult<R> {
    if let Ok(bytes) = payload.cast::<PyBytes>() {
        return Ok(f(bytes.as_bytes()));
    }
    if let Ok(array) = payload.cast::<PyByteArray>() {
        // SAFETY: no Python code runs while `f` reads, so nothing can resize the
        // bytearray under the slice (f only copies it into the pool).
        return Ok(f(unsafe { array.as_bytes() }));
    }
    if payload.is_instance_of::<pyo3::types::PyString>() {
        return Err(PyTypeError::new_err("payload must be bytes-like, not str: encode it first"));
    }
    let buffer = PyUntypedBuffer::get(payload).map_err(|_| {
        PyTypeError::new_err(format!(
            "payload must be bytes-like (bytes, bytearray, memoryview), not {}",
            type_name(payload)
        ))
    })?;
    if !buffer.is_c_contiguous() {
        return Err(PyValueError::new_err("payload buffer must be C-contiguous"));
    }
    // SAFETY: the buffer export keeps the memory alive and in place until
    // `buffer` is dropped below; `f` only reads it.
    let bytes = unsafe { std::slice::from_raw_parts(buffer.buf_ptr() as *const u8, buffer.len_bytes()) };
    Ok(f(bytes))
}
