"""Where and when callbacks run (README, "What you can rely on", 2 and 4).

- Callbacks run only inside poll()/run_forever(), on the thread that calls it,
  never by themselves and never on an I/O thread.
- poll(timeout) waits about its timeout when nothing happens, returns the
  number of events it handled, and releases the GIL while it waits.
- send, broadcast and disconnect never call back into Python, inside a
  callback or outside one; poll() and run_forever() cannot be re-entered from
  a callback.
- A long poll() notices Ctrl-C (SIGINT) within about 100 ms.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from servercore import DisconnectReason, PacketSession

from support import packet, poll_until

# Every test here runs on both paths: the polling thread serving the sockets,
# and the I/O threads alone (conftest.py).
BOTH_IO_PATHS = True


# --- callbacks run inside poll(), on its thread ----------------------------------


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


# --- no re-entry into Python -----------------------------------------------------


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


# --- Ctrl-C -----------------------------------------------------------------------


def test_a_long_poll_notices_ctrl_c_within_about_100_ms(start_server):
    server = start_server(PacketSession)
    assert threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    killer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    interrupted_after = None
    started = time.monotonic()
    try:
        try:
            killer.start()
            server.poll(20)
        except KeyboardInterrupt:
            interrupted_after = time.monotonic() - started
        finally:
            killer.join(5)
    except KeyboardInterrupt:  # the signal came after poll() returned: still ours, not pytest's
        interrupted_after = interrupted_after or time.monotonic() - started
    finally:
        signal.signal(signal.SIGINT, previous)
    assert interrupted_after is not None, "poll(20) returned without KeyboardInterrupt"
    assert interrupted_after < 1.5, f"poll(20) raised KeyboardInterrupt only after {interrupted_after:.2f}s"


def test_a_server_polled_with_a_zero_timeout_answers_at_once(start_server, raw_peers):
    """A game loop that calls poll(0) every frame: each poll reads what has
    arrived, so an echo comes back within a millisecond or so, not at some
    watchdog's period."""

    class Echo(PacketSession):
        def on_recv_packet(self, packet_id, payload):
            self.send(packet_id, payload)

    server = start_server(Echo)
    peer = raw_peers(server.port)
    poll_until(server, lambda: len(server) == 1)
    answered = threading.Event()
    rtts: list[float] = []

    def ask() -> None:
        for i in range(40):
            started = time.perf_counter()
            peer.send(packet(1, i.to_bytes(4, "little")))
            assert peer.recv_packet() == (1, i.to_bytes(4, "little"))
            rtts.append(time.perf_counter() - started)
            time.sleep(0.002)
        answered.set()

    asker = threading.Thread(target=ask, daemon=True)
    asker.start()
    deadline = time.monotonic() + 10
    while not answered.is_set():
        assert time.monotonic() < deadline, f"{len(rtts)} of 40 echoes in 10 s"
        server.poll(0)
    asker.join(5)
    rtts.sort()
    assert rtts[len(rtts) // 2] < 0.005, f"median echo {rtts[len(rtts) // 2] * 1000:.1f} ms; slowest {rtts[-1] * 1000:.1f} ms"
