"""The gRPC door's wire formats: packed vectors, protobuf Struct <-> dicts, messages <-> the core's values."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import numpy as np
from google.protobuf import struct_pb2
from numpy.typing import NDArray

from embedpool.errors import InvalidArgument
from embedpool.service import Document, Hit, Limits, Rejected, encodings
from embedpool.service.models import ServedModel
from embedpool.service.syncs import SyncStatus
from embedpool.store import CollectionInfo, CollectionStats, HnswOptions, UpsertResult
from embedpool.store.keys import KeyRecord
from embedpool.v1 import embedpool_pb2 as pb

_LE_F32 = np.dtype("<f4")
_PACKING: dict[int, str] = {
    pb.VECTOR_ENCODING_FLOAT32: "float32",
    pb.VECTOR_ENCODING_FLOAT16: "float16",
    pb.VECTOR_ENCODING_INT8: "int8",
    pb.VECTOR_ENCODING_BINARY: "binary",
}


def pack_vectors(vectors: NDArray[np.float32], encoding: int = pb.VECTOR_ENCODING_FLOAT32) -> list[bytes]:
    name = _PACKING.get(encoding)
    if name is None:
        raise InvalidArgument(f"encoding: {encoding} is not a VectorEncoding")
    return encodings.pack(vectors, name)


def unpack_vector(data: bytes, what: str) -> NDArray[np.float32]:
    """Packed little-endian float32; the core checks its size against the collection's and its values."""
    if len(data) % 4:
        raise InvalidArgument(f"{what}: {len(data)} bytes is not a whole number of float32 values")
    return np.frombuffer(data, dtype=_LE_F32).astype(np.float32)


def documents(messages: Sequence[pb.Document]) -> list[Document]:
    converted = []
    for i, doc in enumerate(messages):
        try:
            metadata = struct_to_dict(doc.metadata) if doc.HasField("metadata") else None
        except InvalidArgument as e:
            raise InvalidArgument(f"documents[{i}].{e}") from None
        converted.append(Document(doc.text, doc.id, metadata))
    return converted


def rejected(values: Sequence[Rejected]) -> list[pb.RejectedDocument]:
    return [pb.RejectedDocument(index=r.index, id=r.id, reason=r.reason) for r in values]


def hit_message(hit: Hit, encoding: int) -> pb.SearchHit:
    return pb.SearchHit(
        id=hit.id,
        score=hit.score,
        text=hit.text,
        metadata=dict_to_struct(hit.metadata),
        vector=pack_vectors(hit.vector[None, :], encoding)[0] if hit.vector is not None else b"",
    )


def model_info(served: ServedModel, default: ServedModel, limits: Limits) -> pb.ModelInfo:
    model = served.model
    return pb.ModelInfo(
        name=model.name,
        dim=model.dim,
        max_tokens=model.max_tokens,
        variant=model.variant,
        device=model.device,
        pooling=model.pooling,
        normalized=True,
        dimensions=sorted(model.dimensions, reverse=True),
        prompts=dict(model.prompts),
        default_prompt_name=model.default_prompt_name,
        default=served is default,
        encodings=[name for name in pb.VectorEncoding.keys()],  # noqa: SIM118  # a protobuf enum wrapper
        limits=pb.ServerLimits(
            max_request_documents=limits.max_request_documents,
            max_request_bytes=limits.max_request_bytes,
            max_search_k=limits.max_search_k,
            max_delete_ids=limits.max_delete_ids,
        ),
    )


def struct_to_dict(message: struct_pb2.Struct) -> dict[str, Any]:
    """What json_format.MessageToDict returns for a Struct (tests/server/test_codec.py checks it), several
    times faster: the ingest path converts every document's metadata, and MessageToDict's generic descriptor
    walk was the largest Python cost per document after the model. A NaN or infinity, which JSON cannot
    carry, is the caller's INVALID_ARGUMENT."""
    return {key: _value(value) for key, value in message.fields.items()}


def _value(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            raise InvalidArgument(f"metadata: {number} is not a JSON number")
        return number
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return struct_to_dict(value.struct_value)
    if kind == "list_value":
        return [_value(item) for item in value.list_value.values]
    return None  # null_value, or no kind set


def dict_to_struct(value: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(value)
    return message


def upsert_stats(result: UpsertResult) -> pb.UpsertStats:
    return pb.UpsertStats(inserted=result.inserted, updated=result.updated, unchanged=result.unchanged)


def collection_message(info: CollectionInfo, stats: CollectionStats | None = None) -> pb.Collection:
    index = pb.IndexOptions(m=info.hnsw_m, ef_construction=info.hnsw_ef_construction, halfvec=info.hnsw_halfvec)
    message = pb.Collection(
        name=info.name,
        model=info.model,
        dim=info.dim,
        metric=info.metric,
        count=info.count or 0,
        count_estimated=info.count_estimated,
        index=index,
        storage=info.storage,
    )
    if stats is not None:
        message.count, message.index_bytes, message.table_bytes = stats.count, stats.index_bytes, stats.table_bytes
        message.indexed = stats.indexed
    return message


def index_options(message: pb.IndexOptions) -> HnswOptions:
    """The request's options, 0 meaning the default; InvalidArgument (from HnswOptions) when out of range."""
    defaults = HnswOptions()
    return HnswOptions(
        m=message.m or defaults.m,
        ef_construction=message.ef_construction or defaults.ef_construction,
        halfvec=message.halfvec,
    )


def _unix_ms(at: datetime | None) -> int:
    return 0 if at is None else round(at.timestamp() * 1000)


def key_message(record: KeyRecord) -> pb.ApiKey:
    message = pb.ApiKey(
        id=record.id,
        tenant=record.tenant,
        role=record.role,
        collections=record.collections,
        note=record.note,
        created_at_unix_ms=_unix_ms(record.created_at),
        revoked_at_unix_ms=_unix_ms(record.revoked_at),
    )
    if record.tokens_per_s is not None:
        message.tokens_per_s = record.tokens_per_s
    if record.docs_per_s is not None:
        message.docs_per_s = record.docs_per_s
    return message


def sync_message(status: SyncStatus) -> pb.Sync:
    record, source, queue = status.record, status.record.source, status.queue
    return pb.Sync(
        name=record.name,
        source=f"{source.schema}.{source.table}",
        id_column=source.id_column,
        text=source.text_expr,
        metadata_columns=source.metadata_columns,
        where=source.where_expr,
        collection=record.collection,
        database=record.database,
        paused=record.paused,
        created_at_unix_ms=_unix_ms(record.created_at),
        backlog_rows=queue.pending_rows,
        pending_changes=queue.pending_changes,
        lag_seconds=queue.oldest_pending_s,
        rows_per_second=status.rows_per_s,
        failures_last_minute=status.failures_last_minute,
        dead_rows=queue.dead_rows,
        last_error=queue.last_error,
        last_error_row=queue.last_error_row,
        backfilled_rows=status.backfilled,
    )
