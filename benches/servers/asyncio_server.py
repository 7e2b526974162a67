"""The benchmark server a Python user would write without servercore: asyncio.

    python benches/servers/asyncio_server.py --port 0 --mode echo [--uvloop]

One asyncio.Protocol per connection, a set of sessions, framing in
data_received, transport.write per recipient, and write flow control: a
broadcast that finds a transport paused (pause_writing) waits until it is
resumed (or lost) before writing to it again; an echo session whose transport
is paused stops reading until it is resumed.

Modes are those of servercore_server.py (broadcast, echo, hello, idle,
raw-echo), and every framed mode answers the 0xFFF1 "how many sessions"
query. raw-echo is data_received -> transport.write(data), no framing, with
the same flow control as echo. Prints "listening <port>" when ready.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal
import socket
import struct
import sys
from typing import Any

ID_BROADCAST = 1
ID_ECHO = 2
ID_CONTROL = 0xFFF0
ID_QUERY = 0xFFF1
MAX_PACKET_SIZE = 4096
HELLO_PERIOD = 0.25

# Modes where a session whose transport is paused stops reading until resumed.
ECHO_MODES = ("echo", "raw-echo")

HEADER = struct.Struct("<HH")
U32 = struct.Struct("<I")


class Hub:
    """What all sessions share: the set of sessions and the mode."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sessions: set[BenchProtocol] = set()
        self.broadcasting: asyncio.Task[None] | None = None


class BenchProtocol(asyncio.Protocol):
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        # asyncio's or uvloop's transport (uvloop's is no asyncio.Transport subclass).
        self.transport: Any = None
        self.buffer = bytearray()
        self.paused = False
        self.resumed: asyncio.Future[None] | None = None
        self.closed = False

    # -- connection

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.hub.sessions.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.hub.sessions.discard(self)
        self._wake()

    # -- write flow control

    def pause_writing(self) -> None:
        self.paused = True
        if self.hub.mode in ECHO_MODES and self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self.hub.mode in ECHO_MODES and self.transport is not None and not self.closed:
            self.transport.resume_reading()
        self._wake()

    def _wake(self) -> None:
        if self.resumed is not None and not self.resumed.done():
            self.resumed.set_result(None)
        self.resumed = None

    async def writable(self) -> None:
        """Returns once this transport may be written to again (or is gone)."""
        while self.paused and not self.closed:
            if self.resumed is None:
                self.resumed = asyncio.get_running_loop().create_future()
            await self.resumed

    # -- framing

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        offset = 0
        end = len(buffer)
        while end - offset >= 4:
            size, packet_id = HEADER.unpack_from(buffer, offset)
            if size < 4 or size > MAX_PACKET_SIZE:
                self.transport.abort()
                return
            if end - offset < size:
                break
            payload = bytes(buffer[offset + 4 : offset + size])
            offset += size
            self.on_packet(packet_id, payload)
        if offset:
            del buffer[:offset]

    def on_packet(self, packet_id: int, payload: bytes) -> None:
        transport = self.transport
        if packet_id == ID_ECHO:
            transport.write(HEADER.pack(len(payload) + 4, packet_id) + payload)
        elif packet_id == ID_QUERY:
            transport.write(HEADER.pack(8, ID_QUERY) + U32.pack(len(self.hub.sessions)))
        elif packet_id == ID_CONTROL and self.hub.mode == "broadcast":
            packets, size = struct.unpack_from("<II", payload)
            self.hub.broadcasting = asyncio.ensure_future(broadcast(self.hub, packets, max(4, size)))


class RawEchoProtocol(BenchProtocol):
    """raw-echo: the bytes go back as they came; no framing, no query."""

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def send_to_all(hub: Hub, packet: bytes) -> None:
    """transport.write per recipient, waiting for any paused one to resume."""
    for session in list(hub.sessions):
        if session.paused:
            await session.writable()
        if not session.closed:
            session.transport.write(packet)


async def broadcast(hub: Hub, packets: int, size: int) -> None:
    header = HEADER.pack(size + 4, ID_BROADCAST)
    pad = bytes(size - 4)
    recipients = list(hub.sessions)
    for seq in range(packets):
        packet = header + U32.pack(seq) + pad
        for session in recipients:
            if session.paused:
                await session.writable()
            if not session.closed:
                session.transport.write(packet)
        if seq % 16 == 15:
            # Let the loop flush buffers and read sockets now and then.
            await asyncio.sleep(0)


async def hello_loop(hub: Hub, period: float = HELLO_PERIOD) -> None:
    loop = asyncio.get_running_loop()
    packet = HEADER.pack(1004, ID_BROADCAST) + b"Hello World".ljust(1000, b"\0")
    next_tick = loop.time() + period
    while True:
        await asyncio.sleep(max(0.0, next_tick - loop.time()))
        await send_to_all(hub, packet)
        next_tick += period
        if next_tick < loop.time():
            next_tick = loop.time() + period


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    hub = Hub(args.mode)
    protocol = RawEchoProtocol if args.mode == "raw-echo" else BenchProtocol
    server = await loop.create_server(
        lambda: protocol(hub), "127.0.0.1", args.port, backlog=args.backlog, reuse_address=True
    )
    port = server.sockets[0].getsockname()[1]
    print(f"listening {port}", flush=True)
    stop = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: stop.done() or stop.set_result(None))
    ticker = asyncio.ensure_future(hello_loop(hub, 1 / args.hello_hz)) if args.mode == "hello" else None
    try:
        await stop
    finally:
        if ticker is not None:
            ticker.cancel()
        server.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--mode", choices=["broadcast", "echo", "hello", "idle", "raw-echo"], required=True)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop instead of asyncio's own loop")
    parser.add_argument("--backlog", type=int, default=1024)
    parser.add_argument("--hello-hz", type=float, default=1 / HELLO_PERIOD,
                        help="hello mode: Hello World broadcasts per second (the lecture's 4)")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.uvloop:
        import uvloop

        uvloop.run(serve(args))
    else:
        asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
