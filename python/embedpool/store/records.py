"""The values the store takes and returns."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from embedpool.errors import InvalidArgument

__all__ = ["CollectionInfo", "CollectionStats", "DocumentRow", "Hit", "HnswOptions", "UpsertResult"]


@dataclass(frozen=True, slots=True)
class HnswOptions:
    """How a collection's HNSW graph is built (pgvector's `m` and `ef_construction`).

    The defaults are pgvector's, kept after measuring 100k x 384 low-rank data (bench/search.py --builds):
    ef_construction 128 took 2.2x the build time for the same recall@10 (0.996) at ef_search 40; a larger
    m makes a bigger graph and slower searches. Raise them for collections whose recall needs it.
    """

    m: int = 16
    ef_construction: int = 64
    halfvec: bool = False
    """Index half-precision copies of the vectors (embedding::halfvec): half the index size, so twice the rows
    fit in memory; searches rerank the index's candidates exactly against the stored float32 vectors."""

    def __post_init__(self) -> None:
        # pgvector's own bounds, checked here so a bad value is the caller's InvalidArgument, not a CHECK error.
        for name, value, low, high in (("m", self.m, 2, 100), ("ef_construction", self.ef_construction, 4, 1000)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise InvalidArgument(f"hnsw {name} must be an integer in {low}..{high}, got {value!r}")
        if self.ef_construction < 2 * self.m:
            raise InvalidArgument(f"hnsw ef_construction ({self.ef_construction}) must be at least 2 * m ({self.m})")
        if not isinstance(self.halfvec, bool):
            raise InvalidArgument(f"hnsw halfvec must be a bool, got {self.halfvec!r}")


@dataclass(frozen=True, slots=True)
class CollectionInfo:
    id: int
    name: str
    model: str
    dim: int
    metric: str
    created_at: dt.datetime
    hnsw_m: int = 16
    hnsw_ef_construction: int = 64
    hnsw_halfvec: bool = False
    storage: str = "float32"
    """How the vectors are stored: float32, float16 or binary (see store.storage)."""
    count: int | None = None
    """Documents stored: exact from get_collection, estimated from list_collections, None where not counted."""
    count_estimated: bool = False

    @property
    def hnsw(self) -> HnswOptions:
        return HnswOptions(self.hnsw_m, self.hnsw_ef_construction, self.hnsw_halfvec)


@dataclass(frozen=True, slots=True)
class DocumentRow:
    id: str
    text: str
    metadata: dict[str, Any]
    content_hash: bytes
    """Digest of everything that is stored for the row: a re-upsert with the same hash writes nothing."""
    embedding: NDArray[np.float32]
    metadata_json: str | None = None
    """`metadata` as JSON text where the caller has it (the service encodes it for the hash): stored as it is,
    so it must be a JSON object that jsonb takes (service.limits.json_object's canonical form is)."""


@dataclass(frozen=True, slots=True)
class UpsertResult:
    """Counts are over distinct ids: of two rows with one id in a batch, the later one is stored."""

    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)
    """(id, reason) of each row that failed validation and was not stored."""


@dataclass(frozen=True, slots=True)
class Hit:
    id: str
    text: str
    metadata: dict[str, Any]
    embedding: NDArray[np.float32]
    distance: float
    """Exact distance to the query in the collection's metric (cosine: 1 - cosine similarity), computed on the
    stored float32 vector."""


@dataclass(frozen=True, slots=True)
class CollectionStats:
    count: int
    index_bytes: int
    """Size of the collection's HNSW index."""
    table_bytes: int
    """Size of the collection's partition: heap, TOAST and primary key."""
    indexed: bool = True
    """False while a bulk load runs without the HNSW index (searches are exact scans meanwhile)."""
