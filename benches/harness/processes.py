"""The processes a run drives: a benchmark server on a free loopback port, the
load client (to completion, or holding idle clients), and what /proc and the
CPU clocks say about a server."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import EPOLL, FLOOR, LOADGEN, REPO, SERVERS_DIR, BenchError

ALL_SERVERS = ["servercore", "servercore-uvloop", "asyncio", "uvloop", "floor", "epoll"]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def server_argv(server: str, mode: str) -> list[str]:
    if server == "servercore":
        return [sys.executable, str(SERVERS_DIR / "servercore_server.py"), "--port", "0", "--mode", mode]
    if server == "servercore-uvloop":  # the same server, driven by serve_forever() on uvloop
        return [sys.executable, str(SERVERS_DIR / "servercore_server.py"), "--port", "0", "--mode", mode,
                "--loop", "uvloop"]
    if server == "asyncio":
        return [sys.executable, str(SERVERS_DIR / "asyncio_server.py"), "--port", "0", "--mode", mode]
    if server == "uvloop":
        return [sys.executable, str(SERVERS_DIR / "asyncio_server.py"), "--port", "0", "--mode", mode, "--uvloop"]
    if server == "floor":
        return [str(FLOOR), "--port", "0", "--mode", mode]
    if server == "epoll":
        return [str(EPOLL), "--port", "0", "--mode", mode]
    raise ValueError(server)


class ServerProcess:
    """A benchmark server: started on port 0, its port read from "listening <port>",
    always killed on exit. Its stdout and stderr go to one log file."""

    def __init__(self, name: str, mode: str, extra: list[str] | None = None) -> None:
        self.name = name
        self.mode = mode
        self.extra = list(extra or [])
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-{mode}-", suffix=".log", delete=False)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def __enter__(self) -> ServerProcess:
        try:
            self.proc = subprocess.Popen(
                server_argv(self.name, self.mode) + self.extra,
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

    def mark(self) -> None:
        """Starts the load client's measured window now (a line "mark" on its stdin)."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write("mark\n")
        self.proc.stdin.flush()

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


def _per_thread(pid: int, read: Callable[[str], tuple]) -> dict[int, tuple]:
    """`read(task_dir)` for every thread of `pid`; threads that end between
    listing and reading (or whose files do not parse) are left out."""
    out: dict[int, tuple] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            out[int(tid)] = read(f"/proc/{pid}/task/{tid}")
        except (OSError, ValueError, IndexError):
            continue
    return out


def thread_cpu_ns(pid: int) -> dict[int, tuple[str, int]]:
    """Per thread of `pid`: (name, ns on a CPU so far), from /proc/<pid>/task/<tid>/schedstat
    (its first field, ns resolution)."""
    def read(task: str) -> tuple[str, int]:
        return Path(f"{task}/comm").read_text().strip(), int(Path(f"{task}/schedstat").read_text().split()[0])
    return _per_thread(pid, read)


def thread_cpu_per_second(pid: int, before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]],
                          seconds: float) -> dict[str, float]:
    """CPU seconds per wall second of each thread between two thread_cpu_ns readings,
    keyed "name" ("name/tid" where a name repeats; the main thread is "main:<name>")."""
    names = [name for name, _ in after.values()]
    out: dict[str, float] = {}
    for tid, (name, ns) in sorted(after.items()):
        key = f"main:{name}" if tid == pid else (name if names.count(name) == 1 else f"{name}/{tid}")
        out[key] = round((ns - before.get(tid, (name, 0))[1]) / 1e9 / seconds, 4) if seconds > 0 else 0.0
    return out


def machine_cpu_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs from /proc/stat (idle and iowait are not busy)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return total - fields[3] - fields[4], total


def thread_ticks(pid: int) -> dict[int, tuple[str, int, int]]:
    """Per thread of `pid`: (name, utime, stime) in clock ticks, from /proc/<pid>/task/<tid>/stat."""
    def read(task: str) -> tuple[str, int, int]:
        text = Path(f"{task}/stat").read_text()
        fields = text[text.rindex(")") + 2 :].split()
        return text[text.index("(") + 1 : text.rindex(")")], int(fields[11]), int(fields[12])
    return _per_thread(pid, read)


def thread_user_system(pid: int, before: dict[int, tuple[str, int, int]], after: dict[int, tuple[str, int, int]],
                       seconds: float) -> dict[str, dict[str, float]]:
    """User and system CPU seconds per wall second of each thread that used any
    (clock-tick resolution), keyed like thread_cpu_per_second."""
    names = [name for name, _, _ in after.values()]
    out: dict[str, dict[str, float]] = {}
    for tid, (name, utime, stime) in sorted(after.items()):
        _, u0, s0 = before.get(tid, (name, 0, 0))
        if seconds <= 0 or (utime - u0) + (stime - s0) == 0:
            continue
        key = f"main:{name}" if tid == pid else (name if names.count(name) == 1 else f"{name}/{tid}")
        out[key] = {"user": round((utime - u0) / CLK_TCK / seconds, 3), "system": round((stime - s0) / CLK_TCK / seconds, 3)}
    return out
