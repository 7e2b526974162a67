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
    assert '"127.0.0.1", 7777' in code and "    while True:" in code and "with server:" in code
    code = code.replace('"127.0.0.1", 7777', '"127.0.0.1", 0')
    code = code.replace("    while True:", "    import time; end = time.monotonic() + 1.5\n    while time.monotonic() < end:")
    code = code.replace("with server:", PLAYER + "with server:")
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
