"""One awaitable connection to a server, for bots and tests.

    conn = await servercore.connect("127.0.0.1", 7777)
    conn.send(1, b"hello")
    packet_id, payload = await conn.recv(timeout=5)
    await conn.close()

A `Connection` is a `Client` of one session driven by the running loop (see
`_aio.py`), so it uses the engine's framing and its checks (max_packet_size,
packet_ids, timeouts) exactly as a server does. Received packets wait in an
inbox; once `max_inbox_packets` are waiting, the session's on_recv_packet
awaits room, so the engine holds further packets (up to
max_pending_recv_bytes) and then TCP pushes back on the server: a bot that
stops reading costs bounded memory.

Each connection has its own I/O thread. For hundreds of bots, one
`Client(..., count=N)` with async callbacks is lighter.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, overload

from servercore._core import Client, PacketSession, SendBuffer
from servercore._reason import DisconnectReason

if TYPE_CHECKING:
    from typing_extensions import Buffer, Self, Unpack

    from servercore._core import ClientOptions, TypedPacket

Packet = tuple[int, bytes]
"""A received packet: its id and its payload."""


class Disconnected(ConnectionError):
    """The connection has ended and no received packet is left to read."""

    def __init__(self, reason: DisconnectReason) -> None:
        super().__init__(f"disconnected: {reason.name}")
        self.reason = reason


class _Inbox(PacketSession):
    """The session behind a Connection: hands what it gets to the connection."""

    connection: ClassVar[Connection]  # set on the per-connection subclass

    def on_connected(self) -> None:
        self.connection._opened(self)

    def on_recv_packet(self, packet_id: int, payload: bytes) -> Any:
        return self.connection._received(packet_id, payload)

    def on_disconnected(self, reason: DisconnectReason) -> None:
        self.connection._ended(reason)


class Connection:
    """A connected session you read from with `await recv()`; make it with `connect()`."""

    def __init__(self, client: Client, max_inbox_packets: int) -> None:
        self._client = client
        self._session: PacketSession | None = None
        self._inbox: collections.deque[Packet] = collections.deque()
        self._max_inbox_packets = max_inbox_packets
        self._arrived: asyncio.Event = asyncio.Event()  # set while the inbox is not empty
        self._room: asyncio.Event = asyncio.Event()  # set while the inbox is not full
        self._room.set()
        self._reason: DisconnectReason | None = None
        self._peer = ("", 0)
        self._ready: asyncio.Event = asyncio.Event()  # set once connected or ended

    # --- what the session reports (on the loop's thread) ---------------------------------

    def _opened(self, session: PacketSession) -> None:
        self._session = session
        self._peer = session.peer
        self._ready.set()

    def _received(self, packet_id: int, payload: bytes) -> Any:
        if len(self._inbox) >= self._max_inbox_packets:
            return self._wait_for_room(packet_id, payload)
        self._put(packet_id, payload)
        return None

    async def _wait_for_room(self, packet_id: int, payload: bytes) -> None:
        while len(self._inbox) >= self._max_inbox_packets:
            self._room.clear()
            await self._room.wait()
        self._put(packet_id, payload)

    def _put(self, packet_id: int, payload: bytes) -> None:
        self._inbox.append((packet_id, payload))
        self._arrived.set()

    def _ended(self, reason: DisconnectReason) -> None:
        self._reason = reason
        self._session = None
        self._arrived.set()  # wakes a reader, which then learns of the end
        self._ready.set()
        # The engine has nothing more to do for this connection: let it go,
        # even if nobody calls close().
        asyncio.get_running_loop().call_soon(self._release_client)

    def _release_client(self) -> None:
        if self._client.running:
            self._client.stop()

    # --- the public face -------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True until the connection starts closing (from either side)."""
        return self._session is not None and self._session.connected

    @property
    def reason(self) -> DisconnectReason | None:
        """Why the connection ended; None while it has not."""
        return self._reason

    @property
    def peer(self) -> tuple[str, int]:
        """The server's `(host, port)`."""
        return self._peer

    @overload
    def send(self, packet: SendBuffer | TypedPacket, payload: None = None, /) -> bool: ...
    @overload
    def send(self, packet: int, payload: Buffer, /) -> bool: ...
    def send(self, packet: Any, payload: Any = None, /) -> bool:
        """Queues a packet, as `PacketSession.send`; False once the connection is closing."""
        session = self._session
        if session is None:
            return False
        if payload is None:
            return session.send(packet)
        return session.send(packet, payload)

    async def recv(self, timeout: float | None = None) -> Packet:
        """The next packet, `(packet_id, payload)`, in the order received.

        Raises TimeoutError if none arrives within `timeout` seconds, and
        `Disconnected` (with the `reason`) once the connection has ended and
        every packet received before was read."""
        while not self._inbox:
            if self._reason is not None:
                raise Disconnected(self._reason)
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout)
            except asyncio.TimeoutError:
                # Python 3.10's asyncio.TimeoutError is not the builtin one.
                raise TimeoutError(f"no packet within {timeout} s") from None
        packet = self._inbox.popleft()
        self._room.set()
        return packet

    async def expect_packet(self, packet_id: int, timeout: float = 5.0) -> bytes:
        """The payload of the next packet, which must have id `packet_id`.

        Raises AssertionError naming what came instead (another packet, the
        end of the connection, or nothing within `timeout` seconds): for tests."""
        try:
            got_id, payload = await self.recv(timeout)
        except TimeoutError:
            raise AssertionError(f"expected packet {packet_id}; nothing arrived within {timeout} s") from None
        except Disconnected as ended:
            raise AssertionError(f"expected packet {packet_id}; the connection ended: {ended.reason.name}") from None
        if got_id != packet_id:
            raise AssertionError(f"expected packet {packet_id}; got packet {got_id} ({len(payload)} byte payload)")
        return payload

    def __aiter__(self) -> AsyncIterator[Packet]:
        return self._packets()

    async def _packets(self) -> AsyncIterator[Packet]:
        """Every packet until the connection ends."""
        while True:
            try:
                yield await self.recv()
            except Disconnected:
                return

    async def close(self) -> None:
        """Closes (flushing what was sent, within the linger) and returns once
        the connection has ended. Idempotent."""
        await self._client.__aexit__(None, None, None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "connected" if self._reason is None else f"ended {self._reason.name}"
        host, port = self._peer
        return f"<Connection to {host}:{port} {state}>"


async def connect(
    host: str = "127.0.0.1",
    port: int | None = None,
    *,
    max_inbox_packets: int = 1024,
    **options: Unpack[ClientOptions],
) -> Connection:
    """Connects one session to `host:port` and returns it once connected.

    `options` are a Client's (connect_timeout, max_packet_size, packet_ids, ...);
    one I/O thread serves the connection unless `io_threads` says otherwise.
    Raises ConnectionError (an OSError) if the connection fails."""
    if max_inbox_packets < 1:
        raise ValueError(f"max_inbox_packets must be at least 1, got {max_inbox_packets}")
    options.setdefault("io_threads", 1)
    session_class: type[_Inbox] = type("ConnectionSession", (_Inbox,), {})
    client = Client(session_class, host, port, count=1, **options)
    connection = Connection(client, max_inbox_packets)
    session_class.connection = connection
    await client.__aenter__()
    try:
        # The session object exists once the loop has delivered on_connected.
        await connection._ready.wait()
    except BaseException:
        await connection.close()
        raise
    return connection
