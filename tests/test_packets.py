"""Typed packets and routing (python/servercore/packets.py).

- A packet is declared once, as a class; every wire type round-trips.
- session.send(packet), server.broadcast(packet) and room.broadcast(packet)
  take packet objects; handlers get them decoded.
- A payload that does not match its layout (short, trailing bytes, invalid
  UTF-8, a count past its limit) closes that session MALFORMED_PACKET with
  one log line naming the peer and the packet; the handler never sees it;
  other sessions go on.
- Limits are checked before allocation, and bad values are refused at the
  call (TypeError/ValueError naming the field).
- A Router refuses a second handler for a packet; its packet_ids feed the
  server's; a session switches routers without a disconnect; async handlers
  work on a loop.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable
from typing import Annotated, ClassVar

import pytest

import servercore
from aio_support import Run
from servercore import DisconnectReason, Room, Server
from servercore.packets import (
    Fixed,
    MalformedPacket,
    Max,
    Packet,
    RoutedSession,
    Router,
    Struct,
    f32,
    f64,
    i8,
    i16,
    i32,
    i64,
    u8,
    u16,
    u32,
    u64,
)
from support import RawPeer, connect, exchange, packet, poll_until, session_of

BOTH_IO_PATHS = True


class Vec2(Struct):
    x: f32
    y: f32


class Chat(Packet, id=1):
    text: Annotated[str, Max(100)]


class Move(Packet, id=2):
    to: Vec2
    seq: u32


class Everything(Packet, id=3):
    small: u8
    medium: u16
    large: u32
    huge: u64
    tiny: i8
    short: i16
    int_: i32
    long: i64
    single: f32
    double: f64
    flag: bool
    name: str
    blob: Annotated[bytes, Max(16)]
    scores: Annotated[list[u16], Max(4)]
    color: Annotated[list[u8], Fixed(3)]
    where: Vec2
    path: list[Vec2]
    tags: list[str]


class EnterGame(Packet, id=4):
    pass


EVERYTHING = Everything(
    small=255, medium=65535, large=2**32 - 1, huge=2**64 - 1, tiny=-128, short=-32768, int_=-(2**31),
    long=-(2**63), single=1.5, double=-2.25, flag=True, name="héllo, 世界", blob=b"\x00\xff",
    scores=[1, 2, 3, 4], color=[255, 128, 0], where=Vec2(x=0.5, y=-0.5),
    path=[Vec2(x=1.0, y=2.0), Vec2(x=3.0, y=4.0)], tags=["", "a", "ünïcode"],
)


def test_every_wire_type_round_trips_and_the_layout_is_little_endian() -> None:
    payload = EVERYTHING.encode()
    assert Everything.decode(payload) == EVERYTHING
    assert payload[:3] == b"\xff\xff\xff"  # u8 255, then u16 65535 little-endian
    assert Move(to=Vec2(x=1.0, y=2.0), seq=7).encode() == struct.pack("<ffI", 1.0, 2.0, 7)
    assert Chat(text="hi").encode() == b"\x02\x00hi"
    assert EnterGame().encode() == b""


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x05\x00hi", r"Chat\.text: 5 bytes announced, 2 left"),
        (b"\x02\x00hi!", r"Chat: 1 trailing bytes"),
        (b"\x02\x00\xff\xfe", r"Chat\.text: invalid UTF-8"),
        (b"\xff\x00" + b"a" * 255, r"Chat\.text: 255 bytes, over its limit of 100"),
        (b"\x01", r"Chat\.text: no room for its count"),
    ],
)
def test_a_payload_that_does_not_match_is_malformed_naming_the_field(payload: bytes, message: str) -> None:
    with pytest.raises(MalformedPacket, match=message):
        Chat.decode(payload)


def test_a_count_past_its_limit_is_refused_before_anything_is_allocated() -> None:
    # 65535 elements announced in a 6-byte payload: refused by the limit, not by running out.
    with pytest.raises(MalformedPacket, match=r"Everything\.scores: 65535 elements, over its limit of 4"):
        # 43 bytes of fixed fields, the name (2 + 14) and the blob (2 + 2): the scores' count is next.
        Everything.decode(EVERYTHING.encode()[:63] + b"\xff\xff")
    with pytest.raises(MalformedPacket, match=r"Move\.to: Vec2\.x: 4 bytes left, the fixed fields need 8"):
        Move.decode(b"\x00" * 4)


def test_bad_values_are_refused_at_the_call_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"Chat\.text: 101 bytes, over its limit of 100"):
        Chat(text="x" * 101).encode()
    with pytest.raises(ValueError, match=r"Move\.seq: -1 is out of range 0\.\.4294967295"):
        Move(to=Vec2(x=0.0, y=0.0), seq=-1).encode()
    with pytest.raises(TypeError, match=r"Move\.seq: expected int, got str"):
        Move(to=Vec2(x=0.0, y=0.0), seq="7").encode()  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Everything\.color: 2 elements, expected 3"):
        Everything(**{**{name: getattr(EVERYTHING, name) for name in Everything.__fields__}, "color": [1, 2]}).encode()
    with pytest.raises(TypeError, match=r"Chat\(\): missing text"):
        Chat()
    with pytest.raises(TypeError, match=r"Chat\(\): no field txt"):
        Chat(text="", txt="")
    with pytest.raises(TypeError, match=r"needs its id"):
        type("NoId", (Packet,), {})
    with pytest.raises(TypeError, match=r"is not a wire type"):
        type("Bad", (Packet,), {"__annotations__": {"when": complex}}, id=9)


def test_a_router_refuses_a_second_handler_and_gives_the_servers_packet_ids() -> None:
    router = Router("lobby")
    router.on(Chat)(lambda session, packet: None)
    router.on(Move)(lambda session, packet: None)
    with pytest.raises(ValueError, match=r"lobby: packet id 1 \(Chat\) already has a handler"):
        router.on(Chat)
    assert router.packet_ids == {1, 2}
    with pytest.raises(TypeError, match="takes a Packet subclass or a protobuf message class"):
        router.on(int)  # type: ignore[arg-type]


def game_server(start_server: Callable[..., Server]) -> tuple[Server, type[RoutedSession], list[object]]:
    """A lobby that echoes chat and sends moves to everyone; EnterGame
    switches the session to the game router, which only takes moves."""
    seen: list[object] = []
    lobby, game = Router("lobby"), Router("game")
    room = Room()

    @lobby.on(Chat)
    def on_chat(session: RoutedSession, chat: Chat) -> None:
        seen.append(chat)
        session.send(Chat(text=chat.text.upper()))

    @lobby.on(EnterGame)
    def enter(session: RoutedSession, _: EnterGame) -> None:
        session.router = game
        room.add(session)

    @game.on(Move)
    def on_move(session: RoutedSession, move: Move) -> None:
        seen.append(move)
        room.broadcast(move, exclude=session)

    class Player(RoutedSession):
        router = lobby

        def on_disconnected(self, reason: DisconnectReason) -> None:
            seen.append(reason)

    server = start_server(Player, packet_ids=lobby.packet_ids | game.packet_ids)
    return server, Player, seen


def test_handlers_get_decoded_packets_and_send_packet_objects(
    start_server: Callable[..., Server], raw_peers: Callable[..., RawPeer]
) -> None:
    server, _, seen = game_server(start_server)
    (peer,) = connect(server, raw_peers)
    assert exchange(server, peer, packet(1, Chat(text="hello").encode())) == (1, Chat(text="HELLO").encode())
    assert seen == [Chat(text="hello")]
    assert server.broadcast(Move(to=Vec2(x=1.0, y=1.0), seq=1)) == 1
    assert peer.recv_packet() == (2, Move(to=Vec2(x=1.0, y=1.0), seq=1).encode())


def test_a_session_switches_routers_without_a_disconnect(
    start_server: Callable[..., Server], raw_peers: Callable[..., RawPeer]
) -> None:
    server, _, seen = game_server(start_server)
    alice, bob = connect(server, raw_peers, count=2)
    for peer in (alice, bob):
        peer.send(packet(4))
    poll_until(server, lambda: all(session.router.name == "game" for session in server.sessions))
    move = Move(to=Vec2(x=3.0, y=4.0), seq=9)
    alice.send(packet(2, move.encode()))
    poll_until(server, lambda: move in seen)
    assert bob.recv_packet() == (2, move.encode())
    # In the game router chat has no handler: that session goes, the other stays.
    alice.send(packet(1, Chat(text="hi").encode()))
    poll_until(server, lambda: DisconnectReason.MALFORMED_PACKET in seen)
    assert len(server) == 1


def test_a_malformed_payload_closes_only_its_session_with_one_log_line(
    start_server: Callable[..., Server], raw_peers: Callable[..., RawPeer], caplog: pytest.LogCaptureFixture
) -> None:
    server, _, seen = game_server(start_server)
    bad, good = connect(server, raw_peers, count=2)
    bad_session = session_of(server, bad)
    with caplog.at_level(logging.DEBUG, logger="servercore"):
        bad.send(packet(1, b"\x02\x00\xff\xfe"))
        poll_until(server, lambda: DisconnectReason.MALFORMED_PACKET in seen)
        assert bad.wait_closed(2)
        assert exchange(server, good, packet(1, Chat(text="still here").encode())) == (
            1, Chat(text="STILL HERE").encode()
        )
    assert seen[0] == DisconnectReason.MALFORMED_PACKET, "the handler saw the malformed packet"
    lines = [r for r in caplog.records if "MALFORMED_PACKET" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    message = lines[0].getMessage()
    assert f"session {bad_session.id} (127.0.0.1:" in message
    assert "Chat (id 1): Chat.text: invalid UTF-8" in message
    assert lines[0].levelno == logging.WARNING


def test_ids_outside_every_router_are_cut_in_the_engine(
    start_server: Callable[..., Server], raw_peers: Callable[..., RawPeer]
) -> None:
    server, _, seen = game_server(start_server)
    (peer,) = connect(server, raw_peers)
    peer.send(packet(99, b"?"))
    poll_until(server, lambda: seen)
    assert seen == [DisconnectReason.UNKNOWN_PACKET_ID]


def test_protobuf_messages_are_routed_by_id_too(
    start_server: Callable[..., Server], raw_peers: Callable[..., RawPeer]
) -> None:
    from google.protobuf import wrappers_pb2

    from servercore.packets import protobuf_packet

    router = Router("proto")
    got: list[object] = []
    with pytest.raises(TypeError, match="register it with id=N"):
        router.on(wrappers_pb2.StringValue)

    @router.on(wrappers_pb2.StringValue, id=5)
    def on_text(session: RoutedSession, message: wrappers_pb2.StringValue) -> None:
        got.append(message.value)
        session.send(*protobuf_packet(5, wrappers_pb2.StringValue(value=message.value[::-1])))

    class Client(RoutedSession):
        def on_disconnected(self, reason: DisconnectReason) -> None:
            got.append(reason)

    Client.router = router
    server = start_server(Client, packet_ids=router.packet_ids)
    good, bad = connect(server, raw_peers, count=2)
    reply = exchange(server, good, packet(5, wrappers_pb2.StringValue(value="hello").SerializeToString()))
    assert reply == (5, wrappers_pb2.StringValue(value="olleh").SerializeToString())
    bad.send(packet(5, b"\xff\xff"))
    poll_until(server, lambda: DisconnectReason.MALFORMED_PACKET in got)
    assert got == ["hello", DisconnectReason.MALFORMED_PACKET] and len(server) == 1


def test_async_handlers_route_on_a_loop_in_order(run: Run) -> None:
    """A router's handler may be `async def`: on a loop it runs as a task,
    and the session's next packet waits for it, as for any async callback."""
    router = Router("async")
    log: list[tuple[str, int]] = []

    @router.on(Move)
    async def on_move(session: RoutedSession, move: Move) -> None:
        log.append(("start", move.seq))
        await asyncio.sleep(0.002 * (move.seq % 3))
        log.append(("end", move.seq))
        session.send(move)

    class Mover(RoutedSession):
        pass

    Mover.router = router

    async def main() -> None:
        async with Server(Mover, "127.0.0.1", 0, packet_ids=router.packet_ids) as server:
            conn = await servercore.connect("127.0.0.1", server.port)
            for seq in range(10):
                conn.send(Move(to=Vec2(x=0.0, y=0.0), seq=seq))
            replies = [Move.decode((await conn.recv(timeout=5))[1]).seq for _ in range(10)]
            assert replies == list(range(10))
            await conn.close()

    run(main)
    assert log == [(step, seq) for seq in range(10) for step in ("start", "end")]


def test_a_packet_extending_another_encodes_all_its_fields():
    """A packet class may extend another; its codec covers every field, the
    parent's first (the parent's own one-pack encoder is not inherited)."""

    class Base(Packet, id=40):
        seq: u32

    class Named(Base, id=41):
        name: str

    class Moved(Base, id=42):
        x: f32

    assert Base(seq=7).encode() == struct.pack("<I", 7)
    named = Named(seq=7, name="ab")
    assert named.encode() == struct.pack("<IH", 7, 2) + b"ab"
    assert named.__servercore_packet__() == (41, named.encode())
    assert Moved(seq=7, x=1.5).encode() == struct.pack("<If", 7, 1.5)
    assert Named.decode(named.encode()) == named


def test_fields_may_be_called_like_the_constructors_own_names():
    class Odd(Packet, id=43):
        self: u32
        cls: u32
        extra: str

    odd = Odd(self=1, cls=2, extra="x")
    assert (odd.self, odd.cls, odd.extra) == (1, 2, "x")
    assert Odd.decode(odd.encode()) == odd
    with pytest.raises(TypeError, match=r"Odd\(\): missing extra"):
        Odd(self=1, cls=2)


def test_a_packet_class_may_write_its_own_constructor_and_encoder():
    """What the application writes in the class body (or a mixin) is kept;
    the generated code fills only what it left out."""

    class Move(Packet, id=44):
        x: f32
        seq: u32

        def __init__(self, x: float = 0.0, seq: int = 0) -> None:
            super().__init__(x=x, seq=seq)

    class Tagged(Packet, id=45):
        seq: u32

        def encode(self) -> bytes:
            return b"T" + struct.pack("<I", self.seq)

    assert Move().encode() == struct.pack("<fI", 0.0, 0)
    assert Move(1.5, 7).encode() == struct.pack("<fI", 1.5, 7)
    assert Tagged(seq=3).encode() == b"T" + struct.pack("<I", 3)
    with pytest.raises(TypeError, match=r"Move\(\): missing x, seq; no field z"):
        Packet.__init__(Move(), z=1)
    with pytest.raises(TypeError, match="names starting with _sc_ are servercore's own"):
        class Bad(Packet, id=46):  # noqa: F841
            _sc_self: u32


def test_packet_objects_keep_their_fields_in_slots():
    """A packet has no instance dict: its fields are slots (which the
    engine's decoder fills, rust/bindings/packet_layout.rs), and a class's
    own __setattr__ is still honoured when it decodes."""
    move = Move.decode(Move(to=Vec2(x=1.0, y=2.0), seq=3).encode())
    assert Move.__slots__ == ("to", "seq") and Vec2.__slots__ == ("x", "y")
    assert not hasattr(move, "__dict__")
    with pytest.raises(AttributeError):
        move.speed = 1  # type: ignore[attr-defined]

    class Logged(Packet, id=47):
        seq: u32
        kind: ClassVar[str] = "logged"  # a class attribute, not a field or a slot

        def __setattr__(self, name: str, value: object) -> None:
            stores.append(name)
            super().__setattr__(name, value)

    stores: list[str] = []
    assert Logged.__slots__ == ("seq",)
    assert Logged.decode(struct.pack("<I", 9)).seq == 9
    assert stores == ["seq"], "a class's own __setattr__ is honoured by the decoder"


def routed_echo(start_server: Callable[..., Server], session_class: type[RoutedSession]) -> Server:
    return start_server(session_class, packet_ids=session_class.router.packet_ids)


def test_a_routed_class_that_overrides_on_recv_packet_routes_through_super(
    start_server: Callable[..., Server], raw_peers: Callable[..., RawPeer]
) -> None:
    """The engine routes by itself only for a class that keeps
    RoutedSession.on_recv_packet; an override is called as any callback,
    and super() routes the same way, malformed payloads included."""
    router = Router("echo")
    seen: list[object] = []

    @router.on(Chat)
    def on_chat(session: RoutedSession, chat: Chat) -> None:
        session.send(chat)

    class Logging(RoutedSession):
        def on_recv_packet(self, packet_id: int, payload: bytes) -> None:
            seen.append(packet_id)
            return super().on_recv_packet(packet_id, payload)

        def on_disconnected(self, reason: DisconnectReason) -> None:
            seen.append(reason)

    Logging.router = router
    server = routed_echo(start_server, Logging)
    good, bad = connect(server, raw_peers, count=2)
    assert exchange(server, good, packet(1, Chat(text="hi").encode())) == (1, Chat(text="hi").encode())
    bad.send(packet(1, b"\x09\x00"))
    poll_until(server, lambda: DisconnectReason.MALFORMED_PACKET in seen)
    assert seen == [1, 1, DisconnectReason.MALFORMED_PACKET] and len(server) == 1


def test_a_router_that_is_not_a_router_is_a_callback_error(
    start_server: Callable[..., Server], raw_peers: Callable[..., RawPeer], caplog: pytest.LogCaptureFixture
) -> None:
    router = Router("fine")
    reasons: list[DisconnectReason] = []

    @router.on(Chat)
    def on_chat(session: RoutedSession, chat: Chat) -> None:
        if chat.text == "break":
            session.router = {"not": "a router"}  # type: ignore[assignment]
        session.send(chat)

    class Player(RoutedSession):
        def on_disconnected(self, reason: DisconnectReason) -> None:
            reasons.append(reason)

    Player.router = router
    server = routed_echo(start_server, Player)
    with caplog.at_level(logging.ERROR, logger="servercore"):
        broken, fine = connect(server, raw_peers, count=2)
        broken.send(packet(1, Chat(text="break").encode()) + packet(1, Chat(text="x").encode()))
        poll_until(server, lambda: reasons)
        assert exchange(server, fine, packet(1, Chat(text="ok").encode())) == (1, Chat(text="ok").encode())
    assert reasons == [DisconnectReason.CALLBACK_ERROR]
    errors = [str(r.exc_info[1]) for r in caplog.records if r.exc_info]
    assert len(errors) == 1 and errors[0].endswith("Player.router must be a servercore.packets.Router, got dict"), errors


def test_a_handler_may_register_routes_while_packets_are_routed(
    start_server: Callable[..., Server], raw_peers: Callable[..., RawPeer]
) -> None:
    """Routes are only added; a handler adding one mid-dispatch sees it used
    for the session's next packet (sent in the same segment)."""
    router = Router("growing")
    got: list[object] = []

    @router.on(EnterGame)
    def enter(session: RoutedSession, _: EnterGame) -> None:
        got.append("enter")

        @router.on(Chat)
        def on_chat(session: RoutedSession, chat: Chat) -> None:
            got.append(chat.text)

    class Player(RoutedSession):
        pass

    Player.router = router
    server = start_server(Player, packet_ids={1, 4})
    (peer,) = connect(server, raw_peers)
    peer.send(packet(4) + packet(1, Chat(text="now").encode()))
    poll_until(server, lambda: len(got) == 2)
    assert got == ["enter", "now"] and len(server) == 1


class Nested(Packet, id=48):
    where: Vec2
    tags: list[str]
    scores: Annotated[list[u16], Max(3)]
    color: Annotated[list[u8], Fixed(3)]
    blob: bytes


NESTED_OK = dict(where=Vec2(x=1.0, y=2.0), tags=["a"], scores=[1], color=[1, 2, 3], blob=b"")


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (dict(where=(1.0, 2.0)), TypeError, r"Nested\.where: expected Vec2, got tuple"),
        (dict(where=Vec2(x="s", y=0.0)), TypeError, r"Nested\.where: Vec2\.x: expected float, got str"),
        (dict(where=Vec2(x=1e39, y=0.0)), ValueError, r"Nested\.where: Vec2\.x: 1e\+39 is too large for f32"),
        (dict(tags=["a", 5]), TypeError, r"Nested\.tags\[1\]: expected str, got int"),
        (dict(scores=[1, 70000]), ValueError, r"Nested\.scores\[1\]: 70000 is out of range 0\.\.65535"),
        (dict(scores=[1, 2, 3, 4]), ValueError, r"Nested\.scores: 4 elements, over its limit of 3"),
        (dict(color=[1, 2, 300]), ValueError, r"Nested\.color\[2\]: 300 is out of range 0\.\.255"),
        (dict(blob="text"), TypeError, r"Nested\.blob: expected bytes, got str"),
    ],
)
def test_the_engine_encoder_names_the_field_and_element_at_fault(
    bad: dict[str, object], error: type[Exception], message: str
) -> None:
    packet = Nested(**{**NESTED_OK, **bad})  # type: ignore[arg-type]
    with pytest.raises(error, match=message):
        packet.encode()
    with pytest.raises(error, match=message):
        packet.__servercore_packet__()


def test_bytes_fields_take_any_buffer_and_a_packet_made_without_init_says_what_is_missing() -> None:
    assert Nested(**{**NESTED_OK, "blob": bytearray(b"ab")}).encode().endswith(b"\x02\x00ab")  # type: ignore[arg-type]
    with pytest.raises(AttributeError, match=r"Nested\.where is not set"):
        Nested.__new__(Nested).encode()
    with pytest.raises(TypeError, match="expected Nested, got Chat"):
        Nested._packet_layout.encode(Chat(text="x"))


def test_a_sent_packet_is_encoded_by_its_layout_unless_the_class_encodes_itself(
    start_server: Callable[..., Server], raw_peers: Callable[..., RawPeer]
) -> None:
    class Tagged(Packet, id=49):
        seq: u32

        def encode(self) -> bytes:
            return b"T" + struct.pack("<I", self.seq)

    class Plain(Tagged, id=50):
        pass

    assert Tagged.__servercore_layout__ is None and Chat.__servercore_layout__ is Chat._packet_layout
    server = start_server(servercore.PacketSession)
    (peer,) = connect(server, raw_peers)
    (session,) = server.sessions
    session.send(Chat(text="hi"))
    session.send(Tagged(seq=1))
    session.send(Plain(seq=2))
    assert peer.recv_packet() == (1, b"\x02\x00hi")
    assert peer.recv_packet() == (49, b"T" + struct.pack("<I", 1))
    assert peer.recv_packet() == (50, b"T" + struct.pack("<I", 2)), "the parent's own encode is inherited"


def test_classes_a_packet_cannot_be_are_refused_when_defined():
    """What decoding could not make safely is refused at the class statement,
    naming the class and the field."""
    with pytest.raises(TypeError, match=r"D: a packet or struct class cannot also extend dict"):
        class D(Packet, dict, id=51):  # noqa: F841 - a built-in base's memory would not be set up
            x: u8
    with pytest.raises(TypeError, match=r"Defaulted\.x: a field takes no value in the class body"):
        class Defaulted(Packet, id=52):  # noqa: F841
            x: u8 = 0


def test_decode_takes_buffers_only_and_an_empty_packet_has_an_exact_length():
    assert EnterGame.decode(memoryview(b"")) == EnterGame()
    assert Chat.decode(bytearray(b"\x02\x00hi")) == Chat(text="hi")
    with pytest.raises(MalformedPacket, match=r"EnterGame: 3 bytes, its layout has 0"):
        EnterGame.decode(b"abc")
    with pytest.raises(TypeError, match="bytes-like"):
        Chat.decode(5)  # type: ignore[arg-type]


def test_a_router_subclass_may_take_its_own_arguments_and_be_renamed():
    class OwnedRouter(Router):
        def __init__(self, owner: object, name: str = "owned") -> None:
            super().__init__(name)
            self.owner = owner

    class Lobby(Router):
        def __init__(self) -> None:
            super().__init__("lobby")

    zone = object()
    router = OwnedRouter(zone, name="lobby")
    assert (router.name, router.owner) == ("lobby", zone)
    assert (OwnedRouter(zone).name, Lobby().name, Router().name) == ("owned", "lobby", "router")
    with pytest.raises(TypeError, match="nmae"):
        Router(nmae="x")  # type: ignore[call-arg]
    router.name = "hall"
    router.on(Chat)(lambda session, chat: None)
    with pytest.raises(ValueError, match=r"hall: packet id 1 \(Chat\) already has a handler"):
        router.on(Chat)


def test_the_encoder_trusts_an_objects_real_type_not_its_claimed_class():
    """isinstance() believes a `__class__` that lies (Mock(spec=...)); the
    encoder reads fields at the class's slot offsets, so it checks the real
    type, and a subclass's own attribute hooks are honoured."""
    from unittest.mock import Mock

    with pytest.raises(TypeError, match=r"Move\.to: expected Vec2, got Mock"):
        Move(to=Mock(spec=Vec2), seq=1).encode()  # type: ignore[arg-type]

    class Scaled(Vec2):
        @property  # type: ignore[misc]
        def x(self) -> float:  # a subclass may compute a field
            return 8.0

    scaled = Vec2.__new__(Scaled)
    scaled.y = 2.0
    assert Move(to=scaled, seq=1).encode() == struct.pack("<ffI", 8.0, 2.0, 1)

    class Shown(Packet, id=53):
        seq: u8

        def __getattribute__(self, name: str) -> object:
            return 9 if name == "seq" else super().__getattribute__(name)

    assert Shown(seq=1).encode() == b"\x09"


def test_a_list_that_changes_while_encoded_is_refused_not_sent_with_a_wrong_count():
    class Growing:
        def __init__(self, items: list[object]) -> None:
            self.items = items

        def __index__(self) -> int:
            self.items.append(1)
            return 1

    class Liar(list):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return 1

    items: list[object] = []
    items += [Growing(items), 2]
    with pytest.raises(ValueError, match=r"Everything\.scores: changed while being encoded: len\(\) was 2"):
        Everything(**{**fields_of(EVERYTHING), "scores": items}).encode()
    with pytest.raises(ValueError, match=r"Everything\.scores: changed while being encoded: len\(\) was 1"):
        Everything(**{**fields_of(EVERYTHING), "scores": Liar([1, 2, 3])}).encode()


def test_encoding_errors_name_the_field_and_keep_the_applications_own():
    class Boom:
        def __index__(self) -> int:
            raise RuntimeError("boom")

    def everything(**changed: object) -> Everything:
        return Everything(**{**fields_of(EVERYTHING), **changed})  # type: ignore[arg-type]

    with pytest.raises(RuntimeError, match="boom"):
        everything(small=Boom()).encode()
    with pytest.raises(ValueError, match=r"Everything\.double: 1797693134862315907729\d*\.\.\. \(309 characters\) is too large for f64"):
        everything(double=2**1024).encode()
    with pytest.raises(TypeError, match=r"Everything\.blob: expected bytes, got int"):
        everything(blob=3).encode()
    with pytest.raises(TypeError, match=r"Everything\.scores: expected a list, got int"):
        everything(scores=5).encode()
    assert everything(blob=memoryview(b"ab")).encode() == everything(blob=b"ab").encode()


def test_a_class_with_its_own_python_new_still_decodes_and_defining_one_makes_no_instance():
    made: list[str] = []

    class Tracked(Packet, id=54):
        seq: u8

        def __new__(cls, *args: object, **kwargs: object) -> Tracked:
            made.append("new")
            return super().__new__(cls)

        def __del__(self) -> None:
            made.append("del")

    assert made == [], "defining the class made an instance"
    assert Tracked.decode(b"\x05").seq == 5  # as pickle does: __new__ is not called


def fields_of(packet: Struct) -> dict[str, object]:
    return {name: getattr(packet, name) for name in type(packet).__fields__}
