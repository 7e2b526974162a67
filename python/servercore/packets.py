"""Typed packets and handler routing: a packet is declared once, as a class.

    from servercore.packets import Packet, Router, RoutedSession, Max, f32, u32

    class Chat(Packet, id=1):
        text: Annotated[str, Max(200)]

    class Move(Packet, id=2):
        x: f32
        y: f32
        seq: u32

    lobby = Router()

    @lobby.on(Chat)
    def on_chat(session: RoutedSession, packet: Chat) -> None:
        server.broadcast(Chat(text=packet.text))

    class Player(RoutedSession):
        router = lobby

    server = Server(Player, port=7777, packet_ids=lobby.packet_ids)

The wire layout follows the field order, little-endian throughout:

| annotation | on the wire |
|---|---|
| `u8` `u16` `u32` `u64` `i8` `i16` `i32` `i64` | fixed-width integers |
| `f32` `f64` | IEEE floats |
| `bool` | one byte, 0 or 1 |
| `str` | u16 byte count, then UTF-8 |
| `bytes` | u16 byte count, then the bytes |
| `list[T]` | u16 element count, then the elements |
| `Annotated[list[T], Fixed(n)]` | exactly n elements, no count (T fixed-width) |
| a `Struct` subclass | its fields, in place |

`Annotated[str | bytes | list[T], Max(n)]` limits a length or count; it is
checked before anything is allocated, when encoding and when decoding.
Without `Max`, the u16 prefix bounds it (65535), and so does the packet
size.

Each class's layout is compiled once, when the class is made, into the
engine (`PacketLayout`), which encodes and decodes. The class's fields are
`__slots__`, so a packet object is a plain value: it has no instance dict
(no other attributes), no weak references, pickles with protocol 2 or
later, and its class cannot also mix in a class with another metaclass
(`abc.ABC`, `typing.Protocol`). A field takes no value in the class body:
every field is given when a packet is made. A value that is not
of its wire type or does not fit is a TypeError or ValueError naming the
field. A payload that does not match its layout raises `MalformedPacket`
naming the packet and the field. When a `Router` dispatches, this closes the
session with `DisconnectReason.MALFORMED_PACKET`, with one log line naming
the peer and the packet, and the handler never runs.

`session.send(packet)`, `server.broadcast(packet)` and
`room.broadcast(packet)` accept packet objects: the engine encodes them by
their layout, or, for a class that writes its own `encode` or
`__servercore_packet__()`, asks for `(id, payload)`.
"""

from __future__ import annotations

import sys
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, TypeVar

from servercore._core import MalformedPacket, PacketLayout, PacketSession, RouteTable

if sys.version_info >= (3, 11):
    from typing import dataclass_transform
else:  # type checkers read the 3.11 branch; at run time the marker does nothing

    def dataclass_transform(**_: Any) -> Callable[[type], type]:
        return lambda cls: cls

__all__ = [
    "Fixed",
    "MalformedPacket",
    "Max",
    "Packet",
    "RoutedSession",
    "Router",
    "Struct",
    "f32",
    "f64",
    "i8",
    "i16",
    "i32",
    "i64",
    "u8",
    "u16",
    "u32",
    "u64",
]


@dataclass(frozen=True)
class Scalar:
    """A fixed-width number on the wire (`struct` code)."""

    code: str
    low: float
    high: float


@dataclass(frozen=True)
class Max:
    """The longest a `str`/`bytes` (in bytes) or a `list` (in elements) may be."""

    limit: int


@dataclass(frozen=True)
class Fixed:
    """A list of exactly this many fixed-width elements, sent without a count."""

    count: int


u8 = Annotated[int, Scalar("B", 0, 2**8 - 1)]
u16 = Annotated[int, Scalar("H", 0, 2**16 - 1)]
u32 = Annotated[int, Scalar("I", 0, 2**32 - 1)]
u64 = Annotated[int, Scalar("Q", 0, 2**64 - 1)]
i8 = Annotated[int, Scalar("b", -(2**7), 2**7 - 1)]
i16 = Annotated[int, Scalar("h", -(2**15), 2**15 - 1)]
i32 = Annotated[int, Scalar("i", -(2**31), 2**31 - 1)]
i64 = Annotated[int, Scalar("q", -(2**63), 2**63 - 1)]
f32 = Annotated[float, Scalar("f", float("-inf"), float("inf"))]
f64 = Annotated[float, Scalar("d", float("-inf"), float("inf"))]
BOOL = Scalar("?", 0, 1)
U16_MAX = 2**16 - 1


# --- layouts ------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    name: str
    kind: str  # "scalar", "fixed", "str", "bytes", "list", "struct"
    scalar: Scalar | None = None  # scalar, fixed, and list of scalars
    count: int = 0  # fixed
    limit: int = U16_MAX  # str, bytes, list
    element: Field | None = None  # list
    struct_type: type[Struct] | None = None  # struct, and list of structs


def _field(owner: type, name: str, annotation: Any) -> Field:
    where = f"{owner.__name__}.{name}"
    if name.startswith("_sc_"):
        raise TypeError(f"{where}: names starting with _sc_ are servercore's own (the generated code's)")
    limit, fixed, scalar = U16_MAX, None, None
    if typing.get_origin(annotation) is Annotated:
        base, *extras = typing.get_args(annotation)
        for extra in extras:
            if isinstance(extra, Scalar):
                scalar = extra
            elif isinstance(extra, Max):
                if not 0 <= extra.limit <= U16_MAX:
                    raise TypeError(f"{where}: Max({extra.limit}) is out of 0..{U16_MAX}")
                limit = extra.limit
            elif isinstance(extra, Fixed):
                fixed = extra.count
        annotation = base
    if scalar is not None:
        return Field(name, "scalar", scalar=scalar)
    if annotation is bool:
        return Field(name, "scalar", scalar=BOOL)
    if annotation is str:
        return Field(name, "str", limit=limit)
    if annotation is bytes:
        return Field(name, "bytes", limit=limit)
    if isinstance(annotation, type) and issubclass(annotation, Struct) and not issubclass(annotation, Packet):
        return Field(name, "struct", struct_type=annotation)
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        element = _field(owner, f"{name}[]", item)
        if fixed is not None:
            if element.kind != "scalar":
                raise TypeError(f"{where}: a Fixed({fixed}) array holds fixed-width numbers, not {item!r}")
            return Field(name, "fixed", scalar=element.scalar, count=fixed)
        if element.kind in ("fixed", "list"):
            raise TypeError(f"{where}: lists of lists are not a wire type; wrap the inner list in a Struct")
        return Field(name, "list", limit=limit, element=element,
                     scalar=element.scalar if element.kind == "scalar" else None)
    raise TypeError(
        f"{where}: {annotation!r} is not a wire type; use u8..u64, i8..i64, f32, f64, bool, str, "
        "bytes, list[...], Annotated[list[...], Fixed(n)] or a Struct subclass"
    )


def _layout_spec(f: Field) -> tuple[str, str, str, int, int, PacketLayout | None]:
    """A field as the engine's layout takes it."""
    code = f.scalar.code if f.scalar else ""
    if f.kind == "list":
        element = f.element
        assert element is not None
        nested = element.struct_type._packet_layout if element.struct_type else None
        return (f.name, f"list:{element.kind}", code, 0, f.limit, nested)
    nested = f.struct_type._packet_layout if f.struct_type else None
    return (f.name, f.kind, code, f.count, f.limit, nested)


def _compile(cls: type[Struct], fields: list[Field]) -> None:
    """Compiles the class's layout in the engine (`PacketLayout`: encoding,
    and decoding a payload where it lies), and generates the keyword
    `__init__`, unless the class (or a mixin) wrote its own of either."""
    packet_id = cls.__dict__.get("packet_id")
    layout = PacketLayout(cls, [_layout_spec(f) for f in fields], packet_id)
    cls._packet_layout = layout
    if cls.__module__ == __name__:
        return  # Struct and Packet themselves: their methods stay the generic ones
    if not _user_defined(cls, "__init__"):
        cls.__init__ = _compile_init(cls, [f.name for f in fields])  # type: ignore[method-assign]
    own_encoding = _user_defined(cls, "encode") or _user_defined(cls, "__servercore_packet__")
    # The engine encodes a sent packet by this layout only if it is the
    # class's own encoding; set on every class, so no subclass inherits it.
    cls.__servercore_layout__ = None if own_encoding or packet_id is None else layout
    if packet_id is None or own_encoding:
        return
    encode_payload = layout.encode

    def encode(self: Any) -> bytes:
        return encode_payload(self)

    def packet(self: Any) -> tuple[int, bytes]:
        return packet_id, encode_payload(self)

    encode.__servercore_generated__ = packet.__servercore_generated__ = True  # type: ignore[attr-defined]
    cls.encode = encode  # type: ignore[attr-defined]
    cls.__servercore_packet__ = packet  # type: ignore[attr-defined]


def _user_defined(cls: type, name: str) -> bool:
    """Whether `name` resolves, for `cls`, to something the application wrote
    (in the class body, a parent or a mixin), which generated code must not
    replace."""
    for klass in cls.__mro__:
        if name in klass.__dict__:
            found = klass.__dict__[name]
            generated = getattr(found, "__servercore_generated__", False)
            return not generated and klass not in _BASES
    return False


# Struct and Packet's own methods are the generic ones, not the application's
# (filled in once they exist; Packet is made while this module loads).
_BASES: set[type] = {object}


_MISSING: Any = object()


def _compile_init(cls: type, names: list[str]) -> Callable[..., None]:
    """`__init__(self, *, a, b)` for the fields, as a dataclass would have:
    a keyword call and one assignment each (the generic `**values` loop cost
    5x as much, and a packet is made for every send). A missing or unknown
    field is a TypeError naming it."""
    # The generated names start with _sc_, so no field name can shadow them
    # (a field may be called `self`, `cls` or `extra`).
    params = "".join(f"{name}=_sc_missing, " for name in names)
    lines = [f"def __init__(_sc_self, {'*, ' if names else ''}{params}**_sc_extra):"]
    lines.append(f"    if _sc_extra{''.join(f' or {name} is _sc_missing' for name in names)}:")
    lines.append(f"        _sc_wrong(_sc_cls, {{{', '.join(f'{name!r}: {name}' for name in names)}}}, _sc_extra)")
    lines += [f"    _sc_self.{name} = {name}" for name in names]
    scope: dict[str, Any] = {"_sc_missing": _MISSING, "_sc_wrong": _wrong_fields, "_sc_cls": cls}
    exec(compile("\n".join(lines) + "\n", f"<{cls.__name__} __init__>", "exec"), scope)  # noqa: S102
    init = scope["__init__"]
    init.__servercore_generated__ = True
    return init  # type: ignore[no-any-return]


def _wrong_fields(cls: type, given: dict[str, Any], extra: dict[str, Any]) -> None:
    what = []
    missing = [name for name, value in given.items() if value is _MISSING]
    if missing:
        what.append("missing " + ", ".join(missing))
    if extra:
        what.append("no field " + ", ".join(extra))
    raise TypeError(f"{cls.__name__}(): {'; '.join(what)}")


# --- the classes --------------------------------------------------------------------


def _is_class_var(annotation: Any, namespace: dict[str, Any]) -> bool:
    if isinstance(annotation, str):  # `from __future__ import annotations`
        module = sys.modules.get(namespace.get("__module__", ""))
        try:
            annotation = eval(annotation, vars(module) if module else {}, dict(namespace))  # noqa: S307
        except Exception:  # a forward reference: typing resolves it later; read the text
            return bool(annotation.split("[", 1)[0].strip().rpartition(".")[2] == "ClassVar")
    return annotation is ClassVar or typing.get_origin(annotation) is ClassVar


class _Slotted(type):
    """Makes each Struct and Packet class with `__slots__` for its own fields
    (unless the class body sets `__slots__` itself): an instance has no
    dict to build, and the engine stores each field straight into its slot.
    A ClassVar is a class attribute, not a field; a field may not have a
    value in the class body (there are no defaults: every field is given)."""

    def __new__(mcls, name: str, bases: tuple[type, ...], namespace: dict[str, Any], **kwargs: Any) -> _Slotted:
        annotations = namespace.get("__annotations__", {})
        fields = [field for field, annotation in annotations.items() if not _is_class_var(annotation, namespace)]
        for field in fields:
            if field in namespace:
                raise TypeError(
                    f"{name}.{field}: a field takes no value in the class body (every field is given "
                    "when a packet is made); annotate a class constant with ClassVar"
                )
        if "__slots__" not in namespace:
            inherited = {field for base in bases for field in getattr(base, "__fields__", ())}
            namespace["__slots__"] = tuple(field for field in fields if field not in inherited)
        return super().__new__(mcls, name, bases, namespace, **kwargs)


@dataclass_transform(kw_only_default=True)
class Struct(metaclass=_Slotted):
    """Fields sent in place inside a packet (a position, an item); declare
    them as class annotations, as for a `Packet`."""

    __fields__: ClassVar[tuple[str, ...]] = ()
    __layout__: ClassVar[tuple[Field, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        hints = typing.get_type_hints(cls, include_extras=True)
        own = [
            name for name in cls.__dict__.get("__annotations__", {})
            if typing.get_origin(hints[name]) is not ClassVar and hints[name] is not ClassVar
        ]
        inherited = list(getattr(cls, "__fields__", ()))
        names = inherited + [name for name in own if name not in inherited]
        layout = tuple(_field(cls, name, hints[name]) for name in names)
        cls.__fields__ = tuple(names)
        cls.__layout__ = layout
        _compile(cls, list(layout))

    def __init__(self, **values: Any) -> None:
        # Each class gets a faster one of its own (_compile_init) unless it
        # defines __init__ itself; this one serves `super().__init__(...)`
        # from such a class.
        missing = [name for name in self.__fields__ if name not in values]
        extra = [name for name in values if name not in self.__fields__]
        if missing or extra:
            _wrong_fields(type(self), {name: _MISSING for name in missing}, dict.fromkeys(extra))
        for name, value in values.items():
            setattr(self, name, value)

    _packet_layout: ClassVar[PacketLayout]  # compiled per class
    __servercore_layout__: ClassVar[PacketLayout | None]  # how the engine encodes a sent packet

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self.__fields__)

    def __repr__(self) -> str:
        values = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__fields__)
        return f"{type(self).__name__}({values})"


P = TypeVar("P", bound="Packet")


_BASES.add(Struct)


class Packet(Struct):
    """A packet type: `class Chat(Packet, id=1): text: str`. Send it with
    `session.send(Chat(text="hi"))`; a `Router` hands it to handlers decoded."""

    packet_id: ClassVar[int]

    def __init_subclass__(cls, id: int | None = None, **kwargs: Any) -> None:
        if id is None:
            raise TypeError(f"class {cls.__name__}(Packet, id=N): a packet needs its id (0..65535)")
        if not isinstance(id, int) or not 0 <= id <= U16_MAX:
            raise TypeError(f"{cls.__name__}: packet id must be an int in 0..65535, got {id!r}")
        cls.packet_id = id
        super().__init_subclass__(**kwargs)

    def encode(self) -> bytes:
        """The payload (without the 4-byte header): TypeError or ValueError
        naming the field if a value is not of its wire type or does not fit."""
        return type(self)._packet_layout.encode(self)

    def __servercore_packet__(self) -> tuple[int, bytes]:
        return self.packet_id, self.encode()

    @classmethod
    def decode(cls: type[P], payload: bytes) -> P:
        """The packet in `payload`; MalformedPacket if it does not match the layout."""
        return cls._packet_layout.decode(payload)  # type: ignore[no-any-return]


_BASES.add(Packet)


# --- routing ------------------------------------------------------------------------

Handler = Callable[[Any, Any], "Awaitable[None] | None"]


class Router(RouteTable):
    """Packet types and their handlers: `@router.on(Chat) def on_chat(session, packet)`.

    `Router(name="router")`; the name is in its messages. A session class
    that routes is a `RoutedSession` with `router = ...`; a session switches
    routers (lobby -> game) with `self.router = game`, from the next packet
    on. Give the server `packet_ids=router.packet_ids` (the union, for
    several routers), so the engine cuts unknown ids before Python sees
    them. The table and the dispatch are the engine's (`RouteTable`)."""

    def on(self, packet_type: type[Packet], *, id: int | None = None) -> Callable[[Handler], Handler]:
        """Registers the decorated function for `packet_type`. A protobuf
        message class needs `id=`; its payload is the serialized message."""
        packet_id, decode, label = _decoder(packet_type, id)
        self._check_free(packet_id, label)

        def register(handler: Handler) -> Handler:
            if not callable(handler):
                raise TypeError(f"{self.name}: a handler must be callable, got {type(handler).__name__}")
            self._add(packet_id, decode, handler, label)
            return handler

        return register


def _decoder(packet_type: Any, packet_id: int | None) -> tuple[int, PacketLayout | Callable[[bytes], Any], str]:
    label = getattr(packet_type, "__name__", repr(packet_type))
    if isinstance(packet_type, type) and issubclass(packet_type, Packet):
        if packet_id is not None and packet_id != packet_type.packet_id:
            raise ValueError(f"{label} has id {packet_type.packet_id}; id={packet_id} contradicts it")
        return packet_type.packet_id, packet_type._packet_layout, label
    if hasattr(packet_type, "FromString") and hasattr(packet_type, "DESCRIPTOR"):  # a protobuf message
        if packet_id is None or not 0 <= packet_id <= U16_MAX:
            raise TypeError(f"{label} is a protobuf message: register it with id=N (0..65535)")
        from_string = packet_type.FromString

        def decode_protobuf(payload: bytes) -> Any:
            try:
                return from_string(payload)
            except Exception as error:  # protobuf's DecodeError, without importing protobuf here
                raise MalformedPacket(f"{label}: {error}") from None

        return packet_id, decode_protobuf, label
    raise TypeError(f"router.on() takes a Packet subclass or a protobuf message class, not {packet_type!r}")


class RoutedSession(PacketSession):
    """A PacketSession whose packets go through `router` (set it on the class,
    or on a session to switch it)."""

    router: Router

    def on_recv_packet(self, packet_id: int, payload: bytes) -> Awaitable[None] | None:
        # The engine does this itself, without calling here, for a class that
        # keeps this method (marked below); an override may call it.
        return self.router.dispatch(self, packet_id, payload)

    on_recv_packet.__servercore_routes__ = True  # type: ignore[attr-defined]


def protobuf_packet(packet_id: int, message: Any) -> tuple[int, bytes]:
    """`session.send(*protobuf_packet(5, message))`: a protobuf message as a packet."""
    return packet_id, message.SerializeToString()

