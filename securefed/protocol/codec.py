"""One binary codec for every typed message.

A message is a frozen dataclass registered with `@message(tag)`. Its annotations say
what each field may hold; decoding checks all of it and raises `ProtocolError` on
anything else: wrong magic or version, an unknown tag, an unknown, duplicate or missing
field, a wrong kind, dtype or number of dimensions, a length past a limit, bad UTF-8,
non-finite floats in an array, or trailing bytes.

Wire format, little-endian:
    header  b"SFD" | version u8 | tag u16 | field count u16
    field   name length u8 | name (ASCII) | kind u8 | payload
    payload int i64 · float f64 · bool u8 (0/1) · str and bytes u32 length + data ·
            ints u32 count + i64 each · metrics u32 count + (u8 key length, key, f64) each ·
            array u8 dtype code | u8 ndim | u32 per dim | raw data · message u32 length + encoded message ·
            blobs u32 count + (u32 length + data) each · messages u32 count + (u32 length + message) each
"""

from __future__ import annotations

import dataclasses
import enum
import math
import struct
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..errors import ProtocolError

MAGIC = b"SFD"
VERSION = 1
DEFAULT_MAX_BYTES = 256 * 2**20
MAX_DEPTH = 4


@dataclass(frozen=True)
class Array:
    """Annotation for an ndarray field: allowed dtypes, exact number of dimensions, finiteness."""

    dtypes: tuple[str, ...]
    ndim: int = 1
    finite: bool = True


@dataclass(frozen=True)
class MaxLen:
    """Annotation for str, bytes and tuple fields: the largest allowed length (for tuples: entries).

    `item` bounds each entry of a tuple[bytes, ...].
    """

    n: int
    item: int = 2**20


class Message:
    """Base of every message; subclasses are frozen dataclasses registered with @message."""

    TAG: ClassVar[int]
    FIELDS: ClassVar[tuple[_Field, ...]]


_REGISTRY: dict[int, type[Message]] = {}



class Kind(enum.IntEnum):
    INT = 1
    FLOAT = 2
    BOOL = 3
    STR = 4
    BYTES = 5
    ARRAY = 6
    INTS = 7
    METRICS = 8
    MESSAGE = 9
    BLOBS = 10
    MESSAGES = 11


_DTYPES = {1: np.dtype("<f4"), 2: np.dtype("<u4"), 3: np.dtype("<i8"), 4: np.dtype("u1"), 5: np.dtype("<f8")}
_DTYPE_CODES = {dtype.name: code for code, dtype in _DTYPES.items()}
_DEFAULT_MAX_LEN = {Kind.STR: 4096, Kind.BYTES: 2**20, Kind.INTS: 2**20, Kind.METRICS: 256, Kind.BLOBS: 2**16,
                    Kind.MESSAGES: 2**16}


@dataclass(frozen=True)
class _Field:
    name: str
    kind: Kind
    array: Array | None = None
    max_len: int = 0
    item_len: int = 0  # each entry of a BLOBS field
    message_types: tuple[type[Message], ...] = ()  # empty: any registered message


def message(tag: int):
    """Register a dataclass as a message with a wire tag that no other message uses."""

    def register(cls):
        if tag in _REGISTRY:
            raise ValueError(f"message tag {tag} is used by {_REGISTRY[tag].__name__} and {cls.__name__}")
        if not 0 < tag < 2**16:
            raise ValueError(f"message tag {tag} is out of range")
        cls = dataclass(frozen=True, eq=False)(cls)  # eq=False: ndarray fields have no truth value
        cls.TAG = tag
        cls.FIELDS = tuple(_field_of(f.name, hint) for f, hint in _hints(cls))
        _REGISTRY[tag] = cls
        return cls

    return register


def _hints(cls) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls, include_extras=True)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def _field_of(name: str, hint: Any) -> _Field:
    if len(name.encode()) > 255:
        raise ValueError(f"field name {name!r} is too long")
    extras: tuple = ()
    if typing.get_origin(hint) is typing.Annotated:
        hint, *extras = typing.get_args(hint)
    limit = next((e for e in extras if isinstance(e, MaxLen)), None)
    max_len = limit.n if limit else 0
    array = next((e for e in extras if isinstance(e, Array)), None)
    if hint is np.ndarray:
        if array is None:
            raise ValueError(f"ndarray field {name!r} needs an Array(...) annotation")
        return _Field(name, Kind.ARRAY, array=array)
    simple = {int: Kind.INT, float: Kind.FLOAT, bool: Kind.BOOL, str: Kind.STR, bytes: Kind.BYTES}
    if hint in simple:
        kind = simple[hint]
        return _Field(name, kind, max_len=max_len or _DEFAULT_MAX_LEN.get(kind, 0))
    if hint == tuple[int, ...]:
        return _Field(name, Kind.INTS, max_len=max_len or _DEFAULT_MAX_LEN[Kind.INTS])
    if hint == dict[str, float]:
        return _Field(name, Kind.METRICS, max_len=max_len or _DEFAULT_MAX_LEN[Kind.METRICS])
    if hint == tuple[bytes, ...]:
        return _Field(name, Kind.BLOBS, max_len=max_len or _DEFAULT_MAX_LEN[Kind.BLOBS],
                      item_len=limit.item if limit else MaxLen(0).item)
    if typing.get_origin(hint) is tuple and len(typing.get_args(hint)) == 2 and typing.get_args(hint)[1] is ...:
        members = _message_types(typing.get_args(hint)[0])
        if members is not None:
            return _Field(name, Kind.MESSAGES, max_len=max_len or _DEFAULT_MAX_LEN[Kind.MESSAGES],
                          message_types=members)
    members = _message_types(hint)
    if members is not None:
        return _Field(name, Kind.MESSAGE, message_types=members)
    raise ValueError(f"field {name!r}: type {hint!r} has no wire encoding")


def _message_types(hint: Any) -> tuple[type[Message], ...] | None:
    """The message classes a hint allows (empty: any registered message), or None if it is not a message hint."""
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if not all(isinstance(m, type) and issubclass(m, Message) for m in members):
        return None
    return () if members == (Message,) else tuple(members)


# ---------------------------------------------------------------- encoding


def encode(msg: Message) -> bytes:
    cls = type(msg)
    if _REGISTRY.get(getattr(cls, "TAG", -1)) is not cls:
        raise TypeError(f"{cls.__name__} is not a registered message")
    parts = [MAGIC, struct.pack("<BHH", VERSION, cls.TAG, len(cls.FIELDS))]
    for field in cls.FIELDS:
        value = getattr(msg, field.name)
        name = field.name.encode()
        parts.append(struct.pack("<B", len(name)) + name + struct.pack("<B", field.kind))
        try:
            parts.extend(_encode_value(field, value))
        except (struct.error, TypeError, ValueError, OverflowError) as exc:
            raise ProtocolError(f"cannot encode {cls.__name__}.{field.name}: {exc}") from None
    return b"".join(parts)


def _encode_value(field: _Field, value: Any) -> list[bytes]:
    """The payload of one field, refusing anything the peer's decoder would refuse."""
    if field.kind in (Kind.INTS, Kind.METRICS, Kind.BLOBS, Kind.MESSAGES) and len(value) > field.max_len:
        raise ValueError(f"{len(value)} entries exceed {field.max_len}")
    match field.kind:
        case Kind.INT:
            return [struct.pack("<q", value)]
        case Kind.FLOAT:
            return [struct.pack("<d", value)]
        case Kind.BOOL:
            return [struct.pack("<B", 1 if value else 0)]
        case Kind.STR | Kind.BYTES:
            data = value.encode() if field.kind == Kind.STR else bytes(value)
            if len(data) > field.max_len:
                raise ValueError(f"{len(data)} bytes exceed {field.max_len}")
            return [struct.pack("<I", len(data)), data]
        case Kind.ARRAY:
            array = np.asarray(value)
            spec = field.array
            if array.dtype.name not in spec.dtypes or array.ndim != spec.ndim:
                raise ValueError(f"{array.dtype.name} array with {array.ndim} dimensions, "
                                 f"expected {' or '.join(spec.dtypes)} with {spec.ndim}")
            if spec.finite and array.dtype.kind == "f" and not np.isfinite(array).all():
                raise ValueError("contains NaN or infinity")
            code = _DTYPE_CODES[array.dtype.name]
            header = struct.pack(f"<BB{array.ndim}I", code, array.ndim, *array.shape)
            return [header, array.astype(_DTYPES[code], copy=False).tobytes()]
        case Kind.INTS:
            return [struct.pack(f"<I{len(value)}q", len(value), *value)]
        case Kind.METRICS:
            out = [struct.pack("<I", len(value))]
            for key, number in value.items():
                raw = key.encode()
                out.append(struct.pack("<B", len(raw)) + raw + struct.pack("<d", number))
            return out
        case Kind.MESSAGE:
            return _encode_nested(field, value)
        case Kind.BLOBS:
            if not isinstance(value, (tuple, list)):
                raise TypeError(f"expected a tuple of bytes, got {type(value).__name__}")
            out = [struct.pack("<I", len(value))]
            for blob in value:
                blob = bytes(blob)
                if len(blob) > field.item_len:
                    raise ValueError(f"an entry of {len(blob)} bytes exceeds {field.item_len}")
                out += [struct.pack("<I", len(blob)), blob]
            return out
        case Kind.MESSAGES:
            if not isinstance(value, (tuple, list)):
                raise TypeError(f"expected a tuple of messages, got {type(value).__name__}")
            return [struct.pack("<I", len(value))] + [part for item in value for part in _encode_nested(field, item)]
    raise AssertionError(field.kind)


def _encode_nested(field: _Field, value: Any) -> list[bytes]:
    if field.message_types and type(value) not in field.message_types:
        raise TypeError(f"{type(value).__name__} is not allowed here")
    data = encode(value)
    return [struct.pack("<I", len(data)), data]


# ---------------------------------------------------------------- decoding


class _Reader:
    def __init__(self, data: bytes, what: str):
        self.data = memoryview(data)
        self.pos = 0
        self.what = what

    def fail(self, reason: str) -> typing.NoReturn:
        raise ProtocolError(f"malformed {self.what}: {reason}")

    def take(self, n: int, item: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            self.fail(f"truncated in {item}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str, item: str) -> tuple:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), item))


def decode(
    data: bytes,
    expect: type[Message] | tuple[type[Message], ...] | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    _depth: int = 0,
) -> Message:
    """Decode one message; `expect` restricts which message types are acceptable."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"malformed message: expected bytes, got {type(data).__name__}")
    try:
        data = memoryview(data).cast("B")  # count bytes, whatever the buffer's item size
    except TypeError:
        raise ProtocolError("malformed message: not a contiguous byte buffer") from None
    if len(data) > max_bytes:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    if not isinstance(data.obj, bytes):  # a snapshot of a buffer that could change while it is read
        data = memoryview(bytes(data))
    return _decode(data, expect, max_bytes, _depth)


def _decode(data: memoryview, expect, max_bytes: int, _depth: int) -> Message:
    """Decode from a view that stays valid: nested messages are read in place, never copied."""
    reader = _Reader(data, "message")
    if bytes(reader.take(3, "magic")) != MAGIC:
        reader.fail("not a securefed message (bad magic)")
    version, tag, count = reader.unpack("<BHH", "header")
    if version != VERSION:
        reader.fail(f"protocol version {version}, expected {VERSION}")
    cls = _REGISTRY.get(tag)
    if cls is None:
        reader.fail(f"unknown message tag {tag}")
    reader.what = cls.__name__
    expected = expect if isinstance(expect, tuple) else (expect,) if expect else ()
    if expected and cls not in expected:
        reader.fail(f"unexpected message, wanted {' or '.join(c.__name__ for c in expected)}")
    fields = {f.name: f for f in cls.FIELDS}
    values: dict[str, Any] = {}
    for _ in range(count):
        (name_len,) = reader.unpack("<B", "field name")
        try:
            name = bytes(reader.take(name_len, "field name")).decode("ascii")
        except UnicodeDecodeError:
            reader.fail("field name is not ASCII")
        field = fields.get(name)
        if field is None:
            reader.fail(f"unknown field {name!r}")
        if name in values:
            reader.fail(f"duplicate field {name!r}")
        (kind,) = reader.unpack("<B", f"field {name!r}")
        if kind != field.kind:
            reader.fail(f"field {name!r} has kind {kind}, expected {field.kind}")
        values[name] = _decode_value(reader, field, max_bytes, _depth)
    missing = [name for name in fields if name not in values]
    if missing:
        reader.fail(f"missing field{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}")
    if reader.pos != len(reader.data):
        reader.fail(f"{len(reader.data) - reader.pos} trailing bytes")
    return cls(**values)


def _decode_value(reader: _Reader, field: _Field, max_bytes: int, depth: int) -> Any:
    item = f"field {field.name!r}"
    match field.kind:
        case Kind.INT:
            return reader.unpack("<q", item)[0]
        case Kind.FLOAT:
            return reader.unpack("<d", item)[0]
        case Kind.BOOL:
            (flag,) = reader.unpack("<B", item)
            if flag > 1:
                reader.fail(f"{item}: boolean must be 0 or 1")
            return bool(flag)
        case Kind.STR | Kind.BYTES:
            (n,) = reader.unpack("<I", item)
            if n > field.max_len:
                reader.fail(f"{item}: length {n} exceeds {field.max_len}")
            raw = bytes(reader.take(n, item))
            if field.kind == Kind.BYTES:
                return raw
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                reader.fail(f"{item}: invalid UTF-8")
        case Kind.ARRAY:
            return _decode_array(reader, field)
        case Kind.INTS:
            (n,) = reader.unpack("<I", item)
            if n > field.max_len:
                reader.fail(f"{item}: {n} entries exceed {field.max_len}")
            return tuple(reader.unpack(f"<{n}q", item))
        case Kind.METRICS:
            (n,) = reader.unpack("<I", item)
            if n > field.max_len:
                reader.fail(f"{item}: {n} entries exceed {field.max_len}")
            metrics = {}
            for _ in range(n):
                (key_len,) = reader.unpack("<B", item)
                try:
                    key = bytes(reader.take(key_len, item)).decode("utf-8")
                except UnicodeDecodeError:
                    reader.fail(f"{item}: key is not UTF-8")
                if key in metrics:
                    reader.fail(f"{item}: duplicate key {key!r}")
                metrics[key] = reader.unpack("<d", item)[0]
            return metrics
        case Kind.MESSAGE:
            return _decode_nested(reader, field, max_bytes, depth)
        case Kind.BLOBS | Kind.MESSAGES:
            (n,) = reader.unpack("<I", item)
            if n > field.max_len:
                reader.fail(f"{item}: {n} entries exceed {field.max_len}")
            if n * 4 > len(reader.data) - reader.pos:
                reader.fail(f"truncated in {item}")
            if field.kind == Kind.MESSAGES:
                return tuple(_decode_nested(reader, field, max_bytes, depth) for _ in range(n))
            blobs = []
            for _ in range(n):
                (size,) = reader.unpack("<I", item)
                if size > field.item_len:
                    reader.fail(f"{item}: an entry of {size} bytes exceeds {field.item_len}")
                blobs.append(bytes(reader.take(size, item)))
            return tuple(blobs)
    raise AssertionError(field.kind)


def _decode_nested(reader: _Reader, field: _Field, max_bytes: int, depth: int) -> Message:
    item = f"field {field.name!r}"
    if depth + 1 >= MAX_DEPTH:
        reader.fail(f"{item}: messages nested deeper than {MAX_DEPTH}")
    (n,) = reader.unpack("<I", item)
    return _decode(reader.take(n, item), field.message_types or None, max_bytes, depth + 1)


def _decode_array(reader: _Reader, field: _Field) -> np.ndarray:
    item = f"field {field.name!r}"
    spec = field.array
    assert spec is not None
    code, ndim = reader.unpack("<BB", item)
    dtype = _DTYPES.get(code)
    if dtype is None or dtype.name not in spec.dtypes:
        got = dtype.name if dtype is not None else f"code {code}"
        reader.fail(f"{item}: dtype {got} not allowed (expected {' or '.join(spec.dtypes)})")
    if ndim != spec.ndim:
        reader.fail(f"{item}: {ndim} dimensions, expected {spec.ndim}")
    shape = reader.unpack(f"<{ndim}I", item)
    count = math.prod(shape)  # exact: numpy's product would wrap around
    nbytes = count * dtype.itemsize
    if nbytes > len(reader.data) - reader.pos:
        reader.fail(f"{item}: shape {shape} needs {nbytes} bytes, only {len(reader.data) - reader.pos} remain")
    array = np.frombuffer(reader.take(nbytes, item), dtype=dtype, count=count).reshape(shape).copy()
    if spec.finite and dtype.kind == "f" and not np.isfinite(array).all():
        reader.fail(f"{item}: contains NaN or infinity")
    return array.astype(dtype.newbyteorder("="), copy=False)
