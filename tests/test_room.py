"""Rooms (rust/room.rs, rust/bindings/room.rs): groups of sessions to
broadcast to, kept in the engine.

- add, remove, contains, len, iterate (the session objects, in the order
  they connected); a session may be in many rooms.
- room.broadcast reaches the members (but `exclude`), encoded once.
- A session leaves every room by itself when it ends, before its
  on_disconnected: no stale member, no bookkeeping, also under a mass
  disconnect during broadcasts and under churn.
- 10,000 rooms of 10 and one room of 10,000 both work.
- Bad input: a clear TypeError/ValueError at the call.
"""

from __future__ import annotations

import random
import resource
import subprocess
import sys
import threading
from collections.abc import Callable

import pytest

from servercore import DisconnectReason, PacketSession, Room, Server
from support import RawPeer, connect, local_port, packet, poll_until, session_of

BOTH_IO_PATHS = True


class Member(PacketSession):
    """Packet 1 joins room[payload[0]], 2 leaves it, 3 chats to it."""

    rooms: list[Room] = []
    seen_in_rooms_at_disconnect: list[int] = []

    def on_recv_packet(self, packet_id: int, payload: bytes) -> None:
        room = self.rooms[payload[0]]
        if packet_id == 1:
            room.add(self)
        elif packet_id == 2:
            room.remove(self)
        elif packet_id == 3:
            room.broadcast(3, payload, exclude=self)

    def on_disconnected(self, reason: DisconnectReason) -> None:
        type(self).seen_in_rooms_at_disconnect.append(sum(self in room for room in self.rooms))


def member_class(rooms: int) -> type[Member]:
    return type("Member", (Member,), {"rooms": [Room() for _ in range(rooms)], "seen_in_rooms_at_disconnect": []})


def test_membership_and_iteration(start_server: Callable[..., Server], raw_peers: Callable[..., RawPeer]) -> None:
    server = start_server(PacketSession)
    peers = connect(server, raw_peers, count=3)
    a, b, c = (session_of(server, peer) for peer in peers)
    room = Room()
    assert len(room) == 0 and list(room) == [] and a not in room
    assert room.add(c) and room.add(a)
    assert not room.add(a), "a second add is not a new member"
    assert list(room) == [a, c]  # the order they connected, not the order they joined
    assert a in room and b not in room and len(room) == 2
    assert room.remove(a) and not room.remove(a) and not room.remove(b)
    assert list(room) == [c]
    room.clear()
    assert len(room) == 0
    assert repr(room) == "<Room of 0 sessions>"


def test_broadcast_reaches_the_members_but_the_excluded(
    start_server: Callable[..., Server], raw_peers: Callable[..., RawPeer]
) -> None:
    session_class = member_class(2)
    server = start_server(session_class)
    peers = connect(server, raw_peers, count=4)
    for peer in peers[:3]:
        peer.send(packet(1, bytes([0])))  # three join room 0
    peers[3].send(packet(1, bytes([1])))  # one joins room 1
    poll_until(server, lambda: len(session_class.rooms[0]) == 3 and len(session_class.rooms[1]) == 1)
    peers[0].send(packet(3, bytes([0]) + b"hello"))
    poll_until(server, lambda: server.stats()["packets_out"] >= 2)
    for peer in peers[1:3]:
        assert peer.recv_packet() == (3, bytes([0]) + b"hello")
    assert session_class.rooms[0].broadcast(4, b"to room 0") == 3
    assert session_class.rooms[1].broadcast(4, b"to room 1") == 1
    for peer in peers[:3]:
        assert peer.recv_packet_with_id(4) == b"to room 0"
    assert peers[3].recv_packet() == (4, b"to room 1")


def test_a_session_leaves_every_room_by_itself_before_on_disconnected(
    start_server: Callable[..., Server], raw_peers: Callable[..., RawPeer]
) -> None:
    session_class = member_class(3)
    server = start_server(session_class)
    peers = connect(server, raw_peers, count=2)
    for room in range(3):
        peers[0].send(packet(1, bytes([room])))
        peers[1].send(packet(1, bytes([room])))
    poll_until(server, lambda: all(len(room) == 2 for room in session_class.rooms))
    leaving = session_of(server, peers[0])
    peers[0].reset()
    poll_until(server, lambda: session_class.seen_in_rooms_at_disconnect == [0])
    assert all(len(room) == 1 and leaving not in room for room in session_class.rooms)
    # A session that has ended does not join again.
    assert not session_class.rooms[0].add(leaving)
    assert len(session_class.rooms[0]) == 1


def test_mass_disconnect_during_room_broadcasts_leaves_no_stale_member(
    start_server: Callable[..., Server], raw_peers: Callable[..., RawPeer]
) -> None:
    """The lecture's crash, with rooms: 300 sessions in 30 rooms vanish while a
    thread broadcasts to every room as fast as it can."""
    session_class = member_class(30)
    server = start_server(session_class)
    peers = connect(server, raw_peers, count=300)
    for n, peer in enumerate(peers):
        peer.send(packet(1, bytes([n % 30])))
        peer.send(packet(1, bytes([(n + 7) % 30])))
    poll_until(server, lambda: sum(len(room) for room in session_class.rooms) == 600)
    stop = threading.Event()
    sent = [0]

    def broadcast_forever() -> None:
        while not stop.is_set():
            for room in session_class.rooms:
                sent[0] += room.broadcast(9, b"tick")

    broadcaster = threading.Thread(target=broadcast_forever)
    broadcaster.start()
    try:
        for n, peer in enumerate(peers):
            peer.reset() if n % 2 else peer.close()
        poll_until(server, lambda: len(session_class.seen_in_rooms_at_disconnect) == 300, timeout=15)
    finally:
        stop.set()
        broadcaster.join()
    assert sent[0] > 0
    assert session_class.seen_in_rooms_at_disconnect == [0] * 300
    assert all(len(room) == 0 and list(room) == [] for room in session_class.rooms)
    assert all(room.broadcast(9, b"anyone?") == 0 for room in session_class.rooms)


def test_membership_holds_under_churn(start_server: Callable[..., Server], raw_peers: Callable[..., RawPeer]) -> None:
    """Sessions join, leave and disconnect at random; the rooms always hold
    exactly the sessions that joined and are still there."""
    session_class = member_class(5)
    server = start_server(session_class)
    rng = random.Random(11)
    alive: dict[int, RawPeer] = {}
    expected: dict[int, set[int]] = {room: set() for room in range(5)}
    for round_ in range(6):
        for peer in [raw_peers(server.port) for _ in range(30)]:
            alive[local_port(peer)] = peer
        poll_until(server, lambda: {s.peer[1] for s in server.sessions} == set(alive))
        for port, peer in list(alive.items()):
            choice = rng.random()
            room = rng.randrange(5)
            if choice < 0.5:
                peer.send(packet(1, bytes([room])))
                expected[room].add(port)
            elif choice < 0.7:
                peer.send(packet(2, bytes([room])))
                expected[room].discard(port)
            elif choice < 0.85:
                peer.reset()
                del alive[port]
                for members in expected.values():
                    members.discard(port)

        def settled() -> bool:
            return all(
                {session.peer[1] for session in session_class.rooms[room]} == members
                for room, members in expected.items()
            )

        poll_until(server, settled, message=f"round {round_}: rooms do not match")
    assert sum(len(members) for members in expected.values()) > 20, "the churn left the rooms nearly empty"


def test_ten_thousand_rooms_of_ten_and_one_room_of_ten_thousand() -> None:
    """10,000 sessions from a DummyClient in another process (this one could
    not hold both ends): one room of all of them, and 10,000 rooms of ten."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 10_500:
        pytest.skip(f"the hard limit of open files is {hard}; 10,000 sessions need more")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 20_000, hard))
    server = Server(PacketSession, "127.0.0.1", 0, max_sessions=20_000, first_packet_timeout=None)
    server.start()
    dummies = subprocess.Popen(
        [sys.executable, "-m", "servercore", "dummy-client", "--port", str(server.port), "--clients", "10000"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        poll_until(server, lambda: len(server) == 10_000, timeout=60, message=lambda: f"{len(server)} sessions")
        sessions = server.sessions
        everyone = Room()
        many_small = [Room() for _ in range(10_000)]
        for session in sessions:
            assert everyone.add(session)
        for n, room in enumerate(many_small):
            for k in range(10):
                assert room.add(sessions[(n * 10 + k) % 10_000])
        assert len(everyone) == 10_000 and all(len(room) == 10 for room in many_small)
        before = server.stats()["packets_out"]
        assert everyone.broadcast(5, b"all") == 10_000
        assert sum(room.broadcast(6, b"small") for room in many_small) == 100_000
        poll_until(server, lambda: server.stats()["packets_out"] - before >= 110_000, timeout=60,
                   message=lambda: f"{server.stats()['packets_out'] - before} of 110000 packets written")
        dummies.kill()
        dummies.wait()
        poll_until(server, lambda: len(server) == 0, timeout=60, message=lambda: f"{len(server)} sessions left")
        assert len(everyone) == 0 and all(len(room) == 0 for room in many_small)
    finally:
        if dummies.poll() is None:
            dummies.kill()
            dummies.wait()
        server.stop()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_bad_input_is_refused_at_the_call(
    start_server: Callable[..., Server], raw_peers: Callable[..., RawPeer]
) -> None:
    room = Room()
    with pytest.raises(TypeError, match="a Room holds sessions, not str"):
        room.add("player")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="this session has no connection"):
        room.add(PacketSession())
    assert "player" not in room
    one = start_server(PacketSession)
    other = start_server(PacketSession)
    (peer_one,) = connect(one, raw_peers)
    (peer_other,) = connect(other, raw_peers)
    assert room.add(session_of(one, peer_one))
    with pytest.raises(ValueError, match="a Room holds the sessions of one Server or Client"):
        room.add(session_of(other, peer_other))
    with pytest.raises(ValueError, match="max_packet_size"):
        room.broadcast(1, bytes(5000))
    assert Room().broadcast(1, b"nobody") == 0
