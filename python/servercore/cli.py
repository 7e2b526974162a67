"""The `servercore` command: the lecture's GameServer and DummyClient, a demo,
and the packet generator.

    servercore game-server [--host H] [--port P] [--tick SECONDS]
    servercore dummy-client [--host H] [--port P] [--clients N] [--print]
    servercore demo [--clients N] [--seconds S]
    servercore gen DEFINITIONS -o OUT [--namespace NS]
    servercore serve MODULE:SESSION_CLASS [--host H] [--port P] [--workers N]
                     [--metrics-port M] [--setup MODULE:FUNCTION] [--option KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import threading
import time
from collections.abc import Sequence

from servercore import Client, DisconnectReason, PacketSession, SendBuffer, Server

HELLO_ID = 1
HELLO_PAYLOAD = b"Hello World".ljust(1000, b"\0")
"""The lecture's broadcast: "Hello World" in a 1000-byte payload (a 1004-byte packet)."""
TICK_ID = 2
"""The demo's small packet for its tight broadcast loop."""


class GameSession(PacketSession):
    """The lecture's GameSession: joins the broadcast, logs what it is sent."""

    def on_recv_packet(self, packet_id: int, payload: bytes) -> None:
        logging.getLogger("servercore.game").debug("session %d sent packet %d (%d bytes)", self.id, packet_id, len(payload))


class DummySession(PacketSession):
    """The lecture's DummyClient session: receives Hello World, optionally prints it."""

    print_messages = False
    received: dict[int, int] = {}
    """Packets received per session id (class-wide, for the demo's checks)."""
    malformed = 0

    def on_recv_packet(self, packet_id: int, payload: bytes) -> None:
        if packet_id == TICK_ID:
            return
        if packet_id != HELLO_ID or payload != HELLO_PAYLOAD:
            type(self).malformed += 1
        DummySession.received[self.id] = DummySession.received.get(self.id, 0) + 1
        if self.print_messages:
            text = payload.split(b"\0", 1)[0].decode(errors="replace")
            print(f"[session {self.id}] {text}")


def cpu_seconds() -> float:
    """CPU time of this process (every thread), user plus system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def raise_fd_limit(wanted: int) -> None:
    """Each session is a file descriptor; lift the soft limit toward the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < wanted:
        print(f"warning: only {target} file descriptors allowed; {wanted} wanted", file=sys.stderr)


class RateLine:
    """Prints one status line per second from a service's counters."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.last = time.monotonic()
        self.last_packets = 0
        self.last_bytes = 0

    def maybe_print(self, sessions: int, packets: int, nbytes: int, direction: str) -> None:
        now = time.monotonic()
        elapsed = now - self.last
        if elapsed < 1.0:
            return
        pps = (packets - self.last_packets) / elapsed
        bps = (nbytes - self.last_bytes) / elapsed
        print(f"{self.label}: {sessions} sessions, {pps:,.0f} packets/s {direction}, {bps / 1e6:,.2f} MB/s {direction}", flush=True)
        self.last, self.last_packets, self.last_bytes = now, packets, nbytes


def game_server(args: argparse.Namespace) -> int:
    raise_fd_limit(args.max_sessions + 64)
    hello = SendBuffer(HELLO_ID, HELLO_PAYLOAD)
    # The lecture's DummyClients only listen: no first packet is owed.
    with Server(GameSession, args.host, args.port, max_sessions=args.max_sessions,
                first_packet_timeout=None) as server:
        print(f"game-server: listening on {server.host}:{server.port}, broadcasting Hello World every {args.tick}s", flush=True)
        line = RateLine("game-server")

        def report() -> None:
            stats = server.stats()
            line.maybe_print(len(server), stats["packets_out"], stats["bytes_out"], "out")

        server.call_every(args.tick, server.broadcast, hello)  # fixed rate: the tick does not drift
        server.call_every(0.5, report)
        if args.duration is not None:
            server.call_later(args.duration, server.stop)
        try:
            server.run_forever()
        except KeyboardInterrupt:
            print("game-server: stopping")
    return 0


def dummy_client(args: argparse.Namespace) -> int:
    raise_fd_limit(args.clients + 64)
    DummySession.print_messages = args.print
    with Client(DummySession, args.host, args.port, count=args.clients) as client:
        print(f"dummy-client: {len(client.sessions) or args.clients} sessions to {args.host}:{args.port}", flush=True)
        line = RateLine("dummy-client")
        deadline = None if args.duration is None else time.monotonic() + args.duration
        try:
            while (deadline is None or time.monotonic() < deadline) and client.stats()["sessions"] > 0:
                client.poll(timeout=0.1)
                if not args.print:
                    stats = client.stats()
                    line.maybe_print(len(client), stats["packets_in"], stats["bytes_in"], "in")
        except KeyboardInterrupt:
            print("dummy-client: stopping")
    return 0


def demo(args: argparse.Namespace) -> int:
    """GameServer and DummyClient in one process, checked end to end."""
    clients = args.clients
    raise_fd_limit(2 * clients + 64)
    DummySession.received = {}
    DummySession.malformed = 0
    hello = SendBuffer(HELLO_ID, HELLO_PAYLOAD)
    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        print(f"  [{'ok' if ok else 'FAILED'}] {what}", flush=True)
        if not ok:
            failures.append(what)

    if not args.verbose:
        # A thousand per-session disconnect lines would bury the checks; -v shows them.
        logging.getLogger("servercore").setLevel(logging.ERROR)
    print(f"servercore demo: a GameServer and a DummyClient of {clients} sessions on 127.0.0.1")
    with Server(GameSession, "127.0.0.1", 0, max_sessions=clients + 16, first_packet_timeout=None) as server:
        print(f"game-server listening on 127.0.0.1:{server.port}")
        started = time.perf_counter()
        client = Client(DummySession, "127.0.0.1", server.port, count=clients)
        client.start()
        deadline = time.monotonic() + 10
        while len(server) < clients and time.monotonic() < deadline:
            server.poll(0.01)
            client.poll(0)
        check(len(server) == clients, f"{len(server)} of {clients} clients connected in {(time.perf_counter() - started) * 1000:.0f} ms")

        print(f"broadcasting the 1004-byte Hello World every 250 ms for {args.seconds:g} s ...")
        ticks = 0
        received_before = client.stats()["packets_in"]
        cpu_before = cpu_seconds()
        tick_started = time.monotonic()
        next_tick = tick_started
        while time.monotonic() < tick_started + args.seconds:
            if time.monotonic() >= next_tick:
                server.broadcast(hello)
                ticks += 1
                next_tick += 0.25
            server.poll(0)
            client.poll(min(0.01, max(0.0, next_tick - time.monotonic())))
        settle = time.monotonic() + 2
        while sum(DummySession.received.values()) < ticks * clients and time.monotonic() < settle:
            client.poll(0.01)
            server.poll(0)
        elapsed = time.monotonic() - tick_started
        cpu = (cpu_seconds() - cpu_before) / elapsed
        got = sum(DummySession.received.values())
        all_got = sum(1 for n in DummySession.received.values() if n == ticks)
        check(all_got == clients and DummySession.malformed == 0,
              f"Hello World received by {all_got}/{clients} clients, {ticks} ticks each, none malformed")
        print(f"  {got:,} packets ({client.stats()['packets_in'] - received_before:,} counted by the client engine), "
              f"{got / elapsed:,.0f} packets/s, {got * 1004 / elapsed / 1e6:.1f} MB/s; "
              f"server and client together used {cpu:.1%} of one core")

        print("mass disconnect: every client closes at once while the server broadcasts in a tight loop ...")
        stopper = threading.Thread(target=client.stop)
        broadcasts = 0
        tick = SendBuffer(TICK_ID, b"tick")
        stopper.start()
        deadline = time.monotonic() + 15
        while (stopper.is_alive() or len(server) > 0) and time.monotonic() < deadline:
            server.broadcast(tick)
            broadcasts += 1
            server.poll(0)
        stopper.join()
        server.poll(0.05)
        del hello, tick  # the last references to pooled packets: their chunks must come back
        stats = server.stats()
        reasons = {name: n for name, n in stats["disconnects"].items() if n}
        check(len(server) == 0, f"server survived {broadcasts:,} broadcasts during the disconnect; {len(server)} sessions left")
        check(sum(reasons.values()) == clients, f"{sum(reasons.values())} on_disconnected delivered: {reasons}")
        if reasons.get("SEND_QUEUE_FULL") or reasons.get("RESET"):
            print("  (under a flood this hard some clients cannot close politely: RESET is a client whose\n"
                  "   close did not finish within its linger, SEND_QUEUE_FULL one the server had queued\n"
                  "   more than max_send_queue_bytes for; either way each got exactly one on_disconnected)")
        check(stats["send_queue_bytes"] == 0 and stats["pool_chunks_in_use"] == 0,
              f"send queues back to {stats['send_queue_bytes']} bytes, pool chunks in use {stats['pool_chunks_in_use']}")
    if failures:
        print(f"demo FAILED: {len(failures)} check(s) failed")
        return 1
    print("demo passed")
    return 0


def generate(args: argparse.Namespace) -> int:
    from servercore import gen

    return gen.main(args.definitions, args.out, args.namespace)


def serve(args: argparse.Namespace) -> int:
    from servercore.workers import serve as serve_workers

    logging.getLogger("servercore.supervisor").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    options: dict[str, object] = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--option {item!r}: write KEY=VALUE, the value in JSON (e.g. max_sessions=20000)")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value  # a bare string
    try:
        return serve_workers(
            args.target, args.host, args.port, args.workers, options, setup=args.setup,
            metrics_port=args.metrics_port, metrics_host=args.metrics_host, max_restarts=args.max_restarts,
            restart_window=args.restart_window, ready_file=args.ready_file,
        )
    except (OSError, ValueError, ImportError) as error:
        print(f"servercore serve: {error}", file=sys.stderr)
        return 1


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="servercore", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log servercore's debug lines")
    commands = parser.add_subparsers(dest="command", required=True)

    server = commands.add_parser("game-server", help="the lecture's GameServer: broadcast Hello World every tick")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=7777)
    server.add_argument("--tick", type=float, default=0.25, help="seconds between broadcasts (default 0.25)")
    server.add_argument("--max-sessions", type=int, default=10_000)
    server.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    server.set_defaults(run=game_server)

    client = commands.add_parser("dummy-client", help="the lecture's DummyClient: N sessions that receive Hello World")
    client.add_argument("--host", default="127.0.0.1")
    client.add_argument("--port", type=int, default=7777)
    client.add_argument("--clients", type=int, default=1000)
    client.add_argument("--print", action="store_true", help="print every message received")
    client.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    client.set_defaults(run=dummy_client)

    both = commands.add_parser("demo", help="server and 1000 clients on localhost for a few seconds, checked")
    both.add_argument("--clients", type=int, default=1000)
    both.add_argument("--seconds", type=float, default=2.0, help="how long to broadcast (default 2)")
    both.set_defaults(run=demo)

    gen = commands.add_parser("gen", help="packet classes for Python and C# from one definition (TOML or a .py module)")
    gen.add_argument("definitions", help="a .toml definition file, or a .py module of Packet classes")
    gen.add_argument("-o", "--out", required=True, help="the directory to write into")
    gen.add_argument("--namespace", default=None, help="the C# namespace (default: from the file's name)")
    gen.set_defaults(run=generate)

    workers = commands.add_parser("serve", help="a server as N worker processes on one port (SO_REUSEPORT), supervised")
    workers.add_argument("target", help="MODULE:SESSION_CLASS, importable by the workers")
    workers.add_argument("--host", default="0.0.0.0")
    workers.add_argument("--port", type=int, default=7777, help="0 picks a free port for all workers")
    workers.add_argument("--workers", type=int, default=None, help="worker processes (default: one per core)")
    workers.add_argument("--setup", default=None,
                         help="MODULE:FUNCTION called in each worker with its started Server; "
                              "what it returns, if callable, is the worker's on_stopping hook")
    workers.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                         help="a Server option, its value in JSON (repeatable)")
    workers.add_argument("--metrics-port", type=int, default=None,
                         help="serve every worker's Prometheus metrics here (0 picks a port)")
    workers.add_argument("--metrics-host", default="127.0.0.1")
    workers.add_argument("--max-restarts", type=int, default=5,
                         help="give up when more workers than this die within --restart-window")
    workers.add_argument("--restart-window", type=float, default=60.0, help="seconds (default 60)")
    workers.add_argument("--ready-file", default=None,
                         help="write {pid, port, metrics_port, workers} here as JSON once every worker is ready")
    workers.set_defaults(run=serve)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # `serve` logs like its workers (servercore.workers): one line each, stamped and named.
    fmt = ("%(asctime)s supervisor pid=%(process)d %(levelname)s %(name)s: %(message)s" if args.command == "serve"
           else "%(levelname)s %(name)s: %(message)s")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format=fmt)
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
