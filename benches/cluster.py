#!/usr/bin/env python3
"""Scale-out on this machine: `servercore serve` with 1, 2 and 4 workers and a
Bus over a real redis-server, driven by the Rust load client (loadgen cluster).

For each worker count, `--repeat` times (medians and ranges printed):
- accept: 4000 clients connect and each is answered by its worker (announced),
  in sessions per second;
- broadcast: one worker publishes `--packets` bus broadcasts as fast as it
  can; every worker fans them out to its sessions; every client checks every
  packet in order; packets delivered per second over all 4000 clients;
- latency: 200 broadcasts at 100 a second; publish-to-delivery p50/p99 over
  every (packet, client) pair, the publisher's clock against the client's
  (CLOCK_MONOTONIC, one machine): to all the clients (the fan-out's own time
  included), and to 40 clients (mostly the hop through Redis).

    python benches/cluster.py [--workers 1,2,4] [--repeat 3] [--clients 4000]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from redis_support import RedisServer  # noqa: E402

from harness.common import LOADGEN  # noqa: E402
from harness.prepare import build_loadgen  # noqa: E402


def serve(workers: int, bus_url: str, ready_file: pathlib.Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(HERE), SERVERCORE_BUS_URL=bus_url)
    return subprocess.Popen(
        [sys.executable, "-m", "servercore", "serve", "cluster_app:Player", "--host", "127.0.0.1", "--port", "0",
         "--workers", str(workers), "--setup", "cluster_app:setup", "--ready-file", str(ready_file),
         "--option", "first_packet_timeout=null", "--option", "max_sessions=20000",
         "--option", "max_send_queue_bytes=16777216"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def wait_ready(process: subprocess.Popen[bytes], ready_file: pathlib.Path) -> int:
    deadline = time.monotonic() + 30
    while not ready_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"serve did not get ready: {process.stderr.read().decode() if process.stderr else ''}")
        time.sleep(0.05)
    return int(json.loads(ready_file.read_text())["port"])


def loadgen(port: int, *args: str) -> dict:
    out = subprocess.run([str(LOADGEN), "cluster", "--port", str(port), *args],
                         capture_output=True, text=True, timeout=300)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if out.returncode != 0 or result.get("errors"):
        raise RuntimeError(f"loadgen failed: {out.stdout} {out.stderr}")
    return result


def run_once(workers: int, redis: RedisServer, clients: int, packets: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ready_file = pathlib.Path(tmp) / "ready.json"
        process = serve(workers, redis.url, ready_file)
        try:
            port = wait_ready(process, ready_file)
            burst = loadgen(port, "--clients", str(clients), "--packets", str(packets), "--label", f"W{workers}")
            paced = loadgen(port, "--clients", str(clients), "--packets", "200", "--interval-us", "10000",
                            "--label", f"W{workers}-paced")
            hop = loadgen(port, "--clients", "40", "--packets", "200", "--interval-us", "10000",
                          "--label", f"W{workers}-hop")
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    return {"workers": workers, "sessions_per_sec": burst["sessions_per_sec"],
            "packets_per_sec": burst["packets_per_sec"], "burst_p50_us": burst["latency_p50_us"],
            "p50_us": paced["latency_p50_us"], "p99_us": paced["latency_p99_us"], "max_us": paced["latency_max_us"],
            "hop_p50_us": hop["latency_p50_us"], "hop_p99_us": hop["latency_p99_us"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4000)
    parser.add_argument("--packets", type=int, default=1000)
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    build_loadgen()
    redis = RedisServer()
    redis.start()
    runs: list[dict] = []
    try:
        for rep in range(args.repeat):
            for workers in counts:  # alternating within each repetition
                result = run_once(workers, redis, args.clients, args.packets)
                runs.append(result)
                print(f"run {rep + 1}: {json.dumps(result)}", file=sys.stderr, flush=True)
    finally:
        redis.stop()
    print(f"| workers | accepted sessions/s | bus broadcast packets/s ({args.clients} clients) | "
          f"latency p50 / p99 / max, {args.clients} clients (µs) | latency p50 / p99, 40 clients (µs) |")
    print("|---|---|---|---|---|")
    for workers in counts:
        mine = [r for r in runs if r["workers"] == workers]

        def med(key: str) -> str:
            values = [r[key] for r in mine]
            return f"{statistics.median(values):,.0f} ({min(values):,.0f}–{max(values):,.0f})"

        print(f"| {workers} | {med('sessions_per_sec')} | {med('packets_per_sec')} | "
              f"{med('p50_us')} / {med('p99_us')} / {med('max_us')} | {med('hop_p50_us')} / {med('hop_p99_us')} |")
    print(json.dumps({"runs": runs}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
