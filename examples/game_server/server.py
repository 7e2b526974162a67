"""The lecture's GameServer, on the toolkit.

    python examples/game_server/server.py [--port 7777] [--tick 0.25]

Every player is in one Room; a fixed-rate timer broadcasts the lecture's
1004-byte Hello World to it every tick (`call_every`: no drift, late ticks
counted); a player that vanishes mid-broadcast leaves the room by itself.
SIGTERM or Ctrl-C drains: a goodbye to everyone, then every session flushes
and closes. Prints `listening <port>`, and on the way out the ticks it ran.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Annotated

from servercore import DisconnectReason, Room, SendBuffer, Server
from servercore.packets import Max, Packet, RoutedSession, Router


class HelloWorld(Packet, id=1):
    text: Annotated[str, Max(1000)]


class Goodbye(Packet, id=2):
    reason: Annotated[str, Max(100)]


world = Room()
router = Router("game")  # the clients only listen in the lecture


class Player(RoutedSession):
    router = router

    def on_connected(self) -> None:
        world.add(self)

    def on_disconnected(self, reason: DisconnectReason) -> None:
        pass  # it has left the world already


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=7777)
    parser.add_argument("--tick", type=float, default=0.25)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    # The lecture's DummyClients only listen: no first packet is owed.
    server = Server(Player, "127.0.0.1", args.port, packet_ids=router.packet_ids, max_sessions=20_000,
                    first_packet_timeout=None)
    # Encoded once, sent to everyone every tick: the lecture's SendBuffer.
    hello = SendBuffer(HelloWorld.packet_id, HelloWorld(text="Hello World".ljust(1000, ".")).encode())
    tick = server.call_every(args.tick, world.broadcast, hello)

    def on_stopping() -> None:
        world.broadcast(Goodbye(reason="server shutting down"))

    with server:
        print(f"listening {server.port}", flush=True)
        server.run_forever(on_stopping=on_stopping)
    print(f"stopped; late ticks {tick.late_ticks}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
