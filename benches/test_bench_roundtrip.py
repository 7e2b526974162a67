"""(d) One request's round trip over loopback: a blocking client socket in the
benchmark thread sends one request and reads until the whole answer is back
(and equal to the request); the server runs in the same process, driven by a
thread of its own:

- servercore: `server.run_forever()` on a thread; the answer is sent from
  Python (`on_recv_packet` → `self.send`, or a raw `Session`'s `on_recv`);
- asyncio / uvloop: `loop.run_forever()` on a thread; a Protocol framing in
  data_received and answering with transport.write (or raw: write the bytes).

Two groups: a framed 64-byte packet, and 1000 raw bytes (the README's raw
echo). Each iteration is one self-contained round trip with a 10 s socket
timeout.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from bench_support import DEADLINE, FramedEcho, LoopThread, RawEcho, encode_py

from servercore import PacketSession, Server, Session

FRAMED = encode_py(2, bytes(range(64)))
RAW = bytes(range(256)) * 3 + bytes(range(232))  # 1000 bytes
GROUP_FRAMED = f"round trip: one {len(FRAMED) - 4} B packet, framed echo"
GROUP_RAW = f"round trip: {len(RAW)} B, raw echo"


class PacketEcho(PacketSession):
    def on_recv_packet(self, packet_id: int, payload: bytes) -> None:
        self.send(packet_id, payload)


class BytesEcho(Session):
    def on_recv(self, data: bytes) -> int:
        self.send(data)
        return len(data)


def servercore_in_thread(session_class: type[Any]) -> Iterator[int]:
    server = Server(session_class, "127.0.0.1", 0)
    server.start()
    thread = threading.Thread(target=server.run_forever, name="servercore-run-forever", daemon=True)
    thread.start()
    try:
        yield server.port
    finally:
        server.stop()
        thread.join(DEADLINE)
        assert not thread.is_alive(), "run_forever did not return after stop()"


def asyncio_in_thread(kind: str, protocol: Callable[..., Any]) -> Iterator[int]:
    server = LoopThread(kind, protocol)
    try:
        yield server.port
    finally:
        server.close()


@pytest.fixture
def client_for() -> Iterator[Callable[[int], socket.socket]]:
    clients: list[socket.socket] = []

    def connect(port: int) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        clients.append(sock)
        return sock

    yield connect
    for sock in clients:
        sock.close()


def round_trip(sock: socket.socket, request: bytes) -> Callable[[], None]:
    n = len(request)
    buf = bytearray(n)
    view = memoryview(buf)

    def once() -> None:
        sock.sendall(request)
        got = 0
        while got < n:
            k = sock.recv_into(view[got:])
            if k == 0:
                raise ConnectionError("the server closed the connection")
            got += k
        if buf != request:
            raise AssertionError("the answer differs from the request")

    return once


@pytest.fixture
def servercore_packet_port() -> Iterator[int]:
    yield from servercore_in_thread(PacketEcho)


@pytest.fixture
def servercore_raw_port() -> Iterator[int]:
    yield from servercore_in_thread(BytesEcho)


@pytest.fixture(params=["asyncio", "uvloop"])
def asyncio_packet_port(request: pytest.FixtureRequest) -> Iterator[int]:
    yield from asyncio_in_thread(request.param, FramedEcho)


@pytest.fixture(params=["asyncio", "uvloop"])
def asyncio_raw_port(request: pytest.FixtureRequest) -> Iterator[int]:
    yield from asyncio_in_thread(request.param, RawEcho)


@pytest.mark.benchmark(group=GROUP_FRAMED)
def test_round_trip_packet_servercore(benchmark: Any, servercore_packet_port: int, client_for: Any) -> None:
    benchmark(round_trip(client_for(servercore_packet_port), FRAMED))


@pytest.mark.benchmark(group=GROUP_FRAMED)
def test_round_trip_packet_asyncio(benchmark: Any, asyncio_packet_port: int, client_for: Any) -> None:
    benchmark(round_trip(client_for(asyncio_packet_port), FRAMED))


@pytest.mark.benchmark(group=GROUP_RAW)
def test_round_trip_raw_servercore(benchmark: Any, servercore_raw_port: int, client_for: Any) -> None:
    benchmark(round_trip(client_for(servercore_raw_port), RAW))


@pytest.mark.benchmark(group=GROUP_RAW)
def test_round_trip_raw_asyncio(benchmark: Any, asyncio_raw_port: int, client_for: Any) -> None:
    benchmark(round_trip(client_for(asyncio_raw_port), RAW))
