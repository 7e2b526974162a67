"""Options and arguments from Python are checked at the door.

No value from Python can make the Rust side panic: a bad keyword option of
`Server(...)` or `Client(...)`, a bad `port` or `count`, a `poll()` timeout it
cannot wait, a packet id no integer type holds, each raises ValueError,
OverflowError or TypeError whose message names what was wrong, never
`pyo3_runtime.PanicException` (a BaseException, so `except Exception` would not
even see it). Durations are accepted up to one year; a year is also the
longest a deadline or the linger can be, and it works.
"""

from __future__ import annotations

import math
import threading

from servercore import Client, PacketSession, SendBuffer, Server

from support import connect, exchange, packet

ONE_YEAR = 365 * 24 * 3600
ACCEPTABLE = (ValueError, OverflowError, TypeError)
EXTREMES = [0, -1, 2**63, 2**64, 2**70, 1e300, math.inf, math.nan, "x", None]

# Each option, and which of the extreme values it accepts.
SHARED_OPTIONS: dict[str, list[object]] = {
    "io_threads": [None],
    "max_packet_size": [],
    "packet_ids": [None],
    "max_send_queue_bytes": [],
    "max_pending_recv_bytes": [],
    "packet_timeout": [None],
    "idle_timeout": [None],
    "max_packets_per_second": [None],
    "linger": [0],
    "nodelay": [],
    "keepalive": [],
}
SERVER_OPTIONS = {**SHARED_OPTIONS, "max_sessions": [], "backlog": []}
CLIENT_OPTIONS = {**SHARED_OPTIONS, "connect_timeout": []}
BAD_PACKET_ID_SETS = [{70000}, {-1}, {2**70}]


def accepted(value: object, allowed: list[object]) -> bool:
    return any(value is a or (type(value) is type(a) and value == a) for a in allowed)


Errors = type[BaseException] | tuple[type[BaseException], ...]


def refusal(make, text: str, errors: Errors = ACCEPTABLE) -> str | None:
    """None if `make()` raised one of `errors` saying `text` (an option's name, say);
    else what happened."""
    try:
        made = make()
    except errors as error:
        if text not in str(error):
            return f"{type(error).__name__} that does not say {text!r}: {error}"
        return None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as error:  # pyo3_runtime.PanicException is a BaseException
        return f"{type(error).__module__}.{type(error).__name__}: {error}"
    del made
    return "accepted"


def make_server(**options):
    return lambda: Server(PacketSession, "127.0.0.1", 0, **options)


def make_client(**options):
    return lambda: Client(PacketSession, "127.0.0.1", 1, **options)


def test_every_option_rejects_extreme_values_with_an_error_naming_it():
    problems = []
    for kind, options, make in (("Server", SERVER_OPTIONS, make_server), ("Client", CLIENT_OPTIONS, make_client)):
        for name, allowed in options.items():
            values = EXTREMES + (BAD_PACKET_ID_SETS if name == "packet_ids" else [])
            for value in values:
                if accepted(value, allowed):
                    continue
                problem = refusal(make(**{name: value}), name)
                if problem:
                    problems.append(f"{kind}({name}={value!r}): {problem}")
    assert problems == [], f"{len(problems)} bad values not refused properly:\n" + "\n".join(problems)


def test_client_rejects_the_server_only_options_with_a_type_error_naming_them():
    problems = [
        f"Client({name}=10): {problem}"
        for name in ("max_sessions", "backlog")
        if (problem := refusal(make_client(**{name: 10}), name, TypeError))
    ]
    assert problems == [], "\n".join(problems)


def test_port_and_count_out_of_range_are_rejected_naming_them():
    cases = [
        ("Server(port=70000)", lambda: Server(PacketSession, "127.0.0.1", 70000), "port"),
        ("Server(port=-1)", lambda: Server(PacketSession, "127.0.0.1", -1), "port"),
        ("Client(port=2**70)", lambda: Client(PacketSession, "127.0.0.1", 2**70), "port"),
        ("Client(count=2**70)", lambda: Client(PacketSession, "127.0.0.1", 1, count=2**70), "count"),
        ("Client(count=0)", lambda: Client(PacketSession, "127.0.0.1", 1, count=0), "count"),
    ]
    problems = [f"{call}: {problem}" for call, make, name in cases if (problem := refusal(make, name))]
    assert problems == [], "\n".join(problems)


def test_poll_rejects_a_timeout_it_cannot_wait_naming_it(start_server):
    server = start_server(PacketSession)
    problems = []
    for timeout in (1e19, math.inf, -1, math.nan):
        # In a thread: a poll that accepted the timeout would wait it out.
        outcome: list[str | None] = []
        thread = threading.Thread(
            target=lambda: outcome.append(refusal(lambda: server.poll(timeout), "timeout")), daemon=True
        )
        thread.start()
        thread.join(2)
        if thread.is_alive():
            problems.append(f"poll({timeout!r}) accepted the timeout and is waiting")
            break  # it holds the poll: stop() at teardown ends it
        if outcome[0]:
            problems.append(f"poll({timeout!r}): {outcome[0]}")
    assert problems == [], "\n".join(problems)


def test_a_packet_id_no_int_type_holds_is_a_value_error_saying_the_range(start_server, raw_peers):
    server = start_server(PacketSession)
    connect(server, raw_peers)
    (session,) = server.sessions
    cases = (
        ("session.send(2**70, b'')", lambda: session.send(2**70, b"")),
        ("server.broadcast(2**70, b'')", lambda: server.broadcast(2**70, b"")),
        ("SendBuffer(2**70, b'')", lambda: SendBuffer(2**70, b"")),
    )
    saying = "packet_id must be an integer from 0 to 65535, got 1180591620717411303424"
    problems = [f"{call}: {problem}" for call, make in cases if (problem := refusal(make, saying, ValueError))]
    assert problems == [], "\n".join(problems)


def test_deadlines_and_linger_of_one_year_work(start_server, raw_peers):
    class Echo(PacketSession):
        def on_recv_packet(self, packet_id, payload):
            self.send(packet_id, payload)

    server = start_server(Echo, idle_timeout=ONE_YEAR, packet_timeout=ONE_YEAR, linger=ONE_YEAR)
    (peer,) = connect(server, raw_peers)
    assert exchange(server, peer, packet(1, b"a year is fine")) == (1, b"a year is fine")
    peer.close()  # before the fixture stops the server: a year's linger waits for the peer's FIN


def test_durations_over_one_year_are_rejected_with_a_value_error_naming_them():
    over = ONE_YEAR + 1
    cases = [("Server", name, make_server(**{name: over})) for name in ("packet_timeout", "idle_timeout", "linger")]
    cases += [("Client", name, make_client(**{name: over}))
              for name in ("packet_timeout", "idle_timeout", "linger", "connect_timeout")]
    problems = [
        f"{kind}({name}={over}): {problem}"
        for kind, name, make in cases
        if (problem := refusal(make, name, ValueError))
    ]
    assert problems == [], "\n".join(problems)
