"""A game for tests/test_workers.py, imported by each worker process.

Packet 7 is echoed; packet 8 is answered with the worker's pid (packet 8,
u32), so a client can tell which worker it reached. `setup` says goodbye to
every session when the worker drains; `crash_soon` makes a worker die a
moment after it is ready; `broken_setup` raises.
"""

from __future__ import annotations

import os
import struct
import threading

from servercore import PacketSession, Server

PID = struct.Struct("<I")
GOODBYE_ID = 9


class Echo(PacketSession):
    def on_recv_packet(self, packet_id: int, payload: bytes) -> None:
        if packet_id == 8:
            self.send(8, PID.pack(os.getpid()))
        else:
            self.send(packet_id, payload)


def setup(server: Server):
    def on_stopping() -> None:
        server.broadcast(GOODBYE_ID, b"bye")

    return on_stopping


def broken_setup(server: Server) -> None:
    raise RuntimeError("the game's setup is broken")


def crash_soon(server: Server) -> None:
    threading.Timer(0.3, os._exit, (3,)).start()
