"""Timers and posted calls (rust/bindings/scheduler.rs): `call_later`,
`call_every`, `post`.

- They run on the polling thread, in the same deliveries as the packet
  callbacks: inside poll(), or on the loop that drives the service.
- `call_every` keeps a fixed rate: tick n is due at start + n x interval
  however long the ticks took; ticks passed over while one was late are
  counted in `late_ticks`, not run back to back.
- `post` may be called from any thread and wakes a waiting poll() at once;
  posted calls run in the order posted, and those posted before stop() run
  before it returns.
- An exception in a job is logged with its traceback; the timer keeps its
  schedule and the other jobs run.
- Bad arguments are refused at the call, naming what to fix.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

import pytest

from aio_support import Run
from servercore import PacketSession, Server, Timer
from support import RawPeer, connect, poll_for, poll_until

BOTH_IO_PATHS = True


def test_call_later_runs_once_after_its_delay_on_the_polling_thread(start_server: Callable[..., Server]) -> None:
    server = start_server(PacketSession)
    calls: list[tuple[str, float, int]] = []
    started = time.monotonic()
    timer = server.call_later(0.1, lambda name: calls.append((name, time.monotonic(), threading.get_ident())), "once")
    assert isinstance(timer, Timer) and timer.interval is None and not timer.cancelled
    poll_for(server, 0.05)
    assert calls == []
    poll_until(server, lambda: calls)
    poll_for(server, 0.15)
    ((name, at, thread),) = calls
    assert name == "once" and thread == threading.get_ident()
    assert 0.1 <= at - started < 0.3


def test_call_every_keeps_a_fixed_rate_without_drift(start_server: Callable[..., Server]) -> None:
    server = start_server(PacketSession)
    ticks: list[float] = []
    interval = 0.04
    started = time.monotonic()

    def tick() -> None:
        ticks.append(time.monotonic())
        time.sleep(0.01)  # each tick takes a quarter of the interval: no drift for it

    timer = server.call_every(interval, tick)
    poll_until(server, lambda: len(ticks) >= 20, timeout=5)
    timer.cancel()
    # Tick n is due at started + n x interval: on the grid, never behind by a
    # growing amount (the run's first and last ticks are equally late).
    lateness = [at - (started + (n + 1) * interval) for n, at in enumerate(ticks)]
    assert min(lateness) >= -0.001, lateness
    assert lateness[-1] < 0.03, lateness  # drifting by the tick's 10 ms would be 200 ms
    assert timer.late_ticks == 0


def test_ticks_passed_over_while_one_is_late_are_counted_not_bunched(start_server: Callable[..., Server]) -> None:
    """Tick 3 stalls the game for 3.5 intervals: slot 4 runs late, once, as
    soon as the stall ends; slots 5 and 6 are counted, not run; from slot 7
    on the ticks are back on the grid."""
    server = start_server(PacketSession)
    ticks: list[float] = []
    interval = 0.05

    def tick() -> None:
        ticks.append(time.monotonic())
        if len(ticks) == 3:
            time.sleep(interval * 3.5)

    started = time.monotonic()
    timer = server.call_every(interval, tick)
    poll_until(server, lambda: len(ticks) >= 9, timeout=5)
    timer.cancel()
    assert timer.late_ticks == 2
    stall_end = ticks[2] + interval * 3.5
    assert stall_end <= ticks[3] < stall_end + 0.02, ticks
    slot = [(at - started) / interval for at in ticks[4:]]
    assert [round(s) for s in slot] == list(range(7, 7 + len(slot))), slot
    assert all(s - round(s) < 0.4 for s in slot), slot


def test_a_timer_stops_when_cancelled_from_its_callback_or_another_thread(start_server: Callable[..., Server]) -> None:
    server = start_server(PacketSession)
    counts = {"self": 0, "other": 0}
    timers: dict[str, Timer] = {}

    def cancels_itself() -> None:
        counts["self"] += 1
        if counts["self"] == 3:
            timers["self"].cancel()

    timers["self"] = server.call_every(0.01, cancels_itself)
    timers["other"] = server.call_every(0.01, lambda: counts.__setitem__("other", counts["other"] + 1))
    poll_until(server, lambda: counts["other"] >= 3)
    canceller = threading.Thread(target=timers["other"].cancel)
    canceller.start()
    canceller.join()
    seen = dict(counts)
    poll_for(server, 0.1)
    assert counts["self"] == 3
    assert counts["other"] <= seen["other"] + 1  # at most the one already under way
    assert timers["self"].cancelled and timers["other"].cancelled


def test_a_post_from_another_thread_wakes_a_waiting_poll_and_keeps_its_order(
    start_server: Callable[..., Server],
) -> None:
    server = start_server(PacketSession)
    ran: list[tuple[int, int]] = []

    def post_later() -> None:
        time.sleep(0.1)
        for n in range(5):
            server.post(lambda n: ran.append((n, threading.get_ident())), n)

    poster = threading.Thread(target=post_later)
    poster.start()
    started = time.monotonic()
    while len(ran) < 5 and time.monotonic() - started < 5:
        server.poll(10.0)  # would wait 10 s if nothing woke it
    poster.join()
    assert time.monotonic() - started < 1.0
    assert [n for n, _ in ran] == [0, 1, 2, 3, 4]
    assert {thread for _, thread in ran} == {threading.get_ident()}


def test_jobs_run_with_the_packet_callbacks_and_posted_calls_before_stop_are_not_lost(
    start_server: Callable[..., Server], raw_peers: Callable[..., RawPeer]
) -> None:
    """The lecture's GameServer on the toolkit: a tick broadcasts to everyone;
    and what was posted before stop() runs before the last on_disconnected."""
    order: list[str] = []

    class Player(PacketSession):
        def on_disconnected(self, reason: object) -> None:
            order.append("on_disconnected")

    server = start_server(Player)
    peers = connect(server, raw_peers, count=3)
    ticks = [0]

    def tick() -> None:
        ticks[0] += 1
        server.broadcast(1, b"Hello World")

    server.call_every(0.02, tick)
    poll_until(server, lambda: ticks[0] >= 2)
    for peer in peers:
        assert peer.recv_packet() == (1, b"Hello World")
        assert peer.recv_packet() == (1, b"Hello World")
    server.post(order.append, "posted")
    server.stop()
    assert order == ["posted", "on_disconnected", "on_disconnected", "on_disconnected"]
    with pytest.raises(RuntimeError, match="has finished"):
        server.post(print)


def test_an_exception_in_a_job_is_logged_and_the_schedule_goes_on(
    start_server: Callable[..., Server], caplog: pytest.LogCaptureFixture
) -> None:
    server = start_server(PacketSession)
    ticks: list[int] = []

    def flaky() -> None:
        ticks.append(1)
        if len(ticks) == 2:
            raise ValueError("tick 2 failed")

    with caplog.at_level(logging.ERROR, logger="servercore"):
        server.call_every(0.01, flaky)
        server.post(lambda: 1 / 0)
        poll_until(server, lambda: len(ticks) >= 4)
    errors = [r for r in caplog.records if r.name == "servercore" and r.exc_info]
    assert {r.exc_info[0] for r in errors if r.exc_info} == {ValueError, ZeroDivisionError}
    assert any("timer" in r.getMessage() and "flaky" in r.getMessage() for r in errors)
    assert any("posted call" in r.getMessage() for r in errors)


def test_bad_arguments_are_refused_at_the_call() -> None:
    server = Server(PacketSession, "127.0.0.1", 0)
    with pytest.raises(ValueError, match="delay"):
        server.call_later(-1, print)
    with pytest.raises(ValueError, match="interval"):
        server.call_every(0, print)
    with pytest.raises(ValueError, match="interval"):
        server.call_every(float("nan"), print)
    with pytest.raises(TypeError, match="callback must be callable, got str"):
        server.call_later(1, "print")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="callback must be callable"):
        server.post(None)  # type: ignore[arg-type]


def test_timers_made_before_start_run_once_it_polls() -> None:
    server = Server(PacketSession, "127.0.0.1", 0)
    ran: list[str] = []
    server.call_later(0, ran.append, "later")
    server.post(ran.append, "posted")
    with server:
        poll_until(server, lambda: len(ran) == 2)
    assert ran == ["posted", "later"]


def test_on_a_loop_jobs_run_on_the_loops_thread(run: Run, io_path: str) -> None:
    ran: list[tuple[str, int]] = []

    async def main() -> None:
        async with Server(PacketSession, "127.0.0.1", 0, inline_io=io_path == "inline") as server:
            loop_thread = threading.get_ident()
            ticked = asyncio.Event()

            def tick() -> None:
                ran.append(("tick", threading.get_ident()))
                if len(ran) >= 3:
                    ticked.set()

            timer = server.call_every(0.01, tick)
            await asyncio.wait_for(ticked.wait(), 5)
            timer.cancel()
            # A post from another thread wakes the idle loop, which runs it.
            posted = asyncio.Event()
            poster = threading.Thread(target=server.post, args=(lambda: (ran.append(("posted", threading.get_ident())),
                                                                         posted.set()),))
            started = time.monotonic()
            poster.start()
            await asyncio.wait_for(posted.wait(), 5)
            poster.join()
            assert time.monotonic() - started < 0.5
            assert {thread for _, thread in ran} == {loop_thread}

    run(main)
