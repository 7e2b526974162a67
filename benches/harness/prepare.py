"""Before any run: build the load client, check the Python side, and record
the machine and the build that is measured."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .common import EPOLL, FLOOR, LOADGEN, LOADGEN_DIR, REPO, BenchError, log


def build_loadgen() -> None:
    log("building benches/loadgen (cargo build --release) ...")
    t0 = time.monotonic()
    try:
        done = subprocess.run(
            ["cargo", "build", "--release", "--quiet"], cwd=LOADGEN_DIR, timeout=1800, capture_output=True, text=True
        )
    except FileNotFoundError:
        raise BenchError("cargo not found: a Rust toolchain is needed to build benches/loadgen") from None
    except subprocess.TimeoutExpired:
        raise BenchError("building benches/loadgen took over 30 minutes") from None
    if done.returncode != 0:
        raise BenchError(f"building benches/loadgen failed:\n{done.stderr[-4000:]}")
    if not (LOADGEN.exists() and FLOOR.exists() and EPOLL.exists()):
        raise BenchError(f"cargo build succeeded but {LOADGEN} / {FLOOR} / {EPOLL} are missing")
    log(f"built in {time.monotonic() - t0:.1f} s")


def check_python(servers: list[str]) -> dict[str, str]:
    versions = {}
    try:
        import servercore
    except ImportError as error:
        raise BenchError(
            f"servercore is not importable from {sys.executable} ({error}).\n"
            "Run this inside the project's virtualenv after `maturin develop --release`:\n"
            "    . .venv/bin/activate && python benches/run.py"
        ) from None
    versions["servercore"] = getattr(servercore, "__version__", "?")
    if "uvloop" in servers:
        try:
            import uvloop
        except ImportError:
            log(f"uvloop is not installed in {sys.executable}; installing it: pip install uvloop")
            done = subprocess.run([sys.executable, "-m", "pip", "install", "uvloop"], timeout=600)
            if done.returncode != 0:
                raise BenchError(
                    "uvloop is needed for the uvloop peer and `pip install uvloop` failed.\n"
                    "Install it by hand, or leave that peer out: --servers servercore,asyncio,floor"
                ) from None
            import uvloop
        versions["uvloop"] = uvloop.__version__
    return versions


def extension_fingerprint() -> dict[str, Any]:
    """Which build of servercore's extension the servers load (a fresh import in
    each server process), and the state of the tree the floor was built from."""
    out: dict[str, Any] = {}
    try:
        import importlib.util

        spec = importlib.util.find_spec("servercore._core")
        path = Path(spec.origin) if spec and spec.origin else None
        if path is not None and path.exists():
            import hashlib

            st = path.stat()
            out["extension"] = str(path)
            out["extension_mtime"] = dt.datetime.fromtimestamp(st.st_mtime, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
            out["extension_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except Exception as error:  # noqa: BLE001 - informational only
        out["extension_error"] = str(error)
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=30)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "rust", "python", "Cargo.toml"], cwd=REPO,
                               capture_output=True, text=True, timeout=30)
        out["git_head"] = head.stdout.strip()
        out["git_dirty_engine_files"] = len(dirty.stdout.splitlines())
    except (OSError, subprocess.TimeoutExpired):
        pass
    return out


def machine_info() -> dict[str, Any]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        rustc = "?"
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "rustc": rustc,
    }
