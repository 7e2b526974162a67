"""The lecture's DummyClient, on the toolkit: N sessions that count the
GameServer's Hello World and wait for its goodbye.

    python examples/game_server/dummy_client.py --port 7777 [--clients 1000] [--hellos 4]

Exits 0 once every session got at least `--hellos` Hello Worlds (each
decoded and checked), and prints how many in all; 1 on a timeout.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from server import Goodbye, HelloWorld  # noqa: E402

from servercore import Client  # noqa: E402
from servercore.packets import RoutedSession, Router  # noqa: E402

router = Router("dummy")
hellos: dict[int, int] = {}
goodbyes: set[int] = set()


@router.on(HelloWorld)
def on_hello(session: RoutedSession, packet: HelloWorld) -> None:
    assert packet.text.startswith("Hello World")
    hellos[session.id] = hellos.get(session.id, 0) + 1


@router.on(Goodbye)
def on_goodbye(session: RoutedSession, packet: Goodbye) -> None:
    goodbyes.add(session.id)


class Dummy(RoutedSession):
    router = router


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=7777)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--hellos", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()
    with Client(Dummy, "127.0.0.1", args.port, count=args.clients, packet_ids=router.packet_ids) as client:
        deadline = time.monotonic() + args.timeout
        done = lambda: len(hellos) == args.clients and min(hellos.values()) >= args.hellos  # noqa: E731
        while not done() and time.monotonic() < deadline:
            client.poll(0.05)
        print(f"{len(hellos)} sessions got {sum(hellos.values())} Hello Worlds "
              f"(fewest {min(hellos.values(), default=0)})", flush=True)
        if not done():
            return 1
        # Stay until the server says goodbye (when the test stops it), or a while.
        goodbye_deadline = time.monotonic() + 10
        while len(goodbyes) < args.clients and time.monotonic() < goodbye_deadline and len(client) > 0:
            client.poll(0.05)
        print(f"{len(goodbyes)} goodbyes", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
