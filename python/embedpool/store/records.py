"""The values the store takes and returns."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["Candidate", "CollectionInfo", "CollectionStats", "DocumentRow", "UpsertResult"]


@dataclass(frozen=True, slots=True)
class CollectionInfo:
    id: int
    name: str
    model: str
    dim: int
    metric: str
    created_at: dt.datetime
    count: int | None = None
    """Documents stored; filled by list_collections (and get_collection), None where not counted."""


@dataclass(frozen=True, slots=True)
class DocumentRow:
    id: str
    text: str
    metadata: dict[str, Any]
    content_hash: bytes
    """Digest of everything that is stored for the row: a re-upsert with the same hash writes nothing."""
    embedding: NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class UpsertResult:
    """Counts are over distinct ids: of two rows with one id in a batch, the later one is stored."""

    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)
    """(id, reason) of each row that failed validation and was not stored."""


@dataclass(frozen=True, slots=True)
class Candidate:
    id: str
    text: str
    metadata: dict[str, Any]
    embedding: NDArray[np.float32]
    distance: float
    """Approximate-search distance in the collection's metric (cosine: 1 - cosine similarity)."""


@dataclass(frozen=True, slots=True)
class CollectionStats:
    count: int
    index_bytes: int
    """Size of the collection's HNSW index."""
    table_bytes: int
    """Size of the collection's partition: heap, TOAST and primary key."""
    indexed: bool = True
    """False while a bulk load runs without the HNSW index (searches are exact scans meanwhile)."""
