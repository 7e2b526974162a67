"""`servercore gen`: one packet definition, every side (the lecture's PacketGenerator).

    servercore gen protocol.toml -o generated/
    servercore gen mygame/packets.py -o generated/

reads the packets and structs of a TOML file, or the `Packet`/`Struct`
classes of a Python module, and writes into the output directory:

- `<name>.py`: the packet classes for servercore (`servercore.packets`);
- `<name>.pyi`: their stub, with keyword-only constructors for type checkers;
- `<Name>.cs`: the same layouts and ids for C# clients (Unity, .NET): a class
  per struct and packet with `Write(BinaryWriter)` and `Read(BinaryReader)`,
  `Wire.Encode(packet)` for a whole framed packet, and a `PacketHandler`
  whose `On<Name>(handler)` and `Dispatch(id, payload)` route what arrives.

The TOML form, fields in wire order:

    [struct.Vec2]
    x = "f32"
    y = "f32"

    [packet.Chat]
    id = 1
    text = "str max 200"

    [packet.Move]
    id = 2
    to = "Vec2"
    path = "list[Vec2] max 32"
    color = "u8[3]"

Types: u8 u16 u32 u64 i8 i16 i32 i64 f32 f64 bool str bytes, `list[T]`,
`T[n]` (n fixed-width numbers, no count), a struct's name; `max N` limits a
str/bytes length or a list's count. Ids are the file's own, so they never
change when the file is generated again.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCALARS = {
    # name: (python annotation, C# type, BinaryReader method)
    "u8": ("u8", "byte", "ReadByte"),
    "u16": ("u16", "ushort", "ReadUInt16"),
    "u32": ("u32", "uint", "ReadUInt32"),
    "u64": ("u64", "ulong", "ReadUInt64"),
    "i8": ("i8", "sbyte", "ReadSByte"),
    "i16": ("i16", "short", "ReadInt16"),
    "i32": ("i32", "int", "ReadInt32"),
    "i64": ("i64", "long", "ReadInt64"),
    "f32": ("f32", "float", "ReadSingle"),
    "f64": ("f64", "double", "ReadDouble"),
    "bool": ("bool", "bool", "ReadBoolean"),
}
SCALAR_CODES = {"B": "u8", "H": "u16", "I": "u32", "Q": "u64", "b": "i8", "h": "i16", "i": "i32", "q": "i64",
                "f": "f32", "d": "f64", "?": "bool"}
U16_MAX = 65535


class DefinitionError(ValueError):
    """A definition file says something that is not a packet layout."""


@dataclass
class Type:
    kind: str  # scalar, str, bytes, list, fixed, struct
    name: str = ""  # scalar name, or struct name
    limit: int = U16_MAX
    count: int = 0
    element: Type | None = None


@dataclass
class Definition:
    name: str
    packet_id: int | None  # None: a struct
    fields: list[tuple[str, Type]] = field(default_factory=list)


# --- reading ------------------------------------------------------------------------

TYPE_PATTERN = re.compile(r"^\s*(?P<base>[A-Za-z_][A-Za-z0-9_]*(?:\[.*\])?)\s*(?:max\s+(?P<max>\d+))?\s*$")


def parse_type(text: str, where: str, structs: set[str]) -> Type:
    match = TYPE_PATTERN.match(text)
    if not match:
        raise DefinitionError(f"{where}: {text!r} is not a type (e.g. \"u32\", \"str max 32\", \"list[Vec2]\", \"u8[4]\")")
    base, limit = match["base"], match["max"]
    limit_value = int(limit) if limit is not None else U16_MAX
    if limit_value > U16_MAX:
        raise DefinitionError(f"{where}: max {limit_value} is over {U16_MAX}")
    list_match = re.fullmatch(r"list\[(.+)\]", base)
    fixed_match = re.fullmatch(r"([a-z0-9]+)\[(\d+)\]", base)
    if list_match:
        element = parse_type(list_match[1], where, structs)
        if element.kind in ("list", "fixed"):
            raise DefinitionError(f"{where}: lists of lists are not a wire type; wrap the inner one in a struct")
        return Type("list", limit=limit_value, element=element)
    if limit is not None and base not in ("str", "bytes"):
        raise DefinitionError(f"{where}: max applies to str, bytes and list, not {base}")
    if fixed_match:
        if fixed_match[1] not in SCALARS:
            raise DefinitionError(f"{where}: a fixed array holds numbers, not {fixed_match[1]}")
        return Type("fixed", name=fixed_match[1], count=int(fixed_match[2]))
    if base in SCALARS:
        return Type("scalar", name=base)
    if base in ("str", "bytes"):
        return Type(base, limit=limit_value)
    if base in structs:
        return Type("struct", name=base)
    raise DefinitionError(f"{where}: unknown type {base!r} (a struct must be defined before it is used)")


def read_toml(path: Path) -> list[Definition]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef,import-not-found,unused-ignore]
        except ModuleNotFoundError:
            raise DefinitionError("reading TOML on Python 3.10 needs the tomli package: pip install tomli") from None
    document = tomllib.loads(path.read_text())
    unknown = set(document) - {"struct", "packet"}
    if unknown:
        raise DefinitionError(f"{path.name}: unknown table(s) {sorted(unknown)}; use [struct.Name] and [packet.Name]")
    definitions: list[Definition] = []
    structs: set[str] = set()
    for kind in ("struct", "packet"):
        for name, body in document.get(kind, {}).items():
            where = f"{path.name}: {kind}.{name}"
            packet_id = None
            if kind == "packet":
                packet_id = body.get("id")
                if not isinstance(packet_id, int) or not 0 <= packet_id <= U16_MAX:
                    raise DefinitionError(f"{where}: needs id = 0..65535, got {packet_id!r}")
            definition = Definition(name, packet_id)
            for field_name, type_text in body.items():
                if kind == "packet" and field_name == "id":
                    continue
                if not isinstance(type_text, str):
                    raise DefinitionError(f"{where}.{field_name}: a type is a string, got {type_text!r}")
                definition.fields.append((field_name, parse_type(type_text, f"{where}.{field_name}", structs)))
            if kind == "struct":
                structs.add(name)
            definitions.append(definition)
    return check_ids(definitions)


def read_module(path: Path) -> list[Definition]:
    from servercore.packets import Field, Packet, Struct

    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise DefinitionError(f"{path}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)

    def convert(f: Field) -> Type:
        if f.kind == "scalar":
            assert f.scalar is not None
            return Type("scalar", name=SCALAR_CODES[f.scalar.code])
        if f.kind == "fixed":
            assert f.scalar is not None
            return Type("fixed", name=SCALAR_CODES[f.scalar.code], count=f.count)
        if f.kind in ("str", "bytes"):
            return Type(f.kind, limit=f.limit)
        if f.kind == "struct":
            assert f.struct_type is not None
            return Type("struct", name=f.struct_type.__name__)
        assert f.element is not None
        return Type("list", limit=f.limit, element=convert(f.element))

    classes = [c for _, c in inspect.getmembers(module, inspect.isclass)
               if issubclass(c, Struct) and c.__module__ == module.__name__]
    # Definition order (a struct before its use), as in the source.
    classes.sort(key=lambda c: inspect.getsourcelines(c)[1])
    definitions = []
    for cls in classes:
        packet_id = cls.packet_id if issubclass(cls, Packet) else None
        definitions.append(Definition(cls.__name__, packet_id, [(f.name, convert(f)) for f in cls.__layout__]))
    return check_ids(definitions)


def check_ids(definitions: list[Definition]) -> list[Definition]:
    seen: dict[int, str] = {}
    for definition in definitions:
        if definition.packet_id is None:
            continue
        if definition.packet_id in seen:
            raise DefinitionError(
                f"packet id {definition.packet_id} is used by both {seen[definition.packet_id]} and {definition.name}"
            )
        seen[definition.packet_id] = definition.name
    return definitions


def read(path: Path) -> list[Definition]:
    if path.suffix == ".toml":
        return read_toml(path)
    if path.suffix == ".py":
        return read_module(path)
    raise DefinitionError(f"{path}: expected a .toml definition file or a .py module of Packet classes")


# --- Python ---------------------------------------------------------------------------


def python_annotation(t: Type) -> str:
    if t.kind == "scalar":
        return SCALARS[t.name][0]
    if t.kind == "fixed":
        return f"Annotated[list[{SCALARS[t.name][0]}], Fixed({t.count})]"
    if t.kind in ("str", "bytes"):
        return t.kind if t.limit == U16_MAX else f"Annotated[{t.kind}, Max({t.limit})]"
    if t.kind == "struct":
        return t.name
    assert t.element is not None
    inner = f"list[{python_annotation(t.element)}]"
    return inner if t.limit == U16_MAX else f"Annotated[{inner}, Max({t.limit})]"


def python_value_type(t: Type) -> str:
    if t.kind == "scalar":
        return "bool" if t.name == "bool" else ("float" if t.name.startswith("f") else "int")
    if t.kind == "fixed":
        return f"list[{'float' if t.name.startswith('f') else 'int'}]"
    if t.kind in ("str", "bytes"):
        return t.kind
    if t.kind == "struct":
        return t.name
    assert t.element is not None
    return f"list[{python_value_type(t.element)}]"


HEADER = "# Generated by `servercore gen` from {source}. Do not edit: change the definitions and generate again.\n"


def python_module(definitions: list[Definition], source: str) -> str:
    lines = [
        HEADER.format(source=source).rstrip(),
        "",
        "from __future__ import annotations",
        "",
        "from typing import Annotated",
        "",
        "from servercore.packets import Fixed, Max, Packet, Struct, f32, f64, i8, i16, i32, i64, u8, u16, u32, u64",
        "",
        "__all__ = [" + ", ".join(f'"{d.name}"' for d in definitions) + ', "PACKETS"]',
    ]
    for d in definitions:
        base = "Struct" if d.packet_id is None else f"Packet, id={d.packet_id}"
        lines += ["", "", f"class {d.name}({base}):"]
        lines += [f"    {name}: {python_annotation(t)}" for name, t in d.fields] or ["    pass"]
    packets = [d.name for d in definitions if d.packet_id is not None]
    lines += ["", "", f"PACKETS: tuple[type[Packet], ...] = ({', '.join(packets)}{',' if len(packets) == 1 else ''})",
              '"""Every packet type, for a Router or a client."""', ""]
    return "\n".join(lines)


def python_stub(definitions: list[Definition], source: str) -> str:
    lines = [
        HEADER.format(source=source).rstrip(),
        "",
        "from typing import ClassVar",
        "",
        "from servercore.packets import Packet, Struct",
    ]
    for d in definitions:
        base = "Struct" if d.packet_id is None else "Packet"
        lines += ["", f"class {d.name}({base}):"]
        if d.packet_id is not None:
            lines.append("    packet_id: ClassVar[int]")
        lines += [f"    {name}: {python_value_type(t)}" for name, t in d.fields]
        parameters = "".join(f", {name}: {python_value_type(t)}" for name, t in d.fields)
        lines.append(f"    def __init__(self, *{parameters}) -> None: ..." if d.fields else
                     "    def __init__(self) -> None: ...")
    lines += ["", "PACKETS: tuple[type[Packet], ...]", ""]
    return "\n".join(lines)


# --- C# -------------------------------------------------------------------------------


CS_KEYWORDS = frozenset("""
abstract as base bool break byte case catch char checked class const continue decimal default delegate do double
else enum event explicit extern false finally fixed float for foreach goto if implicit in int interface internal is
lock long namespace new null object operator out override params private protected public readonly ref return sbyte
sealed short sizeof stackalloc static string struct switch this throw true try typeof uint ulong unchecked unsafe
ushort using virtual void volatile while
""".split())


def cs_name(name: str) -> str:
    """A field's name in C#: as defined, `@`-escaped if it is a keyword there."""
    return f"@{name}" if name in CS_KEYWORDS else name


def cs_type(t: Type) -> str:
    if t.kind in ("scalar", "fixed"):
        base = SCALARS[t.name][1]
        return base if t.kind == "scalar" else f"{base}[]"
    if t.kind == "str":
        return "string"
    if t.kind == "bytes":
        return "byte[]"
    if t.kind == "struct":
        return t.name
    assert t.element is not None
    return f"List<{cs_type(t.element)}>"


def cs_default(t: Type) -> str:
    if t.kind == "scalar":
        return ""
    if t.kind == "fixed":
        return f" = new {SCALARS[t.name][1]}[{t.count}]"
    if t.kind == "str":
        return ' = ""'
    if t.kind == "bytes":
        return " = new byte[0]"
    return f" = new {cs_type(t)}()"


def cs_write(t: Type, value: str, where: str, depth: int) -> list[str]:
    pad = "    " * depth
    if t.kind == "scalar":
        return [f"{pad}w.Write({value});"]
    if t.kind == "fixed":
        return [f'{pad}Wire.CheckCount({value}.Length, {t.count}, "{where}");',
                f"{pad}for (int i = 0; i < {t.count}; i++) w.Write({value}[i]);"]
    if t.kind == "str":
        return [f'{pad}Wire.WriteString(w, {value}, {t.limit}, "{where}");']
    if t.kind == "bytes":
        return [f'{pad}Wire.WriteBytes(w, {value}, {t.limit}, "{where}");']
    if t.kind == "struct":
        return [f"{pad}{value}.Write(w);"]
    assert t.element is not None
    item = f"item{depth}"
    return [f'{pad}Wire.WriteCount(w, {value}.Count, {t.limit}, "{where}");',
            f"{pad}foreach (var {item} in {value})", f"{pad}{{",
            *cs_write(t.element, item, where, depth + 1), f"{pad}}}"]


def cs_read(t: Type, where: str, r: str = "r") -> str:
    """An expression reading `t` from the BinaryReader named `r`."""
    if t.kind == "scalar":
        return f"{r}.{SCALARS[t.name][2]}()"
    if t.kind == "fixed":
        return f"Wire.ReadArray({r}, {t.count}, e => e.{SCALARS[t.name][2]}())"
    if t.kind == "str":
        return f'Wire.ReadString({r}, {t.limit}, "{where}")'
    if t.kind == "bytes":
        return f'Wire.ReadBytes({r}, {t.limit}, "{where}")'
    if t.kind == "struct":
        return f"{t.name}.Read({r})"
    assert t.element is not None
    return f'Wire.ReadList({r}, {t.limit}, "{where}", e => {cs_read(t.element, where, "e")})'


CS_WIRE = """
    /// <summary>The wire format's helpers: little-endian, u16 lengths and counts.</summary>
    public static class Wire
    {
        static readonly UTF8Encoding StrictUtf8 = new UTF8Encoding(false, true);

        /// <summary>A whole packet, header included: [size u16][id u16][payload].</summary>
        public static byte[] Encode(IPacket packet)
        {
            var stream = new MemoryStream();
            var w = new BinaryWriter(stream);
            w.Write((ushort)0);
            w.Write(packet.PacketId);
            packet.Write(w);
            var bytes = stream.ToArray();
            if (bytes.Length > 65535) throw new ArgumentException("a packet of " + bytes.Length + " bytes is over 65535");
            bytes[0] = (byte)bytes.Length;
            bytes[1] = (byte)(bytes.Length >> 8);
            return bytes;
        }

        public static void CheckCount(int count, int expected, string where)
        {
            if (count != expected) throw new ArgumentException(where + ": " + count + " elements, expected " + expected);
        }

        public static void WriteCount(BinaryWriter w, int count, int max, string where)
        {
            if (count > max) throw new ArgumentException(where + ": " + count + " elements, over its limit of " + max);
            w.Write((ushort)count);
        }

        public static void WriteString(BinaryWriter w, string value, int max, string where)
        {
            WriteBytes(w, Encoding.UTF8.GetBytes(value), max, where);
        }

        public static void WriteBytes(BinaryWriter w, byte[] value, int max, string where)
        {
            if (value.Length > max) throw new ArgumentException(where + ": " + value.Length + " bytes, over its limit of " + max);
            w.Write((ushort)value.Length);
            w.Write(value);
        }

        static int ReadCount(BinaryReader r, int max, string where)
        {
            int count = r.ReadUInt16();
            if (count > max) throw new InvalidDataException(where + ": " + count + ", over its limit of " + max);
            return count;
        }

        public static byte[] ReadBytes(BinaryReader r, int max, string where)
        {
            int count = ReadCount(r, max, where);
            var bytes = r.ReadBytes(count);
            if (bytes.Length != count) throw new InvalidDataException(where + ": " + count + " bytes announced, " + bytes.Length + " left");
            return bytes;
        }

        public static string ReadString(BinaryReader r, int max, string where)
        {
            var bytes = ReadBytes(r, max, where);
            try { return StrictUtf8.GetString(bytes); }
            catch (DecoderFallbackException) { throw new InvalidDataException(where + ": invalid UTF-8"); }
        }

        public static T[] ReadArray<T>(BinaryReader r, int count, Func<BinaryReader, T> read)
        {
            var items = new T[count];
            for (int i = 0; i < count; i++) items[i] = read(r);
            return items;
        }

        public static List<T> ReadList<T>(BinaryReader r, int max, string where, Func<BinaryReader, T> read)
        {
            int count = ReadCount(r, max, where);
            var items = new List<T>(count);
            for (int i = 0; i < count; i++) items.Add(read(r));
            return items;
        }

        /// <summary>Reads a whole payload: no bytes may be left over.</summary>
        public static T Decode<T>(byte[] payload, Func<BinaryReader, T> read, string name)
        {
            var stream = new MemoryStream(payload);
            var reader = new BinaryReader(stream);
            T packet;
            try { packet = read(reader); }
            catch (EndOfStreamException) { throw new InvalidDataException(name + ": the payload is too short"); }
            if (stream.Position != payload.Length)
                throw new InvalidDataException(name + ": " + (payload.Length - stream.Position) + " trailing bytes");
            return packet;
        }
    }
"""


def csharp(definitions: list[Definition], source: str, namespace: str) -> str:
    out = [HEADER.format(source=source).replace("#", "//", 1).rstrip(),
           "using System;", "using System.Collections.Generic;", "using System.IO;", "using System.Text;", "",
           f"namespace {namespace}", "{",
           "    /// <summary>A packet: its id and how it writes its payload.</summary>",
           "    public interface IPacket", "    {", "        ushort PacketId { get; }",
           "        void Write(BinaryWriter w);", "    }"]
    for d in definitions:
        packet = d.packet_id is not None
        out += ["", f"    public sealed class {d.name}{' : IPacket' if packet else ''}", "    {"]
        if packet:
            out += [f"        public const ushort Id = {d.packet_id};",
                    "        public ushort PacketId { get { return Id; } }"]
        out += [f"        public {cs_type(t)} {cs_name(name)}{cs_default(t)};" for name, t in d.fields]
        out += ["", "        public void Write(BinaryWriter w)", "        {"]
        for name, t in d.fields:
            out += cs_write(t, cs_name(name), f"{d.name}.{name}", 3)
        out += ["        }", "", f"        public static {d.name} Read(BinaryReader r)", "        {",
                f"            var o = new {d.name}();"]
        out += [f"            o.{cs_name(name)} = {cs_read(t, f'{d.name}.{name}')};" for name, t in d.fields]
        out += ["            return o;", "        }", "    }"]
    out += CS_WIRE.rstrip("\n").split("\n")
    packets = [d for d in definitions if d.packet_id is not None]
    out += ["", "    /// <summary>Routes received packets to handlers by id (the lecture's PacketHandler).</summary>",
            "    public sealed class PacketHandler", "    {",
            "        readonly Dictionary<ushort, Action<byte[]>> handlers = new Dictionary<ushort, Action<byte[]>>();"]
    for d in packets:
        out += ["", f"        public void On{d.name}(Action<{d.name}> handle)", "        {",
                f'            handlers[{d.name}.Id] = payload => handle(Wire.Decode(payload, {d.name}.Read, "{d.name}"));',
                "        }"]
    out += ["", "        /// <summary>False if no handler takes this id; InvalidDataException if the payload is malformed.</summary>",
            "        public bool Dispatch(ushort id, byte[] payload)", "        {", "            Action<byte[]> handle;",
            "            if (!handlers.TryGetValue(id, out handle)) return false;", "            handle(payload);",
            "            return true;", "        }", "    }", "}", ""]
    return "\n".join(out)


# --- the command ----------------------------------------------------------------------


def pascal(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in re.split(r"[^A-Za-z0-9]+", name) if part)


def generate(definitions_path: Path, out: Path, namespace: str | None = None) -> list[Path]:
    definitions = read(definitions_path)
    if not any(d.packet_id is not None for d in definitions):
        raise DefinitionError(f"{definitions_path}: no packets defined")
    name = re.sub(r"\W", "_", definitions_path.stem)
    if definitions_path.suffix == ".py":
        name += "_generated"
    out.mkdir(parents=True, exist_ok=True)
    source = definitions_path.name
    files = {
        out / f"{name}.py": python_module(definitions, source),
        out / f"{name}.pyi": python_stub(definitions, source),
        out / f"{pascal(name)}.cs": csharp(definitions, source, namespace or pascal(name)),
    }
    for path, text in files.items():
        path.write_text(text)
    return list(files)


def main(definitions: str, out: str, namespace: str | None) -> int:
    try:
        written = generate(Path(definitions), Path(out), namespace)
    except (DefinitionError, OSError) as error:
        print(f"servercore gen: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0

