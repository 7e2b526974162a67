"""The order of callbacks (README, "What you can rely on", 1).

Per session: on_connected first, then its packets in arrival order, then
on_disconnected last and exactly once. Nothing follows on_disconnected.

What on_connected sends reaches the peer before anything broadcast to it.
"""

from __future__ import annotations

import threading
import time

from servercore import DisconnectReason, PacketSession

from support import SEQ, poll_for, poll_until

# Every test here runs on both paths: the polling thread serving the sockets,
# and the I/O threads alone (conftest.py).
BOTH_IO_PATHS = True


def test_each_session_sees_connected_then_packets_in_order_then_disconnected_once(start_server, start_client):
    calls: dict[int, list] = {}

    class Recorder(PacketSession):
        def on_connected(self):
            calls.setdefault(self.id, []).append("connected")

        def on_recv_packet(self, packet_id, payload):
            calls.setdefault(self.id, []).append(("packet", packet_id, SEQ.unpack(payload)[0]))

        def on_disconnected(self, reason):
            calls.setdefault(self.id, []).append(("disconnected", reason))

    client_ends: dict[int, list] = {}

    class Sender(PacketSession):
        def on_connected(self):
            for n in range(50):
                assert self.send(1, SEQ.pack(n))
            self.disconnect()

        def on_disconnected(self, reason):
            client_ends.setdefault(self.id, []).append(reason)

    server = start_server(Recorder)
    client = start_client(Sender, server.port, count=20)
    poll_until(
        [server, client],
        lambda: len(calls) == 20 and all(c[-1][0] == "disconnected" for c in calls.values()),
        timeout=10,
        message=lambda: f"server saw {len(calls)} sessions with {[len(c) for c in calls.values()]} calls",
    )
    poll_for([server, client], 0.2)  # nothing may follow on_disconnected

    expected_packets = [("packet", 1, n) for n in range(50)]
    for session_id, sequence in calls.items():
        assert sequence[0] == "connected", f"session {session_id}: {sequence[:3]}"
        assert sequence[1:-1] == expected_packets, f"session {session_id} packets out of order or missing"
        assert sequence[-1] == ("disconnected", DisconnectReason.CLOSED_BY_PEER)
        assert sum(1 for c in sequence if isinstance(c, tuple) and c[0] == "disconnected") == 1
    assert len(client_ends) == 20
    assert all(reasons == [DisconnectReason.CLOSED_LOCALLY] for reasons in client_ends.values())
    assert len(server) == 0 and len(client) == 0


# --- what on_connected sends comes first ---------------------------------------------


def test_what_on_connected_sends_reaches_the_peer_before_any_broadcast(start_server, raw_peers):
    WELCOME, TICK = 1, 2

    class Game(PacketSession):
        welcomed = 0

        def on_connected(self):
            time.sleep(0.02)  # game code that takes a moment (the GIL is free meanwhile)
            self.send(WELCOME, b"hi")
            Game.welcomed += 1

    server = start_server(Game)
    stop = threading.Event()
    broadcasts = 0

    def tick_all_the_time() -> None:
        nonlocal broadcasts
        while not stop.is_set():
            server.broadcast(TICK, b"t")
            broadcasts += 1

    ticker = threading.Thread(target=tick_all_the_time, daemon=True)
    ticker.start()
    first_packets = []
    try:
        for n in range(10):
            peer = raw_peers(server.port)
            poll_until(server, lambda: Game.welcomed == n + 1, message=f"peer {n} not connected")
            first_packets.append(peer.recv_packet())
    finally:
        stop.set()
        ticker.join(5)
    assert broadcasts > 0
    firsts = [packet_id for packet_id, _ in first_packets]
    assert firsts == [WELCOME] * 10, f"first packets: {firsts} ({WELCOME} is WELCOME, {TICK} a broadcast)"
