#!/usr/bin/env python3
"""The scale workload: 50,000 sessions in one server process, each receiving
the lecture's 1004-byte Hello World at 4 Hz.

    . .venv/bin/activate            # where `maturin develop --release` was run
    python benches/scale.py         # servercore and uvloop, 50,000 sessions, 20 s measured
    python benches/scale.py --sessions 20000 --repeat 2 --servers servercore,uvloop

Per run: raise RLIMIT_NOFILE (soft and hard) in this process so that the
servers it starts inherit it; start the server (benches/servers/, mode
`hello`; servercore with --max-sessions >= 60000); read its VmRSS with no
client; start `loadgen idle --clients N --sources 127.0.0.1,127.0.0.2,127.0.0.3
--expect-hello 1000 --expect-rate 4` (one source address has only the
ephemeral port range, ~28k ports, toward one server port); wait until the
server reports all N sessions; let it run `--warmup` s; then measure for
`--seconds` s:

- server RSS per session: (VmRSS at steady state - VmRSS before the clients) / N,
  steady state being the median of one sample per second in the window;
- server CPU seconds per wall second (its CPU-time clock, all threads, ns),
  and per thread from /proc/<pid>/task/<tid>/schedstat (servercore: the
  Python thread vs `servercore-server-io`); the load client's the same way;
  the machine's busy cores from /proc/stat;
- delivery: the load client counts every connection's packets in the window;
  "delivered fully" means no error (every packet a 1004-byte Hello World, no
  EOF or reset) and every connection got between floor(4 w) - 1 and
  ceil(4 w) + 1 packets in the window of w seconds. TCP keeps each
  connection's packets in order; the Hello World carries no sequence number,
  so the count is the check. Also the gaps between two reads that brought
  packets, over all connections (p50/p99/max; 250 ms when on time), and how
  many exceeded 1.5 periods (late packets, or two coalesced in one write).

If RLIMIT_NOFILE cannot be raised far enough (raising the hard limit takes
CAP_SYS_RESOURCE), it runs as many sessions as fit (the soft limit - 100,
rounded down to hundreds) and says so in the summary and in every record
(`sessions_capped_from`, `capped_by`); --strict refuses instead. --rate R
broadcasts R times a second instead of 4, which stands in for R/4 times the
sessions in packets per second (not in memory, nor in per-recipient work per
broadcast call); --io-threads N sets servercore's I/O threads.

Prints one JSON line per run on stdout (also appended to
benches/results/scale.jsonl), then a short summary. Loopback only; every
process has a timeout and every server is killed when its run ends. Before
each run it waits (up to --wait-idle s) for other work to leave the machine
and records what else used CPU in the window (`other_busy_cores`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.common import LOADGEN, RESULTS, BenchError, log  # noqa: E402
from harness.prepare import build_loadgen, check_python, extension_fingerprint, machine_info  # noqa: E402
from harness.processes import (  # noqa: E402
    HeldClients,
    ServerProcess,
    cpu_clock_seconds,
    machine_cpu_ticks,
    rss_kib,
    settled_rss,
    thread_cpu_ns,
    thread_cpu_per_second,
    thread_ticks,
    thread_user_system,
)

SERVERS = ["servercore", "uvloop", "asyncio"]
RATE = 4.0  # the lecture's Hello World packets per second per session (--rate)


def raise_nofile(need: int) -> tuple[int, int]:
    """Raises this process's RLIMIT_NOFILE (soft and hard) to at least `need`, as
    far as allowed (the hard limit needs privilege, up to fs.nr_open); the servers
    inherit it and raise their soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    except (OSError, ValueError):
        nr_open = hard
    want = min(need, max(nr_open, hard))
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


FD_RESERVE = 100  # descriptors a server or the load client needs besides its sessions


def has_cap_sys_resource() -> bool:
    """Whether this process may raise a hard rlimit (CAP_SYS_RESOURCE, bit 24 of CapEff)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> 24 & 1)
    return False


def sockstat_tcp() -> dict[str, int]:
    """/proc/net/sockstat's TCP line: inuse, orphan, tw, alloc, mem (pages)."""
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            parts = line.split()[1:]
            return {parts[i]: int(parts[i + 1]) for i in range(0, len(parts) - 1, 2)}
    return {}


def wait_quiet(limit: float = 60.0) -> None:
    """Waits until the previous run's sockets are gone (TCP inuse below 5000)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and sockstat_tcp().get("inuse", 0) > 5000:
        time.sleep(0.5)


def busy_cores(seconds: float = 1.0) -> float:
    """Cores busy on the machine over `seconds` (from /proc/stat)."""
    b0, t0 = machine_cpu_ticks()
    time.sleep(seconds)
    b1, t1 = machine_cpu_ticks()
    return (b1 - b0) / max(1, t1 - t0) * (os.cpu_count() or 1)


def wait_idle_machine(limit: float) -> float:
    """Waits up to `limit` s until other work leaves the machine (< 0.15 cores busy
    over a second): this machine is shared. Returns the last reading."""
    deadline = time.monotonic() + limit
    busy = busy_cores()
    warned = False
    while busy >= 0.15 and time.monotonic() < deadline:
        if not warned:
            log(f"    the machine is busy ({busy:.2f} cores) before the run; waiting up to {limit:.0f} s")
            warned = True
        busy = busy_cores()
    return busy


def server_extra(server: str, sessions: int, io_threads: int | None, rate: float) -> list[str]:
    extra = [] if rate == RATE else ["--hello-hz", str(rate)]
    if server == "servercore":
        extra += ["--max-sessions", str(max(60_000, sessions + sessions // 5))]
        extra += ["--io-threads", str(io_threads)] if io_threads else []
    return extra


def process_ticks() -> dict[int, tuple[str, int]]:
    """utime + stime (clock ticks) of every process on the machine, with its name."""
    out: dict[int, tuple[str, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        out[int(entry)] = (text[text.index("(") + 1 : text.rindex(")")], int(fields[11]) + int(fields[12]))
    return out


def top_others(before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]], exclude: set[int],
               seconds: float, n: int = 4) -> dict[str, float]:
    """The processes other than `exclude` that used the most CPU between two process_ticks()."""
    tck = os.sysconf("SC_CLK_TCK")
    used = sorted(((t - before.get(pid, (name, 0))[1], f"{name}/{pid}") for pid, (name, t) in after.items()
                   if pid not in exclude), reverse=True)
    return {key: round(t / tck / seconds, 3) for t, key in used[:n] if t > 0}


def one_run(server: str, args: argparse.Namespace, rep: int) -> dict[str, Any]:
    n = args.sessions
    record: dict[str, Any] = {
        "workload": "SCALE", "server": server, "rep": rep, "sessions_requested": n,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "sources": args.sources, "seconds_requested": args.seconds, "rate_hz": args.rate,
    }
    extra = ["--expect-hello", "1000", "--expect-rate", str(args.rate), "--sources", args.sources,
             "--connect-concurrency", str(args.connect_concurrency)]
    if server == "servercore" and args.io_threads:
        record["io_threads"] = args.io_threads
    with ServerProcess(server, "hello", server_extra(server, n, args.io_threads, args.rate)) as srv:
        try:
            time.sleep(0.5)
            rss0 = settled_rss(srv.pid, 3.0)
            record["rss0_kib"] = rss0
            tcp0 = sockstat_tcp()
            t_start = time.monotonic()
            with HeldClients(srv.port, n, args.timeout, extra) as held:
                try:
                    connected = held.wait_connected()
                except BenchError as error:
                    record.update(errors=1, error=str(error), server_alive=srv.alive(),
                                  seconds_until_failure=round(time.monotonic() - t_start, 3),
                                  server_rss_kib_at_failure=rss_kib(srv.pid) if srv.alive() else None)
                    record["loadgen"] = held.finish()
                    record["loadgen"].pop("rc", None)
                    return finish_record(record, srv)
                record["connect"] = connected
                record["sessions_held"] = connected.get("server_sessions") or connected.get("connected")
                record["connect_seconds"] = connected.get("connect_seconds")
                record["ready_seconds"] = connected.get("ready_seconds")
                time.sleep(args.warmup)

                lg = held.proc.pid if held.proc is not None else 0
                held.mark()
                t0 = time.monotonic()
                c0, lc0 = cpu_clock_seconds(srv.pid), cpu_clock_seconds(lg)
                th0, lth0 = thread_cpu_ns(srv.pid), thread_cpu_ns(lg)
                tk0, ltk0 = thread_ticks(srv.pid), thread_ticks(lg)
                m0 = machine_cpu_ticks()
                p0 = process_ticks()
                rss_samples = []
                end = t0 + args.seconds
                while True:
                    left = end - time.monotonic()
                    if left <= 0:
                        break
                    time.sleep(min(1.0, left))
                    if srv.alive():
                        rss_samples.append(rss_kib(srv.pid))
                t1 = time.monotonic()
                c1, lc1 = cpu_clock_seconds(srv.pid), cpu_clock_seconds(lg)
                th1, lth1 = thread_cpu_ns(srv.pid), thread_cpu_ns(lg)
                tk1, ltk1 = thread_ticks(srv.pid), thread_ticks(lg)
                m1 = machine_cpu_ticks()
                p1 = process_ticks()
                tcp1 = sockstat_tcp()
                alive = srv.alive()
                summary = held.finish()
        finally:
            srv.stop()
        wall = t1 - t0
        summary.pop("rc", None)
        rss = int(statistics.median(rss_samples)) if rss_samples else None
        held_n = record["sessions_held"] or n
        w = float(summary.get("window_seconds") or wall)
        window_packets = int(summary.get("window_packets") or 0)
        record.update({
            "seconds": round(wall, 3),
            "rss_kib": rss,
            "rss_max_kib": max(rss_samples) if rss_samples else None,
            "kib_per_session": round((rss - rss0) / held_n, 3) if rss is not None else None,
            "server_cpu_per_wall_second": round((c1 - c0) / wall, 4),
            "server_threads_cpu_per_second": thread_cpu_per_second(srv.pid, th0, th1, wall),
            "server_threads_user_system": thread_user_system(srv.pid, tk0, tk1, wall),
            "loadgen_cpu_per_wall_second": round((lc1 - lc0) / wall, 4),
            "loadgen_threads_cpu_per_second": thread_cpu_per_second(lg, lth0, lth1, wall),
            "loadgen_threads_user_system": thread_user_system(lg, ltk0, ltk1, wall),
            "machine_busy_cores": round((m1[0] - m0[0]) / max(1, m1[1] - m0[1]) * (os.cpu_count() or 1), 3),
            # Whatever else ran on the machine meanwhile (kernel threads, other users' work).
            "other_busy_cores": round((m1[0] - m0[0]) / max(1, m1[1] - m0[1]) * (os.cpu_count() or 1)
                                      - (c1 - c0) / wall - (lc1 - lc0) / wall, 3),
            "other_processes_cpu_per_second": top_others(p0, p1, {srv.pid, lg, os.getpid()}, wall),
            "packets_per_second": round(window_packets / w, 1) if w else None,
            "expected_packets_per_second": args.rate * held_n,
            "per_conn_min": summary.get("per_conn_min"),
            "per_conn_max": summary.get("per_conn_max"),
            "per_conn_band": summary.get("per_conn_band"),
            "per_conn_outside": summary.get("per_conn_outside"),
            "max_gap_ms": summary.get("max_gap_ms"),
            "gaps": summary.get("gaps"),
            "gap_ms": summary.get("gap_ms"),
            # Gaps over 1.5 periods (375 ms at 4 Hz): a packet half a period late, or a tick missed.
            "late_gaps": next((v for k, v in summary.items() if k.startswith("gaps_over_")), None),
            "kernel_tcp_mem_kib": (tcp1.get("mem", 0) - tcp0.get("mem", 0)) * 4,
            "server_alive": alive,
            "loadgen": summary,
        })
        errors = int(summary.get("errors") or 0) + (0 if alive else 1)
        record["errors"] = errors
        record["delivered_fully"] = errors == 0 and summary.get("per_conn_outside") == 0
        if not alive:
            record["error"] = "server died while holding the sessions"
        elif summary.get("first_error"):
            record["error"] = summary["first_error"]
        return finish_record(record, srv)


def finish_record(record: dict[str, Any], srv: ServerProcess) -> dict[str, Any]:
    stats = srv.stats()
    if stats is not None:
        record["server_stats"] = {k: stats.get(k) for k in ("sessions", "accepted", "rejected", "packets_out",
                                                             "send_queue_bytes", "packets_discarded")}
        record["server_stats"]["disconnects"] = {k: v for k, v in (stats.get("disconnects") or {}).items() if v}
    if record.get("errors"):
        record["server_log_tail"] = srv.tail(1500)
    srv.cleanup()
    return record


def line(r: dict[str, Any]) -> str:
    if r.get("sessions_held") is None:
        return f"{r['server']:<10} rep {r['rep']}: FAILED: {r.get('error', '?')[:300]}"
    threads = r.get("server_threads_cpu_per_second") or {}
    busy = ", ".join(f"{k} {v:.3f}" for k, v in sorted(threads.items(), key=lambda kv: -kv[1])[:3])
    g = r.get("gap_ms") or {}
    late = (r.get("late_gaps") or 0) / max(1, r.get("gaps") or 0)
    on_time = "" if late < 0.01 else f", but {late:.0%} of the gaps between reads were over 1.5 periods (late, coalesced)"
    verdict = f"every connection got its {r.get('rate_hz', RATE):g} Hz{on_time}" if r.get("delivered_fully") else (
        f"NOT delivered fully: {r.get('per_conn_outside')} connection(s) outside {r.get('per_conn_band')}"
        f"{'; ' + str(r.get('error'))[:200] if r.get('error') else ''}")
    return (
        f"{r['server']:<10} rep {r['rep']}: {r['sessions_held']} sessions, connected in {r['connect_seconds']:.1f} s "
        f"(server saw all at {r['ready_seconds']:.1f} s); RSS {r['rss0_kib'] / 1024:.1f} -> {(r['rss_kib'] or 0) / 1024:.1f} MiB "
        f"= {r['kib_per_session']} KiB/session; server CPU {r['server_cpu_per_wall_second']:.3f} s/s ({busy}); "
        f"loadgen {r['loadgen_cpu_per_wall_second']:.3f} s/s; machine {r['machine_busy_cores']:.2f} of {os.cpu_count()} cores busy "
        f"(other {r['other_busy_cores']:.2f}); "
        f"{r['packets_per_second']:.0f} packets/s of {r['expected_packets_per_second']:.0f}; "
        f"per connection {r['per_conn_min']}-{r['per_conn_max']} in {r['seconds']:.1f} s (band {r['per_conn_band']}), "
        f"gaps between reads p50/p99/max {g.get('p50')}/{g.get('p99')}/{g.get('max')} ms, "
        f"{r.get('late_gaps')} over {1500 / r.get('rate_hz', RATE):.0f} ms; {verdict}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=50_000)
    parser.add_argument("--seconds", type=float, default=20.0, help="the measured window")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds after all are connected, before measuring")
    parser.add_argument("--servers", default="servercore,uvloop", help="comma-separated, of " + ",".join(SERVERS))
    parser.add_argument("--repeat", type=int, default=1, help="runs per server, alternating the servers")
    parser.add_argument("--sources", default="127.0.0.1,127.0.0.2,127.0.0.3",
                        help="the load client's source addresses (loopback), round-robin")
    parser.add_argument("--rate", type=float, default=RATE,
                        help="Hello World broadcasts per second (default the lecture's 4; more stands in for more "
                             "sessions where the fd limit stops them)")
    parser.add_argument("--io-threads", type=int, default=None,
                        help="servercore's io_threads (default: the library's, cores - 1)")
    parser.add_argument("--connect-concurrency", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=600.0, help="limit for the load client, seconds")
    parser.add_argument("--wait-idle", type=float, default=120.0,
                        help="before each run, wait up to this many seconds for other work to leave the machine")
    parser.add_argument("--strict", action="store_true",
                        help="fail if the fd limit cannot hold --sessions (default: run as many as fit, and say so)")
    parser.add_argument("--no-build", action="store_true", help="use benches/loadgen as built")
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.jsonl", help="JSON lines appended here")
    args = parser.parse_args()
    servers = [s.strip().lower() for s in args.servers.split(",") if s.strip()]
    for s in servers:
        if s not in SERVERS:
            parser.error(f"unknown server {s}; choose from {','.join(SERVERS)}")

    try:
        versions = check_python(servers)
        if not args.no_build:
            build_loadgen()
        elif not LOADGEN.exists():
            raise BenchError(f"--no-build given but {LOADGEN} is missing")
    except BenchError as error:
        log(f"error: {error}")
        return 2
    nofile = raise_nofile(args.sessions + 4096)
    capped_by = None
    if args.sessions + FD_RESERVE > nofile[0]:
        fit = (nofile[0] - FD_RESERVE) // 100 * 100
        capped_by = (f"RLIMIT_NOFILE {nofile[0]} (hard {nofile[1]}) could not be raised to {args.sessions + 4096}"
                     + ("" if has_cap_sys_resource() else ": this process lacks CAP_SYS_RESOURCE, so no process here "
                        "may raise its hard limit") + f"; one process holds at most {fit} sessions")
        if args.strict:
            log(f"error: {capped_by}")
            return 2
        log(f"warning: {capped_by}; running {fit} instead of {args.sessions} (--strict refuses)")
        args.requested, args.sessions = args.sessions, fit
    info = machine_info() | {"versions": versions} | extension_fingerprint()
    log(f"{info['date']}: {info['nproc']} cores, Linux {info['kernel']}, Python {info['python']}, "
        f"servercore git {info.get('git_head')}, RLIMIT_NOFILE {nofile}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    with args.out.open("a") as out:
        out.write(json.dumps({"type": "machine", **info, "argv": sys.argv[1:], "nofile": nofile}) + "\n")
        try:
            for rep in range(1, args.repeat + 1):
                k = (rep - 1) % len(servers)
                for server in servers[k:] + servers[:k]:
                    wait_quiet()
                    idle_before = wait_idle_machine(args.wait_idle)
                    log(f"{time.strftime('%H:%M:%S')} {server} rep {rep}/{args.repeat}: {args.sessions} sessions ...")
                    try:
                        record = one_run(server, args, rep)
                    except BenchError as error:
                        record = {"workload": "SCALE", "server": server, "rep": rep, "errors": 1, "error": str(error)}
                    record["git_head"] = info.get("git_head")
                    if capped_by:
                        record["sessions_capped_from"] = args.requested
                        record["capped_by"] = capped_by
                    record["busy_cores_before"] = round(idle_before, 3)
                    records.append(record)
                    print(json.dumps(record), flush=True)
                    out.write(json.dumps(record) + "\n")
                    out.flush()
                    log("    " + line(record))
        except KeyboardInterrupt:
            log("interrupted")
    if capped_by:
        print(f"\nNOTE: {args.requested} sessions were asked for; {capped_by}.")
    print(f"\nscale: {args.sessions} sessions, 1004-byte Hello World at {args.rate:g} Hz, {args.seconds:.0f} s measured "
          f"({info['date']}, {info['nproc']} cores, servercore git {info.get('git_head')})")
    for r in records:
        print("  " + line(r))
    return 1 if any(r.get("errors") for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
