"""The `servercore` command (python -m servercore): the lecture's GameServer,
DummyClient and an end-to-end demo, run as real subprocesses on 127.0.0.1."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from support import free_port

COMMAND = [sys.executable, "-m", "servercore"]


def wait_listening(port: int, process: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited early with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    """Subprocesses started by a test; killed afterwards if still running."""
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        try:
            process.communicate(timeout=5)
        except (subprocess.TimeoutExpired, ValueError):
            pass


def test_help_lists_the_subcommands():
    result = subprocess.run([*COMMAND, "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    for command in ("game-server", "dummy-client", "demo"):
        assert command in result.stdout


def test_an_unknown_subcommand_fails():
    result = subprocess.run([*COMMAND, "no-such-command"], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0


def test_demo_with_200_clients_passes():
    result = subprocess.run([*COMMAND, "demo", "--clients", "200", "--seconds", "1"],
                            capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo passed" in result.stdout
    assert "FAILED" not in result.stdout


def test_game_server_broadcasts_hello_world_to_dummy_clients(processes):
    port = free_port()
    server = subprocess.Popen([*COMMAND, "game-server", "--port", str(port), "--duration", "3"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    processes.append(server)
    wait_listening(port, server)

    client = subprocess.Popen([*COMMAND, "dummy-client", "--port", str(port), "--clients", "50",
                               "--duration", "2", "--print"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    processes.append(client)
    client_out, client_err = client.communicate(timeout=60)
    assert client.returncode == 0, client_err

    hello = re.findall(r"^\[session (\d+)\] Hello World$", client_out, flags=re.MULTILINE)
    assert len(hello) >= 50, client_out[-2000:]
    assert len(set(hello)) == 50, f"only {len(set(hello))} of 50 sessions printed Hello World"

    server_out, server_err = server.communicate(timeout=30)
    assert server.returncode == 0, server_err
    assert f"listening on 127.0.0.1:{port}" in server_out
