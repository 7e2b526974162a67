"""The pytest plugin for users' tests (python/servercore/testing.py), used
here the way a user's test uses it: through the fixtures its entry point
registers.

- servercore_server starts a user's Server on 127.0.0.1 on a free port,
  driven by a loop on the plugin's thread (async callbacks work);
  servercore_client connects blocking clients to it.
- expect_packet / expect_disconnect say what came instead when a test's
  expectation fails.
- A failing test still stops everything it started.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from servercore import DisconnectReason, Disconnected, PacketSession, Server
from servercore.packets import Packet, u32
from servercore.testing import TestClient


class Ping(Packet, id=2):
    seq: u32


class Room(PacketSession):
    """Chat (1) goes to the others; 2 answers after an await; 3 closes."""

    server: Server
    callback_threads: set[str] = set()

    def on_connected(self) -> None:
        self.callback_threads.add(threading.current_thread().name)

    async def on_recv_packet(self, packet_id: int, payload: bytes) -> None:
        if packet_id == 1:
            self.server.broadcast(1, payload, exclude=self)
        elif packet_id == 2:
            await asyncio.sleep(0.01)
            self.send(2, payload[::-1])
        elif packet_id == 3:
            self.disconnect()


ServerFactory = Callable[..., Server]
ClientFactory = Callable[..., TestClient]


def test_a_server_on_a_free_port_with_connected_clients(
    servercore_server: ServerFactory, servercore_client: ClientFactory
) -> None:
    server = servercore_server(Room, packet_ids={1, 2, 3})
    Room.server = server
    assert server.running and server.host == "127.0.0.1" and server.port > 0
    alice, bob, carol = (servercore_client(server) for _ in range(3))
    alice.send(1, b"hello")
    assert bob.expect_packet(1) == b"hello"
    assert carol.expect_packet(1) == b"hello"
    bob.send(2, b"abc")
    assert bob.recv(timeout=5) == (2, b"cba")
    # Callbacks run on the plugin's loop thread, not the test's.
    assert Room.callback_threads == {"servercore-test-loop"}


def test_expectations_say_what_came_instead(
    servercore_server: ServerFactory, servercore_client: ClientFactory
) -> None:
    server = servercore_server(Room, packet_ids={1, 2, 3})
    client = servercore_client(server.port)
    client.send(2, b"xy")
    with pytest.raises(AssertionError, match=r"expected packet 1; got packet 2 \(2 byte payload\)"):
        client.expect_packet(1)
    with pytest.raises(AssertionError, match="nothing arrived within 0.05 s"):
        client.expect_packet(1, timeout=0.05)
    with pytest.raises(TimeoutError):
        client.recv(timeout=0.05)
    with pytest.raises(AssertionError, match="still open after 0.05 s"):
        client.expect_disconnect(timeout=0.05)
    client.send(3, b"")
    assert client.expect_disconnect() is DisconnectReason.CLOSED_BY_PEER
    assert client.reason is DisconnectReason.CLOSED_BY_PEER
    with pytest.raises(Disconnected):
        client.recv()
    with pytest.raises(TypeError, match="needs a payload"):
        client.send(1)


def test_a_failing_test_still_stops_what_it_started(tmp_path: Path) -> None:
    (tmp_path / "test_user.py").write_text(
        "from servercore import PacketSession\n"
        "class Silent(PacketSession):\n"
        "    def on_recv_packet(self, packet_id, payload): pass\n"
        "def test_expects_an_answer(servercore_server, servercore_client):\n"
        "    client = servercore_client(servercore_server(Silent))\n"
        "    client.send(1, b'?')\n"
        "    client.expect_packet(1, timeout=0.2)\n"
        "def test_after_it():\n"
        "    import threading\n"
        "    names = [t.name for t in threading.enumerate()]\n"
        "    assert names.count('servercore-test-loop') == 0, names\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error::ResourceWarning",
         "test_user.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert "1 failed, 1 passed" in result.stdout, result.stdout + result.stderr
    assert "expected packet 1; nothing arrived within 0.2 s" in result.stdout


def test_a_client_sends_typed_packets(
    servercore_server: ServerFactory, servercore_client: ClientFactory
) -> None:
    server = servercore_server(Room, packet_ids={1, 2, 3})
    client = servercore_client(server)
    client.send(Ping(seq=0x01020304))
    assert client.expect_packet(2) == Ping(seq=0x01020304).encode()[::-1]
