"""What the client takes and returns: plain dataclasses and numpy arrays, no protobuf messages."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "Collection",
    "Document",
    "Encoding",
    "FloatEncoding",
    "Hit",
    "IndexOptions",
    "Limits",
    "ModelInfo",
    "Rejected",
    "Sync",
    "UpsertResult",
]


FloatEncoding = Literal["float32", "float16", "int8"]
"""Encodings the client decodes to float32 vectors (int8 dequantized)."""
Encoding = FloatEncoding | Literal["binary"]
"""How vectors travel (VectorEncoding); "binary" is decoded to packed sign bits, uint8 [ceil(dim / 8)]."""


@dataclass(frozen=True, slots=True)
class Document:
    text: str
    id: str = ""
    """Empty: the server derives one from the text's SHA-256, so a retried write stays one row."""
    metadata: Mapping[str, Any] | None = None
    """A JSON object stored next to the vector, usable as a search filter."""


@dataclass(frozen=True, slots=True)
class Rejected:
    """A document the store refused; the others of its call were stored."""

    index: int
    """Position in the caller's input (not in the split call that carried it)."""
    id: str
    reason: str


@dataclass(frozen=True, slots=True)
class UpsertResult:
    ids: list[str]
    """One per input document, in input order (derived ids included)."""
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    """Same id and same content hash: nothing written."""
    rejected: list[Rejected] = field(default_factory=list)
    vectors: NDArray[np.float32] | None = None
    """[n, dim], when asked for (`return_vectors`)."""


@dataclass(frozen=True, slots=True)
class Hit:
    id: str
    score: float
    """Cosine similarity in [-1, 1], exact."""
    text: str
    metadata: dict[str, Any]
    vector: NDArray[np.float32] | NDArray[np.uint8] | None = None
    """The stored vector, when the search asked for it (`include_vectors`): float32 (int8 dequantized), or
    for encoding="binary" its packed sign bits, uint8 [ceil(dim / 8)]."""


@dataclass(frozen=True, slots=True)
class IndexOptions:
    """HNSW options of a collection; 0 takes the server's default."""

    m: int = 0
    ef_construction: int = 0
    halfvec: bool = False


@dataclass(frozen=True, slots=True)
class Collection:
    name: str
    model: str
    dim: int
    metric: str
    count: int
    index: IndexOptions
    count_estimated: bool = False
    """ListCollections reads Postgres' statistics; get_collection counts exactly."""
    indexed: bool = False
    """False while a bulk load runs without the index; known from get_collection only (False in a list)."""
    index_bytes: int = 0
    table_bytes: int = 0
    storage: str = "float32"
    """How the vectors are stored: float32, float16 or binary (create_collection's `storage`)."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Request limits the client splits inputs by: the server's (ModelInfo.limits), or these defaults while a
    server does not announce them. The defaults are below every server's own defaults."""

    max_request_documents: int = 256
    max_request_bytes: int = 4 * 1024 * 1024
    max_search_k: int = 1000
    max_delete_ids: int = 10_000


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    dim: int
    max_tokens: int
    variant: str
    device: str
    pooling: str
    normalized: bool
    dimensions: list[int]
    """Smaller sizes the model was trained to be truncated to (Matryoshka), for `embed(dimensions=)`."""
    limits: Limits
    """As announced by the server, each limit it leaves unset filled from Limits' defaults."""
    prompts: dict[str, str] = field(default_factory=dict)
    """The model's prompts by name, for `embed(input_type=)`."""
    default_prompt_name: str = ""
    default: bool = True
    """Whether requests that name no model get this one."""


@dataclass(frozen=True, slots=True)
class Sync:
    """A sync (a collection kept equal to a table of a database) and its queue, as the servers see it now."""

    name: str
    source: str
    id_column: str
    text: str
    collection: str
    metadata_columns: tuple[str, ...] = ()
    where: str = ""
    database: str = "default"
    paused: bool = False
    backlog_rows: int = 0
    """Rows with a change not yet embedded (dead letters not counted)."""
    pending_changes: int = 0
    lag_seconds: float = 0.0
    """Age of the oldest pending change; 0 when caught up."""
    rows_per_second: float = 0.0
    failures_last_minute: int = 0
    dead_rows: int = 0
    last_error: str = ""
    last_error_row: str = ""
    backfilled_rows: int = 0
    """From create_sync only: the rows queued by the backfill."""
