"""Request validation. Each check raises InvalidArgument with a message naming the field (and document index)."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf import struct_pb2

from embedpool.config import Settings
from embedpool.errors import InvalidArgument
from embedpool.v1 import embedpool_pb2 as pb

COLLECTION_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,63}")
# What handlers see: server.auth has checked the caller's name against COLLECTION_NAME and moved it into the
# caller's tenant namespace (security.tenancy), so a "/" here can only be the one it added.
STORED_COLLECTION_NAME = re.compile(r"(?:[a-z0-9][a-z0-9_-]{0,62}/)?[A-Za-z0-9_.\-]{1,63}")
MAX_ID_BYTES = 512
MAX_CANDIDATES = 10_000


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

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        """Each limit is the setting of the same name: defined once, in config.Settings."""
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)})


def collection_name(name: str, field: str = "collection", *, stored: bool = True) -> str:
    """`stored`: the name as handlers see it, in the caller's tenant namespace; else as a caller sends it."""
    if not name:
        raise InvalidArgument(f"{field}: must not be empty")
    if not (STORED_COLLECTION_NAME if stored else COLLECTION_NAME).fullmatch(name):
        raise InvalidArgument(f"{field}: {name[:80]!r} is not a valid name (1-63 of A-Z a-z 0-9 _ . -)")
    return name


def request_size(request: pb.EmbedRequest | pb.SearchRequest | pb.IngestRequest, limits: Limits) -> None:
    size = request.ByteSize()
    if size > limits.max_request_bytes:
        raise InvalidArgument(f"request is {size} bytes, over the limit of {limits.max_request_bytes}")


def embed_request(request: pb.EmbedRequest, limits: Limits) -> None:
    request_size(request, limits)
    if request.collection:
        collection_name(request.collection)
    _documents(request.documents, limits, storing=bool(request.collection))


def ingest_batch(request: pb.IngestRequest, limits: Limits) -> None:
    request_size(request, limits)
    collection_name(request.collection or "x")
    _documents(request.documents, limits, storing=True)


def _documents(documents: Sequence[pb.Document], limits: Limits, *, storing: bool) -> None:
    n = len(documents)
    if n == 0:
        raise InvalidArgument("documents: must contain at least one document")
    if n > limits.max_request_documents:
        raise InvalidArgument(f"documents: {n} documents, over the limit of {limits.max_request_documents} per request")
    for i, doc in enumerate(documents):
        if not doc.text.strip():
            raise InvalidArgument(f"documents[{i}].text: must not be empty or only whitespace")
        if storing:
            _storable(doc, i, limits)


def _storable(doc: pb.Document, i: int, limits: Limits) -> None:
    """Postgres text and jsonb cannot hold NUL characters; say so instead of failing in COPY."""
    if len(doc.id.encode()) > MAX_ID_BYTES:
        raise InvalidArgument(f"documents[{i}].id: longer than {MAX_ID_BYTES} bytes")
    if "\x00" in doc.id:
        raise InvalidArgument(f"documents[{i}].id: contains a NUL character")
    if "\x00" in doc.text:
        raise InvalidArgument(f"documents[{i}].text: contains a NUL character, which cannot be stored")
    if doc.HasField("metadata") and (size := doc.metadata.ByteSize()) > limits.max_metadata_bytes:
        raise InvalidArgument(f"documents[{i}].metadata: {size} bytes, over the limit of {limits.max_metadata_bytes}")
    if problem := _struct_problem(doc.metadata):
        raise InvalidArgument(f"documents[{i}].metadata: {problem}")


def _struct_problem(message: struct_pb2.Struct) -> str | None:
    """Why the metadata cannot be stored, walking the message itself: converting it to a dict here would be
    done again when the document is written."""
    for key, value in message.fields.items():
        if "\x00" in key:
            return "contains a NUL character, which cannot be stored"
        if problem := _value_problem(value):
            return problem
    return None


def _value_problem(value: struct_pb2.Value) -> str | None:
    kind = value.WhichOneof("kind")
    if kind == "string_value" and "\x00" in value.string_value:
        return "contains a NUL character, which cannot be stored"
    if kind == "number_value" and not math.isfinite(value.number_value):
        return f"{value.number_value} is not a JSON number"
    if kind == "struct_value":
        return _struct_problem(value.struct_value)
    if kind == "list_value":
        return next(filter(None, map(_value_problem, value.list_value.values)), None)
    return None


def _filter(message: struct_pb2.Struct, limits: Limits) -> None:
    if (size := message.ByteSize()) > limits.max_filter_bytes:
        raise InvalidArgument(f"filter: {size} bytes, over the limit of {limits.max_filter_bytes}")
    if problem := _struct_problem(message):
        raise InvalidArgument(f"filter: {problem}")


def delete_request(request: pb.DeleteDocumentsRequest, limits: Limits) -> None:
    collection_name(request.collection)
    has_filter = request.HasField("filter") and len(request.filter.fields) > 0
    if bool(request.ids) == has_filter:
        raise InvalidArgument("ids, filter: give exactly one (a non-empty filter, or at least one id)")
    if len(request.ids) > limits.max_delete_ids:
        raise InvalidArgument(f"ids: {len(request.ids)} ids, over the limit of {limits.max_delete_ids} per request")
    for i, doc_id in enumerate(request.ids):
        if not doc_id or len(doc_id.encode()) > MAX_ID_BYTES or "\x00" in doc_id:
            raise InvalidArgument(f"ids[{i}]: must be 1..{MAX_ID_BYTES} bytes without NUL characters")
    if has_filter:
        _filter(request.filter, limits)


def search_request(request: pb.SearchRequest, limits: Limits) -> None:
    request_size(request, limits)
    collection_name(request.collection)
    which = request.WhichOneof("query")
    if which is None:
        raise InvalidArgument("query: set either text or vector")
    if which == "text" and not request.text.strip():
        raise InvalidArgument("text: must not be empty or only whitespace")
    if not 1 <= request.k <= limits.max_search_k:
        raise InvalidArgument(f"k: must be in 1..{limits.max_search_k}, got {request.k}")
    if request.candidates > MAX_CANDIDATES:
        raise InvalidArgument(f"candidates: must be at most {MAX_CANDIDATES}, got {request.candidates}")
    if request.candidates and request.candidates < request.k:
        raise InvalidArgument(f"candidates: must be 0 or at least k ({request.k}), got {request.candidates}")
    if request.HasField("min_score") and not -1.0 <= request.min_score <= 1.0:
        raise InvalidArgument(f"min_score: must be in [-1, 1], got {request.min_score}")
    if request.HasField("filter"):
        _filter(request.filter, limits)
