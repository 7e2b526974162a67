"""The workloads: their full and quick parameters, which servers run each, and
one run of each against one server, returning one JSON-able record (DISPATCH
runs in-process, servercore only, through dispatch_floor.py).

Every run that drives the load client to completion also reads the server's
CPU-time clock (all threads) just before the load client starts and just after
it exits: `server_cpu_seconds`, and per unit of work (`server_cpu_us_per_*`).
That interval includes connecting and the ready check or probes, a few ms
that weigh the same for every server."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any, Callable

from .common import BENCHES, LOADGEN, REPO
from .processes import HeldClients, ServerProcess, cpu_clock_seconds, cpu_seconds, last_json, loadgen, settled_rss

ALL_WORKLOADS = ["B1", "E1", "L1", "R1", "R1RAW", "RAW", "M1", "HELLO", "DISPATCH"]

# Servers that run each workload (the rest of --servers is skipped for it).
# epoll (epoll_floor.rs) has only the broadcast, hello and idle modes.
SUPPORTED: dict[str, tuple[str, ...]] = {
    "B1": ("servercore", "asyncio", "uvloop", "floor", "epoll"),
    "E1": ("servercore", "servercore-uvloop", "asyncio", "uvloop", "floor"),
    "L1": ("servercore", "servercore-uvloop", "asyncio", "uvloop", "floor"),
    "R1": ("servercore", "servercore-uvloop", "asyncio", "uvloop", "floor"),
    "R1RAW": ("servercore", "servercore-uvloop", "asyncio", "uvloop", "floor"),
    "RAW": ("servercore", "servercore-uvloop", "asyncio", "uvloop", "floor"),
    "M1": ("servercore", "servercore-uvloop", "asyncio", "uvloop", "floor", "epoll"),
    "HELLO": ("servercore", "asyncio", "uvloop", "floor", "epoll"),
    "DISPATCH": ("servercore",),
}


def servers_for(workload: str, servers: list[str]) -> list[str]:
    """The servers of `servers` that run `workload`, in the order given."""
    return [s for s in servers if s in SUPPORTED[workload]]

# Parameters per workload: the full run, and --quick.
FULL: dict[str, dict[str, Any]] = {
    "B1": {"clients": 1000, "packets": 5000, "size": 64},
    "E1": {"clients": 1000, "inflight": 32, "count": 2000, "size": 16},
    "L1": {"clients": 100, "count": 2000, "size": 16},
    # One request at a time on each of 3 connections: per-request cost, not batching.
    "R1": {"clients": 3, "count": 10_000, "size": 1000},
    # The same, unframed (uvloop's own examples/bench/echoclient.py).
    "R1RAW": {"clients": 3, "inflight": 1, "count": 10_000, "size": 1000},
    # 8 in flight: 8 KB per connection waiting at every read (servercore reads
    # raw sessions 8 KiB at a time), so no server ever waits for the client.
    "RAW": {"clients": 100, "inflight": 8, "count": 5000, "size": 1000},
    "M1": {"clients": 10_000},
    "HELLO": {"clients": 1000, "seconds": 10.0},
    "DISPATCH": {"packets": 1_000_000, "size": 8},
}
QUICK: dict[str, dict[str, Any]] = {
    "B1": {"clients": 50, "packets": 200, "size": 64},
    "E1": {"clients": 50, "inflight": 8, "count": 200, "size": 16},
    "L1": {"clients": 20, "count": 200, "size": 16},
    "R1": {"clients": 3, "count": 500, "size": 1000},
    "R1RAW": {"clients": 3, "inflight": 1, "count": 500, "size": 1000},
    "RAW": {"clients": 20, "inflight": 8, "count": 200, "size": 1000},
    "M1": {"clients": 500, "settle": 1.0},
    "HELLO": {"clients": 100, "seconds": 2.0, "warmup": 0.5},
    "DISPATCH": {"packets": 100_000, "size": 8, "inner_repeat": 1},
}


# Per workload: the load client's count of work done, the key of the server's
# CPU per unit of it, and that key's unit (µs per round trip or message, ns
# per broadcast packet delivered).
CPU_UNITS: dict[str, tuple[str, str, float]] = {
    "B1": ("total_packets", "server_cpu_ns_per_packet", 1e9),
    "E1": ("round_trips", "server_cpu_us_per_round_trip", 1e6),
    "L1": ("round_trips", "server_cpu_us_per_round_trip", 1e6),
    "R1": ("round_trips", "server_cpu_us_per_round_trip", 1e6),
    "R1RAW": ("messages", "server_cpu_us_per_message", 1e6),
    "RAW": ("messages", "server_cpu_us_per_message", 1e6),
}


def run_loadgen(server: str, mode: str, arguments: list[str], timeout: float, workload: str) -> dict[str, Any]:
    """Starts `server` in `mode`, runs the load client with `arguments` against
    it, and reads the server's CPU clock around the load client's run."""
    with ServerProcess(server, mode) as srv:
        try:
            c0, t0 = cpu_clock_seconds(srv.pid), time.monotonic()
            result = loadgen([arguments[0], "--port", str(srv.port), *arguments[1:]], timeout)
            c1, t1 = cpu_clock_seconds(srv.pid), time.monotonic()
        finally:
            srv.stop()
        cpu = c1 - c0
        result["server_cpu_seconds"] = cpu
        result["server_cpu_per_wall_second"] = cpu / (t1 - t0) if t1 > t0 else None
        units_key, per_key, scale = CPU_UNITS[workload]
        units = result.get(units_key)
        if isinstance(units, (int, float)) and units > 0 and not result.get("errors"):
            result[per_key] = cpu / units * scale
        return with_server_report(result, srv)


def run_b1(server: str, p: dict[str, Any], timeout: float) -> dict[str, Any]:
    return run_loadgen(server, "broadcast", [
        "broadcast", "--clients", str(p["clients"]), "--packets", str(p["packets"]), "--size", str(p["size"]),
    ], timeout, "B1")


def run_e1(server: str, p: dict[str, Any], timeout: float) -> dict[str, Any]:
    return run_loadgen(server, "echo", [
        "echo", "--clients", str(p["clients"]), "--inflight", str(p["inflight"]), "--count", str(p["count"]),
        "--size", str(p["size"]),
    ], timeout, "E1")


def run_l1(server: str, p: dict[str, Any], timeout: float) -> dict[str, Any]:
    return run_loadgen(server, "echo", [
        "latency", "--clients", str(p["clients"]), "--count", str(p["count"]), "--size", str(p["size"]),
    ], timeout, "L1")


def run_r1(server: str, p: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Framed request/response, one at a time per connection; servercore answers
    from Python's on_recv_packet (its echo mode)."""
    return run_loadgen(server, "echo", [
        "latency", "--clients", str(p["clients"]), "--count", str(p["count"]), "--size", str(p["size"]),
        "--label", "R1",
    ], timeout, "R1")


def raw_echo_runner(workload: str) -> Callable[[str, dict[str, Any], float], dict[str, Any]]:
    """R1RAW and RAW: unframed echo (servercore: a raw Session's on_recv)."""

    def run_raw(server: str, p: dict[str, Any], timeout: float) -> dict[str, Any]:
        return run_loadgen(server, "raw-echo", [
            "raw-echo", "--clients", str(p["clients"]), "--inflight", str(p["inflight"]), "--count", str(p["count"]),
            "--size", str(p["size"]), "--label", workload,
        ], timeout, workload)

    return run_raw


def run_m1(server: str, p: dict[str, Any], timeout: float) -> dict[str, Any]:
    n = p["clients"]
    half = n // 2
    settle = p.get("settle", 3.0)
    with ServerProcess(server, "idle") as srv:
        try:
            time.sleep(0.5)
            rss0 = settled_rss(srv.pid, settle)
            # Two batches, so the report can tell a fixed cost (threads, arenas
            # touched for the first time) from what each connection adds.
            with HeldClients(srv.port, half, timeout) as first:
                first.wait_connected()
                rss_half = settled_rss(srv.pid, settle)
                with HeldClients(srv.port, n - half, timeout, ["--expect-sessions", str(n)]) as second:
                    connected = second.wait_connected()
                    rss1 = settled_rss(srv.pid, settle)
                    alive = srv.alive()
                    summaries = [second.finish(), first.finish()]
        finally:
            srv.stop()
        errors = sum(int(s.get("errors") or 0) for s in summaries) + (0 if alive else 1)
        result = {
            "workload": "M1",
            "clients": n,
            "server_sessions": connected.get("server_sessions"),
            "rss0_kib": rss0,
            "rss_half_kib": rss_half,
            "rss_kib": rss1,
            "kib_per_conn": (rss1 - rss0) / n,
            "kib_per_conn_marginal": (rss1 - rss_half) / (n - half),
            "errors": errors,
            "loadgen": summaries,
        }
        if not alive:
            result["error"] = "server died while holding the connections"
        else:
            firsts = [s.get("first_error") for s in summaries if s.get("first_error")]
            if firsts:
                result["error"] = firsts[0]
        return with_server_report(result, srv)


def run_hello(server: str, p: dict[str, Any], timeout: float) -> dict[str, Any]:
    n, seconds = p["clients"], p["seconds"]
    with ServerProcess(server, "hello") as srv:
        try:
            with HeldClients(srv.port, n, timeout, ["--expect-hello", "1000"]) as held:
                held.wait_connected()
                time.sleep(p.get("warmup", 1.0))  # a few ticks to every client before measuring
                s0, c0, t0 = cpu_seconds(srv.pid), cpu_clock_seconds(srv.pid), time.monotonic()
                time.sleep(seconds)
                s1, c1, t1 = cpu_seconds(srv.pid), cpu_clock_seconds(srv.pid), time.monotonic()
                alive = srv.alive()
                summary = held.finish()
        finally:
            srv.stop()
        held_s = float(summary.get("held_seconds") or 0.0)
        received = int(summary.get("received_packets") or 0)
        # Everything the clients got while held, against 4 Hz to each of them.
        expected = n * 4 * held_s
        errors = int(summary.get("errors") or 0) + (0 if alive else 1)
        result = {
            "workload": "HELLO",
            "clients": n,
            "seconds": t1 - t0,
            "cpu_seconds": c1 - c0,
            "cpu_per_wall_second": (c1 - c0) / (t1 - t0),
            # The same from /proc/<pid>/stat utime+stime (clock ticks, coarse).
            "cpu_seconds_stat": s1 - s0,
            "cpu_per_wall_second_stat": (s1 - s0) / (t1 - t0),
            "received_packets": received,
            "received_vs_4hz": received / expected if expected else None,
            "errors": errors,
            "loadgen": summary,
        }
        if expected and received < 0.8 * expected:
            result["errors"] = errors + 1
            result["error"] = f"clients got {received} Hello World packets, 4 Hz would give {expected:.0f}"
        return with_server_report(result, srv)


def run_dispatch(p: dict[str, Any], timeout: float) -> dict[str, Any]:
    argv = [
        sys.executable, str(BENCHES / "dispatch_floor.py"), "--packets", str(p["packets"]), "--size", str(p["size"]),
        "--repeat", str(p.get("inner_repeat", 3)), "--timeout", str(timeout), "--loadgen", str(LOADGEN),
    ]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 60, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"workload": "DISPATCH", "errors": 1, "error": "dispatch_floor.py timed out"}
    result = last_json(done.stdout) or {"workload": "DISPATCH", "errors": 1, "error": "no JSON"}
    if done.returncode != 0:
        result["errors"] = max(1, int(result.get("errors") or 0))
        result["stderr"] = done.stderr[-2000:]
    return result


def with_server_report(result: dict[str, Any], srv: ServerProcess) -> dict[str, Any]:
    stats = srv.stats()
    if stats is not None:
        result["server_stats"] = {
            k: stats.get(k)
            for k in ("sessions", "accepted", "rejected", "packets_in", "packets_out", "send_queue_bytes",
                      "packets_discarded", "pool_chunks", "pool_chunks_in_use")
        }
        result["server_stats"]["disconnects"] = {k: v for k, v in (stats.get("disconnects") or {}).items() if v}
    if result.get("errors"):
        result["server_log_tail"] = srv.tail(1500)
    srv.cleanup()
    return result


RUNNERS: dict[str, Callable[[str, dict[str, Any], float], dict[str, Any]]] = {
    "B1": run_b1,
    "E1": run_e1,
    "L1": run_l1,
    "R1": run_r1,
    "R1RAW": raw_echo_runner("R1RAW"),
    "RAW": raw_echo_runner("RAW"),
    "M1": run_m1,
    "HELLO": run_hello,
}


def run(workload: str, server: str, p: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One run of `workload` against `server` with parameters `p`."""
    if workload == "DISPATCH":
        return run_dispatch(p, timeout)
    return RUNNERS[workload](server, p, timeout)
