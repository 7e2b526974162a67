"""servercore on an asyncio loop (python/servercore/_aio.py,
rust/bindings/dispatcher.rs): `async with` and `serve_forever()`, async
callbacks, and how they end.

- Callbacks run on the loop's thread, woken by the engine's descriptor.
- A service is driven by poll()/run_forever() or by a loop, never both.
- `async def` callbacks run as tasks; per session, the handler of packet n+1
  starts after the one of packet n has finished, and on_disconnected comes last.
  While a handler awaits, its session's further packets wait in the engine
  (bounded by max_pending_recv_bytes, so TCP pushes back on that peer alone).
- An exception in a coroutine is an exception in a callback: logged with its
  traceback, session closed CALLBACK_ERROR.
- Cancelling serve_forever() or leaving `async with` drains like stop():
  running on_connected/on_recv_packet tasks are cancelled and awaited,
  on_disconnected tasks are awaited, every on_disconnected is delivered.

Every test runs on asyncio's own loop and on uvloop, over real sockets; those
with a server, on both I/O paths (the loop's thread serving the sockets at
light load, and the I/O threads alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import random
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from aio_support import Peer, Run, peers, until
from servercore import Client, DisconnectReason, PacketSession, Server
from support import SEQ, RawPeer, connect, packet, poll_until

BOTH_IO_PATHS = True

ServerFactory = Callable[..., Server]


@pytest.fixture
def serve(io_path: str) -> ServerFactory:
    """`serve(SessionClass, **options)` -> an unstarted Server on 127.0.0.1:0
    on the I/O path under test; `async with` or serve_forever() starts it."""

    def make(session_class: type[PacketSession], **options: Any) -> Server:
        options.setdefault("inline_io", io_path == "inline")
        return Server(session_class, "127.0.0.1", 0, **options)

    return make

def numbered(n: int, packet_id: int = 1) -> bytes:
    return packet(packet_id, SEQ.pack(n))


class Recorder(PacketSession):
    """Echoes, and records which thread ran each callback and how sessions ended."""

    threads: set[int]
    ended: list[DisconnectReason]

    def on_connected(self) -> None:
        type(self).threads.add(threading.get_ident())

    def on_recv_packet(self, packet_id: int, payload: bytes) -> None:
        type(self).threads.add(threading.get_ident())
        self.send(packet_id, payload)

    def on_disconnected(self, reason: DisconnectReason) -> None:
        type(self).threads.add(threading.get_ident())
        type(self).ended.append(reason)


def recorder() -> type[Recorder]:
    return type("Recorder", (Recorder,), {"threads": set(), "ended": []})


# --- driving a service from a loop ------------------------------------------------------


def test_callbacks_run_on_the_loops_thread_and_leaving_async_with_drains(run: Run, serve: ServerFactory) -> None:
    session_class = recorder()

    async def main() -> None:
        async with serve(session_class) as server:
            assert server.running
            clients = await peers(server.port, 5)
            for n, peer in enumerate(clients):
                peer.send(numbered(n))
            for n, peer in enumerate(clients):
                assert await peer.recv_packet() == (1, SEQ.pack(n))
            assert len(server) == 5
        # Leaving the block is stop(): everything delivered before it returns.
        assert not server.running
        assert session_class.ended == [DisconnectReason.SERVER_SHUTDOWN] * 5
        for peer in clients:
            assert await peer.closed()
            await peer.close()
        assert session_class.threads == {threading.get_ident()}

    run(main)


def test_cancelling_serve_forever_drains_like_stop(run: Run, serve: ServerFactory) -> None:
    session_class = recorder()

    async def main() -> None:
        server = serve(session_class)
        serving = asyncio.create_task(server.serve_forever())
        await until(lambda: server.running)
        clients = await peers(server.port, 3)
        await until(lambda: len(server) == 3)
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving
        assert not server.running
        assert session_class.ended == [DisconnectReason.SERVER_SHUTDOWN] * 3
        for peer in clients:
            await peer.close()

    run(main)


def test_serve_forever_returns_when_stop_is_called_from_a_callback(run: Run, serve: ServerFactory) -> None:
    class StopOnRequest(PacketSession):
        ended: list[DisconnectReason] = []

        def on_recv_packet(self, packet_id: int, payload: bytes) -> None:
            server.stop()

        def on_disconnected(self, reason: DisconnectReason) -> None:
            self.ended.append(reason)

    server = serve(StopOnRequest)

    async def main() -> None:
        async with server:
            peer = await Peer.connect(server.port)
            peer.send(numbered(0))
            await server.serve_forever()
            assert StopOnRequest.ended == [DisconnectReason.SERVER_SHUTDOWN]
            await peer.close()

    run(main)


def test_stop_from_another_thread_is_delivered_on_the_loops_thread(run: Run, serve: ServerFactory) -> None:
    session_class = recorder()

    async def main() -> None:
        async with serve(session_class) as server:
            clients = await peers(server.port, 4)
            await until(lambda: len(server) == 4)
            stopper = threading.Thread(target=server.stop)
            stopper.start()
            await server.serve_forever()
            stopper.join(5)
            assert session_class.ended == [DisconnectReason.SERVER_SHUTDOWN] * 4
        assert session_class.threads == {threading.get_ident()}
        for peer in clients:
            await peer.close()

    run(main)


def test_a_client_is_driven_the_same_way(run: Run, serve: ServerFactory) -> None:
    class Bot(PacketSession):
        echoes: list[int] = []

        def on_connected(self) -> None:
            self.send(1, SEQ.pack(self.id))

        def on_recv_packet(self, packet_id: int, payload: bytes) -> None:
            self.echoes.append(SEQ.unpack(payload)[0])

    server_class = recorder()

    async def main() -> None:
        async with serve(server_class) as server:
            async with Client(Bot, "127.0.0.1", server.port, count=3) as client:
                await until(lambda: len(Bot.echoes) == 3, message=f"echoes {Bot.echoes}")
                assert sorted(Bot.echoes) == sorted(session.id for session in client.sessions)
            await until(lambda: len(server_class.ended) == 3)
            assert server_class.ended == [DisconnectReason.CLOSED_BY_PEER] * 3

    run(main)


def test_a_service_is_driven_by_poll_or_by_a_loop_never_both(run: Run, serve: ServerFactory) -> None:
    looped = serve(recorder())
    polled = serve(recorder())
    polled.start()
    try:
        polled.poll(0)

        async def main() -> None:
            async with looped:
                with pytest.raises(RuntimeError, match="driven by an asyncio loop"):
                    looped.poll(0)
                with pytest.raises(RuntimeError, match="driven by an asyncio loop"):
                    looped.run_forever()
            with pytest.raises(RuntimeError, match=r"driven by poll\(\) or run_forever\(\)"):
                async with polled:
                    pass

        run(main)
    finally:
        polled.stop()
        looped.stop()


# --- async callbacks --------------------------------------------------------------------


def test_async_handlers_keep_the_order_of_each_sessions_packets(run: Run, serve: ServerFactory) -> None:
    """Handlers sleep a random while; per session, each ends before the next
    starts, in the order sent, and on_disconnected comes after the last."""
    events: dict[int, list[tuple[str, int]]] = {}
    rng = random.Random(7)

    class Slow(PacketSession):
        async def on_connected(self) -> None:
            events[self.id] = [("connected", -1)]
            await asyncio.sleep(rng.random() * 0.01)

        async def on_recv_packet(self, packet_id: int, payload: bytes) -> None:
            (n,) = SEQ.unpack(payload)
            events[self.id].append(("start", n))
            await asyncio.sleep(rng.random() * 0.003)
            events[self.id].append(("end", n))
            self.send(packet_id, payload)

        async def on_disconnected(self, reason: DisconnectReason) -> None:
            await asyncio.sleep(0.005)
            events[self.id].append((reason.name, -1))

    per_session = 40

    async def main() -> None:
        async with serve(Slow) as server:
            clients = await peers(server.port, 6)
            for peer in clients:
                peer.send(b"".join(numbered(n) for n in range(per_session)))
            for peer in clients:
                echoed = [SEQ.unpack((await peer.recv_packet())[1])[0] for _ in range(per_session)]
                assert echoed == list(range(per_session))
            await clients[0].close()
            await until(lambda: any(e[-1][0] == "CLOSED_BY_PEER" for e in events.values()))
        for peer in clients[1:]:
            await peer.close()

    run(main)
    assert len(events) == 6
    endings = sorted(log[-1][0] for log in events.values())
    assert endings == ["CLOSED_BY_PEER"] + ["SERVER_SHUTDOWN"] * 5
    for log in events.values():
        assert log[0] == ("connected", -1)
        expected = [(step, n) for n in range(per_session) for step in ("start", "end")]
        assert log[1:-1] == expected


def test_an_async_on_connected_announces_the_session_when_it_has_finished(run: Run, serve: ServerFactory) -> None:
    """Broadcasts reach a session only once its on_connected returned, async or not."""

    class Gated(PacketSession):
        entered: asyncio.Event
        opened: asyncio.Event

        async def on_connected(self) -> None:
            self.entered.set()
            await self.opened.wait()

    async def main() -> None:
        Gated.entered = asyncio.Event()
        Gated.opened = asyncio.Event()
        async with serve(Gated) as server:
            peer = await Peer.connect(server.port)
            await asyncio.wait_for(Gated.entered.wait(), 5)
            assert server.broadcast(9, b"early") == 0
            Gated.opened.set()
            await until(lambda: server.broadcast(9, b"late") == 1)
            assert await peer.recv_packet() == (9, b"late")
            await peer.close()

    run(main)


def test_an_exception_in_a_coroutine_closes_only_its_session(
    run: Run, serve: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    class Boom(Exception):
        pass

    ended: dict[int, DisconnectReason] = {}

    class Fragile(PacketSession):
        async def on_recv_packet(self, packet_id: int, payload: bytes) -> None:
            await asyncio.sleep(0.001)
            if packet_id == 13:
                raise Boom("the handler failed")
            self.send(packet_id, payload)

        def on_disconnected(self, reason: DisconnectReason) -> None:
            ended[self.id] = reason

    async def main() -> None:
        async with serve(Fragile) as server:
            bad, good = await peers(server.port, 2)
            await until(lambda: len(server) == 2)
            bad.send(packet(13, b"x"))
            assert await bad.closed()
            await until(lambda: len(ended) == 1)
            for n in range(5):
                good.send(numbered(n))
                assert await good.recv_packet() == (1, SEQ.pack(n))
            assert len(server) == 1
            await bad.close()
            await good.close()
        (bad_id,) = [sid for sid, reason in ended.items() if reason is DisconnectReason.CALLBACK_ERROR]
        errors = [r for r in caplog.records if r.name == "servercore" and r.exc_info]
        assert len(errors) == 1, [r.getMessage() for r in caplog.records]
        assert errors[0].levelno >= logging.ERROR
        assert errors[0].exc_info is not None and errors[0].exc_info[0] is Boom
        assert "on_recv_packet" in errors[0].getMessage() and str(bad_id) in errors[0].getMessage()

    with caplog.at_level(logging.INFO, logger="servercore"):
        run(main)


def test_cancellation_cancels_a_running_handler_then_delivers_on_disconnected(run: Run, serve: ServerFactory) -> None:
    events: list[str] = []

    class Waiting(PacketSession):
        async def on_recv_packet(self, packet_id: int, payload: bytes) -> None:
            events.append("handler started")
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                events.append("handler cancelled")
                raise

        async def on_disconnected(self, reason: DisconnectReason) -> None:
            await asyncio.sleep(0.01)
            events.append(f"on_disconnected {reason.name}")

    async def main() -> None:
        server = serve(Waiting)
        serving = asyncio.create_task(server.serve_forever())
        await until(lambda: server.running)
        peer = await Peer.connect(server.port)
        peer.send(numbered(0))
        await until(lambda: events == ["handler started"])
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving
        assert events == ["handler started", "handler cancelled", "on_disconnected SERVER_SHUTDOWN"]
        assert await peer.closed()
        await peer.close()

    run(main)


def test_while_a_handler_awaits_its_sessions_packets_wait_and_tcp_pushes_back(run: Run, serve: ServerFactory) -> None:
    """One session's handler blocks on an event: its peer can send only as much
    as the engine holds for it (max_pending_recv_bytes) plus the kernel's
    buffers; another session is served all along; once released, every
    packet is handled, in order."""
    handled: dict[int, list[int]] = {}

    class Blocking(PacketSession):
        released: asyncio.Event

        async def on_recv_packet(self, packet_id: int, payload: bytes) -> None:
            if packet_id == 2:
                await self.released.wait()
            handled.setdefault(self.id, []).append(SEQ.unpack(payload[:4])[0])
            if packet_id == 1:
                self.send(packet_id, payload)

    filler = bytes(1020)
    count = 4000  # ~4 MB offered; far more than the engine and the kernel hold

    def flood(port: int, result: dict[str, int]) -> None:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        sock.setblocking(False)
        data = b"".join(packet(2, SEQ.pack(n) + filler) for n in range(count))
        sent = 0
        deadline = time.monotonic() + 1.0
        while sent < len(data) and time.monotonic() < deadline:
            try:
                sent += sock.send(data[sent:])
            except BlockingIOError:
                time.sleep(0.01)
        result["sent_while_blocked"] = sent
        sock.setblocking(True)
        sock.sendall(data[sent:])
        result["sent"] = len(data)
        result["fd"] = sock.detach()

    async def main() -> None:
        Blocking.released = asyncio.Event()
        options = {"max_pending_recv_bytes": 64 * 1024}
        async with serve(Blocking, **options) as server:
            result: dict[str, int] = {}
            flooding = threading.Thread(target=flood, args=(server.port, result))
            flooding.start()
            other = await Peer.connect(server.port)
            # While the flood is held up, the other session is answered.
            for n in range(20):
                other.send(numbered(n))
                assert await other.recv_packet() == (1, SEQ.pack(n))
            await until(lambda: "sent_while_blocked" in result, message="the flooding peer never blocked")
            assert result["sent_while_blocked"] < count * 1028 / 2, result
            Blocking.released.set()
            await until(lambda: "sent" in result, timeout=10, message="the flood never got through")
            flooding.join()
            assert result["sent"] == count * 1028
            await until(lambda: any(len(v) == count for v in handled.values()), timeout=10,
                        message=f"handled {[len(v) for v in handled.values()]}")
            (flooded,) = [v for v in handled.values() if len(v) == count]
            assert flooded == list(range(count))
            socket.socket(fileno=result["fd"]).close()
            await other.close()

    run(main)


# --- a handler awaiting the outside world -----------------------------------------------


def test_a_handler_awaiting_a_slow_service_stalls_no_one_else(run: Run, serve: ServerFactory) -> None:
    """One session's handler asks a small local service (asyncio streams, as a
    database client would) that answers after 300 ms; meanwhile 200 other
    sessions get a broadcast every 20 ms with no gap over 100 ms."""

    class Player(PacketSession):
        answers: list[bytes] = []
        service_port = 0

        async def on_recv_packet(self, packet_id: int, payload: bytes) -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.service_port)
            writer.write(payload + b"\n")
            answer = await reader.readline()
            writer.close()
            await writer.wait_closed()
            self.answers.append(answer)
            self.send(packet_id, answer)

    async def slow_service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        question = await reader.readline()
        await asyncio.sleep(0.3)
        writer.write(b"answer to " + question)
        await writer.drain()
        writer.close()

    async def main() -> None:
        service = await asyncio.start_server(slow_service, "127.0.0.1", 0)
        Player.service_port = service.sockets[0].getsockname()[1]
        async with service, serve(Player) as server:
            watchers = await peers(server.port, 200)
            asker = await Peer.connect(server.port)
            await until(lambda: len(server) == 201)
            gaps: list[float] = []

            async def watch(peer: Peer) -> None:
                last = None
                for _ in range(30):
                    await peer.recv_packet()
                    now = time.monotonic()
                    if last is not None:
                        gaps.append(now - last)
                    last = now

            async def tick() -> None:
                for _ in range(40):
                    server.broadcast(5, b"tick")
                    await asyncio.sleep(0.02)

            asker.send(packet(3, b"question"))
            ticking = asyncio.create_task(tick())
            await asyncio.gather(*(watch(peer) for peer in watchers))
            ticking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticking
            assert await asker.recv_packet_with_id(3) == b"answer to question\n"
            assert Player.answers == [b"answer to question\n"]
            assert max(gaps) < 0.1, f"longest gap between broadcasts {max(gaps) * 1e3:.0f} ms"
            for peer in [*watchers, asker]:
                await peer.close()

    run(main)


def test_handlers_run_in_the_context_of_the_task_that_serves(run: Run, serve: ServerFactory) -> None:
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")
    seen: list[str] = []

    class Contextual(PacketSession):
        def on_connected(self) -> None:
            seen.append(request_id.get("unset"))

        async def on_recv_packet(self, packet_id: int, payload: bytes) -> None:
            await asyncio.sleep(0)
            seen.append(request_id.get("unset"))
            self.send(packet_id, payload)

    async def main() -> None:
        request_id.set("shard-7")
        async with serve(Contextual) as server:
            peer = await Peer.connect(server.port)
            peer.send(numbered(1))
            assert await peer.recv_packet() == (1, SEQ.pack(1))
            await peer.close()

    run(main)
    assert seen == ["shard-7", "shard-7"]


def test_under_poll_an_async_callback_is_a_callback_error_that_says_why(
    start_server: Callable[..., Server], raw_peers: Callable[..., RawPeer], caplog: pytest.LogCaptureFixture
) -> None:
    ended: list[DisconnectReason] = []

    class AsyncOnly(PacketSession):
        async def on_recv_packet(self, packet_id: int, payload: bytes) -> None:
            raise AssertionError("never runs: there is no loop")

        def on_disconnected(self, reason: DisconnectReason) -> None:
            ended.append(reason)

    server = start_server(AsyncOnly)
    (peer,) = connect(server, raw_peers)
    with caplog.at_level(logging.INFO, logger="servercore"):
        peer.send(numbered(0))
        poll_until(server, lambda: ended, message="the session was not closed")
    assert ended == [DisconnectReason.CALLBACK_ERROR]
    assert peer.wait_closed(2)
    (record,) = [r for r in caplog.records if r.exc_info]
    assert record.exc_info is not None and record.exc_info[0] is TypeError
    assert "async callbacks run only while an asyncio loop drives the service" in str(record.exc_info[1])
    # No "coroutine was never awaited" warning: the engine closed it.
    assert not [r for r in caplog.records if "never awaited" in r.getMessage()]


def test_mass_disconnect_during_broadcast_on_a_loop(run: Run, serve: ServerFactory) -> None:
    """The lecture's crash, on a loop: 300 clients vanish (half reset, half
    closed) while a task broadcasts every millisecond; every session ends once,
    and the server goes on serving."""
    ended: list[DisconnectReason] = []

    class Player(PacketSession):
        def on_recv_packet(self, packet_id: int, payload: bytes) -> None:
            self.send(packet_id, payload)

        def on_disconnected(self, reason: DisconnectReason) -> None:
            ended.append(reason)

    async def main() -> None:
        async with serve(Player) as server:
            clients = await peers(server.port, 300)
            await until(lambda: len(server) == 300)

            async def tick() -> None:
                while True:
                    server.broadcast(5, bytes(200))
                    await asyncio.sleep(0.001)

            ticking = asyncio.create_task(tick())
            await asyncio.sleep(0.05)
            for n, peer in enumerate(clients):
                if n % 2:
                    peer.writer.transport.abort()  # RST
                else:
                    peer.writer.close()
            await until(lambda: len(ended) == 300, message=f"{len(ended)} of 300 ended")
            assert set(ended) <= {DisconnectReason.CLOSED_BY_PEER, DisconnectReason.RESET}
            ticking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticking
            for peer in clients:
                await peer.close()
            survivor = await Peer.connect(server.port)
            survivor.send(numbered(1))
            assert await survivor.recv_packet_with_id(1) == SEQ.pack(1)
            await survivor.close()

    run(main)
    assert len(ended) == 301
