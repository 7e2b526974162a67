"""(f) Typed packets: encoding and decoding one packet with the toolkit's
generated codecs (python/servercore/packets.py), side by side with what a
studio writes by hand (struct) and with protobuf, for the same fields. No
sockets. Two shapes: a move (three fixed-width fields, the hot packet of a
game) and a chat line (a string and a list of u32 ids). Encoding starts
from values already at hand: the packet object, the protobuf message, the
values for struct; what building a packet object costs is its own group."""

from __future__ import annotations

import struct
from typing import Annotated, Any

import pytest
from google.protobuf import struct_pb2

from servercore.packets import Max, Packet, f32, u32

CALIBRATION = pytest.mark.benchmark(min_time=0.0001, warmup=True, warmup_iterations=10_000)


class Move(Packet, id=2):
    x: f32
    y: f32
    seq: u32


class Chat(Packet, id=1):
    text: Annotated[str, Max(200)]
    to: Annotated[list[u32], Max(16)]


MOVE = struct.Struct("<ffI")
TEXT = "hello, everyone in the room"
TO = [7, 8, 9, 10]


def chat_by_hand(text: str, to: list[int]) -> bytes:
    raw = text.encode()
    return struct.pack(f"<H{len(raw)}sH{len(to)}I", len(raw), raw, len(to), *to)


def chat_from_hand(payload: bytes) -> tuple[str, list[int]]:
    (n,) = struct.unpack_from("<H", payload)
    text = payload[2:2 + n].decode()
    (m,) = struct.unpack_from("<H", payload, 2 + n)
    return text, list(struct.unpack_from(f"<{m}I", payload, 4 + n))


def chat_protobuf() -> Any:
    message = struct_pb2.Struct()
    message.update({"text": TEXT, "to": TO})
    return message


@CALIBRATION
def test_encode_move_servercore(benchmark: Any) -> None:
    benchmark.group = "encode: move (f32, f32, u32)"
    payload = benchmark(Move(x=1.5, y=-2.0, seq=7).encode)
    assert payload == MOVE.pack(1.5, -2.0, 7)


@CALIBRATION
def test_build_move_servercore(benchmark: Any) -> None:
    benchmark.group = "build: a move object"
    move = benchmark(lambda: Move(x=1.5, y=-2.0, seq=7))
    assert (move.x, move.y, move.seq) == (1.5, -2.0, 7)


@CALIBRATION
def test_build_move_tuple(benchmark: Any) -> None:
    benchmark.group = "build: a move object"
    assert benchmark(lambda: (1.5, -2.0, 7)) == (1.5, -2.0, 7)


@CALIBRATION
def test_encode_move_struct(benchmark: Any) -> None:
    benchmark.group = "encode: move (f32, f32, u32)"
    assert benchmark(MOVE.pack, 1.5, -2.0, 7) == Move(x=1.5, y=-2.0, seq=7).encode()


@CALIBRATION
def test_decode_move_servercore(benchmark: Any) -> None:
    benchmark.group = "decode: move (f32, f32, u32)"
    move = benchmark(Move.decode, MOVE.pack(1.5, -2.0, 7))
    assert (move.x, move.y, move.seq) == (1.5, -2.0, 7)


@CALIBRATION
def test_decode_move_struct(benchmark: Any) -> None:
    benchmark.group = "decode: move (f32, f32, u32)"
    assert benchmark(MOVE.unpack, MOVE.pack(1.5, -2.0, 7)) == (1.5, -2.0, 7)


@CALIBRATION
def test_encode_chat_servercore(benchmark: Any) -> None:
    benchmark.group = "encode: chat (str, list[u32])"
    assert benchmark(Chat(text=TEXT, to=TO).encode) == chat_by_hand(TEXT, TO)


@CALIBRATION
def test_encode_chat_struct(benchmark: Any) -> None:
    benchmark.group = "encode: chat (str, list[u32])"
    assert benchmark(chat_by_hand, TEXT, TO) == Chat(text=TEXT, to=TO).encode()


@CALIBRATION
def test_encode_chat_protobuf(benchmark: Any) -> None:
    benchmark.group = "encode: chat (str, list[u32])"
    message = chat_protobuf()
    assert len(benchmark(message.SerializeToString)) > 0


@CALIBRATION
def test_decode_chat_servercore(benchmark: Any) -> None:
    benchmark.group = "decode: chat (str, list[u32])"
    chat = benchmark(Chat.decode, chat_by_hand(TEXT, TO))
    assert (chat.text, chat.to) == (TEXT, TO)


@CALIBRATION
def test_decode_chat_struct(benchmark: Any) -> None:
    benchmark.group = "decode: chat (str, list[u32])"
    assert benchmark(chat_from_hand, chat_by_hand(TEXT, TO)) == (TEXT, TO)


@CALIBRATION
def test_decode_chat_protobuf(benchmark: Any) -> None:
    benchmark.group = "decode: chat (str, list[u32])"
    data = chat_protobuf().SerializeToString()
    message = benchmark(struct_pb2.Struct.FromString, data)
    assert message["text"] == TEXT
