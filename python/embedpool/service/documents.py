"""The core's values: what doors pass in and get back, with no transport types."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from embedpool.store import UpsertResult


@dataclass(frozen=True, slots=True)
class Document:
    text: str
    id: str = ""
    """Empty: derived from the text (service.writes.derived_id), so retries of a text land on one row."""
    metadata: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Rejected:
    """A document the store refused; the others of its request were stored."""

    index: int
    id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Embedded:
    vectors: NDArray[np.float32]
    """[n, dim], L2-normalised (after Matryoshka truncation, when asked for)."""
    token_counts: list[int]
    model: str = ""
    """name/variant of the model that made them."""
    window_counts: list[int] | None = None
    """With long_inputs chunk: the windows each text was embedded in (token_counts are then the whole texts')."""


@dataclass(frozen=True)
class WriteOutcome:
    ids: list[str]
    token_counts: list[int]  # 0 for documents skipped as unchanged
    vectors: NDArray[np.float32] | None  # [n, dim] when asked for
    upsert: UpsertResult
    skipped_unchanged: int
    rejected: list[Rejected] = field(default_factory=list)
    model: str = ""
    """name/variant of the collection's model."""
    dim: int = 0
    """Its vectors' dimension."""


@dataclass(frozen=True, slots=True)
class Hit:
    id: str
    score: float
    """Cosine similarity, exact."""
    text: str
    metadata: dict[str, Any]
    vector: NDArray[np.float32] | None
