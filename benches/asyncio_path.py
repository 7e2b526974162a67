"""What a plain `def` callback costs per packet on the asyncio path, against poll().

The same Server session class (an on_recv_packet that only counts) receives a
flood of tiny packets from the Rust loadgen (`loadgen flood`), delivered
either by `server.poll()` on this thread or by `serve_forever()` on an
asyncio or a uvloop event loop on this thread. The CPU time of this thread
(time.thread_time(), from before the flood connects to the last packet)
divided by the packets is the Python-side cost per packet: waiting, taking
the batch off the engine's queue, calling the method; on a loop, the loop's
own turn and the descriptor's wake-ups too. The process's CPU time over the
same span (I/O threads included; under poll() the polling thread may read
the socket itself) is reported beside it. The three paths alternate,
`--repeat` times, and the medians and their ratios to poll() are printed
(human-readable on stderr, one JSON line on stdout).

    python benches/asyncio_path.py [--packets 1000000] [--size 8] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import uvloop
from dispatch_floor import LOADGEN, end_flood, start_flood

from servercore import PacketSession, Server
PATHS = ["poll", "asyncio", "uvloop"]


class Counting(PacketSession):
    """Counts packets and says when the last one has come: the same body on every path."""

    received = 0
    target = 0
    done: Callable[[], None] = staticmethod(lambda: None)

    def on_recv_packet(self, packet_id: int, payload: bytes) -> None:
        cls = Counting
        cls.received += 1
        if cls.received == cls.target:
            cls.done()


def process_cpu() -> float:
    times = os.times()
    return times.user + times.system


def result(packets: int, cpu: float, process: float) -> dict[str, Any]:
    return {
        "packets": Counting.received,
        "thread_cpu_s": cpu,
        "ns_per_packet": cpu / packets * 1e9,
        "process_cpu_s": process,
        "process_ns_per_packet": process / packets * 1e9,
    }


def measure_poll(packets: int, size: int, timeout: float) -> dict[str, Any]:
    Counting.received, Counting.target = 0, packets
    finished = [False]
    Counting.done = staticmethod(lambda: finished.__setitem__(0, True))
    server = Server(Counting, "127.0.0.1", 0)
    server.start()
    try:
        cpu_before, process_before = time.thread_time(), process_cpu()
        flood = start_flood(server.port, packets, size, 1, timeout)
        deadline = time.monotonic() + timeout
        try:
            while not finished[0]:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{Counting.received} of {packets} packets within {timeout} s")
                server.poll(0.05)
            cpu, process = time.thread_time() - cpu_before, process_cpu() - process_before
        finally:
            end_flood(flood)
    finally:
        server.stop()
    return result(packets, cpu, process)


def measure_loop(kind: str, packets: int, size: int, timeout: float) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        Counting.received, Counting.target = 0, packets
        finished = asyncio.Event()
        Counting.done = staticmethod(finished.set)
        async with Server(Counting, "127.0.0.1", 0) as server:
            cpu_before, process_before = time.thread_time(), process_cpu()
            flood = start_flood(server.port, packets, size, 1, timeout)
            try:
                await asyncio.wait_for(finished.wait(), timeout)
                cpu, process = time.thread_time() - cpu_before, process_cpu() - process_before
            finally:
                end_flood(flood)
        return result(packets, cpu, process)

    return uvloop.run(main()) if kind == "uvloop" else asyncio.run(main())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packets", type=int, default=1_000_000)
    parser.add_argument("--size", type=int, default=8, help="payload bytes per packet")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    if not LOADGEN.exists():
        print(f"{LOADGEN} not found: cargo build --release in benches/loadgen (benches/run.py does)", file=sys.stderr)
        return 2

    runs: list[dict[str, dict[str, Any]]] = []
    for rep in range(args.repeat):
        order = PATHS[rep % 3:] + PATHS[:rep % 3]  # each path goes first once in three
        measured: dict[str, dict[str, Any]] = {}
        for path in order:
            if path == "poll":
                measured[path] = measure_poll(args.packets, args.size, args.timeout)
            else:
                measured[path] = measure_loop(path, args.packets, args.size, args.timeout)
        runs.append(measured)
        print(f"run {rep + 1}: " + ", ".join(
            f"{p} {measured[p]['ns_per_packet']:.1f} ns/packet (process {measured[p]['process_ns_per_packet']:.0f})"
            for p in PATHS), file=sys.stderr)
    medians = {p: statistics.median(r[p]["ns_per_packet"] for r in runs) for p in PATHS}
    process = {p: statistics.median(r[p]["process_ns_per_packet"] for r in runs) for p in PATHS}
    spread = {p: [round(min(r[p]["ns_per_packet"] for r in runs), 1), round(max(r[p]["ns_per_packet"] for r in runs), 1)]
              for p in PATHS}
    ratios = {p: round(medians[p] / medians["poll"], 3) for p in PATHS if p != "poll"}
    summary = {
        "workload": "ASYNCIO_PATH",
        "packets": args.packets,
        "size": args.size,
        "repeat": args.repeat,
        "ns_per_packet": {p: round(v, 1) for p, v in medians.items()},
        "ns_per_packet_min_max": spread,
        "ratio_to_poll": ratios,
        "process_ns_per_packet": {p: round(v, 1) for p, v in process.items()},
        "process_ratio_to_poll": {p: round(process[p] / process["poll"], 3) for p in PATHS if p != "poll"},
        "runs": runs,
    }
    print("median ns/packet: " + ", ".join(f"{p} {medians[p]:.1f}" for p in PATHS)
          + "; ratio to poll(): " + ", ".join(f"{p} {r:.2f}" for p, r in ratios.items())
          + "; process ns/packet: " + ", ".join(f"{p} {process[p]:.0f}" for p in PATHS), file=sys.stderr)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
