"""The embedpool.v1.Embedder servicer: validates, then delegates to the pool (vectors) and the store (rows)."""

from __future__ import annotations

import hashlib
import math
from typing import Any

import anyio
import grpc.aio
import numpy as np
from embedpool import _native
from embedpool.engine import ServingModel
from embedpool.errors import InvalidArgument
from embedpool.pool import EmbeddingPool
from embedpool.server import validation
from embedpool.server.codec import dict_to_struct, pack_vectors, struct_to_dict, unpack_vector
from embedpool.server.rpc import rpc
from embedpool.store import DocumentRow, Store
from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc
from numpy.typing import NDArray

Context = grpc.aio.ServicerContext[Any, Any]


def _deadline(context: Context) -> float:
    remaining = context.time_remaining()
    return math.inf if remaining is None else anyio.current_time() + remaining


def content_hash(model: str, text: str) -> bytes:
    """What decides whether a stored vector is still valid: the model and the exact text."""
    return hashlib.sha256(f"{model}\x00{text}".encode()).digest()


def derived_id(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class EmbedderServicer(pb_grpc.EmbedderServicer):
    def __init__(self, pool: EmbeddingPool, store: Store, model: ServingModel, limits: validation.Limits) -> None:
        self._pool = pool
        self._store = store
        self._model = model
        self._limits = limits

    @rpc
    async def Embed(self, request: pb.EmbedRequest, context: Context) -> pb.EmbedResponse:
        validation.embed_request(request, self._limits)
        truncate = request.truncate if request.HasField("truncate") else True
        texts = [doc.text for doc in request.documents]
        if not request.collection:
            embedded = await self._pool.embed(texts, truncate=truncate, deadline=_deadline(context))
            return pb.EmbedResponse(
                dim=self._model.dim,
                vectors=[] if request.skip_vectors else pack_vectors(embedded.vectors),
                token_counts=embedded.token_counts.tolist(),
                model=self._model_label,
            )
        await self._check_collection(request.collection)
        ids = [doc.id or derived_id(doc.text) for doc in request.documents]
        embedded = await self._pool.embed(texts, truncate=truncate, deadline=_deadline(context))
        rows = [
            DocumentRow(
                id=doc_id,
                text=doc.text,
                metadata=struct_to_dict(doc.metadata),
                content_hash=content_hash(self._model.name, doc.text),
                embedding=vector,
            )
            for doc_id, doc, vector in zip(ids, request.documents, embedded.vectors, strict=True)
        ]
        result = await self._store.upsert(request.collection, rows)
        if result.rejected:
            listed = "; ".join(f"{doc_id}: {reason}" for doc_id, reason in result.rejected[:10])
            raise InvalidArgument(f"{len(result.rejected)} documents rejected (the others were stored): {listed}")
        return pb.EmbedResponse(
            dim=self._model.dim,
            vectors=[] if request.skip_vectors else pack_vectors(embedded.vectors),
            ids=ids,
            token_counts=embedded.token_counts.tolist(),
            upsert=pb.UpsertStats(inserted=result.inserted, updated=result.updated, unchanged=result.unchanged),
            model=self._model_label,
        )

    @rpc
    async def Search(self, request: pb.SearchRequest, context: Context) -> pb.SearchResponse:
        validation.search_request(request, self._limits)
        collection = await self._check_collection(request.collection)
        query = await self._query_vector(request, collection.dim, context)
        k = request.k
        candidates = await self._store.search_candidates(
            request.collection,
            query,
            candidates=request.candidates or max(40, 4 * k),
            filter=struct_to_dict(request.filter) if request.HasField("filter") else None,
        )
        if not candidates:
            return pb.SearchResponse()
        matrix = np.stack([c.embedding for c in candidates])
        order, scores = _native.topk_cosine(query[None, :], matrix, k)
        hits = []
        for j, score in zip(order[0].tolist(), scores[0].tolist(), strict=True):
            if request.HasField("min_score") and score < request.min_score:
                break
            c = candidates[j]
            hits.append(
                pb.SearchHit(
                    id=c.id,
                    score=score,
                    text=c.text,
                    metadata=dict_to_struct(c.metadata),
                    vector=pack_vectors(c.embedding[None, :])[0] if request.include_vectors else b"",
                )
            )
        return pb.SearchResponse(hits=hits)

    async def _query_vector(self, request: pb.SearchRequest, dim: int, context: Context) -> NDArray[np.float32]:
        if request.WhichOneof("query") == "text":
            embedded = await self._pool.embed([request.text], deadline=_deadline(context))
            query: NDArray[np.float32] = embedded.vectors[0]
            return query
        vector = unpack_vector(request.vector, dim, "vector")
        norm = float(np.linalg.norm(vector))
        if norm == 0.0:
            raise InvalidArgument("vector: must not be all zeros")
        normalized: NDArray[np.float32] = vector / norm
        return normalized

    async def _check_collection(self, name: str) -> Any:
        collection = await self._store.get_collection(name)
        if collection.dim != self._model.dim or collection.model != self._model.name:
            raise InvalidArgument(
                f"collection {name!r} holds {collection.model} vectors of dim {collection.dim}; "
                f"this server serves {self._model.name} (dim {self._model.dim})"
            )
        return collection

    @rpc
    async def CreateCollection(self, request: pb.CreateCollectionRequest, context: Context) -> pb.Collection:
        validation.collection_name(request.name, "name")
        info = await self._store.create_collection(request.name, model=self._model.name, dim=self._model.dim)
        return pb.Collection(name=info.name, model=info.model, dim=info.dim, metric=info.metric, count=info.count or 0)

    @rpc
    async def ListCollections(self, request: pb.ListCollectionsRequest, context: Context) -> pb.ListCollectionsResponse:
        infos = await self._store.list_collections()
        return pb.ListCollectionsResponse(
            collections=[
                pb.Collection(name=i.name, model=i.model, dim=i.dim, metric=i.metric, count=i.count or 0) for i in infos
            ]
        )

    @rpc
    async def DropCollection(self, request: pb.DropCollectionRequest, context: Context) -> pb.DropCollectionResponse:
        validation.collection_name(request.name, "name")
        await self._store.drop_collection(request.name)
        return pb.DropCollectionResponse()

    @rpc
    async def DeleteDocuments(self, request: pb.DeleteDocumentsRequest, context: Context) -> pb.DeleteDocumentsResponse:
        validation.collection_name(request.collection)
        if not request.ids:
            raise InvalidArgument("ids: must contain at least one id")
        deleted = await self._store.delete(request.collection, list(request.ids))
        return pb.DeleteDocumentsResponse(deleted=deleted)

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

    @property
    def _model_label(self) -> str:
        return f"{self._model.name}/{self._model.variant}"
