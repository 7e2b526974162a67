"""A server that run_forever()s in its own process, for the drain tests
(tests/test_drain.py), which signal it.

    python tests/drain_server.py [--grace S] [--goodbye-bytes N] [--hook-raises]

Prints `listening <port>`, `connected <id>` per session, `on_stopping <thread>
<sessions>`, `disconnected <id> <REASON>` per session, then `returned
<SIGINT disposition after run_forever>` and exits 0. on_stopping broadcasts a
goodbye (`--goodbye-bytes` of zeros, in packets 9 of up to 1000 bytes) to
every session.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from servercore import DisconnectReason, PacketSession, Server


def say(*words: object) -> None:
    print(*words, flush=True)


class Player(PacketSession):
    def on_connected(self) -> None:
        say("connected", self.id)

    def on_recv_packet(self, packet_id: int, payload: bytes) -> None:
        self.send(packet_id, payload)

    def on_disconnected(self, reason: DisconnectReason) -> None:
        say("disconnected", self.id, reason.name)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grace", type=float, default=5.0)
    parser.add_argument("--goodbye-bytes", type=int, default=16)
    parser.add_argument("--hook-raises", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    server = Server(Player, "127.0.0.1", 0, io_threads=1, shutdown_grace=args.grace,
                    max_send_queue_bytes=64 << 20)

    def on_stopping() -> None:
        say("on_stopping", threading.current_thread().name, len(server))
        goodbye = bytes(args.goodbye_bytes)
        for offset in range(0, len(goodbye), 1000):
            server.broadcast(9, goodbye[offset:offset + 1000])
        if args.hook_raises:
            raise RuntimeError("the save failed")

    with server:
        say("listening", server.port)
        server.run_forever(on_stopping=on_stopping)
    restored = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    say("returned", "restored" if restored else "not-restored")
    return 0


if __name__ == "__main__":
    sys.exit(main())
