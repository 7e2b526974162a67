"""What every part of the harness shares: where things are, the error a run
reports, and progress on stderr."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHES = Path(__file__).resolve().parent.parent
REPO = BENCHES.parent
LOADGEN_DIR = BENCHES / "loadgen"
LOADGEN = LOADGEN_DIR / "target" / "release" / "loadgen"
FLOOR = LOADGEN_DIR / "target" / "release" / "floor"
EPOLL = LOADGEN_DIR / "target" / "release" / "epoll_floor"
SERVERS_DIR = BENCHES / "servers"
RESULTS = BENCHES / "results"


class BenchError(Exception):
    pass


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
