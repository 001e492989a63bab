"""Conversions between the client's types and the protobuf messages of embedpool.v1."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from google.protobuf import json_format, struct_pb2
from numpy.typing import ArrayLike, NDArray

from embedpool.client.types import Collection, Document, Hit, IndexOptions, Limits, ModelInfo, Sync
from embedpool.errors import InvalidArgument
from embedpool.v1 import embedpool_pb2 as pb

__all__ = [
    "ENCODINGS",
    "as_document",
    "collection",
    "decoded",
    "document_message",
    "encoding",
    "hit",
    "index_message",
    "limits",
    "model_info",
    "row_width",
    "struct",
    "vector_bytes",
    "vectors_into",
]


def as_document(item: Document | str) -> Document:
    return Document(item) if isinstance(item, str) else item


def document_message(item: Document | str) -> pb.Document:
    doc = as_document(item)
    message = pb.Document(id=doc.id, text=doc.text)
    if doc.metadata is not None:
        message.metadata.CopyFrom(struct(doc.metadata, "metadata"))
    return message


def struct(value: Mapping[str, Any], field: str) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    try:
        message.update(value)
    except (TypeError, ValueError, AttributeError) as e:
        raise InvalidArgument(f"{field}: not a JSON object ({e})") from None
    return message


def vector_bytes(vector: ArrayLike) -> bytes:
    """A query vector as packed little-endian float32."""
    array = np.asarray(vector, dtype="<f4")
    if array.ndim != 1 or array.size == 0:
        raise InvalidArgument(f"query: a vector must be one non-empty row, got shape {array.shape}")
    return array.tobytes()


ENCODINGS: dict[str, pb.VectorEncoding.ValueType] = {
    "float32": pb.VECTOR_ENCODING_FLOAT32,
    "float16": pb.VECTOR_ENCODING_FLOAT16,
    "int8": pb.VECTOR_ENCODING_INT8,
    "binary": pb.VECTOR_ENCODING_BINARY,
}
"""The client's names for VectorEncoding. Every one decodes to float32 (int8 dequantized: within scale / 2 of
the server's float32, scale = max|x| / 127) but binary, which stays packed sign bits (uint8, ceil(dim / 8) a
vector, numpy.unpackbits restores them): it is for Hamming-distance prefiltering, not for cosines."""


def encoding(name: str) -> pb.VectorEncoding.ValueType:
    value = ENCODINGS.get(name)
    if value is None:
        raise InvalidArgument(f"encoding: must be one of {', '.join(ENCODINGS)}, got {name!r}")
    return value


def row_width(dim: int, name: str) -> int:
    """The decoded width of a vector of `dim`: dim, or its packed bytes for binary."""
    return (dim + 7) // 8 if name == "binary" else dim


def decoded(packed: Sequence[bytes], name: str) -> NDArray[np.float32] | NDArray[np.uint8]:
    """The packed vectors of one reply (equal lengths), decoded as ENCODINGS says: one row each."""
    data = b"".join(packed)
    if name == "float32":
        return np.frombuffer(data, dtype="<f4").reshape(len(packed), -1).astype(np.float32)
    if name == "float16":
        return np.frombuffer(data, dtype="<f2").reshape(len(packed), -1).astype(np.float32)
    rows = np.frombuffer(data, dtype=np.uint8).reshape(len(packed), -1)
    if name == "binary":
        return rows.copy()
    scales = np.ascontiguousarray(rows[:, :4]).view("<f4").astype(np.float32)
    return rows[:, 4:].view(np.int8).astype(np.float32) * scales


def vectors_into(
    out: NDArray[np.float32] | NDArray[np.uint8], start: int, packed: Sequence[bytes], name: str = "float32"
) -> None:
    """Copies the packed vectors of one reply into rows start.. of `out`, decoded (see `decoded`)."""
    if packed:
        out[start : start + len(packed)] = decoded(packed, name)


def _vector(packed: bytes, name: str) -> NDArray[np.float32] | NDArray[np.uint8] | None:
    return decoded([packed], name)[0] if packed else None


def hit(message: pb.SearchHit, name: str = "float32") -> Hit:
    return Hit(
        id=message.id,
        score=message.score,
        text=message.text,
        metadata=json_format.MessageToDict(message.metadata),
        vector=_vector(message.vector, name),
    )


def index_message(options: IndexOptions) -> pb.IndexOptions:
    return pb.IndexOptions(m=options.m, ef_construction=options.ef_construction, halfvec=options.halfvec)


def collection(message: pb.Collection) -> Collection:
    index = message.index
    return Collection(
        name=message.name,
        model=message.model,
        dim=message.dim,
        metric=message.metric,
        count=message.count,
        index=IndexOptions(m=index.m, ef_construction=index.ef_construction, halfvec=index.halfvec),
        count_estimated=message.count_estimated,
        indexed=message.indexed,
        index_bytes=message.index_bytes,
        table_bytes=message.table_bytes,
        storage=message.storage or "float32",
    )


def limits(message: pb.ServerLimits) -> Limits:
    """The announced limits; an unset one (0: a server from before ServerLimits) keeps the default."""
    default = Limits()
    return Limits(
        max_request_documents=message.max_request_documents or default.max_request_documents,
        max_request_bytes=message.max_request_bytes or default.max_request_bytes,
        max_search_k=message.max_search_k or default.max_search_k,
        max_delete_ids=message.max_delete_ids or default.max_delete_ids,
    )


def model_info(message: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        name=message.name,
        dim=message.dim,
        max_tokens=message.max_tokens,
        variant=message.variant,
        device=message.device,
        pooling=message.pooling,
        normalized=message.normalized,
        dimensions=list(message.dimensions),
        limits=limits(message.limits),
        prompts=dict(message.prompts),
        default_prompt_name=message.default_prompt_name,
        default=message.default,
    )


def sync(message: pb.Sync) -> Sync:
    return Sync(
        name=message.name,
        source=message.source,
        id_column=message.id_column,
        text=message.text,
        collection=message.collection,
        metadata_columns=tuple(message.metadata_columns),
        where=message.where,
        database=message.database,
        paused=message.paused,
        backlog_rows=message.backlog_rows,
        pending_changes=message.pending_changes,
        lag_seconds=message.lag_seconds,
        rows_per_second=message.rows_per_second,
        failures_last_minute=message.failures_last_minute,
        dead_rows=message.dead_rows,
        last_error=message.last_error,
        last_error_row=message.last_error_row,
        backfilled_rows=message.backfilled_rows,
    )
