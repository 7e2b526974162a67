"""The package is a thin, typed facade: its names, its stubs and its enum agree
with the native module they describe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import servercore
from servercore import DisconnectReason, _core

PACKAGE = Path(servercore.__file__).parent


def test_every_public_name_is_exported_and_importable():
    assert set(servercore.__all__) >= {
        "PacketSession", "Session", "Server", "Client", "SendBuffer", "DisconnectReason",
    }
    for name in servercore.__all__:
        assert getattr(servercore, name) is not None


def test_disconnect_reason_mirrors_the_engines_reasons():
    assert [(reason.value, reason.name) for reason in DisconnectReason] == _core.DISCONNECT_REASONS


def test_only_peer_and_code_faults_count_as_faults():
    faults = {reason for reason in DisconnectReason if reason.is_fault}
    routine = set(DisconnectReason) - faults
    assert routine == {
        DisconnectReason.CLOSED_BY_PEER,
        DisconnectReason.RESET,
        DisconnectReason.CLOSED_LOCALLY,
        DisconnectReason.SERVER_SHUTDOWN,
    }
    assert str(DisconnectReason.INVALID_HEADER) == "INVALID_HEADER"


def test_the_package_is_marked_typed():
    assert (PACKAGE / "py.typed").is_file()
    assert (PACKAGE / "_core.pyi").is_file()


def test_the_hand_written_stub_matches_the_runtime_module():
    result = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "servercore._core"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_package_type_checks_strictly_against_its_stub():
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(PACKAGE)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


USER_CODE = '''
from __future__ import annotations

import asyncio
from collections.abc import Callable

from typing import Annotated

import servercore
from servercore import Connection, DisconnectReason, Disconnected, PacketSession, Room, Server
from servercore.packets import Max, Packet, RoutedSession, Router, Struct, f32, u32
from servercore.testing import TestClient


class Lobby(PacketSession):
    async def on_connected(self) -> None:
        await asyncio.sleep(0)

    async def on_recv_packet(self, packet_id: int, payload: bytes) -> None:
        self.send(packet_id, payload)

    def on_disconnected(self, reason: DisconnectReason) -> None:
        pass


async def bot(port: int) -> bytes:
    conn: Connection = await servercore.connect("127.0.0.1", port, connect_timeout=2.0)
    async with conn:
        conn.send(1, b"hi")
        try:
            packet_id, payload = await conn.recv(timeout=5)
        except Disconnected as ended:
            return ended.reason.name.encode()
        async for other_id, other in conn:
            print(other_id, other)
        return await conn.expect_packet(packet_id, timeout=1.0) + payload


async def main() -> None:
    async with Server(Lobby, "127.0.0.1", 0, max_pending_recv_bytes=65536) as server:
        await asyncio.gather(server.serve_forever(), bot(server.port))


class Vec2(Struct):
    x: f32
    y: f32


class Move(Packet, id=2):
    to: Vec2
    seq: u32
    note: Annotated[str, Max(20)]


router = Router("game")
world = Room()


@router.on(Move)
def on_move(session: RoutedSession, move: Move) -> None:
    world.broadcast(Move(to=Vec2(x=move.to.x, y=1.0), seq=move.seq + 1, note="ok"), exclude=session)
    session.send(move)


def test_lobby(servercore_server: Callable[..., Server], servercore_client: Callable[..., TestClient]) -> None:
    client = servercore_client(servercore_server(Lobby))
    client.send(1, b"x")
    assert client.expect_packet(1) == b"x"
    assert client.expect_disconnect(timeout=0.1) is DisconnectReason.CLOSED_BY_PEER
'''


def test_user_code_with_async_callbacks_connect_and_the_fixtures_type_checks_strictly(tmp_path: Path):
    (tmp_path / "user_code.py").write_text(USER_CODE)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(tmp_path / "user_code.py")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_packet_field_of_the_wrong_type_is_a_type_error(tmp_path: Path):
    (tmp_path / "user_code.py").write_text(USER_CODE + '\nbad = Move(to=Vec2(x=1.0, y=2.0), seq="7", note="x")\n')
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(tmp_path / "user_code.py")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 1, result.stdout
    assert 'Argument "seq" to "Move" has incompatible type "str"; expected "int"' in result.stdout, result.stdout
