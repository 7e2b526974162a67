"""The README's quick-start example runs as written (on port 0, for a bounded
time, with a player that chats and then sends a malformed MOVE)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"

PLAYER = '''
import socket, struct, threading, time
def player():
    time.sleep(0.3)
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(struct.pack("<HH", 9, CHAT) + b"hello")
        s.sendall(struct.pack("<HH", 6, MOVE) + b"xy")  # a MOVE must carry 8 bytes
        time.sleep(0.5)
threading.Thread(target=player, daemon=True).start()
'''


def test_the_quick_start_game_server_runs_and_kicks_a_bad_move():
    example = re.search(r"A game server is a session class and a loop:\n\n```python\n(.*?)```", README.read_text(), re.S)
    assert example, "the README lost its example"
    code = example.group(1)
    assert '"127.0.0.1", 7777' in code and "server.run_forever()" in code and "with server:" in code
    code = code.replace('"127.0.0.1", 7777', '"127.0.0.1", 0')
    code = code.replace("with server:", PLAYER + "server.call_later(1.5, server.stop)\nwith server:")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert re.search(r"session 1 \('127\.0\.0\.1', \d+\) left: CLOSED_LOCALLY", result.stdout), result.stdout


ECHO_PEER = '''
import socket, threading
def peer():
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"hello")
        got = b""
        while len(got) < 5:
            got += s.recv(100)
        print("echoed", got)
    server.stop()  # from this thread, while run_forever() runs on the main one
threading.Thread(target=peer, daemon=True).start()
'''


def test_the_raw_echo_server_echoes_bytes_as_they_are():
    example = re.search(r"An echo server:\n\n```python\n(.*?)```", README.read_text(), re.S)
    assert example, "the README lost its raw echo example"
    code = example.group(1)
    assert '"127.0.0.1", 7000' in code and "server.run_forever()" in code
    code = code.replace('"127.0.0.1", 7000', '"127.0.0.1", 0')
    code = code.replace("    server.run_forever()", ECHO_PEER.replace("\n", "\n    ") + "\n    server.run_forever()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "echoed b'hello'" in result.stdout, result.stdout


LOBBY_PEER = '''
async def main() -> None:
    async with Server(Lobby, "127.0.0.1", 0) as server:
        serving = asyncio.create_task(server.serve_forever())
        conns = [await servercore.connect("127.0.0.1", server.port) for _ in range(3)]
        for n, conn in enumerate(conns):
            conn.send(1, b"player%d" % n)
        for n, conn in enumerate(conns):
            print(await conn.recv(timeout=5))
        for conn in conns:
            await conn.close()
        serving.cancel()
        try:
            await serving
        except asyncio.CancelledError:
            print("cancelled; running:", server.running)
'''


def test_the_asyncio_example_serves_async_handlers():
    example = re.search(r"any\nof them may be `async def`:\n\n```python\n(.*?)```", README.read_text(), re.S)
    assert example, "the README lost its asyncio example"
    code = example.group(1)
    assert "async def main() -> None:\n" in code and "await server.serve_forever()" in code
    code = "import servercore\n" + code.replace(code[code.index("async def main"):code.index("asyncio.run(main())")], LOBBY_PEER)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "(1, b'profile of player0')",
        "(1, b'profile of player1')",
        "(1, b'profile of player2')",
        "cancelled; running: False",
    ], result.stdout


def test_the_example_test_of_the_pytest_plugin_passes(tmp_path: Path):
    """The plugin is found through its entry point, as in a user's project."""
    example = re.search(r"`expect_disconnect\(\)`\. Everything is stopped when the test ends:\n\n```python\n(.*?)```",
                        README.read_text(), re.S)
    assert example, "the README lost its pytest plugin example"
    (tmp_path / "test_example.py").write_text(example.group(1))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_example.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout, result.stdout


TYPED_DRIVER = '''
import socket, struct, time
def frame(packet_id, payload=b""):
    return struct.pack("<HH", 4 + len(payload), packet_id) + payload
def read_packet(sock):
    head = b""
    while len(head) < 4:
        head += sock.recv(4 - len(head))
    size, packet_id = struct.unpack("<HH", head)
    body = b""
    while len(body) < size - 4:
        body += sock.recv(size - 4 - len(body))
    return packet_id, body
with server:
    alice, bob = (socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(2))
    for sock in (alice, bob):
        sock.sendall(frame(3))
    deadline = time.monotonic() + 5
    while len(everyone) < 2 and time.monotonic() < deadline:
        server.poll(0.01)
    alice.sendall(frame(1, Chat(text="hi all").encode()))
    alice.sendall(frame(2, Move(to=Vec2(x=1.0, y=2.0), seq=5).encode()))
    alice.sendall(frame(1, bytes([9, 0]) + b"short"))  # announces 9 bytes, carries 5
    while server.stats()["disconnects"].get("MALFORMED_PACKET", 0) < 1 and time.monotonic() < deadline:
        server.poll(0.01)
    print(read_packet(bob))
    print(read_packet(alice))
    print(server.stats()["disconnects"]["MALFORMED_PACKET"], len(server))
'''


def test_the_typed_packets_example_routes_decodes_and_cuts_a_malformed_packet():
    example = re.search(r"## Typed packets, routing and rooms\n.*?```python\n(.*?)```", README.read_text(), re.S)
    assert example, "the README lost its typed packets example"
    code = example.group(1).replace('"127.0.0.1", 7777', '"127.0.0.1", 0') + TYPED_DRIVER
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "(1, b'\\x06\\x00hi all')",
        "(2, b'\\x00\\x00\\x80?\\x00\\x00\\x00@\\x05\\x00\\x00\\x00')",
        "1 1",
    ], result.stdout
    assert "MALFORMED_PACKET: Chat (id 1): Chat.text: 9 bytes announced, 5 left" in result.stderr, result.stderr
