"""The benchmark server written with servercore's Python API.

    python benches/servers/servercore_server.py --port 0 --mode echo

Modes (every mode also answers the 0xFFF1 "how many sessions" query):
  broadcast  on the 0xFFF0 control packet [packets u32][size u32], broadcast
             `packets` packets (id 1, `size` bytes, u32 sequence first)
  echo       every id-2 packet is sent back as is, from on_recv_packet
  hello      the lecture's GameServer: a 1004-byte Hello World to all, every 250 ms
  idle       accept and hold (each session is a PacketSession object)
  raw-echo   a raw Session: on_recv sends the bytes back as they are and
             consumes them all (no framing, so no 0xFFF1 query either)

With `--loop asyncio` or `--loop uvloop` (echo, raw-echo and idle modes), the
server is driven by `async with server: await server.serve_forever()` on that
event loop instead of poll(), with the same session classes.

Prints "listening <port>" when ready. On SIGTERM/SIGINT it prints its
stats() as one JSON line on stderr and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import struct
import sys
import time

from servercore import PacketSession, SendBuffer, Server, Session

ID_BROADCAST = 1
ID_ECHO = 2
ID_CONTROL = 0xFFF0
ID_QUERY = 0xFFF1
HELLO_PERIOD = 0.25

server: Server
job: tuple[int, int] | None = None


class BenchSession(PacketSession):
    def on_recv_packet(self, packet_id: int, payload: bytes) -> None:
        global job
        if packet_id == ID_ECHO:
            self.send(packet_id, payload)
        elif packet_id == ID_QUERY:
            self.send(ID_QUERY, struct.pack("<I", len(server)))
        elif packet_id == ID_CONTROL:
            packets, size = struct.unpack_from("<II", payload)
            job = (packets, max(4, size))


class EchoOnlySession(PacketSession):
    """Echo mode: the callback a user would write, with the query on the side."""

    def on_recv_packet(self, packet_id: int, payload: bytes) -> None:
        if packet_id == ID_ECHO:
            self.send(packet_id, payload)
        elif packet_id == ID_QUERY:
            self.send(ID_QUERY, struct.pack("<I", len(server)))


class RawEchoSession(Session):
    """raw-echo mode: the README's echo server."""

    def on_recv(self, data: bytes) -> int:
        self.send(data)
        return len(data)


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run_broadcast(packets: int, size: int, poll_every: int) -> None:
    pad = bytes(size - 4)
    for seq in range(packets):
        server.broadcast(SendBuffer(ID_BROADCAST, seq.to_bytes(4, "little") + pad))
        if seq % poll_every == poll_every - 1:
            server.poll(0)


def main() -> int:
    global server, job
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--mode", choices=["broadcast", "echo", "hello", "idle", "raw-echo"], required=True)
    parser.add_argument("--io-threads", type=int, default=None)
    parser.add_argument("--no-inline-io", action="store_true", help="only the I/O threads serve sockets (inline_io=False)")
    parser.add_argument("--max-sessions", type=int, default=20_000)
    parser.add_argument("--hello-hz", type=float, default=1 / HELLO_PERIOD,
                        help="hello mode: Hello World broadcasts per second (the lecture's 4)")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default=None,
                        help="drive the server with serve_forever() on this event loop (echo, raw-echo, idle)")
    parser.add_argument("--poll-every", type=int, default=64, help="broadcasts between two poll(0) calls")
    args = parser.parse_args()
    if args.loop and args.mode not in ("echo", "raw-echo", "idle"):
        parser.error(f"--loop serves the echo, raw-echo and idle modes, not {args.mode}")

    raise_nofile()

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, terminate)

    session_class = {"echo": EchoOnlySession, "raw-echo": RawEchoSession}.get(args.mode, BenchSession)
    server = Server(
        session_class,
        "127.0.0.1",
        args.port,
        io_threads=args.io_threads,
        inline_io=not args.no_inline_io,
        max_sessions=args.max_sessions,
        # Idle and listening clients (M1, HELLO, B1) owe no first packet.
        first_packet_timeout=None,
    )
    if args.loop:
        return serve_on_loop(args.loop)
    server.start()
    print(f"listening {server.port}", flush=True)
    hello = SendBuffer(ID_BROADCAST, b"Hello World".ljust(1000, b"\0"))
    try:
        if args.mode == "hello":
            period = 1 / args.hello_hz
            next_tick = time.monotonic() + period
            while True:
                server.poll(max(0.0, next_tick - time.monotonic()))
                now = time.monotonic()
                if now >= next_tick:
                    server.broadcast(hello)
                    next_tick += period
                    if next_tick < now:
                        next_tick = now + period
        else:
            while True:
                server.poll(0.1)
                if job is not None:
                    packets, size = job
                    job = None
                    run_broadcast(packets, size, args.poll_every)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        report_and_exit()


def report_and_exit() -> None:
    try:
        stats = server.stats()
        print("stats " + json.dumps(stats, default=str), file=sys.stderr, flush=True)
    except Exception as error:  # noqa: BLE001 - a report, never a failure
        print(f"stats unavailable: {error}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # The measurement is over; closing 10k sessions politely measures nothing.
    os._exit(0)


def serve_on_loop(loop: str) -> int:
    async def serve() -> None:
        async with server:
            print(f"listening {server.port}", flush=True)
            await server.serve_forever()

    try:
        if loop == "uvloop":
            import uvloop

            uvloop.run(serve())
        else:
            asyncio.run(serve())
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        report_and_exit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
