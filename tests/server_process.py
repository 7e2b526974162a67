"""A servercore game server in its own process, for tests that change
process-wide state (file-descriptor limits, signal dispositions) or must watch
the server survive something.

    python tests/server_process.py [--nofile N] [--sigpipe-default] [--tick S]

It prints `listening <port>` once ready, echoes packets of id 7, broadcasts a
packet of id 1 carrying a u32 sequence number every tick (or as fast as it can
with --tick 0), prints `alive <sessions>` each second, and exits when stdin
closes.
"""

from __future__ import annotations

import argparse
import logging
import resource
import signal
import struct
import sys
import threading
import time

from servercore import PacketSession, Server


class Echo(PacketSession):
    def on_recv_packet(self, packet_id: int, payload: bytes) -> None:
        if packet_id == 7:
            self.send(packet_id, payload)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nofile", type=int, default=None, help="RLIMIT_NOFILE soft limit")
    parser.add_argument("--sigpipe-default", action="store_true", help="set SIGPIPE back to SIG_DFL")
    parser.add_argument("--tick", type=float, default=0.05)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.sigpipe_default:
        # Python ignores SIGPIPE; a host program may not. Writes must not depend on it.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if args.nofile is not None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, hard))

    stdin_closed = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stdin_closed.set()), daemon=True).start()

    with Server(Echo, "127.0.0.1", 0, io_threads=1, linger=0.2) as server:
        print(f"listening {server.port}", flush=True)
        sequence = 0
        next_tick = next_report = time.monotonic()
        while not stdin_closed.is_set():
            now = time.monotonic()
            if now >= next_tick:
                server.broadcast(1, struct.pack("<I", sequence))
                sequence += 1
                next_tick = now + args.tick
            if now >= next_report:
                print(f"alive {len(server)}", flush=True)
                next_report = now + 1.0
            server.poll(0 if args.tick == 0 else max(0.0, min(next_tick, next_report) - time.monotonic()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
