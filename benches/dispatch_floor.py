"""The floor of dispatch: what one on_recv_packet call costs through servercore.

A servercore Server whose session class has an empty on_recv_packet receives a
flood of tiny packets from the Rust loadgen (`loadgen flood`). The CPU time of
the Python thread inside poll() (time.thread_time() around each call) divided
by the packets delivered is the cost of dispatch per packet: taking a batch of
events off the queue, making the bytes object, calling the method, releasing
the receive budget. It is compared with a pure-Python loop calling the same
empty method with the same arguments the same number of times:

    for _ in range(n): obj.on_recv_packet(1, payload)

Both are measured in this process, alternating, `--repeat` times; the medians
and their ratio are printed (human-readable on stderr, one JSON line on stdout).

    python benches/dispatch_floor.py [--packets 1000000] [--size 8] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from servercore import PacketSession, Server

HERE = Path(__file__).resolve().parent
LOADGEN = HERE / "loadgen" / "target" / "release" / "loadgen"


class EmptySession(PacketSession):
    def on_recv_packet(self, packet_id: int, payload: bytes) -> None:
        pass


def start_flood(
    port: int, packets: int, size: int, clients: int, timeout: float, loadgen: Path = LOADGEN
) -> subprocess.Popen[bytes]:
    """`loadgen flood`: `packets` packets of `size` bytes over `clients`
    connections, which it holds open until its stdin is closed."""
    return subprocess.Popen(
        [
            str(loadgen), "flood", "--port", str(port), "--clients", str(clients),
            "--count", str(packets), "--size", str(size), "--hold", str(timeout), "--timeout", str(timeout),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def end_flood(flood: subprocess.Popen[bytes]) -> None:
    """Lets the flood's connections go and waits for it to exit."""
    assert flood.stdin is not None
    try:
        flood.stdin.close()
        flood.wait(timeout=10)
    except subprocess.TimeoutExpired:
        flood.kill()
        flood.wait()


def measure_servercore(packets: int, size: int, clients: int, loadgen: Path, timeout: float) -> dict:
    server = Server(EmptySession, "127.0.0.1", 0)
    server.start()
    flood = start_flood(server.port, packets, size, clients, timeout, loadgen)
    # Every session's Connected is an event too; Disconnected only comes after
    # we close the flood's stdin, once everything has been counted.
    target = packets + clients
    handled = 0
    cpu = 0.0
    polls = 0
    first_at = None
    started = time.monotonic()
    deadline = started + timeout
    times_before = os.times()
    try:
        while handled < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {handled} of {target} events within {timeout} s")
            if flood.poll() is not None and flood.returncode != 0:
                raise RuntimeError(f"loadgen flood failed: {flood.stderr.read().decode(errors='replace')}")
            t0 = time.thread_time()
            n = server.poll(0.05)
            cpu += time.thread_time() - t0
            if n:
                polls += 1
                if first_at is None:
                    first_at = time.monotonic()
            handled += n
        wall = time.monotonic() - (first_at or started)
        times_after = os.times()
        extra = server.poll(0.05)  # nothing more should come before we close
    finally:
        end_flood(flood)
        stats = server.stats()
        server.stop()
    process_cpu = (times_after.user + times_after.system) - (times_before.user + times_before.system)
    return {
        "packets": packets,
        "events_handled": handled,
        "extra_events": extra,
        "packets_in": stats["packets_in"],
        "thread_cpu_s": cpu,
        "ns_per_call": cpu / packets * 1e9,
        "polls": polls,
        "packets_per_poll": packets / max(1, polls),
        "wall_s": wall,
        "process_cpu_s": process_cpu,
        "process_ns_per_packet": process_cpu / packets * 1e9,
    }


def measure_python(packets: int, size: int) -> dict:
    obj = EmptySession()  # not connected: only its method is used
    payload = b"\x5a" * size
    t0 = time.thread_time()
    for _ in range(packets):
        obj.on_recv_packet(1, payload)
    cpu = time.thread_time() - t0
    t0 = time.thread_time()
    for _ in range(packets):
        pass
    empty_loop = time.thread_time() - t0
    return {
        "packets": packets,
        "thread_cpu_s": cpu,
        "ns_per_call": cpu / packets * 1e9,
        "empty_loop_ns": empty_loop / packets * 1e9,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packets", type=int, default=1_000_000)
    parser.add_argument("--size", type=int, default=8, help="payload bytes per packet")
    parser.add_argument("--clients", type=int, default=1, help="flooding connections")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--loadgen", type=Path, default=LOADGEN)
    args = parser.parse_args()
    if not args.loadgen.exists():
        print(f"{args.loadgen} not found: cargo build --release in benches/loadgen (benches/run.py does)", file=sys.stderr)
        return 2

    runs = []
    for rep in range(args.repeat):
        # Alternate which goes first.
        order = ["servercore", "python"] if rep % 2 == 0 else ["python", "servercore"]
        result = {}
        for which in order:
            if which == "servercore":
                result[which] = measure_servercore(args.packets, args.size, args.clients, args.loadgen, args.timeout)
            else:
                result[which] = measure_python(args.packets, args.size)
        runs.append(result)
        sc, py = result["servercore"], result["python"]
        print(
            f"run {rep + 1}: servercore {sc['ns_per_call']:.1f} ns/call "
            f"({sc['packets_per_poll']:.0f} packets/poll, process {sc['process_ns_per_packet']:.0f} ns/packet), "
            f"pure Python {py['ns_per_call']:.1f} ns/call (empty loop {py['empty_loop_ns']:.1f})",
            file=sys.stderr,
        )
    sc_ns = statistics.median(r["servercore"]["ns_per_call"] for r in runs)
    py_ns = statistics.median(r["python"]["ns_per_call"] for r in runs)
    errors = sum(r["servercore"]["events_handled"] != args.packets + args.clients for r in runs)
    summary = {
        "workload": "DISPATCH",
        "packets": args.packets,
        "size": args.size,
        "clients": args.clients,
        "repeat": args.repeat,
        "servercore_ns_per_call": round(sc_ns, 2),
        "python_ns_per_call": round(py_ns, 2),
        "ratio": round(sc_ns / py_ns, 3) if py_ns else None,
        "servercore_ns_per_call_min": round(min(r["servercore"]["ns_per_call"] for r in runs), 2),
        "python_ns_per_call_min": round(min(r["python"]["ns_per_call"] for r in runs), 2),
        "servercore_process_ns_per_packet": round(
            statistics.median(r["servercore"]["process_ns_per_packet"] for r in runs), 1
        ),
        "python_empty_loop_ns": round(statistics.median(r["python"]["empty_loop_ns"] for r in runs), 2),
        "errors": errors,
        "runs": runs,
    }
    print(
        f"median: servercore {sc_ns:.1f} ns/call, pure Python {py_ns:.1f} ns/call, ratio {sc_ns / py_ns:.2f}",
        file=sys.stderr,
    )
    print(json.dumps(summary))
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
