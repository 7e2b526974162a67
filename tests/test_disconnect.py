"""Closing one session (README, "What you can rely on", 6).

disconnect() flushes what was queued before it, then closes; it is
idempotent, send() after it returns False, packets that arrive after it never
reach Python, and on_disconnected(CLOSED_LOCALLY) follows exactly once.
"""

from __future__ import annotations

from servercore import DisconnectReason, PacketSession

from support import packet, poll_for, poll_until, recorder


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
