"""What typed packets and routing cost per packet, against a raw
on_recv_packet of the same bytes.

A one-connection flood (`loadgen flood`, packet id 1, 12-byte payloads) into
three session classes, each counting packets the same way:

- raw: `on_recv_packet(packet_id, payload)` with the bytes as they came;
- hand-written: what routing replaces, an `if packet_id == MOVE:` chain and
  `struct.unpack` of the payload into three locals;
- if/elif + decode: the same chain, with the typed packet: `Move.decode`
  and a call of `on_move(session, move)`; against typed, this is the cost
  of routing alone;
- typed: a `RoutedSession` whose router decodes a `Move(Packet, id=1)`
  (x: f32, y: f32, seq: u32) and calls `on_move(session, move)` (the engine
  does both, with no Python frame in between).

The polling thread's CPU per packet (time.thread_time() around the whole
run) is the cost of receiving: the engine's dispatch, the decode, the call.
The three alternate, `--repeat` times; medians, ranges, and ratios to raw
are printed (stderr), with one JSON line on stdout.

    python benches/typed_dispatch.py [--packets 1000000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import sys
import time
from typing import Any

from dispatch_floor import LOADGEN, end_flood, start_flood

from servercore import PacketSession, Server
from servercore.packets import Packet, RoutedSession, Router, f32, u32

PAYLOAD_SIZE = 12
received = 0


class Move(Packet, id=1):
    x: f32
    y: f32
    seq: u32


class Raw(PacketSession):
    def on_recv_packet(self, packet_id: int, payload: bytes) -> None:
        global received
        received += 1


MOVE_LAYOUT = struct.Struct("<ffI")


class HandWritten(PacketSession):
    def on_recv_packet(self, packet_id: int, payload: bytes) -> None:
        global received
        if packet_id == 1:
            x, y, seq = MOVE_LAYOUT.unpack(payload)
            received += 1
        elif packet_id == 2:
            pass


router = Router()


@router.on(Move)
def on_move(session: RoutedSession, move: Move) -> None:
    global received
    received += 1


class Typed(RoutedSession):
    router = router


class ChainDecoding(PacketSession):
    def on_recv_packet(self, packet_id: int, payload: bytes) -> None:
        if packet_id == 1:
            on_move(self, Move.decode(payload))  # type: ignore[arg-type]
        elif packet_id == 2:
            pass


PATHS = {"raw": Raw, "hand-written": HandWritten, "if/elif + decode": ChainDecoding, "typed": Typed}


def measure(session_class: type[PacketSession], packets: int, timeout: float) -> dict[str, Any]:
    global received
    received = 0
    server = Server(session_class, "127.0.0.1", 0, packet_ids={1, 2})
    server.start()
    try:
        cpu_before = time.thread_time()
        flood = start_flood(server.port, packets, PAYLOAD_SIZE, 1, timeout)
        deadline = time.monotonic() + timeout
        try:
            while received < packets:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{received} of {packets} packets within {timeout} s")
                server.poll(0.05)
            cpu = time.thread_time() - cpu_before
            # Before the flood lets its connection go: a malformed packet would show here.
            disconnects = {k: v for k, v in server.stats()["disconnects"].items() if v}
        finally:
            end_flood(flood)
    finally:
        server.stop()
    if disconnects:
        raise RuntimeError(f"sessions were disconnected during the flood: {disconnects}")
    return {"packets": received, "thread_cpu_s": cpu, "ns_per_packet": cpu / packets * 1e9}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packets", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    if not LOADGEN.exists():
        print(f"{LOADGEN} not found: cargo build --release in benches/loadgen (benches/run.py does)", file=sys.stderr)
        return 2
    names = list(PATHS)
    runs: list[dict[str, dict[str, Any]]] = []
    for rep in range(args.repeat):
        order = names[rep % len(names):] + names[:rep % len(names)]
        measured = {name: measure(PATHS[name], args.packets, args.timeout) for name in order}
        runs.append(measured)
        print(f"run {rep + 1}: " + ", ".join(f"{n} {measured[n]['ns_per_packet']:.1f} ns" for n in names),
              file=sys.stderr)
    medians = {n: statistics.median(r[n]["ns_per_packet"] for r in runs) for n in names}
    ranges = {n: [round(min(r[n]["ns_per_packet"] for r in runs), 1), round(max(r[n]["ns_per_packet"] for r in runs), 1)]
              for n in names}
    ratios = {n: round(medians[n] / medians["raw"], 3) for n in names if n != "raw"}
    print("median ns/packet: " + ", ".join(f"{n} {medians[n]:.1f}" for n in names)
          + "; ratio to raw: " + ", ".join(f"{n} {r:.2f}" for n, r in ratios.items()), file=sys.stderr)
    print(json.dumps({"workload": "TYPED_DISPATCH", "packets": args.packets, "payload_size": PAYLOAD_SIZE,
                      "ns_per_packet": {n: round(v, 1) for n, v in medians.items()}, "min_max": ranges,
                      "ratio_to_raw": ratios, "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
