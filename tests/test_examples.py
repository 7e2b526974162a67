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


def test_the_cluster_example_chats_and_whispers_across_workers(tmp_path: Path) -> None:
    """examples/cluster: `servercore serve` with two workers and a Bus over a
    real redis-server; players on different workers chat in one room and
    whisper by name."""
    import json
    import os
    import time

    from redis_support import RedisServer
    from support import RawPeer, packet

    redis = RedisServer()
    redis.start()
    ready = tmp_path / "ready.json"
    env = dict(os.environ, PYTHONPATH=str(EXAMPLES / "cluster"), SERVERCORE_BUS_URL=redis.url)
    serve = subprocess.Popen(
        [sys.executable, "-m", "servercore", "serve", "game:Player", "--host", "127.0.0.1", "--port", "0",
         "--workers", "2", "--setup", "game:setup", "--ready-file", str(ready), "--metrics-port", "0"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    by_node: dict[str, list[RawPeer]] = {}
    names: dict[RawPeer, str] = {}
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert serve.poll() is None and time.monotonic() < deadline, serve.stderr.read() if serve.stderr else ""
            time.sleep(0.05)
        state = json.loads(ready.read_text())
        port = state["port"]
        # Players log in until each worker has two (the kernel picks the worker).
        while len(by_node) < 2 or min(len(peers) for peers in by_node.values()) < 2:
            assert len(names) < 60, {node: len(peers) for node, peers in by_node.items()}
            peer = RawPeer(port)
            names[peer] = f"player{len(names)}"
            peer.send(packet(1, names[peer].encode()))
            by_node.setdefault(peer.recv_packet_with_id(5).decode(), []).append(peer)
        (node_a, on_a), (node_b, on_b) = list(by_node.items())[:2]
        on_a[0].send(packet(2, b"hello world"))
        for peer in names:
            assert peer.recv_packet_with_id(2) == b"hello world"
        on_a[0].send(packet(3, f"{names[on_b[-1]]}\0psst".encode()))
        assert on_b[-1].recv_packet_with_id(3) == b"psst"
        on_a[0].send(packet(3, b"nobody\0hello?"))
        assert on_a[0].recv_packet_with_id(4) == b"nobody"
        # Each worker's bus is in the supervisor's metrics, connected.
        from test_metrics import scrape

        def bus_figures() -> tuple[dict[str, float], float]:
            metrics = scrape(f"http://127.0.0.1:{state['metrics_port']}/metrics")
            connected = {dict(labels)["worker"]: value for (name, labels), value in metrics.items()
                         if name == "servercore_bus_connected"}
            published = sum(value for (name, _), value in metrics.items()
                            if name == "servercore_bus_published_total")
            return connected, published

        # Counted once Redis has answered the publisher: may trail the delivery.
        deadline = time.monotonic() + 5
        while (figures := bus_figures())[1] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert figures == ({"0": 1.0, "1": 1.0}, 2), figures  # the chat and the whisper
    finally:
        for peer in names:
            peer.close()
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(timeout=20)
        finally:
            redis.stop()
    assert serve.returncode == 0
