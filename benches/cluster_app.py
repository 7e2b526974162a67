"""The game of benches/cluster.py: what each `servercore serve` worker runs.

Every worker attaches a Bus (setup). A client's 0xFFF1 query is answered
(its session is announced); its 0xFFF0 control packet makes that worker
publish `packets` bus broadcasts of `[seq u32][publish time u64 ns]` plus
padding, as fast as it can or one every `interval_us`, which every worker
fans out to its own sessions.
"""

from __future__ import annotations

import os
import struct
import time

from servercore import Bus, PacketSession, Server, Timer

ID_BROADCAST = 1
ID_CONTROL = 0xFFF0
ID_QUERY = 0xFFF1
STAMP = struct.Struct("<IQ")

bus: Bus | None = None
server: Server | None = None


class Player(PacketSession):
    def on_recv_packet(self, packet_id: int, payload: bytes) -> None:
        if packet_id == ID_QUERY:
            self.send(ID_QUERY, struct.pack("<I", len(server) if server else 0))
        elif packet_id == ID_CONTROL:
            publish(*struct.unpack_from("<III", payload))


def publish(packets: int, size: int, interval_us: int) -> None:
    assert bus is not None and server is not None
    pad = bytes(size - STAMP.size)
    if interval_us == 0:
        for seq in range(packets):
            if not bus.broadcast(ID_BROADCAST, STAMP.pack(seq, time.monotonic_ns()) + pad):
                raise RuntimeError(f"publish {seq} failed: {bus.stats()}")
        return
    sent = 0
    timer: Timer | None = None

    def tick() -> None:
        nonlocal sent
        if not bus.broadcast(ID_BROADCAST, STAMP.pack(sent, time.monotonic_ns()) + pad):
            raise RuntimeError(f"publish {sent} failed: {bus.stats()}")
        sent += 1
        if sent == packets and timer is not None:
            timer.cancel()

    timer = server.call_every(interval_us / 1e6, tick)


def setup(started: Server):
    global bus, server
    server = started
    bus = Bus(started, os.environ["SERVERCORE_BUS_URL"], node=f"worker-{os.getpid()}")
    deadline = time.monotonic() + 10
    while not bus.connected:
        if time.monotonic() > deadline:
            raise RuntimeError("the bus did not connect within 10 s")
        time.sleep(0.01)
    return bus.close
