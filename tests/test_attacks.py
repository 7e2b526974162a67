"""The hostile-client attacks of SECURITY.md at full size, against a server
with the shipped defaults, the attacker a process of its own on 127.0.0.2
(tests/attacker.py) and honest players on other addresses.

For each: honest players are answered within a second during the attack and
after it, the attacker's connections are shed before any Python runs, and
the log stays within a stated bound. The attacker prints what it managed, so
a failure says how hard the server was pushed.
"""

from __future__ import annotations

import json
import logging
import pathlib
import subprocess
import sys
import time

from servercore import PacketSession

from support import SEQ, exchange, packet, poll_until

ATTACKER = pathlib.Path(__file__).with_name("attacker.py")
ECHO_ID = 7
# Refusals are logged once per 5 s a kind, farewells 5 a reason per 10 s plus
# a summary: an attack of a few seconds writes a handful of lines, however big.
MAX_LOG_LINES = 20


class Echo(PacketSession):
    def on_recv_packet(self, packet_id, payload):
        self.send(packet_id, payload)


def serve_honest_players_while(server, attacker, honest, raw_peers, limit: float = 60.0) -> float:
    """Echoes with `honest` every 20 ms, and lets a newcomer from another
    address join every 0.5 s, until the attacker exits; the slowest answer."""
    slowest = 0.0
    started = time.monotonic()
    last_newcomer = started
    round_ = 0
    while attacker.poll() is None:
        assert time.monotonic() - started < limit, "the attacker did not finish"
        began = time.monotonic()
        assert exchange(server, honest, packet(ECHO_ID, SEQ.pack(round_))) == (ECHO_ID, SEQ.pack(round_))
        slowest = max(slowest, time.monotonic() - began)
        if began - last_newcomer > 0.5:
            last_newcomer = began
            began = time.monotonic()
            newcomer = raw_peers(server.port, source="127.0.0.4")
            assert exchange(server, newcomer, packet(ECHO_ID, b"hello")) == (ECHO_ID, b"hello")
            slowest = max(slowest, time.monotonic() - began)
            newcomer.close()
        round_ += 1
        time.sleep(0.02)
    return slowest


def run_attacker(*args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(ATTACKER), *map(str, args)], stdout=subprocess.PIPE, text=True
    )


def finish(attacker: subprocess.Popen[str]) -> dict:
    out, _ = attacker.communicate(timeout=30)
    assert attacker.returncode == 0, out
    return json.loads(out)


def attack(server, raw_peers, *args: object) -> tuple[dict, float]:
    """Runs the attacker (`args` for tests/attacker.py) while honest players
    on 127.0.0.3 and 127.0.0.4 are served; what the attacker did, and the
    slowest honest answer. An honest player is answered after it too."""
    honest = raw_peers(server.port, source="127.0.0.3")
    attacker = run_attacker(args[0], server.port, "127.0.0.2", *args[1:])
    try:
        slowest = serve_honest_players_while(server, attacker, honest, raw_peers)
    finally:
        attacker.kill()
    done = finish(attacker)
    assert exchange(server, honest, packet(ECHO_ID, b"after")) == (ECHO_ID, b"after")
    return done, slowest


def servercore_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "servercore" and r.levelno >= logging.WARNING]


def test_twelve_thousand_silent_connections_from_one_machine_lock_nobody_out(start_server, raw_peers, caplog):
    """The issue's slot exhaustion: one address opens 12,000 connections at
    once and sends nothing. The per-address rate and limit refuse all but a
    burst of them at accept; max_sessions is never near."""
    server = start_server(Echo)
    with caplog.at_level(logging.WARNING, logger="servercore"):
        done, slowest = attack(server, raw_peers, "silent", 12_000, 3)
        poll_until(server, lambda: server.stats()["accepted"] >= done["established"], timeout=10,
                   message=lambda: f"{server.stats()['accepted']} accepted, attacker: {done}")
    stats = server.stats()
    summary = f"attacker: {done}; server: accepted {stats['accepted']}, rejected_rate {stats['rejected_rate']}, " \
              f"rejected_per_address {stats['rejected_per_address']}; slowest honest answer {slowest * 1e3:.0f} ms; " \
              f"{len(servercore_warnings(caplog))} log lines"
    print(summary)
    assert done["sockets"] == 12_000, summary
    assert done["established"] >= 10_000, summary
    assert slowest < 1.0, summary
    assert done["still_open"] <= 64, summary
    assert stats["rejected_rate"] + stats["rejected_per_address"] >= done["established"] - 64, summary
    assert stats["rejected"] == 0, summary  # max_sessions was never the limit
    assert len(servercore_warnings(caplog)) <= MAX_LOG_LINES, servercore_warnings(caplog)


def test_a_connection_churn_from_one_machine_is_shed_and_logs_a_handful_of_lines(start_server, raw_peers, caplog):
    """The issue's churn: connect, send a bad header, reset, as fast as one
    attacker process can, for 10 s (the issue's figures: about 32,000 a
    second; one Python process here makes about 26,000)."""
    server = start_server(Echo)
    with caplog.at_level(logging.WARNING, logger="servercore"):
        done, slowest = attack(server, raw_peers, "churn", 10)
        poll_until(server, lambda: server.stats()["accepted"] >= done["connections"] * 0.9, timeout=10)
        server.stop()
    stats = server.stats()
    summary = f"attacker: {done}; server: accepted {stats['accepted']}, rejected_rate {stats['rejected_rate']}; " \
              f"slowest honest answer {slowest * 1e3:.0f} ms; {len(servercore_warnings(caplog))} log lines"
    print(summary)
    assert done["connections"] >= 20_000, summary
    assert slowest < 1.0, summary
    # A burst of 40, then 20 a second; the rest never became sessions.
    admitted = stats["accepted"] - stats["rejected_rate"]
    assert admitted <= 40 + 20 * done["seconds"] + 60, summary  # + the honest newcomers
    assert len(servercore_warnings(caplog)) <= MAX_LOG_LINES, servercore_warnings(caplog)
