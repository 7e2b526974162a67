//! Whether an accepted connection may become a session, decided before any
//! Python runs: the per-address rate and count (trusted addresses skip them),
//! then room, which a full server makes by evicting a silent session.
//! Refusals are counted in `stats()` and logged at most once per 5 s a kind.
//!
//! The accept loop asks for direct connections; the task that read a trusted
//! proxy's PROXY header asks for the client it names. So the state lives
//! behind a lock (taken once per accepted connection, by one task at a time
//! in practice).

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::accept_rate::AcceptRate;
use crate::config::ServiceConfig;
use crate::log_limit::ThrottledLog;
use crate::registry::SessionRegistry;
use crate::stats::ServiceStats;

/// Why a connection was closed before it became a session.
enum Refusal {
    /// Its address opens connections faster than `max_accepts_per_second`.
    Rate,
    /// Its address has `max_sessions_per_address` open.
    PerAddress(usize),
    /// `max_sessions` are open and none of them is silent.
    Full(usize),
    /// `max_sessions` connections from trusted proxies are waiting for their
    /// PROXY header already.
    Handshakes(usize),
}

pub struct Admission {
    state: Mutex<State>,
}

struct State {
    rates: Option<AcceptRate>,
    rate_log: ThrottledLog,
    per_address_log: ThrottledLog,
    full_log: ThrottledLog,
}

impl Admission {
    pub fn new(config: &ServiceConfig) -> Self {
        let period = Duration::from_secs(5);
        Self {
            state: Mutex::new(State {
                rates: config.max_accepts_per_second.map(AcceptRate::new),
                rate_log: ThrottledLog::new(period),
                per_address_log: ThrottledLog::new(period),
                full_log: ThrottledLog::new(period),
            }),
        }
    }

    /// Whether a connection from `peer` may become a session; `evict` makes
    /// room in a full server if it can. A refusal is counted and logged.
    pub fn admit(
        &self,
        peer: SocketAddr,
        config: &ServiceConfig,
        registry: &SessionRegistry,
        stats: &ServiceStats,
        evict: impl FnOnce() -> bool,
    ) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match state.verdict(peer.ip(), config, registry, evict) {
            Ok(()) => true,
            Err(refusal) => {
                state.note(stats, peer, refusal);
                false
            }
        }
    }
}

impl Admission {
    /// A trusted proxy's connection refused before its header is read: as
    /// many are waiting for theirs as `max_sessions` allows.
    pub fn refuse_handshake(&self, peer: SocketAddr, waiting: usize, stats: &ServiceStats) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.note(stats, peer, Refusal::Handshakes(waiting));
    }
}

impl State {
    fn verdict(
        &mut self,
        address: IpAddr,
        config: &ServiceConfig,
        registry: &SessionRegistry,
        evict: impl FnOnce() -> bool,
    ) -> Result<(), Refusal> {
        if !config.trusted_addresses.contains(&address) {
            if let Some(rates) = self.rates.as_mut()
                && !rates.admit(address, Instant::now())
            {
                return Err(Refusal::Rate);
            }
            if let Some(limit) = config.max_sessions_per_address
                && registry.sessions_from(address) >= limit
            {
                return Err(Refusal::PerAddress(limit));
            }
        }
        let max_sessions = config.max_sessions;
        if registry.len() >= max_sessions && !evict() {
            return Err(Refusal::Full(max_sessions));
        }
        Ok(())
    }

    fn note(&mut self, stats: &ServiceStats, peer: SocketAddr, refusal: Refusal) {
        let (counter, log, why) = match refusal {
            Refusal::Rate => (
                &stats.rejected_rate,
                &mut self.rate_log,
                "over max_accepts_per_second from this address".to_owned(),
            ),
            Refusal::PerAddress(limit) => (
                &stats.rejected_per_address,
                &mut self.per_address_log,
                format!("max_sessions_per_address {limit} from this address"),
            ),
            Refusal::Full(limit) => {
                (&stats.rejected, &mut self.full_log, format!("max_sessions {limit} reached"))
            }
            Refusal::Handshakes(waiting) => (
                &stats.rejected,
                &mut self.full_log,
                format!("{waiting} PROXY headers are awaited already (max_sessions)"),
            ),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        log.warn(|suppressed| format!("{peer}: refused, {why}{suppressed}"));
    }
}
