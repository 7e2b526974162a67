"""pytest fixtures for testing your own servercore server.

Installed with servercore as the pytest plugin ``servercore``; its fixtures do
nothing until a test asks for one (``-p no:servercore`` turns it off). Tests
stay plain functions, no async test runner needed::

    import pytest
    from mygame import GameSession, CHAT

    @pytest.fixture
    def server(servercore_server):
        return servercore_server(GameSession, max_packet_size=1024)

    def test_chat_reaches_everyone(server, servercore_client):
        alice = servercore_client(server)
        bob = servercore_client(server)
        alice.send(CHAT, b"hi")
        assert bob.expect_packet(CHAT, timeout=2) == b"hi"

The server listens on 127.0.0.1 on a free port and is driven by an asyncio
loop on a thread of the plugin's own (so `async def` callbacks work as in
production); your session's callbacks run on that thread. Clients are
`servercore.connect` connections on the same loop, with blocking methods.
Everything a test started is stopped when it ends, also when it fails.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from servercore._connection import Connection, Packet, connect
from servercore._core import SendBuffer, Server, Session
from servercore._reason import DisconnectReason

if TYPE_CHECKING:
    from typing_extensions import Buffer, Unpack

    from servercore._core import ClientOptions, ServerOptions, TypedPacket

__all__ = ["LoopThread", "TestClient", "servercore_client", "servercore_loop", "servercore_server"]

_T = TypeVar("_T")


class LoopThread:
    """An asyncio event loop running on a thread of its own."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="servercore-test-loop", daemon=True)
        self._thread.start()

    def call(self, coroutine: Coroutine[Any, Any, _T], timeout: float | None = 30.0) -> _T:
        """Runs `coroutine` on the loop and waits up to `timeout` seconds for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        """Stops the loop (after cancelling what still runs on it) and joins its thread."""

        async def cancel_the_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.call(cancel_the_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class TestClient:
    """A connection to the server under test, with blocking methods for plain tests."""

    __test__ = False  # not a test class, despite the name

    def __init__(self, loop: LoopThread, connection: Connection) -> None:
        self._loop = loop
        self.connection = connection

    def send(self, packet: int | SendBuffer | TypedPacket, payload: Buffer | None = None, /) -> bool:
        """Queues a packet: `send(packet_id, payload)`, `send(SendBuffer)`, or a
        typed packet (`servercore.packets.Packet`)."""

        async def send() -> bool:
            if not isinstance(packet, int):
                return self.connection.send(packet)
            if payload is None:
                raise TypeError("send(packet_id, payload) needs a payload (b'' for none)")
            return self.connection.send(packet, payload)

        return self._loop.call(send())

    def recv(self, timeout: float = 5.0) -> Packet:
        """The next packet as `(packet_id, payload)`; TimeoutError if none in `timeout` s,
        `servercore.Disconnected` once the connection has ended."""
        return self._loop.call(self.connection.recv(timeout), None)

    def expect_packet(self, packet_id: int, timeout: float = 5.0) -> bytes:
        """The payload of the next packet, which must have id `packet_id`;
        AssertionError naming what came instead."""
        return self._loop.call(self.connection.expect_packet(packet_id, timeout), None)

    def expect_disconnect(self, timeout: float = 5.0) -> DisconnectReason:
        """Waits for the server to end the connection, skipping packets, and
        returns why it ended (as this side saw it); AssertionError if it does not."""

        async def ended() -> DisconnectReason:
            async def drain() -> None:
                async for _ in self.connection:
                    pass

            try:
                await asyncio.wait_for(drain(), timeout)
            except asyncio.TimeoutError:
                raise AssertionError(f"the connection was still open after {timeout} s") from None
            assert self.connection.reason is not None
            return self.connection.reason

        return self._loop.call(ended(), None)

    @property
    def reason(self) -> DisconnectReason | None:
        """Why the connection ended; None while it is open."""
        return self.connection.reason

    def close(self) -> None:
        self._loop.call(self.connection.close())


@pytest.fixture
def servercore_loop() -> Iterator[LoopThread]:
    """The event loop (on its own thread) that drives this test's servers and clients."""
    loop = LoopThread()
    yield loop
    loop.close()


@pytest.fixture
def servercore_server(servercore_loop: LoopThread) -> Iterator[Callable[..., Server]]:
    """`servercore_server(SessionClass, **options)` -> a Server serving on
    127.0.0.1 on a free port (`server.port`); stopped after the test."""
    servers: list[Server] = []

    def start(session_class: type[Session], **options: Unpack[ServerOptions]) -> Server:
        async def started() -> Server:
            server = Server(session_class, "127.0.0.1", 0, **options)
            await server.__aenter__()
            return server

        server = servercore_loop.call(started())
        servers.append(server)
        return server

    yield start
    for server in servers:
        servercore_loop.call(server.__aexit__(None, None, None))


@pytest.fixture
def servercore_client(servercore_loop: LoopThread) -> Iterator[Callable[..., TestClient]]:
    """`servercore_client(server_or_port, **options)` -> a connected TestClient;
    closed after the test."""
    clients: list[TestClient] = []

    def open_client(server: Server | int, **options: Unpack[ClientOptions]) -> TestClient:
        port = server if isinstance(server, int) else server.port
        client = TestClient(servercore_loop, servercore_loop.call(connect("127.0.0.1", port, **options)))
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        client.close()
