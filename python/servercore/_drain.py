"""`run_forever()`: serve until stopped, and drain on SIGTERM or SIGINT.

A server that an orchestrator (systemd, Kubernetes, a terminal's Ctrl-C)
asks to stop should not drop its players mid-sentence. On the main thread,
`run_forever()` takes SIGTERM and SIGINT for as long as it runs (the
previous handlers come back afterwards). The first one drains:

1. no new connections (a server closes its listening socket);
2. `on_stopping()` runs on the polling thread: save the game, tell players;
3. every session flushes what it was sent (the goodbye included) within
   `shutdown_grace` (an option, 5 s by default) and is closed;
4. each gets `on_disconnected(SERVER_SHUTDOWN)`, then `run_forever()` returns.

A second signal stops at once: sessions still flushing are cut (each
reported, with what it never sent), and `run_forever()` returns as soon as
their `on_disconnected` calls have run.

Python runs signal handlers on the main thread between bytecodes; the
engine's waits look for them every 100 ms, so a drain starts within that.
Off the main thread (where Python cannot take signals) `run_forever()` only
serves until `stop()`.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, Protocol

log = logging.getLogger("servercore")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Service(Protocol):
    """What the drain uses of a Server or Client (private hooks of the engine)."""

    def _serve(self) -> None: ...
    def _begin_drain(self, on_stopping: Callable[[], object] | None) -> None: ...
    def _hurry_drain(self) -> None: ...
    @property
    def _shutdown_grace(self) -> float: ...


def run_forever(service: Service, on_stopping: Callable[[], object] | None) -> None:
    if threading.current_thread() is not threading.main_thread():
        service._serve()
        return
    signals_seen = 0

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal signals_seen
        signals_seen += 1
        name = signal.Signals(signum).name
        if signals_seen == 1:
            log.warning("%s: draining; sessions have %.1f s to flush (again to stop at once)",
                        name, service._shutdown_grace)
            service._begin_drain(on_stopping)
        elif signals_seen == 2:
            log.warning("%s again: stopping at once", name)
            service._hurry_drain()

    previous: dict[signal.Signals, Any] = {}
    try:
        for sig in SIGNALS:
            previous[sig] = signal.signal(sig, on_signal)
        service._serve()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
