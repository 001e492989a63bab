"""`AsyncClient`: the embedpool API over grpc.aio channels (asyncio), with the sync client's policies."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self, TypeVar, overload

import grpc
import grpc.aio
import numpy as np
from numpy.typing import ArrayLike, NDArray

from embedpool.client import calls, ingest_aio, wire
from embedpool.client.base import ClientBase, as_source, checkpoint_file
from embedpool.client.ingest import IngestLedger, IngestProgress, IngestSummary, Source
from embedpool.client.propagation import with_trace_context
from embedpool.client.retry import Attempts, Deadline, Failure
from embedpool.client.types import (
    Collection,
    Document,
    Encoding,
    FloatEncoding,
    Hit,
    IndexOptions,
    Limits,
    ModelInfo,
    UpsertResult,
)
from embedpool.errors import AlreadyExists, InvalidArgument
from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from embedpool.v1.embedpool_pb2_grpc import EmbedderAsyncStub as Stub

__all__ = ["AsyncClient"]

R = TypeVar("R")
Q = TypeVar("Q")


class AsyncClient(ClientBase):
    """As `embedpool.client.Client`, with coroutine methods. Channels open on first use, in the running event
    loop, and belong to it: use one AsyncClient within one loop, and `await close()` (or `async with`)."""

    def _connect(self) -> None:
        """Nothing opens yet: grpc.aio channels belong to the loop running when they open."""
        self._channels: list[grpc.aio.Channel] = []
        self._stub_list: list[Stub] = []
        self._slots = asyncio.Semaphore(self._concurrency)

    @property
    def _stubs(self) -> list[Stub]:
        if not self._stub_list:
            self._channels = [self._open(t, aio=True) for t in self.targets]
            self._stub_list = [pb_grpc.EmbedderStub(channel) for channel in self._channels]
        return self._stub_list

    async def close(self) -> None:
        channels, self._channels, self._stub_list = self._channels, [], []
        for channel in channels:
            await channel.close(None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # Calls: every RPC goes through _call, which retries it and moves it between targets.

    async def _call(self, method: str, invoke: Callable[[Stub, float | None], Awaitable[R]], deadline: Deadline) -> R:
        attempts = Attempts(self._retry, deadline, method, self._targets)
        while True:
            stub = with_trace_context(self._stubs[attempts.target()])
            try:
                reply = await invoke(stub, deadline.remaining())
            except grpc.aio.AioRpcError as e:
                failure = Failure.of(e.code(), e.details(), e.trailing_metadata())
            else:
                attempts.answered()
                return reply
            # Decided outside the except block: the domain error raised carries no grpc.RpcError context.
            await asyncio.sleep(attempts.failed(failure))

    async def _map(
        self,
        method: str,
        invoke: Callable[[Stub, float | None, Q], Awaitable[R]],
        requests: Sequence[Q],
        offsets: Sequence[int],
        deadline: Deadline,
    ) -> list[R]:
        """One call per request, up to `concurrency` of the split ones at once; the replies in request order. An
        unsplit call takes no slot, as in the sync client: callers sharing one client are not queued behind
        `concurrency` in-flight calls of others."""

        async def one(i: int) -> R:
            try:
                return await self._call(method, lambda stub, timeout: invoke(stub, timeout, requests[i]), deadline)
            except InvalidArgument as e:
                raise calls.shifted(e, offsets[i]) from None

        async def slotted(i: int) -> R:
            async with self._slots:
                return await one(i)

        if len(requests) <= 1:
            return [await one(i) for i in range(len(requests))]
        tasks = [asyncio.create_task(slotted(i)) for i in range(len(requests))]
        try:
            return await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()  # after a failure, the calls not made yet are not made
            await asyncio.wait(tasks)

    async def _limits(self, deadline: Deadline) -> Limits:
        return self._limits_given or (await self._model_info(deadline)).limits

    async def _model_info(self, deadline: Deadline) -> ModelInfo:
        if self._info is None:
            request = pb.GetModelInfoRequest()
            reply = await self._call("GetModelInfo", lambda s, t: s.GetModelInfo(request, timeout=t), deadline)
            self._info = wire.model_info(reply)
        return self._info

    # The API: as Client's.

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        return await self._model_info(self._deadline(timeout))

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        request = pb.ListModelsRequest()
        reply = await self._call("ListModels", lambda s, t: s.ListModels(request, timeout=t), self._deadline(timeout))
        return [wire.model_info(m) for m in reply.models]

    @overload
    async def embed(
        self,
        texts: Sequence[str],
        *,
        truncate: bool = ...,
        dimensions: int | None = ...,
        model: str = ...,
        input_type: str = ...,
        encoding: Literal["binary"],
        timeout: float | None = ...,
    ) -> NDArray[np.uint8]: ...

    @overload
    async def embed(
        self,
        texts: Sequence[str],
        *,
        truncate: bool = ...,
        dimensions: int | None = ...,
        model: str = ...,
        input_type: str = ...,
        encoding: FloatEncoding = ...,
        timeout: float | None = ...,
    ) -> NDArray[np.float32]: ...

    async def embed(
        self,
        texts: Sequence[str],
        *,
        truncate: bool = True,
        dimensions: int | None = None,
        model: str = "",
        input_type: str = "",
        encoding: Encoding = "float32",
        timeout: float | None = None,
    ) -> NDArray[np.float32] | NDArray[np.uint8]:
        deadline = self._deadline(timeout)
        docs = calls.texts(texts)
        plan = calls.embed_plan(
            docs,
            await self._limits(deadline),
            truncate=truncate,
            dimensions=dimensions,
            model=model,
            input_type=input_type,
            encoding=encoding,
        )
        replies = await self._map("Embed", lambda s, t, r: s.Embed(r, timeout=t), plan.requests, plan.offsets, deadline)
        return plan.vectors(replies, dimensions or ((await self._model_info(deadline)).dim if not docs else 0))

    async def upsert(
        self,
        collection: str,
        documents: Iterable[Document | str],
        *,
        truncate: bool = True,
        return_vectors: bool = False,
        timeout: float | None = None,
    ) -> UpsertResult:
        deadline = self._deadline(timeout)
        plan = calls.embed_plan(
            calls.documents(documents),
            await self._limits(deadline),
            collection=collection,
            truncate=truncate,
            skip_vectors=not return_vectors,
        )
        replies = await self._map("Embed", lambda s, t, r: s.Embed(r, timeout=t), plan.requests, plan.offsets, deadline)
        return calls.upsert_result(plan, replies, with_vectors=return_vectors)

    async def search(
        self,
        collection: str,
        query: str | ArrayLike,
        *,
        k: int = 10,
        filter: Mapping[str, Any] | None = None,
        candidates: int | None = None,
        min_score: float | None = None,
        include_vectors: bool = False,
        encoding: Encoding = "float32",
        timeout: float | None = None,
    ) -> list[Hit]:
        request = calls.search_request(
            collection,
            query,
            k=k,
            filter=filter,
            candidates=candidates,
            min_score=min_score,
            include_vectors=include_vectors,
            encoding=encoding,
        )
        reply = await self._call("Search", lambda s, t: s.Search(request, timeout=t), self._deadline(timeout))
        return [wire.hit(h, encoding) for h in reply.hits]

    async def create_collection(
        self,
        name: str,
        *,
        index: IndexOptions | None = None,
        storage: str = "float32",
        dimensions: int | None = None,
        exist_ok: bool = False,
        model: str = "",
        timeout: float | None = None,
    ) -> Collection:
        deadline = self._deadline(timeout)
        request = calls.create_request(name, index, storage, dimensions, model)
        try:
            reply = await self._call("CreateCollection", lambda s, t: s.CreateCollection(request, timeout=t), deadline)
        except AlreadyExists:
            if not exist_ok:
                raise
            return await self._get_collection(name, deadline)
        return wire.collection(reply)

    async def get_collection(self, name: str, *, timeout: float | None = None) -> Collection:
        return await self._get_collection(name, self._deadline(timeout))

    async def _get_collection(self, name: str, deadline: Deadline) -> Collection:
        request = pb.GetCollectionRequest(name=name)
        reply = await self._call("GetCollection", lambda s, t: s.GetCollection(request, timeout=t), deadline)
        return wire.collection(reply)

    async def list_collections(self, *, timeout: float | None = None) -> list[Collection]:
        request = pb.ListCollectionsRequest()
        reply = await self._call(
            "ListCollections", lambda s, t: s.ListCollections(request, timeout=t), self._deadline(timeout)
        )
        return [wire.collection(c) for c in reply.collections]

    async def drop_collection(self, name: str, *, timeout: float | None = None) -> None:
        request = pb.DropCollectionRequest(name=name)
        await self._call("DropCollection", lambda s, t: s.DropCollection(request, timeout=t), self._deadline(timeout))

    async def delete(
        self,
        collection: str,
        ids: Sequence[str] | None = None,
        *,
        filter: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> int:
        deadline = self._deadline(timeout)
        requests = calls.delete_requests(collection, ids, filter, await self._limits(deadline))
        replies = await self._map(
            "DeleteDocuments", lambda s, t, r: s.DeleteDocuments(r, timeout=t), requests, [0] * len(requests), deadline
        )
        return sum(r.deleted for r in replies)

    async def ingest(
        self,
        collection: str,
        documents: Iterable[Document | str] | Source,
        *,
        batch_size: int = 256,
        window: int = 4,
        truncate: bool = True,
        bulk: bool = True,
        checkpoint: str | Path | None = None,
        resume: bool = True,
        progress: Callable[[IngestProgress], None] | None = None,
        timeout: float | None = None,
    ) -> IngestSummary:
        """As Client.ingest; the source is read in the event loop (a file a batch at a time)."""
        deadline = Deadline(timeout)
        ledger = IngestLedger(
            as_source(documents),
            collection=collection,
            target=self._checkpoint_target(),
            limits=await self._limits(deadline),
            batch_size=batch_size,
            window=window,
            truncate=truncate,
            checkpoint_file=checkpoint_file(checkpoint),
            resume=resume,
            progress=progress,
        )
        await ingest_aio.run_ingest(
            ledger, self._stubs, Attempts(self._retry, deadline, "Ingest", self._targets), bulk=bulk
        )
        return ledger.finish()
