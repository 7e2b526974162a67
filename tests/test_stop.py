"""Starting and stopping a service: start(), stop(), `with`, run_forever().

- stop() closes every session, delivers on_disconnected(SERVER_SHUTDOWN) to
  each exactly once, closes the peers and the listener; it is idempotent.
- `with` starts and stops; start() twice, or on a port in use, raises.
- run_forever() returns after stop(), from a callback or another thread, with
  every session's on_disconnected delivered; poll() after stop() does not wait.
- Callbacks run only on the thread that polls, also those stop() causes:
  stop() from another thread while a thread polls returns once that thread has
  delivered every on_disconnected; stop() from a thread that does not poll,
  while the polling thread is between polls, closes the sessions and leaves
  their on_disconnected to that thread's next poll() (`running` stays True
  until then). With no thread polling at all, stop() delivers them itself.
- A Server or Client dropped without stop() warns (ResourceWarning), returns
  at once (the linger runs in the background, without the GIL), closes its
  connections and leaks neither descriptors nor memory.
- The interpreter exits promptly and cleanly with a server running and log
  records queued behind a slow handler: the log thread stops at exit and
  never calls into a finalizing interpreter.
"""

from __future__ import annotations

import errno
import gc
import os
import socket
import threading
import time

import pytest

from servercore import Client, DisconnectReason, PacketSession, Server

from support import RawPeer, exchange, packet, poll_until, recorder, rss_bytes


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


# --- stop() from a thread that does not poll --------------------------------------


def thread_recorder():
    """A fresh PacketSession class that echoes, and records every callback as
    (name, session id, thread ident, reason or None) in `calls`."""

    class Recorder(PacketSession):
        calls: list[tuple[str, int, int, DisconnectReason | None]] = []

        def on_connected(self):
            Recorder.calls.append(("connected", self.id, threading.get_ident(), None))

        def on_recv_packet(self, packet_id, payload):
            Recorder.calls.append(("packet", self.id, threading.get_ident(), None))
            self.send(packet_id, payload)

        def on_disconnected(self, reason):
            Recorder.calls.append(("disconnected", self.id, threading.get_ident(), reason))

        @staticmethod
        def count(name: str) -> int:
            return sum(1 for call in Recorder.calls if call[0] == name)

    return Recorder


def test_stop_from_another_thread_lets_run_forever_deliver_every_on_disconnected_before_either_returns(
    start_server, raw_peers
):
    Recorder = thread_recorder()
    server = start_server(Recorder)
    poller: dict[str, object] = {}

    def run():
        poller["ident"] = threading.get_ident()
        try:
            server.run_forever()
        except BaseException as error:  # noqa: BLE001 - reported below
            poller["error"] = error
        finally:
            poller["at_return"] = (Recorder.count("connected"), Recorder.count("disconnected"))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        peers = [raw_peers(server.port) for _ in range(10)]
        for n, peer in enumerate(peers):
            peer.send(packet(5, bytes([n]) * 100))
        for n, peer in enumerate(peers):
            assert peer.recv_packet() == (5, bytes([n]) * 100)
        assert Recorder.count("connected") == 10

        server.stop()
        at_stop_return = (Recorder.count("connected"), Recorder.count("disconnected"))
        thread.join(5)
        assert not thread.is_alive(), "run_forever did not return after stop() from another thread"
    finally:
        server.stop()
        thread.join(5)

    assert "error" not in poller, poller.get("error")
    stopping_thread = threading.get_ident()
    where = {(name, ident == poller["ident"], ident == stopping_thread) for name, _, ident, _ in Recorder.calls}
    assert all(ident == poller["ident"] for _, _, ident, _ in Recorder.calls), (
        f"callbacks ran off the polling thread: {sorted(where)} as (callback, on poller, on the thread that "
        f"stopped); (connected, disconnected) when run_forever returned: {poller['at_return']}, "
        f"when stop() returned: {at_stop_return}"
    )
    assert poller["at_return"] == (10, 10), (
        f"run_forever returned with (connected, disconnected) = {poller['at_return']}"
    )
    assert at_stop_return == (10, 10), f"stop() returned with (connected, disconnected) = {at_stop_return}"
    reasons = [reason for name, _, _, reason in Recorder.calls if name == "disconnected"]
    assert reasons == [DisconnectReason.SERVER_SHUTDOWN] * 10
    assert all(peer.wait_closed(2) for peer in peers)


def test_stop_from_a_thread_that_does_not_poll_leaves_the_callbacks_to_the_next_poll_of_the_polling_thread(
    start_server, raw_peers
):
    Recorder = thread_recorder()
    server = start_server(Recorder)
    peers = [raw_peers(server.port) for _ in range(5)]
    polled_once = threading.Event()
    poll_again = threading.Event()
    poller: dict[str, object] = {}

    def poll_thread():
        poller["ident"] = threading.get_ident()
        try:
            poll_until(server, lambda: len(server) == 5)
            polled_once.set()
            if not poll_again.wait(10):
                return
            deadline = time.monotonic() + 5
            while server.running and time.monotonic() < deadline:
                server.poll(0.05)
            poller["running_after"] = server.running
        except BaseException as error:  # noqa: BLE001 - reported below
            poller["error"] = error
        finally:
            polled_once.set()

    thread = threading.Thread(target=poll_thread, daemon=True)
    thread.start()
    try:
        assert polled_once.wait(10) and "error" not in poller, poller.get("error")
        # The polling thread is between polls now; this thread has never polled.
        started = time.monotonic()
        server.stop()
        stop_took = time.monotonic() - started
        on_this_thread = [call for call in Recorder.calls if call[2] == threading.get_ident()]
        closed = [peer.wait_closed(0.5) for peer in peers]
        running_after_stop = server.running
        time.sleep(0.2)
        still_running = server.running
        disconnected_before_next_poll = Recorder.count("disconnected")
    finally:
        poll_again.set()
        thread.join(10)
    assert not thread.is_alive(), "the polling thread's poll() did not finish"
    assert "error" not in poller, poller.get("error")

    assert on_this_thread == [], f"stop() ran callbacks on the thread that called it: {on_this_thread}"
    assert closed == [True] * 5, "stop() returned before the sessions were closed"
    assert stop_took < 5
    assert running_after_stop is True and still_running is True, (
        "server.running went False before the polling thread delivered on_disconnected"
    )
    assert disconnected_before_next_poll == 0
    disconnects = [call for call in Recorder.calls if call[0] == "disconnected"]
    assert [reason for *_, reason in disconnects] == [DisconnectReason.SERVER_SHUTDOWN] * 5
    assert {ident for _, _, ident, _ in disconnects} == {poller["ident"]}
    assert poller["running_after"] is False


def test_stop_when_no_thread_ever_polled_closes_sessions_the_game_was_never_told_of_without_callbacks(
    start_server, raw_peers
):
    """Nobody polled, so no session was announced: stop() closes them all, and
    no callback runs for a session whose on_connected never ran. stats() still
    counts each one."""
    Recorder = thread_recorder()
    server = start_server(Recorder)
    peers = [raw_peers(server.port) for _ in range(3)]
    deadline = time.monotonic() + 5
    while server.stats()["sessions"] < 3:  # accepted by the engine; nobody polls
        assert time.monotonic() < deadline, "connections not accepted"
        time.sleep(0.01)

    server.stop()

    assert Recorder.calls == []
    assert server.stats()["disconnects"]["SERVER_SHUTDOWN"] == 3
    assert server.stats()["sessions"] == 0
    assert server.running is False
    assert all(peer.wait_closed(2) for peer in peers)


def test_stop_on_the_thread_that_polls_delivers_every_on_disconnected_itself_before_returning(
    start_server, raw_peers
):
    Recorder = thread_recorder()
    server = start_server(Recorder)
    peers = [raw_peers(server.port) for _ in range(3)]
    poll_until(server, lambda: len(server) == 3)

    server.stop()

    me = threading.get_ident()
    assert {ident for _, _, ident, _ in Recorder.calls} == {me}
    by_session: dict[int, list] = {}
    for name, session_id, _, reason in Recorder.calls:
        by_session.setdefault(session_id, []).append((name, reason))
    assert len(by_session) == 3
    assert all(
        calls == [("connected", None), ("disconnected", DisconnectReason.SERVER_SHUTDOWN)]
        for calls in by_session.values()
    ), by_session
    assert server.running is False
    assert all(peer.wait_closed(2) for peer in peers)


# --- a service dropped without stop() ----------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def wait_for_fds(expected: int, timeout: float = 5.0) -> int:
    """Waits for background shutdowns to give their descriptors back; returns the count."""
    deadline = time.monotonic() + timeout
    while open_fds() > expected and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)
    return open_fds()


def drop_a_busy_server() -> tuple[float, list[RawPeer]]:
    """Starts a Server (linger 1 s) that 3 peers have exchanged a packet with,
    then drops it without stop(). Returns how long the drop took and the peers."""
    server = Server(recorder(echo=True), "127.0.0.1", 0, linger=1.0)
    peers: list[RawPeer] = []
    try:
        server.start()
        peers = [RawPeer(server.port) for _ in range(3)]
        for n, peer in enumerate(peers):
            assert exchange(server, peer, packet(1, bytes([n]))) == (1, bytes([n]))
    except BaseException:
        server.stop()
        for peer in peers:
            peer.close()
        raise
    try:
        with pytest.warns(ResourceWarning):
            started = time.monotonic()
            del server
            gc.collect()
            took = time.monotonic() - started
    except BaseException:
        for peer in peers:
            peer.close()
        raise
    return took, peers


def test_a_server_dropped_without_stop_warns_closes_its_peers_in_the_background_and_leaks_nothing():
    took, peers = drop_a_busy_server()  # the first one: the pool and logging set themselves up
    for peer in peers:
        peer.close()
    gc.collect()
    fds_before = wait_for_fds(0, timeout=1.0)
    rss_before = rss_bytes()
    for round_ in range(20):
        took, peers = drop_a_busy_server()
        try:
            assert took < 0.3, f"round {round_}: del + gc.collect() took {took:.2f}s (the linger, with the GIL?)"
            closed = [peer.wait_closed(3) for peer in peers]
            assert closed == [True] * 3, f"round {round_}: the peers of a dropped server were not closed"
        finally:
            for peer in peers:
                peer.close()
    fds_after = wait_for_fds(fds_before)
    grown = rss_bytes() - rss_before
    assert fds_after <= fds_before, f"{fds_after - fds_before} descriptors leaked by 20 dropped servers"
    assert grown < 15 << 20, f"RSS grew by {grown / (1 << 20):.1f} MiB over 20 dropped servers"


def start_a_busy_client(server: Server) -> Client:
    """A started Client (linger 1 s) of 3 sessions that have exchanged a packet with `server`."""
    Player = recorder()
    client = Client(Player, "127.0.0.1", server.port, count=3, linger=1.0)
    try:
        client.start()
        poll_until([server, client], lambda: len(server) == 3 and len(client) == 3)
        for session in client.sessions:
            assert session.send(1, b"hi")
        poll_until([server, client], lambda: sum(len(r) for r in Player.received.values()) == 3)
    except BaseException:
        client.stop()
        raise
    return client


def drop_a_busy_client(server: Server) -> float:
    """Drops a busy client without stop(); returns how long the drop took."""
    client = start_a_busy_client(server)
    with pytest.warns(ResourceWarning):
        started = time.monotonic()
        del client
        gc.collect()
        took = time.monotonic() - started
    return took


def test_a_client_dropped_without_stop_warns_closes_its_connections_in_the_background_and_leaks_nothing(
    start_server,
):
    Game = recorder(echo=True)
    server = start_server(Game)
    drop_a_busy_client(server)  # the first one: the pool and logging set themselves up
    poll_until(server, lambda: len(server) == 0, timeout=5)
    gc.collect()
    fds_before = wait_for_fds(0, timeout=1.0)
    rss_before = rss_bytes()
    for round_ in range(20):
        took = drop_a_busy_client(server)
        assert took < 0.3, f"round {round_}: del + gc.collect() took {took:.2f}s (the linger, with the GIL?)"
        poll_until(server, lambda: len(server) == 0, timeout=3,
                   message=f"round {round_}: the server still has {len(server)} sessions of a dropped client")
    fds_after = wait_for_fds(fds_before)
    grown = rss_bytes() - rss_before
    assert fds_after <= fds_before, f"{fds_after - fds_before} descriptors leaked by 20 dropped clients"
    assert grown < 15 << 20, f"RSS grew by {grown / (1 << 20):.1f} MiB over 20 dropped clients"
    assert len(Game.ended) == 63


def test_a_running_server_its_sessions_refer_to_is_collected_all_the_same(raw_peers):
    """Session objects that keep their server (self.server = ...) make a cycle
    through the engine; the garbage collector sees it and breaks it, and the
    server warns and closes its peers as if it had been dropped."""

    class Player(PacketSession):
        server: Server | None = None

        def on_connected(self) -> None:
            self.home = Player.server  # the cycle: server -> session -> server

    server = Server(Player, "127.0.0.1", 0, linger=1.0)
    Player.server = server
    server.start()
    peers = [raw_peers(server.port) for _ in range(3)]
    poll_until(server, lambda: len(server) == 3)
    Player.server = None
    with pytest.warns(ResourceWarning):
        del server
        gc.collect()
    assert all(peer.wait_closed(3) for peer in peers), "the peers of the collected server stayed open"


def test_the_interpreter_exits_cleanly_with_log_records_queued():
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).with_name("exit_with_records_queued.py")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-W", "ignore::ResourceWarning", str(script)],
                          capture_output=True, text=True, timeout=60)
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "exiting"
    assert "Fatal Python error" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    # What the slow handler took before exit: the first of the flood's lines.
    assert done.stderr.count("LOG session") >= 1, done.stderr
    assert took < 10, f"exit took {took:.1f} s"
