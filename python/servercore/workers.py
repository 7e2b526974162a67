"""`servercore serve`: one game server as N worker processes on one port.

    servercore serve game:Player --port 7777 --workers 4 [--metrics-port 9100]

or from Python, ``servercore.workers.serve("game:Player", port=7777, workers=4)``.

Game logic runs in Python, so one process uses one core for it. A
supervisor starts N workers, each a process with its own ``Server(Player,
reuse_port=True)``; the kernel (SO_REUSEPORT) spreads new connections over
their listeners. What one worker's sessions need to say to another's goes
through a bus (servercore.bus).

The supervisor:

- holds the port from the start (a bound, non-listening SO_REUSEPORT
  socket): ``--port 0`` picks one for all workers, and a port another program
  holds is an error before any worker starts;
- says when every worker is ready ("serving on HOST:PORT with N workers",
  and ``ready_file`` if given);
- restarts a worker that dies, after a backoff (0.1 s doubling to 5 s), and
  gives up (exit status 1) when more than ``max_restarts`` die within
  ``restart_window`` seconds. A worker that cannot start at all (the class
  does not import, bad options) stops everything at once (exit status 78);
- on SIGTERM or SIGINT, has every worker drain (``run_forever``'s drain:
  ``on_stopping``, flush within ``shutdown_grace``), and on a second signal
  stop at once; it returns when the last worker has exited;
- with ``metrics_port``, serves every worker's metrics (servercore.metrics)
  at one endpoint, each series labelled ``worker="N"``, with its own.

Workers run in their own session (process group), so a terminal's Ctrl-C
reaches the supervisor only, and it decides. A worker whose supervisor
vanished (SIGKILL) notices at once through a pipe and drains itself.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("servercore.supervisor")

EX_CONFIG = 78
"""A worker's exit status when it cannot start at all: restarting is futile."""

BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0
STOP_MARGIN = 10.0
"""Seconds past ``shutdown_grace`` before a worker that has not exited is killed."""


def serve(
    target: str,
    host: str = "0.0.0.0",
    port: int = 7777,
    workers: int | None = None,
    options: dict[str, Any] | None = None,
    *,
    setup: str | None = None,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    max_restarts: int = 5,
    restart_window: float = 60.0,
    ready_file: str | None = None,
) -> int:
    """Runs the supervisor until it is told to stop (SIGTERM, SIGINT) or
    gives up; returns the exit status. ``target`` is "module:SessionClass",
    importable by the workers; ``options`` are Server options (JSON values);
    ``setup`` is "module:function", called in each worker with its started
    Server (timers, a bus) before it is ready; what it returns, if callable,
    is the worker's ``on_stopping`` hook."""
    supervisor = Supervisor(
        target, host, port, workers or os.cpu_count() or 1, dict(options or {}), setup=setup,
        metrics_port=metrics_port, metrics_host=metrics_host, max_restarts=max_restarts,
        restart_window=restart_window, ready_file=ready_file,
    )
    return supervisor.run()


@dataclass
class Worker:
    index: int
    process: subprocess.Popen[bytes] | None = None
    ready_pipe: int | None = None
    lifeline: int | None = None
    ready: bool = False
    metrics_port: int | None = None
    restart_at: float | None = None
    starts: int = 0


class Supervisor:
    def __init__(self, target: str, host: str, port: int, workers: int, options: dict[str, Any], *,
                 setup: str | None, metrics_port: int | None, metrics_host: str, max_restarts: int,
                 restart_window: float, ready_file: str | None) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        if ":" not in target:
            raise ValueError(f"target must be 'module:SessionClass', not {target!r}")
        self.target = target
        self.host = host
        self.port = port
        self.options = options
        self.setup = setup
        self.metrics_port = metrics_port
        self.metrics_host = metrics_host
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.ready_file = ready_file
        self.workers = [Worker(i) for i in range(workers)]
        self.crashes: list[float] = []
        self.restarts = 0
        self.signals: list[int] = []
        self.failed_stops = 0
        self.announced = False
        self.grace = float(options.get("shutdown_grace", 5.0))

    # The supervisor's life --------------------------------------------------

    def run(self) -> int:
        reservation = self.reserve_port()
        metrics = None
        previous: dict[int, Any] = {}
        try:
            metrics = self.start_metrics() if self.metrics_port is not None else None
            previous = {signum: signal.signal(signum, self.on_signal) for signum in (signal.SIGTERM, signal.SIGINT)}
            for worker in self.workers:
                self.start(worker)
            return self.supervise()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.kill_all()
            if metrics is not None:
                metrics.shutdown()
                metrics.server_close()
            reservation.close()
            if self.ready_file:
                try:
                    os.unlink(self.ready_file)
                except FileNotFoundError:
                    pass

    def reserve_port(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as error:
            sock.close()
            if error.errno == errno.EADDRINUSE:
                raise OSError(error.errno, f"port {self.port} on {self.host} is taken by another program "
                                           "(servercore serve shares a port only among its own workers)") from None
            raise
        self.port = sock.getsockname()[1]
        return sock

    def on_signal(self, signum: int, frame: object) -> None:
        self.signals.append(signum)

    def supervise(self) -> int:
        with selectors.DefaultSelector() as selector:
            return self.supervise_with(selector)

    def supervise_with(self, selector: selectors.BaseSelector) -> int:
        stopping_since: float | None = None
        forwarded = 0
        while True:
            now = time.monotonic()
            # One at a time: a quick double Ctrl-C is a drain, then "at once".
            while forwarded < len(self.signals):
                forwarded += 1
                if stopping_since is None:
                    stopping_since = now
                    log.warning("%s: workers drain (again to stop at once)", signal.Signals(self.signals[0]).name)
                    self.signal_all(signal.SIGTERM)
                else:
                    log.warning("stopping at once")
                    self.signal_all(signal.SIGINT)
            if stopping_since is not None:
                if all(w.process is None for w in self.workers):
                    log.info("every worker has exited")
                    return 1 if self.failed_stops else 0
                if now - stopping_since > self.grace + STOP_MARGIN:
                    log.error("workers still running %.0f s after the drain began: killing them",
                              now - stopping_since)
                    self.kill_all()
            for worker in self.workers:
                status = self.reap(worker, stopping=stopping_since is not None)
                if status is not None:
                    return status
                if stopping_since is None and worker.restart_at is not None and now >= worker.restart_at:
                    self.start(worker)
            self.read_readiness(selector)
            self.announce_when_ready()

    def reap(self, worker: Worker, stopping: bool) -> int | None:
        """Notes a worker that exited; an exit status if the supervisor must stop."""
        process = worker.process
        if process is None or process.poll() is None:
            return None
        code = process.returncode
        self.close_pipes(worker)
        worker.process = None
        worker.ready = False
        how = f"exit status {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
        if stopping:
            # Killed by the signal that asked it to stop (before it had taken
            # the signal over) is a clean stop too.
            if code not in (0, -signal.SIGTERM, -signal.SIGINT):
                self.failed_stops += 1
            log.info("worker %d (pid %d) exited: %s", worker.index, process.pid, how)
            return None
        if code == EX_CONFIG:
            log.error("worker %d cannot start (%s); stopping", worker.index, how)
            self.stop_all()
            return EX_CONFIG
        now = time.monotonic()
        self.crashes = [t for t in self.crashes if now - t < self.restart_window] + [now]
        if len(self.crashes) > self.max_restarts:
            log.error("workers keep dying: %d exits in the last %.0f s; stopping",
                      len(self.crashes), self.restart_window)
            self.stop_all()
            return 1
        backoff = min(BACKOFF_FIRST * 2 ** (len(self.crashes) - 1), BACKOFF_MAX)
        log.warning("worker %d (pid %d) died (%s); restarting in %.1f s", worker.index, process.pid, how, backoff)
        worker.restart_at = now + backoff
        return None

    # Workers --------------------------------------------------------------

    def start(self, worker: Worker) -> None:
        ready_read, ready_write = os.pipe()
        lifeline_read, lifeline_write = os.pipe()
        command = [
            sys.executable, "-m", "servercore.workers", "--worker", str(worker.index),
            "--host", self.host, "--port", str(self.port), "--options", json.dumps(self.options),
            "--ready-fd", str(ready_write), "--lifeline-fd", str(lifeline_read), self.target,
        ]
        if self.setup:
            command += ["--setup", self.setup]
        if self.metrics_port is not None:
            command += ["--metrics"]
        try:
            worker.process = subprocess.Popen(command, pass_fds=(ready_write, lifeline_read),
                                              start_new_session=True)
        except BaseException:
            os.close(ready_read)
            os.close(lifeline_write)
            raise
        finally:
            os.close(ready_write)
            os.close(lifeline_read)
        os.set_blocking(ready_read, False)
        worker.ready_pipe, worker.lifeline = ready_read, lifeline_write
        worker.restart_at = None
        if worker.starts:
            self.restarts += 1
        worker.starts += 1
        log.info("worker %d started (pid %d)", worker.index, worker.process.pid)

    def read_readiness(self, selector: selectors.BaseSelector) -> None:
        pipes = {w.ready_pipe: w for w in self.workers if w.ready_pipe is not None and not w.ready}
        for fd in pipes:
            selector.register(fd, selectors.EVENT_READ)
        try:
            events = selector.select(timeout=0.05) if pipes else []
            if not pipes:
                time.sleep(0.05)
        finally:
            for fd in pipes:
                selector.unregister(fd)
        for key, _ in events:
            worker = pipes[key.fd]
            try:
                line = os.read(key.fd, 4096)
            except BlockingIOError:
                continue
            if not line:
                continue  # it exited before saying; reap() tells
            said = json.loads(line.decode())
            worker.ready = True
            worker.metrics_port = said.get("metrics_port")
            log.info("worker %d ready (pid %d)", worker.index, said["pid"])

    def announce_when_ready(self) -> None:
        if self.announced or not all(w.ready for w in self.workers):
            return
        self.announced = True
        log.info("serving %s on %s:%d with %d workers", self.target, self.host, self.port, len(self.workers))
        if self.ready_file:
            state = {"pid": os.getpid(), "port": self.port, "metrics_port": self.metrics_port,
                     "workers": [w.process.pid for w in self.workers if w.process]}
            temporary = self.ready_file + ".tmp"
            with open(temporary, "w") as out:
                json.dump(state, out)
            os.replace(temporary, self.ready_file)

    def signal_all(self, signum: int) -> None:
        for worker in self.workers:
            worker.restart_at = None
            if worker.process is not None and worker.process.poll() is None:
                worker.process.send_signal(signum)

    def stop_all(self) -> None:
        """Drains every worker still running and waits for it (bounded)."""
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.grace + STOP_MARGIN
        for worker in self.workers:
            if worker.process is not None:
                try:
                    worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    worker.process.kill()
                    worker.process.wait()
                    self.failed_stops += 1
                self.close_pipes(worker)
                worker.process = None

    def kill_all(self) -> None:
        for worker in self.workers:
            if worker.process is not None:
                # A worker that had to be killed did not stop cleanly.
                self.failed_stops += 1
                worker.process.kill()
                worker.process.wait()
                self.close_pipes(worker)
                worker.process = None

    @staticmethod
    def close_pipes(worker: Worker) -> None:
        for fd in (worker.ready_pipe, worker.lifeline):
            if fd is not None:
                os.close(fd)
        worker.ready_pipe = worker.lifeline = None

    # Metrics --------------------------------------------------------------

    def start_metrics(self) -> Any:
        import servercore.metrics  # noqa: F401 - its ImportError says what to install
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry()
        registry.register(WorkerMetrics(self))
        httpd, _ = start_http_server(self.metrics_port or 0, addr=self.metrics_host, registry=registry)
        self.metrics_port = int(httpd.server_port)
        log.info("metrics on http://%s:%d/metrics", self.metrics_host, self.metrics_port)
        return httpd


class WorkerMetrics:
    """Every ready worker's metrics, scraped when the supervisor is, each
    series labelled with its worker; and the supervisor's own."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
        from prometheus_client.parser import text_string_to_metric_families

        workers = list(self.supervisor.workers)
        up = GaugeMetricFamily("servercore_worker_up", "whether the worker is running and ready", labels=["worker"])
        for worker in workers:
            up.add_metric([str(worker.index)], 1.0 if worker.ready else 0.0)
        yield up
        yield CounterMetricFamily("servercore_worker_restarts", "workers started again after dying",
                                  value=self.supervisor.restarts)
        merged: dict[str, Metric] = {}
        for worker in workers:
            if not worker.ready or worker.metrics_port is None:
                continue
            url = f"http://127.0.0.1:{worker.metrics_port}/metrics"
            try:
                with urllib.request.urlopen(url, timeout=1.0) as response:
                    text = response.read().decode()
            except OSError as error:
                log.warning("worker %d's metrics at %s: %s", worker.index, url, error)
                continue
            for family in text_string_to_metric_families(text):
                into = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                for sample in family.samples:
                    labels = {"worker": str(worker.index), **sample.labels}
                    into.add_sample(sample.name, labels, sample.value, sample.timestamp)
        yield from merged.values()


# The worker process ---------------------------------------------------------


def _load(target: str) -> Any:
    module_name, _, qualname = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _watch_lifeline(fd: int) -> None:
    """The supervisor holds the other end: EOF means it is gone, so drain."""
    def watch() -> None:
        while os.read(fd, 1):
            pass
        log.warning("the supervisor is gone: draining")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="servercore-lifeline", daemon=True).start()


def worker_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="servercore.workers")
    parser.add_argument("target")
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--options", default="{}")
    parser.add_argument("--ready-fd", type=int, required=True)
    parser.add_argument("--lifeline-fd", type=int, required=True)
    parser.add_argument("--setup", default=None)
    parser.add_argument("--metrics", action="store_true")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO,
            format=f"%(asctime)s worker={args.worker} pid=%(process)d %(levelname)s %(name)s: %(message)s",
        )
    from servercore import Server

    try:
        session_class = _load(args.target)
        setup = _load(args.setup) if args.setup else None
    except Exception as error:  # the game's modules: restarting cannot help
        log.error("worker %d cannot start: %s: %s", args.worker, type(error).__name__, error)
        return EX_CONFIG
    try:
        server = Server(session_class, args.host, args.port, reuse_port=True, **json.loads(args.options))
        server.start()
    except OSError as error:
        log.error("worker %d cannot start: %s: %s", args.worker, type(error).__name__, error)
        # The address itself is the problem: every worker would fail alike.
        # Anything else (out of descriptors, memory) may pass: restart it.
        return EX_CONFIG if error.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES) else 1
    except Exception as error:
        log.error("worker %d cannot start: %s: %s", args.worker, type(error).__name__, error)
        return EX_CONFIG
    endpoint = None
    try:
        if args.metrics:
            from servercore.metrics import serve_metrics

            endpoint = serve_metrics(server)
        on_stopping = setup(server) if setup is not None else None
    except Exception:
        log.exception("worker %d cannot start: its setup failed", args.worker)
        if endpoint is not None:
            endpoint.close()
        server.stop()
        return EX_CONFIG
    _watch_lifeline(args.lifeline_fd)
    said = {"pid": os.getpid(), "metrics_port": endpoint.port if endpoint else None}
    os.write(args.ready_fd, json.dumps(said).encode())
    os.close(args.ready_fd)
    try:
        server.run_forever(on_stopping=on_stopping if callable(on_stopping) else None)
    finally:
        if endpoint is not None:
            endpoint.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(worker_main())
