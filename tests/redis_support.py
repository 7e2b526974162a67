"""A real redis-server for the bus tests: started on a free loopback port
with persistence off, stopped (and restartable on the same port) by the test.
scripts/test.sh installs the Debian package when it is missing."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

from support import free_port


class RedisServer:
    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (scripts/test.sh installs the Debian package)")
        self.binary = binary
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--protected-mode", "yes", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def command(self, *args: str) -> bytes:
        """One command, answered as raw RESP (for checks from the test's side)."""
        parts = [f"*{len(args)}\r\n".encode()] + [f"${len(a)}\r\n{a}\r\n".encode() for a in args]
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
            sock.sendall(b"".join(parts))
            return sock.recv(65536)

    def subscribers(self, channel: str) -> int:
        """How many connections are subscribed to `channel` (PUBSUB NUMSUB)."""
        # *2 $len channel :N
        reply = self.command("PUBSUB", "NUMSUB", channel)
        return int(reply.rstrip(b"\r\n").rsplit(b":", 1)[1])

    def wait_subscribers(self, channel: str, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while (now := self.subscribers(channel)) != count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{now} subscribers to {channel}, expected {count}")
            time.sleep(0.01)

