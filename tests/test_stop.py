"""Starting and stopping a service: start(), stop(), `with`, run_forever().

- stop() closes every session, delivers on_disconnected(SERVER_SHUTDOWN) to
  each exactly once, closes the peers and the listener; it is idempotent.
- `with` starts and stops; start() twice, or on a port in use, raises.
- run_forever() returns after stop(), from a callback or another thread, with
  every session's on_disconnected delivered; poll() after stop() does not wait.
"""

from __future__ import annotations

import errno
import socket
import threading
import time

import pytest

from servercore import DisconnectReason, PacketSession, Server

from support import packet, poll_until, recorder


# --- stop() ----------------------------------------------------------------------


def test_stop_delivers_server_shutdown_to_every_session_once_and_closes_the_peers(start_server, raw_peers):
    Recorder = recorder()
    server = start_server(Recorder)
    peers = [raw_peers(server.port) for _ in range(10)]
    poll_until(server, lambda: len(server) == 10)
    ids = {s.id for s in server.sessions}
    server.stop()
    assert Recorder.disconnects == {i: [DisconnectReason.SERVER_SHUTDOWN] for i in ids}
    assert len(server) == 0
    assert server.running is False
    for peer in peers:
        assert peer.wait_closed(2)
    server.stop()
    assert Recorder.disconnects == {i: [DisconnectReason.SERVER_SHUTDOWN] for i in ids}
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()


def test_poll_after_stop_returns_at_once_instead_of_waiting_forever(start_server):
    server = start_server(PacketSession)
    server.stop()
    started = time.monotonic()
    assert server.poll() == 0
    assert server.poll(timeout=5) == 0
    assert time.monotonic() - started < 1
    assert not server.running


# --- with, start() ---------------------------------------------------------------


def test_with_statement_starts_and_stops_the_server(raw_peers):
    Recorder = recorder()
    with Server(Recorder, "127.0.0.1", 0) as server:
        assert server.running
        port = server.port
        assert port > 0
        peer = raw_peers(port)
        poll_until(server, lambda: len(server) == 1)
    assert not server.running
    assert Recorder.ended == [DisconnectReason.SERVER_SHUTDOWN]
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


# --- run_forever() and stop() ----------------------------------------------------


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
