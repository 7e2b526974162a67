//! The crate's `log` records, handed to Python's `logging` (logger "servercore").
//!
//! Log handlers are the application's code, and some are slow or stuck (a
//! pipe nobody reads, a network sink). If the thread that runs callbacks
//! called them, an attacker who makes the engine log would stall the game.
//! So nothing on that thread or the I/O threads calls a handler: records wait
//! in a bounded queue (the oldest dropped and counted when it is full), and a
//! thread of the bridge's own, "servercore-log", emits them.
//!
//! To keep records in order with the callbacks in the common case, the
//! polling thread waits for the log thread at each `flush`, but only while it
//! keeps up: once one record has taken `SLOW_RECORD`, or the handlers have
//! taken that long in all, or the wait has taken `MAX_FLUSH_WAIT` (a log
//! thread not scheduled yet), it goes back to the game and the records
//! follow when the handler lets them.
//!
//! A process forked after the log thread started has none: its first flush
//! notices (the pid changed) and starts its own.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pyo3::exceptions::PyException;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyCFunction, PyDict};

/// Records the queue holds; past it the oldest go, counted.
const MAX_QUEUED_RECORDS: usize = 10_000;

/// A record whose handler takes longer than this is a slow handler: the
/// polling thread stops waiting for the log thread.
const SLOW_RECORD: Duration = Duration::from_millis(2);

/// The most one flush waits, however well the log thread is doing (it may
/// simply not have been scheduled yet on a busy machine).
const MAX_FLUSH_WAIT: Duration = Duration::from_millis(20);

/// How long interpreter exit waits for the log thread to emit what is queued.
const EXIT_WAIT: Duration = Duration::from_secs(1);

struct QueuedRecord {
    level: u32,
    message: String,
    /// An application's exception, logged with its traceback.
    exception: Option<Py<PyAny>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Pump {
    NotStarted,
    Running,
    /// Interpreter exit (or a failed spawn): whoever flushes emits the records itself.
    Gone,
}

struct Queue {
    records: VecDeque<QueuedRecord>,
    /// Dropped since the last notice about it.
    dropped: u64,
    /// Records ever queued, and of those, how many are emitted or dropped:
    /// a flush waits for the second to reach what the first was.
    queued_total: u64,
    done_total: u64,
    pump: Pump,
    /// When the log thread began the record it is emitting now.
    emitting_since: Option<Instant>,
}

struct LogBridge {
    queue: Mutex<Queue>,
    /// The log thread waits on it for records.
    records_queued: Condvar,
    /// Flushes wait on it for the log thread.
    records_done: Condvar,
    /// Whether a record is queued or being emitted: the polling thread's
    /// check in every poll, without the lock.
    pending: AtomicBool,
}

/// The process the log thread runs in.
static PUMP_PID: AtomicU32 = AtomicU32::new(0);

static BRIDGE: LogBridge = LogBridge {
    queue: Mutex::new(Queue {
        records: VecDeque::new(),
        dropped: 0,
        queued_total: 0,
        done_total: 0,
        pump: Pump::NotStarted,
        emitting_since: None,
    }),
    records_queued: Condvar::new(),
    records_done: Condvar::new(),
    pending: AtomicBool::new(false),
};

impl LogBridge {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, record: QueuedRecord) {
        let mut queue = self.lock();
        // Dropped after the lock is let go: a record may hold an exception,
        // whose last reference can run Python code (which may log).
        let mut evicted = None;
        if queue.records.len() >= MAX_QUEUED_RECORDS {
            evicted = queue.records.pop_front();
            queue.dropped += 1;
            self.done(&mut queue, 1);
        }
        queue.records.push_back(record);
        queue.queued_total += 1;
        self.pending.store(true, Ordering::Release);
        drop(queue);
        drop(evicted);
        self.records_queued.notify_one();
    }

    /// Counts records as emitted; the last one clears `pending`.
    fn done(&self, queue: &mut Queue, records: u64) {
        queue.done_total += records;
        if queue.done_total == queue.queued_total {
            self.pending.store(false, Ordering::Release);
        }
    }
}

impl log::Log for LogBridge {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            let level = python_level(record.level());
            self.push(QueuedRecord { level, message: record.args().to_string(), exception: None });
        }
    }

    fn flush(&self) {}
}

/// Routes the crate's log records to the bridge (once per process; if the
/// embedding program installed its own `log` logger first, that one stays),
/// and stops the log thread when the interpreter exits, before it finalizes.
pub fn install(module: &Bound<'_, PyModule>) -> PyResult<()> {
    if log::set_logger(&BRIDGE).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
    let py = module.py();
    let stop = PyCFunction::new_closure(py, None, None, |args, _| {
        args.py().detach(stop_pump);
    })?;
    py.import(intern!(py, "atexit"))?.call_method1(intern!(py, "register"), (stop,))?;
    Ok(())
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

/// Has the queued records emitted, waiting for the log thread only while it
/// keeps up (see the module doc). Called by the polling thread around every
/// delivery, so an empty queue costs one atomic load.
pub fn flush(py: Python<'_>) -> PyResult<()> {
    if !BRIDGE.pending.load(Ordering::Acquire) {
        return Ok(());
    }
    let mut queue = BRIDGE.lock();
    let pid = std::process::id();
    if queue.pump == Pump::Running && PUMP_PID.load(Ordering::Relaxed) != pid {
        // Forked: the log thread stayed with the parent, and so do the
        // records queued before the fork (the parent emits them).
        queue.pump = Pump::NotStarted;
        queue.emitting_since = None;
        queue.records.clear();
        queue.dropped = 0;
        queue.done_total = queue.queued_total;
        BRIDGE.pending.store(false, Ordering::Release);
        return Ok(());
    }
    if queue.pump == Pump::NotStarted {
        queue.pump = match std::thread::Builder::new().name("servercore-log".into()).spawn(pump) {
            Ok(_) => Pump::Running,
            Err(_) => Pump::Gone,
        };
        PUMP_PID.store(pid, Ordering::Relaxed);
    }
    if queue.pump == Pump::Gone {
        emit_here(py, queue);
        return Ok(());
    }
    let target = queue.queued_total;
    drop(queue);
    py.detach(|| wait_for_pump(target));
    Ok(())
}

fn wait_for_pump(target: u64) {
    let started = Instant::now();
    let give_up = started + MAX_FLUSH_WAIT;
    let mut queue = BRIDGE.lock();
    let done_at_start = queue.done_total;
    BRIDGE.records_queued.notify_one();
    loop {
        let now = Instant::now();
        let stuck = queue.emitting_since.is_some_and(|since| now.duration_since(since) >= SLOW_RECORD);
        // The log thread is running but the handlers are slow (each record
        // just under SLOW_RECORD, say): one SLOW_RECORD of waiting is enough.
        // MAX_FLUSH_WAIT is for a log thread the scheduler has not run yet.
        let slow = (queue.done_total > done_at_start || queue.emitting_since.is_some())
            && now.duration_since(started) >= SLOW_RECORD;
        if queue.done_total >= target || queue.pump != Pump::Running || stuck || slow || now >= give_up {
            return;
        }
        // Woken by each record done; the slices notice a record that hangs.
        let slice = SLOW_RECORD.min(give_up - now);
        queue = BRIDGE.records_done.wait_timeout(queue, slice).unwrap_or_else(|e| e.into_inner()).0;
    }
}

/// The log thread: emits records as they come, one at a time, until
/// interpreter exit. Taking them one by one under the lock means that once
/// `stop_pump` has said Gone, this thread starts no other record: it never
/// calls into an interpreter that is finalizing.
fn pump() {
    loop {
        let (record, dropped) = {
            let mut queue = BRIDGE.lock();
            while queue.records.is_empty() && queue.dropped == 0 && queue.pump == Pump::Running {
                queue = BRIDGE.records_queued.wait(queue).unwrap_or_else(|e| e.into_inner());
            }
            if queue.pump != Pump::Running {
                drop(queue);
                BRIDGE.records_done.notify_all();
                return;
            }
            let dropped = std::mem::take(&mut queue.dropped);
            let record = if dropped > 0 { None } else { queue.records.pop_front() };
            queue.emitting_since = Some(Instant::now());
            (record, dropped)
        };
        Python::attach(|py| match record {
            Some(record) => emit_one(py, record),
            None => emit_one(py, dropped_notice(dropped)),
        });
        let mut queue = BRIDGE.lock();
        queue.emitting_since = None;
        if dropped == 0 {
            BRIDGE.done(&mut queue, 1);
        }
        drop(queue);
        BRIDGE.records_done.notify_all();
    }
}

/// At interpreter exit: the log thread emits what is queued (for up to
/// `EXIT_WAIT`) and ends, so it never touches a finalizing interpreter;
/// records after this are emitted by whoever flushes.
fn stop_pump() {
    let give_up = Instant::now() + EXIT_WAIT;
    let mut queue = BRIDGE.lock();
    if queue.pump != Pump::Running {
        queue.pump = Pump::Gone;
        return;
    }
    while queue.done_total < queue.queued_total && Instant::now() < give_up {
        let slice = give_up.saturating_duration_since(Instant::now());
        queue = BRIDGE.records_done.wait_timeout(queue, slice).unwrap_or_else(|e| e.into_inner()).0;
    }
    queue.pump = Pump::Gone;
    drop(queue);
    BRIDGE.records_queued.notify_all();
}

/// With no log thread (interpreter exit, or none could be started): the
/// caller emits what is queued itself, after letting the lock go.
fn emit_here(py: Python<'_>, mut queue: MutexGuard<'_, Queue>) {
    let records: Vec<QueuedRecord> = queue.records.drain(..).collect();
    let dropped = std::mem::take(&mut queue.dropped);
    drop(queue);
    if dropped > 0 {
        emit_one(py, dropped_notice(dropped));
    }
    let count = records.len() as u64;
    for record in records {
        emit_one(py, record);
    }
    BRIDGE.done(&mut BRIDGE.lock(), count);
}

fn dropped_notice(dropped: u64) -> QueuedRecord {
    QueuedRecord {
        level: python_level(log::Level::Warn),
        message: format!(
            "{dropped} log records were dropped: they came faster than the log handlers took them"
        ),
        exception: None,
    }
}

/// One record through `logging.getLogger("servercore")`. Logging reports a
/// failing handler itself (`Handler.handleError`); what fails here is
/// `logging` itself, reported as unraisable so it is never lost.
fn emit_one(py: Python<'_>, record: QueuedRecord) {
    let emitted = logger(py).and_then(|logger| {
        let kwargs = PyDict::new(py);
        if let Some(exception) = record.exception {
            kwargs.set_item(intern!(py, "exc_info"), exception)?;
        }
        logger.call_method(intern!(py, "log"), (record.level, record.message), Some(&kwargs))
    });
    if let Err(error) = emitted {
        error.write_unraisable(py, None);
    }
}

/// An exception that Python code of the application raised (a callback, a
/// timer, a hook) is logged at ERROR with its traceback, in order after the
/// engine's own records; returns whether there was one. A KeyboardInterrupt
/// or SystemExit is not swallowed: it comes back as the error.
pub fn log_exception<T>(
    py: Python<'_>,
    result: PyResult<T>,
    message: impl FnOnce() -> String,
) -> PyResult<bool> {
    let Err(error) = result else { return Ok(false) };
    if !error.is_instance_of::<PyException>(py) {
        return Err(error);
    }
    BRIDGE.push(QueuedRecord {
        level: python_level(log::Level::Error),
        message: message(),
        exception: Some(error.into_value(py).into_any()),
    });
    flush(py)?;
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
