//! What every session of a service shares with the others and with the
//! application: the session limits, the counters and the event queue.
//!
//! It is deliberately narrow. A session's handle and its driver need these three
//! and nothing else of the service: not the registry, not the runtime, not the
//! reactors. Everything that knows about sessions sits above this module, so
//! dependencies between the engine's modules point one way.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, Weak};
use std::time::Duration;

use rustc_hash::FxHashMap;

use crate::config::SessionConfig;
use crate::events::{EventQueue, SessionId};
use crate::log_limit::FaultLog;
use crate::reason::DisconnectReason;
use crate::stats::ServiceStats;

/// A group sessions belong to (a room), told when one of them ends so that
/// it forgets it. Groups are defined above ([`room`](crate::room)); sessions
/// only need to know that they are in some.
pub trait Membership: Send + Sync {
    fn forget(&self, session: SessionId);
}

/// The groups each session is in, for the sessions that are in any: kept
/// here rather than in each handle, which ten thousand idle players pay for.
type Memberships = FxHashMap<SessionId, Vec<Weak<dyn Membership>>>;

/// No shutdown grace set: sessions closed by a shutdown linger as any other.
const NO_GRACE: u64 = u64::MAX;

pub struct SessionContext {
    pub config: SessionConfig,
    pub stats: ServiceStats,
    pub events: EventQueue,
    /// Which farewell warnings are written, and the summaries of the rest.
    pub fault_log: FaultLog,
    /// The linger of sessions a graceful shutdown closes, in nanoseconds
    /// (`NO_GRACE`: the configured linger).
    shutdown_grace: AtomicU64,
    memberships: Mutex<Memberships>,
    /// What the application said when it closed a session for a fault
    /// ([`SessionHandle::close_with_detail`](crate::session::SessionHandle::close_with_detail)),
    /// until the session's farewell line says it.
    close_details: Mutex<FxHashMap<SessionId, String>>,
}

impl SessionContext {
    pub fn new(config: SessionConfig) -> io::Result<Self> {
        Ok(Self {
            config,
            stats: ServiceStats::default(),
            events: EventQueue::new()?,
            fault_log: FaultLog::default(),
            shutdown_grace: AtomicU64::new(NO_GRACE),
            memberships: Mutex::default(),
            close_details: Mutex::default(),
        })
    }

    /// How long a session closed for `reason` may spend flushing: a graceful
    /// shutdown's grace for the sessions it closes, else the linger.
    pub fn linger_for(&self, reason: DisconnectReason) -> Duration {
        let grace = self.shutdown_grace.load(Ordering::Relaxed);
        match reason {
            DisconnectReason::ServerShutdown if grace != NO_GRACE => Duration::from_nanos(grace),
            _ => self.config.linger,
        }
    }

    /// Sessions closed by the shutdown about to start linger for `grace`.
    pub fn set_shutdown_grace(&self, grace: Duration) {
        let nanos = u64::try_from(grace.as_nanos()).unwrap_or(NO_GRACE - 1);
        self.shutdown_grace.store(nanos, Ordering::Relaxed);
    }

    /// The groups of every session (see [`SessionHandle::join`](crate::session::SessionHandle::join)).
    pub(crate) fn lock_memberships(&self) -> MutexGuard<'_, Memberships> {
        self.memberships.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn put_close_detail(&self, session: SessionId, detail: String) {
        self.close_details.lock().unwrap_or_else(|e| e.into_inner()).insert(session, detail);
    }

    pub(crate) fn take_close_detail(&self, session: SessionId) -> Option<String> {
        let mut details = self.close_details.lock().unwrap_or_else(|e| e.into_inner());
        if details.is_empty() { None } else { details.remove(&session) }
    }

    /// The largest packet a session sends or accepts, header included.
    pub fn max_packet_size(&self) -> usize {
        self.config.frame_limits.max_packet_size
    }
}
