"""A chat server on the toolkit: typed packets, two routers, rooms, a drain.

    python examples/chat/server.py [--port 7777]

A player logs in (the lobby router takes only Login), then joins rooms and
talks in them (the world router). Rooms are servercore Rooms: a player who
vanishes leaves them by itself. SIGTERM or Ctrl-C tells everyone and drains.
Prints `listening <port>` once ready.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from protocol import Join, Login, Said, Say, Welcome  # noqa: E402

from servercore import DisconnectReason, Room, Server  # noqa: E402
from servercore.packets import RoutedSession, Router  # noqa: E402

lobby, world = Router("lobby"), Router("world")
rooms: dict[str, Room] = {}


class Player(RoutedSession):
    router = lobby
    name = ""
    room: Room | None = None

    def on_disconnected(self, reason: DisconnectReason) -> None:
        # No room bookkeeping: the session has left its rooms already.
        logging.info("%s left: %s", self.name or f"session {self.id}", reason.name)


@lobby.on(Login)
def login(player: Player, packet: Login) -> None:
    player.name = packet.name
    player.router = world


@world.on(Join)
def join(player: Player, packet: Join) -> None:
    if player.room is not None:
        player.room.remove(player)
    room = rooms.setdefault(packet.room, Room())
    room.add(player)
    player.room = room
    player.send(Welcome(room=packet.room, members=[member.name for member in room]))


@world.on(Say)
def say(player: Player, packet: Say) -> None:
    if player.room is not None:
        player.room.broadcast(Said(name=player.name, text=packet.text), exclude=player)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=7777)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    server = Server(Player, "127.0.0.1", args.port, packet_ids=lobby.packet_ids | world.packet_ids)

    def on_stopping() -> None:
        for room in rooms.values():
            room.broadcast(Said(name="server", text="the server is going down; see you soon"))

    with server:
        print(f"listening {server.port}", flush=True)
        server.run_forever(on_stopping=on_stopping)
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
