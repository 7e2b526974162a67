//! The crate's `log` records, handed to Python's `logging` (logger "servercore").
//!
//! I/O threads must never take the GIL, so they do not call `logging` themselves:
//! records wait in a bounded queue and the thread that runs callbacks (`poll`,
//! `stop`) emits them. If nobody polls for a long time the oldest records are
//! dropped, and the next flush says how many.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use pyo3::exceptions::PyException;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyDict;

const MAX_QUEUED_RECORDS: usize = 10_000;

struct QueuedRecord {
    level: log::Level,
    message: String,
}

struct LogBridge {
    records: Mutex<VecDeque<QueuedRecord>>,
    dropped: AtomicU64,
}

static BRIDGE: LogBridge = LogBridge { records: Mutex::new(VecDeque::new()), dropped: AtomicU64::new(0) };

impl log::Log for LogBridge {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let queued = QueuedRecord { level: record.level(), message: record.args().to_string() };
        let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        if records.len() >= MAX_QUEUED_RECORDS {
            records.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        records.push_back(queued);
    }

    fn flush(&self) {}
}

/// Routes the crate's log records to the bridge (once per process; if the
/// embedding program installed its own `log` logger first, that one stays).
pub fn install() {
    if log::set_logger(&BRIDGE).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
}

/// Matches the records the I/O threads format to what the Python logger would
/// show, so a quiet logger costs no formatting on the hot path.
pub fn follow_python_level(py: Python<'_>) -> PyResult<()> {
    let level: u32 = logger(py)?.call_method0(intern!(py, "getEffectiveLevel"))?.extract()?;
    log::set_max_level(match level {
        0..=9 => log::LevelFilter::Trace,
        10..=19 => log::LevelFilter::Debug,
        20..=29 => log::LevelFilter::Info,
        30..=39 => log::LevelFilter::Warn,
        _ => log::LevelFilter::Error,
    });
    Ok(())
}

/// Records one flush emits at most: a log handler is Python code on the
/// polling thread, and however slow it is, one poll must not spend long in
/// it. The rest wait for the next flush (the queue is bounded and counts what
/// it drops); the engine writes few warnings anyway (`log_limit`).
const RECORDS_PER_FLUSH: usize = 256;

/// How long one flush keeps emitting once a record took its time.
const FLUSH_BUDGET: std::time::Duration = std::time::Duration::from_millis(2);

/// Emits queued records (up to `RECORDS_PER_FLUSH`) through `logging.getLogger("servercore")`.
pub fn flush(py: Python<'_>) -> PyResult<()> {
    let records: Vec<QueuedRecord> = {
        let mut queue = BRIDGE.records.lock().unwrap_or_else(|e| e.into_inner());
        let take = queue.len().min(RECORDS_PER_FLUSH);
        queue.drain(..take).collect()
    };
    let dropped = BRIDGE.dropped.swap(0, Ordering::Relaxed);
    if records.is_empty() && dropped == 0 {
        return Ok(());
    }
    let logger = logger(py)?;
    if dropped > 0 {
        logger.call_method1(
            intern!(py, "warning"),
            (format!(
                "{dropped} log records were dropped: more came than were emitted (nobody polled, or a flood)"
            ),),
        )?;
    }
    // A slow handler gets a few milliseconds per flush; what is left goes
    // back to the front of the queue for the next one.
    let started = std::time::Instant::now();
    let mut records = records.into_iter();
    for record in records.by_ref() {
        logger.call_method1(intern!(py, "log"), (python_level(record.level), record.message))?;
        if started.elapsed() > FLUSH_BUDGET {
            break;
        }
    }
    let left: Vec<QueuedRecord> = records.collect();
    if !left.is_empty() {
        let mut queue = BRIDGE.records.lock().unwrap_or_else(|e| e.into_inner());
        for record in left.into_iter().rev() {
            queue.push_front(record);
        }
    }
    Ok(())
}

/// An exception that Python code of the application raised (a callback, a
/// timer, a hook) is logged at ERROR with its traceback, after the engine's
/// own queued records; returns whether there was one. A KeyboardInterrupt or
/// SystemExit is not swallowed: it comes back as the error.
pub fn log_exception<T>(
    py: Python<'_>,
    result: PyResult<T>,
    message: impl FnOnce() -> String,
) -> PyResult<bool> {
    let Err(error) = result else { return Ok(false) };
    if !error.is_instance_of::<PyException>(py) {
        return Err(error);
    }
    flush(py)?;
    let kwargs = PyDict::new(py);
    kwargs.set_item("exc_info", error.into_value(py))?;
    logger(py)?.call_method(intern!(py, "error"), (message(),), Some(&kwargs))?;
    Ok(true)
}

/// `logging.getLogger("servercore")`.
pub fn logger(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    py.import(intern!(py, "logging"))?.call_method1(intern!(py, "getLogger"), (intern!(py, "servercore"),))
}

fn python_level(level: log::Level) -> u32 {
    match level {
        log::Level::Error => 40,
        log::Level::Warn => 30,
        log::Level::Info => 20,
        log::Level::Debug => 10,
        log::Level::Trace => 5,
    }
}
