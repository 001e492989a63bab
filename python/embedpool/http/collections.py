"""Collections over HTTP: create, list, get, drop; upsert, delete and search documents. Each route parses its
body (schemas), passes the gate, calls the core and shapes the answer; names are the caller's (unqualified)."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Request
from starlette.responses import Response

from embedpool.http import encoding
from embedpool.http.embeddings import long_input_options
from embedpool.http.errors import CONFLICT, ERRORS
from embedpool.http.guard import Gatekeeper, deadline
from embedpool.http.schemas import (
    Collection,
    CollectionList,
    CreateCollection,
    Deleted,
    DeletedDocuments,
    DeleteDocuments,
    SearchRequest,
    SearchResult,
    UpsertDocuments,
    UpsertResult,
)
from embedpool.security.principal import Action
from embedpool.service import Document, EmbeddingService
from embedpool.service.gate import Call
from embedpool.service.models import QUERY
from embedpool.store import CollectionInfo, CollectionStats, HnswOptions


def _collection(name: str, info: CollectionInfo, stats: CollectionStats | None = None) -> Collection:
    return Collection(
        name=name,
        model=info.model,
        dim=info.dim,
        metric=info.metric,
        count=stats.count if stats else info.count or 0,
        count_estimated=False if stats else info.count_estimated,
        index={"m": info.hnsw_m, "ef_construction": info.hnsw_ef_construction, "halfvec": info.hnsw_halfvec},
        storage=info.storage,
        index_bytes=stats.index_bytes if stats else None,
        table_bytes=stats.table_bytes if stats else None,
        indexed=stats.indexed if stats else None,
    )


def router(service: EmbeddingService, keeper: Gatekeeper) -> APIRouter:
    api = APIRouter(prefix="/v1/collections", tags=["Collections"])
    gate = keeper.gate

    def named(call: Call, action: Action, name: str) -> str:
        return gate.authorize(call, action, name, "name")

    @api.post("", response_model=Collection, responses={**ERRORS, **CONFLICT})
    async def create_collection(
        body: CreateCollection, request: Request, call: Call = keeper.opens("CreateCollection")
    ) -> Collection:
        """Creates a collection for the served model (idempotent for the same options; 409 for other ones)."""
        call.audited = True
        stored = named(call, Action.ADMIN, body.name)
        options = HnswOptions()
        if body.index is not None:
            options = HnswOptions(
                m=body.index.m or options.m,
                ef_construction=body.index.ef_construction or options.ef_construction,
                halfvec=body.index.halfvec,
            )
        info = await service.create_collection(
            stored, options, storage=body.storage, dimensions=body.dimensions, model=body.model
        )
        return _collection(body.name, info)

    @api.get("", response_model=CollectionList, responses=ERRORS)
    async def list_collections(request: Request, call: Call = keeper.opens("ListCollections")) -> CollectionList:
        gate.authorize(call, Action.READ)
        infos = {info.name: info for info in await service.list_collections()}
        return CollectionList(data=[_collection(name, infos[s]) for s, name in gate.visible(call, infos)])

    @api.get("/{name}", response_model=Collection, responses=ERRORS)
    async def get_collection(name: str, request: Request, call: Call = keeper.opens("GetCollection")) -> Collection:
        """A collection with its exact count and sizes."""
        info, stats = await service.get_collection(named(call, Action.READ, name))
        return _collection(name, info, stats)

    @api.delete("/{name}", response_model=Deleted, responses=ERRORS)
    async def drop_collection(name: str, request: Request, call: Call = keeper.opens("DropCollection")) -> Deleted:
        """Drops a collection and its documents."""
        call.audited = True
        await service.drop_collection(named(call, Action.ADMIN, name))
        return Deleted(name=name, deleted=True)

    @api.post("/{name}/documents", response_model=UpsertResult, responses=ERRORS)
    async def upsert_documents(
        name: str, body: UpsertDocuments, request: Request, call: Call = keeper.opens("Embed")
    ) -> Response:
        """Embeds and upserts documents: idempotent (a resent unchanged document is neither embedded nor
        written again); per id the last version sent wins."""
        call.audited = True
        stored = gate.authorize(call, Action.WRITE, name, "name")
        gate.admit(call, len(body.documents))
        long_inputs = long_input_options(body, service.limits)
        outcome = await service.write(
            stored,
            [Document(d.text, d.id, d.metadata) for d in body.documents],
            truncate=long_inputs.truncate,
            chunking=long_inputs.chunking,
            store_windows=body.store_windows,
            want_vectors=body.return_vectors,
            deadline=deadline(request),
        )
        tokens = sum(outcome.token_counts)
        content = encoding.dumps(
            {
                "object": "upsert",
                "ids": outcome.ids,
                "inserted": outcome.upsert.inserted,
                "updated": outcome.upsert.updated,
                "unchanged": outcome.upsert.unchanged,
                "skipped_unchanged": outcome.skipped_unchanged,
                "rejected": [{"index": r.index, "id": r.id, "reason": r.reason} for r in outcome.rejected],
                "vectors": encoding.vectors(outcome.vectors, body.encoding_format)
                if outcome.vectors is not None
                else None,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )
        return Response(content, media_type="application/json")

    @api.post("/{name}/documents/delete", response_model=DeletedDocuments, responses=ERRORS)
    async def delete_documents(
        name: str, body: DeleteDocuments, request: Request, call: Call = keeper.opens("DeleteDocuments")
    ) -> DeletedDocuments:
        """Deletes documents by id, or those whose metadata contains `filter` (exactly one of the two)."""
        call.audited = True
        stored = gate.authorize(call, Action.WRITE, name, "name")
        deleted = await service.delete(stored, ids=body.ids or (), filter=body.filter)
        return DeletedDocuments(deleted=deleted)

    @api.post("/{name}/search", response_model=SearchResult, responses=ERRORS)
    async def search(name: str, body: SearchRequest, request: Request, call: Call = keeper.opens("Search")) -> Response:
        """Nearest documents by cosine similarity: HNSW candidates reranked exactly."""
        stored = gate.authorize(call, Action.READ, name, "name")
        gate.admit(call, int(body.query is not None))
        hits = await service.search(
            stored,
            text=body.query,
            vector=np.asarray(body.vector, dtype=np.float64) if body.vector is not None else None,
            k=body.k,
            candidates=body.candidates or None,
            filter=body.filter,
            min_score=body.min_score,
            include_vectors=body.include_vectors,
            deadline=deadline(request),
            input_type=body.input_type or QUERY,
            best_window_per_parent=body.best_window_per_parent,
        )
        vectors = (
            encoding.vectors(np.stack([h.vector for h in hits if h.vector is not None]), body.encoding_format)
            if body.include_vectors and hits
            else [None] * len(hits)
        )
        content = encoding.dumps(
            {
                "object": "list",
                "data": [
                    {"id": h.id, "score": h.score, "text": h.text, "metadata": h.metadata, "vector": v}
                    for h, v in zip(hits, vectors, strict=True)
                ],
            }
        )
        return Response(content, media_type="application/json")

    return api
