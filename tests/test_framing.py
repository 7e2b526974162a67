"""Framing of the receive side, over real sockets.

`PacketSession` cuts the byte stream into `[size u16][id u16][payload]`
packets, `size` counting the 4 header bytes, however TCP happens to split or
merge them, and delivers each whole packet exactly once, in order. Its
`on_recv` is sealed. A raw `Session` sees the byte stream itself: `on_recv`
returns how many bytes it consumed and the rest is shown again with the next
bytes (the lecture's `RecvBuffer.OnRead`).

To force the server to read a split packet in several pieces, the tests send
one piece and wait until the server's `bytes_in` counter shows it was read
before sending the next.
"""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from servercore import DisconnectReason, PacketSession
from support import RawPeer, header, packet, poll_until, raw_recorder, recorder

# Every test here runs on both paths: the polling thread serving the sockets,
# and the I/O threads alone (conftest.py).
BOTH_IO_PATHS = True


def send_in_pieces(server, peer: RawPeer, pieces: list[bytes]) -> None:
    """Sends each piece only after the server has read everything before it."""
    expected = server.stats()["bytes_in"]
    for piece in pieces:
        peer.send(piece)
        expected += len(piece)
        poll_until(
            server,
            lambda: server.stats()["bytes_in"] >= expected,
            timeout=5.0,
            message=lambda: f"server read {server.stats()['bytes_in']} of {expected} bytes",
        )


def connect_one(server, peer_factory, Recorder) -> tuple[RawPeer, PacketSession]:
    before = len(Recorder.sessions)
    peer = peer_factory(server.port)
    poll_until(server, lambda: len(Recorder.sessions) == before + 1, message="no on_connected")
    return peer, Recorder.sessions[-1]


# --- PacketSession: split and merged packets ----------------------------------


def test_a_packet_sent_byte_by_byte_arrives_whole_and_once(start_server, raw_peers):
    Recorder = recorder()
    server = start_server(Recorder)
    peer, session = connect_one(server, raw_peers, Recorder)
    wire = packet(7, b"hello, world")

    for i, byte in enumerate(wire):
        send_in_pieces(server, peer, [bytes([byte])])
        server.poll(0.005)
        if i < len(wire) - 1:
            assert Recorder.received[session.id] == [], f"delivered after {i + 1} of {len(wire)} bytes"

    poll_until(server, lambda: Recorder.received[session.id], message="packet never delivered")
    server.poll(0.05)
    assert Recorder.received[session.id] == [(7, b"hello, world")]
    assert session.connected


def test_a_header_split_in_the_middle_waits_for_its_second_half(start_server, raw_peers):
    Recorder = recorder()
    server = start_server(Recorder)
    peer, session = connect_one(server, raw_peers, Recorder)
    wire = packet(0x0302, b"payload")

    send_in_pieces(server, peer, [wire[:2]])
    server.poll(0.02)
    assert Recorder.received[session.id] == []
    send_in_pieces(server, peer, [wire[2:4], wire[4:8]])
    server.poll(0.02)
    assert Recorder.received[session.id] == []
    send_in_pieces(server, peer, [wire[8:]])

    poll_until(server, lambda: Recorder.received[session.id], message="packet never delivered")
    assert Recorder.received[session.id] == [(0x0302, b"payload")]


def test_the_tail_of_one_packet_and_the_head_of_the_next_in_one_read_make_two_packets(
    start_server, raw_peers
):
    Recorder = recorder()
    server = start_server(Recorder)
    peer, session = connect_one(server, raw_peers, Recorder)
    first, second = packet(1, b"A" * 100), packet(2, b"B" * 50)
    stream = first + second

    send_in_pieces(server, peer, [stream[:60], stream[60:106], stream[106:]])

    poll_until(server, lambda: len(Recorder.received[session.id]) >= 2, message="packets missing")
    server.poll(0.05)
    assert Recorder.received[session.id] == [(1, b"A" * 100), (2, b"B" * 50)]


def test_many_packets_in_one_write_all_arrive_in_order(start_server, raw_peers):
    Recorder = recorder()
    server = start_server(Recorder)  # max_packet_size 4096 by default
    peer, session = connect_one(server, raw_peers, Recorder)
    expected = [(i % 65536, i.to_bytes(4, "little") * (i % 7)) for i in range(500)]
    expected.insert(100, (9, b""))
    expected.insert(200, (65535, bytes(range(256)) * 15 + b"\xff" * 252))  # 4092 bytes: 4096 in all
    expected.append((0, b""))
    assert len(expected[200][1]) == 4096 - 4

    peer.send(b"".join(packet(pid, payload) for pid, payload in expected))

    poll_until(
        server,
        lambda: len(Recorder.received[session.id]) >= len(expected),
        message=lambda: f"{len(Recorder.received[session.id])} of {len(expected)} packets",
    )
    server.poll(0.05)
    assert Recorder.received[session.id] == expected
    assert server.stats()["packets_in"] == len(expected)
    assert session.connected


def test_size_counts_the_four_header_bytes(start_server, raw_peers):
    Recorder = recorder()
    server = start_server(Recorder, max_packet_size=64)
    peer, session = connect_one(server, raw_peers, Recorder)

    peer.send(header(4, 11))  # size 4: the header alone, an empty payload
    peer.send(header(9, 12) + b"abcde")  # size 9: five payload bytes
    peer.send(header(64, 13) + b"x" * 60)  # exactly max_packet_size, header included

    poll_until(server, lambda: len(Recorder.received[session.id]) >= 3, message="packets missing")
    server.poll(0.05)
    assert Recorder.received[session.id] == [(11, b""), (12, b"abcde"), (13, b"x" * 60)]
    assert session.connected
    assert Recorder.reasons == {}


def test_random_packets_split_at_random_points_arrive_exactly_as_sent(start_server):
    Recorder = recorder()
    server = start_server(Recorder, max_packet_size=1024)

    packets_strategy = st.lists(
        st.tuples(st.integers(0, 65535), st.binary(max_size=1020)), min_size=1, max_size=12
    )

    @settings(max_examples=25, deadline=None, database=None)
    @given(sent=packets_strategy, data=st.data())
    def check(sent: list[tuple[int, bytes]], data: st.DataObject) -> None:
        stream = b"".join(packet(pid, payload) for pid, payload in sent)
        cuts = sorted(
            data.draw(st.sets(st.integers(1, len(stream) - 1), max_size=20), label="cuts")
            if len(stream) > 1
            else set()
        )
        bounds = [0, *cuts, len(stream)]
        pieces = [stream[a:b] for a, b in zip(bounds, bounds[1:])]

        before = len(Recorder.sessions)
        peer = RawPeer(server.port)
        try:
            poll_until(server, lambda: len(Recorder.sessions) == before + 1, message="no on_connected")
            session = Recorder.sessions[-1]
            send_in_pieces(server, peer, pieces)
            poll_until(
                server,
                lambda: len(Recorder.received[session.id]) >= len(sent) or session.id in Recorder.reasons,
                message=lambda: f"{len(Recorder.received[session.id])} of {len(sent)} packets",
            )
            server.poll(0.01)
            assert Recorder.received[session.id] == sent
            assert session.id not in Recorder.reasons
        finally:
            peer.close()
        poll_until(server, lambda: session.id in Recorder.reasons, message="no on_disconnected")
        assert Recorder.reasons[session.id] == DisconnectReason.CLOSED_BY_PEER

    check()
    assert len(Recorder.sessions) >= 10, "the property was checked on too few examples"


# --- PacketSession seals on_recv ------------------------------------------------


def test_a_packet_session_subclass_that_defines_on_recv_is_rejected_when_defined():
    with pytest.raises(TypeError, match="on_recv_packet"):

        class Sneaky(PacketSession):
            def on_recv(self, data: bytes) -> int:
                return len(data)


def test_a_subclass_of_a_packet_session_subclass_cannot_define_on_recv_either():
    class Game(PacketSession):
        def on_recv_packet(self, packet_id: int, payload: bytes) -> None:
            pass

    with pytest.raises(TypeError, match="on_recv_packet"):

        class Sneaky(Game):
            def on_recv(self, data: bytes) -> int:
                return len(data)

    class Fine(Game):  # the same subclass without on_recv is accepted
        def on_recv_packet(self, packet_id: int, payload: bytes) -> None:
            pass

    assert issubclass(Fine, PacketSession)


def test_a_packet_session_subclass_that_gets_on_recv_from_a_mixin_is_rejected_when_defined():
    class RawHandling:
        def on_recv(self, data: bytes) -> int:
            return len(data)

    with pytest.raises(TypeError, match="on_recv_packet"):

        class Sneaky(RawHandling, PacketSession):
            pass


# --- raw Session: on_recv and its return value ----------------------------------


def connect_raw(server, raw_peers, Raw) -> RawPeer:
    peer = raw_peers(server.port)
    poll_until(server, lambda: Raw.sessions, message="no on_connected")
    return peer


def test_a_raw_session_gets_the_bytes_as_they_come(start_server, raw_peers):
    Raw = raw_recorder(len)
    server = start_server(Raw)
    peer = connect_raw(server, raw_peers, Raw)

    send_in_pieces(server, peer, [b"hello"])
    poll_until(server, lambda: Raw.calls, message="on_recv not called")
    send_in_pieces(server, peer, [b" world"])
    poll_until(server, lambda: len(Raw.calls) >= 2, message="on_recv not called again")

    assert all(type(data) is bytes for data in Raw.calls)
    assert Raw.calls == [b"hello", b" world"]  # all consumed: nothing shown twice
    assert Raw.sessions[0].connected


def test_a_raw_session_that_consumes_n_bytes_sees_the_rest_again_before_the_next_bytes(
    start_server, raw_peers
):
    def whole_lines(data: bytes) -> int:
        return data.rfind(b"\n") + 1

    Raw = raw_recorder(whole_lines)
    server = start_server(Raw)
    peer = connect_raw(server, raw_peers, Raw)

    send_in_pieces(server, peer, [b"abc\nde"])
    poll_until(server, lambda: Raw.calls, message="on_recv not called")
    send_in_pieces(server, peer, [b"f\ngh"])
    poll_until(server, lambda: len(Raw.calls) >= 2, message="on_recv not called again")
    send_in_pieces(server, peer, [b"i\n"])
    poll_until(server, lambda: len(Raw.calls) >= 3, message="on_recv not called a third time")

    assert Raw.calls == [b"abc\nde", b"def\ngh", b"ghi\n"]
    assert Raw.sessions[0].connected


def test_a_raw_session_that_consumes_nothing_keeps_everything(start_server, raw_peers):
    Raw = raw_recorder(lambda data: 0)
    server = start_server(Raw)
    peer = connect_raw(server, raw_peers, Raw)

    for piece in (b"abc", b"def", b"g"):
        count = len(Raw.calls)
        send_in_pieces(server, peer, [piece])
        poll_until(server, lambda: len(Raw.calls) > count, message="on_recv not called")

    assert Raw.calls == [b"abc", b"abcdef", b"abcdefg"]
    assert Raw.sessions[0].connected


@pytest.mark.parametrize(
    "bad_return",
    [
        pytest.param(lambda data: len(data) + 1, id="more-than-given"),
        pytest.param(lambda data: -1, id="negative"),
        pytest.param(lambda data: None, id="None"),
        pytest.param(lambda data: str(len(data)), id="str"),
    ],
)
def test_on_recv_returning_an_impossible_count_disconnects_with_callback_error_and_logs_it(
    start_server, raw_peers, caplog, bad_return
):
    Raw = raw_recorder(bad_return)
    server = start_server(Raw)
    peer = connect_raw(server, raw_peers, Raw)

    with caplog.at_level(logging.ERROR, logger="servercore"):
        peer.send(b"hello")
        poll_until(server, lambda: Raw.ended, message="session was not disconnected")

    assert Raw.ended == [DisconnectReason.CALLBACK_ERROR]
    assert peer.wait_closed(5.0)
    errors = [r for r in caplog.records if r.name == "servercore" and r.levelno >= logging.ERROR]
    assert errors, "no error logged to the 'servercore' logger"
    assert any("on_recv" in r.getMessage() for r in errors), [r.getMessage() for r in errors]
    assert server.stats()["disconnects"]["CALLBACK_ERROR"] == 1


def test_unconsumed_bytes_beyond_max_packet_size_disconnect_with_packet_too_large(
    start_server, raw_peers
):
    Raw = raw_recorder(lambda data: 0)
    server = start_server(Raw, max_packet_size=64)
    peer = connect_raw(server, raw_peers, Raw)

    send_in_pieces(server, peer, [b"x" * 40, b"y" * 24])  # exactly 64 kept: still fine
    poll_until(server, lambda: len(Raw.calls) >= 2, message="on_recv not called")
    server.poll(0.05)
    assert Raw.ended == []
    assert Raw.sessions[0].connected

    peer.send(b"z")  # 65 unconsumed
    poll_until(server, lambda: Raw.ended, message="session was not disconnected")
    assert Raw.ended == [DisconnectReason.PACKET_TOO_LARGE]
    assert peer.wait_closed(5.0)
    assert server.stats()["disconnects"]["PACKET_TOO_LARGE"] == 1
