//! `SendBuffer`, and the argument forms `send` and `broadcast` accept.

use bytes::Bytes;
use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes};

use crate::frame::{HEADER_SIZE, MAX_WIRE_PACKET_SIZE};
use crate::send_buffer::SendBufferPool;

/// One encoded packet, `[size][id][payload]`, immutable. Send it to any number of
/// sessions: each one queues a reference to the same pooled bytes.
#[pyclass(frozen, name = "SendBuffer", module = "servercore._core")]
pub struct PySendBuffer {
    pub(crate) packet: Bytes,
}

#[pymethods]
impl PySendBuffer {
    #[new]
    fn new(packet_id: &Bound<'_, PyAny>, payload: &Bound<'_, PyAny>) -> PyResult<Self> {
        let packet_id = packet_id_from(packet_id)?;
        Ok(Self { packet: encode(packet_id, payload, MAX_WIRE_PACKET_SIZE)? })
    }

    #[getter]
    fn packet_id(&self) -> u16 {
        u16::from_le_bytes([self.packet[2], self.packet[3]])
    }

    /// The whole packet, header included.
    #[getter]
    fn size(&self) -> usize {
        self.packet.len()
    }

    #[getter]
    fn payload<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.packet[HEADER_SIZE..])
    }

    fn __len__(&self) -> usize {
        self.packet.len()
    }

    /// The encoded packet as it goes on the wire.
    fn __bytes__<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.packet)
    }

    fn __repr__(&self) -> String {
        format!("SendBuffer(packet_id={}, size={})", self.packet_id(), self.packet.len())
    }
}

/// Encodes `payload` into the pool, checking it against `max_packet_size`.
pub fn encode(packet_id: u16, payload: &Bound<'_, PyAny>, max_packet_size: usize) -> PyResult<Bytes> {
    with_payload(payload, |bytes| {
        let size = HEADER_SIZE + bytes.len();
        if size > max_packet_size {
            return Err(PyValueError::new_err(format!(
                "payload of {} bytes makes a {size}-byte packet, over max_packet_size {max_packet_size} \
                 (header of {HEADER_SIZE} included); split it or raise max_packet_size",
                bytes.len()
            )));
        }
        SendBufferPool::global().encode(packet_id, bytes).map_err(|e| PyValueError::new_err(e.to_string()))
    })?
}

/// What `send(...)` and `broadcast(...)` were given: a `SendBuffer`, or an id
/// and a payload to encode.
pub fn packet_from_args(
    packet: &Bound<'_, PyAny>,
    payload: Option<&Bound<'_, PyAny>>,
    max_packet_size: usize,
) -> PyResult<Bytes> {
    if let Ok(buffer) = packet.cast::<PySendBuffer>() {
        if payload.is_some() {
            return Err(PyTypeError::new_err("pass either a SendBuffer or (packet_id, payload), not both"));
        }
        let packet = buffer.get().packet.clone();
        if packet.len() > max_packet_size {
            return Err(PyValueError::new_err(format!(
                "SendBuffer of {} bytes is over this service's max_packet_size {max_packet_size}",
                packet.len()
            )));
        }
        return Ok(packet);
    }
    let Some(payload) = payload else {
        return Err(PyTypeError::new_err(format!(
            "expected a SendBuffer, or a packet id and a payload; got {} alone",
            packet.get_type().name()?
        )));
    };
    encode(packet_id_from(packet)?, payload, max_packet_size)
}

pub fn packet_id_from(value: &Bound<'_, PyAny>) -> PyResult<u16> {
    let id: i64 = value.extract().map_err(|_| {
        PyTypeError::new_err(format!(
            "packet_id must be an int, not {}",
            value.get_type().name().map(|n| n.to_string()).unwrap_or_default()
        ))
    })?;
    u16::try_from(id)
        .map_err(|_| PyValueError::new_err(format!("packet_id must be between 0 and 65535, got {id}")))
}

/// Runs `f` over the bytes of any bytes-like object without copying them first.
fn with_payload<R>(payload: &Bound<'_, PyAny>, f: impl FnOnce(&[u8]) -> R) -> PyResult<R> {
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
            payload.get_type().name().map(|n| n.to_string()).unwrap_or_default()
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
