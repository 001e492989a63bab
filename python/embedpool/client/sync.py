"""`Client`: the embedpool API over sync grpc channels, with splitting, retries and fail-over built in."""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypeVar, overload

import grpc
import numpy as np
from numpy.typing import ArrayLike, NDArray

from embedpool.client import calls, ingest_sync, wire
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
    Sync,
    UpsertResult,
)
from embedpool.errors import AlreadyExists, InvalidArgument
from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc

__all__ = ["Client"]

R = TypeVar("R")
Q = TypeVar("Q")
Stub = pb_grpc.EmbedderStub


class Client(ClientBase):
    """The embedpool API over sync grpc channels; the options are ClientBase's. Thread-safe: the split calls of
    a method run on a pool of `concurrency` threads."""

    def _connect(self) -> None:
        self._channels = [self._open(t, aio=False) for t in self.targets]
        self._stubs = [Stub(channel) for channel in self._channels]
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # Calls: every RPC goes through _call, which retries it and moves it between targets.

    def _call(self, method: str, invoke: Callable[[Stub, float | None], R], deadline: Deadline) -> R:
        attempts = Attempts(self._retry, deadline, method, self._targets)
        while True:
            stub = with_trace_context(self._stubs[attempts.target()])
            try:
                reply = invoke(stub, deadline.remaining())
            except grpc.RpcError as e:
                assert isinstance(e, grpc.Call)
                failure = Failure.of(e.code(), e.details(), e.trailing_metadata())
            else:
                attempts.answered()
                return reply
            # Decided outside the except block: the domain error raised carries no grpc.RpcError context.
            time.sleep(attempts.failed(failure))

    def _map(
        self,
        method: str,
        invoke: Callable[[Stub, float | None, Q], R],
        requests: Sequence[Q],
        offsets: Sequence[int],
        deadline: Deadline,
    ) -> list[R]:
        """One call per request, up to `concurrency` at once; the replies in request order."""

        def one(i: int) -> R:
            try:
                return self._call(method, lambda stub, timeout: invoke(stub, timeout, requests[i]), deadline)
            except InvalidArgument as e:
                raise calls.shifted(e, offsets[i]) from None

        if len(requests) <= 1:
            return [one(i) for i in range(len(requests))]
        pool = self._executor()
        # Each in the caller's context, so that its current span (the trace the calls join) reaches the threads.
        futures: list[Future[R]] = [pool.submit(contextvars.copy_context().run, one, i) for i in range(len(requests))]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()  # after a failure, the calls not started yet are not made

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._concurrency, thread_name_prefix="embedpool-client")
            return self._pool

    def _limits(self, deadline: Deadline) -> Limits:
        return self._limits_given or self._model_info(deadline).limits

    def _model_info(self, deadline: Deadline) -> ModelInfo:
        if self._info is None:
            reply = self._call(
                "GetModelInfo", lambda s, t: s.GetModelInfo(pb.GetModelInfoRequest(), timeout=t), deadline
            )
            self._info = wire.model_info(reply)
        return self._info

    # The API.

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """The default model and the server's request limits (asked once, then remembered)."""
        return self._model_info(self._deadline(timeout))

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """Every model the server serves, the default first."""
        request = pb.ListModelsRequest()
        reply = self._call("ListModels", lambda s, t: s.ListModels(request, timeout=t), self._deadline(timeout))
        return [wire.model_info(m) for m in reply.models]

    @overload
    def embed(
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
    def embed(
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

    def embed(
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
        """[len(texts), dim] unit vectors in input order (`dimensions`: a Matryoshka size of the model; `model`:
        a served model's name, "" for the default; `input_type`: query, document or one of the model's prompt
        names, whose prompt the server puts before each text).

        `encoding`: how they travel (wire.ENCODINGS): float32, float16 or int8 come back as float32 (float16
        and int8 rounded: int8 within max|x| / 254 a component); binary as packed sign bits, uint8
        [len(texts), ceil(dim / 8)], most significant bit first (numpy.unpackbits undoes it)."""
        deadline = self._deadline(timeout)
        docs = calls.texts(texts)
        plan = calls.embed_plan(
            docs,
            self._limits(deadline),
            truncate=truncate,
            dimensions=dimensions,
            model=model,
            input_type=input_type,
            encoding=encoding,
        )
        replies = self._map("Embed", lambda s, t, r: s.Embed(r, timeout=t), plan.requests, plan.offsets, deadline)
        return plan.vectors(replies, dimensions or (self._model_info(deadline).dim if not docs else 0))

    def upsert(
        self,
        collection: str,
        documents: Iterable[Document | str],
        *,
        truncate: bool = True,
        return_vectors: bool = False,
        timeout: float | None = None,
    ) -> UpsertResult:
        """Embeds and stores `documents` (a plain str is a document without id or metadata)."""
        deadline = self._deadline(timeout)
        plan = calls.embed_plan(
            calls.documents(documents),
            self._limits(deadline),
            collection=collection,
            truncate=truncate,
            skip_vectors=not return_vectors,
        )
        replies = self._map("Embed", lambda s, t, r: s.Embed(r, timeout=t), plan.requests, plan.offsets, deadline)
        return calls.upsert_result(plan, replies, with_vectors=return_vectors)

    def search(
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
        """The `k` nearest documents to a query text or vector, best first."""
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
        reply = self._call("Search", lambda s, t: s.Search(request, timeout=t), self._deadline(timeout))
        return [wire.hit(h, encoding) for h in reply.hits]

    def create_collection(
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
        """Creates `name` with `index` options (None: the server's defaults), bound to `model` ("": the default),
        its vectors stored as `storage` (float32, float16 or binary: see CreateCollectionRequest.storage) at
        `dimensions` (a Matryoshka size the model declares; None: the model's dim).

        Creating it again with the same options succeeds (so a retried create cannot fail); different options
        raise AlreadyExists, unless `exist_ok`, which takes an existing collection as it is, whatever its options.
        """
        deadline = self._deadline(timeout)
        request = calls.create_request(name, index, storage, dimensions, model)
        try:
            reply = self._call("CreateCollection", lambda s, t: s.CreateCollection(request, timeout=t), deadline)
        except AlreadyExists:
            if not exist_ok:
                raise
            return self._get_collection(name, deadline)
        return wire.collection(reply)

    def get_collection(self, name: str, *, timeout: float | None = None) -> Collection:
        """`name` with its exact count and storage sizes (NotFound when there is none)."""
        return self._get_collection(name, self._deadline(timeout))

    def _get_collection(self, name: str, deadline: Deadline) -> Collection:
        request = pb.GetCollectionRequest(name=name)
        return wire.collection(self._call("GetCollection", lambda s, t: s.GetCollection(request, timeout=t), deadline))

    def list_collections(self, *, timeout: float | None = None) -> list[Collection]:
        request = pb.ListCollectionsRequest()
        reply = self._call(
            "ListCollections", lambda s, t: s.ListCollections(request, timeout=t), self._deadline(timeout)
        )
        return [wire.collection(c) for c in reply.collections]

    def drop_collection(self, name: str, *, timeout: float | None = None) -> None:
        """Drops `name` and its documents. A drop retried after its first answer was lost raises NotFound."""
        request = pb.DropCollectionRequest(name=name)
        self._call("DropCollection", lambda s, t: s.DropCollection(request, timeout=t), self._deadline(timeout))

    # Syncs (admin key granted every collection)

    def create_sync(
        self,
        name: str,
        *,
        source: str,
        id_column: str,
        text: str,
        collection: str,
        metadata_columns: Sequence[str] = (),
        where: str = "",
        database: str = "",
        timeout: float | None = None,
    ) -> Sync:
        """Keeps `collection` equal to table `source` (schema.table) of `database` (empty: the server's own):
        each row's `text` (a SQL expression over its columns) embedded under its `id_column`, with
        `metadata_columns`, for the rows matching `where` (empty: all). Existing rows are queued at once."""
        request = pb.CreateSyncRequest(
            name=name,
            source=source,
            id_column=id_column,
            text=text,
            collection=collection,
            metadata_columns=list(metadata_columns),
            where=where,
            database=database,
        )
        return wire.sync(
            self._call("CreateSync", lambda s, t: s.CreateSync(request, timeout=t), self._deadline(timeout))
        )

    def list_syncs(self, *, timeout: float | None = None) -> list[Sync]:
        request = pb.ListSyncsRequest()
        reply = self._call("ListSyncs", lambda s, t: s.ListSyncs(request, timeout=t), self._deadline(timeout))
        return [wire.sync(s) for s in reply.syncs]

    def get_sync(self, name: str, *, timeout: float | None = None) -> Sync:
        request = pb.GetSyncRequest(name=name)
        return wire.sync(self._call("GetSync", lambda s, t: s.GetSync(request, timeout=t), self._deadline(timeout)))

    def pause_sync(self, name: str, *, timeout: float | None = None) -> Sync:
        request = pb.PauseSyncRequest(name=name)
        return wire.sync(self._call("PauseSync", lambda s, t: s.PauseSync(request, timeout=t), self._deadline(timeout)))

    def resume_sync(self, name: str, *, timeout: float | None = None) -> Sync:
        request = pb.ResumeSyncRequest(name=name)
        return wire.sync(
            self._call("ResumeSync", lambda s, t: s.ResumeSync(request, timeout=t), self._deadline(timeout))
        )

    def drop_sync(self, name: str, *, timeout: float | None = None) -> None:
        """Removes the sync's trigger and queue; the collection stays. A drop retried after its first answer
        was lost raises NotFound."""
        request = pb.DropSyncRequest(name=name)
        self._call("DropSync", lambda s, t: s.DropSync(request, timeout=t), self._deadline(timeout))

    def delete(
        self,
        collection: str,
        ids: Sequence[str] | None = None,
        *,
        filter: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> int:
        """Deletes the documents with these ids, or those whose metadata contains `filter`; how many."""
        deadline = self._deadline(timeout)
        requests = calls.delete_requests(collection, ids, filter, self._limits(deadline))
        replies = self._map(
            "DeleteDocuments", lambda s, t, r: s.DeleteDocuments(r, timeout=t), requests, [0] * len(requests), deadline
        )
        return sum(r.deleted for r in replies)

    def ingest(
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
        """Streams `documents` into `collection` (which must exist) over one Ingest stream, in batches of at most
        `batch_size` (fewer when the server's limits say so), `window` of them in flight; see
        embedpool.client.ingest.

        `checkpoint`: a file recording how far the server has acknowledged; with `resume`, a run continues after
        what the file's run had acknowledged (`documents` must give the same documents again; a
        `sources.FileSource` seeks to the place). The file is removed once everything is acknowledged.
        `bulk`: an empty collection is loaded without its HNSW index, built when the stream ends.
        `progress` is called at the start and after each acknowledgement; what it raises ends the ingest.
        `timeout`: for the whole ingest; None (not the client's timeout) for no limit.
        """
        deadline = Deadline(timeout)
        ledger = IngestLedger(
            as_source(documents),
            collection=collection,
            target=self._checkpoint_target(),
            limits=self._limits(deadline),
            batch_size=batch_size,
            window=window,
            truncate=truncate,
            checkpoint_file=checkpoint_file(checkpoint),
            resume=resume,
            progress=progress,
        )
        ingest_sync.run_ingest(ledger, self._stubs, Attempts(self._retry, deadline, "Ingest", self._targets), bulk=bulk)
        return ledger.finish()
