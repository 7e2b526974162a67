"""The native engine of servercore (Rust, tokio, PyO3). Import from `servercore`."""

from collections.abc import Awaitable, Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, Final, Protocol, TypedDict, TypeVar, final, overload, type_check_only

from typing_extensions import Buffer, Unpack, disjoint_base

from servercore._reason import DisconnectReason

_S = TypeVar("_S", bound="Service")

@type_check_only
class TypedPacket(Protocol):
    """A packet object that encodes itself (`servercore.packets.Packet`)."""

    def __servercore_packet__(self) -> tuple[int, Buffer]: ...

__all__ = [
    "DISCONNECT_REASONS",
    "HEADER_SIZE",
    "MAX_PACKET_SIZE",
    "Bus",
    "Client",
    "MalformedPacket",
    "PacketLayout",
    "PacketSession",
    "Room",
    "RouteTable",
    "SendBuffer",
    "Server",
    "Service",
    "Session",
    "Timer",
    "__version__",
    "_bus_stats",
]

__version__: Final[str]
"""The version of servercore (Cargo.toml's)."""

DISCONNECT_REASONS: Final[list[tuple[int, str]]]
"""The engine's disconnect reasons as (code, name); `DisconnectReason` mirrors them."""
MAX_PACKET_SIZE: Final[int]
"""The largest packet the `u16` size of a header can state: 65535 bytes."""
HEADER_SIZE: Final[int]
"""Bytes in a packet header: `[size: u16 LE][id: u16 LE]`."""

@disjoint_base
class Session:
    """A connection's raw byte stream (the lecture's `Session`).

    Subclass it and override `on_recv` to parse your own framing, and `send`
    bytes as they are (an echo server, a line protocol, a foreign binary
    protocol). Instances are created by a `Server` or `Client`, one per
    connection, by calling the class with no arguments.

    Callbacks are looked up on the object at every call, like any Python method
    call: an instance attribute (`self.on_recv = ...`) or a class patched later
    is honoured. Only `on_send` is decided once, when the service is made: it is
    delivered only if the class overrides it then.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Session: ...
    @property
    def id(self) -> int:
        """The session's number, unique within its server or client."""
    @property
    def peer(self) -> tuple[str, int]:
        """The peer's (host, port)."""
    @property
    def send_queue_bytes(self) -> int:
        """Bytes queued on this session and not yet taken by the kernel: how far
        the peer is behind. At `max_send_queue_bytes` the session is cut."""
    @property
    def connected(self) -> bool:
        """True until the session starts closing."""
    def send(self, data: Buffer | SendBuffer, payload: None = None, /) -> bool:
        """Queue bytes to go on the wire as they are (no header): any bytes-like
        object, or a `SendBuffer` (raw or framed). Never blocks and never calls
        back into Python.

        Returns False if the session is closing (or this send overflowed
        `max_send_queue_bytes`, which closes it with SEND_QUEUE_FULL). Raises
        ValueError for more bytes than `max_send_queue_bytes` could ever hold,
        TypeError for a packet id and payload (that is `PacketSession.send`).
        """
    def disconnect(self) -> bool:
        """Close after flushing what was queued before (bounded by `linger`).

        Idempotent: returns whether this call started the close.
        `on_disconnected` follows exactly once, after the socket is closed.
        """
    def on_connected(self) -> Awaitable[None] | None:
        """First callback of every session. It may be `async def` under an
        asyncio loop: the session then receives broadcasts, and its packets,
        once it has finished."""
    def on_recv(self, data: bytes) -> int:
        """Every unconsumed byte so far; return how many you consumed (0..len(data)).

        The rest is shown again, with the next bytes. The default consumes all.
        Bytes arrive as the socket gives them, up to 8 KiB per read, so `data`
        may be longer than `max_packet_size`; but more than `max_packet_size`
        left unconsumed disconnects the session with PACKET_TOO_LARGE.
        """
    def on_send(self, nbytes: int) -> Awaitable[None] | None:
        """A write handed `nbytes` to the kernel. Delivered only if the session
        class overrides it when the Server or Client is created; the sum of
        every `nbytes` is what the kernel took (`stats()["bytes_out"]`)."""
    def on_disconnected(self, reason: DisconnectReason) -> Awaitable[None] | None:
        """Last callback of every session, exactly once, after the socket closed
        and after every async callback of the session has finished. An async
        one is awaited when the service stops (never cancelled)."""

class PacketSession(Session):
    """A session that speaks `[size u16][id u16][payload]` packets.

    Headers are checked in Rust: a size below 4 or above `max_packet_size`, or
    an id outside `packet_ids`, disconnects the session before its bytes reach
    Python. `on_recv` is sealed: a subclass that defines it, or inherits one
    from a mixin, is rejected with TypeError when the class is defined.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> PacketSession: ...
    @overload  # type: ignore[override]
    def send(self, packet: SendBuffer | TypedPacket, payload: None = None, /) -> bool: ...
    @overload
    def send(self, packet: int, payload: Buffer, /) -> bool:
        """Queue a packet: `send(packet_id, payload)` or `send(send_buffer)`.
        Never blocks and never calls back into Python.

        Returns False if the session is closing (or this send overflowed
        `max_send_queue_bytes`, which closes it with SEND_QUEUE_FULL). Raises
        ValueError for a packet id outside 0..65535 or a payload that makes a
        packet over `max_packet_size`, TypeError for a payload that is not
        bytes-like or a `SendBuffer.raw`.
        """
    def on_recv_packet(self, packet_id: int, payload: bytes) -> Awaitable[None] | None:
        """One whole packet, in arrival order; payload excludes the header.

        It may be `async def` under an asyncio loop (`serve_forever()`, `async
        with`): the session's next packet is handled after this one's handler
        has finished; meanwhile its packets wait in the engine (up to
        `max_pending_recv_bytes`, then TCP slows that peer), and other sessions
        go on."""

@final
class SendBuffer:
    """Bytes encoded once into pooled memory; send them to any number of
    sessions without copying. `SendBuffer(packet_id, payload)` is one packet;
    `SendBuffer.raw(data)` is raw bytes for raw `Session`s."""

    def __new__(cls, packet_id: int, payload: Buffer) -> SendBuffer: ...
    @classmethod
    def raw(cls, data: Buffer) -> SendBuffer:
        """Raw bytes, no header: what a raw `Session` puts on the wire as it is."""
    @property
    def packet_id(self) -> int | None:
        """The packet's id; None for raw bytes."""
    @property
    def size(self) -> int:
        """Bytes on the wire, a packet's header included."""
    @property
    def payload(self) -> bytes:
        """The packet's payload, or all of the raw bytes."""
    def __len__(self) -> int: ...
    def __bytes__(self) -> bytes:
        """The bytes as they go on the wire."""

@disjoint_base
class Service:
    """What `Server` and `Client` share (the lecture's `Service`)."""

    def poll(self, timeout: float | None = None) -> int:
        """Run the callbacks of what has happened, on this thread.

        Waits up to `timeout` seconds (0 to one year; None: until something
        happens), with the GIL released, noticing Ctrl-C within 100 ms.
        Returns the number of events handled. Callbacks must not call poll()
        themselves, and only one thread may poll a service.
        """
    def run_forever(self, *, on_stopping: Callable[[], object] | None = None) -> None:
        """Poll until `stop()`, then deliver every `on_disconnected` and return.
        On the main thread, SIGTERM or SIGINT drains: no new sessions,
        `on_stopping()`, every session flushes within `shutdown_grace`, then
        returns; a second signal cuts the flushing short."""
    def stop(self) -> None:
        """Close every session (flushing, bounded by `linger`) and end the I/O
        threads; idempotent. The `on_disconnected` calls run on the polling
        thread: here, if this is that thread (or none ever polled); else in the
        poll running there, which this waits for; else at that thread's next
        poll(). `running` is True until they have all run."""
    @overload
    def broadcast(
        self, packet: SendBuffer | TypedPacket, payload: None = None, /, *, exclude: Session | None = None
    ) -> int: ...
    @overload
    def broadcast(self, packet: int, payload: Buffer, /, *, exclude: Session | None = None) -> int: ...
    @overload
    def broadcast(self, packet: Buffer, payload: None = None, /, *, exclude: Session | None = None) -> int:
        """Queue one packet on every session whose `on_connected` has run
        (encoded once, shared): `broadcast(packet_id, payload)` or
        `broadcast(send_buffer)`; on a service of raw `Session`s,
        `broadcast(data)`. Returns how many sessions it was queued on."""
    @property
    def sessions(self) -> list[Any]:
        """The connected session objects, oldest first (a snapshot)."""
    @property
    def running(self) -> bool:
        """True from start() until stop() has finished and the last
        `on_disconnected` has run."""
    def __len__(self) -> int:
        """Sessions that got `on_connected` and not yet `on_disconnected`."""
    def stats(self) -> dict[str, Any]:
        """Counters and gauges: sessions, accepted, connected, connect_failed,
        rejected, packets_in/out, bytes_in/out, send_queue_bytes,
        pending_recv_bytes, pending_events, packets_discarded,
        unsent_bytes_dropped, disconnects
        (by reason name), pool_chunk_size, pool_chunks, pool_chunks_in_use,
        pool_buffers_encoded, pool_bytes_encoded (the README's table says
        what each means)."""
    def __enter__(self: _S) -> _S: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool: ...
    def call_later(self, delay: float, callback: Callable[..., object], /, *args: Any) -> Timer:
        """Call `callback(*args)` once, `delay` seconds from now, on the polling
        thread (in `poll()`, or on the loop that drives the service)."""
    def call_every(self, interval: float, callback: Callable[..., object], /, *args: Any) -> Timer:
        """Call `callback(*args)` every `interval` seconds at a fixed rate (no
        drift; ticks missed while late are counted in `late_ticks`, not run)."""
    def post(self, callback: Callable[..., object], /, *args: Any) -> None:
        """Call `callback(*args)` on the polling thread at its next delivery, in
        order; callable from any thread, and wakes a waiting `poll()`."""
    async def serve_forever(self) -> None:
        """Serve on the running asyncio loop until `stop()` (starting first if
        needed). Callbacks run on the loop's thread, woken through a file
        descriptor, and may be `async def`. Cancelling it stops the service:
        running async callbacks are cancelled (on_disconnected ones awaited),
        every `on_disconnected` is delivered, then the cancellation goes on.
        A service is driven by an asyncio loop or by `poll()`, not both."""
    async def __aenter__(self: _S) -> _S:
        """Start (if needed) and drive the service on the running loop."""
    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        """Stop, as cancelling `serve_forever()` does, without blocking the loop."""

@final
class Room:
    """A group of one service's sessions to broadcast to (a room, a zone, a
    party), kept in the engine. A session may be in many rooms, and leaves
    every one by itself when it ends, before its `on_disconnected`."""

    def __init__(self) -> None: ...
    def add(self, session: Session) -> bool:
        """Whether `session` is a new member (False: it was one, or has ended).
        ValueError if the room holds another service's sessions."""
    def remove(self, session: Session) -> bool:
        """Whether it was a member."""
    def clear(self) -> None: ...
    @overload
    def broadcast(
        self, packet: SendBuffer | TypedPacket, payload: None = None, /, *, exclude: Session | None = None
    ) -> int: ...
    @overload
    def broadcast(self, packet: int, payload: Buffer, /, *, exclude: Session | None = None) -> int: ...
    @overload
    def broadcast(self, packet: Buffer, payload: None = None, /, *, exclude: Session | None = None) -> int:
        """Queue one packet on every member (encoded once, shared), as
        `Service.broadcast`; returns how many sessions it was queued on."""
    def __contains__(self, session: object, /) -> bool: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[Any]:
        """The members' session objects, in the order they connected (a snapshot)."""

class MalformedPacket(ValueError):
    """A payload does not match its packet's layout (`servercore.packets`)."""

_FieldSpec = tuple[str, str, str, int, int, "PacketLayout | None"]

@final
class PacketLayout:
    """A packet or struct class's wire layout, compiled once by
    `servercore.packets`: each field `(name, kind, code, count, limit,
    nested)`, kind one of scalar, fixed, str, bytes, struct, list:scalar,
    list:str, list:bytes, list:struct."""

    def __new__(cls, packet_class: type, fields: list[_FieldSpec], packet_id: int | None = None) -> PacketLayout: ...
    def encode(self, packet: Any) -> bytes:
        """The payload of `packet` (an instance of the class); TypeError or
        ValueError naming the field if a value is not of its wire type or
        does not fit."""
    def decode(self, payload: Buffer) -> Any:
        """The instance of the class in the whole of `payload`;
        MalformedPacket naming the field if it does not match."""

@disjoint_base
class RouteTable:
    """Packet ids to decoders and handlers: the engine half of
    `servercore.packets.Router`, which adds `on()`."""

    def __new__(cls, *_args: Any, **_kwargs: Any) -> RouteTable: ...
    def __init__(self, name: str = ...) -> None:
        """`name` (default "router") is the one in its messages; a subclass's
        `__init__` calls `super().__init__(name)`."""
    @property
    def name(self) -> str: ...
    @name.setter
    def name(self, name: str) -> None: ...
    @property
    def packet_ids(self) -> frozenset[int]:
        """The ids this router handles: the server's `packet_ids`."""
    def _check_free(self, packet_id: int, label: str) -> None: ...
    def _add(self, packet_id: int, decoder: PacketLayout | Callable[[bytes], Any], handler: Callable[..., Any], label: str) -> None: ...
    def dispatch(self, session: PacketSession, packet_id: int, payload: bytes) -> Awaitable[None] | None:
        """Decodes and hands one packet to its handler, returning what it
        returned; a payload that does not match (or an id without a handler)
        closes the session MALFORMED_PACKET instead."""

@final
class Bus:
    """A server's link to the other workers and machines of its cluster, over
    Redis Pub/Sub. A packet is published once, as framed bytes, and each
    server fans it out to its own sessions in the engine. Delivery is at most
    once. Publishing never waits for Redis: while Redis is unreachable it
    returns False at once (counted in `stats()`), and the bus reconnects by
    itself (0.1 s doubling to 5 s) and subscribes again to its rooms."""

    def __new__(
        cls,
        server: Server,
        url: str,
        *,
        prefix: str = "servercore",
        node: str | None = None,
        directory_ttl: float | None = None,
        max_queued_publishes: int | None = None,
    ) -> Bus:
        """Attaches to a started `server`. `url` is redis://host:port/db;
        `node` names this server in the cluster (host and pid by default);
        directory entries live `directory_ttl` seconds (30) past their last
        heartbeat."""
    @property
    def node(self) -> str: ...
    @property
    def connected(self) -> bool:
        """Whether Redis is reachable now (publishing and subscribed)."""
    @overload
    def broadcast(self, packet: SendBuffer | TypedPacket, payload: None = None, /) -> bool: ...
    @overload
    def broadcast(self, packet: int, payload: Buffer, /) -> bool:
        """Publish to every session of every server; whether it was published."""
    @overload
    def publish(self, name: str, packet: SendBuffer | TypedPacket, payload: None = None, /) -> bool: ...
    @overload
    def publish(self, name: str, packet: int, payload: Buffer, /) -> bool:
        """Publish to the members of the room `name` on every server."""
    def room(self, name: str) -> Room:
        """The room `name` here (the same object each time): what any server
        publishes to `name` reaches its members."""
    def close_room(self, name: str) -> bool:
        """Stop receiving what is published to `name` here (a match that
        ended); whether there was such a room."""
    def address(self, session: Session) -> str:
        """`session`'s address in the cluster ("node/id")."""
    @overload
    def send_to(self, address: str, packet: SendBuffer | TypedPacket, payload: None = None, /) -> bool: ...
    @overload
    def send_to(self, address: str, packet: int, payload: Buffer, /) -> bool:
        """Publish to one session anywhere, by its address."""
    def register(self, name: str, session: Session) -> bool:
        """Directory: `name` -> `session`'s address, alive while the session lives."""
    def lookup(self, name: str, timeout: float | None = None) -> str | None:
        """The address registered for `name`, or None; ConnectionError if
        Redis does not answer within `timeout` (1 s)."""
    def stats(self) -> dict[str, int | bool | str]:
        """published, publish_failed, received, delivered, malformed,
        reconnects, connected, node."""
    def close(self) -> None:
        """Stops the bus (it also stops with its server)."""

def _bus_stats() -> list[dict[str, int | bool | str]]:
    """`stats()` of every open Bus of this process (servercore.metrics)."""

@final
class Timer:
    """A scheduled call, from `call_later` or `call_every`."""

    def cancel(self) -> None:
        """It does not run again. Idempotent; callable from any thread."""
    @property
    def cancelled(self) -> bool: ...
    @property
    def late_ticks(self) -> int:
        """Ticks of a repeating timer skipped because an earlier one was late."""
    @property
    def interval(self) -> float | None:
        """Seconds between ticks; None for a one-shot timer."""

@type_check_only
class SessionOptions(TypedDict, total=False):
    """Keyword options of `Server(...)` and `Client(...)`; see the README for defaults."""

    io_threads: int | None
    max_packet_size: int
    max_send_queue_bytes: int
    max_pending_recv_bytes: int
    packet_timeout: float | None
    first_packet_timeout: float | None
    idle_timeout: float | None
    max_packets_per_second: int | None
    packet_ids: Iterable[int] | None
    keepalive: bool
    nodelay: bool
    inline_io: bool
    linger: float
    shutdown_grace: float

@type_check_only
class ServerOptions(SessionOptions, total=False):
    max_sessions: int
    max_sessions_per_address: int | None
    max_accepts_per_second: int | None
    trusted_addresses: Iterable[str]
    trusted_proxies: Iterable[str]
    backlog: int
    reuse_port: bool

@type_check_only
class ClientOptions(SessionOptions, total=False):
    connect_timeout: float

@final
class Server(Service):
    """Accepts connections and makes one session object per connection."""

    def __new__(
        cls, session_class: type[Session], host: str = "127.0.0.1", port: int = 0, **options: Unpack[ServerOptions]
    ) -> Server: ...
    def start(self) -> None:
        """Bind and start the I/O threads. Raises OSError if the address is in use."""
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int:
        """The port listened on; the real one once started, also with port=0."""

@final
class Client(Service):
    """Opens `count` sessions to one server (the lecture's DummyClient)."""

    def __new__(
        cls,
        session_class: type[Session],
        host: str = "127.0.0.1",
        port: int | None = None,
        count: int = 1,
        **options: Unpack[ClientOptions],
    ) -> Client: ...
    def start(self) -> None:
        """Connect every session; returns when each attempt has finished.
        Raises ConnectionError (an OSError) if none connected."""
    @property
    def count(self) -> int: ...
