"""Collections stored as float32, float16 or binary, over gRPC on the real server and model: the hits of each
agree with a numpy search over the golden MiniLM vectors; reduced dimensions need a model that declares them."""

from __future__ import annotations

import uuid

import grpc
import numpy as np
import pytest
from numpy.typing import NDArray

from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc


def _numpy_top(stored: NDArray[np.float32], query: NDArray[np.float32], k: int) -> list[str]:
    cosine = stored.astype(np.float64) @ query / np.linalg.norm(stored, axis=1)
    return [f"g{i}" for i in np.argsort(-cosine, kind="stable")[:k]]


@pytest.mark.parametrize("storage", ["float32", "float16", "binary"])
def test_each_storage_finds_the_numpy_neighbours(
    stub: pb_grpc.EmbedderStub, golden: tuple[list[str], NDArray[np.float32]], storage: str
) -> None:
    # The 16 shortest golden texts: embedding all of them three times would cost seconds on a shared box.
    shortest = sorted(range(len(golden[0])), key=lambda i: len(golden[0][i]))[:16]
    texts, vectors = [golden[0][i] for i in shortest], golden[1][shortest]
    name = f"s_{storage}_{uuid.uuid4().hex[:8]}"
    created = stub.CreateCollection(pb.CreateCollectionRequest(name=name, storage=storage), timeout=30)
    assert (created.storage, created.dim) == (storage, 384)
    reply = stub.Embed(
        pb.EmbedRequest(collection=name, documents=[pb.Document(id=f"g{i}", text=t) for i, t in enumerate(texts)]),
        timeout=60,
    )
    assert reply.upsert.inserted == len(texts)
    stored = vectors.astype(np.float16).astype(np.float32) if storage == "float16" else vectors
    for q in range(0, len(texts), 3):
        request = pb.SearchRequest(collection=name, vector=vectors[q].astype("<f4").tobytes(), k=10)
        hits = stub.Search(request, timeout=30).hits
        # Fewer documents than candidates: every storage reranks them all exactly, so the order is numpy's.
        assert [h.id for h in hits] == _numpy_top(stored, vectors[q], 10)
        assert hits[0].id == f"g{q}" and hits[0].score == pytest.approx(1.0, abs=2e-3)
    text_hits = stub.Search(pb.SearchRequest(collection=name, text=texts[3], k=1), timeout=30).hits
    assert text_hits[0].id == "g3"
    got = stub.GetCollection(pb.GetCollectionRequest(name=name), timeout=30)
    assert got.storage == storage and got.count == len(texts)
    listed = stub.ListCollections(pb.ListCollectionsRequest(), timeout=30).collections
    assert {c.name: c.storage for c in listed}[name] == storage


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.CreateCollectionRequest(name="reduced", dimensions=128), "dimensions: all-MiniLM-L6-v2 is not trained"),
        (pb.CreateCollectionRequest(name="int8", storage="int8"), "storage: must be one of float32, float16, binary"),
        (
            pb.CreateCollectionRequest(name="half2", storage="float16", index=pb.IndexOptions(halfvec=True)),
            "index.halfvec is for float32 storage",
        ),
    ],
)
def test_bad_storage_options_are_invalid_arguments(
    stub: pb_grpc.EmbedderStub, request_: pb.CreateCollectionRequest, field: str
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        stub.CreateCollection(request_, timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in str(refused.value.details())
