//! What every session of a service shares with the others and with the
//! application: the session limits, the counters and the event queue.
//!
//! It is deliberately narrow. A session's handle and its driver need these three
//! and nothing else of the service: not the registry, not the runtime, not the
//! reactors. Everything that knows about sessions sits above this module, so
//! dependencies between the engine's modules point one way.

use std::io;

use crate::config::SessionConfig;
use crate::events::EventQueue;
use crate::stats::ServiceStats;

pub struct SessionContext {
    pub config: SessionConfig,
    pub stats: ServiceStats,
    pub events: EventQueue,
}

impl SessionContext {
    pub fn new(config: SessionConfig) -> io::Result<Self> {
        Ok(Self { config, stats: ServiceStats::default(), events: EventQueue::new()? })
    }

    /// The largest packet a session sends or accepts, header included.
    pub fn max_packet_size(&self) -> usize {
        self.config.frame_limits.max_packet_size
    }
}
