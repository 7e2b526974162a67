//! Limits and socket options, with defaults a game server can ship with.

use std::time::Duration;

use crate::frame::FrameLimits;
use crate::recv_buffer::DEFAULT_READ_SIZE;

/// How a session's byte stream reaches the application.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// `[size][id][payload]` packets, checked and cut in Rust (`PacketSession`).
    Packets,
    /// Raw bytes; the application says how many it consumed (`Session`).
    Raw,
}

/// Finding a peer that vanished without a FIN or RST (power cut, cable, NAT).
/// Keepalive probes find it when no game traffic flows; when we are sending to
/// it, probes are not sent, and `TCP_USER_TIMEOUT` ends the connection once
/// sent data stays unacknowledged that long (instead of Linux's ~15 minutes of
/// retransmissions). The defaults notice it in about 30 seconds either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    pub idle: Duration,
    pub interval: Duration,
    pub retries: u32,
    pub user_timeout: Duration,
}

impl Default for Keepalive {
    fn default() -> Self {
        Self {
            idle: Duration::from_secs(15),
            interval: Duration::from_secs(5),
            retries: 3,
            user_timeout: Duration::from_secs(30),
        }
    }
}

/// Everything a session needs to know, shared by all sessions of a service.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub framing: Framing,
    pub frame_limits: FrameLimits,
    /// Unsent bytes a session may have queued; past it the peer is a slow consumer
    /// and is disconnected (`SendQueueFull`).
    pub max_send_queue_bytes: usize,
    /// Received bytes waiting for the application before the reader stops reading
    /// that socket, so TCP flow control pushes back on the peer.
    pub max_pending_recv_bytes: usize,
    /// A packet whose first byte has arrived must be complete within this.
    pub packet_timeout: Option<Duration>,
    /// A session that receives nothing for this long is disconnected.
    pub idle_timeout: Option<Duration>,
    /// More packets than this in one second disconnect the session.
    pub max_packets_per_second: Option<u32>,
    /// How long a local close may spend flushing the queue and waiting for the
    /// peer to close its side.
    pub linger: Duration,
    pub nodelay: bool,
    pub keepalive: Option<Keepalive>,
    /// Whether the application wants a `Sent` event per completed write.
    pub report_sent: bool,
    pub read_size: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            framing: Framing::Packets,
            frame_limits: FrameLimits::default(),
            max_send_queue_bytes: 1024 * 1024,
            max_pending_recv_bytes: 256 * 1024,
            packet_timeout: Some(Duration::from_secs(10)),
            idle_timeout: None,
            max_packets_per_second: None,
            linger: Duration::from_secs(1),
            nodelay: true,
            keepalive: Some(Keepalive::default()),
            report_sent: false,
            read_size: DEFAULT_READ_SIZE,
        }
    }
}

/// A server's or client's configuration.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    pub session: SessionConfig,
    /// I/O threads (tokio workers, one reactor each). Defaults to one less
    /// than the number of cores, at least one: the application's own thread,
    /// which runs every callback, is busy too and needs a core of its own.
    pub io_threads: usize,
    /// Connections beyond this are closed as soon as they are accepted.
    pub max_sessions: usize,
    /// The listen backlog (server only).
    pub backlog: u32,
    /// How long a client waits for each connection attempt.
    pub connect_timeout: Duration,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            session: SessionConfig::default(),
            io_threads: std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1)),
            max_sessions: 10_000,
            backlog: 1024,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl ServiceConfig {
    pub fn max_packet_size(&self) -> usize {
        self.session.frame_limits.max_packet_size
    }
}
