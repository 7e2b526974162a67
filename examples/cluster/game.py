"""A chat that spans worker processes: `servercore serve` with a Bus.

    redis-server --port 6379 --save "" &
    SERVERCORE_BUS_URL=redis://127.0.0.1:6379/0 \\
        servercore serve game:Player --port 7777 --workers 4 --setup game:setup

(run from this directory, or put it on PYTHONPATH). Packets, each
`[size u16][id u16][payload]`:

- LOGIN (1), payload a name: joins the room "world" on whichever worker took
  the connection, and puts name -> this session in the cluster's directory;
  answered with WELCOME (5), payload the worker's name in the cluster;
- CHAT (2), payload text: to every member of "world", on every worker;
- WHISPER (3), payload `name\\0text`: to that player, wherever they are
  (the text comes as WHISPER; an unknown name gets NOBODY (4) back).
"""

from __future__ import annotations

import os

from servercore import Bus, PacketSession, Server

LOGIN, CHAT, WHISPER, NOBODY, WELCOME = 1, 2, 3, 4, 5


class Player(PacketSession):
    bus: Bus

    def on_recv_packet(self, packet_id: int, payload: bytes) -> None:
        if packet_id == LOGIN:
            self.bus.room("world").add(self)
            self.bus.register(bytes(payload).decode(), self)
            self.send(WELCOME, self.bus.node.encode())
        elif packet_id == CHAT:
            self.bus.publish("world", CHAT, payload)
        elif packet_id == WHISPER:
            name, _, text = bytes(payload).partition(b"\0")
            # A Redis round trip on the polling thread; a game with many
            # whispers would keep its own cache of addresses.
            address = self.bus.lookup(name.decode())
            if address is None or not self.bus.send_to(address, WHISPER, text):
                self.send(NOBODY, name)


def setup(server: Server):
    """Called by each worker with its started Server (`--setup game:setup`)."""
    Player.bus = Bus(server, os.environ.get("SERVERCORE_BUS_URL", "redis://127.0.0.1:6379/0"))
    return Player.bus.close  # the worker's on_stopping
