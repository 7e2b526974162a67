"""(c) What one broadcast of a 64-byte payload to PEERS connected sessions
costs the thread that makes it (extra_info: ns per recipient).

The recipients are plain client sockets of this process, emptied by a drainer
thread in each round's untimed setup (bench_support.Drainer), so every round
starts with empty queues and the drainer never competes with the timed call.

- servercore: `server.broadcast(1, payload)`: encodes once and queues the
  packet on every session; the I/O thread writes it afterwards, off this
  thread (as benches/broadcast_cost.py measures).
- servercore room: `room.broadcast(1, payload)` on a `Room` holding every
  session: the same fan-out, over the room's members instead of the
  server's sessions (the toolkit's claim: a room costs what a server-wide
  broadcast costs per recipient).
- asyncio / uvloop: `transport.write(packet)` for every transport, the packet
  encoded once, run on the loop (`run_until_complete` of the broadcast
  coroutine, so uvloop's deferred writes are included): this thread makes
  the send() calls itself.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from bench_support import (
    DEADLINE,
    Drainer,
    FramedProtocol,
    Hub,
    connect_clients,
    encode_py,
    new_loop,
    record_per_unit,
    wait_until,
)

from servercore import PacketSession, Room, Server

PEERS = 1000
SIZE = 64
WIRE_SIZE = SIZE + 4
PAYLOAD = bytes(range(SIZE))
GROUP = f"broadcast: {SIZE} B to {PEERS} peers (per call)"


class Quiet(PacketSession):
    pass


@pytest.fixture
def servercore_peers() -> Iterator[tuple[Server, Drainer]]:
    server = Server(Quiet, "127.0.0.1", 0, backlog=PEERS + 100, first_packet_timeout=None)
    server.start()
    sockets: list[socket.socket] = []
    drainer = None
    try:
        sockets = connect_clients(server.port, PEERS)
        wait_until(lambda: server.poll(0.01) >= 0 and len(server) == PEERS, f"{PEERS} servercore sessions")
        drainer = Drainer(sockets)
        yield server, drainer
    finally:
        if drainer is not None:
            drainer.close()
        for sock in sockets:
            sock.close()
        server.stop()


def time_servercore_broadcasts(benchmark: Any, server: Server, drainer: Drainer, broadcast: Callable[[], int]) -> None:
    """Times `broadcast()` (which returns how many sessions it queued on),
    draining the peers between rounds; every packet must have gone out."""
    owed = [0]

    def setup() -> None:
        drainer.drain(owed[0])
        owed[0] = 0

    def timed() -> None:
        owed[0] = broadcast() * WIRE_SIZE

    benchmark.pedantic(timed, setup=setup, rounds=300, warmup_rounds=10)
    setup()
    stats = server.stats()
    assert not any(stats["disconnects"].values()), stats["disconnects"]
    assert stats["send_queue_bytes"] == 0
    record_per_unit(benchmark, PEERS, "per_recipient")


@pytest.mark.benchmark(group=GROUP)
def test_broadcast_servercore(benchmark: Any, servercore_peers: tuple[Server, Drainer]) -> None:
    server, drainer = servercore_peers
    time_servercore_broadcasts(benchmark, server, drainer, lambda: server.broadcast(1, PAYLOAD))


@pytest.mark.benchmark(group=GROUP)
def test_broadcast_servercore_room(benchmark: Any, servercore_peers: tuple[Server, Drainer]) -> None:
    server, drainer = servercore_peers
    room = Room()
    for session in server.sessions:
        room.add(session)
    assert len(room) == PEERS
    time_servercore_broadcasts(benchmark, server, drainer, lambda: room.broadcast(1, PAYLOAD))


@pytest.fixture(params=["asyncio", "uvloop"])
def asyncio_peers(request: pytest.FixtureRequest) -> Iterator[tuple[asyncio.AbstractEventLoop, Hub, Drainer]]:
    loop = new_loop(request.param)
    hub = Hub()
    server = None
    sockets: list[socket.socket] = []
    drainer = None
    try:
        server = loop.run_until_complete(
            loop.create_server(lambda: FramedProtocol(hub), "127.0.0.1", 0, backlog=PEERS + 100)
        )
        port = server.sockets[0].getsockname()[1]
        # The kernel completes the handshakes into the backlog; the loop accepts them below.
        sockets = connect_clients(port, PEERS)
        loop.run_until_complete(asyncio.wait_for(hub.accepted(PEERS), DEADLINE))
        drainer = Drainer(sockets)
        yield loop, hub, drainer
    finally:
        if drainer is not None:
            drainer.close()
        for sock in sockets:
            sock.close()
        hub.close(loop, server)


@pytest.mark.benchmark(group=GROUP)
def test_broadcast_asyncio(benchmark: Any, asyncio_peers: tuple[asyncio.AbstractEventLoop, Hub, Drainer]) -> None:
    loop, hub, drainer = asyncio_peers
    transports = [p.transport for p in hub.protocols]
    owed = [0]

    async def send_to_all() -> int:
        packet = encode_py(1, PAYLOAD)
        for transport in transports:
            transport.write(packet)
        return len(transports)

    def setup() -> None:
        # Nothing may be left in a transport's buffer (it would need the loop).
        assert all(t.get_write_buffer_size() == 0 for t in transports)
        drainer.drain(owed[0])
        owed[0] = 0

    def broadcast() -> None:
        owed[0] = loop.run_until_complete(send_to_all()) * WIRE_SIZE

    benchmark.pedantic(broadcast, setup=setup, rounds=100, warmup_rounds=5)
    setup()
    assert len(hub.protocols) == PEERS
    record_per_unit(benchmark, PEERS, "per_recipient")
