"""Helpers for the tests: the wire format by hand, a raw socket peer, polling.

Everything uses real sockets on loopback; nothing mocks the network.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

from servercore import Service

HEADER = struct.Struct("<HH")

def packet(packet_id: int, payload: bytes = b"") -> bytes:
    """One encoded packet: [size u16 LE][id u16 LE][payload], size counting the header."""
    return HEADER.pack(HEADER.size + len(payload), packet_id) + payload


def header(size: int, packet_id: int) -> bytes:
    """A bare header, which may lie about its size."""
    return HEADER.pack(size, packet_id)


def poll_until(
    services: Service | Sequence[Service],
    condition: Callable[[], Any],
    timeout: float = 5.0,
    message: str | Callable[[], str] = "condition not met",
) -> None:
    """Polls the services until `condition()` is true; fails the test at the timeout."""
    if isinstance(services, Service):
        services = [services]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"after {timeout}s: {text}")
        for service in services:
            service.poll(0.005)


class RawPeer:
    """A plain socket speaking the protocol by hand: the honest or hostile other side."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_packet(self) -> tuple[int, bytes]:
        """The next whole packet; raises if the peer closes or the timeout passes."""
        while True:
            if len(self.buffer) >= HEADER.size:
                size, packet_id = HEADER.unpack_from(self.buffer)
                if len(self.buffer) >= size:
                    payload = self.buffer[HEADER.size:size]
                    self.buffer = self.buffer[size:]
                    return packet_id, payload
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by the server")
            self.buffer += chunk

    def recv_packet_with_id(self, packet_id: int) -> bytes:
        """The payload of the next packet with this id, skipping others (broadcasts)."""
        while True:
            got_id, payload = self.recv_packet()
            if got_id == packet_id:
                return payload

    def wait_closed(self, timeout: float = 5.0) -> bool:
        """True once the server has closed the connection (EOF or reset) within `timeout`."""
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
        return False

    def reset(self) -> None:
        """Close with SO_LINGER 0: the kernel sends RST instead of FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


