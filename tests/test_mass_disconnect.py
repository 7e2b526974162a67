"""The lecture's crash as a test (docs/architecture.md "Where this comes from";
README "What you can rely on", 2 and 5).

1000 clients are connected while the server broadcasts in a tight loop; then
all of them go away at once. In the lecture this crashed the server: a failed
send called OnDisconnect, which erased from the set the broadcast was iterating.
Here the server must survive, deliver every on_disconnected exactly once, and
come back to its idle figures: no sessions, empty send queues, and every pooled
send-buffer chunk released once the test drops its SendBuffer.
"""

from __future__ import annotations

import gc
import socket
import struct
import threading
import time
from collections import Counter

from servercore import PacketSession, SendBuffer

from support import exchange, packet, poll_until, recorder

# Every test here runs on both paths: the polling thread serving the sockets,
# and the I/O threads alone (conftest.py).
BOTH_IO_PATHS = True

CLIENTS = 1000


def broadcast_while(server, hello: SendBuffer, busy, deadline_s: float = 15.0) -> int:
    """Broadcast + poll(0) in a tight loop until `busy()` is false and no session is left."""
    broadcasts = 0
    deadline = time.monotonic() + deadline_s
    while busy() or len(server) > 0:
        assert time.monotonic() < deadline, f"{len(server)} sessions left after {deadline_s}s"
        server.broadcast(hello)
        broadcasts += 1
        server.poll(0)
    return broadcasts


def assert_idle_and_alive(server, GameSession, raw_peers):
    poll_until(server, lambda: len(server) == 0, timeout=5)
    server.poll(0.05)
    connected = Counter(session.id for session in GameSession.sessions)
    disconnected = {i: len(reasons) for i, reasons in GameSession.disconnects.items()}
    assert len(connected) == CLIENTS
    assert set(disconnected) == set(connected), "some sessions never got on_disconnected"
    assert all(n == 1 for n in connected.values())
    twice = {i: n for i, n in disconnected.items() if n != 1}
    assert not twice, f"on_disconnected delivered more than once: {dict(list(twice.items())[:5])}"
    stats = server.stats()
    assert stats["sessions"] == 0
    assert sum(stats["disconnects"].values()) == CLIENTS
    assert stats["send_queue_bytes"] == 0

    # The server survived: a new connection is accepted, echoed and broadcast to.
    peer = raw_peers(server.port)
    poll_until(server, lambda: len(server) == 1)
    assert exchange(server, peer, packet(7, b"still alive?")) == (7, b"still alive?")
    assert server.broadcast(3, b"tick") == 1
    assert peer.recv_packet() == (3, b"tick")
    peer.close()
    poll_until(server, lambda: len(server) == 0)


def assert_pool_released(server):
    gc.collect()
    poll_until(
        server,
        lambda: server.stats()["pool_chunks_in_use"] == 0,
        timeout=3,
        message=lambda: f"pooled chunks still in use: {server.stats()['pool_chunks_in_use']}",
    )
    assert server.stats()["send_queue_bytes"] == 0


def test_stopping_1000_clients_mid_broadcast_does_not_crash_the_server(start_server, start_client, raw_peers):
    GameSession = recorder(echo=True)
    client_disconnects: Counter[int] = Counter()

    class DummySession(PacketSession):
        def on_disconnected(self, reason):
            client_disconnects[self.id] += 1

    server = start_server(GameSession)
    hello = SendBuffer(1, b"Hello World".ljust(1000, b"\0"))
    client = start_client(DummySession, server.port, count=CLIENTS, io_threads=1)
    poll_until([server, client], lambda: len(server) == CLIENTS and len(client) == CLIENTS, timeout=15,
               message=lambda: f"{len(server)} server / {len(client)} client sessions")

    # Warm up: the clients are receiving broadcasts.
    for _ in range(20):
        server.broadcast(hello)
        server.poll(0)
        client.poll(0)
    poll_until([server, client], lambda: client.stats()["packets_in"] >= 20 * CLIENTS, timeout=10)

    stopper = threading.Thread(target=client.stop)
    stopper.start()
    try:
        broadcasts = broadcast_while(server, hello, stopper.is_alive)
    finally:
        stopper.join(15)
    assert not stopper.is_alive()
    assert broadcasts > 0
    # The client was stopped from another thread while this one, which polls
    # it, was busy: its on_disconnected calls wait for this thread's next poll.
    assert client.running and not client_disconnects
    client.poll(0)
    assert len(client_disconnects) == CLIENTS and set(client_disconnects.values()) == {1}
    assert not client.running

    assert_idle_and_alive(server, GameSession, raw_peers)
    del hello
    assert_pool_released(server)


def test_1000_raw_sockets_reset_mid_broadcast_do_not_crash_the_server(start_server, raw_peers):
    GameSession = recorder(echo=True)
    server = start_server(GameSession)
    hello = SendBuffer(1, b"Hello World".ljust(100, b"\0"))
    sockets: list[socket.socket] = []
    try:
        for _ in range(CLIENTS):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.connect(("127.0.0.1", server.port))
            if len(sockets) % 100 == 0:
                server.poll(0)
        poll_until(server, lambda: len(server) == CLIENTS, timeout=15,
                   message=lambda: f"{len(server)} of {CLIENTS} connected")

        started_broadcasting = threading.Event()

        def reset_all():
            started_broadcasting.wait(10)
            for sock in sockets:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()

        closer = threading.Thread(target=reset_all)
        closer.start()
        try:
            for _ in range(50):
                server.broadcast(hello)
                server.poll(0)
            started_broadcasting.set()
            broadcasts = broadcast_while(server, hello, closer.is_alive)
        finally:
            started_broadcasting.set()
            closer.join(15)
        assert not closer.is_alive()
        assert broadcasts > 0
    finally:
        for sock in sockets:
            sock.close()

    assert_idle_and_alive(server, GameSession, raw_peers)
    del hello
    assert_pool_released(server)
