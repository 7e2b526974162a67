"""The report: a markdown section per workload (medians, spreads, ratios of
servercore against each server, errors), the targets, and the one-line
progress of each run."""

from __future__ import annotations

import statistics
from typing import Any

# What each workload reports: (key path, label, higher is better).
CPU_WALL = ("server_cpu_per_wall_second", "server CPU s per s", False)
METRICS: dict[str, list[tuple[str, str, bool]]] = {
    "B1": [
        ("packets_per_sec", "packets/s", True),
        ("seconds", "seconds", False),
        ("server_cpu_ns_per_packet", "server CPU ns per packet", False),
        CPU_WALL,
    ],
    "E1": [
        ("round_trips_per_sec", "round trips/s", True),
        ("rtt_us.p50", "RTT p50 µs", False),
        ("rtt_us.p99", "RTT p99 µs", False),
        ("rtt_us.max", "RTT max µs", False),
        ("server_cpu_us_per_round_trip", "server CPU µs per round trip", False),
    ],
    "L1": [
        ("rtt_us.p99", "RTT p99 µs", False),
        ("rtt_us.p50", "RTT p50 µs", False),
        ("rtt_us.max", "RTT max µs", False),
        ("server_cpu_us_per_round_trip", "server CPU µs per round trip", False),
    ],
    "R1": [
        ("round_trips_per_sec", "round trips/s", True),
        ("rtt_us.p50", "RTT p50 µs", False),
        ("rtt_us.p99", "RTT p99 µs", False),
        ("server_cpu_us_per_round_trip", "server CPU µs per round trip", False),
        CPU_WALL,
    ],
    "R1RAW": [
        ("messages_per_sec", "messages/s", True),
        ("rtt_us.p50", "RTT p50 µs", False),
        ("rtt_us.p99", "RTT p99 µs", False),
        ("server_cpu_us_per_message", "server CPU µs per message", False),
        CPU_WALL,
    ],
    "RAW": [
        ("messages_per_sec", "messages/s", True),
        ("server_cpu_us_per_message", "server CPU µs per message", False),
        ("rtt_us.p50", "RTT p50 µs", False),
        ("rtt_us.p99", "RTT p99 µs", False),
        CPU_WALL,
    ],
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
    "R1": "request/response: {clients} clients, 1 in flight, {count} each, {size}-byte payloads (framed; "
    "servercore answers from Python's on_recv_packet); server CPU from its CPU-time clock around the load client's run",
    "R1RAW": "raw echo, request/response: {clients} clients, {inflight} in flight, {count} messages of {size} bytes "
    "each (servercore: a raw Session's on_recv; asyncio/uvloop: Protocol.data_received → transport.write)",
    "RAW": "raw echo: {clients} clients, {inflight} messages of {size} bytes in flight each, {count} each, "
    "every byte checked in order",
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


def med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def header(info: dict[str, Any], repeat: int, quick: bool, argv: list[str]) -> list[str]:
    """The report's opening: the machine, the versions, the build measured, the command."""
    versions = info["versions"]
    return [
        "# servercore benchmarks",
        "",
        f"- date: {info['date']}",
        f"- machine: {info['nproc']} cores, {info['cpu']}, Linux {info['kernel']}",
        f"- Python {info['python']}, servercore {versions.get('servercore')}, "
        f"uvloop {versions.get('uvloop', '—')}, {info['rustc']}",
        f"- repetitions: {repeat}{' (quick smoke run: tiny parameters)' if quick else ''}; "
        f"servers alternated round-robin within each repetition; one Rust load client (benches/loadgen) for all",
        f"- servercore extension: sha256 {info.get('extension_sha256', '?')}, built {info.get('extension_mtime', '?')}; "
        f"git {info.get('git_head', '?')} with {info.get('git_dirty_engine_files', '?')} uncommitted file(s) "
        "under rust/, python/, Cargo.toml",
        f"- command: `python benches/run.py {' '.join(argv)}`".rstrip(),
        "",
    ]


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
    lines += ["", "Spread over the successful runs (min–max):", ""]
    lines += ["| server |" + "".join(f" {label} |" for _, label, _ in metrics), "|---" * (1 + len(metrics)) + "|"]
    for server in servers:
        ok = [r for r in records if r.get("server") == server and not r.get("errors")]
        cells = []
        for path, _, _ in metrics:
            values = [v for r in ok if (v := dig(r, path)) is not None]
            cells.append(f"{fmt(min(values))}–{fmt(max(values))}" if values else "—")
        lines.append(f"| {server} |" + "".join(f" {c} |" for c in cells))
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


def targets(all_records: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The targets (benches/README.md), checked against this run's medians."""

    def m(workload: str, server: str, path: str) -> float | None:
        rs = [r for r in all_records.get(workload, []) if r.get("server") == server and not r.get("errors")]
        return med([v for r in rs if (v := dig(r, path)) is not None])

    def vs(workload: str, path: str, peer: str) -> float | None:
        return ratio(m(workload, "servercore", path), m(workload, peer, path))

    rows = []
    if "B1" in all_records:
        rows.append(("B1 ≥ 0.8 × epoll (one thread, plain epoll, no servercore code)",
                     vs("B1", "packets_per_sec", "epoll"), 0.8, True))
    if "E1" in all_records:
        sc, uv = m("E1", "servercore", "round_trips_per_sec"), m("E1", "uvloop", "round_trips_per_sec")
        rows.append(("E1 ≥ 10 × uvloop", ratio(sc, uv), 10.0, True))
        rows.append(("E1 max RTT < 1 s (µs)", m("E1", "servercore", "rtt_us.max"), 1e6, False))
        if m("E1", "servercore-uvloop", "round_trips_per_sec") is not None:
            rows.append(("E1 through serve_forever() on uvloop ≥ 8 × uvloop",
                         ratio(m("E1", "servercore-uvloop", "round_trips_per_sec"), uv), 8.0, True))
    if "L1" in all_records:
        rows.append(("L1 p50 ≤ 0.8 × uvloop's (ratio)", vs("L1", "rtt_us.p50", "uvloop"), 0.8, False))
        rows.append(("L1 p99 ≤ 0.8 × uvloop's (ratio)", vs("L1", "rtt_us.p99", "uvloop"), 0.8, False))
    if "R1" in all_records:
        rows.append(("R1 ≥ 1.0 × uvloop's round trips/s", vs("R1", "round_trips_per_sec", "uvloop"), 1.0, True))
        rows.append(("R1 server CPU per round trip ≤ uvloop's (ratio)",
                     vs("R1", "server_cpu_us_per_round_trip", "uvloop"), 1.0, False))
    if "RAW" in all_records:
        rows.append(("RAW ≥ 1.0 × uvloop's messages/s", vs("RAW", "messages_per_sec", "uvloop"), 1.0, True))
    if "M1" in all_records:
        rows.append(("M1 ≤ 512 B per idle session (KiB)", m("M1", "servercore", "kib_per_conn"), 0.5, False))
    if "HELLO" in all_records:
        rows.append(("HELLO server CPU ≤ 0.6 × uvloop's (ratio)",
                     vs("HELLO", "cpu_per_wall_second", "uvloop"), 0.6, False))
    if "DISPATCH" in all_records:
        rows.append(("DISPATCH ≤ 2 × a pure-Python call (ratio)", ratio(m("DISPATCH", "servercore", "servercore_ns_per_call"),
                     m("DISPATCH", "servercore", "python_ns_per_call")), 2.0, False))
    if not rows:
        return []
    out = ["### Targets (benches/README.md)", "", "| target | servercore | met |", "|---|---|---|"]
    for label, value, bound, at_least in rows:
        met = "—" if value is None else ("yes" if (value >= bound if at_least else value <= bound) else "**no**")
        shown = fmt_ratio(value) if "ratio" in label or "×" in label else fmt(value)
        out.append(f"| {label} | {shown} | {met} |")
    out.append("")
    return out


def one_line(workload: str, record: dict[str, Any]) -> str:
    if record.get("errors"):
        return f"ERROR: {record.get('error') or record.get('first_error') or (record.get('loadgen') or {}).get('first_error') or record.get('stderr', '')[-300:]}"
    if workload == "DISPATCH":
        return (f"servercore {record.get('servercore_ns_per_call')} ns/call, "
                f"python {record.get('python_ns_per_call')} ns/call, ratio {record.get('ratio')}")
    parts = [f"{label} {fmt(dig(record, path))}" for path, label, _ in METRICS[workload]]
    return ", ".join(parts)
