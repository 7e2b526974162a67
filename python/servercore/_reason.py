"""Why a session ended: the `reason` passed to `on_disconnected`."""

from __future__ import annotations

import enum


class DisconnectReason(enum.IntEnum):
    """Every session ends with exactly one of these (the first cause wins).

    The values are the engine's codes; ``servercore._core.DISCONNECT_REASONS``
    lists them and a test keeps the two in step.
    """

    CLOSED_BY_PEER = 1
    """The peer closed its side of the connection."""
    RESET = 2
    """The peer reset the connection, or the socket failed."""
    CLOSED_LOCALLY = 3
    """``session.disconnect()`` was called (or a Client was stopped)."""
    INVALID_HEADER = 4
    """A header's size was below the 4 header bytes."""
    PACKET_TOO_LARGE = 5
    """A header's size was above ``max_packet_size``."""
    UNKNOWN_PACKET_ID = 6
    """A header's id was not in ``packet_ids``."""
    SEND_QUEUE_FULL = 7
    """Unsent bytes passed ``max_send_queue_bytes``: the peer does not read."""
    PACKET_TIMEOUT = 8
    """A started packet did not complete within ``packet_timeout``."""
    IDLE_TIMEOUT = 9
    """Nothing arrived within ``idle_timeout``."""
    CALLBACK_ERROR = 10
    """A callback of this session raised; the traceback was logged."""
    SERVER_SHUTDOWN = 11
    """``server.stop()``."""
    RATE_LIMITED = 12
    """More packets per second than ``max_packets_per_second``."""
    MALFORMED_PACKET = 13
    """A typed packet's payload did not match its layout (short, trailing
    bytes, invalid UTF-8, a count past its limit); its handler never ran."""
    FIRST_PACKET_TIMEOUT = 14
    """A new connection sent nothing within ``first_packet_timeout`` (a
    server's default: 10 s); its first packet then has ``packet_timeout``."""
    EVICTED = 15
    """The server was full and this connection had sent nothing yet: its slot
    went to a newcomer."""
    PROXY_HEADER = 16
    """A PROXY protocol header that may not be believed: from an address not
    in ``trusted_proxies``, malformed, or missing from a trusted proxy."""

    def __str__(self) -> str:
        return self.name

    @property
    def is_fault(self) -> bool:
        """True for reasons that mean the peer broke a rule or the game code raised.

        These are logged as warnings; the rest (resets included) at debug level.
        """
        return self not in (
            DisconnectReason.CLOSED_BY_PEER,
            DisconnectReason.RESET,
            DisconnectReason.CLOSED_LOCALLY,
            DisconnectReason.SERVER_SHUTDOWN,
        )
