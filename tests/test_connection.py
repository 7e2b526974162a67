"""`await servercore.connect(host, port)`: one awaitable connection for bots
and tests (python/servercore/_connection.py).

- recv() gives packets in the order received, TimeoutError when none comes in
  time, and Disconnected with the reason once the connection has ended and
  every earlier packet was read.
- It is a Client session: the engine's framing checks apply to what the
  server sends.
- close() ends it (CLOSED_LOCALLY; the server sees CLOSED_BY_PEER); a
  connection the server ended lets go of its engine by itself.
- A connection that is not read holds a bounded inbox; the rest waits in the
  engine and then in TCP, and nothing is lost.
"""

from __future__ import annotations

import asyncio
import time

import pytest

import servercore
from aio_support import Run, until
from servercore import Connection, DisconnectReason, Disconnected, PacketSession, Server
from support import SEQ, free_port


class Echo(PacketSession):
    ended: list[DisconnectReason] = []

    def on_recv_packet(self, packet_id: int, payload: bytes) -> None:
        if packet_id == 99:  # "say goodbye": two packets, then close
            self.send(1, b"last words")
            self.send(2, b"really last")
            self.disconnect()
        elif packet_id == 97:  # "send me a big one"
            self.send(5, bytes(100))
        elif packet_id == 98:  # "flood": the payload says how many
            (count,) = SEQ.unpack(payload)
            for n in range(count):
                self.send(3, SEQ.pack(n))
        else:
            self.send(packet_id, payload)

    def on_disconnected(self, reason: DisconnectReason) -> None:
        type(self).ended.append(reason)


def echo_class() -> type[Echo]:
    return type("Echo", (Echo,), {"ended": []})


def test_a_connection_sends_receives_and_closes(run: Run) -> None:
    session_class = echo_class()

    async def main() -> None:
        async with Server(session_class, "127.0.0.1", 0) as server:
            conn = await servercore.connect("127.0.0.1", server.port)
            assert isinstance(conn, Connection)
            assert conn.connected and conn.reason is None
            assert conn.peer == ("127.0.0.1", server.port)
            for n in range(10):
                assert conn.send(7, SEQ.pack(n))
            assert [await conn.recv(timeout=5) for _ in range(10)] == [(7, SEQ.pack(n)) for n in range(10)]
            await conn.close()
            assert conn.reason is DisconnectReason.CLOSED_LOCALLY
            assert not conn.connected
            assert not conn.send(7, b"after close")
            await conn.close()  # idempotent
            await until(lambda: session_class.ended == [DisconnectReason.CLOSED_BY_PEER])

    run(main)


def test_recv_times_out_with_timeout_error(run: Run) -> None:
    async def main() -> None:
        async with Server(echo_class(), "127.0.0.1", 0) as server:
            async with await servercore.connect("127.0.0.1", server.port) as conn:
                started = time.monotonic()
                with pytest.raises(TimeoutError):
                    await conn.recv(timeout=0.1)
                assert 0.09 < time.monotonic() - started < 2
                conn.send(4, b"still works")
                assert await conn.recv(timeout=5) == (4, b"still works")

    run(main)


def test_what_came_before_the_end_is_read_then_disconnected_says_why(run: Run) -> None:
    async def main() -> None:
        async with Server(echo_class(), "127.0.0.1", 0) as server:
            conn = await servercore.connect("127.0.0.1", server.port)
            conn.send(99, b"")
            await until(lambda: conn.reason is not None)
            assert conn.reason is DisconnectReason.CLOSED_BY_PEER
            assert [packet async for packet in conn] == [(1, b"last words"), (2, b"really last")]
            with pytest.raises(Disconnected) as ended:
                await conn.recv(timeout=5)
            assert ended.value.reason is DisconnectReason.CLOSED_BY_PEER
            assert isinstance(ended.value, ConnectionError)
            # Not closed by us: the connection let go of its engine by itself
            # (the runner fails the test on a ResourceWarning).
            await until(lambda: not conn._client.running)

    run(main)


def test_the_engines_framing_checks_apply_to_what_the_server_sends(run: Run) -> None:
    async def main() -> None:
        async with Server(echo_class(), "127.0.0.1", 0) as server:
            async with await servercore.connect("127.0.0.1", server.port, max_packet_size=64) as conn:
                conn.send(5, bytes(32))
                assert await conn.recv(timeout=5) == (5, bytes(32))
                with pytest.raises(ValueError, match="over max_packet_size 64"):
                    conn.send(5, bytes(100))  # the client's own sends are checked too
                conn.send(97, b"")  # the server answers with a 104-byte packet
                with pytest.raises(Disconnected) as ended:
                    await conn.recv(timeout=5)
                assert ended.value.reason is DisconnectReason.PACKET_TOO_LARGE

    run(main)


def test_expect_packet_names_what_came_instead(run: Run) -> None:
    async def main() -> None:
        async with Server(echo_class(), "127.0.0.1", 0) as server:
            async with await servercore.connect("127.0.0.1", server.port) as conn:
                conn.send(4, b"hi")
                assert await conn.expect_packet(4) == b"hi"
                conn.send(5, b"other")
                with pytest.raises(AssertionError, match=r"expected packet 4; got packet 5 \(5 byte payload\)"):
                    await conn.expect_packet(4)
                with pytest.raises(AssertionError, match="nothing arrived within 0.05 s"):
                    await conn.expect_packet(4, timeout=0.05)
                conn.send(99, b"")
                await conn.expect_packet(1)
                await conn.expect_packet(2)
                with pytest.raises(AssertionError, match="the connection ended: CLOSED_BY_PEER"):
                    await conn.expect_packet(4)

    run(main)


def test_connecting_where_nothing_listens_raises_connection_error(run: Run) -> None:
    async def main() -> None:
        with pytest.raises(ConnectionError):
            await servercore.connect("127.0.0.1", free_port(), connect_timeout=2)
        with pytest.raises(ValueError, match="max_inbox_packets must be at least 1"):
            await servercore.connect("127.0.0.1", free_port(), max_inbox_packets=0)

    run(main)


def test_an_unread_connection_holds_a_bounded_inbox_and_loses_nothing(run: Run) -> None:
    count = 20000

    async def main() -> None:
        async with Server(echo_class(), "127.0.0.1", 0) as server:
            async with await servercore.connect(
                "127.0.0.1", server.port, max_inbox_packets=16, max_pending_recv_bytes=4096
            ) as conn:
                conn.send(98, SEQ.pack(count))
                await asyncio.sleep(0.3)
                assert len(conn._inbox) == 16
                received = [await conn.recv(timeout=5) for _ in range(count)]
                assert received == [(3, SEQ.pack(n)) for n in range(count)]

    run(main)
