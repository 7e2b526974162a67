"""The send side: `session.send`, `SendBuffer`, `broadcast`, `on_send`, the
send-buffer pool and the per-session send queue limit.

A send never blocks and never calls Python: it queues one encoded packet, and the
session's writer hands everything queued to the kernel in gathered writes. A
`SendBuffer` is encoded once into pooled memory and shared by every recipient;
once everything is written and the buffers are gone, the pool is back to idle.
A peer that does not read costs only its own session (SEND_QUEUE_FULL), with a
log line that says what would have passed the limit.

A raw `Session` sends bytes as they are, unframed: `send(data)` with any
bytes-like object, or `SendBuffer.raw(data)`, shareable like any SendBuffer;
`broadcast(data)` to a server of raw sessions. Packets and raw bytes do not
mix: a PacketSession refuses a raw SendBuffer, a raw Session a packet id.
"""

from __future__ import annotations

import gc
import logging
import random
import selectors
import socket
import threading
import time

import pytest

from servercore import DisconnectReason, PacketSession, SendBuffer
from support import SEQ, connect, local_port, packet, poll_until, raw_recorder, recorder, session_of

# Every test here runs on both paths: the polling thread serving the sockets,
# and the I/O threads alone (conftest.py).
BOTH_IO_PATHS = True


# --- send: order and integrity --------------------------------------------------


def test_a_thousand_sends_queued_in_one_callback_arrive_as_a_thousand_packets_in_order(
    start_server, raw_peers
):
    class Burst(PacketSession):
        results: list[bool] = []

        def on_connected(self) -> None:
            Burst.results = [self.send(3, SEQ.pack(i) + b"." * (i % 50)) for i in range(1000)]

    server = start_server(Burst)
    (peer,) = connect(server, raw_peers)

    assert Burst.results == [True] * 1000
    for i in range(1000):
        packet_id, payload = peer.recv_packet()
        assert packet_id == 3
        assert payload == SEQ.pack(i) + b"." * (i % 50), f"packet {i}"


def test_send_buffers_and_id_payload_sends_interleave_in_order(start_server, raw_peers):
    class Mixed(PacketSession):
        def on_connected(self) -> None:
            for i in range(200):
                if i % 2:
                    self.send(SendBuffer(i, SEQ.pack(i)))
                else:
                    self.send(i, SEQ.pack(i))

    server = start_server(Mixed)
    (peer,) = connect(server, raw_peers)

    assert [peer.recv_packet() for _ in range(200)] == [(i, SEQ.pack(i)) for i in range(200)]


# --- accepted argument types and their limits -----------------------------------

BYTES_LIKE = [
    pytest.param(b"hello", id="bytes"),
    pytest.param(bytearray(b"hello"), id="bytearray"),
    pytest.param(memoryview(b"hello"), id="memoryview"),
    pytest.param(memoryview(b"__hello__")[2:7], id="memoryview-slice"),
]


@pytest.mark.parametrize("payload", BYTES_LIKE)
def test_send_broadcast_and_send_buffer_accept_any_bytes_like_payload(start_server, raw_peers, payload):
    server = start_server(PacketSession)
    (peer,) = connect(server, raw_peers)
    session = server.sessions[0]

    assert session.send(1, payload) is True
    assert server.broadcast(2, payload) == 1
    assert session.send(SendBuffer(3, payload)) is True
    assert server.broadcast(SendBuffer(4, payload)) == 1

    assert [peer.recv_packet() for _ in range(4)] == [(i, b"hello") for i in (1, 2, 3, 4)]


def test_a_str_payload_is_a_type_error(start_server, raw_peers):
    server = start_server(PacketSession)
    connect(server, raw_peers)
    session = server.sessions[0]

    with pytest.raises(TypeError):
        session.send(1, "hello")
    with pytest.raises(TypeError):
        server.broadcast(1, "hello")
    with pytest.raises(TypeError):
        SendBuffer(1, "hello")
    assert server.stats()["send_queue_bytes"] == 0


@pytest.mark.parametrize("packet_id", [-1, 65536])
def test_a_packet_id_outside_0_to_65535_is_a_value_error(start_server, raw_peers, packet_id):
    server = start_server(PacketSession)
    (peer,) = connect(server, raw_peers)
    session = server.sessions[0]

    with pytest.raises(ValueError):
        session.send(packet_id, b"x")
    with pytest.raises(ValueError):
        server.broadcast(packet_id, b"x")
    with pytest.raises(ValueError):
        SendBuffer(packet_id, b"x")

    # The boundaries themselves are fine, and nothing of the refused sends went out.
    assert session.send(0, b"lo") and session.send(65535, b"hi")
    assert [peer.recv_packet(), peer.recv_packet()] == [(0, b"lo"), (65535, b"hi")]


def test_a_payload_making_a_packet_over_max_packet_size_is_a_value_error(start_server, raw_peers):
    server = start_server(PacketSession, max_packet_size=256)
    (peer,) = connect(server, raw_peers)
    session = server.sessions[0]

    with pytest.raises(ValueError, match="max_packet_size"):
        session.send(1, b"x" * 253)  # 257 bytes with the header
    with pytest.raises(ValueError, match="max_packet_size"):
        server.broadcast(1, b"x" * 253)
    with pytest.raises(ValueError, match="max_packet_size"):
        session.send(SendBuffer(1, b"x" * 253))  # a SendBuffer is not bound to a service
    with pytest.raises(ValueError, match="max_packet_size"):
        server.broadcast(SendBuffer(1, b"x" * 253))

    assert session.send(2, b"y" * 252)  # exactly 256: accepted
    assert peer.recv_packet() == (2, b"y" * 252)


def test_send_buffer_exposes_its_encoded_packet():
    buffer = SendBuffer(0x0102, b"Hello")

    assert buffer.packet_id == 0x0102
    assert buffer.size == 9
    assert len(buffer) == 9
    assert buffer.payload == b"Hello"
    assert bytes(buffer) == b"\x09\x00\x02\x01Hello" == packet(0x0102, b"Hello")
    assert repr(buffer) == "SendBuffer(packet_id=258, size=9)"

    empty = SendBuffer(7, b"")
    assert (empty.size, len(empty), empty.payload, bytes(empty)) == (4, 4, b"", packet(7))


def test_a_send_buffer_is_immutable_and_a_copy_of_its_payload():
    source = bytearray(b"abc")
    buffer = SendBuffer(1, source)
    source[0] = ord("z")

    assert buffer.payload == b"abc"
    with pytest.raises(AttributeError):
        buffer.packet_id = 2  # type: ignore[misc]
    assert buffer.packet_id == 1


# --- broadcast ------------------------------------------------------------------


def test_broadcast_reaches_every_session_exactly_once_and_returns_how_many(start_server, raw_peers):
    server = start_server(PacketSession)
    peers = connect(server, raw_peers, 20)

    assert server.broadcast(SendBuffer(5, b"first")) == 20
    assert server.broadcast(6, b"second") == 20

    for peer in peers:
        # The packet after "first" is "second": "first" did not come twice.
        assert [peer.recv_packet(), peer.recv_packet()] == [(5, b"first"), (6, b"second")]


def test_broadcast_with_exclude_skips_that_session(start_server, raw_peers):
    server = start_server(PacketSession)
    peers = connect(server, raw_peers, 3)
    excluded = session_of(server, peers[1])

    assert server.broadcast(1, b"not for you", exclude=excluded) == 2
    assert server.broadcast(2, b"for all") == 3

    assert [peers[0].recv_packet(), peers[0].recv_packet()] == [(1, b"not for you"), (2, b"for all")]
    assert peers[1].recv_packet() == (2, b"for all")
    assert [peers[2].recv_packet(), peers[2].recv_packet()] == [(1, b"not for you"), (2, b"for all")]


def test_broadcast_reaches_only_sessions_whose_on_connected_has_run(start_server, raw_peers):
    Recorder = recorder()
    server = start_server(Recorder)
    (first,) = connect(server, raw_peers)

    second = raw_peers(server.port)
    deadline = time.monotonic() + 5
    while server.stats()["sessions"] < 2:  # accepted by the engine, not polled yet
        assert time.monotonic() < deadline, "second connection not accepted"
        time.sleep(0.005)
    assert len(server) == 1
    assert server.sessions == Recorder.sessions[:1]

    assert server.broadcast(1, b"early") == 1

    poll_until(server, lambda: len(server) == 2, message="second on_connected")
    assert server.sessions == Recorder.sessions
    assert server.broadcast(2, b"late") == 2

    assert [first.recv_packet(), first.recv_packet()] == [(1, b"early"), (2, b"late")]
    assert second.recv_packet() == (2, b"late")


def test_a_broadcast_from_a_callback_reaches_the_other_sessions(start_server, raw_peers):
    class Chat(PacketSession):
        def on_recv_packet(self, packet_id: int, payload: bytes) -> None:
            server.broadcast(packet_id, payload, exclude=self)

    server = start_server(Chat)
    peers = connect(server, raw_peers, 3)
    peers[0].send(packet(9, b"hi all"))
    poll_until(server, lambda: server.stats()["packets_out"] >= 2, message=lambda: str(server.stats()))

    assert peers[1].recv_packet() == (9, b"hi all")
    assert peers[2].recv_packet() == (9, b"hi all")


# --- stats and the pool -----------------------------------------------------------


def test_stats_count_the_packets_and_bytes_in_and_out(start_server, raw_peers):
    class Echo(PacketSession):
        def on_recv_packet(self, packet_id: int, payload: bytes) -> None:
            self.send(packet_id, payload * 2)

    server = start_server(Echo)
    (peer,) = connect(server, raw_peers)
    payloads = [b"x" * n for n in range(10)]

    peer.send(b"".join(packet(1, p) for p in payloads))
    poll_until(server, lambda: server.stats()["packets_out"] >= 10, message=lambda: str(server.stats()))
    echoed = [peer.recv_packet() for _ in payloads]

    assert echoed == [(1, p * 2) for p in payloads]
    bytes_in = sum(4 + len(p) for p in payloads)
    bytes_out = sum(4 + 2 * len(p) for p in payloads)
    poll_until(server, lambda: server.stats()["bytes_out"] == bytes_out, message=lambda: str(server.stats()))
    stats = server.stats()
    assert (stats["packets_in"], stats["bytes_in"]) == (10, bytes_in)
    assert (stats["packets_out"], stats["bytes_out"]) == (10, bytes_out)


def test_a_broadcast_is_encoded_once_not_once_per_recipient(start_server, raw_peers):
    server = start_server(PacketSession)
    peers = connect(server, raw_peers, 50)

    before = server.stats()["pool_buffers_encoded"]
    assert server.broadcast(1, b"x" * 1000) == 50
    assert server.stats()["pool_buffers_encoded"] == before + 1

    buffer = SendBuffer(2, b"y" * 1000)
    assert server.stats()["pool_buffers_encoded"] == before + 2
    assert server.broadcast(buffer) == 50
    for session in server.sessions:
        session.send(buffer)
    assert server.stats()["pool_buffers_encoded"] == before + 2  # shared, never re-encoded

    for peer in peers:
        assert [peer.recv_packet()[0] for _ in range(3)] == [1, 2, 2]


def test_the_pool_and_the_send_queues_return_to_idle_once_everything_is_sent(start_server, raw_peers):
    server = start_server(PacketSession)
    peers = connect(server, raw_peers, 50)

    buffers = [SendBuffer(i, bytes([i]) * 3000) for i in range(30)]  # spans several pool chunks
    for buffer in buffers:
        assert server.broadcast(buffer) == 50
    server.broadcast(99, b"z" * 100)
    assert server.stats()["pool_chunks_in_use"] >= 1

    for peer in peers:
        got = [peer.recv_packet() for _ in range(31)]
        assert [pid for pid, _ in got] == [*range(30), 99]
    del buffers, buffer
    gc.collect()

    poll_until(
        server,
        lambda: server.stats()["pool_chunks_in_use"] == 0 and server.stats()["send_queue_bytes"] == 0,
        message=lambda: f"not idle: {server.stats()}",
    )


# --- on_send ----------------------------------------------------------------------


def test_on_send_reports_every_byte_written_when_overridden(start_server, raw_peers):
    class Counting(PacketSession):
        written: list[int] = []

        def on_connected(self) -> None:
            for i in range(300):
                self.send(1, SEQ.pack(i) * 100)

        def on_send(self, nbytes: int) -> None:
            Counting.written.append(nbytes)

    server = start_server(Counting)
    (peer,) = connect(server, raw_peers)
    for _ in range(300):
        peer.recv_packet()
    total = 300 * (4 + 400)

    poll_until(server, lambda: sum(Counting.written) >= total, message=lambda: f"{sum(Counting.written)}")
    server.poll(0.05)
    assert all(isinstance(n, int) and n > 0 for n in Counting.written)
    assert sum(Counting.written) == total == server.stats()["bytes_out"]


def test_on_send_is_inherited_by_a_subclass(start_server, raw_peers):
    class Base(PacketSession):
        written: list[int] = []

        def on_send(self, nbytes: int) -> None:
            Base.written.append(nbytes)

    class Derived(Base):
        def on_connected(self) -> None:
            self.send(1, b"abc")

    server = start_server(Derived)
    (peer,) = connect(server, raw_peers)
    assert peer.recv_packet() == (1, b"abc")
    poll_until(server, lambda: sum(Base.written) == 7, message=lambda: f"on_send saw {Base.written}")


def test_no_send_events_are_delivered_when_on_send_is_not_overridden(start_server, raw_peers):
    server = start_server(PacketSession)
    (peer,) = connect(server, raw_peers)
    session = server.sessions[0]
    while server.poll(0.02):
        pass

    for i in range(50):
        session.send(1, SEQ.pack(i))
        assert peer.recv_packet() == (1, SEQ.pack(i))
    poll_until(server, lambda: server.stats()["bytes_out"] == 50 * 8)

    handled = sum(server.poll(0.02) for _ in range(5))
    assert handled == 0, "events were queued for an on_send nobody overrides"


def test_on_send_adds_up_to_bytes_out_while_a_thread_sends_and_peers_vanish(start_server, raw_peers):
    """50 peers read what they are sent, then, at random times, half of them close
    (FIN, then read to the end) and half reset (RST), while a second thread keeps
    sending to every session."""

    class Counting(recorder()):
        written: list[int] = []

        def on_send(self, nbytes: int) -> None:
            Counting.written.append(nbytes)

    server = start_server(Counting)
    peers = connect(server, raw_peers, 50)
    sessions = server.sessions
    rng = random.Random(5)
    stop = threading.Event()
    errors: list[BaseException] = []
    selector = selectors.DefaultSelector()
    selector_lock = threading.Lock()
    for peer in peers:
        peer.sock.setblocking(False)
        selector.register(peer.sock, selectors.EVENT_READ)

    def read_until_closed() -> None:
        while not stop.is_set():
            with selector_lock:
                for key, _ in selector.select(0.01):
                    try:
                        data = key.fileobj.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        selector.unregister(key.fileobj)
                        key.fileobj.close()

    def send_all_the_time() -> None:
        sizes = random.Random(6)
        try:
            while not stop.is_set():
                for session in sessions:
                    session.send(1, b"s" * sizes.randrange(1, 1000))
                time.sleep(0.002)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    def vanish_at_random_times() -> None:
        order = list(peers)
        rng.shuffle(order)
        for n, peer in enumerate(order):
            time.sleep(rng.uniform(0, 0.06))
            with selector_lock:
                if peer.sock.fileno() < 0:
                    continue
                if n % 2:
                    selector.unregister(peer.sock)
                    peer.reset()
                else:
                    peer.sock.shutdown(socket.SHUT_WR)  # the reader closes it at EOF

    threads = [threading.Thread(target=f, daemon=True)
               for f in (read_until_closed, send_all_the_time, vanish_at_random_times)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 10
        while threads[2].is_alive():
            assert time.monotonic() < deadline, "the peers were not all closed in time"
            server.poll(0.005)
        poll_until(server, lambda: len(server) == 0 and server.stats()["sessions"] == 0, timeout=10,
                   message=lambda: f"{len(server)} sessions left")
    finally:
        stop.set()
        for thread in threads:
            thread.join(5)
        selector.close()
    assert errors == []
    server.poll(0.2)
    assert len(Counting.ended) == 50
    stats = server.stats()
    assert stats["bytes_out"] > 0
    assert sum(Counting.written) == stats["bytes_out"], (
        f"on_send reported {sum(Counting.written)} bytes in {len(Counting.written)} calls, "
        f"stats()['bytes_out'] is {stats['bytes_out']}; disconnects: {stats['disconnects']}"
    )


def test_on_send_reports_what_a_local_close_flushes(start_server, raw_peers):
    """disconnect() flushes what was queued; on_send reports those writes too, so
    the sum of on_send is what the kernel took even for a session closed here."""

    class Counting(PacketSession):
        written: list[int] = []

        def on_send(self, nbytes: int) -> None:
            Counting.written.append(nbytes)

    server = start_server(Counting)
    (peer,) = connect(server, raw_peers, 1)
    (session,) = server.sessions
    for _ in range(1000):
        assert session.send(1, b"x" * 1000)
    session.disconnect()
    received = 0
    while True:
        chunk = peer.sock.recv(65536)
        if not chunk:
            break
        received += len(chunk)
    poll_until(server, lambda: len(server) == 0)
    assert received == 1000 * 1004
    assert server.stats()["bytes_out"] == received
    assert sum(Counting.written) == received, f"on_send reported {sum(Counting.written)} of {received} bytes"


# --- send after the end, and before a connection ----------------------------------------


def test_send_returns_false_after_disconnect_and_after_the_session_is_gone(start_server, raw_peers):
    Recorder = recorder()
    server = start_server(Recorder)
    (peer,) = connect(server, raw_peers)
    session = server.sessions[0]

    assert session.send(1, b"before") is True
    assert session.disconnect() is True
    assert session.send(2, b"after") is False
    assert session.send(SendBuffer(3, b"after")) is False
    assert session.connected is False

    assert peer.recv_packet() == (1, b"before")
    with pytest.raises(ConnectionError):
        peer.recv_packet()  # nothing sent after the disconnect went out
    peer.close()

    poll_until(server, lambda: session.id in Recorder.reasons, message="no on_disconnected")
    assert Recorder.reasons[session.id] == DisconnectReason.CLOSED_LOCALLY
    assert session.send(4, b"gone") is False
    assert session.send(SendBuffer(5, b"gone")) is False
    assert server.broadcast(6, b"nobody") == 0


def test_send_from_a_session_that_was_never_connected_is_a_runtime_error():
    class GameSession(PacketSession):
        pass

    session = GameSession()
    assert session.connected is False
    with pytest.raises(RuntimeError):
        session.send(1, b"hello")
    with pytest.raises(RuntimeError):
        session.send(SendBuffer(1, b"hello"))


# --- slow consumer ------------------------------------------------------------------


def test_a_peer_that_never_reads_is_disconnected_with_send_queue_full_while_others_carry_on(
    start_server, raw_peers
):
    Recorder = recorder()
    server = start_server(Recorder, max_send_queue_bytes=64 * 1024, max_packet_size=4096)
    (slow,) = connect(server, raw_peers)
    (reader,) = connect(server, raw_peers)
    slow_session = session_of(server, slow)
    payload = b"p" * 4000

    sent = 0
    deadline = time.monotonic() + 20
    while slow_session.id not in Recorder.reasons:
        assert time.monotonic() < deadline, f"slow peer still connected after {sent} broadcasts"
        for _ in range(4):  # 16 KiB: well under the reader's limit
            assert server.broadcast(1, SEQ.pack(sent) + payload) >= 1
            sent += 1
        for i in range(sent - 4, sent):
            assert reader.recv_packet() == (1, SEQ.pack(i) + payload)
        server.poll(0)

    assert Recorder.reasons[slow_session.id] == DisconnectReason.SEND_QUEUE_FULL
    assert server.stats()["disconnects"]["SEND_QUEUE_FULL"] == 1
    assert slow.wait_closed(5.0)

    # The reader's session is untouched and still gets everything, in order.
    assert server.broadcast(2, b"still here") == 1
    assert reader.recv_packet() == (2, b"still here")
    assert len(server) == 1
    assert server.sessions[0].connected
    assert server.stats()["disconnects"]["SEND_QUEUE_FULL"] == 1


def test_send_queue_bytes_shows_how_far_a_peer_is_behind(start_server, raw_peers):
    class Game(PacketSession):
        pass

    server = start_server(Game, max_send_queue_bytes=64 << 20)
    connect(server, raw_peers, rcvbuf=4096)  # a peer that never reads
    (session,) = server.sessions
    assert session.send_queue_bytes == 0
    sent = 0
    # Until the kernel's buffers (which autotune to megabytes) are full.
    while session.send_queue_bytes == 0 and sent < 32_000:
        session.send(1, b"\0" * 1000)
        sent += 1
    server.poll(0.1)
    behind = session.send_queue_bytes
    assert 0 < behind <= sent * 1004
    assert server.stats()["send_queue_bytes"] == behind
    assert session.connected


def test_the_send_queue_full_log_line_says_what_would_have_passed_the_limit(start_server, raw_peers, caplog):
    caplog.set_level(logging.WARNING, logger="servercore")
    Recorder = recorder()
    server = start_server(Recorder, max_send_queue_bytes=64 * 1024)
    (peer,) = connect(server, raw_peers, rcvbuf=4096)  # never reads
    session = session_of(server, peer)
    deadline = time.monotonic() + 20
    sent = 0
    while session.send(1, SEQ.pack(sent) + b"q" * 996):
        sent += 1
        if sent % 100 == 0:
            assert time.monotonic() < deadline, f"still connected after {sent} packets"
            time.sleep(0.001)  # let the kernel's buffers fill
    poll_until(server, lambda: Recorder.ended, message="no on_disconnected")
    assert Recorder.ended == [DisconnectReason.SEND_QUEUE_FULL]

    address = f"127.0.0.1:{local_port(peer)}"
    lines = [r.getMessage() for r in caplog.records
             if r.name == "servercore" and r.levelno == logging.WARNING and "SEND_QUEUE_FULL" in r.getMessage()]
    assert len(lines) == 1, lines
    assert address in lines[0], lines[0]
    assert "would pass max_send_queue_bytes" in lines[0], lines[0]


# --- raw sessions send bytes ---------------------------------------------------------


def raw_echo():
    """A fresh raw Session class that sends back whatever it receives."""

    class Echo(raw_recorder(len)):
        def on_recv(self, data):
            super().on_recv(data)
            self.send(data)
            return len(data)

    return Echo


def read_for(peer, seconds: float) -> bytes:
    """Everything the peer receives until `seconds` pass quietly or the server closes."""
    peer.sock.settimeout(seconds)
    data = peer.buffer
    peer.buffer = b""
    try:
        while chunk := peer.sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def test_a_raw_session_sends_its_bytes_unframed(start_server, raw_peers):
    Echo = raw_echo()
    server = start_server(Echo)
    peer = raw_peers(server.port)
    peer.send(b"hello")
    poll_until(server, lambda: server.stats()["bytes_out"] >= 5 or Echo.ended,
               message=lambda: f"nothing sent back: {server.stats()}")
    got = read_for(peer, 0.5)
    assert got == b"hello", f"the peer got {got!r}; on_disconnected: {Echo.ended}"
    assert Echo.ended == []


@pytest.mark.parametrize("data", [
    pytest.param(b"data", id="bytes"),
    pytest.param(bytearray(b"data"), id="bytearray"),
    pytest.param(memoryview(b"__data__")[2:6], id="memoryview-slice"),
])
def test_a_raw_session_sends_any_bytes_like_object(start_server, raw_peers, data):
    server = start_server(raw_recorder(len))
    (peer,) = connect(server, raw_peers)
    (session,) = server.sessions
    assert session.send(data) is True
    assert peer.recv_exactly(4) == b"data"


def test_a_raw_send_buffer_is_sent_as_is_and_broadcast_sends_raw_bytes_to_raw_sessions(start_server, raw_peers):
    server = start_server(raw_recorder(len))
    peers = connect(server, raw_peers, 3)
    tick = SendBuffer.raw(b"tick")
    assert bytes(tick) == b"tick" and len(tick) == 4
    for session in server.sessions:
        assert session.send(tick) is True  # one buffer, shared
    assert server.broadcast(tick) == 3
    assert server.broadcast(b"tock") == 3
    for peer in peers:
        assert peer.recv_exactly(12) == b"ticktick" + b"tock"


def test_a_packet_session_refuses_a_raw_send_buffer(start_server, raw_peers):
    server = start_server(PacketSession)
    (peer,) = connect(server, raw_peers)
    (session,) = server.sessions
    raw = SendBuffer.raw(b"unframed")
    with pytest.raises(TypeError):
        session.send(raw)
    assert session.send(1, b"framed")
    assert peer.recv_packet() == (1, b"framed")


def test_a_raw_session_refuses_a_packet_id_and_payload(start_server, raw_peers):
    server = start_server(raw_recorder(len))
    (peer,) = connect(server, raw_peers)
    (session,) = server.sessions
    with pytest.raises(TypeError, match=r"(?i)raw.*bytes|bytes.*raw"):
        session.send(1, b"x")
    assert read_for(peer, 0.2) == b"", "the refused send reached the wire"


def test_a_raw_send_over_max_send_queue_bytes_is_a_value_error_at_the_call(start_server, raw_peers):
    server = start_server(raw_recorder(len), max_send_queue_bytes=64 * 1024)
    (peer,) = connect(server, raw_peers)
    (session,) = server.sessions
    with pytest.raises(ValueError, match="max_send_queue_bytes"):
        session.send(b"x" * (64 * 1024 + 1))
    assert server.stats()["send_queue_bytes"] == 0
    assert session.send(b"fits") is True
    assert peer.recv_exactly(4) == b"fits"
