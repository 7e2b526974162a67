"""(a) Dispatch per packet: a burst of packets from a local socket into one
Python call per packet, on the thread that runs the callbacks.

Each round is self-contained: its untimed setup sends a burst of BURST packets
of SIZE bytes (12 bytes on the wire each) from a client socket and waits until
they are all on the server's side; the timed part delivers all of them:

- servercore: `server.poll()` until `on_recv_packet` has run BURST times (the
  setup waited until the I/O thread had read and framed the burst: stats()
  `packets_in`), so the time is what the callback thread pays per packet;
- asyncio / uvloop: the loop runs until a Protocol that frames in
  data_received (as benches/servers/asyncio_server.py) has called its
  `on_packet` BURST times; the setup waited until the burst was in the
  server socket's receive queue (FIONREAD), so the time includes the loop's
  epoll and recv, which an asyncio server pays on its one thread;
- python-framing-only: the same Protocol's data_received called directly on
  the burst's bytes, no socket: the framing and calls alone.

extra_info records ns per packet (median and min over rounds).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from bench_support import DEADLINE, FramedProtocol, Hub, encode_py, new_loop, record_per_unit, unread_bytes, wait_until

from servercore import PacketSession, Server

BURST = 1000
SIZE = 8
ROUNDS = 200
WARMUP = 10
GROUP = f"dispatch: {BURST} packets of {SIZE} B (per round)"
PAYLOAD = b"\x5a" * SIZE
WIRE = encode_py(1, PAYLOAD) * BURST


class CountingSession(PacketSession):
    count = 0

    def on_recv_packet(self, packet_id: int, payload: bytes) -> None:
        self.count += 1


@pytest.fixture
def servercore_burst() -> Iterator[tuple[Server, socket.socket, CountingSession]]:
    server = Server(CountingSession, "127.0.0.1", 0)
    server.start()
    client = None
    try:
        client = socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE)
        wait_until(lambda: server.poll(0.01) >= 0 and len(server) == 1, "servercore session")
        (session,) = server.sessions
        yield server, client, session
    finally:
        if client is not None:
            client.close()
        server.stop()


@pytest.mark.benchmark(group=GROUP)
def test_dispatch_servercore(benchmark: Any, servercore_burst: tuple[Server, socket.socket, CountingSession]) -> None:
    server, client, session = servercore_burst
    sent = [0]

    def setup() -> None:
        client.sendall(WIRE)
        sent[0] += BURST
        wait_until(lambda: server.stats()["packets_in"] >= sent[0], "servercore reading the burst")

    def deliver() -> None:
        target = sent[0]
        while session.count < target:
            if server.poll(DEADLINE) == 0:
                raise TimeoutError(f"{session.count} of {target} packets delivered")

    benchmark.pedantic(deliver, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP)
    assert session.count == sent[0]
    assert not any(server.stats()["disconnects"].values())
    record_per_unit(benchmark, BURST, "per_packet")


@pytest.fixture(params=["asyncio", "uvloop"])
def asyncio_burst(request: pytest.FixtureRequest) -> Iterator[tuple[asyncio.AbstractEventLoop, Hub, socket.socket]]:
    loop = new_loop(request.param)
    hub = Hub()
    client = None
    server = None
    try:
        server = loop.run_until_complete(loop.create_server(lambda: FramedProtocol(hub), "127.0.0.1", 0))
        port = server.sockets[0].getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        loop.run_until_complete(asyncio.wait_for(hub.accepted(1), DEADLINE))
        yield loop, hub, client
    finally:
        if client is not None:
            client.close()
        hub.close(loop, server)


@pytest.mark.benchmark(group=GROUP)
def test_dispatch_asyncio(benchmark: Any, asyncio_burst: tuple[asyncio.AbstractEventLoop, Hub, socket.socket]) -> None:
    loop, hub, client = asyncio_burst
    (protocol,) = hub.protocols
    fd = protocol.transport.get_extra_info("socket").fileno()
    sent = [0]
    timers: list[asyncio.TimerHandle] = []

    def setup() -> None:
        client.sendall(WIRE)
        sent[0] += BURST
        wait_until(lambda: unread_bytes(fd) >= len(WIRE), "the burst reaching the server socket")
        hub.target = sent[0]
        hub.waiter = waiter = loop.create_future()
        for timer in timers:
            timer.cancel()
        timers[:] = [loop.call_later(DEADLINE, lambda: waiter.done() or waiter.set_exception(TimeoutError()))]

    def deliver() -> None:
        loop.run_until_complete(hub.waiter)  # type: ignore[arg-type]

    benchmark.pedantic(deliver, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP)
    assert protocol.count == sent[0]
    record_per_unit(benchmark, BURST, "per_packet")


@pytest.mark.benchmark(group=GROUP)
def test_dispatch_python_framing_only(benchmark: Any) -> None:
    hub = Hub()
    protocol = FramedProtocol(hub)

    delivered = [0]

    def deliver() -> None:
        protocol.data_received(WIRE)
        delivered[0] += 1

    # Counted rather than computed: --benchmark-disable runs it once.
    benchmark.pedantic(deliver, rounds=ROUNDS, warmup_rounds=WARMUP)
    assert delivered[0] > 0 and protocol.count == BURST * delivered[0]
    record_per_unit(benchmark, BURST, "per_packet")
