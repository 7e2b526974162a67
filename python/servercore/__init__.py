"""servercore: MMO-style game servers and load-test clients in Python.

Subclass :class:`PacketSession`, override its callbacks, and hand the class to a
:class:`Server` (or a :class:`Client` for load tests). Sockets, framing, send
queues and broadcast run in Rust on tokio; callbacks run on the thread that
calls ``poll()`` or ``run_forever()``, or on the running asyncio loop under
``async with server: await server.serve_forever()``, where callbacks may be
``async def``. ``await connect(host, port)`` gives one awaitable connection,
for bots and tests (and ``servercore.testing`` fixtures for pytest).

    from servercore import PacketSession, Server

    class Echo(PacketSession):
        def on_recv_packet(self, packet_id, payload):
            self.send(packet_id, payload)

    with Server(Echo, port=7777) as server:
        server.run_forever()
"""

from __future__ import annotations

from servercore._core import (
    HEADER_SIZE,
    MAX_PACKET_SIZE,
    Bus,
    Client,
    PacketSession,
    Room,
    SendBuffer,
    Server,
    Service,
    Session,
    Timer,
    __version__,
)
from servercore._connection import Connection, Disconnected, connect
from servercore._reason import DisconnectReason

__all__ = [
    "HEADER_SIZE",
    "MAX_PACKET_SIZE",
    "Bus",
    "Client",
    "Connection",
    "DisconnectReason",
    "Disconnected",
    "PacketSession",
    "Room",
    "SendBuffer",
    "Server",
    "Service",
    "Session",
    "Timer",
    "__version__",
    "connect",
]
