"""Closing one session (README, "What you can rely on", 6 and 7).

disconnect() flushes what was queued before it, then closes; it is
idempotent, send() after it returns False, packets that arrive after it never
reach Python, and on_disconnected(CLOSED_LOCALLY) follows exactly once. A
linger that expires with bytes unsent is logged (peer, bytes dropped) and
counted in stats()["unsent_bytes_dropped"].

A peer's FIN (TCP half-close) ends what the peer sends, not what it receives:
its last packets are delivered, what the application answers still reaches
it, then the server closes (CLOSED_BY_PEER).
"""

from __future__ import annotations

import logging
import socket
import threading
import time

from servercore import DisconnectReason, PacketSession

from support import SEQ, RawPeer, connect, local_port, packet, poll_for, poll_until, recorder, session_of

# Every test here runs on both paths: the polling thread serving the sockets,
# and the I/O threads alone (conftest.py).
BOTH_IO_PATHS = True


def test_disconnect_flushes_a_goodbye_then_closes_and_reports_once(start_server, raw_peers):
    disconnects: list = []
    received: list = []
    returned: list = []

    class Session(PacketSession):
        def on_recv_packet(self, packet_id, payload):
            received.append((packet_id, payload))
            if packet_id == 1:
                self.send(2, b"goodbye")
                returned.append(self.disconnect())
                returned.append(self.disconnect())

        def on_disconnected(self, reason):
            disconnects.append(reason)

    server = start_server(Session)
    peer = raw_peers(server.port)
    peer.send(packet(1, b"bye?"))
    poll_until(server, lambda: returned)
    assert returned == [True, False]
    assert peer.recv_packet() == (2, b"goodbye")
    # The peer keeps talking after the server decided to close.
    try:
        peer.send(packet(3, b"late") * 3)
    except OSError:
        pass
    assert peer.wait_closed(2), "no EOF after the goodbye"
    poll_until(server, lambda: disconnects)
    poll_for(server, 0.3)
    assert disconnects == [DisconnectReason.CLOSED_LOCALLY]
    assert received == [(1, b"bye?")], "packets after disconnect() reached on_recv_packet"
    assert len(server) == 0


def test_session_disconnect_called_twice_from_outside_a_callback(start_server, raw_peers):
    Recorder = recorder()
    server = start_server(Recorder)
    peer = raw_peers(server.port)
    poll_until(server, lambda: len(server) == 1)
    (session,) = server.sessions
    assert session.connected is True
    assert session.send(5, b"last words")
    assert session.disconnect() is True
    assert session.connected is False
    assert session.disconnect() is False
    assert session.send(5, b"too late") is False
    assert peer.recv_packet() == (5, b"last words")
    assert peer.wait_closed(2)
    poll_until(server, lambda: Recorder.ended)
    poll_for(server, 0.2)
    assert session.disconnect() is False
    poll_for(server, 0.1)
    assert Recorder.ended == [DisconnectReason.CLOSED_LOCALLY]


# --- the peer half-closes: TCP's FIN ends its sending, not ours -------------------------


def read_while_polling(server, peer: RawPeer, ended: list, timeout: float) -> dict:
    """Reads every packet the peer gets until the server closes (in a thread)
    while the server polls, until that and the session's on_disconnected are
    done. Returns {"packets": [...], "end": "EOF", "reset" or "timeout"}."""
    result: dict = {}

    def read() -> None:
        result["packets"], result["end"] = peer.recv_until_closed()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        poll_until(server, lambda: not reader.is_alive() and ended, timeout=timeout,
                   message=lambda: f"reader done: {not reader.is_alive()}, on_disconnected {ended}")
    finally:
        reader.join(5)
    return result


def test_a_peer_that_half_closes_after_its_request_gets_the_answer_then_eof(start_server, raw_peers):
    class Game(recorder()):
        returned: list[bool] = []

        def on_recv_packet(self, packet_id, payload):
            super().on_recv_packet(packet_id, payload)
            Game.returned.append(self.send(2, b"answer to " + payload))

    server = start_server(Game)
    peer = raw_peers(server.port)
    peer.send(packet(1, b"request"))
    peer.sock.shutdown(socket.SHUT_WR)  # "that is all I will send"
    result = read_while_polling(server, peer, Game.ended, timeout=5)
    assert list(Game.received.values()) == [[(1, b"request")]]
    assert Game.returned == [True], (
        f"send() in the on_recv_packet of the last packet before the FIN returned {Game.returned}; "
        f"the peer read {result}; on_disconnected: {Game.ended}"
    )
    assert result == {"packets": [(2, b"answer to request")], "end": "EOF"}
    assert Game.ended == [DisconnectReason.CLOSED_BY_PEER]


def test_a_peer_that_half_closes_gets_all_of_a_9_mb_answer_in_order_then_eof(start_server, raw_peers):
    class Download(recorder()):
        returned: list[bool] = []

        def on_recv_packet(self, packet_id, payload):
            super().on_recv_packet(packet_id, payload)
            Download.returned = [self.send(2, SEQ.pack(i) + bytes([i % 256]) * 2996) for i in range(3000)]

    server = start_server(Download, max_send_queue_bytes=16 << 20)
    peer = raw_peers(server.port, timeout=20)
    peer.send(packet(1, b"everything, please"))
    peer.sock.shutdown(socket.SHUT_WR)
    result = read_while_polling(server, peer, Download.ended, timeout=30)
    assert Download.returned == [True] * 3000, (
        f"{Download.returned.count(True)} of 3000 sends accepted; the peer read {len(result['packets'])} packets, "
        f"then {result['end']}; on_disconnected: {Download.ended}"
    )
    packets = result["packets"]
    numbers = [SEQ.unpack_from(payload)[0] for _, payload in packets]
    assert numbers == list(range(3000)), f"{len(packets)} of 3000 packets arrived, then {result['end']}"
    assert all(payload == SEQ.pack(i) + bytes([i % 256]) * 2996 for i, (_, payload) in enumerate(packets))
    assert result["end"] == "EOF"
    assert Download.ended == [DisconnectReason.CLOSED_BY_PEER]


# --- a linger that expires -------------------------------------------------------------


def test_a_linger_that_expires_with_bytes_unsent_is_logged_and_counted(start_server, raw_peers, caplog):
    caplog.set_level(logging.DEBUG, logger="servercore")
    Recorder = recorder()
    server = start_server(Recorder, linger=0.2, max_send_queue_bytes=16 << 20)
    (peer,) = connect(server, raw_peers, rcvbuf=4096)  # never reads
    session = session_of(server, peer)
    sent = 0
    # About 2 MB, and more until the kernel's buffers (megabytes on loopback) are
    # full and the session's own queue holds bytes.
    while sent < 500 or session.send_queue_bytes == 0:
        assert sent < 4000, "the kernel took 16 MB from a peer that does not read"
        for _ in range(100):
            assert session.send(1, SEQ.pack(sent) + b"x" * 3996)
            sent += 1
        time.sleep(0.02)
    assert session.disconnect() is True
    poll_until(server, lambda: Recorder.ended, timeout=5, message="no on_disconnected")
    assert Recorder.ended == [DisconnectReason.CLOSED_LOCALLY]

    address = f"127.0.0.1:{local_port(peer)}"
    naming = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "servercore" and address in r.getMessage()]
    warnings = [message for level, message in naming if level == "WARNING"]
    assert len(warnings) == 1, f"records naming {address}: {naming}"
    stats = server.stats()
    assert "unsent_bytes_dropped" in stats, f"stats() has no unsent_bytes_dropped: {sorted(stats)}"
    dropped = stats["unsent_bytes_dropped"]
    assert 0 < dropped <= sent * 4004
    assert str(dropped) in warnings[0], warnings[0]
