//! Why a session ended. Every disconnect carries exactly one reason: the first
//! cause wins, later ones (the socket error that follows a kick, say) are ignored.

use std::fmt;

/// The reasons, in the order of their codes (the Python `DisconnectReason` enum
/// uses the same names and values; a test keeps the two in step).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DisconnectReason {
    /// The peer closed its side (read returned end of stream).
    ClosedByPeer = 1,
    /// The peer reset the connection, or the socket failed.
    Reset = 2,
    /// `disconnect()` was called here.
    ClosedLocally = 3,
    /// A header's size is below the 4 header bytes.
    InvalidHeader = 4,
    /// A header's size is above `max_packet_size`.
    PacketTooLarge = 5,
    /// A header's id is not in `packet_ids`.
    UnknownPacketId = 6,
    /// Unsent bytes passed `max_send_queue_bytes`: the peer does not read.
    SendQueueFull = 7,
    /// A started packet did not complete within `packet_timeout`.
    PacketTimeout = 8,
    /// Nothing arrived within `idle_timeout`.
    IdleTimeout = 9,
    /// A Python callback of this session raised.
    CallbackError = 10,
    /// The server was stopped.
    ServerShutdown = 11,
    /// The peer sent more packets per second than `max_packets_per_second`.
    RateLimited = 12,
    /// A packet's payload did not match its declared layout (the application
    /// said so: short, trailing bytes, invalid UTF-8, a count past its limit).
    MalformedPacket = 13,
    /// A new connection sent nothing within `first_packet_timeout`: a slot
    /// taken for nothing.
    FirstPacketTimeout = 14,
    /// The server was full and this connection had sent nothing: its slot went
    /// to a newcomer.
    Evicted = 15,
    /// A PROXY protocol header that may not be believed: from an address not
    /// in `trusted_proxies`, or malformed, or missing from a trusted proxy.
    ProxyHeader = 16,
}

impl DisconnectReason {
    pub const ALL: [DisconnectReason; 16] = [
        DisconnectReason::ClosedByPeer,
        DisconnectReason::Reset,
        DisconnectReason::ClosedLocally,
        DisconnectReason::InvalidHeader,
        DisconnectReason::PacketTooLarge,
        DisconnectReason::UnknownPacketId,
        DisconnectReason::SendQueueFull,
        DisconnectReason::PacketTimeout,
        DisconnectReason::IdleTimeout,
        DisconnectReason::CallbackError,
        DisconnectReason::ServerShutdown,
        DisconnectReason::RateLimited,
        DisconnectReason::MalformedPacket,
        DisconnectReason::FirstPacketTimeout,
        DisconnectReason::Evicted,
        DisconnectReason::ProxyHeader,
    ];

    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.get(usize::from(code).checked_sub(1)?).copied()
    }

    /// The name used in Python and in `stats()`.
    pub fn name(self) -> &'static str {
        match self {
            DisconnectReason::ClosedByPeer => "CLOSED_BY_PEER",
            DisconnectReason::Reset => "RESET",
            DisconnectReason::ClosedLocally => "CLOSED_LOCALLY",
            DisconnectReason::InvalidHeader => "INVALID_HEADER",
            DisconnectReason::PacketTooLarge => "PACKET_TOO_LARGE",
            DisconnectReason::UnknownPacketId => "UNKNOWN_PACKET_ID",
            DisconnectReason::SendQueueFull => "SEND_QUEUE_FULL",
            DisconnectReason::PacketTimeout => "PACKET_TIMEOUT",
            DisconnectReason::IdleTimeout => "IDLE_TIMEOUT",
            DisconnectReason::CallbackError => "CALLBACK_ERROR",
            DisconnectReason::ServerShutdown => "SERVER_SHUTDOWN",
            DisconnectReason::RateLimited => "RATE_LIMITED",
            DisconnectReason::MalformedPacket => "MALFORMED_PACKET",
            DisconnectReason::FirstPacketTimeout => "FIRST_PACKET_TIMEOUT",
            DisconnectReason::Evicted => "EVICTED",
            DisconnectReason::ProxyHeader => "PROXY_HEADER",
        }
    }

    /// Closes that flush what was queued before closing (bounded by the linger):
    /// the local ones, and a peer that finished sending but may still read (a
    /// TCP half-close). The others are faults or attacks: waiting on that peer
    /// buys nothing.
    pub fn flushes_queue(self) -> bool {
        matches!(
            self,
            DisconnectReason::ClosedLocally
                | DisconnectReason::ServerShutdown
                | DisconnectReason::ClosedByPeer
        )
    }

    /// Reasons that say something is wrong with the peer or the game code, logged
    /// as warnings. The ordinary comings and goings, resets included (a player
    /// killing the game client is routine), are logged at debug level.
    pub fn is_fault(self) -> bool {
        !matches!(
            self,
            DisconnectReason::ClosedByPeer
                | DisconnectReason::Reset
                | DisconnectReason::ClosedLocally
                | DisconnectReason::ServerShutdown
        )
    }
}

impl fmt::Display for DisconnectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_dense_from_one() {
        for (index, reason) in DisconnectReason::ALL.iter().enumerate() {
            assert_eq!(usize::from(reason.code()), index + 1);
            assert_eq!(DisconnectReason::from_code(reason.code()), Some(*reason));
        }
        assert_eq!(DisconnectReason::from_code(0), None);
        assert_eq!(DisconnectReason::from_code(DisconnectReason::ALL.len() as u8 + 1), None);
    }

    #[test]
    fn polite_closes_flush_and_faults_do_not() {
        let flushing: Vec<_> = DisconnectReason::ALL.into_iter().filter(|r| r.flushes_queue()).collect();
        assert_eq!(
            flushing,
            [
                DisconnectReason::ClosedByPeer,
                DisconnectReason::ClosedLocally,
                DisconnectReason::ServerShutdown
            ]
        );
    }
}
