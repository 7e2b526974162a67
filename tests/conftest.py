"""Fixtures: real servers and clients on 127.0.0.1, port 0, always stopped."""

from __future__ import annotations

import resource
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from servercore import Client, Server, Session
from aio_support import LOOP_KINDS, Run, runner
from support import RawPeer


@pytest.fixture(autouse=True, scope="session")
def enough_file_descriptors() -> None:
    """Tests open a few thousand sockets; lift the soft fd limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 8192 if hard == resource.RLIM_INFINITY else min(8192, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A module that sets `BOTH_IO_PATHS = True` runs each of its tests twice:
    with the polling thread serving the sockets itself at light load (the
    default, `inline_io=True`), and with only the I/O threads (`inline_io=False`)."""
    if getattr(metafunc.module, "BOTH_IO_PATHS", False) and "io_path" in metafunc.fixturenames:
        metafunc.parametrize("io_path", ["inline", "threads"], indirect=True)


@pytest.fixture
def io_path(request: pytest.FixtureRequest) -> str:
    """Which path serves the sockets of the servers and clients a test starts."""
    return getattr(request, "param", "inline")


@pytest.fixture
def start_server(io_path: str) -> Iterator[Callable[..., Server]]:
    """`start_server(SessionClass, **options)` -> a started Server on 127.0.0.1:0."""
    started: list[Server] = []

    def start(session_class: type[Session], **options: Any) -> Server:
        options.setdefault("inline_io", io_path == "inline")
        server = Server(session_class, "127.0.0.1", 0, **options)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def start_client(io_path: str) -> Iterator[Callable[..., Client]]:
    """`start_client(SessionClass, port, count=1, **options)` -> a started Client."""
    started: list[Client] = []

    def start(session_class: type[Session], port: int, count: int = 1, **options: Any) -> Client:
        options.setdefault("inline_io", io_path == "inline")
        client = Client(session_class, "127.0.0.1", port, count=count, **options)
        client.start()
        started.append(client)
        return client

    yield start
    for client in started:
        client.stop()


@pytest.fixture
def raw_peers() -> Iterator[Callable[..., RawPeer]]:
    """`connect(port, **options)` -> a RawPeer (see support.RawPeer); all are
    closed after the test."""
    peers: list[RawPeer] = []

    def connect(port: int, **options: Any) -> RawPeer:
        peer = RawPeer(port, **options)
        peers.append(peer)
        return peer

    yield connect
    for peer in peers:
        peer.close()


@pytest.fixture(params=LOOP_KINDS)
def run(request: pytest.FixtureRequest) -> Run:
    """`run(main)` runs the coroutine function `main` on a fresh event loop,
    once on asyncio's own and once on uvloop (see aio_support.runner)."""
    return runner(request.param)
