"""The last version sent of a document is the one stored: within a stream always, across callers the last committed.

The unchanged check (skip embedding a document whose stored hash is ours) is made when a batch is embedded,
possibly before an earlier batch of the same stream commits; it must be confirmed when the batch is stored.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedpool.server.app import Running
from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc


def _new_collection(stub: pb_grpc.EmbedderStub) -> str:
    name = f"lww_{uuid.uuid4().hex[:10]}"
    stub.CreateCollection(pb.CreateCollectionRequest(name=name))
    return name


def _stored_texts(server: Running, collection: str) -> dict[str, str]:
    with psycopg.connect(server.database_url) as conn:
        rows = conn.execute(
            "SELECT d.id, d.text FROM documents d JOIN collections c ON c.id = d.collection_id WHERE c.name = %s",
            (collection,),
        ).fetchall()
    return dict(rows)


def _filler(batch: int, n: int) -> list[pb.Document]:
    return [pb.Document(id=f"filler-{batch}-{i}", text=_filler_text(batch, i)) for i in range(n)]


def _filler_text(batch: int, i: int) -> str:
    return f"filler {i} of batch {batch} about topic {i % 11}"


def test_a_later_batch_wins_over_an_earlier_one_still_being_stored(server: Running, stub: pb_grpc.EmbedderStub) -> None:
    collection = _new_collection(stub)
    stub.Embed(pb.EmbedRequest(collection=collection, documents=[pb.Document(id="x", text="version B")]))
    batches = [
        pb.IngestRequest(
            collection=collection, batch_id=0, documents=[*_filler(0, 200), pb.Document(id="x", text="version A")]
        ),
        pb.IngestRequest(batch_id=1, documents=[pb.Document(id="x", text="version B")]),
    ]
    acks = list(stub.Ingest(iter(batches), timeout=120))
    assert _stored_texts(server, collection)["x"] == "version B"
    # Batch 1 changed the row batch 0 wrote: it must not report it as unchanged.
    assert acks[1].skipped_unchanged == 0
    assert acks[1].upsert.updated == 1


def test_a_repeated_id_in_one_batch_keeps_its_last_version(server: Running, stub: pb_grpc.EmbedderStub) -> None:
    collection = _new_collection(stub)
    stub.Embed(pb.EmbedRequest(collection=collection, documents=[pb.Document(id="y", text="second")]))
    response = stub.Embed(
        pb.EmbedRequest(
            collection=collection,
            skip_vectors=True,
            documents=[pb.Document(id="y", text="first"), pb.Document(id="y", text="second")],
        )
    )
    assert _stored_texts(server, collection)["y"] == "second"
    assert response.upsert.inserted == response.upsert.updated == 0


_IDS = ["a", "b", "c", "d"]
_VERSIONS = st.sampled_from(["v0", "v1", "v2"])
_BATCH = st.lists(st.tuples(st.sampled_from(_IDS), _VERSIONS), min_size=1, max_size=6)


@settings(max_examples=10)
@given(
    stored=st.dictionaries(st.sampled_from(_IDS), _VERSIONS),
    batches=st.lists(st.tuples(_BATCH, st.integers(0, 60)), min_size=1, max_size=5),
)
def test_random_streams_store_the_last_version_sent(
    server: Running,
    stub: pb_grpc.EmbedderStub,
    stored: dict[str, str],
    batches: list[tuple[list[tuple[str, str]], int]],
) -> None:
    collection = _new_collection(stub)
    if stored:
        initial = [pb.Document(id=i, text=f"{i} {v}") for i, v in stored.items()]
        stub.Embed(pb.EmbedRequest(collection=collection, skip_vectors=True, documents=initial))

    def requests() -> Iterator[pb.IngestRequest]:
        for b, (sent, filler) in enumerate(batches):
            documents = [*_filler(b, filler), *(pb.Document(id=i, text=f"{i} {v}") for i, v in sent)]
            yield pb.IngestRequest(collection=collection if b == 0 else "", batch_id=b, documents=documents)

    acks = list(stub.Ingest(requests(), timeout=120))
    assert [a.batch_id for a in acks] == list(range(len(batches)))

    expected = {i: f"{i} {v}" for i, v in stored.items()}
    for b, (docs, filler) in enumerate(batches):
        expected |= {f"filler-{b}-{n}": _filler_text(b, n) for n in range(filler)}
        expected |= {i: f"{i} {v}" for i, v in docs}
    texts = _stored_texts(server, collection)
    assert texts == expected
    # Every distinct id of a batch is accounted for exactly once in its ack.
    for ack, (docs, filler) in zip(acks, batches, strict=True):
        distinct = filler + len({i for i, _ in docs})
        assert ack.upsert.inserted + ack.upsert.updated + ack.upsert.unchanged == distinct
        assert ack.skipped_unchanged <= ack.upsert.unchanged


@pytest.fixture(autouse=True)
def _server_up(server: Running) -> None:
    """Hypothesis runs examples within one test call: the session server is started once before them."""
