#!/usr/bin/env bash
# Fuzzes the frame decoder with libFuzzer for a fixed number of runs (default 2,000,000).
#   bash scripts/fuzz.sh [RUNS]
# cargo-fuzz needs nightly features; RUSTC_BOOTSTRAP lets the stable toolchain build them.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-2000000}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
cargo fuzz run frame_decoder --sanitizer none -- -runs="$runs" -max_len=4096
