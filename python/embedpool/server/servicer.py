"""The embedpool.v1.Embedder servicer: the gRPC door. Each method decodes its message, calls the service core
(embedpool.service) and encodes what it returns; errors go through the one table (embedpool.status)."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

import anyio
import grpc.aio

from embedpool.errors import InvalidArgument
from embedpool.security.usage import meter
from embedpool.server import codec
from embedpool.server.rpc import rpc
from embedpool.service import EmbeddingService, IngestBatch, WriteOutcome
from embedpool.service import limits as check
from embedpool.service.models import QUERY
from embedpool.service.syncs import Syncs, SyncSpec
from embedpool.store.sources import DEFAULT
from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc

Context = grpc.aio.ServicerContext[Any, Any]


def _deadline(context: Context) -> float:
    remaining = context.time_remaining()
    return math.inf if remaining is None else anyio.current_time() + remaining


_LONG_INPUTS = {pb.LONG_INPUTS_TRUNCATE: "", pb.LONG_INPUTS_ERROR: "error", pb.LONG_INPUTS_CHUNK: "chunk"}


def _long_inputs(request: pb.EmbedRequest | pb.IngestRequest, limits: check.Limits) -> check.LongInputs:
    """The request's long-input options; LONG_INPUTS_TRUNCATE is the enum's default, so it defers to `truncate`."""
    mode = _LONG_INPUTS.get(request.long_inputs)
    if mode is None:
        raise InvalidArgument(f"long_inputs: {request.long_inputs} is not a LongInputs value")
    return check.long_inputs(
        mode,
        truncate=request.truncate if request.HasField("truncate") else None,
        overlap=request.chunk_overlap_tokens,
        max_windows=request.max_windows,
        limits=limits,
    )


class EmbedderServicer(pb_grpc.EmbedderServicer):
    def __init__(self, service: EmbeddingService, syncs: Syncs) -> None:
        self._service = service
        self._syncs = syncs
        self._limits = service.limits

    @rpc
    async def Embed(self, request: pb.EmbedRequest, context: Context) -> pb.EmbedResponse:
        check.request_bytes(request.ByteSize(), self._limits)
        service = self._service
        encoding = request.encoding
        dimensions = request.dimensions if request.HasField("dimensions") else None
        long_inputs = _long_inputs(request, self._limits)
        if not request.collection:
            if request.store_windows:
                raise InvalidArgument("store_windows: needs a collection")
            embedded = await service.embed(
                [doc.text for doc in request.documents],
                truncate=long_inputs.truncate,
                chunking=long_inputs.chunking,
                deadline=_deadline(context),
                dimensions=dimensions,
                model=request.model,
                input_type=request.input_type,
            )
            return pb.EmbedResponse(
                dim=embedded.vectors.shape[1],
                vectors=[] if request.skip_vectors else codec.pack_vectors(embedded.vectors, encoding),
                token_counts=embedded.token_counts,
                model=embedded.model,
                encoding=encoding,
                window_counts=embedded.window_counts,
            )
        if request.input_type:
            raise InvalidArgument(
                "input_type: documents stored in a collection get the document prompt; leave it unset"
            )
        outcome = await service.write(
            request.collection,
            codec.documents(request.documents),
            truncate=long_inputs.truncate,
            deadline=_deadline(context),
            want_vectors=not request.skip_vectors,
            model=request.model,
            dimensions=dimensions,
            chunking=long_inputs.chunking,
            store_windows=request.store_windows,
        )
        return pb.EmbedResponse(
            dim=outcome.vectors.shape[1] if outcome.vectors is not None else outcome.dim,
            vectors=codec.pack_vectors(outcome.vectors, encoding) if outcome.vectors is not None else [],
            ids=outcome.ids,
            token_counts=outcome.token_counts,
            upsert=codec.upsert_stats(outcome.upsert),
            model=outcome.model,
            rejected=codec.rejected(outcome.rejected),
            encoding=encoding,
        )

    @rpc
    async def Ingest(  # type: ignore[override]  # grpc.aio streams replies with context.write as well as yield
        self, request_iterator: AsyncIterator[pb.IngestRequest], context: Context
    ) -> None:
        """Embeds ahead, stores concurrently, acknowledges in order: see embedpool.service.ingest."""
        limits = self._limits

        async def batches() -> AsyncIterator[IngestBatch]:
            async for request in request_iterator:
                check.request_bytes(request.ByteSize(), limits)
                documents = codec.documents(request.documents)
                long_inputs = _long_inputs(request, limits)
                yield IngestBatch(
                    documents,
                    request.collection,
                    long_inputs.truncate,
                    request.bulk,
                    request.batch_id,
                    request.model,
                    long_inputs.chunking,
                )

        async def ack(batch: IngestBatch, outcome: WriteOutcome) -> None:
            message = pb.IngestAck(
                batch_id=int(batch.tag),  # type: ignore[call-overload]  # the batch id set above
                upsert=codec.upsert_stats(outcome.upsert),
                skipped_unchanged=outcome.skipped_unchanged,
                rejected=codec.rejected(outcome.rejected),
                ids=outcome.ids,
            )
            meter().bytes_out += message.ByteSize()
            await context.write(message)

        await self._service.ingest(batches(), ack, deadline=_deadline(context))

    @rpc
    async def Search(self, request: pb.SearchRequest, context: Context) -> pb.SearchResponse:
        check.request_bytes(request.ByteSize(), self._limits)
        which = request.WhichOneof("query")
        hits = await self._service.search(
            request.collection,
            text=request.text if which == "text" else None,
            vector=codec.unpack_vector(request.vector, "vector") if which == "vector" else None,
            k=request.k,
            candidates=request.candidates or None,
            filter=codec.struct_to_dict(request.filter) if request.HasField("filter") else None,
            min_score=request.min_score if request.HasField("min_score") else None,
            include_vectors=request.include_vectors,
            deadline=_deadline(context),
            model=request.model,
            input_type=request.input_type or QUERY,
            best_window_per_parent=request.best_window_per_parent,
        )
        return pb.SearchResponse(hits=[codec.hit_message(hit, request.encoding) for hit in hits])

    @rpc
    async def CreateCollection(self, request: pb.CreateCollectionRequest, context: Context) -> pb.Collection:
        info = await self._service.create_collection(
            request.name,
            codec.index_options(request.index),
            storage=request.storage,
            dimensions=request.dimensions if request.HasField("dimensions") else None,
            model=request.model,
        )
        return codec.collection_message(info)

    @rpc
    async def ListCollections(self, request: pb.ListCollectionsRequest, context: Context) -> pb.ListCollectionsResponse:
        infos = await self._service.list_collections()
        return pb.ListCollectionsResponse(collections=[codec.collection_message(i) for i in infos])

    @rpc
    async def DropCollection(self, request: pb.DropCollectionRequest, context: Context) -> pb.DropCollectionResponse:
        await self._service.drop_collection(request.name)
        return pb.DropCollectionResponse()

    @rpc
    async def DeleteDocuments(self, request: pb.DeleteDocumentsRequest, context: Context) -> pb.DeleteDocumentsResponse:
        deleted = await self._service.delete(
            request.collection,
            ids=list(request.ids),
            filter=codec.struct_to_dict(request.filter) if request.HasField("filter") else None,
        )
        return pb.DeleteDocumentsResponse(deleted=deleted)

    @rpc
    async def GetCollection(self, request: pb.GetCollectionRequest, context: Context) -> pb.Collection:
        info, stats = await self._service.get_collection(request.name)
        return codec.collection_message(info, stats)  # the exact count is in the stats

    @rpc
    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: Context) -> pb.ModelInfo:
        models = self._service.models
        return codec.model_info(models.named(request.model), models.default, self._limits)

    @rpc
    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        models = self._service.models
        return pb.ListModelsResponse(models=[codec.model_info(m, models.default, self._limits) for m in models])

    @rpc
    async def CreateKey(self, request: pb.CreateKeyRequest, context: Context) -> pb.CreateKeyResponse:
        key, record = await self._service.create_key(
            role=request.role,
            collections=request.collections,
            tokens_per_s=request.tokens_per_s if request.HasField("tokens_per_s") else None,
            docs_per_s=request.docs_per_s if request.HasField("docs_per_s") else None,
            note=request.note,
        )
        return pb.CreateKeyResponse(key=key, info=codec.key_message(record))

    @rpc
    async def ListKeys(self, request: pb.ListKeysRequest, context: Context) -> pb.ListKeysResponse:
        return pb.ListKeysResponse(keys=[codec.key_message(r) for r in await self._service.list_keys()])

    @rpc
    async def RevokeKey(self, request: pb.RevokeKeyRequest, context: Context) -> pb.ApiKey:
        return codec.key_message(await self._service.revoke_key(request.id))

    @rpc
    async def CreateSync(self, request: pb.CreateSyncRequest, context: Context) -> pb.Sync:
        spec = SyncSpec(
            name=request.name,
            source=request.source,
            id_column=request.id_column,
            text=request.text,
            collection=request.collection,
            metadata_columns=tuple(request.metadata_columns),
            where=request.where,
            database=request.database or DEFAULT,
        )
        return codec.sync_message(await self._syncs.create(spec))

    @rpc
    async def ListSyncs(self, request: pb.ListSyncsRequest, context: Context) -> pb.ListSyncsResponse:
        return pb.ListSyncsResponse(syncs=[codec.sync_message(s) for s in await self._syncs.list()])

    @rpc
    async def GetSync(self, request: pb.GetSyncRequest, context: Context) -> pb.Sync:
        return codec.sync_message(await self._syncs.status(request.name))

    @rpc
    async def PauseSync(self, request: pb.PauseSyncRequest, context: Context) -> pb.Sync:
        return codec.sync_message(await self._syncs.pause(request.name))

    @rpc
    async def ResumeSync(self, request: pb.ResumeSyncRequest, context: Context) -> pb.Sync:
        return codec.sync_message(await self._syncs.pause(request.name, paused=False))

    @rpc
    async def DropSync(self, request: pb.DropSyncRequest, context: Context) -> pb.DropSyncResponse:
        await self._syncs.drop(request.name)
        return pb.DropSyncResponse()
