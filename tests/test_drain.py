"""Graceful drain (python/servercore/_drain.py): `run_forever()` on SIGTERM
or SIGINT, against a real server process (tests/drain_server.py).

- The first signal: no new connections; on_stopping runs on the polling
  thread with every session still there; what it sends reaches each client
  before the close; every session gets on_disconnected(SERVER_SHUTDOWN);
  run_forever returns and the previous signal handlers are back.
- Sessions flush within shutdown_grace: a client that does not read is cut
  when it runs out.
- A second signal stops at once.
- An exception in on_stopping is logged, and the drain goes on.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import HEADER

SERVER = Path(__file__).with_name("drain_server.py")


class DrainServer:
    """tests/drain_server.py in a process of its own, always killed at the end."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVER), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.port = int(self.expect("listening")[1])

    def expect(self, word: str) -> list[str]:
        """The next line of output, which must start with `word`."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        assert line and line[0] == word, f"expected {word!r}, got {line!r}"
        return line

    def connect(self, count: int, rcvbuf: int | None = None) -> list[socket.socket]:
        clients = []
        for _ in range(count):
            sock = socket.socket()
            if rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.settimeout(10)
            sock.connect(("127.0.0.1", self.port))
            clients.append(sock)
            self.expect("connected")
            # An echo comes back once on_connected has returned, so the
            # session is announced: the drain's goodbye broadcast reaches it.
            ping = HEADER.pack(8, 1) + b"ping"
            sock.sendall(ping)
            echo = b""
            while len(echo) < len(ping):
                echo += sock.recv(len(ping) - len(echo))
            assert echo == ping
        return clients

    def finish(self, timeout: float = 15) -> tuple[list[list[str]], str]:
        out, err = self.proc.communicate(timeout=timeout)
        return [line.split() for line in out.splitlines()], err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


@pytest.fixture
def drain_server() -> Iterator[type[DrainServer]]:
    started: list[DrainServer] = []

    class Tracked(DrainServer):
        def __init__(self, *args: str) -> None:
            super().__init__(*args)
            started.append(self)

    yield Tracked
    for server in started:
        server.kill()


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    return data


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_drains_the_server(drain_server: type[DrainServer], signum: int) -> None:
    server = drain_server("--goodbye-bytes", "16")
    clients = server.connect(3)
    server.proc.send_signal(signum)
    _, thread, sessions = server.expect("on_stopping")
    assert thread == "MainThread" and sessions == "3"
    # No new connections once the drain has begun.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
    for sock in clients:
        assert read_until_closed(sock) == HEADER.pack(20, 9) + bytes(16)
    lines, err = server.finish()
    assert sorted(lines[:3]) == [["disconnected", str(n), "SERVER_SHUTDOWN"] for n in (1, 2, 3)]
    assert lines[3:] == [["returned", "restored"]]
    assert server.proc.returncode == 0
    assert f"{signal.Signals(signum).name}: draining" in err


def test_sessions_flush_within_the_grace_then_are_cut(drain_server: type[DrainServer]) -> None:
    """One client reads, one does not: the goodbye (8 MB) reaches the reader;
    the other is cut when the grace (1 s) runs out."""
    server = drain_server("--grace", "1", "--goodbye-bytes", str(8 << 20))
    reader, = server.connect(1)
    stalled, = server.connect(1, rcvbuf=4096)
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    server.expect("on_stopping")
    received = read_until_closed(reader)
    assert len(received) > (8 << 20)  # every goodbye packet, headers included
    lines, err = server.finish()
    took = time.monotonic() - started
    assert 1.0 <= took < 4.0, took
    assert ["returned", "restored"] in lines
    assert "queued bytes were never sent (linger of 1.0s expired)" in err, err
    stalled.close()


def test_a_second_signal_stops_at_once(drain_server: type[DrainServer]) -> None:
    server = drain_server("--grace", "60", "--goodbye-bytes", str(4 << 20))
    clients = server.connect(2, rcvbuf=4096)  # neither reads: the drain would take the whole grace
    server.proc.send_signal(signal.SIGTERM)
    server.expect("on_stopping")
    started = time.monotonic()
    server.proc.send_signal(signal.SIGINT)
    lines, err = server.finish(timeout=10)
    assert time.monotonic() - started < 3
    assert sorted(line[2] for line in lines if line[0] == "disconnected") == ["SERVER_SHUTDOWN"] * 2
    assert ["returned", "restored"] in lines
    assert "SIGINT again: stopping at once" in err and "told to stop at once; cutting them off" in err, err
    for sock in clients:
        sock.close()


def test_an_exception_in_on_stopping_is_logged_and_the_drain_goes_on(drain_server: type[DrainServer]) -> None:
    server = drain_server("--hook-raises")
    (sock,) = server.connect(1)
    server.proc.send_signal(signal.SIGTERM)
    server.expect("on_stopping")
    assert read_until_closed(sock) == HEADER.pack(20, 9) + bytes(16)
    lines, err = server.finish()
    assert ["disconnected", "1", "SERVER_SHUTDOWN"] in lines and ["returned", "restored"] in lines
    assert "on_stopping raised; draining anyway" in err and "RuntimeError: the save failed" in err, err
