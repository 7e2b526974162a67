"""What the pytest-benchmark suite (benches/test_*.py) shares: the wire
format done in Python, the asyncio peers, a loop in a thread, a gated drainer
thread, and bounded waits. Not a test module (pytest collects test_*.py only).

Everything runs on real sockets on 127.0.0.1, port 0, and every wait has a
deadline: a benchmark fails rather than hangs.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import selectors
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from servers.asyncio_server import BenchProtocol

HEADER = struct.Struct("<HH")
DEADLINE = 10.0  # seconds any one wait may take


def encode_py(packet_id: int, payload: bytes) -> bytes:
    """One packet, as an asyncio server encodes it: struct.pack + concatenation."""
    return HEADER.pack(len(payload) + 4, packet_id) + payload


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = DEADLINE, step: float = 0.0005) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(step)


def unread_bytes(fd: int) -> int:
    """Bytes waiting in a socket's receive queue (FIONREAD)."""
    buf = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf, True)
    return buf[0]


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def set_nodelay(transport: Any) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class FramedProtocol(asyncio.Protocol):
    """The asyncio peer of a PacketSession: framing in data_received, as
    benches/servers/asyncio_server.py does, and one call per packet."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.transport: Any = None
        self.buffer = bytearray()
        self.count = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        set_nodelay(transport)
        self.hub.protocols.append(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.hub.protocols:
            self.hub.protocols.remove(self)

    # The framing of the benchmark server's asyncio peer, the same function.
    data_received = BenchProtocol.data_received

    def on_packet(self, packet_id: int, payload: bytes) -> None:
        self.count += 1
        hub = self.hub
        if hub.waiter is not None and self.count >= hub.target and not hub.waiter.done():
            hub.waiter.set_result(None)


class FramedEcho(FramedProtocol):
    def on_packet(self, packet_id: int, payload: bytes) -> None:
        self.transport.write(HEADER.pack(len(payload) + 4, packet_id) + payload)


class RawEcho(asyncio.Protocol):
    """The asyncio peer of the README's raw echo Session."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        set_nodelay(transport)
        self.hub.protocols.append(self)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class Hub:
    """An asyncio server's sessions, and what a benchmark round waits for."""

    def __init__(self) -> None:
        self.protocols: list[Any] = []
        self.waiter: asyncio.Future[None] | None = None
        self.target = 0

    def close(self, loop: asyncio.AbstractEventLoop, server: asyncio.Server | None) -> None:
        """Aborts the sessions, closes `server` (if it was started) and `loop`."""
        for p in list(self.protocols):
            p.transport.abort()
        if server is not None:
            server.close()
            loop.run_until_complete(server.wait_closed())
        loop.close()

    async def accepted(self, count: int) -> None:
        """Returns once `count` sessions were accepted."""
        while len(self.protocols) < count:
            await asyncio.sleep(0.001)


class LoopThread:
    """An asyncio (or uvloop) server whose loop runs forever in a thread of its
    own: `protocol(hub)` per connection. Stopped and closed by `close()`."""

    def __init__(self, kind: str, protocol: Callable[[Hub], asyncio.Protocol]) -> None:
        self.kind = kind
        self.hub = Hub()
        self.loop = new_loop(kind)
        self.port = 0
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(protocol,), name=f"{kind}-loop", daemon=True)
        self._thread.start()
        if not self._ready.wait(DEADLINE):
            raise TimeoutError(f"{kind} server thread did not start")
        if self._error is not None:
            raise self._error

    def _run(self, protocol: Callable[[Hub], asyncio.Protocol]) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        try:
            server = loop.run_until_complete(loop.create_server(lambda: protocol(self.hub), "127.0.0.1", 0))
            self.port = server.sockets[0].getsockname()[1]
        except BaseException as error:  # noqa: BLE001 - reported to the starting thread
            self._error = error
            self._ready.set()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            server.close()
            for p in list(self.hub.protocols):
                p.transport.abort()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    def close(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(DEADLINE)
            if self._thread.is_alive():
                raise TimeoutError(f"{self.kind} server thread did not stop")


class Drainer:
    """A thread that empties the client ends of a broadcast, one round at a time.

    It sleeps (no GIL, no CPU) until `drain(nbytes)` asks it to read exactly
    that many bytes from all its sockets together, and `drain` waits for it.
    The benchmarks call `drain` in their untimed setup, so the drainer never
    competes with the timed call for the GIL or a core."""

    def __init__(self, sockets: list[socket.socket]) -> None:
        self.sockets = sockets
        self.selector = selectors.DefaultSelector()
        for sock in sockets:
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ)
        self.total = 0
        self._want = 0
        self._go = threading.Event()
        self._done = threading.Event()
        self._stop = False
        self._error: BaseException | None = None
        self._buf = bytearray(1 << 16)
        self._thread = threading.Thread(target=self._run, name="drainer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        view = memoryview(self._buf)
        while True:
            self._go.wait()
            self._go.clear()
            if self._stop:
                return
            try:
                deadline = time.monotonic() + DEADLINE
                while self.total < self._want:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"drained {self.total} of {self._want} bytes")
                    for key, _ in self.selector.select(0.5):
                        try:
                            n = key.fileobj.recv_into(view)  # type: ignore[union-attr]
                        except BlockingIOError:
                            continue
                        if n == 0:
                            raise ConnectionError("a broadcast recipient was closed by the server")
                        self.total += n
            except BaseException as error:  # noqa: BLE001 - reported to drain()
                self._error = error
            self._done.set()

    def drain(self, nbytes: int) -> None:
        """Reads `nbytes` more (from all sockets together); returns when done."""
        self._want = self.total + nbytes
        self._done.clear()
        self._go.set()
        if not self._done.wait(DEADLINE + 5):
            raise TimeoutError("the drainer did not finish")
        if self._error is not None:
            raise self._error
        if self.total != self._want:
            raise AssertionError(f"drained {self.total} bytes, expected exactly {self._want}")

    def close(self) -> None:
        self._stop = True
        self._go.set()
        self._thread.join(DEADLINE)
        self.selector.close()


def connect_clients(port: int, n: int) -> list[socket.socket]:
    socks = []
    try:
        for _ in range(n):
            sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            socks.append(sock)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def record_per_unit(benchmark: Any, units: int, name: str) -> None:
    """Adds the median and min per unit (ns) to the saved run's extra_info."""
    stats = getattr(benchmark, "stats", None)
    inner = getattr(stats, "stats", None)
    if inner is None:  # --benchmark-disable
        return
    benchmark.extra_info[f"{name}_median_ns"] = round(inner.median / units * 1e9, 1)
    benchmark.extra_info[f"{name}_min_ns"] = round(inner.min / units * 1e9, 1)
