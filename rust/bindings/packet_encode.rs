//! Encoding a typed packet by its class's `PacketLayout`: each field read
//! from its slot, checked against its wire type and limits, and written
//! little-endian. A value that is not of its type, or does not fit, is a
//! TypeError or ValueError naming the field and the element
//! (`Chat.tags[2]: expected str, got int`). The messages of the Python
//! encoder this replaced are kept where it had them (tests/test_packets.py).

use pyo3::exceptions::{PyOverflowError, PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyInt, PyString};

use super::options::type_name;
use super::packet_layout::{Element, Field, PyPacketLayout, Scalar, Wire};
use super::send_buffer::with_payload;

/// Why an object could not be encoded: a value of the wrong type, one that
/// does not fit, or a Python error on the way. Raised as TypeError or
/// ValueError with the field's label in front.
pub enum EncodeError {
    Type(String),
    Value(String),
    Python(PyErr),
}

impl From<PyErr> for EncodeError {
    fn from(error: PyErr) -> Self {
        Self::Python(error)
    }
}

impl EncodeError {
    /// The message with what it is about in front: `Chat.text: ...`, or an
    /// element's index (`[2]`) joined without a colon (`Chat.tags[2]: ...`).
    fn within(self, label: impl std::fmt::Display) -> Self {
        let join = |message: String| {
            if message.starts_with('[') { format!("{label}{message}") } else { format!("{label}: {message}") }
        };
        match self {
            Self::Type(message) => Self::Type(join(message)),
            Self::Value(message) => Self::Value(join(message)),
            python => python,
        }
    }

    pub fn into_py_err(self) -> PyErr {
        match self {
            Self::Type(message) => PyTypeError::new_err(message),
            Self::Value(message) => PyValueError::new_err(message),
            Self::Python(error) => error,
        }
    }
}

impl Scalar {
    /// Appends `value` as this scalar, or says what is wrong with it (the
    /// caller prefixes the field's label).
    fn write(self, value: &Bound<'_, PyAny>, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        fn int<T: for<'a, 'py> FromPyObject<'a, 'py> + ToBytes>(
            value: &Bound<'_, PyAny>,
            low: i128,
            high: i128,
            out: &mut Vec<u8>,
        ) -> Result<(), EncodeError> {
            // bool is an int to struct too; a float is not.
            if !value.is_instance_of::<PyInt>() && value.getattr(intern!(value.py(), "__index__")).is_err() {
                return Err(EncodeError::Type(format!("expected int, got {}", type_name(value))));
            }
            match value.extract::<T>().map_err(Into::<PyErr>::into) {
                Ok(number) => {
                    number.put(out);
                    Ok(())
                }
                Err(error) if error.is_instance_of::<PyOverflowError>(value.py()) => {
                    Err(EncodeError::Value(format!("{} is out of range {low}..{high}", shown(value))))
                }
                // An __index__ that raised: its own error.
                Err(error) => Err(EncodeError::Python(error)),
            }
        }
        match self {
            Self::U8 => int::<u8>(value, 0, u8::MAX.into(), out),
            Self::U16 => int::<u16>(value, 0, u16::MAX.into(), out),
            Self::U32 => int::<u32>(value, 0, u32::MAX.into(), out),
            Self::U64 => int::<u64>(value, 0, u64::MAX.into(), out),
            Self::I8 => int::<i8>(value, i8::MIN.into(), i8::MAX.into(), out),
            Self::I16 => int::<i16>(value, i16::MIN.into(), i16::MAX.into(), out),
            Self::I32 => int::<i32>(value, i32::MIN.into(), i32::MAX.into(), out),
            Self::I64 => int::<i64>(value, i64::MIN.into(), i64::MAX.into(), out),
            Self::F32 | Self::F64 => {
                let number = value.extract::<f64>().map_err(|error| {
                    if error.is_instance_of::<PyOverflowError>(value.py()) {
                        let width = if matches!(self, Self::F32) { "f32" } else { "f64" };
                        EncodeError::Value(format!("{} is too large for {width}", shown(value)))
                    } else {
                        EncodeError::Type(format!("expected float, got {}", type_name(value)))
                    }
                })?;
                if matches!(self, Self::F64) {
                    out.extend_from_slice(&number.to_le_bytes());
                    return Ok(());
                }
                // As struct's 'f': rounded to the nearest f32; only a finite
                // number that rounds to infinity does not fit.
                let single = number as f32;
                if single.is_infinite() && number.is_finite() {
                    return Err(EncodeError::Value(format!("{} is too large for f32", shown(value))));
                }
                out.extend_from_slice(&single.to_le_bytes());
                Ok(())
            }
            // As struct's '?': the truth of any object.
            Self::Bool => {
                out.push(u8::from(value.is_truthy()?));
                Ok(())
            }
        }
    }
}

/// A value for a message: a number of a thousand digits is cut short.
fn shown(value: &Bound<'_, PyAny>) -> String {
    let text = value.to_string();
    match text.char_indices().nth(24) {
        Some((cut, _)) if text.len() > 32 => format!("{}... ({} characters)", &text[..cut], text.len()),
        _ => text,
    }
}

/// A number's little-endian bytes.
trait ToBytes {
    fn put(self, out: &mut Vec<u8>);
}

macro_rules! to_bytes {
    ($($t:ty),*) => {$(
        impl ToBytes for $t {
            fn put(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}

to_bytes!(u8, u16, u32, u64, i8, i16, i32, i64);

impl PyPacketLayout {
    /// Appends `object`'s fields, in wire order. `object` must be an instance
    /// of the layout's class by its real type: `isinstance` would believe a
    /// `__class__` that lies (a `Mock(spec=...)`), and fields are read at the
    /// class's slot offsets.
    pub fn encode_into(&self, object: &Bound<'_, PyAny>, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let class = self.class.bind(object.py());
        let real = object.get_type();
        let exact = real.is(class);
        // SAFETY: a subtype test of two live type objects.
        if !exact && unsafe { pyo3::ffi::PyType_IsSubtype(real.as_type_ptr(), class.as_type_ptr()) } == 0 {
            return Err(EncodeError::Type(format!("expected {}, got {}", self.label, type_name(object))));
        }
        for field in &self.fields {
            // A subclass may have made a field a property: ask it.
            let value = field.value_of(object, exact)?;
            field.encode(&value, out).map_err(|e| e.within(&field.label))?;
        }
        Ok(())
    }

    /// `object` as a payload.
    pub fn encode_payload<'py>(&self, object: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
        let mut out = Vec::with_capacity(64);
        self.encode_into(object, &mut out).map_err(EncodeError::into_py_err)?;
        Ok(PyBytes::new(object.py(), &out))
    }
}

impl Field {
    /// The field's value on `object`, an instance of the layout's class
    /// (`exact`ly, or a subclass): its slot, or the attribute.
    fn value_of<'py>(
        &self,
        object: &Bound<'py, PyAny>,
        exact: bool,
    ) -> Result<Bound<'py, PyAny>, EncodeError> {
        if exact
            && let Some(slot) = &self.slot
            && let Some(value) = slot.load(object)
        {
            return Ok(value);
        }
        object.getattr(self.name.bind(object.py())).map_err(|error| {
            if error.is_instance_of::<pyo3::exceptions::PyAttributeError>(object.py()) {
                EncodeError::Python(pyo3::exceptions::PyAttributeError::new_err(format!(
                    "{} is not set (an object made without its __init__?)",
                    self.label
                )))
            } else {
                EncodeError::Python(error)
            }
        })
    }

    /// Appends `value` as this field (errors without the label).
    fn encode(&self, value: &Bound<'_, PyAny>, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        match &self.wire {
            Wire::Scalar(scalar) => scalar.write(value, out),
            Wire::Fixed(scalar, count) => {
                let n = length(value)?;
                if n != *count {
                    return Err(EncodeError::Value(format!("{n} elements, expected {count}")));
                }
                each_element(value, n, |item| scalar.write(&item, out))
            }
            Wire::Str { limit } => write_sized(text_bytes(value)?, *limit, out),
            Wire::Bytes { limit } => write_bytes(value, *limit, out),
            Wire::Struct(layout) => layout.get().encode_into(value, out),
            Wire::List { element, limit } => {
                let n = length(value)?;
                if n > *limit {
                    return Err(EncodeError::Value(format!("{n} elements, over its limit of {limit}")));
                }
                out.extend_from_slice(&(n as u16).to_le_bytes());
                each_element(value, n, |item| match element {
                    Element::Scalar(scalar) => scalar.write(&item, out),
                    Element::Struct(layout) => layout.get().encode_into(&item, out),
                    Element::Str => write_sized(text_bytes(&item)?, ELEMENT_LIMIT, out),
                    Element::Bytes => write_bytes(&item, ELEMENT_LIMIT, out),
                })
            }
        }
    }
}

/// The longest str or bytes element of a list: its u16 length.
const ELEMENT_LIMIT: usize = u16::MAX as usize;

/// A list's or array's length, or a TypeError saying what it was instead.
fn length(value: &Bound<'_, PyAny>) -> Result<usize, EncodeError> {
    value.len().map_err(|_| EncodeError::Type(format!("expected a list, got {}", type_name(value))))
}

/// `write` for each of the `n` elements of `values` (as many as the count
/// already written: an element's `__index__` that grows the list, or a
/// `__len__` that lies, is refused rather than sent with a wrong count); an
/// error names the element's index.
fn each_element<'py>(
    values: &Bound<'py, PyAny>,
    n: usize,
    mut write: impl FnMut(Bound<'py, PyAny>) -> Result<(), EncodeError>,
) -> Result<(), EncodeError> {
    let changed = |found: &str| {
        EncodeError::Value(format!("changed while being encoded: len() was {n}, it held {found}"))
    };
    let items = values
        .try_iter()
        .map_err(|_| EncodeError::Type(format!("expected a list, got {}", type_name(values))))?;
    let mut count = 0;
    for item in items {
        if count == n {
            return Err(changed("more"));
        }
        write(item?).map_err(|e| e.within(format_args!("[{count}]")))?;
        count += 1;
    }
    if count != n {
        return Err(changed(&count.to_string()));
    }
    Ok(())
}

/// A u16 byte count, then the bytes; refused past `limit`.
fn write_sized(bytes: &[u8], limit: usize, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    if bytes.len() > limit {
        return Err(EncodeError::Value(format!("{} bytes, over its limit of {limit}", bytes.len())));
    }
    out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

/// A str's UTF-8.
fn text_bytes<'a>(value: &'a Bound<'_, PyAny>) -> Result<&'a [u8], EncodeError> {
    let text = value
        .cast::<PyString>()
        .map_err(|_| EncodeError::Type(format!("expected str, got {}", type_name(value))))?;
    // A lone surrogate has no UTF-8.
    let encoded = text.to_str().map_err(|error| EncodeError::Value(error.value(value.py()).to_string()))?;
    Ok(encoded.as_bytes())
}

/// A bytes field's value: any bytes-like object (bytes, bytearray,
/// memoryview), counted and copied as it is.
fn write_bytes(value: &Bound<'_, PyAny>, limit: usize, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    // `write_sized` only copies: no Python runs while the buffer is read.
    with_payload(value, |bytes| write_sized(bytes, limit, out)).map_err(|error| {
        if error.is_instance_of::<PyTypeError>(value.py()) {
            EncodeError::Type(format!("expected bytes, got {}", type_name(value)))
        } else {
            EncodeError::Python(error)
        }
    })?
}
