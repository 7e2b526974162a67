"""What happens in and around the application's callbacks (README, "What you
can rely on", 8).

- An exception in a callback is logged to the `servercore` logger with its
  traceback and costs only its session (CALLBACK_ERROR); an exception in
  on_disconnected costs nothing more. KeyboardInterrupt is not swallowed: it
  comes out of poll().
- What game code naturally does in on_disconnected (send, disconnect,
  broadcast to the others) is harmless.
- Callbacks are looked up like Python attributes: one assigned on the
  instance, or patched on the class after the server was created, is the one
  that runs.
"""

from __future__ import annotations

import logging
from unittest import mock

import pytest

from servercore import DisconnectReason, PacketSession

from support import exchange, local_port, packet, poll_until

# Every test here runs on both paths: the polling thread serving the sockets,
# and the I/O threads alone (conftest.py).
BOTH_IO_PATHS = True


# --- exceptions in callbacks -----------------------------------------------------


@pytest.mark.parametrize("callback", ["on_connected", "on_recv_packet"])
def test_an_exception_in_a_callback_is_logged_and_costs_only_its_session(callback, start_server, raw_peers, caplog):
    bad_ports: set[int] = set()
    disconnects: dict[int, list] = {}
    ids: dict[int, int] = {}

    class Boom(Exception):
        pass

    class Session(PacketSession):
        def on_connected(self):
            ids[self.peer[1]] = self.id
            if callback == "on_connected" and self.peer[1] in bad_ports:
                raise Boom("on_connected failed on purpose")

        def on_recv_packet(self, packet_id, payload):
            if callback == "on_recv_packet" and self.peer[1] in bad_ports:
                raise Boom("on_recv_packet failed on purpose")
            self.send(packet_id, payload)

        def on_disconnected(self, reason):
            disconnects.setdefault(self.id, []).append(reason)

    caplog.set_level(logging.WARNING, logger="servercore")
    server = start_server(Session)
    good = raw_peers(server.port)
    bad = raw_peers(server.port)
    bad_ports.add(local_port(bad))
    poll_until(server, lambda: len(ids) == 2)
    bad.send(packet(1, b"trigger"))
    poll_until(server, lambda: ids[local_port(bad)] in disconnects)
    bad_id = ids[local_port(bad)]
    good_id = ids[local_port(good)]

    assert disconnects[bad_id] == [DisconnectReason.CALLBACK_ERROR]
    assert bad.wait_closed(2)
    errors = [r for r in caplog.records if r.name == "servercore" and r.exc_info]
    assert len(errors) == 1, [r.getMessage() for r in caplog.records]
    record = errors[0]
    assert record.levelno >= logging.ERROR
    assert record.exc_info[0] is Boom
    message = record.getMessage()
    assert callback in message and str(bad_id) in message, message

    for n in range(5):
        assert exchange(server, good, packet(4, bytes([n]))) == (4, bytes([n]))
    assert good_id not in disconnects
    assert len(server) == 1


def test_an_exception_in_on_disconnected_is_logged_and_nothing_else_breaks(start_server, raw_peers, caplog):
    disconnects: list[int] = []

    class Session(PacketSession):
        def on_recv_packet(self, packet_id, payload):
            self.send(packet_id, payload)

        def on_disconnected(self, reason):
            disconnects.append(self.id)
            raise ValueError("on_disconnected failed on purpose")

    caplog.set_level(logging.WARNING, logger="servercore")
    server = start_server(Session)
    first = raw_peers(server.port)
    second = raw_peers(server.port)
    poll_until(server, lambda: len(server) == 2)
    first.close()
    poll_until(server, lambda: len(disconnects) == 1)
    errors = [r for r in caplog.records if r.name == "servercore" and r.exc_info]
    assert len(errors) == 1
    assert errors[0].exc_info[0] is ValueError
    assert "on_disconnected" in errors[0].getMessage()
    assert str(disconnects[0]) in errors[0].getMessage()
    assert len(server) == 1

    assert exchange(server, second, packet(6, b"still here")) == (6, b"still here")
    second.close()
    poll_until(server, lambda: len(disconnects) == 2)
    assert len(set(disconnects)) == 2
    assert len(server) == 0


def test_keyboard_interrupt_in_a_callback_propagates_out_of_poll(start_server, raw_peers):
    class Session(PacketSession):
        def on_recv_packet(self, packet_id, payload):
            raise KeyboardInterrupt

    server = start_server(Session)
    peer = raw_peers(server.port)
    peer.send(packet(1))
    with pytest.raises(KeyboardInterrupt):
        poll_until(server, lambda: False, timeout=5, message="KeyboardInterrupt never came out of poll()")


# --- what callbacks may do -------------------------------------------------------


def test_sending_disconnecting_and_broadcasting_from_on_disconnected_is_harmless(start_server, start_client):
    """The game code's natural reaction to a leaving player (tell the others,
    say goodbye to the one leaving) must not raise, re-enter, or lose anyone."""
    outcomes = []

    class Game(PacketSession):
        def on_disconnected(self, reason):
            outcomes.append((self.send(1, b"bye"), self.disconnect(), server.broadcast(2, b"left", exclude=self)))

    heard = []

    class Player(PacketSession):
        def on_recv_packet(self, packet_id, payload):
            heard.append((self.id, packet_id, payload))

    server = start_server(Game)
    client = start_client(Player, server.port, count=3)
    poll_until([server, client], lambda: len(server) == 3)
    leaving = server.sessions[0]
    leaving.disconnect()
    poll_until([server, client], lambda: outcomes and len(heard) == 2)
    assert outcomes == [(False, False, 2)]
    assert sorted(packet_id for _, packet_id, _ in heard) == [2, 2]
    assert len(server) == 2


# --- callbacks are looked up like attributes -------------------------------------------


def test_a_callback_assigned_on_the_instance_is_honoured_for_that_sessions_next_packets(start_server, raw_peers):
    heard: list[tuple[str, int, bytes]] = []

    class Game(PacketSession):
        def on_connected(self):
            self.on_recv_packet = self.in_lobby  # a state machine by rebinding the handler

        def on_recv_packet(self, packet_id, payload):
            heard.append(("class", packet_id, payload))

        def in_lobby(self, packet_id, payload):
            heard.append(("lobby", packet_id, payload))
            self.send(packet_id, payload)

    server = start_server(Game)
    peer = raw_peers(server.port)
    poll_until(server, lambda: len(server) == 1)
    peer.send(packet(1, b"join") + packet(2, b"ready"))
    poll_until(server, lambda: len(heard) == 2)
    assert heard == [("lobby", 1, b"join"), ("lobby", 2, b"ready")], heard
    assert [peer.recv_packet(), peer.recv_packet()] == [(1, b"join"), (2, b"ready")]


def test_a_callback_patched_on_the_class_after_the_server_was_created_is_honoured(start_server, raw_peers):
    heard: list[tuple[str, int, bytes]] = []

    class GameSession(PacketSession):
        def on_recv_packet(self, packet_id, payload):
            heard.append(("original", packet_id, payload))

    def patched(self, packet_id, payload):
        heard.append(("patched", packet_id, payload))

    server = start_server(GameSession)
    with mock.patch.object(GameSession, "on_recv_packet", patched):
        peer = raw_peers(server.port)
        peer.send(packet(3, b"x"))
        poll_until(server, lambda: heard)
    assert heard == [("patched", 3, b"x")]
    peer.send(packet(4, b"y"))  # and unpatched again
    poll_until(server, lambda: len(heard) == 2)
    assert heard == [("patched", 3, b"x"), ("original", 4, b"y")]
