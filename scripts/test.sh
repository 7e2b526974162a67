#!/usr/bin/env bash
# Sets up everything on a fresh machine, then runs every test: Rust, then Python.
# Idempotent: a second run reuses .venv and cargo's build cache.
set -euo pipefail
cd "$(dirname "$0")/.."

# Real components the tests start themselves: Mono's C# compiler and runtime
# (tests/test_gen.py compiles a generated C# client) and redis-server
# (tests/test_bus.py starts its own on a free loopback port).
missing=()
if ! command -v mcs >/dev/null 2>&1 || ! command -v mono >/dev/null 2>&1; then missing+=(mono-mcs); fi
if ! command -v redis-server >/dev/null 2>&1; then missing+=(redis-server); fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing ${missing[*]}"
    if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt

echo "== cargo fmt --check, cargo clippy"
cargo fmt --check
cargo clippy --locked --all-targets --features python -- -D warnings

echo "== cargo test"
cargo test --locked

echo "== maturin develop --release"
maturin develop --release --locked --quiet

echo "== pytest"
python -m pytest "$@"
