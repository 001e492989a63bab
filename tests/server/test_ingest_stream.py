"""The Ingest pipeline itself (embedpool.service.ingest) over a real store: concurrent stores, in-order
acks, ids shared between batches stored in stream order, the first error in stream order ends the stream.

Batches come pre-embedded (random unit vectors) so the store's timing, not the model's, decides the race."""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator

import anyio
import numpy as np
import pytest

from embedpool.errors import Unavailable
from embedpool.server.app import Running
from embedpool.service.documents import WriteOutcome
from embedpool.service.ingest import run_ingest
from embedpool.service.writes import EmbeddedBatch
from embedpool.store import DocumentRow, Store, UpsertResult
from embedpool.v1 import embedpool_pb2 as pb

pytestmark = pytest.mark.anyio
DIM = 8


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def store(server: Running) -> AsyncIterator[tuple[Store, str]]:
    s = await Store.open(server.database_url, max_size=4)
    name = f"stream_{uuid.uuid4().hex[:10]}"
    await s.create_collection(name, model="m", dim=DIM)
    try:
        yield s, name
    finally:
        await s.drop_collection(name)
        await s.close()


def _batch(collection: str, docs: dict[str, str]) -> EmbeddedBatch:
    rng = np.random.default_rng(len(docs))
    vectors = rng.standard_normal((len(docs), DIM)).astype(np.float32)
    rows = [
        DocumentRow(doc_id, text, {}, text.encode(), vector)
        for (doc_id, text), vector in zip(docs.items(), vectors, strict=True)
    ]
    return EmbeddedBatch(collection, list(docs), rows, [1] * len(docs), None, {}, truncate=True, deadline=math.inf)


async def _requests(n: int) -> AsyncIterator[pb.IngestRequest]:
    for b in range(n):
        yield pb.IngestRequest(batch_id=b)


async def _text(store: Store, collection: str, doc_id: str, probe: DocumentRow) -> str:
    (hit,) = [h for h in await store.search(collection, probe.embedding, k=50) if h.id == doc_id]
    return hit.text


async def _nothing(_: pb.IngestRequest) -> None:
    return None


@pytest.mark.parametrize("stores", [2, 1])
async def test_stores_overlap_acks_keep_order_and_shared_ids_wait(store: tuple[Store, str], stores: int) -> None:
    """Batch 0 stores slowly. With two stores at once, batch 2 shares no id with it and is stored meanwhile;
    batch 1 shares "same" and waits for it, so its version is the one kept. With one, no two stores ever
    overlap. Acks come 0, 1, 2 either way."""
    s, name = store
    batches = [
        _batch(name, {"same": "version 0", "a": "a"}),
        _batch(name, {"same": "version 1"}),
        _batch(name, {"b": "b", "c": "c"}),
    ]
    finished: list[int] = []
    acked: list[int] = []
    running = [0, 0]  # now, most at once

    async def embed(request: pb.IngestRequest, _: None) -> EmbeddedBatch:
        return batches[request.batch_id]

    async def slow_store(batch: EmbeddedBatch) -> WriteOutcome:
        running[0] += 1
        running[1] = max(running)
        index = batches.index(batch)
        if index == 0:
            await anyio.sleep(0.5)
        result = await s.upsert(name, batch.rows)
        finished.append(index)
        running[0] -= 1
        return WriteOutcome(batch.ids, batch.token_counts, None, result, 0)

    async def ack(request: pb.IngestRequest, outcome: WriteOutcome) -> None:
        acked.append(request.batch_id)

    await run_ingest(_requests(3), _nothing, embed, slow_store, ack, window=4, stores=stores)
    assert acked == [0, 1, 2]
    assert running[1] == stores
    assert finished.index(0) < finished.index(1)
    if stores == 2:
        assert finished.index(2) < finished.index(0)
    assert await _text(s, name, "same", batches[1].rows[0]) == "version 1"
    assert (await s.stats(name)).count == 4


async def test_the_first_error_in_stream_order_ends_the_stream(store: tuple[Store, str]) -> None:
    """Batch 1 fails while batch 2 (stored concurrently) succeeds: acks stop after batch 0, the error comes
    out, and batch 2's rows are committed but unacknowledged, so a resend from batch 1 changes nothing."""
    s, name = store
    batches = [_batch(name, {"x": "x"}), _batch(name, {"y": "y"}), _batch(name, {"z": "z"})]
    acked: list[int] = []

    async def embed(request: pb.IngestRequest, _: None) -> EmbeddedBatch:
        return batches[request.batch_id]

    async def failing_store(batch: EmbeddedBatch) -> WriteOutcome:
        if batch is batches[1]:
            await anyio.sleep(0.2)
            raise Unavailable("database went away")
        result = await s.upsert(name, batch.rows)
        return WriteOutcome(batch.ids, batch.token_counts, None, result, 0)

    async def ack(request: pb.IngestRequest, outcome: WriteOutcome) -> None:
        acked.append(request.batch_id)

    with pytest.raises(ExceptionGroup) as raised:
        await run_ingest(_requests(3), _nothing, embed, failing_store, ack, window=4, stores=2)
    assert raised.group_contains(Unavailable, match="went away")
    assert acked == [0]
    resent = [(await s.upsert(name, b.rows)) for b in batches[1:]]
    assert [(r.inserted, r.unchanged) for r in resent] == [(1, 0), (0, 1)]
    assert (await s.stats(name)).count == 3


async def test_a_failed_acknowledgement_ends_the_stream_with_its_own_error() -> None:
    """The client is gone (or the server stops): writing an ack fails while the reader still has batches. The
    stream ends with that error alone, not with the upstream stages' broken pipes (INTERNAL to the caller)."""

    async def embed(request: pb.IngestRequest, _: None) -> EmbeddedBatch:
        return EmbeddedBatch("c", [], [], [], None, {}, truncate=True, deadline=math.inf)

    async def store(batch: EmbeddedBatch) -> WriteOutcome:
        return WriteOutcome([], [], None, UpsertResult(), 0)

    async def ack(request: pb.IngestRequest, outcome: WriteOutcome) -> None:
        await anyio.sleep(0.05)  # the reader fills the window meanwhile, then blocks on it
        raise Unavailable("the call was cancelled")

    with pytest.raises(ExceptionGroup) as raised:
        await run_ingest(_requests(50), _nothing, embed, store, ack, window=2, stores=1)
    assert raised.group_contains(Unavailable)
    assert not raised.group_contains(anyio.BrokenResourceError)


async def test_a_draining_server_finishes_what_it_read_and_stops_reading() -> None:
    acked: list[int] = []
    stop = anyio.Event()

    async def open_stream() -> AsyncIterator[pb.IngestRequest]:
        for b in range(2):
            yield pb.IngestRequest(batch_id=b)
        await anyio.sleep_forever()  # the client keeps the stream open, as a long load does

    async def embed(request: pb.IngestRequest, _: None) -> EmbeddedBatch:
        return EmbeddedBatch("c", [], [], [], None, {}, truncate=True, deadline=math.inf)

    async def store(batch: EmbeddedBatch) -> WriteOutcome:
        return WriteOutcome([], [], None, UpsertResult(), 0)

    async def ack(request: pb.IngestRequest, outcome: WriteOutcome) -> None:
        acked.append(request.batch_id)
        if len(acked) == 2:
            stop.set()  # the server starts draining

    with anyio.fail_after(10):
        stopped = await run_ingest(open_stream(), _nothing, embed, store, ack, window=2, stores=1, stop=stop)
    assert stopped and acked == [0, 1]
