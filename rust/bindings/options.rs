//! Python values to engine values: the keyword options of `Server(...)` and
//! `Client(...)`, and every number a method takes (ports, counts, packet ids,
//! timeouts).
//!
//! The ranges are the engine's (`config::limits`); this module only
//! translates, so a value out of range gets the same message whichever way
//! it came in, and nothing from Python reaches the engine unchecked.

use std::time::Duration;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyString};

use crate::config::{ConfigError, Count, Keepalive, Seconds, ServiceConfig, limits};

/// Which service the options are for: some options belong to one only.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Server => "Server",
            Role::Client => "Client",
        }
    }
}

pub fn value_error(error: ConfigError) -> PyErr {
    PyValueError::new_err(error.to_string())
}

/// A whole number in `range`; a bool, a float or anything else is a TypeError.
pub fn count(option: &'static str, value: &Bound<'_, PyAny>, range: Count) -> PyResult<u64> {
    if !value.is_instance_of::<PyInt>() || value.is_instance_of::<PyBool>() {
        return Err(PyTypeError::new_err(format!("{option} must be an int, not {}", type_name(value))));
    }
    match value.extract::<i128>() {
        Ok(number) => range.check(option, number).map_err(value_error),
        // Beyond 128 bits: out of every range.
        Err(_) => Err(value_error(range.refuse(option, &shown(value)))),
    }
}

/// A duration in seconds (an int or a float) in `range`.
pub fn seconds(option: &'static str, value: &Bound<'_, PyAny>, range: Seconds) -> PyResult<Duration> {
    let is_number = value.is_instance_of::<PyFloat>() || value.is_instance_of::<PyInt>();
    if !is_number || value.is_instance_of::<PyBool>() {
        return Err(PyTypeError::new_err(format!(
            "{option} must be a number of seconds, not {}",
            type_name(value)
        )));
    }
    // An int too large for a float is as out of range as infinity.
    let number = value.extract::<f64>().unwrap_or(f64::INFINITY);
    range.check(option, number).map_err(|_| value_error(range.refuse(option, &shown(value))))
}

/// `None`, or a duration in seconds.
pub fn optional_seconds(
    option: &'static str,
    value: Option<&Bound<'_, PyAny>>,
    range: Seconds,
) -> PyResult<Option<Duration>> {
    value.filter(|v| !v.is_none()).map(|v| seconds(option, v, range)).transpose()
}

/// A port argument, checked: 0 to 65535.
pub struct Port(pub u16);

impl<'a, 'py> FromPyObject<'a, 'py> for Port {
    type Error = PyErr;

    fn extract(value: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        Ok(Port(count("port", &value, limits::PORT)? as u16))
    }
}

/// How many sessions a client opens, checked.
pub struct SessionCount(pub usize);

impl<'a, 'py> FromPyObject<'a, 'py> for SessionCount {
    type Error = PyErr;

    fn extract(value: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        Ok(SessionCount(count("count", &value, limits::CLIENT_COUNT)? as usize))
    }
}

pub fn packet_id(value: &Bound<'_, PyAny>) -> PyResult<u16> {
    Ok(count("packet_id", value, limits::PACKET_ID)? as u16)
}

/// The keyword options of `Server(...)` or `Client(...)`, checked.
pub fn service_config(options: Option<&Bound<'_, PyDict>>, role: Role) -> PyResult<ServiceConfig> {
    let mut config = ServiceConfig::default();
    if role == Role::Client {
        // A client's sessions often wait for the server to speak first.
        config.session.first_packet_timeout = None;
    }
    if let Some(options) = options {
        for (key, value) in options.iter() {
            let key = key.cast::<PyString>()?.to_string();
            apply(&mut config, &key, &value, role)?;
        }
    }
    config.validate().map_err(value_error)?;
    Ok(config)
}

fn apply(config: &mut ServiceConfig, key: &str, value: &Bound<'_, PyAny>, role: Role) -> PyResult<()> {
    use limits::*;
    let session = &mut config.session;
    let none = value.is_none();
    match key {
        "io_threads" if none => {}
        "io_threads" => config.io_threads = count("io_threads", value, IO_THREADS)? as usize,
        "max_sessions"
        | "backlog"
        | "max_sessions_per_address"
        | "max_accepts_per_second"
        | "trusted_addresses"
        | "trusted_proxies"
        | "reuse_port"
            if role == Role::Client =>
        {
            return Err(PyTypeError::new_err(format!(
                "{key} is a Server option: a Client opens exactly `count` sessions and does not listen"
            )));
        }
        "connect_timeout" if role == Role::Server => {
            return Err(PyTypeError::new_err(
                "connect_timeout is a Client option: a Server does not connect",
            ));
        }
        "max_sessions" => config.max_sessions = count("max_sessions", value, MAX_SESSIONS)? as usize,
        "backlog" => config.backlog = count("backlog", value, BACKLOG)? as u32,
        "max_sessions_per_address" if none => config.max_sessions_per_address = None,
        "max_sessions_per_address" => {
            config.max_sessions_per_address =
                Some(count("max_sessions_per_address", value, MAX_SESSIONS)? as usize)
        }
        "trusted_addresses" => config.trusted_addresses = addresses("trusted_addresses", value)?,
        "trusted_proxies" => config.trusted_proxies = addresses("trusted_proxies", value)?,
        "reuse_port" => config.reuse_port = flag("reuse_port", value)?,
        "max_accepts_per_second" if none => config.max_accepts_per_second = None,
        "max_accepts_per_second" => {
            let rate = count("max_accepts_per_second", value, MAX_PACKETS_PER_SECOND)?;
            config.max_accepts_per_second = Some(rate as u32);
        }
        "connect_timeout" => config.connect_timeout = seconds("connect_timeout", value, TIMEOUT)?,
        "shutdown_grace" => config.shutdown_grace = seconds("shutdown_grace", value, WAIT)?,
        "max_packet_size" => {
            session.frame_limits.max_packet_size = count("max_packet_size", value, MAX_PACKET_SIZE)? as usize
        }
        "max_send_queue_bytes" => {
            session.max_send_queue_bytes = count("max_send_queue_bytes", value, BYTES)? as usize
        }
        "max_pending_recv_bytes" => {
            session.max_pending_recv_bytes = count("max_pending_recv_bytes", value, BYTES)? as usize
        }
        "packet_timeout" => {
            session.packet_timeout = optional_seconds("packet_timeout", Some(value), TIMEOUT)?
        }
        "first_packet_timeout" => {
            session.first_packet_timeout = optional_seconds("first_packet_timeout", Some(value), TIMEOUT)?
        }
        "idle_timeout" => session.idle_timeout = optional_seconds("idle_timeout", Some(value), TIMEOUT)?,
        "linger" => session.linger = seconds("linger", value, WAIT)?,
        "max_packets_per_second" if none => session.max_packets_per_second = None,
        "max_packets_per_second" => {
            let rate = count("max_packets_per_second", value, MAX_PACKETS_PER_SECOND)?;
            session.max_packets_per_second = Some(rate as u32);
        }
        "packet_ids" if none => session.frame_limits.allowed_ids = None,
        "packet_ids" => {
            let not_iterable = |_| {
                PyTypeError::new_err(format!("packet_ids must be a set of ints, not {}", type_name(value)))
            };
            let mut ids = Vec::new();
            for id in value.try_iter().map_err(not_iterable)? {
                ids.push(count("packet_ids", &id?, PACKET_ID)? as u16);
            }
            session.frame_limits.allowed_ids = Some(ids.into_iter().collect());
        }
        "nodelay" => session.nodelay = flag("nodelay", value)?,
        "inline_io" => config.inline_io = flag("inline_io", value)?,
        "keepalive" => session.keepalive = flag("keepalive", value)?.then(Keepalive::default),
        _ => {
            return Err(PyTypeError::new_err(format!(
                "{}() got an unexpected keyword argument '{key}'",
                role.name()
            )));
        }
    }
    Ok(())
}

/// An iterable of IP address strings ("10.0.0.1", "::1").
fn addresses(option: &str, value: &Bound<'_, PyAny>) -> PyResult<Vec<std::net::IpAddr>> {
    let not_iterable = |_| {
        PyTypeError::new_err(format!(
            "{option} must be an iterable of IP address strings, not {}",
            type_name(value)
        ))
    };
    let mut parsed = Vec::new();
    for item in value.try_iter().map_err(not_iterable)? {
        let item = item?;
        let text: String = item.extract().map_err(|_| {
            PyTypeError::new_err(format!("{option} holds IP address strings, not {}", type_name(&item)))
        })?;
        parsed.push(text.parse().map_err(|_| {
            PyValueError::new_err(format!(
                "{option}: {text:?} is not an IP address (e.g. \"203.0.113.7\" or \"::1\")"
            ))
        })?);
    }
    Ok(parsed)
}

fn flag(option: &str, value: &Bound<'_, PyAny>) -> PyResult<bool> {
    value.cast::<PyBool>().map(|b| b.is_true()).map_err(|_| {
        PyTypeError::new_err(format!("{option} must be True or False, not {}", type_name(value)))
    })
}

pub fn type_name(value: &Bound<'_, PyAny>) -> String {
    value.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into())
}

/// The value as Python would show it, shortened if it is huge.
fn shown(value: &Bound<'_, PyAny>) -> String {
    let repr = value.repr().map(|r| r.to_string()).unwrap_or_else(|_| "?".into());
    if repr.len() > 40 { format!("{}... ({} digits)", &repr[..20], repr.len()) } else { repr }
}
