#!/usr/bin/env bash
# Sets up everything on a fresh machine, then runs every test: Rust, then Python.
# Idempotent: a second run reuses .venv and cargo's build cache.
set -euo pipefail
cd "$(dirname "$0")/.."

# tests/test_gen.py compiles a generated C# client with Mono's compiler.
if ! command -v mcs >/dev/null 2>&1 || ! command -v mono >/dev/null 2>&1; then
    echo "== installing mono-mcs (Mono's C# compiler and runtime)"
    if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq mono-mcs >/dev/null
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
