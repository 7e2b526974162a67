"""`servercore gen` (python/servercore/gen.py): one packet definition, every side.

- A TOML definition, or a Python module of Packet classes, becomes a Python
  module (with its .pyi) and a C# file with the same layouts, ids and a
  handler table.
- The C# side is proven with Mono's compiler: a client built from the
  generated file talks to a real servercore server over loopback and
  round-trips every field type both ways.
- Generating again gives the same files; ids are the definition's own.
- A definition that is not a layout is refused with a message naming it.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from servercore import Server
from servercore.packets import MalformedPacket, RoutedSession, Router

DEFINITION = """
[struct.Vec2]
x = "f32"
y = "f32"

[packet.Chat]
id = 1
text = "str max 200"

[packet.Everything]
id = 3
small = "u8"
medium = "u16"
large = "u32"
huge = "u64"
tiny = "i8"
short = "i16"
int_ = "i32"
long = "i64"
single = "f32"
double = "f64"
flag = "bool"
name = "str"
blob = "bytes max 16"
scores = "list[u16] max 4"
color = "u8[3]"
where = "Vec2"
path = "list[Vec2]"
tags = "list[str]"
"""


def generate(tmp_path: Path, definition: str = DEFINITION, name: str = "protocol.toml") -> Path:
    source = tmp_path / name
    source.write_text(definition)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "servercore", "gen", str(source), "-o", str(out)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return out


def load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def everything(protocol: Any) -> Any:
    return protocol.Everything(
        small=255, medium=65535, large=2**32 - 1, huge=2**64 - 1, tiny=-128, short=-32768, int_=-(2**31),
        long=-(2**63), single=1.5, double=-2.25, flag=True, name="héllo, 世界", blob=b"\x00\xff",
        scores=[1, 2, 3, 4], color=[255, 128, 0], where=protocol.Vec2(x=0.5, y=-0.5),
        path=[protocol.Vec2(x=1.0, y=2.0), protocol.Vec2(x=3.0, y=4.0)], tags=["", "a", "ünïcode"],
    )


def test_a_toml_definition_becomes_a_python_module_with_its_stub(tmp_path: Path) -> None:
    out = generate(tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["Protocol.cs", "protocol.py", "protocol.pyi"]
    protocol = load(out / "protocol.py")
    assert protocol.Chat.packet_id == 1 and protocol.Everything.packet_id == 3
    assert [p.__name__ for p in protocol.PACKETS] == ["Chat", "Everything"]
    packet = everything(protocol)
    assert protocol.Everything.decode(packet.encode()) == packet
    stub = (out / "protocol.pyi").read_text()
    assert "def __init__(self, *, text: str) -> None: ..." in stub
    result = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(out / "protocol.pyi")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout


def test_generating_again_gives_the_same_files_and_the_same_ids(tmp_path: Path) -> None:
    first = {p.name: p.read_text() for p in generate(tmp_path).iterdir()}
    second = {p.name: p.read_text() for p in generate(tmp_path).iterdir()}
    assert first == second
    # A packet added in front keeps the others' ids: they are the definition's own.
    reordered = "[packet.Ping]\nid = 9\n\n" + DEFINITION
    third = generate(tmp_path, reordered)
    assert "class Chat(Packet, id=1):" in (third / "protocol.py").read_text()
    assert "public const ushort Id = 3;" in (third / "Protocol.cs").read_text()


def test_a_python_module_of_packet_classes_is_a_definition_too(tmp_path: Path) -> None:
    module = tmp_path / "game_packets.py"
    module.write_text(textwrap.dedent("""
        from typing import Annotated
        from servercore.packets import Max, Packet, Struct, f32, u32

        class Vec2(Struct):
            x: f32
            y: f32

        class Move(Packet, id=2):
            to: Vec2
            seq: u32
            note: Annotated[str, Max(20)]
    """))
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "servercore", "gen", str(module), "-o", str(out)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    generated = (out / "game_packets_generated.py").read_text()
    assert "class Move(Packet, id=2):\n    to: Vec2\n    seq: u32\n    note: Annotated[str, Max(20)]" in generated
    assert "public const ushort Id = 2;" in (out / "GamePacketsGenerated.cs").read_text()


@pytest.mark.parametrize(
    ("definition", "message"),
    [
        ("[packet.A]\nid = 1\n[packet.B]\nid = 1\n", "packet id 1 is used by both A and B"),
        ("[packet.A]\nid = 1\nx = \"u33\"\n", "protocol.toml: packet.A.x: unknown type 'u33'"),
        ("[packet.A]\nx = \"u8\"\n", "packet.A: needs id = 0..65535, got None"),
        ("[packet.A]\nid = 1\nx = \"u8 max 3\"\n", "max applies to str, bytes and list, not u8"),
        ("[packet.A]\nid = 1\nx = \"list[list[u8]]\"\n", "lists of lists are not a wire type"),
        ("[thing.A]\n", "unknown table(s) ['thing']"),
    ],
)
def test_a_definition_that_is_not_a_layout_is_refused(tmp_path: Path, definition: str, message: str) -> None:
    source = tmp_path / "protocol.toml"
    source.write_text(definition)
    result = subprocess.run([sys.executable, "-m", "servercore", "gen", str(source), "-o", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr, result.stderr


CSHARP_CLIENT = r"""
using System;
using System.Collections.Generic;
using System.Net.Sockets;
using Protocol;

class Program
{
    static byte[] ReadExactly(NetworkStream stream, int count)
    {
        var buffer = new byte[count];
        int got = 0;
        while (got < count)
        {
            int n = stream.Read(buffer, got, count - got);
            if (n == 0) throw new Exception("the server closed after " + got + " of " + count + " bytes");
            got += n;
        }
        return buffer;
    }

    static void Same(string field, object a, object b)
    {
        if (!a.Equals(b)) throw new Exception(field + ": sent " + a + ", got back " + b);
    }

    static int Main(string[] args)
    {
        var sent = new Everything {
            small = 255, medium = 65535, large = 4294967295, huge = 18446744073709551615, tiny = -128,
            @short = -32768, int_ = -2147483648, @long = -9223372036854775808, single = 1.5f, @double = -2.25,
            flag = true, name = "héllo, 世界", blob = new byte[] { 0, 255 },
            scores = new List<ushort> { 1, 2, 3, 4 }, color = new byte[] { 255, 128, 0 },
            where = new Vec2 { x = 0.5f, y = -0.5f },
            path = new List<Vec2> { new Vec2 { x = 1, y = 2 }, new Vec2 { x = 3, y = 4 } },
            tags = new List<string> { "", "a", "ünïcode" },
        };
        using (var client = new TcpClient("127.0.0.1", int.Parse(args[0])))
        {
            var stream = client.GetStream();
            var bytes = Wire.Encode(sent);
            stream.Write(bytes, 0, bytes.Length);
            Everything got = null;
            string verdict = null;
            var handler = new PacketHandler();
            handler.OnEverything(p => got = p);
            handler.OnChat(p => verdict = p.text);
            while (got == null || verdict == null)
            {
                var head = ReadExactly(stream, 4);
                int size = head[0] | head[1] << 8;
                ushort id = (ushort)(head[2] | head[3] << 8);
                if (!handler.Dispatch(id, ReadExactly(stream, size - 4))) throw new Exception("unexpected packet " + id);
            }
            Console.WriteLine("server: " + verdict);
            Same("small", sent.small, got.small); Same("medium", sent.medium, got.medium);
            Same("large", sent.large, got.large); Same("huge", sent.huge, got.huge);
            Same("tiny", sent.tiny, got.tiny); Same("short", sent.@short, got.@short);
            Same("int_", sent.int_, got.int_); Same("long", sent.@long, got.@long);
            Same("single", sent.single, got.single); Same("double", sent.@double, got.@double);
            Same("flag", sent.flag, got.flag); Same("name", sent.name, got.name);
            Same("blob", Convert.ToBase64String(sent.blob), Convert.ToBase64String(got.blob));
            Same("scores", string.Join(",", sent.scores), string.Join(",", got.scores));
            Same("color", Convert.ToBase64String(sent.color), Convert.ToBase64String(got.color));
            Same("where.x", sent.where.x, got.where.x); Same("where.y", sent.where.y, got.where.y);
            Same("path", sent.path.Count, got.path.Count);
            for (int i = 0; i < sent.path.Count; i++) { Same("path.x", sent.path[i].x, got.path[i].x); Same("path.y", sent.path[i].y, got.path[i].y); }
            Same("tags", string.Join("|", sent.tags), string.Join("|", got.tags));
            Console.WriteLine("ROUNDTRIP OK");
        }
        return 0;
    }
}
"""


def test_a_generated_csharp_client_round_trips_every_field_type_with_a_real_server(tmp_path: Path) -> None:
    mcs, mono = shutil.which("mcs"), shutil.which("mono")
    assert mcs and mono, "Mono's C# compiler is missing: scripts/test.sh installs it (apt-get install mono-mcs)"
    out = generate(tmp_path)
    protocol = load(out / "protocol.py")
    (tmp_path / "Program.cs").write_text(CSHARP_CLIENT)
    built = subprocess.run([mcs, "-out:" + str(tmp_path / "client.exe"), str(out / "Protocol.cs"),
                            str(tmp_path / "Program.cs")], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stdout + built.stderr

    expected = everything(protocol)
    router = Router()
    verdicts: list[str] = []

    @router.on(protocol.Everything)
    def on_everything(session: RoutedSession, packet: Any) -> None:
        verdict = "the same" if packet == expected else f"DIFFERENT: {packet!r}"
        verdicts.append(verdict)
        session.send(packet)  # re-encoded by the Python side
        session.send(protocol.Chat(text=verdict))

    class Endpoint(RoutedSession):
        pass

    Endpoint.router = router
    server = Server(Endpoint, "127.0.0.1", 0, packet_ids=router.packet_ids)
    server.start()
    try:
        client = subprocess.Popen([mono, str(tmp_path / "client.exe"), str(server.port)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while client.poll() is None and time.monotonic() < deadline:
            server.poll(0.05)
        if client.poll() is None:
            client.kill()
        stdout, stderr = client.communicate(timeout=10)
    finally:
        server.stop()
    assert verdicts == ["the same"], verdicts
    assert client.returncode == 0, stdout + stderr
    assert stdout.splitlines() == ["server: the same", "ROUNDTRIP OK"], stdout + stderr


def test_the_generated_python_classes_check_what_they_encode_and_decode(tmp_path: Path) -> None:
    protocol = load(generate(tmp_path) / "protocol.py")
    with pytest.raises(ValueError, match=r"Chat\.text: 201 bytes, over its limit of 200"):
        protocol.Chat(text="x" * 201).encode()
    with pytest.raises(MalformedPacket, match=r"Everything\.tags"):
        protocol.Everything.decode(everything(protocol).encode()[:-1])
