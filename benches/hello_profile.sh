#!/bin/bash
# Where a HELLO server's CPU goes (BENCHMARKS.md, round two, "What limits
# what is not met"): the lecture's GameServer (1000 clients, a 1004-byte
# Hello World at 4 Hz) under `perf record -g`, then `perf stat`.
#
#   benches/hello_profile.sh servercore|uvloop      # needs perf, loadgen built
#   perf report -i /tmp/hello_servercore.data --children --sort symbol -g none
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
loadgen=benches/loadgen/target/release/loadgen
out=$(mktemp -d)
case "${1:?servercore or uvloop}" in
  uvloop) "$python" benches/servers/asyncio_server.py --port 0 --mode hello --uvloop >"$out/srv" 2>&1 & ;;
  servercore) "$python" benches/servers/servercore_server.py --port 0 --mode hello >"$out/srv" 2>&1 & ;;
  *) echo "servercore or uvloop" >&2; exit 2 ;;
esac
server=$!
trap 'kill $server 2>/dev/null; kill ${clients:-} 2>/dev/null; rm -rf "$out"' EXIT
for _ in $(seq 100); do grep -q listening "$out/srv" && break; sleep 0.1; done
port=$(awk '/listening/{print $2}' "$out/srv")
sleep 30 | "$loadgen" idle --port "$port" --clients 1000 --hold 30 --timeout 30 --expect-hello 1000 >"$out/clients" 2>&1 &
clients=$!
sleep 4   # connected, and a few ticks in
perf record -F 2000 -g -p "$server" -o "/tmp/hello_$1.data" -- sleep 8 >/dev/null 2>&1
perf stat -e task-clock,context-switches -p "$server" -- sleep 5 2>&1 | grep -E "task-clock|context-switches"
