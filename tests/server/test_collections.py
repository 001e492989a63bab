"""Embed into a collection, Search it, and check that writes are idempotent."""

from __future__ import annotations

import uuid
from typing import cast

import grpc
import numpy as np
import pytest
from numpy.typing import NDArray

from embedpool.server.codec import dict_to_struct
from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc


@pytest.fixture(params=["vector", "halfvec"])
def collection(stub: pb_grpc.EmbedderStub, request: pytest.FixtureRequest) -> str:
    """Every test here runs against both index types: float32, and half precision reranked exactly."""
    name = f"c_{uuid.uuid4().hex[:12]}"
    halfvec = request.param == "halfvec"
    created = stub.CreateCollection(pb.CreateCollectionRequest(name=name, index=pb.IndexOptions(halfvec=halfvec)))
    assert (created.name, created.dim, created.count) == (name, 384, 0)
    assert (created.index.m, created.index.ef_construction, created.index.halfvec) == (16, 64, halfvec)
    return name


def _count(stub: pb_grpc.EmbedderStub, name: str) -> int:
    return stub.GetCollection(pb.GetCollectionRequest(name=name)).count


def _docs(texts: list[str]) -> list[pb.Document]:
    return [
        pb.Document(id=f"doc-{i}", text=t, metadata=dict_to_struct({"n": i, "even": i % 2 == 0}))
        for i, t in enumerate(texts)
    ]


def test_each_document_finds_itself(
    stub: pb_grpc.EmbedderStub, collection: str, golden: tuple[list[str], NDArray[np.float32]]
) -> None:
    texts = golden[0][:40]
    reply = stub.Embed(pb.EmbedRequest(documents=_docs(texts), collection=collection), timeout=60)
    assert list(reply.ids) == [f"doc-{i}" for i in range(len(texts))]
    assert reply.upsert.inserted == len(texts)
    for i, text in enumerate(texts):
        hits = stub.Search(pb.SearchRequest(collection=collection, text=text, k=3), timeout=30).hits
        assert hits[0].id == f"doc-{i}", f"doc-{i} did not find itself: {[h.id for h in hits]}"
        assert hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert hits[0].text == text
        assert dict(hits[0].metadata)["n"] == i
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_resending_leaves_one_row_per_id(stub: pb_grpc.EmbedderStub, collection: str) -> None:
    texts = ["alpha beta", "gamma delta", "epsilon zeta"]
    first = stub.Embed(pb.EmbedRequest(documents=_docs(texts), collection=collection))
    again = stub.Embed(pb.EmbedRequest(documents=_docs(texts), collection=collection))
    assert (first.upsert.inserted, again.upsert.inserted, again.upsert.unchanged) == (3, 0, 3)
    changed = _docs(texts)
    changed[1].text = "something else entirely"
    third = stub.Embed(pb.EmbedRequest(documents=changed, collection=collection))
    assert (third.upsert.inserted, third.upsert.updated, third.upsert.unchanged) == (0, 1, 2)
    assert _count(stub, collection) == 3


def test_derived_ids_are_stable(stub: pb_grpc.EmbedderStub, collection: str) -> None:
    docs = [pb.Document(text="no id given"), pb.Document(text="no id given either")]
    first = stub.Embed(pb.EmbedRequest(documents=docs, collection=collection))
    again = stub.Embed(pb.EmbedRequest(documents=docs, collection=collection))
    assert list(first.ids) == list(again.ids) and len(set(first.ids)) == 2
    assert _count(stub, collection) == 2


def test_search_by_vector_and_filter(stub: pb_grpc.EmbedderStub, collection: str) -> None:
    texts = [f"document number {i} about topic {i % 3}" for i in range(12)]
    reply = stub.Embed(pb.EmbedRequest(documents=_docs(texts), collection=collection))
    query = reply.vectors[4]
    hits = stub.Search(pb.SearchRequest(collection=collection, vector=query, k=5)).hits
    assert hits[0].id == "doc-4"
    filtered = stub.Search(
        pb.SearchRequest(collection=collection, vector=query, k=12, filter=dict_to_struct({"even": False}))
    ).hits
    assert filtered and all(cast(float, dict(h.metadata)["n"]) % 2 == 1 for h in filtered)
    assert len(filtered) == 6


def test_delete_and_drop(stub: pb_grpc.EmbedderStub, collection: str) -> None:
    stub.Embed(pb.EmbedRequest(documents=_docs(["one", "two", "three"]), collection=collection))
    deleted = stub.DeleteDocuments(pb.DeleteDocumentsRequest(collection=collection, ids=["doc-0", "missing"]))
    assert deleted.deleted == 1 and _count(stub, collection) == 2
    stub.DropCollection(pb.DropCollectionRequest(name=collection))
    with pytest.raises(grpc.RpcError) as err:
        stub.Search(pb.SearchRequest(collection=collection, text="one", k=1))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_index_options_round_trip_and_are_part_of_the_definition(stub: pb_grpc.EmbedderStub) -> None:
    name = f"c_{uuid.uuid4().hex[:12]}"
    options = pb.IndexOptions(m=8, ef_construction=32, halfvec=True)
    created = stub.CreateCollection(pb.CreateCollectionRequest(name=name, index=options))
    assert created.index == options
    listed = {c.name: c for c in stub.ListCollections(pb.ListCollectionsRequest()).collections}
    assert listed[name].index == options
    assert stub.CreateCollection(pb.CreateCollectionRequest(name=name, index=options)).index == options
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateCollection(pb.CreateCollectionRequest(name=name))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS and "halfvec=True" in (err.value.details() or "")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (pb.IndexOptions(m=1), "m must be"),
        (pb.IndexOptions(m=101), "m must be"),
        (pb.IndexOptions(ef_construction=2000), "ef_construction must be"),
        (pb.IndexOptions(m=64, ef_construction=100), "at least 2 * m"),
    ],
)
def test_bad_index_options_are_invalid(stub: pb_grpc.EmbedderStub, options: pb.IndexOptions, message: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateCollection(pb.CreateCollectionRequest(name=f"c_{uuid.uuid4().hex[:12]}", index=options))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (err.value.details() or "")


def test_delete_by_filter_and_collection_stats(stub: pb_grpc.EmbedderStub, collection: str) -> None:
    stub.Embed(pb.EmbedRequest(documents=_docs([f"text number {i}" for i in range(10)]), collection=collection))
    described = stub.GetCollection(pb.GetCollectionRequest(name=collection))
    assert (described.name, described.count, described.indexed) == (collection, 10, True)
    assert described.index_bytes > 0 and described.table_bytes > 0
    deleted = stub.DeleteDocuments(
        pb.DeleteDocumentsRequest(collection=collection, filter=dict_to_struct({"even": True}))
    )
    assert deleted.deleted == 5
    assert stub.GetCollection(pb.GetCollectionRequest(name=collection)).count == 5
    hits = stub.Search(pb.SearchRequest(collection=collection, text="text number 4", k=10)).hits
    assert sorted(h.id for h in hits) == [f"doc-{i}" for i in range(1, 10, 2)]
