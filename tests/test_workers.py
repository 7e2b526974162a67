"""`servercore serve`: worker processes on one port under a supervisor
(python/servercore/workers.py), run for real as `python -m servercore serve`
with tests/worker_app.py as the game.

Workers share the port through SO_REUSEPORT; the supervisor restarts one
that dies, drains them all on SIGTERM, stops them at once on a second
signal, gives up on a crash loop, and leaves no port bound behind it.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from support import RawPeer, packet

TESTS = pathlib.Path(__file__).parent
PID = 8


class Cluster:
    """A `servercore serve` process: its ready file, its port, its workers."""

    def __init__(self, tmp_path: pathlib.Path, *args: str, target: str = "worker_app:Echo") -> None:
        self.ready_file = tmp_path / "ready.json"
        self.log_file = tmp_path / "serve.log"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
        self.log = open(self.log_file, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "servercore", "serve", target, "--host", "127.0.0.1", "--port", "0",
             "--ready-file", str(self.ready_file), *args],
            env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.state: dict = {}

    def wait_ready(self, timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited {self.process.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"not ready within {timeout} s:\n{self.output()}")
            time.sleep(0.05)
        self.state = json.loads(self.ready_file.read_text())
        return self.state

    @property
    def port(self) -> int:
        return int(self.state["port"])

    def output(self) -> str:
        self.log.flush()
        return self.log_file.read_text()

    def wait_exit(self, timeout: float = 30.0) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"serve still running after {timeout} s:\n{self.output()}") from None

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pid in self.state.get("workers", []):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()


@pytest.fixture
def cluster(tmp_path: pathlib.Path) -> Iterator:
    started: list[Cluster] = []

    def start(*args: str, **kwargs: str) -> Cluster:
        c = Cluster(tmp_path, *args, **kwargs)
        started.append(c)
        return c

    yield start
    for c in started:
        c.close()


def worker_pid(port: int) -> tuple[RawPeer, int]:
    peer = RawPeer(port)
    peer.send(packet(PID))
    (pid,) = __import__("struct").unpack("<I", peer.recv_packet_with_id(PID))
    return peer, pid


def port_is_free(port: int) -> bool:
    """Free for a plain listener without SO_REUSEPORT: nobody holds it
    (SO_REUSEADDR only looks past the closed connections' TIME_WAIT)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        return True
    except OSError:
        return False
    finally:
        sock.close()


def test_workers_share_one_port_and_the_kernel_spreads_connections(cluster):
    c = cluster("--workers", "2")
    state = c.wait_ready()
    assert len(state["workers"]) == 2
    seen = set()
    peers = []
    for _ in range(40):
        peer, pid = worker_pid(c.port)
        peers.append(peer)
        seen.add(pid)
    assert seen == set(state["workers"]), f"connections reached {seen}, workers are {state['workers']}"
    for peer in peers:
        peer.close()
    assert "serving worker_app:Echo on 127.0.0.1:" in c.output()
    assert "worker 0 started" in c.output() and "worker 1 ready" in c.output()


def test_a_killed_worker_is_replaced_and_the_others_keep_serving(cluster):
    c = cluster("--workers", "2", "--setup", "worker_app:setup")
    state = c.wait_ready()
    victim, survivor = state["workers"]
    by_worker: dict[int, list[RawPeer]] = {victim: [], survivor: []}
    while min(len(v) for v in by_worker.values()) < 3:
        peer, pid = worker_pid(c.port)
        by_worker[pid].append(peer)
    os.kill(victim, signal.SIGKILL)
    # The survivor's players notice nothing.
    for round_ in range(20):
        for peer in by_worker[survivor]:
            peer.send(packet(7, bytes([round_])))
            assert peer.recv_packet_with_id(7) == bytes([round_])
        time.sleep(0.02)
    for peer in by_worker[victim]:
        assert peer.wait_closed(5)
    # A new worker takes the victim's place, and new players reach it.
    deadline = time.monotonic() + 15
    replacement = None
    while replacement is None:
        assert time.monotonic() < deadline, c.output()
        peer, pid = worker_pid(c.port)
        peer.close()
        if pid not in (victim, survivor):
            replacement = pid
    assert "died (signal SIGKILL); restarting in" in c.output()
    for peers in by_worker.values():
        for peer in peers:
            peer.close()


def test_sigterm_drains_every_worker_and_frees_the_port(cluster):
    c = cluster("--workers", "2", "--setup", "worker_app:setup", "--option", "shutdown_grace=2")
    state = c.wait_ready()
    peers = []
    pids = set()
    while len(pids) < 2 or len(peers) < 6:
        peer, pid = worker_pid(c.port)
        peers.append(peer)
        pids.add(pid)
    c.process.send_signal(signal.SIGTERM)
    for peer in peers:
        # on_stopping's goodbye arrives before the close: a drain, not a cut.
        assert peer.recv_packet_with_id(9) == b"bye"
        assert peer.wait_closed(5)
    assert c.wait_exit() == 0, c.output()
    # Each worker's own lines say which worker wrote them.
    for index, pid in enumerate(state["workers"]):
        assert f"worker={index} pid={pid} WARNING servercore: SIGTERM: draining" in c.output(), c.output()
    for pid in state["workers"]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert port_is_free(c.port), "the port is still bound"
    assert not c.ready_file.exists()


def test_a_crash_loop_makes_the_supervisor_give_up_with_a_failure(cluster):
    c = cluster("--workers", "1", "--setup", "worker_app:crash_soon", "--max-restarts", "2")
    started = time.monotonic()
    code = c.wait_exit(30)
    assert code == 1, c.output()
    assert time.monotonic() - started < 20
    assert c.output().count("died (exit status 3); restarting in") == 2, c.output()
    assert "workers keep dying: 3 exits" in c.output()


def test_a_worker_that_cannot_start_stops_everything_with_a_clear_error(cluster):
    c = cluster("--workers", "2", target="worker_app:NoSuchClass")
    assert c.wait_exit(30) == 78, c.output()
    assert "cannot start: AttributeError" in c.output()
    assert "NoSuchClass" in c.output()


def test_a_setup_that_raises_stops_everything_at_once(cluster):
    c = cluster("--workers", "2", "--setup", "worker_app:broken_setup")
    assert c.wait_exit(30) == 78, c.output()
    assert "its setup failed" in c.output() and "the game's setup is broken" in c.output()
    assert "restarting in" not in c.output()


def test_a_port_held_by_another_program_is_an_error(tmp_path):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        result = subprocess.run(
            [sys.executable, "-m", "servercore", "serve", "worker_app:Echo", "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1"],
            env=dict(os.environ, PYTHONPATH=str(TESTS)), capture_output=True, text=True, timeout=30,
        )
    finally:
        holder.close()
    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is taken by another program" in result.stderr


def test_reuse_port_is_a_server_option():
    from servercore import Client, PacketSession

    with pytest.raises(TypeError, match="reuse_port is a Server option"):
        Client(PacketSession, "127.0.0.1", 1, reuse_port=True)


def test_the_supervisor_serves_every_workers_metrics_during_a_load(cluster):
    from test_metrics import scrape

    c = cluster("--workers", "2", "--metrics-port", "0")
    state = c.wait_ready()
    peers = []
    per_worker: dict[int, int] = {}
    while len(per_worker) < 2 or len(peers) < 10:
        peer, pid = worker_pid(c.port)
        peers.append(peer)
        per_worker[pid] = per_worker.get(pid, 0) + 1
    for round_ in range(10):
        for peer in peers:
            peer.send(packet(7, bytes([round_])))
            assert peer.recv_packet_with_id(7) == bytes([round_])
    metrics = scrape(f"http://127.0.0.1:{state['metrics_port']}/metrics")
    index = {pid: str(i) for i, pid in enumerate(state["workers"])}
    for pid, sessions in per_worker.items():
        labels = (("worker", index[pid]),)
        assert metrics[("servercore_sessions", labels)] == sessions, metrics
        # One pid question each, then ten echoes each.
        assert metrics[("servercore_packets_in_total", labels)] == sessions * 11
        assert metrics[("servercore_worker_up", labels)] == 1
    assert metrics[("servercore_worker_restarts_total", ())] == 0
    assert (("servercore_disconnects_total", (("reason", "RESET"), ("worker", "0")))) in metrics
    for peer in peers:
        peer.close()
