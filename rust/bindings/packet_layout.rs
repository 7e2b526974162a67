//! `PacketLayout`: a typed packet's wire layout, compiled once per class, and
//! the decoder that turns a payload into an instance of that class.
//!
//! `servercore.packets` reads a `Packet`/`Struct` class's annotations and
//! hands the fields here in wire order; decoding is then a walk over bytes
//! that are already in Rust: no `bytes` object is made for the payload, and
//! the values go straight into the new object's attributes.
//!
//! Every length and count is checked against what is left, and against its
//! declared limit, before anything is allocated. A payload that does not match
//! is `MalformedPacket` naming the packet and the field, exactly as the
//! messages of the Python decoder this replaced (tests/test_packets.py).
//! Encoding by the same layout is [`super::packet_encode`].

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::pyclass::{PyTraverseError, PyVisit};
use pyo3::types::{PyBool, PyBytes, PyList, PyString, PyTuple, PyType};

pyo3::create_exception!(
    servercore.packets,
    MalformedPacket,
    PyValueError,
    "A payload does not match its packet's layout."
);

/// A fixed-width number on the wire (its `struct` code on the Python side).
#[derive(Clone, Copy)]
pub(super) enum Scalar {
    U8,
    U16,
    U32,
    U64,
    I8,
    I16,
    I32,
    I64,
    F32,
    F64,
    Bool,
}

impl Scalar {
    fn from_code(code: &str) -> PyResult<Self> {
        Ok(match code {
            "B" => Self::U8,
            "H" => Self::U16,
            "I" => Self::U32,
            "Q" => Self::U64,
            "b" => Self::I8,
            "h" => Self::I16,
            "i" => Self::I32,
            "q" => Self::I64,
            "f" => Self::F32,
            "d" => Self::F64,
            "?" => Self::Bool,
            other => return Err(PyValueError::new_err(format!("{other:?} is not a scalar wire code"))),
        })
    }

    pub(super) fn size(self) -> usize {
        match self {
            Self::U8 | Self::I8 | Self::Bool => 1,
            Self::U16 | Self::I16 => 2,
            Self::U32 | Self::I32 | Self::F32 => 4,
            Self::U64 | Self::I64 | Self::F64 => 8,
        }
    }

    /// The value in `bytes`, which are exactly `self.size()` long.
    fn value<'py>(self, py: Python<'py>, bytes: &[u8]) -> PyResult<Bound<'py, PyAny>> {
        fn le<const N: usize>(bytes: &[u8]) -> [u8; N] {
            bytes.try_into().expect("the caller sliced exactly the scalar's size")
        }
        Ok(match self {
            Self::U8 => bytes[0].into_pyobject(py)?.into_any(),
            Self::I8 => (bytes[0] as i8).into_pyobject(py)?.into_any(),
            Self::U16 => u16::from_le_bytes(le(bytes)).into_pyobject(py)?.into_any(),
            Self::I16 => i16::from_le_bytes(le(bytes)).into_pyobject(py)?.into_any(),
            Self::U32 => u32::from_le_bytes(le(bytes)).into_pyobject(py)?.into_any(),
            Self::I32 => i32::from_le_bytes(le(bytes)).into_pyobject(py)?.into_any(),
            Self::U64 => u64::from_le_bytes(le(bytes)).into_pyobject(py)?.into_any(),
            Self::I64 => i64::from_le_bytes(le(bytes)).into_pyobject(py)?.into_any(),
            Self::F32 => f64::from(f32::from_le_bytes(le(bytes))).into_pyobject(py)?.into_any(),
            Self::F64 => f64::from_le_bytes(le(bytes)).into_pyobject(py)?.into_any(),
            // As struct's '?': any byte but 0 is True.
            Self::Bool => PyBool::new(py, bytes[0] != 0).to_owned().into_any(),
        })
    }
}

/// How one field is laid out.
pub(super) enum Wire {
    Scalar(Scalar),
    /// Exactly `count` numbers, no count on the wire; decoded as a list.
    Fixed(Scalar, usize),
    /// u16 byte count, then UTF-8.
    Str {
        limit: usize,
    },
    /// u16 byte count, then the bytes.
    Bytes {
        limit: usize,
    },
    /// u16 element count, then the elements.
    List {
        element: Element,
        limit: usize,
    },
    /// Another layout's fields, in place.
    Struct(Py<PyPacketLayout>),
}

pub(super) enum Element {
    Scalar(Scalar),
    Str,
    Bytes,
    Struct(Py<PyPacketLayout>),
}

pub(super) struct Field {
    pub(super) name: Py<PyString>,
    /// Where the class keeps this field in its instances (from
    /// `__slots__`), when a load or a store may go straight there: the class
    /// keeps object's `__setattr__` and `__getattribute__`.
    pub(super) slot: Option<Slot>,
    /// `Class.field`, the start of every message about it.
    pub(super) label: String,
    pub(super) wire: Wire,
    /// The bytes of the run of fixed-width fields this field begins (checked
    /// once for the run, as one `unpack_from` would), or 0.
    run: usize,
}

/// Why a payload did not decode: it does not match (the message names the
/// field), or Python failed (out of memory, a raising `__setattr__`).
pub enum DecodeError {
    Malformed(String),
    Python(PyErr),
}

impl From<PyErr> for DecodeError {
    fn from(error: PyErr) -> Self {
        Self::Python(error)
    }
}

impl DecodeError {
    fn within(self, label: impl std::fmt::Display) -> Self {
        match self {
            Self::Malformed(message) => Self::Malformed(format!("{label}: {message}")),
            python => python,
        }
    }

    pub fn into_py_err(self) -> PyErr {
        match self {
            Self::Malformed(message) => MalformedPacket::new_err(message),
            Self::Python(error) => error,
        }
    }
}

type Decoded<'py> = Result<Bound<'py, PyAny>, DecodeError>;

/// Bytes being read from the front.
struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.data.len() - self.at
    }

    /// The next `n` bytes, if there are that many.
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let taken = self.data.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(taken)
    }

    /// A u16 count or length.
    fn count(&mut self) -> Option<usize> {
        self.take(2).map(|b| usize::from(u16::from_le_bytes([b[0], b[1]])))
    }
}

/// A packet or struct class's layout: `PacketLayout(cls, fields, packet_id)`,
/// each field `(name, kind, code, count, limit, nested)` as
/// `servercore.packets` reads it from the annotations. A packet class whose
/// encoding is this layout's has it as `__servercore_layout__`: `send` and
/// `broadcast` encode such a packet here, without calling Python.
#[pyclass(frozen, module = "servercore._core", name = "PacketLayout")]
pub struct PyPacketLayout {
    pub(super) class: Py<PyType>,
    pub(super) label: String,
    pub(super) fields: Vec<Field>,
    /// Every field is a scalar: a payload is exactly this long.
    scalar_size: Option<usize>,
    /// A packet class's id (None for a struct's layout).
    pub packet_id: Option<u16>,
}

type FieldSpec<'py> = (String, String, String, usize, usize, Option<Bound<'py, PyPacketLayout>>);

impl PyPacketLayout {
    /// The object in the whole of `data`: no byte may be left over.
    pub fn decode_payload<'py>(&self, py: Python<'py>, data: &[u8]) -> Decoded<'py> {
        if let Some(size) = self.scalar_size
            && data.len() != size
        {
            let label = &self.label;
            return Err(DecodeError::Malformed(format!(
                "{label}: {} bytes, its layout has {size}",
                data.len()
            )));
        }
        let mut reader = Reader { data, at: 0 };
        let object = self.decode_from(py, &mut reader)?;
        match reader.left() {
            0 => Ok(object),
            left => Err(DecodeError::Malformed(format!("{}: {left} trailing bytes", self.label))),
        }
    }

    fn decode_from<'py>(&self, py: Python<'py>, reader: &mut Reader<'_>) -> Decoded<'py> {
        let object = new_instance(self.class.bind(py))?;
        for field in &self.fields {
            if field.run > reader.left() {
                return Err(DecodeError::Malformed(format!(
                    "{}: {} bytes left, the fixed fields need {}",
                    field.label,
                    reader.left(),
                    field.run
                )));
            }
            let value = field.decode(py, reader)?;
            match &field.slot {
                Some(slot) => slot.store(&object, value),
                None => object.setattr(field.name.bind(py), value)?,
            }
        }
        Ok(object)
    }
}

impl Field {
    fn decode<'py>(&self, py: Python<'py>, reader: &mut Reader<'_>) -> Decoded<'py> {
        let label = &self.label;
        // The run was checked as a whole: this only fails on a bug.
        let left = reader.left();
        let short = || DecodeError::Malformed(format!("{label}: {left} bytes left"));
        match &self.wire {
            Wire::Scalar(scalar) => {
                let bytes = reader.take(scalar.size()).ok_or_else(short)?;
                Ok(scalar.value(py, bytes)?)
            }
            Wire::Fixed(scalar, count) => {
                let bytes = reader.take(scalar.size() * count).ok_or_else(short)?;
                scalars(py, *scalar, bytes)
            }
            Wire::Str { limit } => {
                let bytes = self.sized(reader, *limit)?;
                let text = std::str::from_utf8(bytes)
                    .map_err(|_| DecodeError::Malformed(format!("{label}: invalid UTF-8")))?;
                Ok(PyString::new(py, text).into_any())
            }
            Wire::Bytes { limit } => Ok(PyBytes::new(py, self.sized(reader, *limit)?).into_any()),
            Wire::Struct(layout) => layout.get().decode_from(py, reader).map_err(|e| e.within(label)),
            Wire::List { element, limit } => {
                let n = self.count(reader, *limit, "elements")?;
                match element {
                    Element::Scalar(scalar) => {
                        let need = n * scalar.size();
                        let bytes = reader.take(need).ok_or_else(|| {
                            DecodeError::Malformed(format!(
                                "{label}: {n} elements announced, {} bytes left",
                                reader.left()
                            ))
                        })?;
                        scalars(py, *scalar, bytes)
                    }
                    Element::Struct(layout) => {
                        let items = PyList::empty(py);
                        for index in 0..n {
                            let item = layout
                                .get()
                                .decode_from(py, reader)
                                .map_err(|e| e.within(format_args!("{label}[{index}]")))?;
                            items.append(item)?;
                        }
                        Ok(items.into_any())
                    }
                    Element::Str | Element::Bytes => {
                        let items = PyList::empty(py);
                        for _ in 0..n {
                            let m = reader.count().ok_or_else(|| {
                                DecodeError::Malformed(format!(
                                    "{label}: an element has no room for its length"
                                ))
                            })?;
                            let left = reader.left();
                            let bytes = reader.take(m).ok_or_else(|| {
                                DecodeError::Malformed(format!(
                                    "{label}: an element of {m} bytes, {left} left"
                                ))
                            })?;
                            if matches!(element, Element::Str) {
                                let text = std::str::from_utf8(bytes)
                                    .map_err(|_| DecodeError::Malformed(format!("{label}: invalid UTF-8")))?;
                                items.append(PyString::new(py, text))?;
                            } else {
                                items.append(PyBytes::new(py, bytes))?;
                            }
                        }
                        Ok(items.into_any())
                    }
                }
            }
        }
    }

    /// A u16 count, refused past `limit` before anything is allocated.
    fn count(&self, reader: &mut Reader<'_>, limit: usize, what: &str) -> Result<usize, DecodeError> {
        let label = &self.label;
        let n = reader
            .count()
            .ok_or_else(|| DecodeError::Malformed(format!("{label}: no room for its count")))?;
        if n > limit {
            return Err(DecodeError::Malformed(format!("{label}: {n} {what}, over its limit of {limit}")));
        }
        Ok(n)
    }

    /// A str's or bytes' counted bytes.
    fn sized<'a>(&self, reader: &mut Reader<'a>, limit: usize) -> Result<&'a [u8], DecodeError> {
        let n = self.count(reader, limit, "bytes")?;
        let left = reader.left();
        reader.take(n).ok_or_else(|| {
            DecodeError::Malformed(format!("{}: {n} bytes announced, {left} left", self.label))
        })
    }
}

/// Consecutive numbers as a list.
fn scalars<'py>(py: Python<'py>, scalar: Scalar, bytes: &[u8]) -> Decoded<'py> {
    let values =
        bytes.chunks_exact(scalar.size()).map(|b| scalar.value(py, b)).collect::<PyResult<Vec<_>>>()?;
    Ok(PyList::new(py, values)?.into_any())
}

/// A field's place in the instances of one class: a `__slots__` member.
pub(super) struct Slot {
    /// The member descriptor, kept with the offset it describes.
    descriptor: Py<PyAny>,
    /// Bytes from the start of the object to the field's pointer.
    offset: isize,
}

impl Slot {
    /// Whether `cls` keeps object's `__setattr__` and `__getattribute__`, so
    /// that its slots may be loaded and stored directly; a class's own hook
    /// must be asked instead.
    fn usable(cls: &Bound<'_, PyType>) -> PyResult<bool> {
        let object = cls.py().get_type::<PyAny>();
        for hook in [intern!(cls.py(), "__setattr__"), intern!(cls.py(), "__getattribute__")] {
            if !cls.getattr(hook)?.is(object.getattr(hook)?) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The member `cls` has for `name` (from `__slots__`), if it is a plain
    /// writable object slot that applies to `cls`.
    fn of(cls: &Bound<'_, PyType>, name: &Bound<'_, PyString>) -> PyResult<Option<Self>> {
        for klass in cls.mro().iter() {
            let Some(found) = klass.cast::<PyType>()?.getattr("__dict__")?.get_item(name).ok() else {
                continue;
            };
            // SAFETY: a type check on a live object against a static type
            // object; then reading the member definition a member descriptor
            // points to, which lives as long as its class (`cls` or a base,
            // kept by the layout).
            let slot = unsafe {
                let member_type = std::ptr::addr_of_mut!(pyo3::ffi::PyMemberDescr_Type);
                if pyo3::ffi::PyObject_TypeCheck(found.as_ptr(), member_type) == 0 {
                    return Ok(None);
                }
                let descriptor = found.as_ptr().cast::<pyo3::ffi::PyMemberDescrObject>();
                // A descriptor taken from another class (`x = Other.__dict__["x"]`)
                // describes that class's instances, not these.
                if pyo3::ffi::PyType_IsSubtype(cls.as_type_ptr(), (*descriptor).d_common.d_type) == 0 {
                    return Ok(None);
                }
                let member = &*(*descriptor).d_member.cast::<pyo3::ffi::PyMemberDef>();
                let plain = member.type_code == pyo3::ffi::Py_T_OBJECT_EX
                    && member.flags & pyo3::ffi::Py_READONLY == 0;
                plain.then_some(member.offset)
            };
            return Ok(slot.map(|offset| Self { descriptor: found.unbind(), offset }));
        }
        Ok(None)
    }

    /// `object.name`, for an instance of the class the slot was found for;
    /// None if the slot is empty (never set: `getattr` says so).
    pub(super) fn load<'py>(&self, object: &Bound<'py, PyAny>) -> Option<Bound<'py, PyAny>> {
        // SAFETY: as for `store`; the slot holds an owned reference or NULL,
        // and the new reference taken here is the returned Bound's.
        unsafe {
            let place = object.as_ptr().cast::<u8>().offset(self.offset).cast::<*mut pyo3::ffi::PyObject>();
            Bound::from_borrowed_ptr_or_opt(object.py(), *place)
        }
    }

    /// `object.name = value` for an `object` just made by `new_instance`:
    /// its slots are all still empty, so there is nothing to release.
    fn store(&self, object: &Bound<'_, PyAny>, value: Bound<'_, PyAny>) {
        // SAFETY: `object` is an instance of the class this slot was found
        // for (or a base's slot, at the same offset in every subclass); the
        // slot holds an owned reference, which `value` gives up. A slot that
        // was already set (a field twice in a layout, which packets.py does
        // not make) is released, not leaked.
        unsafe {
            let place = object.as_ptr().cast::<u8>().offset(self.offset).cast::<*mut pyo3::ffi::PyObject>();
            let old = std::mem::replace(&mut *place, value.into_ptr());
            pyo3::ffi::Py_XDECREF(old);
        }
    }
}

/// `object.__new__(cls)`: the instance without `__init__`, as pickle makes it
/// (its fields are set next).
fn new_instance<'py>(cls: &Bound<'py, PyType>) -> PyResult<Bound<'py, PyAny>> {
    let py = cls.py();
    let args = PyTuple::empty(py);
    // SAFETY: object's tp_new with a type object and an empty tuple, as
    // `object.__new__(cls)` calls it; the result is a new reference or NULL
    // with an exception set.
    unsafe {
        let object_new =
            (*std::ptr::addr_of!(pyo3::ffi::PyBaseObject_Type)).tp_new.expect("object has tp_new");
        let made = object_new(cls.as_type_ptr(), args.as_ptr(), std::ptr::null_mut());
        Bound::from_owned_ptr_or_err(py, made)
    }
}

/// The base class, if any, whose C-level `__new__` instances of `cls` need
/// (dict, a PyO3 class): `object.__new__(cls)` would refuse them, and the
/// decoder, which makes instances as it does without its check, must not
/// make them. A `__new__` written in Python is skipped, as pickle skips it,
/// down to the C-level one it ends in (CPython's own rule in tp_new_wrapper).
fn base_with_its_own_new(cls: &Bound<'_, PyType>) -> PyResult<Option<String>> {
    let py = cls.py();
    // SAFETY: reading type slots of live type objects; `tp_base` of a type
    // is NULL or a type kept alive by it.
    unsafe {
        let object_new =
            (*std::ptr::addr_of!(pyo3::ffi::PyBaseObject_Type)).tp_new.expect("object has tp_new");
        let mut ty = cls.as_type_ptr();
        while !ty.is_null() {
            let Some(tp_new) = (*ty).tp_new else { return Ok(None) };
            if std::ptr::fn_addr_eq(tp_new, object_new) {
                return Ok(None);
            }
            let klass =
                Bound::from_borrowed_ptr(py, ty.cast::<pyo3::ffi::PyObject>()).cast_into::<PyType>()?;
            let heap = (*ty).tp_flags & pyo3::ffi::Py_TPFLAGS_HEAPTYPE != 0;
            let python_new = klass.getattr(intern!(py, "__dict__"))?.get_item(intern!(py, "__new__")).ok();
            let written_in_python =
                python_new.is_some_and(|new| new.hasattr(intern!(py, "__func__")).unwrap_or(false));
            if !(heap && written_in_python) {
                // Name the class that wrote that C-level `__new__` (dict),
                // not one that inherited it.
                let owner = klass.mro().iter().find(|owner| {
                    owner
                        .getattr(intern!(py, "__dict__"))
                        .and_then(|d| d.get_item(intern!(py, "__new__")))
                        .is_ok_and(|new| !new.hasattr(intern!(py, "__func__")).unwrap_or(false))
                });
                let owner = owner.unwrap_or_else(|| klass.clone().into_any());
                return Ok(Some(owner.cast::<PyType>()?.qualname()?.to_string()));
            }
            ty = (*ty).tp_base;
        }
    }
    Ok(None)
}

#[pymethods]
impl PyPacketLayout {
    #[new]
    #[pyo3(signature = (cls, fields, packet_id = None))]
    fn new(cls: Bound<'_, PyType>, fields: Vec<FieldSpec<'_>>, packet_id: Option<u16>) -> PyResult<Self> {
        let py = cls.py();
        let label = cls.name()?.to_string();
        if let Some(base) = base_with_its_own_new(&cls)? {
            return Err(PyTypeError::new_err(format!(
                "{label}: a packet or struct class cannot also extend {base}, which makes its instances \
                 itself (the decoder makes them as object.__new__ does)"
            )));
        }
        let slots_usable = Slot::usable(&cls)?;
        let mut compiled: Vec<Field> = Vec::with_capacity(fields.len());
        for (name, kind, code, count, limit, nested) in fields {
            let layout = || {
                nested.as_ref().map(|l| l.clone().unbind()).ok_or_else(|| {
                    PyTypeError::new_err(format!("{label}.{name}: a {kind} field needs its struct's layout"))
                })
            };
            let wire = match kind.as_str() {
                "scalar" => Wire::Scalar(Scalar::from_code(&code)?),
                "fixed" => Wire::Fixed(Scalar::from_code(&code)?, count),
                "str" => Wire::Str { limit },
                "bytes" => Wire::Bytes { limit },
                "struct" => Wire::Struct(layout()?),
                "list:scalar" => Wire::List { element: Element::Scalar(Scalar::from_code(&code)?), limit },
                "list:str" => Wire::List { element: Element::Str, limit },
                "list:bytes" => Wire::List { element: Element::Bytes, limit },
                "list:struct" => Wire::List { element: Element::Struct(layout()?), limit },
                other => {
                    return Err(PyValueError::new_err(format!(
                        "{label}.{name}: unknown field kind {other:?}"
                    )));
                }
            };
            let fixed = match &wire {
                Wire::Scalar(scalar) => Some(scalar.size()),
                Wire::Fixed(scalar, count) => Some(scalar.size() * count),
                _ => None,
            };
            // A fixed-width field extends the run before it, or begins one.
            let mut run = fixed.unwrap_or(0);
            if let Some(size) = fixed
                && let Some(start) = run_start(&compiled)
            {
                compiled[start].run += size;
                run = 0;
            }
            let field_label = format!("{label}.{name}");
            let name = PyString::intern(py, &name);
            let slot = if slots_usable { Slot::of(&cls, &name)? } else { None };
            compiled.push(Field { name: name.unbind(), slot, label: field_label, wire, run });
        }
        let scalar_size = compiled
            .iter()
            .map(|f| match f.wire {
                Wire::Scalar(scalar) => Some(scalar.size()),
                _ => None,
            })
            .sum::<Option<usize>>();
        Ok(Self { class: cls.unbind(), label, fields: compiled, scalar_size, packet_id })
    }

    /// The object in `payload` (any bytes-like object); MalformedPacket if it
    /// does not match the layout.
    fn decode<'py>(&self, payload: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let py = payload.py();
        let result = match payload.cast::<PyBytes>() {
            Ok(bytes) => self.decode_payload(py, bytes.as_bytes()),
            // bytearray, memoryview: any buffer; anything else is a TypeError.
            Err(_) => self.decode_payload(py, &PyBuffer::<u8>::get(payload)?.to_vec(py)?),
        };
        result.map_err(DecodeError::into_py_err)
    }

    /// `object`'s fields as a payload; TypeError or ValueError naming the
    /// field if one is not of its wire type or does not fit.
    fn encode<'py>(&self, object: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
        self.encode_payload(object)
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.class)?;
        for field in &self.fields {
            if let Some(slot) = &field.slot {
                visit.call(&slot.descriptor)?;
            }
            match &field.wire {
                Wire::Struct(layout) | Wire::List { element: Element::Struct(layout), .. } => {
                    visit.call(layout)?
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// The field that begins the run of fixed-width fields at the end of
/// `fields`, if the last field is fixed-width.
fn run_start(fields: &[Field]) -> Option<usize> {
    let mut start = None;
    for (index, field) in fields.iter().enumerate().rev() {
        match field.wire {
            Wire::Scalar(_) | Wire::Fixed(..) => start = Some(index),
            _ => break,
        }
    }
    start
}
