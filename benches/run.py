#!/usr/bin/env python3
"""servercore's benchmarks, in one command.

    . .venv/bin/activate            # where `maturin develop --release` was run
    python benches/run.py           # everything, 3 repetitions (about 10-15 minutes)
    python benches/run.py --quick   # a smoke run, well under a minute once loadgen is built
    python benches/run.py --workloads B1,E1 --repeat 5

Each workload runs every server that has its mode - servercore (its Python
API), a plain asyncio server, the same on uvloop, the floor (the servercore
engine driven from Rust, no Python) and epoll (a one-thread epoll server with
no servercore code: B1, M1, HELLO only) - as a subprocess on a free loopback
port, against the same Rust load client (benches/loadgen), alternating the
servers round-robin within each repetition. It reports medians, spreads and
ratios of servercore against each server, as a markdown table on stdout and
in benches/results/latest.md, with every run as a JSON line in
benches/results/latest.jsonl.

Workloads (their targets are in BENCHMARKS.md):
  B1        broadcast: 1000 clients, 5000 broadcasts of 64-byte payloads, every
            packet checked in order at every client                 (packets/s)
  E1        echo: 1000 clients, 32 in flight each, 2000 each; on_recv_packet
            replies with session.send                    (round trips/s, RTT)
  L1        latency: 100 clients, 1 in flight, 2000 each          (RTT p50/p99/max)
  R1        request/response: 3 clients, 1 in flight, 1000-byte payloads, the
            reply sent from Python's on_recv_packet (round trips/s, RTT, server
            CPU µs per round trip)
  R1RAW     the same unframed (raw Session / Protocol echo), 1000-byte messages
            (messages/s, RTT, server CPU µs per message)
  RAW       raw echo: 100 clients, 8 messages of 1000 bytes in flight each,
            every byte checked               (messages/s, server CPU µs per message)
  M1        server RSS per idle connection at 10,000 connections, Python
            session objects included: (RSS with N - RSS with 0) / N     (KiB)
  HELLO     the lecture's GameServer: 1000 clients receive a 1004-byte Hello
            World at 4 Hz; server CPU seconds per wall second over 10 s
  DISPATCH  ns per on_recv_packet call with an empty body, through servercore,
            against a pure-Python loop calling the same method (dispatch_floor.py)

Only loopback (127.0.0.1) is ever used. The work is done in benches/harness/;
this file parses the options and runs the loop.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

# benches/ is not a package: make benches/harness importable however this file is run.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.common import EPOLL, FLOOR, LOADGEN, RESULTS, BenchError, log  # noqa: E402
from harness.prepare import build_loadgen, check_python, extension_fingerprint, machine_info  # noqa: E402
from harness.processes import ALL_SERVERS  # noqa: E402
from harness.report import header, one_line, summarize, targets  # noqa: E402
from harness.workloads import ALL_WORKLOADS, FULL, QUICK, run, servers_for  # noqa: E402


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
        elif not (LOADGEN.exists() and FLOOR.exists() and EPOLL.exists()):
            raise BenchError("--no-build given but benches/loadgen/target/release/{loadgen,floor,epoll_floor} are missing")
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
            mine = servers_for(workload, servers)
            if not mine:
                log(f"{workload}: none of --servers runs it; skipped")
            for rep in range(repeat if mine else 0):
                # Round-robin, starting one further each repetition.
                order = mine[rep % len(mine) :] + mine[: rep % len(mine)]
                for server in order:
                    log(f"[{time.monotonic() - started:6.1f}s] {workload} rep {rep + 1}/{repeat}: {server} ...")
                    t0 = time.monotonic()
                    try:
                        record = run(workload, server, p, args.timeout)
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

    lines = header(info, repeat, args.quick, sys.argv[1:])
    after = extension_fingerprint()
    if after.get("extension_sha256") != info.get("extension_sha256"):
        warning = (f"**Warning:** the servercore extension changed during this run "
                   f"(sha256 {info.get('extension_sha256')} → {after.get('extension_sha256')}, "
                   f"rebuilt {after.get('extension_mtime')}): runs before and after used different builds.")
        lines += [warning, ""]
        log(warning)
    for workload in workloads:
        lines += summarize(workload, all_records.get(workload, []), servers_for(workload, servers), params[workload])
    lines += targets(all_records)
    report = "\n".join(lines)
    print(report)
    md_path.write_text(report + "\n")
    log(f"wrote {md_path} and {jsonl_path}")
    failed = sum(1 for rs in all_records.values() for r in rs if r.get("errors"))
    if failed:
        log(f"{failed} run(s) had errors; see the report and {jsonl_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
