"""Helpers for the tests: the wire format by hand, a raw socket peer, polling,
and session classes that record what their callbacks saw.

Everything uses real sockets on loopback; nothing mocks the network.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from servercore import DisconnectReason, PacketSession, Service, Session

HEADER = struct.Struct("<HH")
SEQ = struct.Struct("<I")
"""A u32 sequence number, the payload of numbered packets."""


# --- the wire format -----------------------------------------------------------


def packet(packet_id: int, payload: bytes = b"") -> bytes:
    """One encoded packet: [size u16 LE][id u16 LE][payload], size counting the header."""
    return HEADER.pack(HEADER.size + len(payload), packet_id) + payload


def header(size: int, packet_id: int) -> bytes:
    """A bare header, which may lie about its size."""
    return HEADER.pack(size, packet_id)


# --- polling -------------------------------------------------------------------


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


def poll_for(services: Service | Sequence[Service], seconds: float) -> None:
    """Keeps polling for `seconds` (to see that nothing more arrives)."""
    if isinstance(services, Service):
        services = [services]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for service in services:
            service.poll(0.01)


# --- addresses and the process -------------------------------------------------


def free_port() -> int:
    """A port on 127.0.0.1 where nothing listens (at the moment of asking)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def local_port(peer: RawPeer) -> int:
    """The peer's own port: the second half of its session's `peer`."""
    return peer.sock.getsockname()[1]


def rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of a process (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# --- a raw peer ----------------------------------------------------------------


class RawPeer:
    """A plain socket speaking the protocol by hand: the honest or hostile other side.

    `rcvbuf` sets SO_RCVBUF before connecting, for a peer that reads slowly or
    not at all; `source` binds the peer's address first (127.0.0.x acts as
    another machine).
    """

    def __init__(self, port: int, timeout: float = 5.0, rcvbuf: int | None = None, source: str | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            if source is not None:
                self.sock.bind((source, 0))
            self.sock.settimeout(timeout)
            self.sock.connect(("127.0.0.1", port))
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            self.sock.close()
            raise
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

    def recv_exactly(self, count: int) -> bytes:
        """The next `count` raw bytes (no framing); raises if the peer closes first."""
        while len(self.buffer) < count:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed by the server after {len(self.buffer)} of {count} bytes")
            self.buffer += chunk
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def recv_until_closed(self) -> tuple[list[tuple[int, bytes]], str]:
        """Every packet until the server closes, and how it closed: "EOF" or
        "reset" (or "timeout" if the socket's timeout passed first)."""
        packets = []
        try:
            while True:
                packets.append(self.recv_packet())
        except ConnectionResetError:
            return packets, "reset"
        except ConnectionError:
            return packets, "EOF"
        except TimeoutError:
            return packets, "timeout"

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


def send_ignoring_close(peer: RawPeer, data: bytes) -> None:
    """Sends, but the server may cut the peer while it is still sending."""
    try:
        peer.send(data)
    except OSError:
        pass


def connect(server: Service, raw_peers: Callable[..., RawPeer], count: int = 1, **options: Any) -> list[RawPeer]:
    """Connects `count` RawPeers and waits until each session got on_connected."""
    before = len(server)
    peers = [raw_peers(server.port, **options) for _ in range(count)]
    poll_until(server, lambda: len(server) == before + count, message=lambda: f"{len(server)} sessions")
    return peers


def session_of(server: Service, peer: RawPeer) -> Any:
    """The server-side session of `peer` (matched by the peer's local port)."""
    local = peer.sock.getsockname()
    (session,) = [s for s in server.sessions if tuple(s.peer) == (local[0], local[1])]
    return session


def exchange(server: Service, peer: RawPeer, data: bytes, timeout: float = 5.0) -> tuple[int, bytes]:
    """Sends `data` from the raw peer and returns the next packet it receives,
    polling the server (callbacks run only in poll) while a thread reads."""
    result: list = []

    def read() -> None:
        try:
            result.append(peer.recv_packet())
        except BaseException as error:  # noqa: BLE001 - handed to the test
            result.append(error)

    reader = threading.Thread(target=read, daemon=True)
    peer.send(data)
    reader.start()
    try:
        poll_until(server, lambda: result, timeout=timeout, message="no reply")
    finally:
        reader.join(timeout)
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


# --- session classes that record -----------------------------------------------


def recorder(echo: bool | Collection[int] = ()) -> type[PacketSession]:
    """A fresh PacketSession class that records what its sessions saw, in class
    attributes (fresh for each call, so tests do not share them):

    - `sessions`: every session object, in on_connected order
    - `ids_by_port`: the peer's port -> session id, from on_connected
    - `received`: session id -> [(packet_id, payload), ...] in arrival order
    - `reasons`: session id -> the reason of its on_disconnected
    - `disconnects`: session id -> every reason delivered to it (one, if all is well)
    - `ended`: every reason, in the order the on_disconnected calls came
    - `closed_at`: session id -> time.monotonic() of its on_disconnected

    `echo` sends packets back: True for every packet, or a collection of ids.
    """
    echo_all = echo is True
    echo_ids = frozenset() if isinstance(echo, bool) else frozenset(echo)

    class Recorder(PacketSession):
        sessions: list[Recorder] = []
        ids_by_port: dict[int, int] = {}
        received: dict[int, list[tuple[int, bytes]]] = {}
        reasons: dict[int, DisconnectReason] = {}
        disconnects: dict[int, list[DisconnectReason]] = {}
        ended: list[DisconnectReason] = []
        closed_at: dict[int, float] = {}

        def on_connected(self) -> None:
            Recorder.sessions.append(self)
            Recorder.ids_by_port[self.peer[1]] = self.id
            Recorder.received[self.id] = []

        def on_recv_packet(self, packet_id: int, payload: bytes) -> None:
            Recorder.received[self.id].append((packet_id, payload))
            if echo_all or packet_id in echo_ids:
                self.send(packet_id, payload)

        def on_disconnected(self, reason: DisconnectReason) -> None:
            Recorder.reasons[self.id] = reason
            Recorder.disconnects.setdefault(self.id, []).append(reason)
            Recorder.ended.append(reason)
            Recorder.closed_at[self.id] = time.monotonic()

    return Recorder


def raw_recorder(consume: Callable[[bytes], Any]) -> type[Session]:
    """A fresh raw Session class whose on_recv records `data` in `calls` and
    returns `consume(data)`; `sessions` and `ended` as in `recorder()`."""

    class Raw(Session):
        sessions: list[Raw] = []
        calls: list[bytes] = []
        ended: list[DisconnectReason] = []

        def on_connected(self) -> None:
            Raw.sessions.append(self)

        def on_recv(self, data: bytes) -> Any:
            Raw.calls.append(data)
            return consume(data)

        def on_disconnected(self, reason: DisconnectReason) -> None:
            Raw.ended.append(reason)

    return Raw
