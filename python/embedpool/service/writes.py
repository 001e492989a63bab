"""Embedding documents into a collection: ids, content hashes, the unchanged-document cache, the upsert.

Shared by every write (Embed with a collection, upserts over HTTP, Ingest streams), so all have the same
idempotency rules.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from embedpool import metrics, tracing
from embedpool.engine import ServingModel
from embedpool.errors import InvalidArgument
from embedpool.pool import EmbeddingPool, Priority
from embedpool.pool.windows import Chunking
from embedpool.service.documents import Document, Rejected, WriteOutcome
from embedpool.service.limits import Checked, renamed_text_error
from embedpool.store import DocumentRow, StaleAssumption, Store, UpsertResult


def derived_id(text: str) -> str:
    """The id of a document sent without one: retries of the same text land on the same row."""
    return hashlib.sha256(text.encode()).hexdigest()


def content_hash(model: str, text: str, canonical_metadata: str) -> bytes:
    """Everything a stored row depends on. Same hash => the stored row is already right: skip embedding and writing.
    `canonical_metadata`: the metadata's canonical JSON (as service.limits.documents returns it)."""
    return hashlib.sha256(f"{model}\x00{text}\x00{canonical_metadata}".encode()).digest()


def prompted(texts: Sequence[str], prompt: str, chunking: Chunking | None) -> tuple[Sequence[str], Chunking | None]:
    """What the pool embeds: the texts with `prompt` before each, or, chunked, the texts as they are and the
    prompt for the pool to put at the start of every window."""
    if not prompt:
        return texts, chunking
    if chunking is not None:
        return texts, dataclasses.replace(chunking, prompt=prompt)
    return [prompt + text for text in texts], None


def fitted(vectors: NDArray[np.float32], dim: int) -> NDArray[np.float32]:
    """`vectors` for a collection of `dim` (the model's, or a Matryoshka size it declares): the first `dim`
    components, normalised again."""
    if vectors.shape[-1] == dim:
        return vectors
    cut = vectors[..., :dim]
    norms = np.linalg.norm(cut, axis=-1, keepdims=True)
    out: NDArray[np.float32] = (cut / np.maximum(norms, np.float32(1e-12))).astype(np.float32, copy=False)
    return out


@dataclass(frozen=True, slots=True)
class Unembedded:
    """A document left out of embedding because the stored row had its hash when the batch was embedded."""

    index: int
    text: str
    metadata: dict[str, Any]
    content_hash: bytes


@dataclass(frozen=True)
class EmbeddedBatch:
    """A batch after embedding, before storing: what `DocumentWriter.store` needs."""

    collection: str
    ids: list[str]
    rows: list[DocumentRow]
    token_counts: list[int]  # 0 for documents not embedded
    vectors: NDArray[np.float32] | None
    assumed: dict[str, Unembedded]
    """By id: the store confirms their hashes when it writes the rows, or they are embedded then."""
    truncate: bool
    deadline: float
    wait: bool = False
    """Whether embedding waits for room in the admission budget (Ingest) or fails fast (unary calls)."""
    priority: Priority = Priority.INTERACTIVE
    chunking: Chunking | None = None
    dim: int = 0
    """The collection's: vectors are cut to it (fitted)."""
    absent: bool = False
    """None of the rows' ids was stored when their hashes were read (before embedding): the store need not
    read them again (Store.upsert)."""
    remove: tuple[str, ...] = ()
    """Ids deleted in the transaction that stores the rows (windows a longer earlier version left)."""

    @property
    def skipped_unchanged(self) -> int:
        return len(self.assumed)


class DocumentWriter:
    """Writes in two steps, so that a stream embeds its next batches while earlier ones are stored.

    Per id only the last document of a request counts. One whose stored hash is its own is not embedded, but
    that is only an assumption until the batch is stored: an earlier batch of the same stream, or another
    caller, may change the row in between. The store confirms it in the writing transaction; what changed
    is embedded then and written, so the last version sent is the one stored and `skipped_unchanged` counts
    only rows that were unchanged when the batch committed.
    """

    def __init__(self, pool: EmbeddingPool, store: Store, model: ServingModel, prompt: str = "") -> None:
        """`prompt`: put before every document's text when it is embedded (the model's document prompt)."""
        self._pool = pool
        self._store = store
        self._model = model
        self._prompt = prompt
        # A row embedded with another prompt is another vector: the prompt is part of what a row depends on.
        self._hashed_model = f"{model.name}\x00{prompt}" if prompt else model.name

    async def write(
        self,
        collection: str,
        documents: Sequence[Document],
        checked: Sequence[Checked],
        *,
        truncate: bool,
        deadline: float,
        want_vectors: bool,
        dim: int,
        wait: bool = False,
        priority: Priority = Priority.INTERACTIVE,
        chunking: Chunking | None = None,
        remove: Sequence[str] = (),
    ) -> WriteOutcome:
        """Embeds and stores `documents`; `remove`: ids deleted in the same transaction."""
        batch = await self.embed(
            collection,
            documents,
            checked,
            truncate=truncate,
            deadline=deadline,
            want_vectors=want_vectors,
            wait=wait,
            dim=dim,
            priority=priority,
            chunking=chunking,
        )
        return await self.store(dataclasses.replace(batch, remove=tuple(remove)) if remove else batch)

    async def embed(
        self,
        collection: str,
        documents: Sequence[Document],
        checked: Sequence[Checked],
        *,
        truncate: bool,
        deadline: float,
        want_vectors: bool,
        dim: int,
        wait: bool = False,
        priority: Priority = Priority.INTERACTIVE,
        chunking: Chunking | None = None,
    ) -> EmbeddedBatch:
        """`dim`: the collection's (the caller looked it up), which vectors are cut to. `checked`: each document's
        metadata as service.limits.documents normalised and encoded it. `chunking`:
        each document embedded whole, in windows pooled into one vector (pool.windows)."""
        ids = [doc.id or derived_id(doc.text) for doc in documents]
        # An id's earlier documents in the request are overwritten by its last: they need no row (nor, unless
        # vectors are asked for, an embedding).
        latest = sorted({doc_id: i for i, doc_id in enumerate(ids)}.values())
        metadata = {i: checked[i][0] for i in latest}
        # A pooled vector of a whole long text is another vector than its truncated one: the window overlap is part
        # of what the row depends on (the window cap is not: it only refuses).
        hashed = self._hashed_model if chunking is None else f"{self._hashed_model}\x00chunk:{chunking.overlap}"
        if chunking is not None and self._prompt:
            # Since the prompt starts every window (not the first only): rows embedded before are embedded again.
            hashed += "\x00prompt-per-window"
        hashes = {i: content_hash(hashed, documents[i].text, checked[i][1]) for i in latest}
        assumed: dict[str, Unembedded] = {}
        stored: dict[str, bytes] = {}
        if not want_vectors:
            stored = await self._store.existing_hashes(collection, [ids[i] for i in latest])
            for i in latest:
                if stored.get(ids[i]) == hashes[i]:
                    assumed[ids[i]] = Unembedded(i, documents[i].text, metadata[i], hashes[i])
        todo = list(range(len(documents))) if want_vectors else [i for i in latest if ids[i] not in assumed]
        absent = not want_vectors and not any(ids[i] in stored for i in todo)
        token_counts = [0] * len(documents)
        vectors: NDArray[np.float32] | None = None
        rows: list[DocumentRow] = []
        if todo:
            texts, prompted_chunking = prompted([documents[i].text for i in todo], self._prompt, chunking)
            try:
                embedded = await self._pool.embed(
                    texts,
                    truncate=truncate,
                    deadline=deadline,
                    wait=wait,
                    priority=priority,
                    chunking=prompted_chunking,
                )
            except InvalidArgument as e:  # the tokenizer's "text j" is todo[j] of the request
                raise renamed_text_error(e, lambda j: f"documents[{todo[j]}].text") from None
            for j, i in enumerate(todo):
                token_counts[i] = int(embedded.token_counts[j])
            fit = fitted(embedded.vectors, dim)
            rows = [
                DocumentRow(
                    id=ids[i],
                    text=documents[i].text,
                    metadata=metadata[i],
                    content_hash=hashes[i],
                    embedding=vector,
                    metadata_json=checked[i][1],
                )
                for i, vector in zip(todo, fit, strict=True)
                if i in metadata
            ]
            if want_vectors:
                vectors = fit
        return EmbeddedBatch(
            collection,
            ids,
            rows,
            token_counts,
            vectors,
            assumed,
            truncate,
            deadline,
            wait,
            priority,
            chunking,
            dim,
            absent,
        )

    async def store(self, batch: EmbeddedBatch) -> WriteOutcome:
        with tracing.span("store write", collection=batch.collection, documents=len(batch.rows)):
            return await self._upsert(batch)

    async def _upsert(self, batch: EmbeddedBatch) -> WriteOutcome:
        while True:
            started = time.perf_counter()
            try:
                hashes = {doc_id: doc.content_hash for doc_id, doc in batch.assumed.items()}
                result = (
                    await self._store.upsert(
                        batch.collection, batch.rows, hashes, absent=batch.absent, remove=batch.remove
                    )
                    if batch.rows or hashes or batch.remove
                    else UpsertResult()
                )
                break
            except StaleAssumption as stale:
                batch = await self._embed_assumed(batch, stale.ids)
            finally:
                metrics.STORE_SECONDS.observe(time.perf_counter() - started)
        for outcome, count in (
            ("inserted", result.inserted),
            ("updated", result.updated),
            ("unchanged", result.unchanged),
            ("rejected", len(result.rejected)),
        ):
            metrics.STORED_DOCUMENTS.labels(outcome).inc(count)
        first_index = {doc_id: i for i, doc_id in reversed(list(enumerate(batch.ids)))}
        rejected = [
            Rejected(index=first_index.get(doc_id, 0), id=doc_id, reason=reason) for doc_id, reason in result.rejected
        ]
        return WriteOutcome(
            batch.ids,
            batch.token_counts,
            batch.vectors,
            result,
            batch.skipped_unchanged,
            rejected,
            f"{self._model.name}/{self._model.variant}",
            batch.dim,
        )

    async def _embed_assumed(self, batch: EmbeddedBatch, ids: Sequence[str]) -> EmbeddedBatch:
        """`batch` with the documents of `ids` embedded after all: their rows changed since they were checked."""
        docs = [batch.assumed[doc_id] for doc_id in ids]
        texts, chunking = prompted([d.text for d in docs], self._prompt, batch.chunking)
        embedded = await self._pool.embed(
            texts,
            truncate=batch.truncate,
            deadline=batch.deadline,
            wait=batch.wait,
            priority=batch.priority,
            chunking=chunking,
        )
        token_counts = list(batch.token_counts)
        for doc, count in zip(docs, embedded.token_counts, strict=True):
            token_counts[doc.index] = int(count)
        fit = fitted(embedded.vectors, batch.dim)
        rows = [
            DocumentRow(id=doc_id, text=d.text, metadata=d.metadata, content_hash=d.content_hash, embedding=vector)
            for doc_id, d, vector in zip(ids, docs, fit, strict=True)
        ]
        embedded_now = set(ids)
        assumed = {doc_id: d for doc_id, d in batch.assumed.items() if doc_id not in embedded_now}
        # Their rows are stored (changed since): the batch is no longer one of absent ids.
        return dataclasses.replace(
            batch, rows=[*batch.rows, *rows], token_counts=token_counts, assumed=assumed, absent=False
        )
