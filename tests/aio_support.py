"""Helpers for tests on an asyncio loop: a runner for both loop kinds, a
protocol peer over asyncio streams, and waiting on the loop.

Everything uses real sockets on loopback; nothing mocks the network.
"""

from __future__ import annotations

import asyncio
import gc
import time
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop

from support import HEADER

LOOP_KINDS = ["asyncio", "uvloop"]

Run = Callable[[Callable[[], Awaitable[Any]]], Any]


def runner(loop_kind: str) -> Run:
    """`run(main)` runs the coroutine function `main` on a fresh loop of the
    kind under test, bounded to 20 s, with the loop's unhandled-exception
    reports ("Task was destroyed but it is pending", errors nobody retrieved)
    turned into failures."""

    def run(main: Callable[[], Awaitable[Any]]) -> Any:
        reports: list[dict[str, Any]] = []

        async def bounded() -> Any:
            asyncio.get_running_loop().set_exception_handler(lambda loop, context: reports.append(context))
            try:
                return await asyncio.wait_for(main(), 20)
            finally:
                # A test that failed midway leaves its peers open; a loop
                # closed with open transports does not close cleanly.
                while Peer.unclosed:
                    await Peer.unclosed[-1].close()

        with warnings.catch_warnings():
            warnings.simplefilter("error", ResourceWarning)
            if loop_kind == "uvloop":
                result = uvloop.run(bounded())
            else:
                result = asyncio.run(bounded())
            gc.collect()
        assert reports == [], [report.get("message") for report in reports]
        return result

    return run


class Peer:
    """A client speaking the protocol over asyncio streams."""

    unclosed: list[Peer] = []

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        Peer.unclosed.append(self)

    @classmethod
    async def connect(cls, port: int) -> Peer:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def recv_packet(self, timeout: float = 5.0) -> tuple[int, bytes]:
        head = await asyncio.wait_for(self.reader.readexactly(HEADER.size), timeout)
        size, packet_id = HEADER.unpack(head)
        payload = await asyncio.wait_for(self.reader.readexactly(size - HEADER.size), timeout)
        return packet_id, payload

    async def recv_packet_with_id(self, packet_id: int, timeout: float = 5.0) -> bytes:
        """The payload of the next packet with this id, skipping others (broadcasts)."""
        while True:
            got_id, payload = await self.recv_packet(timeout)
            if got_id == packet_id:
                return payload

    async def closed(self, timeout: float = 5.0) -> bool:
        """True once the server has closed (EOF or reset), reading what comes first."""
        try:
            while await asyncio.wait_for(self.reader.read(65536), timeout):
                pass
        except ConnectionError:
            pass
        return True

    async def close(self) -> None:
        if self in Peer.unclosed:
            Peer.unclosed.remove(self)
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass


async def peers(port: int, count: int) -> list[Peer]:
    return list(await asyncio.gather(*(Peer.connect(port) for _ in range(count))))


async def until(condition: Callable[[], Any], timeout: float = 5.0, message: str = "condition not met") -> None:
    """Lets the loop run until `condition()` holds; fails at the timeout."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout}s: {message}")
        await asyncio.sleep(0.005)
