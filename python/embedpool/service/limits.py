"""Every request limit and input check, defined once: the gRPC door, the HTTP door and the core all use these.

Checks raise InvalidArgument (RequestTooLarge for sizes) with a message naming the field, as the caller's
door spells it (`field` arguments), and the document index where there is one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from embedpool.config import Settings
from embedpool.errors import InvalidArgument, RequestTooLarge
from embedpool.pool.windows import Chunking
from embedpool.service.documents import Document
from embedpool.store.storage import STORAGES

COLLECTION_NAME: Final = re.compile(r"[A-Za-z0-9_.\-]{1,63}")
# What the core sees: the gate has checked the caller's name against COLLECTION_NAME and moved it into the
# caller's tenant namespace (security.tenancy), so a "/" here can only be the one it added.
STORED_COLLECTION_NAME: Final = re.compile(r"(?:[a-z0-9][a-z0-9_-]{0,62}/)?[A-Za-z0-9_.\-]{1,63}")
MAX_ID_BYTES: Final = 512
MAX_CANDIDATES: Final = 10_000
INTERACTIVE_DOCUMENTS: Final = 32
"""Embed and write calls of up to this many documents are interactive work (pool.priority), larger ones bulk: a
caller sending hundreds of documents at once is after throughput, and ahead of bulk work would hold up queries."""


@dataclass(frozen=True)
class Limits:
    max_request_documents: int
    max_request_bytes: int
    max_search_k: int
    ingest_window: int
    ingest_stores: int
    max_metadata_bytes: int = 64 * 1024
    max_filter_bytes: int = 16 * 1024
    max_delete_ids: int = 10_000
    max_ingest_streams: int = 64
    max_windows_per_request: int = 256

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        """Each limit is the setting of the same name: defined once, in config.Settings."""
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)})


def collection_name(name: str, field: str = "collection", *, stored: bool = True) -> str:
    """`stored`: the name as the core sees it, in the caller's tenant namespace; else as a caller sends it."""
    if not name:
        raise InvalidArgument(f"{field}: must not be empty")
    if not (STORED_COLLECTION_NAME if stored else COLLECTION_NAME).fullmatch(name):
        raise InvalidArgument(f"{field}: {name[:80]!r} is not a valid name (1-63 of A-Z a-z 0-9 _ . -)")
    return name


def storage(value: str, field: str = "storage") -> str:
    """A collection's storage type (store.storage); "" is the default, float32."""
    if not value:
        return "float32"
    if value not in STORAGES:
        raise InvalidArgument(f"{field}: must be one of {', '.join(STORAGES)}, got {value[:40]!r}")
    return value


def request_bytes(size: int, limits: Limits) -> None:
    if size > limits.max_request_bytes:
        raise RequestTooLarge(f"request is {size} bytes, over the limit of {limits.max_request_bytes}")


def texts(values: Sequence[str], limits: Limits, field: str = "documents") -> None:
    """Texts to embed: 1..max_request_documents, none empty. `field`: "documents" (of Document messages) or the
    name of a list of plain texts."""
    _count(len(values), limits, field)
    if all(map(str.strip, values)) and all(map(str.isascii, values)):
        return  # the common case, checked without a Python step per text; otherwise find and name the culprit
    suffix = ".text" if field == "documents" else ""
    for i, value in enumerate(values):
        text(value, f"{field}[{i}]{suffix}")


def text(value: str, field: str) -> None:
    """A text to embed: not empty, and encodable (JSON can carry lone surrogates; UTF-8 cannot)."""
    if not value.strip():
        raise InvalidArgument(f"{field}: must not be empty or only whitespace")
    utf8(value, field)


def utf8(value: str, field: str) -> int:
    """The UTF-8 size of `value`; InvalidArgument for a lone surrogate, which no UTF-8 text holds."""
    if value.isascii():
        return len(value)
    try:
        return len(value.encode())
    except UnicodeEncodeError:
        raise InvalidArgument(f"{field}: is not valid Unicode (a lone surrogate)") from None


Checked = tuple[dict[str, Any], str]
"""A document's metadata as it is stored, and as canonical JSON: what the content hash covers."""


def documents(
    docs: Sequence[Document], limits: Limits, field: str = "documents", *, count: bool = True
) -> list[Checked]:
    """Documents to store. Returns each one's metadata normalised (`json_object`) and as canonical JSON (sorted
    keys), which is what the size limit measures and the content hash covers, so it is encoded once. `count`:
    check their number against the request limit (not for a request's windows, which max_windows bounds)."""
    if count:
        _count(len(docs), limits, field)
    checked = []
    for i, doc in enumerate(docs):
        text(doc.text, f"{field}[{i}].text")
        if utf8(doc.id, f"{field}[{i}].id") > MAX_ID_BYTES:
            raise InvalidArgument(f"{field}[{i}].id: longer than {MAX_ID_BYTES} bytes")
        # Postgres text and jsonb cannot hold NUL characters: say so instead of failing in COPY.
        if "\x00" in doc.id:
            raise InvalidArgument(f"{field}[{i}].id: contains a NUL character")
        if "\x00" in doc.text:
            raise InvalidArgument(f"{field}[{i}].text: contains a NUL character, which cannot be stored")
        if not doc.metadata:
            checked.append(_EMPTY)
            continue
        metadata, encoded = json_object(doc.metadata, f"{field}[{i}].metadata")
        if (size := utf8(encoded, f"{field}[{i}].metadata")) > limits.max_metadata_bytes:
            raise InvalidArgument(f"{field}[{i}].metadata: {size} bytes, over the limit of {limits.max_metadata_bytes}")
        checked.append((metadata, encoded))
    return checked


def json_filter(value: Mapping[str, Any], limits: Limits, field: str = "filter") -> None:
    """A metadata filter: storable JSON (`json_object`) within max_filter_bytes. It is used as sent: jsonb
    containment compares numbers by value, so 1 and 1.0 match alike."""
    _, encoded = json_object(value, field)
    if (size := utf8(encoded, field)) > limits.max_filter_bytes:
        raise InvalidArgument(f"{field}: {size} bytes, over the limit of {limits.max_filter_bytes}")


def search(
    *,
    query: str | None,
    k: int,
    candidates: int | None,
    min_score: float | None,
    filter: Mapping[str, Any] | None,
    limits: Limits,
) -> None:
    if query is not None:
        text(query, "text")
    if not 1 <= k <= limits.max_search_k:
        raise InvalidArgument(f"k: must be in 1..{limits.max_search_k}, got {k}")
    if candidates:  # 0 or None: the server's default
        if candidates > MAX_CANDIDATES:
            raise InvalidArgument(f"candidates: must be at most {MAX_CANDIDATES}, got {candidates}")
        if candidates < k:
            raise InvalidArgument(f"candidates: must be 0 or at least k ({k}), got {candidates}")
    if min_score is not None and not -1.0 <= min_score <= 1.0:
        raise InvalidArgument(f"min_score: must be in [-1, 1], got {min_score}")
    if filter:
        json_filter(filter, limits)


def delete(ids: Sequence[str], filter: Mapping[str, Any] | None, limits: Limits) -> None:
    if bool(ids) == bool(filter):
        raise InvalidArgument("ids, filter: give exactly one (a non-empty filter, or at least one id)")
    if len(ids) > limits.max_delete_ids:
        raise RequestTooLarge(f"ids: {len(ids)} ids, over the limit of {limits.max_delete_ids} per request")
    for i, doc_id in enumerate(ids):
        if not doc_id or utf8(doc_id, f"ids[{i}]") > MAX_ID_BYTES or "\x00" in doc_id:
            raise InvalidArgument(f"ids[{i}]: must be 1..{MAX_ID_BYTES} bytes without NUL characters")
    if filter:
        json_filter(filter, limits)


def _count(n: int, limits: Limits, field: str) -> None:
    if n == 0:
        raise InvalidArgument(f"{field}: must contain at least one document")
    if n > limits.max_request_documents:
        raise RequestTooLarge(f"{field}: {n} documents, over the limit of {limits.max_request_documents} per request")


MAX_JSON_DEPTH: Final = 32
"""Nesting of metadata and filters: below what every encoder on the way back out accepts (protobuf's Struct
parser stops at 100 message levels, two per JSON level; orjson at 254), so a stored document can always be
returned."""
_EXACT_INT: Final = 2**53
# One encoder for every call: json.dumps with options builds a new JSONEncoder each time.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_EMPTY: Final[Checked] = ({}, "{}")


_TEXT_INDEX: Final = re.compile(r"^text (\d+) (?:is )?")


LONG_INPUTS: Final = ("truncate", "error", "chunk")


@dataclass(frozen=True, slots=True)
class LongInputs:
    """What to do with a text over the model's token limit, as the core takes it."""

    truncate: bool = True
    """Cut it to the limit; False: refuse it (INVALID_ARGUMENT), unless `chunking`."""
    chunking: Chunking | None = None
    """Embed it whole, in windows pooled into one vector (pool.windows)."""


def long_inputs(
    mode: str, *, truncate: bool | None, overlap: int, max_windows: int, limits: Limits, prefix: str = ""
) -> LongInputs:
    """A request's long-input options. `mode`: truncate, error or chunk ("": by `truncate`, today's flag, where
    False means error); `overlap`/`max_windows` only with chunk (0: none / the server's limit). `prefix`: how the
    door spells its field names before the name (e.g. "" or "embedpool."). The overlap's bound depends on the model:
    see `window_overlap`."""
    mode = mode or ("truncate" if truncate is None or truncate else "error")
    if mode not in LONG_INPUTS:
        raise InvalidArgument(f"{prefix}long_inputs: {mode[:40]!r} is not one of {', '.join(LONG_INPUTS)}")
    if mode != "chunk":
        if overlap or max_windows:
            raise InvalidArgument(f"{prefix}chunk_overlap_tokens and max_windows apply only to long_inputs chunk")
        if truncate is not None and truncate != (mode == "truncate"):
            raise InvalidArgument(f"{prefix}truncate: contradicts long_inputs {mode}")
        return LongInputs(truncate=mode == "truncate")
    if truncate is False:
        raise InvalidArgument(f"{prefix}truncate: false contradicts long_inputs chunk")
    cap = limits.max_windows_per_request
    if max_windows < 0 or max_windows > cap:
        raise InvalidArgument(f"{prefix}max_windows: {max_windows} is not in 0..{cap} (0: {cap}, this server's limit)")
    if overlap < 0:
        raise InvalidArgument(f"{prefix}chunk_overlap_tokens: must not be negative")
    return LongInputs(truncate=True, chunking=Chunking(overlap=overlap, max_windows=max_windows or cap))


def window_overlap(chunking: Chunking, max_tokens: int) -> None:
    """Windows overlap by less than half the model's length, so each moves on by at least half: the windows of a
    document stay fewer than twice its tokens over the length."""
    if chunking.overlap >= max_tokens // 2:
        raise InvalidArgument(
            f"chunk_overlap_tokens: {chunking.overlap} is not below half the model's {max_tokens} tokens"
        )


def renamed_text_error(error: InvalidArgument, name: Callable[[int], str]) -> InvalidArgument:
    """The tokenizer's error about "text j" (of the texts it was given), naming that text as the caller does."""
    message = _TEXT_INDEX.sub(lambda m: f"{name(int(m[1]))}: ", str(error), count=1)
    return InvalidArgument(message)


def json_object(value: Mapping[str, Any], field: str) -> Checked:
    """`value` normalised, and as canonical JSON. Normalised: a whole number is an int however it came (a
    protobuf Struct carries every number as a double, JSON over HTTP as written), so a document sent through
    either door has one content hash and one stored form. InvalidArgument for NaN or infinity, NUL characters
    (jsonb cannot hold them), nesting deeper than MAX_JSON_DEPTH, or anything that is not JSON."""
    normalized = _normalized(value, field, 1)
    try:
        encoded = _CANONICAL.encode(normalized)
    except (ValueError, TypeError) as e:  # e.g. an integer of more digits than Python will print
        raise InvalidArgument(f"{field}: not storable as JSON ({e})") from None
    return normalized, encoded


def _normalized(value: Any, field: str, depth: int) -> Any:
    if isinstance(value, str):
        if "\x00" in value:
            raise InvalidArgument(f"{field}: contains a NUL character, which cannot be stored")
        return value
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidArgument(f"{field}: NaN and infinity are not JSON numbers")
        return int(value) if value.is_integer() and abs(value) < _EXACT_INT else value
    if isinstance(value, int):
        return value
    if depth > MAX_JSON_DEPTH:
        raise InvalidArgument(f"{field}: nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidArgument(f"{field}: keys must be strings")
            if "\x00" in key:
                raise InvalidArgument(f"{field}: contains a NUL character, which cannot be stored")
            out[key] = _normalized(item, field, depth + 1)
        return out
    if isinstance(value, list | tuple):
        return [_normalized(item, field, depth + 1) for item in value]
    raise InvalidArgument(f"{field}: {type(value).__name__} is not a JSON value")
