"""Hostile requests for every embedpool.v1.Embedder RPC, built with hypothesis strategies (bench/chaos.py, scenario
`malformed`).

Three kinds of payload, all as raw wire bytes so that nothing the Python API refuses is out of reach:
- typed: a real request message of the method's type, every field drawn from hostile values (NUL, whitespace,
  huge/empty strings, NaN/inf floats, integer extremes, deep metadata Structs, over-limit document counts);
- wire: hand-encoded protobuf with the message's real field numbers but wrong wire types, invalid UTF-8 in string
  fields, overlong varints, unknown fields and nested garbage;
- raw: random bytes, and typed payloads with bytes flipped or cut off.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import struct
from dataclasses import dataclass
from typing import Any

from google.protobuf import struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from embedpool.v1 import embedpool_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Embedder"]
# The scenario creates these; hostile requests name them often so that they get past the NOT_FOUND check.
COLLECTIONS = ("fuzz", "fuzz_halfvec")
_MAX_DEPTH = 3


@dataclass(frozen=True)
class Case:
    method: str
    payloads: tuple[bytes, ...]  # one for a unary call; the messages of a stream, in order
    kind: str  # typed | wire | raw | mutated | fixed

    @property
    def size(self) -> int:
        return sum(map(len, self.payloads))


# ---------------------------------------------------------------- typed messages

_NASTY_CHARS = st.sampled_from(["\x00", " ", "\t", "\n", "\u200b", "\ufeff", "\U0001f600", "é", "\x7f", "'", '"', "\\"])
_TEXT = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=_NASTY_CHARS, max_size=20),
    st.sampled_from(["", " ", "\x00", "hello\x00world", "a" * 513, "%s%n", "{}", "' OR 1=1 --", "\u0000" * 10]),
    st.builds(lambda n: "word " * n, st.sampled_from([100, 1000, 20_000])),  # up to 100 kB; fixed_cases go bigger
)
_NAME = st.one_of(st.sampled_from(COLLECTIONS), st.sampled_from(["", "nope", "a" * 64, "x/y", "x y", "\x00"]), _TEXT)
_FLOAT32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
_DOUBLE = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.nan, math.inf, -math.inf]))


def _uint(bits: int) -> st.SearchStrategy[int]:
    top = (1 << bits) - 1
    return st.one_of(
        st.sampled_from([0, 1, 2, 10, 1000, 1001, 10_000, (1 << 31) - 1, 1 << 31, top]), st.integers(0, top)
    )


def _int(bits: int) -> st.SearchStrategy[int]:
    half = 1 << (bits - 1)
    return st.one_of(st.sampled_from([-half, -1, 0, 1, half - 1]), st.integers(-half, half - 1))


def _vector_bytes() -> st.SearchStrategy[bytes]:
    packed = st.lists(_FLOAT32, min_size=0, max_size=8).map(lambda v: struct.pack(f"<{len(v)}f", *v))
    dim = st.tuples(st.sampled_from([383, 384, 385, 0]), _FLOAT32).map(lambda t: struct.pack("<f", t[1]) * t[0])
    return st.one_of(packed, dim, st.binary(max_size=2048))


def _json_value(depth: int) -> st.SearchStrategy[Any]:
    leaves = st.one_of(st.none(), st.booleans(), _DOUBLE, _TEXT)
    if depth <= 0:
        return leaves
    return st.recursive(
        leaves,
        lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_TEXT, inner, max_size=4)),
        max_leaves=12,
    )


def _deep(levels: int, leaf: Any) -> dict[str, Any]:
    value: Any = leaf
    for i in range(levels):
        value = {"k": value} if i % 2 else {"l": [value]}
    return value if isinstance(value, dict) else {"k": value}


def _struct() -> st.SearchStrategy[struct_pb2.Struct]:
    shallow = st.dictionaries(_TEXT, _json_value(3), max_size=6)
    # Deeper than the protobuf parser's recursion limit (100) at the top end.
    deep = st.builds(_deep, st.sampled_from([5, 10, 20, 30]), _json_value(0))

    def build(value: dict[str, Any]) -> struct_pb2.Struct:
        message = struct_pb2.Struct()
        message.update(value)
        return message

    return st.one_of(shallow, deep).map(build)


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    t = field.type
    if t == FieldDescriptor.TYPE_STRING:
        return _NAME if field.name in ("collection", "name") else _TEXT
    if t == FieldDescriptor.TYPE_BYTES:
        return _vector_bytes()
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_FLOAT:
        return _FLOAT32
    if t == FieldDescriptor.TYPE_DOUBLE:
        return _DOUBLE
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return _uint(32)
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return _uint(64)
    if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32):
        return _int(32)
    if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
        return _int(64)
    if t == FieldDescriptor.TYPE_ENUM:
        return _int(32)
    raise NotImplementedError(f"field type {t} of {field.full_name}")


def _field_value(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if field.message_type.full_name == "google.protobuf.Struct":
            one: st.SearchStrategy[Any] = _struct()
        else:
            one = typed_message(field.message_type, depth + 1)
    else:
        one = _scalar(field)
    if not _is_repeated(field):
        return one
    few = st.lists(one, max_size=6)
    # Over the documents-per-request limit (1024) without drawing a thousand elements.
    many = st.tuples(one, st.sampled_from([1025, 5000])).map(lambda t: [t[0]] * (t[1] if _small(t[0]) else 2))
    return st.one_of(few, few, few, many)


def _small(value: Any) -> bool:
    """Replicated thousands of times, a value must stay small (the payload is held in memory, then sent)."""
    size = value.ByteSize() if isinstance(value, Message) else len(value) if isinstance(value, str | bytes) else 8
    return bool(size <= 256)


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _message_class(desc: Descriptor) -> type[Message]:
    if desc.file.package == "embedpool.v1":
        cls: type[Message] = getattr(pb, desc.name)
        return cls
    return struct_pb2.Struct if desc.full_name == "google.protobuf.Struct" else _unknown(desc)


def _unknown(desc: Descriptor) -> type[Message]:
    raise NotImplementedError(f"message type {desc.full_name}")


def _assign(message: Message, field: FieldDescriptor, value: Any) -> None:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if _is_repeated(field):
            getattr(message, field.name).extend(value)
        else:
            getattr(message, field.name).CopyFrom(value)
    elif _is_repeated(field):
        getattr(message, field.name).extend(value)
    else:
        setattr(message, field.name, value)


@functools.cache
def typed_message(desc: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """A message of type `desc` with any subset of its fields set to hostile values."""
    cls = _message_class(desc)
    if depth >= _MAX_DEPTH:
        return st.just(cls())
    fields = {f.name: _field_value(f, depth) for f in desc.fields}

    def build(values: dict[str, Any]) -> Message:
        message = cls()
        for name, value in values.items():
            # A Struct nested deeper than the client library itself allows raises: the wire cases have those.
            with contextlib.suppress(DecodeError):
                _assign(message, desc.fields_by_name[name], value)
        return message

    return st.fixed_dictionaries({}, optional=fields).map(build)  # type: ignore[arg-type]


# ---------------------------------------------------------------- hand-encoded wire bytes


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
    return _varint((number << 3) | wire_type)


_INVALID_UTF8 = st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"a\x80b", b"\xc0\xaf"])


@st.composite
def _wire_field(draw: st.DrawFn, desc: Descriptor, depth: int) -> bytes:
    known = list(desc.fields)
    if known and draw(st.integers(0, 9)) > 0:
        field = draw(st.sampled_from(known))
        number = field.number
    else:
        field, number = None, draw(st.one_of(st.integers(1, 50), st.just((1 << 29) - 1), st.integers(19000, 19999)))
    wire_type = draw(st.sampled_from([0, 1, 2, 2, 2, 5, 3, 4, 6, 7]))
    if wire_type == 0:
        value = draw(st.one_of(st.integers(0, (1 << 64) - 1), st.integers(-(1 << 63), -1)))
        raw = _varint(value)
        if draw(st.booleans()):  # overlong: padding 0x80 bytes, up to and past the 10-byte maximum
            raw = b"\x80" * draw(st.integers(1, 12)) + b"\x00"
        return _key(number, 0) + raw
    if wire_type == 1:
        return _key(number, 1) + draw(st.binary(min_size=8, max_size=8))
    if wire_type == 5:
        return _key(number, 5) + draw(st.binary(min_size=4, max_size=4))
    if wire_type == 2:
        if field is not None and field.type == FieldDescriptor.TYPE_MESSAGE and depth < 6:
            inner = field.message_type
            payload = draw(_wire_message(inner, depth + 1))
        elif field is not None and field.type == FieldDescriptor.TYPE_STRING:
            payload = draw(st.binary(max_size=8)) + draw(_INVALID_UTF8) + draw(st.binary(max_size=8))
        else:
            payload = draw(st.binary(max_size=64))
        length = len(payload)
        lie = draw(st.sampled_from([0, 0, 0, 1, -1, 1 << 20, (1 << 31) - 1, (1 << 32) + 5]))
        return _key(number, 2) + _varint(max(0, length + lie) if lie != -1 else max(0, length - 1)) + payload
    # groups (3, 4) are not proto3; 6 and 7 are not wire types at all
    return _key(number, wire_type) + draw(st.binary(max_size=8))


@functools.cache
def _wire_message(desc: Descriptor, depth: int = 0) -> st.SearchStrategy[bytes]:
    return st.lists(_wire_field(desc, depth), max_size=6).map(b"".join)


# ---------------------------------------------------------------- mutations and the case strategy


@st.composite
def _mutated(draw: st.DrawFn, payload: bytes) -> bytes:
    data = bytearray(payload)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "ff"]))
        at = draw(st.integers(0, len(data))) if data else 0
        if op == "flip" and data:
            at = min(at, len(data) - 1)
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            data[at:at] = b"\xff"
    return bytes(data)


@functools.cache
def _payload(desc: Descriptor) -> st.SearchStrategy[tuple[str, bytes]]:
    typed = typed_message(desc).map(lambda m: m.SerializeToString())
    return st.one_of(
        typed.map(lambda b: ("typed", b)),
        typed.map(lambda b: ("typed", b)),
        _wire_message(desc).map(lambda b: ("wire", b)),
        typed.flatmap(_mutated).map(lambda b: ("mutated", b)),
        st.one_of(st.binary(max_size=16), st.binary(max_size=4096)).map(lambda b: ("raw", b)),
    )


@st.composite
def cases(draw: st.DrawFn, method: MethodDescriptor) -> Case:
    desc = method.input_type
    if method.client_streaming:
        drawn = draw(st.lists(_payload(desc), min_size=1, max_size=4))
        kinds = {kind for kind, _ in drawn}
        return Case(method.name, tuple(b for _, b in drawn), kinds.pop() if len(kinds) == 1 else "mixed")
    kind, payload = draw(_payload(desc))
    return Case(method.name, (payload,), kind)


def draw_cases(n: int, seed_value: int) -> list[Case]:
    """`n` cases from hypothesis's generator (no shrinking, no example database), reproducible from `seed_value`,
    shared out over the service's methods so that every one is drawn (at least once each, however small `n`):
    a method left to chance goes untested in some runs, and more so as the service grows."""
    found: list[Case] = []
    methods = list(SERVICE.methods)
    for i, method in enumerate(methods):
        share = max(1, n // len(methods) + (i < n % len(methods)))

        @seed(seed_value + i)
        @settings(
            max_examples=share,
            database=None,
            deadline=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(cases(method))
        def collect(case: Case) -> None:
            found.append(case)

        collect()
    random.Random(seed_value).shuffle(found)  # the methods interleaved, as traffic would be
    return found


def _deep_struct_wire(levels: int) -> bytes:
    """A Struct nested `levels` times, {"k": {"k": ...}}, encoded by hand: the client library refuses to build one
    deeper than its parser's limit."""
    inner = b""
    for _ in range(levels):
        value = _key(5, 2) + _varint(len(inner)) + inner  # Value.struct_value
        entry = _key(1, 2) + b"\x01k" + _key(2, 2) + _varint(len(value)) + value  # map entry {key, value}
        inner = _key(1, 2) + _varint(len(entry)) + entry  # Struct.fields
    return inner


def _with_deep_metadata(levels: int, *, ingest: bool) -> bytes:
    metadata = _deep_struct_wire(levels)
    document = pb.Document(id="deep", text="deep metadata").SerializeToString() + _key(3, 2)
    document += _varint(len(metadata)) + metadata
    head = (
        pb.IngestRequest(collection=COLLECTIONS[0], batch_id=1)
        if ingest
        else pb.EmbedRequest(collection=COLLECTIONS[0])
    )
    field = 3 if ingest else 1
    return head.SerializeToString() + _key(field, 2) + _varint(len(document)) + document


def fixed_cases() -> list[Case]:
    """Sizes no strategy should draw often: just over the request limit, and over the transport limit."""
    doc = pb.Document(text="x" * 1000)
    over_limit = pb.EmbedRequest(documents=[doc] * 17_000).SerializeToString()  # > 16 MiB
    ingest_over = pb.IngestRequest(collection=COLLECTIONS[0], batch_id=1, documents=[doc] * 17_000).SerializeToString()
    return [
        Case("Embed", (over_limit,), "fixed"),
        Case("Ingest", (ingest_over,), "fixed"),
        Case("Embed", (b"\x0a" + _varint(40 << 20) + b"\x00" * (40 << 20),), "fixed"),  # 40 MiB: the transport limit
        Case("Search", (b"",), "fixed"),
        *(Case("Embed", (_with_deep_metadata(n, ingest=False),), "fixed") for n in (20, 31, 32, 33, 60, 99, 100, 5000)),
        *(Case("Ingest", (_with_deep_metadata(n, ingest=True),), "fixed") for n in (31, 32, 33, 100, 5000)),
        Case("Ingest", (), "fixed"),  # a stream that ends at once
    ]
