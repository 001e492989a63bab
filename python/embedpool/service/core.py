"""The service core: every operation embedpool offers, with no transport types. Each door (gRPC in
embedpool.server, HTTP in embedpool.http) parses its request into these calls and maps what they raise through
embedpool.status; the security gate (service.gate) has authorized the call and qualified its collection name
before it gets here, and the caller's usage is metered here (security.usage.meter)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np
from numpy.typing import NDArray

from embedpool import tracing
from embedpool.errors import DeadlineExceeded, InvalidArgument, Overloaded, Unavailable
from embedpool.pool import Embeddings, Priority
from embedpool.pool.windows import Chunking
from embedpool.security import keyring
from embedpool.security.principal import current as current_principal
from embedpool.security.usage import meter
from embedpool.service import limits as check
from embedpool.service import passages
from embedpool.service.documents import Document, Embedded, Hit, WriteOutcome
from embedpool.service.ingest import run_ingest
from embedpool.service.limits import Limits
from embedpool.service.models import QUERY, Models, ServedModel
from embedpool.service.query_cache import CachedQuery, Flight, QueryCache, QueryKey
from embedpool.service.writes import EmbeddedBatch, fitted, prompted
from embedpool.store import CollectionInfo, CollectionStats, HnswOptions, Store
from embedpool.store.keys import KeyRecord

__all__ = ["EmbeddingService", "IngestBatch"]

PARENT_FETCH = 8
"""Search with best_window_per_parent fetches this many times k hits to group: enough unless one document's
windows fill the nearest k * 8."""


@dataclass(frozen=True, slots=True)
class IngestBatch:
    """One batch of an ingest stream, as a door read it."""

    documents: Sequence[Document]
    collection: str = ""
    """"": the stream's collection (the first batch must name it)."""
    truncate: bool = True
    bulk: bool = False
    """On the first batch: an empty collection is loaded without its HNSW index, built when the stream ends."""
    tag: object = None
    """The door's own (e.g. the gRPC batch id), for its acknowledgement."""
    model: str = ""
    """On the first batch: the model the request names ("": the collection's)."""
    chunking: Chunking | None = None
    """Long inputs embedded whole, in windows pooled into one vector (pool.windows)."""


def _meter_write(outcome: WriteOutcome) -> None:
    usage = meter()
    usage.tokens += sum(outcome.token_counts)
    usage.documents += outcome.upsert.inserted + outcome.upsert.updated


def _by_size(documents: Sequence[object]) -> Priority:
    return Priority.INTERACTIVE if len(documents) <= check.INTERACTIVE_DOCUMENTS else Priority.BULK


def _normalized(vectors: NDArray[np.float32]) -> NDArray[np.float32]:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    out: NDArray[np.float32] = (vectors / np.maximum(norms, np.float32(1e-12))).astype(np.float32, copy=False)
    return out


class EmbeddingService:
    def __init__(self, models: Models, store: Store, limits: Limits, *, query_cache_bytes: int = 0) -> None:
        """`models`: each with its own pool; the first is the default for requests that name none."""
        self._models = models
        self._store = store
        self._limits = limits
        self._queries = QueryCache(query_cache_bytes)
        self._ingest_streams = 0
        self._draining = anyio.Event()

    @property
    def models(self) -> Models:
        return self._models

    @property
    def model(self) -> ServedModel:
        """The default model."""
        return self._models.default

    @property
    def limits(self) -> Limits:
        return self._limits

    def drain(self) -> None:
        """The server is stopping: ingest streams finish the batches they read and end with Unavailable, so
        their clients resume elsewhere now instead of being cut off when the grace period ends."""
        self._draining.set()

    # Embedding

    @staticmethod
    def dimensions(served: ServedModel, requested: int | None, field: str = "dimensions") -> int:
        """The vector size to return: the model's, or a Matryoshka size it was trained for."""
        model = served.model
        full = model.dim
        if requested is None or requested == full:
            return full
        if requested in model.dimensions:
            return requested
        sizes = ", ".join(map(str, sorted({full, *model.dimensions}, reverse=True)))
        if not model.dimensions:
            raise InvalidArgument(
                f"{field}: {model.name} is not trained for truncated (Matryoshka) vectors; it returns {full}"
            )
        raise InvalidArgument(f"{field}: {model.name} returns {sizes} dimensions, not {requested}")

    async def embed(
        self,
        texts: Sequence[str],
        *,
        truncate: bool = True,
        deadline: float = math.inf,
        dimensions: int | None = None,
        field: str = "documents",
        model: str | None = None,
        input_type: str | None = None,
        chunking: Chunking | None = None,
    ) -> Embedded:
        """`field`: what the caller's door calls the texts, for error messages. `model`: a served model's name
        (None: the default); `input_type`: query, document or one of the model's prompt names, whose prompt is
        put before each text (None: the model's default prompt, if it has one). A call of a few texts is served
        from the query cache where it can: token_counts report every text's tokens, cached or not, while the
        caller's usage (and tokens/s quota) counts only the tokens embedded now. `chunking`: each text embedded
        whole in windows of the model's length, pooled into one vector (pool.windows; the prompt, if any, starts
        every window); never from the query cache."""
        check.texts(texts, self._limits, field)
        served = self._models.named(model)
        size = self.dimensions(served, dimensions)
        prompt = served.prompt(input_type)
        suffix = ".text" if field == "documents" else ""
        if chunking is not None:
            check.window_overlap(chunking, served.model.max_tokens)
            whole = await self._embed_now(
                served, texts, True, deadline, lambda i: f"{field}[{i}]{suffix}", prompt, chunking
            )
            vectors = whole.vectors if size == served.model.dim else _normalized(whole.vectors[:, :size])
            windows = None if whole.window_counts is None else whole.window_counts.tolist()
            return Embedded(vectors, whole.token_counts.tolist(), served.label, windows)
        vectors, counts = await self._embedded(
            served, texts, truncate, deadline, lambda i: f"{field}[{i}]{suffix}", prompt
        )
        vectors = vectors if size == served.model.dim else _normalized(vectors[:, :size])
        return Embedded(vectors, counts, served.label)

    async def _embedded(
        self,
        served: ServedModel,
        texts: Sequence[str],
        truncate: bool,
        deadline: float,
        name: Callable[[int], str],
        prompt: str = "",
    ) -> tuple[NDArray[np.float32], list[int]]:
        """Full-size vectors and token counts of `texts`, from the query cache when the call is query-sized (only
        the texts it lacks are embedded, in one pool call, and those another call is embedding now are waited
        for). `name(i)`: how the caller calls text i. `prompt` goes before each text (the token counts include it).
        """
        if not self._queries.serves(texts):
            embedded = await self._embed_now(served, texts, truncate, deadline, name, prompt)
            return embedded.vectors, embedded.token_counts.tolist()
        keys = [QueryCache.key(served.label, truncate, text, prompt) for text in texts]
        found = [self._queries.get(key) if key is not None else None for key in keys]
        vectors = np.empty((len(texts), served.model.dim), dtype=np.float32)
        counts = [0] * len(texts)
        # A missing text another call is embedding now is waited for, not embedded again (query_cache.Flight).
        mine: list[int] = []
        led: dict[int, Flight] = {}
        joined: list[tuple[int, Flight]] = []
        for i, entry in enumerate(found):
            if entry is not None:
                vectors[i], counts[i] = entry.vector, entry.tokens
            elif (key := keys[i]) is None:
                mine.append(i)
            else:
                flight, leading = self._queries.flight(key)
                if leading:
                    mine.append(i)
                    led[i] = flight
                else:
                    joined.append((i, flight))  # a text twice in this call: its second waits on its first
        try:
            await self._embed_missing(served, texts, mine, keys, vectors, counts, truncate, deadline, name, prompt, led)
        finally:
            for flight in led.values():
                if not flight.done.is_set():  # failed or cancelled: whoever waits embeds the text itself
                    self._queries.land(flight, None)
        again: list[int] = []
        for i, flight in joined:
            try:
                with anyio.fail_after(max(0.0, deadline - anyio.current_time())):
                    await flight.done.wait()
            except TimeoutError as exc:
                raise DeadlineExceeded("deadline passed waiting for a query's embedding") from exc
            if flight.entry is None:
                again.append(i)
            else:
                vectors[i], counts[i] = flight.entry.vector, flight.entry.tokens
        await self._embed_missing(served, texts, again, keys, vectors, counts, truncate, deadline, name, prompt, {})
        return vectors, counts

    async def _embed_missing(
        self,
        served: ServedModel,
        texts: Sequence[str],
        missing: list[int],
        keys: list[QueryKey | None],
        vectors: NDArray[np.float32],
        counts: list[int],
        truncate: bool,
        deadline: float,
        name: Callable[[int], str],
        prompt: str,
        led: Mapping[int, Flight],
    ) -> None:
        """Texts `missing` embedded in one pool call into `vectors` and `counts`, kept in the cache, and the
        flights this call `led` landed with them."""
        if not missing:
            return
        embedded = await self._embed_now(
            served, [texts[i] for i in missing], truncate, deadline, lambda j: name(missing[j]), prompt
        )
        fresh, fresh_counts = embedded.vectors, embedded.token_counts.tolist()
        for j, i in enumerate(missing):
            vectors[i], counts[i] = fresh[j], fresh_counts[j]
            if (key := keys[i]) is not None:
                self._queries.put(key, fresh[j], fresh_counts[j])
                if (flight := led.get(i)) is not None:
                    self._queries.land(flight, CachedQuery(fresh[j], fresh_counts[j]))

    async def _embed_now(
        self,
        served: ServedModel,
        texts: Sequence[str],
        truncate: bool,
        deadline: float,
        name: Callable[[int], str],
        prompt: str,
        chunking: Chunking | None = None,
    ) -> Embeddings:
        inputs, chunking = prompted(texts, prompt, chunking)
        try:
            embedded = await served.pool.embed(
                inputs, truncate=truncate, deadline=deadline, priority=_by_size(texts), chunking=chunking
            )
        except InvalidArgument as e:  # the tokenizer's, naming "text i": name it as the caller does
            raise check.renamed_text_error(e, name) from None
        meter().tokens += int(embedded.token_counts.sum())
        return embedded

    async def write(
        self,
        collection: str,
        documents: Sequence[Document],
        *,
        truncate: bool = True,
        deadline: float = math.inf,
        want_vectors: bool = False,
        priority: Priority | None = None,
        wait: bool = False,
        model: str | None = None,
        dimensions: int | None = None,
        chunking: Chunking | None = None,
        store_windows: bool = False,
    ) -> WriteOutcome:
        """Embeds `documents` and upserts them into `collection` (idempotent: see service.writes). `priority`:
        by default interactive for a call of up to limits.INTERACTIVE_DOCUMENTS documents, bulk above; `wait`:
        wait for room in the admission budget (until `deadline`) instead of failing with Overloaded (a background
        writer, as Ingest does). The documents are embedded with the collection's model and its document
        prompt; `model`, if given, must name that model. `chunking`: as for `embed`, one pooled vector a document;
        with `store_windows`, each window stored as a row of its own instead (service.passages; the outcome's ids,
        token counts and vectors are then the windows')."""
        check.collection_name(collection)
        checked = check.documents(documents, self._limits)
        info, served = await self._writable(collection, model)
        if dimensions is not None and dimensions != info.dim:
            raise InvalidArgument(
                "dimensions: a collection holds vectors of the dim it was created with; leave dimensions unset"
            )
        if chunking is not None:
            check.window_overlap(chunking, served.model.max_tokens)
        if store_windows:
            return await self._write_windows(
                collection, info.dim, documents, served, chunking, deadline, want_vectors, wait, priority
            )
        outcome = await served.writer.write(
            collection,
            documents,
            checked,
            truncate=truncate,
            deadline=deadline,
            want_vectors=want_vectors,
            dim=info.dim,
            wait=wait,
            priority=priority or _by_size(documents),
            chunking=chunking,
        )
        _meter_write(outcome)
        return outcome

    async def _write_windows(
        self,
        collection: str,
        dim: int,
        documents: Sequence[Document],
        served: ServedModel,
        chunking: Chunking | None,
        deadline: float,
        want_vectors: bool,
        wait: bool,
        priority: Priority | None,
    ) -> WriteOutcome:
        """The documents' windows upserted as rows of their own, and the windows their earlier, longer versions
        left removed in the same transaction."""
        splitter = served.pool.splitter
        if chunking is None:
            raise InvalidArgument("store_windows: needs long_inputs chunk")
        if splitter is None or splitter.char_offsets is None:
            raise InvalidArgument(f"store_windows: {served.model.name} cannot split texts into passages")
        windows, counts = await anyio.to_thread.run_sync(
            lambda: passages.windows_as_documents(documents, splitter, chunking)
        )
        outcome = await served.writer.write(
            collection,
            windows,
            check.documents(windows, self._limits, "windows", count=False),
            truncate=True,
            deadline=deadline,
            want_vectors=want_vectors,
            dim=dim,
            wait=wait,
            priority=priority or _by_size(windows),
            remove=passages.stale_window_ids(counts, self._limits.max_windows_per_request),
        )
        _meter_write(outcome)
        return outcome

    async def ingest(
        self,
        batches: AsyncIterator[IngestBatch],
        ack: Callable[[IngestBatch, WriteOutcome], Awaitable[None]],
        *,
        deadline: float = math.inf,
    ) -> None:
        """A stream of batches into one collection: embedded ahead, stored concurrently, `ack`ed in order (see
        service.ingest)."""
        if self._ingest_streams >= self._limits.max_ingest_streams:
            raise Overloaded(f"{self._ingest_streams} Ingest streams are open, the limit; retry later")
        self._ingest_streams += 1
        try:
            await self._ingest(batches, ack, deadline)
        finally:
            self._ingest_streams -= 1

    async def _ingest(
        self,
        batches: AsyncIterator[IngestBatch],
        ack: Callable[[IngestBatch, WriteOutcome], Awaitable[None]],
        deadline: float,
    ) -> None:
        first = await anext(aiter(batches), None)
        if first is None:
            return
        if not first.collection:
            raise InvalidArgument("collection: the first batch must name the collection")
        collection = check.collection_name(first.collection)
        info, served = await self._writable(collection, first.model)

        async def stream() -> AsyncIterator[IngestBatch]:
            yield first
            async for batch in batches:
                yield batch

        async def checked(batch: IngestBatch) -> list[check.Checked]:
            if batch.collection and batch.collection != collection:
                raise InvalidArgument(f"collection: stream is for {collection!r}, batch names {batch.collection!r}")
            documents = check.documents(batch.documents, self._limits)
            if batch.chunking is not None:
                check.window_overlap(batch.chunking, served.model.max_tokens)
            await self._writable(collection)  # it may have been dropped since
            return documents

        async def embed(batch: IngestBatch, documents: list[check.Checked]) -> EmbeddedBatch:
            return await served.writer.embed(
                collection,
                batch.documents,
                documents,
                truncate=batch.truncate,
                deadline=deadline,
                want_vectors=False,
                dim=info.dim,
                wait=True,
                priority=Priority.BULK,
                chunking=batch.chunking,
            )

        async def acknowledge(batch: IngestBatch, outcome: WriteOutcome) -> None:
            _meter_write(outcome)
            await ack(batch, outcome)

        loading = self._store.bulk_load(collection) if first.bulk else contextlib.nullcontext()
        async with loading:
            stopped = await run_ingest(
                stream(),
                checked,
                embed,
                served.writer.store,
                acknowledge,
                window=self._limits.ingest_window,
                stores=self._limits.ingest_stores,
                stop=self._draining,
            )
        if stopped:
            raise Unavailable("the server is shutting down: resend from the batch after the last acknowledged one")

    # Search

    async def search(
        self,
        collection: str,
        *,
        text: str | None = None,
        vector: NDArray[np.floating[Any]] | None = None,
        k: int,
        candidates: int | None = None,
        filter: Mapping[str, Any] | None = None,
        min_score: float | None = None,
        include_vectors: bool = False,
        deadline: float = math.inf,
        model: str | None = None,
        input_type: str | None = QUERY,
        best_window_per_parent: bool = False,
    ) -> list[Hit]:
        """A text query is embedded with the collection's model and its query prompt (`input_type`); `model`,
        if given, must name the collection's model. `best_window_per_parent`: of the windows of one document
        (service.passages), only the best hit, among PARENT_FETCH times k hits fetched."""
        if (text is None) == (vector is None):
            raise InvalidArgument("query: set either text or vector")
        check.collection_name(collection)
        check.search(query=text, k=k, candidates=candidates, min_score=min_score, filter=filter, limits=self._limits)
        info, served = await self._writable(collection, model)
        meter().searches += 1
        if text is not None:
            prompt = served.prompt(input_type)
            embedded, _ = await self._embedded(served, [text], True, deadline, lambda _: "text", prompt)
            query: NDArray[np.float32] = fitted(embedded[0], info.dim)
        else:
            assert vector is not None
            query = self._query_vector(vector, info.dim)
        with tracing.span("search", collection=collection, k=k, candidates=candidates or 0):
            fetch = min(k * PARENT_FETCH, self._limits.max_search_k) if best_window_per_parent else k
            found = await self._store.search(
                collection,
                query,
                k=fetch,
                candidates=max(candidates or 0, fetch) if best_window_per_parent else candidates or None,
                filter=dict(filter) if filter else None,
            )
        hits = []
        for hit in found:
            score = 1.0 - hit.distance  # the collection's metric is cosine (`_writable`)
            if min_score is not None and score < min_score:
                break
            hits.append(Hit(hit.id, score, hit.text, hit.metadata, hit.embedding if include_vectors else None))
        return passages.best_per_parent(hits, k) if best_window_per_parent else hits

    @staticmethod
    def _query_vector(vector: NDArray[np.floating[Any]], dim: int) -> NDArray[np.float32]:
        """Unit length, normalised in float64: a float32 norm overflows for components of 1.9e19 and vanishes
        for tiny ones, though their direction is well defined."""
        if vector.shape != (dim,):
            raise InvalidArgument(f"vector: expected {dim} float32 values, got {vector.size}")
        values = vector.astype(np.float64)
        if not np.isfinite(values).all():
            raise InvalidArgument("vector: contains NaN or infinity")
        scale = float(np.abs(values).max())
        if scale == 0.0:
            raise InvalidArgument("vector: must not be all zeros")
        values /= scale  # then the norm cannot overflow
        normalized: NDArray[np.float32] = (values / np.linalg.norm(values)).astype(np.float32)
        return normalized

    async def _writable(self, name: str, model: str | None = None) -> tuple[CollectionInfo, ServedModel]:
        """The collection and the served model its vectors were made with (cosine, same model and dim); a
        `model` the request names must be that one."""
        collection = await self._store.collection(name)
        if collection.metric != "cosine":
            raise InvalidArgument(f"collection {name!r} uses the {collection.metric} metric; Search scores are cosine")
        return collection, self._models.of_collection(collection, model)

    # Collections

    async def create_collection(
        self,
        name: str,
        index: HnswOptions | None = None,
        *,
        storage: str = "float32",
        dimensions: int | None = None,
        model: str | None = None,
    ) -> CollectionInfo:
        """A collection bound to `model` (None: the default): its writes and text searches use that model.
        `storage`: float32, float16 or binary (store.storage); `dimensions`: a Matryoshka size the model
        declares, for vectors cut to it and normalised again (None: the model's)."""
        check.collection_name(name, "name")
        served = self._models.named(model)
        dim = self.dimensions(served, dimensions)
        return await self._store.create_collection(
            name, model=served.name, dim=dim, hnsw=index or HnswOptions(), storage=check.storage(storage)
        )

    async def list_collections(self) -> list[CollectionInfo]:
        return await self._store.list_collections()

    async def get_collection(self, name: str) -> tuple[CollectionInfo, CollectionStats]:
        check.collection_name(name, "name")
        return await self._store.collection(name), await self._store.stats(name)

    async def drop_collection(self, name: str) -> None:
        check.collection_name(name, "name")
        await self._store.drop_collection(name)

    async def delete(self, collection: str, *, ids: Sequence[str] = (), filter: Mapping[str, Any] | None = None) -> int:
        check.collection_name(collection)
        check.delete(ids, filter, self._limits)
        if ids:
            deleted = await self._store.delete(collection, list(ids))
        else:
            assert filter
            deleted = await self._store.delete_where(collection, dict(filter))
        meter().documents += deleted
        return deleted

    # API keys, within the caller's tenant (the gate has checked that it may: Action.MANAGE_KEYS)

    async def create_key(
        self,
        *,
        role: str,
        collections: str = "*",
        tokens_per_s: float | None = None,
        docs_per_s: float | None = None,
        note: str = "",
    ) -> tuple[str, KeyRecord]:
        return await keyring.create_key(
            self._store,
            tenant=current_principal().tenant,
            role=role,
            collections=collections or "*",
            tokens_per_s=tokens_per_s,
            docs_per_s=docs_per_s,
            note=note,
        )

    async def list_keys(self) -> list[KeyRecord]:
        return await keyring.list_keys(self._store, current_principal().tenant)

    async def revoke_key(self, key_id: str) -> KeyRecord:
        return await keyring.revoke_key(self._store, key_id, current_principal().tenant)
