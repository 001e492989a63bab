"""The bidirectional Ingest stream: ordered acks, idempotent re-sends, unchanged documents not re-embedded."""

from __future__ import annotations

import queue
import uuid

import anyio
import grpc
import pytest

from embedpool.server.app import Running
from embedpool.store import Store
from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc

from ..conftest import ingest_batches


@pytest.fixture
def collection(stub: pb_grpc.EmbedderStub) -> str:
    name = f"ingest_{uuid.uuid4().hex[:10]}"
    stub.CreateCollection(pb.CreateCollectionRequest(name=name))
    return name


def _count(stub: pb_grpc.EmbedderStub, name: str) -> int:
    return stub.GetCollection(pb.GetCollectionRequest(name=name)).count


def test_acks_come_in_order_and_resending_is_harmless(stub: pb_grpc.EmbedderStub, collection: str) -> None:
    acks = list(stub.Ingest(ingest_batches(collection, 6, 20), timeout=120))
    assert [a.batch_id for a in acks] == list(range(6))
    assert all(a.upsert.inserted == 20 and not a.rejected for a in acks)
    assert acks[2].ids[3] == "d2-3"
    assert _count(stub, collection) == 120

    again = list(stub.Ingest(ingest_batches(collection, 6, 20), timeout=120))
    assert all(a.skipped_unchanged == 20 and a.upsert.unchanged == 20 and a.upsert.inserted == 0 for a in again)
    assert _count(stub, collection) == 120


def test_resume_after_an_interrupted_stream(stub: pb_grpc.EmbedderStub, collection: str) -> None:
    call = stub.Ingest(ingest_batches(collection, 8, 10), timeout=120)
    last = -1
    for ack in call:
        last = ack.batch_id
        if last == 2:
            # The client "crashes" after three acknowledgements.
            call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves RpcContext.cancel untyped
            break
    acks = list(stub.Ingest(ingest_batches(collection, 8, 10, start=last + 1), timeout=120))
    assert [a.batch_id for a in acks] == list(range(last + 1, 8))
    assert _count(stub, collection) == 80


def test_bad_batch_fails_the_stream_with_invalid_argument(stub: pb_grpc.EmbedderStub, collection: str) -> None:
    good = list(ingest_batches(collection, 2, 5))
    bad = pb.IngestRequest(batch_id=2, documents=[pb.Document(id="x", text="")])
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Ingest(iter([*good, bad]), timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "documents[0].text" in (err.value.details() or "")


@pytest.mark.parametrize(
    ("first", "code"),
    [
        (pb.IngestRequest(documents=[pb.Document(text="x")]), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.IngestRequest(collection="missing_one", documents=[pb.Document(text="x")]), grpc.StatusCode.NOT_FOUND),
    ],
)
def test_stream_without_a_known_collection_is_refused(
    stub: pb_grpc.EmbedderStub, first: pb.IngestRequest, code: grpc.StatusCode
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Ingest(iter([first]), timeout=60))
    assert err.value.code() == code


def test_later_batch_wins_for_a_repeated_id(stub: pb_grpc.EmbedderStub, collection: str) -> None:
    """Batches are embedded and stored concurrently, but one that shares an id with an earlier batch still in
    flight waits for it, so the last version of an id is kept. Earlier batches are the larger ones here: had
    they not been waited for, a later, smaller batch would commit first and be overwritten."""
    versions = [f"version {v} of the same document, with some words" for v in range(6)]

    def batch(v: int) -> pb.IngestRequest:
        filler = [pb.Document(id=f"v{v}-{i}", text=f"filler {i} of batch {v}") for i in range(60 - 10 * v)]
        return pb.IngestRequest(
            collection=collection if v == 0 else "",
            batch_id=v,
            documents=[*filler, pb.Document(id="same", text=versions[v])],
        )

    acks = list(stub.Ingest((batch(v) for v in range(6)), timeout=60))
    assert [a.batch_id for a in acks] == list(range(6))
    assert [a.upsert.inserted + a.upsert.updated for a in acks] == [61 - 10 * v for v in range(6)]
    hits = stub.Search(pb.SearchRequest(collection=collection, text=versions[5], k=1)).hits
    assert (hits[0].id, hits[0].text) == ("same", versions[5])
    assert _count(stub, collection) == 1 + sum(60 - 10 * v for v in range(6))


def _indexed(server: Running, collection: str) -> bool:
    async def stats() -> bool:
        store = await Store.open(server.database_url, max_size=1)
        try:
            return (await store.stats(collection)).indexed
        finally:
            await store.close()

    return anyio.run(stats, backend="asyncio")


def test_bulk_stream_loads_without_the_index_and_builds_it_at_the_end(
    stub: pb_grpc.EmbedderStub, collection: str, server: Running
) -> None:
    outbox: queue.Queue[pb.IngestRequest | None] = queue.Queue()
    batches = list(ingest_batches(collection, 3, 10))
    batches[0].bulk = True
    acks = stub.Ingest(iter(outbox.get, None), timeout=120)
    outbox.put(batches[0])
    assert next(acks).batch_id == 0  # type: ignore[call-overload]  # grpc-stubs lacks CallIterator.__next__
    assert not _indexed(server, collection)  # the empty collection's index was dropped for the load
    for batch in batches[1:]:
        outbox.put(batch)
    outbox.put(None)
    assert [a.batch_id for a in acks] == [1, 2]  # the stream ends once the index is built
    assert _indexed(server, collection)
    hits = stub.Search(pb.SearchRequest(collection=collection, text="batch 2 document 4 about subject 4", k=1)).hits
    assert hits[0].id == "d2-4"

    # A collection that has documents keeps its index: bulk changes nothing there.
    more = list(ingest_batches(collection, 5, 10, start=3))
    more[0].bulk = True
    assert [a.upsert.inserted for a in stub.Ingest(iter(more), timeout=120)] == [10, 10]
    assert _indexed(server, collection) and _count(stub, collection) == 50


def test_a_failed_bulk_stream_still_leaves_the_collection_indexed(
    stub: pb_grpc.EmbedderStub, collection: str, server: Running
) -> None:
    batches = list(ingest_batches(collection, 2, 10))
    batches[0].bulk = True
    batches[1].documents[3].text = " "  # INVALID_ARGUMENT ends the stream after batch 0
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Ingest(iter(batches), timeout=120))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "documents[3].text" in (err.value.details() or "")
    assert _indexed(server, collection)
    assert _count(stub, collection) in (0, 10)  # batch 0 was stored unless the error came first
