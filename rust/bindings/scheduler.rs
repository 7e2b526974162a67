//! What the polling thread runs besides the callbacks of events: timers
//! (`call_later`, `call_every`) and calls posted from any thread (`post`,
//! the lecture's JobQueue hand-off). They run in the same deliveries as the
//! packet callbacks, so game code needs no lock against itself.
//!
//! A repeating timer keeps a fixed rate: its n-th tick is due at
//! `start + n × interval` however long the ticks before it took, so the
//! GameServer's 250 ms tick does not drift. A tick that comes so late that
//! later ticks are due too runs once; the ticks it passed over are counted
//! (`Timer.late_ticks`), not run back to back.
//!
//! The scheduler is shared with other threads (they may post, schedule and
//! cancel), so it holds its state under a lock. It never runs Python while
//! holding the lock. A count of what it holds, readable without the lock,
//! lets every wait and delivery of a service that has no jobs (most) skip it.

use std::cmp::{Ordering as Order, Reverse};
use std::collections::{BinaryHeap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use pyo3::types::PyTuple;
use pyo3::{PyTraverseError, PyVisit};

use super::logging;

/// A scheduled call: what `call_later` and `call_every` return.
#[pyclass(frozen, module = "servercore._core", name = "Timer")]
pub struct PyTimer {
    callback: Py<PyAny>,
    args: Py<PyTuple>,
    interval: Option<Duration>,
    cancelled: AtomicBool,
    late_ticks: AtomicU64,
}

#[pymethods]
impl PyTimer {
    /// Stops the timer: it does not run again (if it is running now, this run
    /// finishes). Idempotent; callable from any thread.
    fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
    }

    /// True once `cancel()` was called.
    #[getter]
    fn cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// A repeating timer's ticks that were due while an earlier one was late,
    /// and were skipped rather than run back to back.
    #[getter]
    fn late_ticks(&self) -> u64 {
        self.late_ticks.load(Ordering::Relaxed)
    }

    /// Seconds between ticks; None for a one-shot timer.
    #[getter]
    fn interval(&self) -> Option<f64> {
        self.interval.map(|interval| interval.as_secs_f64())
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let callback = self.callback.bind(py).repr().map(|r| r.to_string()).unwrap_or_default();
        let state = if self.cancelled() { " cancelled" } else { "" };
        match self.interval {
            Some(interval) => format!("<Timer every {}s {callback}{state}>", interval.as_secs_f64()),
            None => format!("<Timer once {callback}{state}>"),
        }
    }
}

/// A timer's next run: timers due at the same instant run in the order
/// they were scheduled (`order`).
struct Slot {
    at: Instant,
    order: u64,
    timer: Py<PyTimer>,
}

impl Slot {
    /// The heap is a max-heap: the earliest slot must compare greatest.
    fn key(&self) -> Reverse<(Instant, u64)> {
        Reverse((self.at, self.order))
    }
}

impl PartialEq for Slot {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Slot {}

impl PartialOrd for Slot {
    fn partial_cmp(&self, other: &Self) -> Option<Order> {
        Some(self.cmp(other))
    }
}

impl Ord for Slot {
    fn cmp(&self, other: &Self) -> Order {
        self.key().cmp(&other.key())
    }
}

#[derive(Default)]
struct State {
    due: BinaryHeap<Slot>,
    posted: VecDeque<(Py<PyAny>, Py<PyTuple>)>,
    next_order: u64,
}

impl State {
    fn push(&mut self, at: Instant, timer: Py<PyTimer>) {
        let order = self.next_order;
        self.next_order += 1;
        self.due.push(Slot { at, order, timer });
    }
}

#[derive(Default)]
pub struct Scheduler {
    state: Mutex<State>,
    /// Timers and posted calls held, kept with the state under its lock.
    held: AtomicUsize,
}

impl Scheduler {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether there is nothing at all: the common case, and no lock taken.
    fn is_empty(&self) -> bool {
        self.held.load(Ordering::SeqCst) == 0
    }

    fn count(&self, state: &State) {
        self.held.store(state.due.len() + state.posted.len(), Ordering::SeqCst);
    }

    /// Schedules `callback(*args)` after `delay`, and every `interval` after
    /// that if one is given.
    pub fn schedule(
        &self,
        py: Python<'_>,
        delay: Duration,
        interval: Option<Duration>,
        callback: Py<PyAny>,
        args: Py<PyTuple>,
    ) -> PyResult<Py<PyTimer>> {
        let timer = Py::new(
            py,
            PyTimer {
                callback,
                args,
                interval,
                cancelled: AtomicBool::new(false),
                late_ticks: AtomicU64::new(0),
            },
        )?;
        let mut state = self.lock();
        state.push(Instant::now() + delay, timer.clone_ref(py));
        self.count(&state);
        Ok(timer)
    }

    /// Queues `callback(*args)` for the polling thread's next delivery.
    pub fn post(&self, callback: Py<PyAny>, args: Py<PyTuple>) {
        let mut state = self.lock();
        state.posted.push_back((callback, args));
        self.count(&state);
    }

    /// When the next job is due: now if a call is posted, else the earliest
    /// timer's time (cancelled ones included: running them is a no-op).
    pub fn next_due(&self) -> Option<Instant> {
        if self.is_empty() {
            return None;
        }
        let state = self.lock();
        if !state.posted.is_empty() {
            return Some(Instant::now());
        }
        state.due.peek().map(|slot| slot.at)
    }

    /// Whether a job is due at `now`: a posted call, or a timer's time has come.
    pub fn is_due(&self, now: Instant) -> bool {
        if self.is_empty() {
            return false;
        }
        let state = self.lock();
        !state.posted.is_empty() || state.due.peek().is_some_and(|slot| slot.at <= now)
    }

    /// How long a wait may last before a job is due: `limit`, or less.
    pub fn wait_limit(&self, limit: Option<Duration>) -> Option<Duration> {
        match self.next_due() {
            None => limit,
            Some(due) => {
                let until = due.saturating_duration_since(Instant::now());
                Some(limit.map_or(until, |limit| limit.min(until)))
            }
        }
    }

    /// Runs the posted calls, in order, then the timers due by now. Returns
    /// how many ran. An exception in one is logged and the others still run;
    /// a KeyboardInterrupt or SystemExit goes up (what was not run stays).
    pub fn run_due(&self, py: Python<'_>) -> PyResult<usize> {
        if self.is_empty() {
            return Ok(0);
        }
        let mut ran = 0;
        // Only what was posted before this look: a call that posts again
        // runs at the next delivery, not in a loop here.
        let posted = {
            let mut state = self.lock();
            let posted = std::mem::take(&mut state.posted);
            self.count(&state);
            posted
        };
        let mut posted = posted.into_iter();
        while let Some((callback, args)) = posted.next() {
            let result = callback.bind(py).call1(args.bind(py));
            if let Err(error) = report(py, result, callback.bind(py), "posted call") {
                // Not run yet: back in front of anything posted meanwhile.
                let mut state = self.lock();
                for job in posted.rev() {
                    state.posted.push_front(job);
                }
                self.count(&state);
                return Err(error);
            }
            ran += 1;
        }
        let now = Instant::now();
        loop {
            let Slot { at, timer, .. } = {
                let mut state = self.lock();
                if state.due.peek().is_none_or(|slot| slot.at > now) {
                    break;
                }
                let slot = state.due.pop().expect("peeked");
                self.count(&state);
                slot
            };
            let job = timer.get();
            if job.cancelled() {
                continue;
            }
            if let Some(interval) = job.interval {
                self.reschedule(py, &timer, at, interval, now);
            }
            let result = job.callback.bind(py).call1(job.args.bind(py));
            report(py, result, job.callback.bind(py), "timer")?;
            ran += 1;
        }
        Ok(ran)
    }

    /// The tick after the one due at `at`: one interval later, or, if that is
    /// past already, the first one still ahead (the ones between counted late).
    fn reschedule(&self, py: Python<'_>, timer: &Py<PyTimer>, at: Instant, interval: Duration, now: Instant) {
        let mut next = at + interval;
        if next <= now && !interval.is_zero() {
            let behind = now.duration_since(next);
            let skipped = (behind.as_nanos() / interval.as_nanos()) as u32 + 1;
            timer.get().late_ticks.fetch_add(u64::from(skipped), Ordering::Relaxed);
            next += interval * skipped;
        }
        let mut state = self.lock();
        state.push(next, timer.clone_ref(py));
        self.count(&state);
    }

    /// Drops every job (the service has finished): nothing runs after the
    /// last `on_disconnected`.
    pub fn clear(&self) {
        let mut state = self.lock();
        state.due.clear();
        state.posted.clear();
        self.count(&state);
    }

    /// For the garbage collector: the timers' and posted calls' callables.
    pub fn traverse(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        let Ok(state) = self.state.try_lock() else { return Ok(()) };
        for slot in state.due.iter() {
            visit.call(&slot.timer)?;
        }
        for (callback, args) in &state.posted {
            visit.call(callback)?;
            visit.call(args)?;
        }
        Ok(())
    }
}

/// An exception from a job is logged with its traceback, naming the callable;
/// KeyboardInterrupt and SystemExit go up.
fn report(
    py: Python<'_>,
    result: PyResult<Bound<'_, PyAny>>,
    callback: &Bound<'_, PyAny>,
    what: &str,
) -> PyResult<()> {
    let name = || callback.repr().map(|r| r.to_string()).unwrap_or_default();
    logging::log_exception(py, result, || format!("{what} {} raised", name())).map(drop)
}
