"""(b) Encoding one packet: servercore's SendBuffer (encoded once into pooled
memory, shareable by any number of sessions) against what an asyncio server
does, struct.pack of the header plus concatenation. No sockets; both make and
drop one packet per call."""

from __future__ import annotations

from typing import Any

import pytest
from bench_support import encode_py

from servercore import SendBuffer


# Rounds of at least 100 µs (many calls each), after a warm-up: a call is
# ~100-200 ns, too close to the timer's own cost for one call per round.
CALIBRATION = pytest.mark.benchmark(min_time=0.0001, warmup=True, warmup_iterations=10_000)


@CALIBRATION
@pytest.mark.parametrize("size", [64, 1000])
def test_encode_servercore(benchmark: Any, size: int) -> None:
    benchmark.group = f"encode: one packet of {size} B"
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    packet = benchmark(SendBuffer, 1, payload)
    assert bytes(packet) == encode_py(1, payload)


@CALIBRATION
@pytest.mark.parametrize("size", [64, 1000])
def test_encode_python(benchmark: Any, size: int) -> None:
    benchmark.group = f"encode: one packet of {size} B"
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    packet = benchmark(encode_py, 1, payload)
    assert len(packet) == size + 4
