//! Limits and socket options, with defaults a game server can ship with, and
//! the range each may take.
//!
//! [`ServiceConfig::validate`] is the one place a configuration is judged: the
//! engine refuses a configuration outside these ranges instead of clamping it,
//! and the bindings translate their keyword options with the same ranges
//! ([`Count`], [`Seconds`]), so a message names the option, its range and the
//! value whichever way the value came in.

use std::fmt;
use std::time::Duration;

use crate::frame::{FrameLimits, HEADER_SIZE, MAX_WIRE_PACKET_SIZE};
use crate::recv_buffer::DEFAULT_READ_SIZE;

/// A configuration value outside its range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub option: &'static str,
    /// What is wrong, in words that say what to do: "must be ..., got ...".
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.option, self.problem)
    }
}

impl std::error::Error for ConfigError {}

/// The whole numbers an option may take.
#[derive(Clone, Copy, Debug)]
pub struct Count {
    pub min: u64,
    pub max: u64,
}

impl Count {
    /// `value` if it is in range.
    pub fn check(self, option: &'static str, value: i128) -> Result<u64, ConfigError> {
        u64::try_from(value)
            .ok()
            .filter(|v| (self.min..=self.max).contains(v))
            .ok_or_else(|| self.refuse(option, &value.to_string()))
    }

    /// The error for a value shown as `shown` (a number too large for any
    /// integer type, say).
    pub fn refuse(self, option: &'static str, shown: &str) -> ConfigError {
        ConfigError {
            option,
            problem: format!("must be an integer from {} to {}, got {shown}", self.min, self.max),
        }
    }
}

/// The longest duration any option or wait may take: one year. Longer ones
/// are mistakes (a timeout in milliseconds given as seconds), and far enough
/// from the largest instant a clock can add up to.
pub const MAX_SECONDS: u64 = 365 * 24 * 3600;

/// The durations an option may take, in seconds: up to [`MAX_SECONDS`].
#[derive(Clone, Copy, Debug)]
pub struct Seconds {
    /// Whether 0 is a value (a linger of 0 closes at once; a timeout of 0 makes no sense).
    pub zero_ok: bool,
}

impl Seconds {
    /// `value` seconds as a duration, if it is in range.
    pub fn check(self, option: &'static str, value: f64) -> Result<Duration, ConfigError> {
        let in_range = value.is_finite() && value <= MAX_SECONDS as f64 && self.admits_sign(value);
        match in_range {
            true => Ok(Duration::from_secs_f64(value)),
            false => Err(self.refuse(option, &value.to_string())),
        }
    }

    pub fn check_duration(self, option: &'static str, value: Duration) -> Result<(), ConfigError> {
        match value <= Duration::from_secs(MAX_SECONDS) && (self.zero_ok || !value.is_zero()) {
            true => Ok(()),
            false => Err(self.refuse(option, &format!("{}", value.as_secs_f64()))),
        }
    }

    fn admits_sign(self, value: f64) -> bool {
        if self.zero_ok { value >= 0.0 } else { value > 0.0 }
    }

    /// The error for a value shown as `shown`.
    pub fn refuse(self, option: &'static str, shown: &str) -> ConfigError {
        let low = if self.zero_ok { "from 0" } else { "more than 0 and" };
        ConfigError {
            option,
            problem: format!("must be {low} up to {MAX_SECONDS} seconds (one year), got {shown}"),
        }
    }
}

/// The ranges of the options, by what they count.
pub mod limits {
    use super::{Count, HEADER_SIZE, MAX_WIRE_PACKET_SIZE, Seconds};

    pub const IO_THREADS: Count = Count { min: 1, max: 1024 };
    pub const MAX_SESSIONS: Count = Count { min: 1, max: 10_000_000 };
    pub const BACKLOG: Count = Count { min: 1, max: 65_535 };
    pub const MAX_PACKET_SIZE: Count = Count { min: HEADER_SIZE as u64, max: MAX_WIRE_PACKET_SIZE as u64 };
    /// Byte budgets (send queue, receive backlog): up to 1 TiB.
    pub const BYTES: Count = Count { min: 1, max: 1 << 40 };
    pub const MAX_PACKETS_PER_SECOND: Count = Count { min: 1, max: u32::MAX as u64 };
    pub const PACKET_ID: Count = Count { min: 0, max: u16::MAX as u64 };
    pub const PORT: Count = Count { min: 0, max: u16::MAX as u64 };
    /// Sessions a client opens at once.
    pub const CLIENT_COUNT: Count = Count { min: 1, max: 1_000_000 };
    /// Timeouts: more than 0.
    pub const TIMEOUT: Seconds = Seconds { zero_ok: false };
    /// Waits and the linger: 0 is a value.
    pub const WAIT: Seconds = Seconds { zero_ok: true };
}

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
    /// A new connection must start sending within this, or it is a slot
    /// taken for nothing; its first packet then completes within
    /// `packet_timeout` like any other. A server's default; a client's
    /// sessions often wait for the server first.
    pub first_packet_timeout: Option<Duration>,
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
            first_packet_timeout: Some(Duration::from_secs(10)),
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
    /// Connections from one address beyond this are closed as soon as they
    /// are accepted, so one machine cannot take every slot (server only).
    pub max_sessions_per_address: Option<usize>,
    /// New connections per second one address may open (in bursts of twice
    /// that); the rest are refused at accept (server only).
    pub max_accepts_per_second: Option<u32>,
    /// Addresses the per-address limits do not apply to (NAT gateways, a
    /// load balancer you trust).
    pub trusted_addresses: Vec<std::net::IpAddr>,
    /// Load balancers whose connections begin with a PROXY protocol header
    /// (v1 or v2) naming the real client, which every per-address defence
    /// and `peer` then use. Anyone else's PROXY header is refused (server only).
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// The listen backlog (server only).
    pub backlog: u32,
    /// SO_REUSEPORT: several processes listen on one port and the kernel
    /// balances new connections over them (server only; `servercore serve`).
    pub reuse_port: bool,
    /// How long a client waits for each connection attempt.
    pub connect_timeout: Duration,
    /// The application thread serves the sockets itself while it waits and
    /// the load is light (see the `reactor` module); off, only the I/O threads do.
    pub inline_io: bool,
    /// How long a graceful drain (`run_forever` on SIGTERM or SIGINT) lets the
    /// sessions it closes flush, instead of the linger.
    pub shutdown_grace: Duration,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            session: SessionConfig::default(),
            io_threads: std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1)),
            max_sessions: 10_000,
            max_sessions_per_address: Some(64),
            max_accepts_per_second: Some(20),
            // This machine's own tools (a DummyClient, a load test, a proxy on
            // the same host) connect from these; other loopback addresses
            // (127.0.0.2, ...) are limited like any machine.
            trusted_addresses: vec![
                std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
                std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            ],
            trusted_proxies: Vec::new(),
            // A burst of reconnecting players (after a restart, a network
            // blip) must not overflow the listen queue: an overflowed SYN
            // waits the kernel's one-second retransmit. Capped by somaxconn
            // (4096 by default since Linux 5.4).
            backlog: 4096,
            reuse_port: false,
            connect_timeout: Duration::from_secs(10),
            inline_io: true,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

impl ServiceConfig {
    pub fn max_packet_size(&self) -> usize {
        self.session.frame_limits.max_packet_size
    }

    /// Checks every value against its range, and the ones that depend on each
    /// other; the first problem found is the error.
    pub fn validate(&self) -> Result<(), ConfigError> {
        use limits::*;
        let count = |option, range: Count, value: u64| range.check(option, i128::from(value)).map(drop);
        let session = &self.session;
        count("io_threads", IO_THREADS, self.io_threads as u64)?;
        count("max_sessions", MAX_SESSIONS, self.max_sessions as u64)?;
        if let Some(rate) = self.max_accepts_per_second {
            count("max_accepts_per_second", MAX_PACKETS_PER_SECOND, u64::from(rate))?;
        }
        if let Some(limit) = self.max_sessions_per_address {
            count("max_sessions_per_address", MAX_SESSIONS, limit as u64)?;
        }
        count("backlog", BACKLOG, u64::from(self.backlog))?;
        count("max_packet_size", MAX_PACKET_SIZE, self.max_packet_size() as u64)?;
        count("max_send_queue_bytes", BYTES, session.max_send_queue_bytes as u64)?;
        count("max_pending_recv_bytes", BYTES, session.max_pending_recv_bytes as u64)?;
        if let Some(rate) = session.max_packets_per_second {
            count("max_packets_per_second", MAX_PACKETS_PER_SECOND, u64::from(rate))?;
        }
        if let Some(timeout) = session.packet_timeout {
            TIMEOUT.check_duration("packet_timeout", timeout)?;
        }
        if let Some(timeout) = session.first_packet_timeout {
            TIMEOUT.check_duration("first_packet_timeout", timeout)?;
        }
        if let Some(timeout) = session.idle_timeout {
            TIMEOUT.check_duration("idle_timeout", timeout)?;
        }
        WAIT.check_duration("linger", session.linger)?;
        TIMEOUT.check_duration("connect_timeout", self.connect_timeout)?;
        WAIT.check_duration("shutdown_grace", self.shutdown_grace)?;
        if let Some(keepalive) = session.keepalive {
            TIMEOUT.check_duration("keepalive idle", keepalive.idle)?;
            TIMEOUT.check_duration("keepalive interval", keepalive.interval)?;
            TIMEOUT.check_duration("keepalive user_timeout", keepalive.user_timeout)?;
        }
        if session.read_size == 0 {
            return Err(ConfigError { option: "read_size", problem: "must be at least 1 byte".into() });
        }
        if session.max_send_queue_bytes < self.max_packet_size() {
            return Err(ConfigError {
                option: "max_send_queue_bytes",
                problem: format!(
                    "({}) must hold at least one packet of max_packet_size ({})",
                    session.max_send_queue_bytes,
                    self.max_packet_size()
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid() {
        assert_eq!(ServiceConfig::default().validate(), Ok(()));
    }

    #[test]
    fn a_value_out_of_range_is_refused_with_the_option_and_its_range() {
        let config = ServiceConfig { io_threads: 0, ..ServiceConfig::default() };
        let error = config.validate().unwrap_err();
        assert_eq!(error.to_string(), "io_threads must be an integer from 1 to 1024, got 0");
        let mut config = ServiceConfig::default();
        config.session.idle_timeout = Some(Duration::from_secs(MAX_SECONDS + 1));
        assert_eq!(config.validate().unwrap_err().option, "idle_timeout");
    }

    #[test]
    fn seconds_refuse_what_no_clock_can_hold() {
        for bad in [f64::NAN, f64::INFINITY, -1.0, 1e19, MAX_SECONDS as f64 + 1.0] {
            assert!(limits::WAIT.check("linger", bad).is_err(), "{bad}");
        }
        assert!(limits::TIMEOUT.check("packet_timeout", 0.0).is_err());
        assert_eq!(limits::WAIT.check("linger", 0.0), Ok(Duration::ZERO));
        assert_eq!(limits::TIMEOUT.check("t", MAX_SECONDS as f64), Ok(Duration::from_secs(MAX_SECONDS)));
    }

    #[test]
    fn counts_refuse_negative_and_huge_values() {
        assert!(limits::PACKET_ID.check("packet_id", -1).is_err());
        assert!(limits::PACKET_ID.check("packet_id", 1 << 70).is_err());
        assert_eq!(limits::PACKET_ID.check("packet_id", 65535), Ok(65535));
    }

    #[test]
    fn a_send_queue_smaller_than_one_packet_is_refused() {
        let mut config = ServiceConfig::default();
        config.session.max_send_queue_bytes = 100;
        assert_eq!(config.validate().unwrap_err().option, "max_send_queue_bytes");
    }
}
