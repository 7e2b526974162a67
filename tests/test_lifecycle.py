"""Session and service lifecycle: the callback guarantees of design.md section 4.

- Per session: on_connected first, packets in arrival order, on_disconnected
  last and exactly once (guarantee 1).
- Callbacks run only inside poll()/run_forever(), on the calling thread;
  send/broadcast/disconnect never call back into Python; poll() releases the
  GIL while it waits (guarantees 2 and 4).
- disconnect() flushes what was queued before it (guarantee 6).
- An exception in a callback costs only its session (guarantee 7).
- stop(), `with`, start(), run_forever(), sessions, Client, max_sessions.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import threading
import time

import pytest

from servercore import Client, DisconnectReason, PacketSession, Server

from support import packet, poll_until

SEQ = struct.Struct("<I")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def local_port(peer) -> int:
    return peer.sock.getsockname()[1]


def exchange(server, peer, data: bytes, timeout: float = 5.0):
    """Sends `data` from the raw peer and returns the next packet it receives,
    polling the server (callbacks run only in poll) while a thread reads."""
    result: list = []

    def read():
        try:
            result.append(peer.recv_packet())
        except BaseException as error:  # noqa: BLE001 - handed to the test
            result.append(error)

    reader = threading.Thread(target=read, daemon=True)
    peer.send(data)
    reader.start()
    try:
        poll_until(server, lambda: result, timeout=timeout, message="no reply")
    finally:
        reader.join(timeout)
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def poll_for(services, seconds: float) -> None:
    """Keeps polling for `seconds` (to see that nothing more arrives)."""
    if not isinstance(services, (list, tuple)):
        services = [services]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for service in services:
            service.poll(0.01)


# --- ordering -----------------------------------------------------------------


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


# --- where and when callbacks run -----------------------------------------------


def test_callbacks_run_only_inside_poll_on_the_polling_thread(start_server, raw_peers):
    calls: list[tuple[str, int, bool]] = []
    inside_poll = False

    class Recorder(PacketSession):
        def on_connected(self):
            calls.append(("connected", threading.get_ident(), inside_poll))

        def on_recv_packet(self, packet_id, payload):
            calls.append(("packet", threading.get_ident(), inside_poll))

        def on_disconnected(self, reason):
            calls.append(("disconnected", threading.get_ident(), inside_poll))

    server = start_server(Recorder)
    peer = raw_peers(server.port)
    peer.send(packet(1, b"a") + packet(1, b"b"))
    time.sleep(0.3)
    assert calls == [], "a callback ran while nobody called poll()"

    def polled(timeout):
        nonlocal inside_poll
        inside_poll = True
        try:
            return server.poll(timeout)
        finally:
            inside_poll = False

    deadline = time.monotonic() + 5
    while len(calls) < 3 and time.monotonic() < deadline:
        polled(0.01)
    peer.close()
    time.sleep(0.3)
    assert len(calls) == 3, "on_disconnected ran without poll() or packets are missing"
    while len(calls) < 4 and time.monotonic() < deadline:
        polled(0.01)

    assert [c[0] for c in calls] == ["connected", "packet", "packet", "disconnected"]
    assert {c[1] for c in calls} == {threading.get_ident()}
    assert all(c[2] for c in calls), "a callback ran outside poll()"


def test_run_forever_runs_callbacks_on_its_own_thread_and_returns_on_stop_from_another_thread(start_server, raw_peers):
    threads: list[tuple[str, int]] = []
    connected = threading.Event()

    class Recorder(PacketSession):
        def on_connected(self):
            threads.append(("connected", threading.get_ident()))
            connected.set()

        def on_recv_packet(self, packet_id, payload):
            threads.append(("packet", threading.get_ident()))
            self.send(packet_id, payload)

        def on_disconnected(self, reason):
            threads.append(("disconnected", threading.get_ident(), reason))

    server = start_server(Recorder)
    runner_ident = []
    errors = []

    def run():
        runner_ident.append(threading.get_ident())
        try:
            server.run_forever()
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    try:
        peer = raw_peers(server.port)
        assert connected.wait(5), "run_forever did not deliver on_connected"
        peer.send(packet(3, b"ping"))
        assert peer.recv_packet() == (3, b"ping")
        server.stop()
        runner.join(5)
        assert not runner.is_alive(), "run_forever did not return after stop() from another thread"
    finally:
        server.stop()
        runner.join(5)
    assert errors == []
    assert peer.wait_closed(2)
    assert [t[0] for t in threads] == ["connected", "packet", "disconnected"]
    assert threads[-1][2] == DisconnectReason.SERVER_SHUTDOWN
    assert threads[0][1] == threads[1][1] == runner_ident[0] != threading.get_ident()


def test_poll_returns_the_number_of_events_handled(start_server, raw_peers):
    calls = []

    class Recorder(PacketSession):
        def on_connected(self):
            calls.append("connected")

        def on_recv_packet(self, packet_id, payload):
            calls.append("packet")

        def on_disconnected(self, reason):
            calls.append("disconnected")

    server = start_server(Recorder)
    peer = raw_peers(server.port)
    peer.send(b"".join(packet(1, bytes([n])) for n in range(5)))
    handled = 0
    deadline = time.monotonic() + 5
    while len(calls) < 6 and time.monotonic() < deadline:
        handled += server.poll(0.05)
    assert calls == ["connected"] + ["packet"] * 5
    assert handled == 6


def test_idle_poll_waits_about_the_timeout_and_returns_zero(start_server):
    server = start_server(PacketSession)
    for timeout in (0.05, 0.3):
        started = time.monotonic()
        handled = server.poll(timeout)
        elapsed = time.monotonic() - started
        assert handled == 0
        assert elapsed >= timeout * 0.9, f"poll({timeout}) returned after {elapsed:.3f}s"
        assert elapsed < timeout + 0.25, f"poll({timeout}) took {elapsed:.3f}s"
    started = time.monotonic()
    assert server.poll(0) == 0
    assert time.monotonic() - started < 0.1


def test_poll_releases_the_gil_while_it_waits(start_server):
    server = start_server(PacketSession)
    counter = 0
    stop = False

    def spin():
        nonlocal counter
        while not stop:
            counter += 1

    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    try:
        time.sleep(0.05)
        before = counter
        time.sleep(0.3)  # the baseline: the GIL is free for the whole 0.3 s
        baseline = counter - before
        before = counter
        server.poll(0.3)
        advanced = counter - before
    finally:
        stop = True
        spinner.join(5)
    # Holding the GIL, poll would let the thread run at most one switch
    # interval (5 ms) of the 300; released, it runs about as much as in sleep().
    assert baseline > 0
    assert advanced > 0.25 * baseline, f"the counter advanced {advanced} in poll(0.3), {baseline} in sleep(0.3)"


# --- no re-entry into Python ------------------------------------------------------


def test_send_broadcast_disconnect_inside_a_callback_never_call_back_synchronously(start_server, raw_peers):
    log: list = []
    holder = {}

    class Session(PacketSession):
        def on_recv_packet(self, packet_id, payload):
            log.append("recv:start")
            self.send(1, b"direct")
            holder["server"].broadcast(2, b"all")
            returned = self.disconnect()
            log.append(("recv:end", returned, self.connected))

        def on_send(self, nbytes):
            log.append("send")

        def on_disconnected(self, reason):
            log.append(("disconnected", reason))

    server = start_server(Session)
    holder["server"] = server
    peer = raw_peers(server.port)
    peer.send(packet(9))
    poll_until(server, lambda: any(isinstance(e, tuple) and e[0] == "disconnected" for e in log), timeout=5)
    start = log.index("recv:start")
    assert log[start + 1] == ("recv:end", True, False), f"a callback ran inside send/broadcast/disconnect: {log}"
    assert log[-1] == ("disconnected", DisconnectReason.CLOSED_LOCALLY)
    assert sum(1 for e in log if isinstance(e, tuple) and e[0] == "disconnected") == 1
    assert peer.recv_packet() == (1, b"direct")
    assert peer.recv_packet() == (2, b"all")
    assert peer.wait_closed(2)


def test_send_broadcast_disconnect_from_outside_poll_run_no_callback_until_poll(start_server, raw_peers):
    log: list = []

    class Session(PacketSession):
        def on_connected(self):
            log.append("connected")

        def on_send(self, nbytes):
            log.append("send")

        def on_disconnected(self, reason):
            log.append(("disconnected", reason))

    server = start_server(Session)
    peer = raw_peers(server.port)
    poll_until(server, lambda: len(server) == 1)
    (session,) = server.sessions
    log.clear()
    assert session.send(1, b"x")
    assert server.broadcast(2, b"y") == 1
    assert session.disconnect() is True
    time.sleep(0.3)
    assert log == [], "send/broadcast/disconnect called into Python by themselves"
    assert peer.recv_packet() == (1, b"x")
    assert peer.recv_packet() == (2, b"y")
    assert peer.wait_closed(2)
    poll_until(server, lambda: ("disconnected", DisconnectReason.CLOSED_LOCALLY) in log)


# --- disconnect() -------------------------------------------------------------------


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
    disconnects: list = []

    class Session(PacketSession):
        def on_disconnected(self, reason):
            disconnects.append(reason)

    server = start_server(Session)
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
    poll_until(server, lambda: disconnects)
    poll_for(server, 0.2)
    assert session.disconnect() is False
    poll_for(server, 0.1)
    assert disconnects == [DisconnectReason.CLOSED_LOCALLY]


# --- exceptions in callbacks ----------------------------------------------------------


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


def test_calling_poll_from_inside_a_callback_raises_runtime_error(start_server, raw_peers):
    holder = {}
    raised: list[BaseException] = []
    finished = []

    class Session(PacketSession):
        def on_recv_packet(self, packet_id, payload):
            for reenter in (lambda: holder["server"].poll(0), holder["server"].run_forever):
                try:
                    reenter()
                except RuntimeError as error:
                    raised.append(error)
            finished.append(packet_id)

    server = start_server(Session)
    holder["server"] = server
    peer = raw_peers(server.port)
    peer.send(packet(1))
    poll_until(server, lambda: finished)
    assert len(raised) == 2, "poll()/run_forever() inside a callback did not raise RuntimeError"
    assert all("poll" in str(error) for error in raised), [str(e) for e in raised]
    # The outer poll still works afterwards.
    peer.send(packet(2))
    poll_until(server, lambda: finished == [1, 2])


# --- stop(), with, start() ------------------------------------------------------------


def test_stop_delivers_server_shutdown_to_every_session_once_and_closes_the_peers(start_server, raw_peers):
    disconnects: dict[int, list] = {}

    class Session(PacketSession):
        def on_disconnected(self, reason):
            disconnects.setdefault(self.id, []).append(reason)

    server = start_server(Session)
    peers = [raw_peers(server.port) for _ in range(10)]
    poll_until(server, lambda: len(server) == 10)
    ids = {s.id for s in server.sessions}
    server.stop()
    assert disconnects == {i: [DisconnectReason.SERVER_SHUTDOWN] for i in ids}
    assert len(server) == 0
    assert server.running is False
    for peer in peers:
        assert peer.wait_closed(2)
    server.stop()
    assert disconnects == {i: [DisconnectReason.SERVER_SHUTDOWN] for i in ids}
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()


def test_with_statement_starts_and_stops_the_server(raw_peers):
    disconnects = []

    class Session(PacketSession):
        def on_disconnected(self, reason):
            disconnects.append(reason)

    with Server(Session, "127.0.0.1", 0) as server:
        assert server.running
        port = server.port
        assert port > 0
        peer = raw_peers(port)
        poll_until(server, lambda: len(server) == 1)
    assert not server.running
    assert disconnects == [DisconnectReason.SERVER_SHUTDOWN]
    assert peer.wait_closed(2)


def test_start_twice_raises_runtime_error(start_server):
    server = start_server(PacketSession)
    with pytest.raises(RuntimeError):
        server.start()
    assert server.running


def test_starting_on_a_port_in_use_raises_oserror_naming_the_address(start_server):
    first = start_server(PacketSession)
    second = Server(PacketSession, "127.0.0.1", first.port)
    try:
        with pytest.raises(OSError) as caught:
            second.start()
    finally:
        second.stop()
    assert f"127.0.0.1:{first.port}" in str(caught.value)
    assert caught.value.errno == errno.EADDRINUSE


def test_run_forever_returns_after_stop_from_a_callback_with_every_session_disconnected(start_server, raw_peers):
    disconnects: dict[int, list] = {}
    holder = {}

    class Session(PacketSession):
        def on_recv_packet(self, packet_id, payload):
            if payload == b"shutdown":
                holder["server"].stop()

        def on_disconnected(self, reason):
            disconnects.setdefault(self.id, []).append(reason)

    server = start_server(Session)
    holder["server"] = server
    peers = [raw_peers(server.port) for _ in range(3)]
    poll_until(server, lambda: len(server) == 3)
    ids = {s.id for s in server.sessions}
    watchdog_fired = threading.Event()

    def watchdog():
        if not done.wait(10):
            watchdog_fired.set()
            server.stop()

    done = threading.Event()
    guard = threading.Thread(target=watchdog, daemon=True)
    guard.start()
    peers[1].send(packet(1, b"shutdown"))
    try:
        server.run_forever()
        snapshot = {k: list(v) for k, v in disconnects.items()}
    finally:
        done.set()
        guard.join(5)
    assert not watchdog_fired.is_set(), "run_forever did not return after stop() in a callback"
    assert snapshot == {i: [DisconnectReason.SERVER_SHUTDOWN] for i in ids}
    assert len(server) == 0
    for peer in peers:
        assert peer.wait_closed(2)


# --- sessions, len ---------------------------------------------------------------------


def test_sessions_is_a_snapshot_of_the_session_objects_oldest_first(start_server, raw_peers):
    created = []

    class Session(PacketSession):
        def on_connected(self):
            created.append(self)

    server = start_server(Session)
    peers = []
    for _ in range(3):
        peers.append(raw_peers(server.port))
        poll_until(server, lambda: len(created) == len(peers))
    assert len(server) == 3
    snapshot = server.sessions
    assert isinstance(snapshot, list)
    assert [s is c for s, c in zip(snapshot, created)] == [True, True, True]
    assert all(isinstance(s, Session) for s in snapshot)
    assert len({s.id for s in snapshot}) == 3
    assert [s.peer for s in snapshot] == [("127.0.0.1", local_port(p)) for p in peers]
    assert all(s.connected for s in snapshot)

    snapshot[0].disconnect()
    assert snapshot[0].connected is False
    poll_until(server, lambda: len(server) == 2)
    assert len(snapshot) == 3, "the snapshot changed under the caller"
    assert server.sessions == snapshot[1:]

    peers[1].close()
    poll_until(server, lambda: len(server) == 1)
    assert snapshot[1].connected is False
    assert server.sessions == [snapshot[2]]


# --- Client ------------------------------------------------------------------------------


def test_client_count_opens_that_many_sessions(start_server, start_client):
    connected = []

    class Session(PacketSession):
        def on_connected(self):
            connected.append(self.id)

    server = start_server(PacketSession)
    client = start_client(Session, server.port, count=7)
    assert client.count == 7
    poll_until([server, client], lambda: len(connected) == 7 and len(server) == 7)
    assert len(client) == 7
    assert len(client.sessions) == 7
    assert len(set(connected)) == 7
    assert {s.peer for s in client.sessions} == {("127.0.0.1", server.port)}


def test_client_to_a_port_where_nothing_listens_raises_connection_refused():
    client = Client(PacketSession, "127.0.0.1", free_port(), count=3)
    try:
        with pytest.raises(ConnectionRefusedError):
            client.start()
    finally:
        client.stop()


# --- max_sessions ------------------------------------------------------------------------


def test_max_sessions_rejects_the_connection_over_the_limit(start_server, raw_peers):
    connected = []

    class Echo(PacketSession):
        def on_connected(self):
            connected.append(self.peer[1])

        def on_recv_packet(self, packet_id, payload):
            self.send(packet_id, payload)

    server = start_server(Echo, max_sessions=3)
    peers = [raw_peers(server.port) for _ in range(3)]
    poll_until(server, lambda: len(server) == 3)
    extra = raw_peers(server.port)
    closed = extra.wait_closed(2)
    server.poll(0.1)
    assert closed, "the 4th connection was not closed"
    assert server.stats()["rejected"] == 1
    assert local_port(extra) not in connected
    assert len(server) == 3
    for n, peer in enumerate(peers):
        assert exchange(server, peer, packet(8, bytes([n]))) == (8, bytes([n]))


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


def test_poll_after_stop_returns_at_once_instead_of_waiting_forever(start_server):
    server = start_server(PacketSession)
    server.stop()
    started = time.monotonic()
    assert server.poll() == 0
    assert server.poll(timeout=5) == 0
    assert time.monotonic() - started < 1
    assert not server.running
