//! Counters of a service. I/O threads add to them once per read or write batch,
//! not per packet, so counting stays off the hot path.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use crate::reason::DisconnectReason;
use crate::send_buffer::PoolStats;

#[derive(Default)]
pub struct ServiceStats {
    pub accepted: AtomicU64,
    pub connected: AtomicU64,
    pub connect_failed: AtomicU64,
    pub rejected: AtomicU64,
    /// Connections refused because their address had `max_sessions_per_address` open.
    pub rejected_per_address: AtomicU64,
    /// Connections refused because their address opened them faster than `max_accepts_per_second`.
    pub rejected_rate: AtomicU64,
    pub packets_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub packets_out: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Bytes queued on sessions and not yet accepted by the kernel.
    pub send_queue_bytes: AtomicUsize,
    /// Bytes received and not yet delivered to the application.
    pub pending_recv_bytes: AtomicUsize,
    /// Packets that arrived after the application closed their session.
    pub packets_discarded: AtomicU64,
    /// Queued bytes never written because their session ended first.
    pub unsent_bytes_dropped: AtomicU64,
    disconnects: [AtomicU64; DisconnectReason::ALL.len()],
}

impl ServiceStats {
    pub fn count_disconnect(&self, reason: DisconnectReason) {
        self.disconnects[usize::from(reason.code() - 1)].fetch_add(1, Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        if n > 0 {
            counter.fetch_add(n, Relaxed);
        }
    }

    pub fn snapshot(&self, sessions: usize, pending_events: usize, pool: PoolStats) -> StatsSnapshot {
        StatsSnapshot {
            sessions,
            accepted: self.accepted.load(Relaxed),
            connected: self.connected.load(Relaxed),
            connect_failed: self.connect_failed.load(Relaxed),
            rejected: self.rejected.load(Relaxed),
            rejected_per_address: self.rejected_per_address.load(Relaxed),
            rejected_rate: self.rejected_rate.load(Relaxed),
            packets_in: self.packets_in.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            packets_out: self.packets_out.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            send_queue_bytes: self.send_queue_bytes.load(Relaxed),
            pending_recv_bytes: self.pending_recv_bytes.load(Relaxed),
            pending_events,
            packets_discarded: self.packets_discarded.load(Relaxed),
            unsent_bytes_dropped: self.unsent_bytes_dropped.load(Relaxed),
            disconnects: DisconnectReason::ALL
                .map(|reason| (reason, self.disconnects[usize::from(reason.code() - 1)].load(Relaxed))),
            pool,
        }
    }
}

/// A copy of the counters at one moment.
#[derive(Clone, Debug)]
pub struct StatsSnapshot {
    /// Open connections (including ones the application has not been told of yet).
    pub sessions: usize,
    pub accepted: u64,
    pub connected: u64,
    pub connect_failed: u64,
    pub rejected: u64,
    pub rejected_per_address: u64,
    pub rejected_rate: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    pub send_queue_bytes: usize,
    pub pending_recv_bytes: usize,
    pub pending_events: usize,
    pub packets_discarded: u64,
    pub unsent_bytes_dropped: u64,
    pub disconnects: [(DisconnectReason, u64); DisconnectReason::ALL.len()],
    pub pool: PoolStats,
}

impl StatsSnapshot {
    pub fn disconnects(&self, reason: DisconnectReason) -> u64 {
        self.disconnects[usize::from(reason.code() - 1)].1
    }

    /// Every figure but the disconnects, by the name applications see it
    /// under (Python's `stats()` keys, the README's table).
    pub fn figures(&self) -> [(&'static str, u64); 21] {
        [
            ("sessions", self.sessions as u64),
            ("accepted", self.accepted),
            ("rejected", self.rejected),
            ("rejected_per_address", self.rejected_per_address),
            ("rejected_rate", self.rejected_rate),
            ("connected", self.connected),
            ("connect_failed", self.connect_failed),
            ("packets_in", self.packets_in),
            ("bytes_in", self.bytes_in),
            ("packets_out", self.packets_out),
            ("bytes_out", self.bytes_out),
            ("send_queue_bytes", self.send_queue_bytes as u64),
            ("pending_recv_bytes", self.pending_recv_bytes as u64),
            ("pending_events", self.pending_events as u64),
            ("packets_discarded", self.packets_discarded),
            ("unsent_bytes_dropped", self.unsent_bytes_dropped),
            ("pool_chunk_size", self.pool.chunk_size as u64),
            ("pool_chunks", self.pool.chunks as u64),
            ("pool_chunks_in_use", self.pool.chunks_in_use as u64),
            ("pool_buffers_encoded", self.pool.buffers_encoded),
            ("pool_bytes_encoded", self.pool.bytes_encoded),
        ]
    }
}
