"""Chat bots: a servercore Client of N sessions that log in, join a room, talk,
and count what they hear (the lecture's DummyClient, for the chat example).

    python examples/chat/bot.py --port 7777 [--bots 20] [--rooms 4] [--lines 5]

Prints one line: how many lines each bot said and heard in all, and exits 0
if every bot heard every line of the other bots in its room.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from protocol import Join, Login, Said, Say, Welcome  # noqa: E402

from servercore import Client  # noqa: E402
from servercore.packets import RoutedSession, Router  # noqa: E402

router = Router("bot")
heard: dict[int, int] = {}
welcomed: set[int] = set()


class Bot(RoutedSession):
    router = router
    rooms = 1

    def on_connected(self) -> None:
        heard[self.id] = 0
        self.send(Login(name=f"bot{self.id}"))
        self.send(Join(room=f"room{self.id % self.rooms}"))


@router.on(Welcome)
def on_welcome(bot: Bot, packet: Welcome) -> None:
    welcomed.add(bot.id)


@router.on(Said)
def on_said(bot: Bot, packet: Said) -> None:
    heard[bot.id] += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=7777)
    parser.add_argument("--bots", type=int, default=20)
    parser.add_argument("--rooms", type=int, default=4)
    parser.add_argument("--lines", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=20.0)
    args = parser.parse_args()
    Bot.rooms = args.rooms
    with Client(Bot, "127.0.0.1", args.port, count=args.bots, packet_ids=router.packet_ids) as client:
        deadline = time.monotonic() + args.timeout
        while len(welcomed) < args.bots and time.monotonic() < deadline:
            client.poll(0.01)
        for line in range(args.lines):
            for bot in client.sessions:
                bot.send(Say(text=f"line {line} from bot{bot.id}"))
        per_room = [sum(1 for n in range(args.bots) if n % args.rooms == room) for room in range(args.rooms)]
        # Each bot hears every line of the others in its room.
        expected = sum(size * (size - 1) * args.lines for size in per_room)
        while sum(heard.values()) < expected and time.monotonic() < deadline:
            client.poll(0.01)
    total = sum(heard.values())
    print(f"{args.bots} bots in {args.rooms} rooms said {args.bots * args.lines} lines and heard {total} "
          f"(expected {expected})", flush=True)
    return 0 if total == expected and len(welcomed) == args.bots else 1


if __name__ == "__main__":
    sys.exit(main())
