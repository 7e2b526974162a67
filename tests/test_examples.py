"""The examples run end to end, each server and its clients in processes of
their own, over loopback: examples/chat (typed packets, routers, rooms, a
bot Client, a drain) and examples/game_server (the lecture's GameServer and
DummyClient on the toolkit)."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.communicate()


def start(processes: list[subprocess.Popen[str]], *args: str) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    processes.append(process)
    return process


def listening_port(server: subprocess.Popen[str]) -> int:
    assert server.stdout is not None
    line = server.stdout.readline().split()
    assert line[:1] == ["listening"], line
    return int(line[1])


def stop(server: subprocess.Popen[str]) -> str:
    server.send_signal(signal.SIGTERM)
    out, err = server.communicate(timeout=20)
    assert server.returncode == 0, err
    return out


def test_the_chat_example_routes_rooms_and_drains(processes: list[subprocess.Popen[str]]) -> None:
    server = start(processes, str(EXAMPLES / "chat" / "server.py"), "--port", "0")
    port = listening_port(server)
    bots = subprocess.run(
        [sys.executable, str(EXAMPLES / "chat" / "bot.py"), "--port", str(port), "--bots", "30", "--rooms", "3",
         "--lines", "4"],
        capture_output=True, text=True, timeout=60,
    )
    assert bots.returncode == 0, bots.stdout + bots.stderr
    # 3 rooms of 10: each line reaches the 9 others.
    assert bots.stdout.strip() == "30 bots in 3 rooms said 120 lines and heard 1080 (expected 1080)"
    assert stop(server).strip() == "stopped"


def test_the_game_server_example_broadcasts_hello_world_and_says_goodbye(
    processes: list[subprocess.Popen[str]],
) -> None:
    server = start(processes, str(EXAMPLES / "game_server" / "server.py"), "--port", "0", "--tick", "0.05")
    port = listening_port(server)
    dummies = start(processes, str(EXAMPLES / "game_server" / "dummy_client.py"), "--port", str(port),
                    "--clients", "300", "--hellos", "3")
    assert dummies.stdout is not None
    first = dummies.stdout.readline()
    assert first.startswith("300 sessions got "), first
    fewest = int(first.rsplit("fewest ", 1)[1].rstrip(")\n"))
    assert fewest >= 3, first
    out = stop(server)
    assert out.splitlines()[-1].startswith("stopped; late ticks "), out
    rest, err = dummies.communicate(timeout=20)
    assert dummies.returncode == 0, rest + err
    assert rest.strip() == "300 goodbyes"
