"""The embedpool.v1.Embedder servicer: validates, then delegates to the pool (vectors) and the store (rows)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator
from typing import Any

import anyio
import grpc.aio
import numpy as np
from numpy.typing import NDArray

from embedpool.engine import ServingModel
from embedpool.errors import InvalidArgument, Overloaded, Unavailable
from embedpool.pool import EmbeddingPool
from embedpool.security import keyring
from embedpool.security.principal import current as current_principal
from embedpool.security.usage import meter
from embedpool.server import validation
from embedpool.server.codec import (
    collection_message,
    dict_to_struct,
    index_options,
    key_message,
    pack_vectors,
    struct_to_dict,
    unpack_vector,
    upsert_stats,
)
from embedpool.server.ingest_stream import run_ingest
from embedpool.server.rpc import rpc
from embedpool.server.writes import DocumentWriter, EmbeddedBatch, WriteOutcome
from embedpool.store import CollectionInfo, Store
from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc

Context = grpc.aio.ServicerContext[Any, Any]


def _deadline(context: Context) -> float:
    remaining = context.time_remaining()
    return math.inf if remaining is None else anyio.current_time() + remaining


def _own_tenant() -> str:
    """Keys are managed within the caller's tenant (server.auth has checked that it may: Action.MANAGE_KEYS)."""
    return current_principal().tenant


def _meter_write(outcome: WriteOutcome) -> None:
    usage = meter()
    usage.tokens += sum(outcome.token_counts)
    usage.documents += outcome.upsert.inserted + outcome.upsert.updated


class EmbedderServicer(pb_grpc.EmbedderServicer):
    def __init__(self, pool: EmbeddingPool, store: Store, model: ServingModel, limits: validation.Limits) -> None:
        self._pool = pool
        self._store = store
        self._model = model
        self._limits = limits
        self._window, self._stores = limits.ingest_window, limits.ingest_stores
        self._writer = DocumentWriter(pool, store, model)
        self._ingest_streams = 0
        self._draining = anyio.Event()

    def drain(self) -> None:
        """The server is stopping: Ingest streams finish the batches they read and end with UNAVAILABLE, so
        their clients resume elsewhere now instead of being cut off when the grace period ends."""
        self._draining.set()

    @rpc
    async def Embed(self, request: pb.EmbedRequest, context: Context) -> pb.EmbedResponse:
        validation.embed_request(request, self._limits)
        truncate = request.truncate if request.HasField("truncate") else True
        texts = [doc.text for doc in request.documents]
        if not request.collection:
            embedded = await self._pool.embed(texts, truncate=truncate, deadline=_deadline(context))
            meter().tokens += int(embedded.token_counts.sum())
            return pb.EmbedResponse(
                dim=self._model.dim,
                vectors=[] if request.skip_vectors else pack_vectors(embedded.vectors),
                token_counts=embedded.token_counts.tolist(),
                model=self._model_label,
            )
        await self._check_collection(request.collection)
        outcome = await self._writer.write(
            request.collection,
            request.documents,
            truncate=truncate,
            deadline=_deadline(context),
            want_vectors=not request.skip_vectors,
        )
        _meter_write(outcome)
        return pb.EmbedResponse(
            dim=self._model.dim,
            vectors=pack_vectors(outcome.vectors) if outcome.vectors is not None else [],
            ids=outcome.ids,
            token_counts=outcome.token_counts,
            upsert=upsert_stats(outcome.upsert),
            model=self._model_label,
            rejected=outcome.rejected,
        )

    @rpc
    async def Ingest(  # type: ignore[override]  # grpc.aio streams replies with context.write as well as yield
        self, request_iterator: AsyncIterator[pb.IngestRequest], context: Context
    ) -> None:
        """Embeds ahead, stores concurrently, acknowledges in order: see embedpool.server.ingest_stream."""
        if self._ingest_streams >= self._limits.max_ingest_streams:
            raise Overloaded(f"{self._ingest_streams} Ingest streams are open, the limit; retry later")
        self._ingest_streams += 1
        try:
            await self._ingest(request_iterator, context)
        finally:
            self._ingest_streams -= 1

    async def _ingest(self, request_iterator: AsyncIterator[pb.IngestRequest], context: Context) -> None:
        deadline = _deadline(context)
        collection = ""

        async def check(request: pb.IngestRequest) -> None:
            nonlocal collection
            collection = collection or request.collection
            if not collection:
                raise InvalidArgument("collection: the first message must name the collection")
            if request.collection and request.collection != collection:
                raise InvalidArgument(f"collection: stream is for {collection!r}, batch names {request.collection!r}")
            validation.ingest_batch(request, self._limits)
            await self._check_collection(collection)

        async def embed(request: pb.IngestRequest) -> EmbeddedBatch:
            truncate = request.truncate if request.HasField("truncate") else True
            return await self._writer.embed(
                collection, request.documents, truncate=truncate, deadline=deadline, want_vectors=False, wait=True
            )

        async def ack(request: pb.IngestRequest, outcome: WriteOutcome) -> None:
            message = pb.IngestAck(
                batch_id=request.batch_id,
                upsert=upsert_stats(outcome.upsert),
                skipped_unchanged=outcome.skipped_unchanged,
                rejected=outcome.rejected,
                ids=outcome.ids,
            )
            _meter_write(outcome)
            meter().bytes_out += message.ByteSize()
            await context.write(message)

        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None:
            return

        async def stream() -> AsyncIterator[pb.IngestRequest]:
            yield first
            async for request in requests:
                yield request

        if first.bulk:
            validation.collection_name(first.collection)
        loading = self._store.bulk_load(first.collection) if first.bulk else contextlib.nullcontext()
        async with loading:
            stopped = await run_ingest(
                stream(),
                check,
                embed,
                self._writer.store,
                ack,
                window=self._window,
                stores=self._stores,
                stop=self._draining,
            )
        if stopped:
            raise Unavailable("the server is shutting down: resend from the batch after the last acknowledged one")

    @rpc
    async def Search(self, request: pb.SearchRequest, context: Context) -> pb.SearchResponse:
        validation.search_request(request, self._limits)
        collection = await self._check_collection(request.collection)
        meter().searches += 1
        query = await self._query_vector(request, collection.dim, context)
        found = await self._store.search(
            request.collection,
            query,
            k=request.k,
            candidates=request.candidates or None,
            filter=struct_to_dict(request.filter) if request.HasField("filter") else None,
        )
        hits = []
        for hit in found:
            score = 1.0 - hit.distance  # the collection's metric is cosine (`_check_collection`)
            if request.HasField("min_score") and score < request.min_score:
                break
            hits.append(
                pb.SearchHit(
                    id=hit.id,
                    score=score,
                    text=hit.text,
                    metadata=dict_to_struct(hit.metadata),
                    vector=pack_vectors(hit.embedding[None, :])[0] if request.include_vectors else b"",
                )
            )
        return pb.SearchResponse(hits=hits)

    async def _query_vector(self, request: pb.SearchRequest, dim: int, context: Context) -> NDArray[np.float32]:
        if request.WhichOneof("query") == "text":
            embedded = await self._pool.embed([request.text], deadline=_deadline(context))
            meter().tokens += int(embedded.token_counts.sum())
            query: NDArray[np.float32] = embedded.vectors[0]
            return query
        vector = unpack_vector(request.vector, dim, "vector")
        norm = float(np.linalg.norm(vector))
        if norm == 0.0:
            raise InvalidArgument("vector: must not be all zeros")
        normalized: NDArray[np.float32] = vector / norm
        return normalized

    async def _check_collection(self, name: str) -> CollectionInfo:
        collection = await self._store.collection(name)
        if collection.metric != "cosine":
            raise InvalidArgument(f"collection {name!r} uses the {collection.metric} metric; Search scores are cosine")
        if collection.dim != self._model.dim or collection.model != self._model.name:
            raise InvalidArgument(
                f"collection {name!r} holds {collection.model} vectors of dim {collection.dim}; "
                f"this server serves {self._model.name} (dim {self._model.dim})"
            )
        return collection

    @rpc
    async def CreateCollection(self, request: pb.CreateCollectionRequest, context: Context) -> pb.Collection:
        validation.collection_name(request.name, "name")
        info = await self._store.create_collection(
            request.name, model=self._model.name, dim=self._model.dim, hnsw=index_options(request.index)
        )
        return collection_message(info)

    @rpc
    async def ListCollections(self, request: pb.ListCollectionsRequest, context: Context) -> pb.ListCollectionsResponse:
        infos = await self._store.list_collections()
        return pb.ListCollectionsResponse(collections=[collection_message(i) for i in infos])

    @rpc
    async def DropCollection(self, request: pb.DropCollectionRequest, context: Context) -> pb.DropCollectionResponse:
        validation.collection_name(request.name, "name")
        await self._store.drop_collection(request.name)
        return pb.DropCollectionResponse()

    @rpc
    async def DeleteDocuments(self, request: pb.DeleteDocumentsRequest, context: Context) -> pb.DeleteDocumentsResponse:
        validation.delete_request(request, self._limits)
        if request.ids:
            deleted = await self._store.delete(request.collection, list(request.ids))
        else:
            deleted = await self._store.delete_where(request.collection, struct_to_dict(request.filter))
        meter().documents += deleted
        return pb.DeleteDocumentsResponse(deleted=deleted)

    @rpc
    async def GetCollection(self, request: pb.GetCollectionRequest, context: Context) -> pb.Collection:
        validation.collection_name(request.name, "name")
        info = await self._store.collection(request.name)
        return collection_message(info, await self._store.stats(request.name))  # the exact count is in the stats

    @rpc
    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: Context) -> pb.ModelInfo:
        m = self._model
        return pb.ModelInfo(
            name=m.name,
            dim=m.dim,
            max_tokens=m.max_tokens,
            variant=m.variant,
            device=m.device,
            pooling=m.pooling,
            normalized=True,
        )

    @rpc
    async def CreateKey(self, request: pb.CreateKeyRequest, context: Context) -> pb.CreateKeyResponse:
        tenant = _own_tenant()
        key, record = await keyring.create_key(
            self._store,
            tenant=tenant,
            role=request.role,
            collections=request.collections or "*",
            tokens_per_s=request.tokens_per_s if request.HasField("tokens_per_s") else None,
            docs_per_s=request.docs_per_s if request.HasField("docs_per_s") else None,
            note=request.note,
        )
        return pb.CreateKeyResponse(key=key, info=key_message(record))

    @rpc
    async def ListKeys(self, request: pb.ListKeysRequest, context: Context) -> pb.ListKeysResponse:
        records = await keyring.list_keys(self._store, _own_tenant())
        return pb.ListKeysResponse(keys=[key_message(r) for r in records])

    @rpc
    async def RevokeKey(self, request: pb.RevokeKeyRequest, context: Context) -> pb.ApiKey:
        return key_message(await keyring.revoke_key(self._store, request.id, _own_tenant()))

    @property
    def _model_label(self) -> str:
        return f"{self._model.name}/{self._model.variant}"
