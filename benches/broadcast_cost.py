"""What one broadcast costs the thread that calls it.

A servercore Server holds `--sessions` connected loopback sockets (plain
sockets of this process, drained between rounds so that no queue fills). Each
round times `--calls` back-to-back `server.broadcast(1, payload)` calls on
the calling thread; the fan-out to every session happens inside the call, so
the time per call over the number of sessions is what each recipient costs
the game loop. Prints the median over `--repeat` rounds (human-readable on
stderr, one JSON line on stdout).

    python benches/broadcast_cost.py [--sessions 1000] [--calls 200] [--size 64] [--repeat 25]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time

from servercore import PacketSession, Server


class Quiet(PacketSession):
    pass


def drain(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        try:
            while sock.recv(1 << 20):
                pass
        except BlockingIOError:
            pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=25)
    args = parser.parse_args()
    payload = b"x" * args.size
    seconds_per_call: list[float] = []
    with Server(Quiet, "127.0.0.1", 0, first_packet_timeout=None) as server:
        sockets = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(args.sessions)]
        try:
            for sock in sockets:
                sock.setblocking(False)
            deadline = time.monotonic() + 30
            while len(server) < args.sessions:
                if time.monotonic() > deadline:
                    raise SystemExit(f"only {len(server)} of {args.sessions} sessions connected")
                server.poll(0.05)
            for _ in range(args.repeat):
                started = time.perf_counter()
                for _ in range(args.calls):
                    server.broadcast(1, payload)
                seconds_per_call.append((time.perf_counter() - started) / args.calls)
                # Let the I/O threads write it all, and the peers take it, before the next round.
                server.poll(0.1)
                drain(sockets)
                server.poll(0.1)
                drain(sockets)
            lost = server.stats()["disconnects"]
        finally:
            for sock in sockets:
                sock.close()
    if any(lost.values()):
        raise SystemExit(f"sessions were lost during the measurement: {lost}")
    median = statistics.median(seconds_per_call)
    result = {
        "sessions": args.sessions,
        "calls_per_round": args.calls,
        "payload_bytes": args.size,
        "rounds": args.repeat,
        "us_per_call_median": round(median * 1e6, 2),
        "ns_per_recipient_median": round(median * 1e9 / args.sessions, 1),
        "us_per_call_min": round(min(seconds_per_call) * 1e6, 2),
        "us_per_call_max": round(max(seconds_per_call) * 1e6, 2),
    }
    print(
        f"broadcast to {args.sessions} sessions: {result['us_per_call_median']} µs per call (median of "
        f"{args.repeat} rounds; {result['us_per_call_min']}–{result['us_per_call_max']}), "
        f"{result['ns_per_recipient_median']} ns per recipient",
        file=sys.stderr,
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
