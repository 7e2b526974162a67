"""servercore on an asyncio loop: what `serve_forever()`, `async with` and the
async callbacks are made of.

The engine wakes the loop through a file descriptor the loop watches with
`add_reader`: no timer, no thread of ours. Under load it is an eventfd the
I/O threads signal when they queue events; at light load, as under `poll()`,
the loop's thread serves the sockets itself, and the descriptor is their
epoll set (which holds the eventfd too), so a request is read, handled and
answered on this thread without crossing to another. The engine says which
each time the driver arms it. When it is readable the loop's thread delivers
every queued event in one batch, exactly as `poll()` would, then arms again.
Callbacks therefore run on the loop's thread, between its other callbacks
and tasks.

An `async def` callback's coroutine comes back to the driver (`_spawn`) and
runs as a task; its session waits for it in the engine (rust/bindings/
dispatcher.rs) and is resumed when the task is done. Cancelling
`serve_forever()` or leaving `async with` stops the service: the running
on_connected / on_recv_packet / on_send tasks are cancelled and awaited,
on_disconnected tasks are awaited (they are the place to save a player), and
it returns once every on_disconnected has been delivered.

A service is driven by one loop or by `poll()`, never both (the engine says
which when the other tries). Its `_Driver` lives as long as the loop drives
it and is kept on the service (`service._aio_driver`).
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any, Protocol


class Service(Protocol):
    """What the driver uses of a Server or Client: the public surface and the
    private hooks the engine keeps for this module (not in the stub, since
    nothing else should call them)."""

    @property
    def running(self) -> bool: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    _aio_driver: _Driver | None
    def _aio_arm(self) -> int | None: ...
    def _aio_next_job(self) -> float | None: ...
    def _aio_deliver(self, driver: _Driver) -> bool: ...
    def _aio_resume(
        self, driver: _Driver, session_id: int, callback: str, error: BaseException | None
    ) -> bool: ...


class _Driver:
    """Delivers a service's events on one asyncio loop until it is finished."""

    def __init__(self, service: Service, loop: asyncio.AbstractEventLoop) -> None:
        self._service = service
        self.loop = loop
        # The descriptor watched: the engine's wake descriptor, or at light
        # load the set of the sockets this thread then serves itself.
        self._watched: int | None = None
        self._scheduled = False
        # A loop timer for the service's next timer or posted call, if any.
        self._job_timer: asyncio.TimerHandle | None = None
        self._closing = False
        # Async callbacks running, with the name of each.
        self._tasks: dict[asyncio.Task[Any], str] = {}
        # Resolved once the last on_disconnected has been delivered.
        self.finished: asyncio.Future[None] = loop.create_future()
        self._arm()

    def _deliver(self) -> None:
        self._scheduled = False
        if self.finished.done():
            return
        try:
            finished = self._service._aio_deliver(self)
        except BaseException:
            # A KeyboardInterrupt in a callback goes up through the loop, as
            # any callback's would; the rest of the batch waits for the next turn.
            self._deliver_soon()
            raise
        if finished:
            self._detach()
        else:
            self._arm()

    def _spawn(self, coroutine: Any, session_id: int, callback: str) -> None:
        """Runs an async callback as a task (called by the engine's dispatcher)."""
        task = self.loop.create_task(coroutine)
        self._tasks[task] = callback
        if self._closing and callback != "on_disconnected":
            task.cancel()
        task.add_done_callback(functools.partial(self._resume, session_id, callback))

    def _resume(self, session_id: int, callback: str, task: asyncio.Task[Any]) -> None:
        del self._tasks[task]
        error = None if task.cancelled() else task.exception()
        if self._service._aio_resume(self, session_id, callback, error):
            self._detach()

    def _arm(self) -> None:
        watch = self._service._aio_arm()
        if watch is None:
            self._deliver_soon()
        elif watch != self._watched:
            self._unwatch()
            self.loop.add_reader(watch, self._deliver)
            self._watched = watch
        self._schedule_jobs(self._service._aio_next_job())

    def _schedule_jobs(self, delay: float | None) -> None:
        """Keeps one loop timer at the service's next job (timers, posted calls)."""
        timer = self._job_timer
        if delay is None:
            if timer is not None:
                timer.cancel()
                self._job_timer = None
            return
        when = self.loop.time() + delay
        if timer is not None:
            if abs(timer.when() - when) < 0.0005:
                return
            timer.cancel()
        self._job_timer = self.loop.call_at(when, self._jobs_due)

    def _jobs_due(self) -> None:
        self._job_timer = None
        self._deliver()

    def _unwatch(self) -> None:
        if self._watched is not None:
            self.loop.remove_reader(self._watched)
            self._watched = None

    def _deliver_soon(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._deliver)

    def _detach(self) -> None:
        self._unwatch()
        self._schedule_jobs(None)
        if self._service._aio_driver is self:
            self._service._aio_driver = None
        if not self.finished.done():
            self.finished.set_result(None)

    async def close(self) -> None:
        """Stops the service and returns once every on_disconnected was delivered."""
        self._closing = True
        # On the loop's thread stop() does not block: the engine shuts down on
        # a thread of its own, and this loop delivers what it reports.
        self._service.stop()
        for task, callback in list(self._tasks.items()):
            if callback != "on_disconnected":
                task.cancel()
        await asyncio.shield(self.finished)


def _driver(service: Service) -> _Driver:
    """The driver of `service` on the running loop, attached on first use."""
    loop = asyncio.get_running_loop()
    driver: _Driver | None = service._aio_driver
    if driver is None:
        driver = _Driver(service, loop)
        service._aio_driver = driver
    elif driver.loop is not loop:
        raise RuntimeError("this service is driven by another event loop")
    return driver


async def _start(service: Service) -> None:
    # A Client's start connects all its sessions and blocks until they have:
    # not on the loop's thread.
    await asyncio.get_running_loop().run_in_executor(None, service.start)


async def _close_uncancellably(driver: _Driver) -> None:
    """Closes the service even if the task that does it is cancelled again
    meanwhile; the cancellation is raised once it is closed."""
    closing = asyncio.ensure_future(driver.close())
    cancelled = False
    while not closing.done():
        try:
            await asyncio.shield(closing)
        except asyncio.CancelledError:
            cancelled = True
    closing.result()
    if cancelled:
        raise asyncio.CancelledError


async def serve_forever(service: Service) -> None:
    if not service.running:
        await _start(service)
    driver = _driver(service)
    try:
        await asyncio.shield(driver.finished)
    except asyncio.CancelledError:
        await _close_uncancellably(driver)
        raise


async def enter(service: Service, needs_start: bool) -> Any:
    if needs_start:
        await _start(service)
    _driver(service)
    return service


async def exit(service: Service) -> bool:
    driver: _Driver | None = service._aio_driver
    if driver is None:
        if not service.running:
            return False
        driver = _driver(service)
    await _close_uncancellably(driver)
    return False
