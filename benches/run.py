#!/usr/bin/env python3
"""servercore's benchmarks, in one command.

    . .venv/bin/activate            # where `maturin develop --release` was run
    python benches/run.py           # everything, 3 repetitions (about 10-15 minutes)
    python benches/run.py --quick   # a smoke run, well under a minute once loadgen is built
    python benches/run.py --workloads B1,E1 --repeat 5

Each workload runs every server - servercore (its Python API), a plain asyncio
server, the same on uvloop, and the floor (the servercore engine driven from
Rust, no Python) - as a subprocess on a free loopback port, against the same
Rust load client (benches/loadgen), alternating the servers round-robin within
each repetition. It reports medians over the repetitions and ratios against
servercore, as a markdown table on stdout and in benches/results/latest.md,
with every run as a JSON line in benches/results/latest.jsonl.

Workloads (design.md section 6):
  B1        broadcast: 1000 clients, 5000 broadcasts of 64-byte payloads, every
            packet checked in order at every client                 (packets/s)
  E1        echo: 1000 clients, 32 in flight each, 2000 each; on_recv_packet
            replies with session.send                    (round trips/s, RTT)
  L1        latency: 100 clients, 1 in flight, 2000 each          (RTT p50/p99/max)
  M1        server RSS per idle connection at 10,000 connections, Python
            session objects included: (RSS with N - RSS with 0) / N     (KiB)
  HELLO     the lecture's GameServer: 1000 clients receive a 1004-byte Hello
            World at 4 Hz; server CPU seconds per wall second over 10 s
  DISPATCH  ns per on_recv_packet call with an empty body, through servercore,
            against a pure-Python loop calling the same method (dispatch_floor.py)

Only loopback (127.0.0.1) is ever used.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

BENCHES = Path(__file__).resolve().parent
REPO = BENCHES.parent
LOADGEN_DIR = BENCHES / "loadgen"
LOADGEN = LOADGEN_DIR / "target" / "release" / "loadgen"
FLOOR = LOADGEN_DIR / "target" / "release" / "floor"
SERVERS_DIR = BENCHES / "servers"
RESULTS = BENCHES / "results"

ALL_SERVERS = ["servercore", "asyncio", "uvloop", "floor"]
ALL_WORKLOADS = ["B1", "E1", "L1", "M1", "HELLO", "DISPATCH"]
CLK_TCK = os.sysconf("SC_CLK_TCK")

FULL = {
    "B1": {"clients": 1000, "packets": 5000, "size": 64},
    "E1": {"clients": 1000, "inflight": 32, "count": 2000, "size": 16},
    "L1": {"clients": 100, "count": 2000, "size": 16},
    "M1": {"clients": 10_000},
    "HELLO": {"clients": 1000, "seconds": 10.0},
    "DISPATCH": {"packets": 1_000_000, "size": 8},
}
QUICK = {
    "B1": {"clients": 50, "packets": 200, "size": 64},
    "E1": {"clients": 50, "inflight": 8, "count": 200, "size": 16},
    "L1": {"clients": 20, "count": 200, "size": 16},
    "M1": {"clients": 500, "settle": 1.0},
    "HELLO": {"clients": 100, "seconds": 2.0, "warmup": 0.5},
    "DISPATCH": {"packets": 100_000, "size": 8, "inner_repeat": 1},
}


class BenchError(Exception):
    pass


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- setup


def build_loadgen() -> None:
    log("building benches/loadgen (cargo build --release) ...")
    t0 = time.monotonic()
    try:
        done = subprocess.run(
            ["cargo", "build", "--release", "--quiet"], cwd=LOADGEN_DIR, timeout=1800, capture_output=True, text=True
        )
    except FileNotFoundError:
        raise BenchError("cargo not found: a Rust toolchain is needed to build benches/loadgen") from None
    except subprocess.TimeoutExpired:
        raise BenchError("building benches/loadgen took over 30 minutes") from None
    if done.returncode != 0:
        raise BenchError(f"building benches/loadgen failed:\n{done.stderr[-4000:]}")
    if not (LOADGEN.exists() and FLOOR.exists()):
        raise BenchError(f"cargo build succeeded but {LOADGEN} / {FLOOR} are missing")
    log(f"built in {time.monotonic() - t0:.1f} s")


def check_python(servers: list[str]) -> dict[str, str]:
    versions = {}
    try:
        import servercore
    except ImportError as error:
        raise BenchError(
            f"servercore is not importable from {sys.executable} ({error}).\n"
            "Run this inside the project's virtualenv after `maturin develop --release`:\n"
            "    . .venv/bin/activate && python benches/run.py"
        ) from None
    versions["servercore"] = getattr(servercore, "__version__", "?")
    if "uvloop" in servers:
        try:
            import uvloop
        except ImportError:
            log(f"uvloop is not installed in {sys.executable}; installing it: pip install uvloop")
            done = subprocess.run([sys.executable, "-m", "pip", "install", "uvloop"], timeout=600)
            if done.returncode != 0:
                raise BenchError(
                    "uvloop is needed for the uvloop peer and `pip install uvloop` failed.\n"
                    "Install it by hand, or leave that peer out: --servers servercore,asyncio,floor"
                ) from None
            import uvloop
        versions["uvloop"] = uvloop.__version__
    return versions


def extension_fingerprint() -> dict[str, Any]:
    """Which build of servercore's extension the servers load (a fresh import in
    each server process), and the state of the tree the floor was built from."""
    out: dict[str, Any] = {}
    try:
        import importlib.util

        spec = importlib.util.find_spec("servercore._core")
        path = Path(spec.origin) if spec and spec.origin else None
        if path is not None and path.exists():
            import hashlib

            st = path.stat()
            out["extension"] = str(path)
            out["extension_mtime"] = dt.datetime.fromtimestamp(st.st_mtime, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
            out["extension_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except Exception as error:  # noqa: BLE001 - informational only
        out["extension_error"] = str(error)
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=30)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "rust", "python", "Cargo.toml"], cwd=REPO,
                               capture_output=True, text=True, timeout=30)
        out["git_head"] = head.stdout.strip()
        out["git_dirty_engine_files"] = len(dirty.stdout.splitlines())
    except (OSError, subprocess.TimeoutExpired):
        pass
    return out


def machine_info() -> dict[str, Any]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        rustc = "?"
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "rustc": rustc,
    }


# ---------------------------------------------------------------- processes


def server_argv(server: str, mode: str) -> list[str]:
    if server == "servercore":
        return [sys.executable, str(SERVERS_DIR / "servercore_server.py"), "--port", "0", "--mode", mode]
    if server == "asyncio":
        return [sys.executable, str(SERVERS_DIR / "asyncio_server.py"), "--port", "0", "--mode", mode]
    if server == "uvloop":
        return [sys.executable, str(SERVERS_DIR / "asyncio_server.py"), "--port", "0", "--mode", mode, "--uvloop"]
    if server == "floor":
        return [str(FLOOR), "--port", "0", "--mode", mode]
    raise ValueError(server)


class ServerProcess:
    """A benchmark server: started on port 0, its port read from "listening <port>",
    always killed on exit. Its stdout and stderr go to one log file."""

    def __init__(self, name: str, mode: str) -> None:
        self.name = name
        self.mode = mode
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-{mode}-", suffix=".log", delete=False)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def __enter__(self) -> ServerProcess:
        try:
            self.proc = subprocess.Popen(
                server_argv(self.name, self.mode),
                stdin=subprocess.DEVNULL,
                stdout=self.log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
            self._wait_listening()
        except BaseException:
            self.stop()
            self.log.close()
            raise
        return self

    def _wait_listening(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            match = re.search(rb"^listening (\d+)$", Path(self.log.name).read_bytes(), re.M)
            if match:
                self.port = int(match.group(1))
                return
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} server exited ({self.proc.returncode}) before listening:\n{self.tail()}")
            time.sleep(0.02)
        raise BenchError(f"{self.name} server printed no 'listening <port>' within 30 s:\n{self.tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 3000) -> str:
        try:
            return Path(self.log.name).read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stats(self) -> dict[str, Any] | None:
        """servercore_server.py prints its stats() as 'stats {json}' when it ends."""
        try:
            text = Path(self.log.name).read_text(errors="replace")
        except OSError:
            return None
        for line in reversed(text.splitlines()):
            if line.startswith("stats {"):
                try:
                    return json.loads(line[len("stats ") :])
                except ValueError:
                    return None
        return None

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.log.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def cleanup(self) -> None:
        self.log.close()
        try:
            os.unlink(self.log.name)
        except OSError:
            pass


def loadgen(args: list[str], timeout: float) -> dict[str, Any]:
    """Runs loadgen to completion; returns its last JSON line (with rc, stderr)."""
    argv = [str(LOADGEN), *args, "--timeout", str(timeout)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"errors": 1, "error": f"loadgen did not finish within {timeout + 30:.0f} s", "rc": None}
    result = last_json(done.stdout) or {"errors": 1, "error": "loadgen printed no JSON"}
    result["rc"] = done.returncode
    if done.returncode != 0:
        result.setdefault("errors", 1)
        result["errors"] = max(1, int(result.get("errors") or 0))
        result["stderr"] = done.stderr[-2000:]
    return result


def last_json(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


class HeldClients:
    """`loadgen idle`: connects N clients and holds them until stdin is closed."""

    def __init__(self, port: int, clients: int, timeout: float, extra: list[str] | None = None) -> None:
        self.argv = [
            str(LOADGEN), "idle", "--port", str(port), "--clients", str(clients),
            "--hold", str(timeout), "--timeout", str(timeout), *(extra or []),
        ]
        self.timeout = timeout
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self.stderr = ""
        self._reader: threading.Thread | None = None
        self._got_line = threading.Event()

    def __enter__(self) -> HeldClients:
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        threading.Thread(target=self._read_err, daemon=True).start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.strip())
            self._got_line.set()

    def _read_err(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()

    def wait_connected(self) -> dict[str, Any]:
        if not self._got_line.wait(self.timeout):
            raise BenchError(f"loadgen idle: no connection report within {self.timeout:.0f} s")
        first = json.loads(self.lines[0])
        if "connected" not in first:
            raise BenchError(f"loadgen idle failed: {first} {self.stderr[-1000:]}")
        return first

    def finish(self) -> dict[str, Any]:
        assert self.proc is not None
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        result = last_json("\n".join(self.lines[1:])) or {"errors": 1, "error": "loadgen idle printed no summary"}
        result["rc"] = self.proc.returncode
        return result

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def cpu_clock_seconds(pid: int) -> float:
    """The process's CPU time (all threads) from its CPU-time clock, ns precision:
    clock_getcpuclockid(pid) is MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)."""
    return time.clock_gettime(((~pid) << 3) | 2)


def settled_rss(pid: int, limit: float) -> int:
    """VmRSS once two samples 0.25 s apart agree within 0.5% (or after `limit` s)."""
    deadline = time.monotonic() + limit
    last = rss_kib(pid)
    while True:
        time.sleep(0.25)
        now = rss_kib(pid)
        if abs(now - last) <= 0.005 * max(now, 1) or time.monotonic() > deadline:
            return now
        last = now


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime is field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# ---------------------------------------------------------------- workloads


def run_loadgen(server: str, mode: str, arguments: list[str], timeout: float) -> dict[str, Any]:
    """Starts `server` in `mode`, runs the load client with `arguments` against it."""
    with ServerProcess(server, mode) as srv:
        try:
            result = loadgen([arguments[0], "--port", str(srv.port), *arguments[1:]], timeout)
        finally:
            srv.stop()
        return with_server_report(result, srv)


def run_b1(server: str, p: dict[str, Any], timeout: float) -> dict[str, Any]:
    return run_loadgen(server, "broadcast", [
        "broadcast", "--clients", str(p["clients"]), "--packets", str(p["packets"]), "--size", str(p["size"]),
    ], timeout)


def run_e1(server: str, p: dict[str, Any], timeout: float) -> dict[str, Any]:
    return run_loadgen(server, "echo", [
        "echo", "--clients", str(p["clients"]), "--inflight", str(p["inflight"]), "--count", str(p["count"]),
        "--size", str(p["size"]),
    ], timeout)


def run_l1(server: str, p: dict[str, Any], timeout: float) -> dict[str, Any]:
    return run_loadgen(server, "echo", [
        "latency", "--clients", str(p["clients"]), "--count", str(p["count"]), "--size", str(p["size"]),
    ], timeout)


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
    "M1": run_m1,
    "HELLO": run_hello,
}

# What each workload reports: (key path, label, higher is better).
METRICS: dict[str, list[tuple[str, str, bool]]] = {
    "B1": [("packets_per_sec", "packets/s", True), ("seconds", "seconds", False)],
    "E1": [
        ("round_trips_per_sec", "round trips/s", True),
        ("rtt_us.p50", "RTT p50 µs", False),
        ("rtt_us.p99", "RTT p99 µs", False),
        ("rtt_us.max", "RTT max µs", False),
    ],
    "L1": [("rtt_us.p99", "RTT p99 µs", False), ("rtt_us.p50", "RTT p50 µs", False), ("rtt_us.max", "RTT max µs", False)],
    "M1": [
        ("kib_per_conn", "KiB per idle connection", False),
        ("kib_per_conn_marginal", "KiB per connection, 2nd half only", False),
        ("rss0_kib", "RSS at 0 (KiB)", False),
        ("rss_kib", "RSS at N (KiB)", False),
    ],
    "HELLO": [
        ("cpu_per_wall_second", "CPU s per wall s", False),
        ("cpu_per_wall_second_stat", "same, from /proc/pid/stat ticks", False),
    ],
}

DESCRIPTIONS = {
    "B1": "broadcast: {clients} clients, {packets} broadcasts of {size}-byte payloads, all checked in order",
    "E1": "echo: {clients} clients, {inflight} in flight each, {count} each, {size}-byte payloads",
    "L1": "latency: {clients} clients, 1 in flight, {count} each",
    "M1": "memory: server RSS per idle connection at {clients} connections: (RSS at N - RSS at 0) / N, "
    "connected in two halves; the 2nd-half figure is (RSS at N - RSS at N/2) / (N/2), the marginal cost",
    "HELLO": "the lecture's GameServer: {clients} clients get a 1004-byte Hello World at 4 Hz; "
    "server CPU seconds per wall second over {seconds:g} s (the process's CPU-time clock, all threads)",
    "DISPATCH": "dispatch floor: ns per empty on_recv_packet call through servercore's poll() "
    "vs a pure-Python loop calling the same method, {packets} packets of {size} bytes",
}


def dig(record: dict[str, Any], path: str) -> float | None:
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return float(value) if isinstance(value, (int, float)) else None


def fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if abs(value) >= 1e6:
        return f"{value / 1e6:.3f} M"
    if abs(value) >= 1e4:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.4f}"


def fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


# ---------------------------------------------------------------- report


def summarize(workload: str, records: list[dict[str, Any]], servers: list[str], params: dict[str, Any]) -> list[str]:
    lines = [f"### {workload}", "", DESCRIPTIONS[workload].format(**params), ""]
    if workload == "DISPATCH":
        ok = [r for r in records if not r.get("errors")]
        sc = [r["servercore_ns_per_call"] for r in ok if r.get("servercore_ns_per_call") is not None]
        py = [r["python_ns_per_call"] for r in ok if r.get("python_ns_per_call") is not None]
        sc_min = [r["servercore_ns_per_call_min"] for r in ok if r.get("servercore_ns_per_call_min") is not None]
        py_min = [r["python_ns_per_call_min"] for r in ok if r.get("python_ns_per_call_min") is not None]
        proc = [r["servercore_process_ns_per_packet"] for r in ok if "servercore_process_ns_per_packet" in r]
        loop = [r["python_empty_loop_ns"] for r in ok if "python_empty_loop_ns" in r]
        lines += [
            "| | ns per call (median) | ns per call (best) | runs ok |",
            "|---|---|---|---|",
            f"| servercore poll() → on_recv_packet (Python thread CPU) | {fmt(med(sc))} | {fmt(min(sc_min, default=None))} "
            f"| {len(ok)}/{len(records)} |",
            f"| pure Python `obj.on_recv_packet(1, payload)` loop | {fmt(med(py))} | {fmt(min(py_min, default=None))} "
            f"| {len(ok)}/{len(records)} |",
            "",
            f"Ratio servercore ÷ pure Python: **{fmt_ratio(ratio(med(sc), med(py)))}** (medians), "
            f"{fmt_ratio(ratio(min(sc_min, default=None), min(py_min, default=None)))} (best). "
            f"Whole servercore process CPU (I/O threads included) per packet: {fmt(med(proc))} ns; "
            f"the empty `for` loop alone: {fmt(med(loop))} ns per iteration.",
            "",
        ]
        lines += error_lines(records)
        return lines
    metrics = METRICS[workload]
    header = "| server | runs ok |" + "".join(f" {label} |" for _, label, _ in metrics)
    lines += [header, "|---" * (2 + len(metrics)) + "|"]
    medians: dict[str, dict[str, float | None]] = {}
    for server in servers:
        ok = [r for r in records if r.get("server") == server and not r.get("errors")]
        medians[server] = {path: med([v for r in ok if (v := dig(r, path)) is not None]) for path, _, _ in metrics}
    base = medians.get("servercore", {})
    for server in servers:
        mine = [r for r in records if r.get("server") == server]
        ok = [r for r in mine if not r.get("errors")]
        row = f"| {server} | {len(ok)}/{len(mine)} |"
        row += "".join(f" {fmt(medians[server][path])} |" for path, _, _ in metrics)
        lines.append(row)
    lines += ["", "Ratios, servercore ÷ this server:", ""]
    lines += ["| server |" + "".join(f" {label} |" for _, label, _ in metrics), "|---" * (1 + len(metrics)) + "|"]
    for server in servers:
        if server == "servercore":
            continue
        row = f"| {server} |" + "".join(f" {fmt_ratio(ratio(base.get(path), medians[server][path]))} |" for path, _, _ in metrics)
        lines.append(row)
    better = ", ".join(f"{label}: {'higher' if up else 'lower'}" for _, label, up in metrics)
    lines += ["", f"Medians over the successful runs. Better for servercore — {better}.", ""]
    lines += error_lines(records)
    return lines


def error_lines(records: list[dict[str, Any]]) -> list[str]:
    bad = [r for r in records if r.get("errors")]
    if not bad:
        return []
    out = ["Errors:", ""]
    for r in bad:
        what = r.get("error") or r.get("first_error") or (r.get("loadgen") or {}).get("first_error") or "?"
        out.append(f"- {r.get('server', '')} rep {r.get('rep', '?')}: {what}")
    out.append("")
    return out


def med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def targets(all_records: dict[str, list[dict[str, Any]]]) -> list[str]:
    """design.md section 6's targets, checked against this run's medians."""

    def m(workload: str, server: str, path: str) -> float | None:
        rs = [r for r in all_records.get(workload, []) if r.get("server") == server and not r.get("errors")]
        return med([v for r in rs if (v := dig(r, path)) is not None])

    rows = []
    if "B1" in all_records:
        sc, fl = m("B1", "servercore", "packets_per_sec"), m("B1", "floor", "packets_per_sec")
        rows.append(("B1 ≥ 0.5 × the Rust floor (stand-in for the C reference)", ratio(sc, fl), 0.5, True))
    if "E1" in all_records:
        sc, uv = m("E1", "servercore", "round_trips_per_sec"), m("E1", "uvloop", "round_trips_per_sec")
        rows.append(("E1 ≥ 10 × uvloop", ratio(sc, uv), 10.0, True))
        rows.append(("E1 max RTT < 1 s (µs)", m("E1", "servercore", "rtt_us.max"), 1e6, False))
    if "L1" in all_records:
        sc, uv = m("L1", "servercore", "rtt_us.p99"), m("L1", "uvloop", "rtt_us.p99")
        rows.append(("L1 p99 ≤ uvloop's (ratio)", ratio(sc, uv), 1.0, False))
    if "M1" in all_records:
        rows.append(("M1 ≤ 1 KiB per idle session", m("M1", "servercore", "kib_per_conn"), 1.0, False))
    if not rows:
        return []
    out = ["### Targets (design.md §6)", "", "| target | servercore | met |", "|---|---|---|"]
    for label, value, bound, at_least in rows:
        met = "—" if value is None else ("yes" if (value >= bound if at_least else value <= bound) else "**no**")
        shown = fmt_ratio(value) if "ratio" in label or "×" in label else fmt(value)
        out.append(f"| {label} | {shown} | {met} |")
    out.append("")
    return out


# ---------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default=",".join(ALL_WORKLOADS), help="comma-separated, of " + ",".join(ALL_WORKLOADS))
    parser.add_argument("--servers", default=",".join(ALL_SERVERS), help="comma-separated, of " + ",".join(ALL_SERVERS))
    parser.add_argument("--repeat", type=int, default=None, help="repetitions (default 3, or 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke version of every workload")
    parser.add_argument("--timeout", type=float, default=300.0, help="limit per loadgen run, seconds")
    parser.add_argument("--no-build", action="store_true", help="use the loadgen binaries as they are")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where latest.md and latest.jsonl go")
    args = parser.parse_args()

    workloads = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
    servers = [s.strip().lower() for s in args.servers.split(",") if s.strip()]
    for w in workloads:
        if w not in ALL_WORKLOADS:
            parser.error(f"unknown workload {w}; choose from {','.join(ALL_WORKLOADS)}")
    for s in servers:
        if s not in ALL_SERVERS:
            parser.error(f"unknown server {s}; choose from {','.join(ALL_SERVERS)}")
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    params = QUICK if args.quick else FULL

    try:
        versions = check_python(servers)
        if not args.no_build:
            build_loadgen()
        elif not (LOADGEN.exists() and FLOOR.exists()):
            raise BenchError("--no-build given but benches/loadgen/target/release/{loadgen,floor} are missing")
    except BenchError as error:
        log(f"error: {error}")
        return 2

    info = machine_info() | {"versions": versions} | extension_fingerprint()
    args.out.mkdir(parents=True, exist_ok=True)
    jsonl_path = args.out / "latest.jsonl"
    md_path = args.out / "latest.md"
    jsonl = jsonl_path.open("w")
    jsonl.write(json.dumps({"type": "machine", **info, "repeat": repeat, "quick": args.quick,
                            "workloads": workloads, "servers": servers, "params": {w: params[w] for w in workloads}}) + "\n")
    jsonl.flush()

    all_records: dict[str, list[dict[str, Any]]] = {}
    started = time.monotonic()
    try:
        for workload in workloads:
            records: list[dict[str, Any]] = []
            all_records[workload] = records
            p = params[workload]
            for rep in range(repeat):
                if workload == "DISPATCH":
                    order = ["servercore"]
                else:
                    # Round-robin, starting one further each repetition.
                    order = servers[rep % len(servers) :] + servers[: rep % len(servers)]
                for server in order:
                    log(f"[{time.monotonic() - started:6.1f}s] {workload} rep {rep + 1}/{repeat}: {server} ...")
                    t0 = time.monotonic()
                    try:
                        if workload == "DISPATCH":
                            record = run_dispatch(p, args.timeout)
                        else:
                            record = RUNNERS[workload](server, p, args.timeout)
                    except BenchError as error:
                        record = {"workload": workload, "errors": 1, "error": str(error)}
                    record.update({"workload": workload, "server": server, "rep": rep + 1,
                                   "run_seconds": round(time.monotonic() - t0, 3)})
                    records.append(record)
                    jsonl.write(json.dumps(record) + "\n")
                    jsonl.flush()
                    log("    " + one_line(workload, record))
                    time.sleep(0.3)
    except KeyboardInterrupt:
        log("interrupted; reporting what was measured")
    finally:
        jsonl.close()

    lines = [
        "# servercore benchmarks",
        "",
        f"- date: {info['date']}",
        f"- machine: {info['nproc']} cores, {info['cpu']}, Linux {info['kernel']}",
        f"- Python {info['python']}, servercore {versions.get('servercore')}, "
        f"uvloop {versions.get('uvloop', '—')}, {info['rustc']}",
        f"- repetitions: {repeat}{' (quick smoke run: tiny parameters)' if args.quick else ''}; "
        f"servers alternated round-robin within each repetition; one Rust load client (benches/loadgen) for all",
        f"- servercore extension: sha256 {info.get('extension_sha256', '?')}, built {info.get('extension_mtime', '?')}; "
        f"git {info.get('git_head', '?')} with {info.get('git_dirty_engine_files', '?')} uncommitted file(s) "
        "under rust/, python/, Cargo.toml",
        f"- command: `python benches/run.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
    ]
    after = extension_fingerprint()
    if after.get("extension_sha256") != info.get("extension_sha256"):
        warning = (f"**Warning:** the servercore extension changed during this run "
                   f"(sha256 {info.get('extension_sha256')} → {after.get('extension_sha256')}, "
                   f"rebuilt {after.get('extension_mtime')}): runs before and after used different builds.")
        lines += [warning, ""]
        log(warning)
    for workload in workloads:
        lines += summarize(workload, all_records.get(workload, []), servers, params[workload])
    lines += targets(all_records)
    report = "\n".join(lines)
    print(report)
    md_path.write_text(report + "\n")
    log(f"wrote {md_path} and {jsonl_path}")
    failed = sum(1 for rs in all_records.values() for r in rs if r.get("errors"))
    if failed:
        log(f"{failed} run(s) had errors; see the report and {jsonl_path}")
    return 1 if failed else 0


def one_line(workload: str, record: dict[str, Any]) -> str:
    if record.get("errors"):
        return f"ERROR: {record.get('error') or record.get('first_error') or (record.get('loadgen') or {}).get('first_error') or record.get('stderr', '')[-300:]}"
    if workload == "DISPATCH":
        return (f"servercore {record.get('servercore_ns_per_call')} ns/call, "
                f"python {record.get('python_ns_per_call')} ns/call, ratio {record.get('ratio')}")
    parts = [f"{label} {fmt(dig(record, path))}" for path, label, _ in METRICS[workload]]
    return ", ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
