"""Embedding documents into a collection: ids, content hashes, the unchanged-document cache, the upsert.

Shared by Embed (with a collection) and Ingest, so both have the same idempotency rules.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from embedpool import metrics
from embedpool.engine import ServingModel
from embedpool.pool import EmbeddingPool
from embedpool.server.codec import struct_to_dict
from embedpool.store import DocumentRow, Store, UpsertResult
from embedpool.v1 import embedpool_pb2 as pb


def derived_id(text: str) -> str:
    """The id of a document sent without one: retries of the same text land on the same row."""
    return hashlib.sha256(text.encode()).hexdigest()


def content_hash(model: str, text: str, metadata: dict[str, Any]) -> bytes:
    """Everything a stored row depends on. Same hash => the stored row is already right: skip embedding and writing."""
    canonical = json.dumps(metadata, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{model}\x00{text}\x00{canonical}".encode()).digest()


@dataclass(frozen=True)
class WriteOutcome:
    ids: list[str]
    token_counts: list[int]  # 0 for documents skipped as unchanged
    vectors: NDArray[np.float32] | None  # [n, dim] when asked for
    upsert: UpsertResult
    skipped_unchanged: int
    rejected: list[pb.RejectedDocument] = field(default_factory=list)


@dataclass(frozen=True)
class EmbeddedBatch:
    """A batch after embedding, before storing: what `DocumentWriter.store` needs."""

    collection: str
    ids: list[str]
    rows: list[DocumentRow]
    token_counts: list[int]  # 0 for documents skipped as unchanged
    vectors: NDArray[np.float32] | None
    skipped_unchanged: int


class DocumentWriter:
    """Writes in two steps, so that a stream embeds its next batches while earlier ones are stored."""

    def __init__(self, pool: EmbeddingPool, store: Store, model: ServingModel) -> None:
        self._pool = pool
        self._store = store
        self._model = model

    async def write(
        self,
        collection: str,
        documents: Sequence[pb.Document],
        *,
        truncate: bool,
        deadline: float,
        want_vectors: bool,
    ) -> WriteOutcome:
        batch = await self.embed(collection, documents, truncate=truncate, deadline=deadline, want_vectors=want_vectors)
        return await self.store(batch)

    async def embed(
        self,
        collection: str,
        documents: Sequence[pb.Document],
        *,
        truncate: bool,
        deadline: float,
        want_vectors: bool,
    ) -> EmbeddedBatch:
        ids = [doc.id or derived_id(doc.text) for doc in documents]
        metadata = [struct_to_dict(doc.metadata) for doc in documents]
        hashes = [content_hash(self._model.name, d.text, m) for d, m in zip(documents, metadata, strict=True)]
        # Vectors asked for means every document is embedded; otherwise unchanged ones are not embedded again.
        todo = list(range(len(documents)))
        if not want_vectors:
            stored = await self._store.existing_hashes(collection, ids)
            todo = [i for i in todo if stored.get(ids[i]) != hashes[i]]
        token_counts = [0] * len(documents)
        vectors: NDArray[np.float32] | None = None
        rows: list[DocumentRow] = []
        if todo:
            embedded = await self._pool.embed([documents[i].text for i in todo], truncate=truncate, deadline=deadline)
            for j, i in enumerate(todo):
                token_counts[i] = int(embedded.token_counts[j])
            rows = [
                DocumentRow(
                    id=ids[i],
                    text=documents[i].text,
                    metadata=metadata[i],
                    content_hash=hashes[i],
                    embedding=embedded.vectors[j],
                )
                for j, i in enumerate(todo)
            ]
            if want_vectors:
                vectors = embedded.vectors
        return EmbeddedBatch(collection, ids, rows, token_counts, vectors, len(documents) - len(todo))

    async def store(self, batch: EmbeddedBatch) -> WriteOutcome:
        started = time.perf_counter()
        result = await self._store.upsert(batch.collection, batch.rows) if batch.rows else UpsertResult()
        metrics.STORE_SECONDS.observe(time.perf_counter() - started)
        if batch.skipped_unchanged:
            unchanged = result.unchanged + batch.skipped_unchanged
            result = UpsertResult(result.inserted, result.updated, unchanged, result.rejected)
        for outcome, count in (
            ("inserted", result.inserted),
            ("updated", result.updated),
            ("unchanged", result.unchanged),
            ("rejected", len(result.rejected)),
        ):
            metrics.STORED_DOCUMENTS.labels(outcome).inc(count)
        first_index = {doc_id: i for i, doc_id in reversed(list(enumerate(batch.ids)))}
        rejected = [
            pb.RejectedDocument(index=first_index.get(doc_id, 0), id=doc_id, reason=reason)
            for doc_id, reason in result.rejected
        ]
        return WriteOutcome(batch.ids, batch.token_counts, batch.vectors, result, batch.skipped_unchanged, rejected)
