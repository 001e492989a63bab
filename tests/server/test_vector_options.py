"""gRPC's vector options, as HTTP has them: Matryoshka `dimensions`, float16 packing, and the limits ModelInfo
announces. On a real server whose model is declared to take 128 dimensions (`--matryoshka-dims 128`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from numpy.typing import NDArray

from embedpool.server.app import Running
from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc

from ..conftest import SettingsFactory, serving

TEXTS = ["The cat sat on the mat.", "Stock markets fell sharply today.", "A kitten naps on a rug."]


@pytest.fixture(scope="module")
def matryoshka(tmp_path_factory: pytest.TempPathFactory, make_settings: SettingsFactory) -> Iterator[Running]:
    settings = make_settings(tmp_path_factory.mktemp("matryoshka"), matryoshka_dims=(128,), max_request_documents=7)
    with serving(settings) as running:
        yield running


@pytest.fixture(scope="module")
def stub(matryoshka: Running) -> Iterator[pb_grpc.EmbedderStub]:
    with grpc.insecure_channel(f"127.0.0.1:{matryoshka.port}") as channel:
        yield pb_grpc.EmbedderStub(channel)


def _embed(stub: pb_grpc.EmbedderStub, **options: Any) -> pb.EmbedResponse:
    request = pb.EmbedRequest(documents=[pb.Document(text=t) for t in TEXTS], **options)
    reply: pb.EmbedResponse = stub.Embed(request, timeout=60)
    return reply


def _unpack(reply: pb.EmbedResponse, dtype: str = "<f4") -> NDArray[np.float32]:
    return np.stack([np.frombuffer(v, dtype=dtype).astype(np.float32) for v in reply.vectors])


def test_dimensions_truncate_and_normalise_again(stub: pb_grpc.EmbedderStub) -> None:
    full = _unpack(_embed(stub))
    reply = _embed(stub, dimensions=128)
    short = _unpack(reply)
    assert reply.dim == 128 and short.shape == (3, 128)
    expected = full[:, :128] / np.linalg.norm(full[:, :128], axis=1, keepdims=True)
    assert ((short * expected).sum(axis=1) >= 0.99999).all()
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-5)
    assert _embed(stub, dimensions=384).dim == 384  # the full size is always accepted


@pytest.mark.parametrize(
    ("options", "field"),
    [({"dimensions": 100}, "dimensions: all-MiniLM-L6-v2 returns 384, 128"), ({"dimensions": 0}, "dimensions")],
)
def test_sizes_the_model_was_not_trained_for_are_refused(
    stub: pb_grpc.EmbedderStub, options: dict[str, Any], field: str
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        _embed(stub, **options)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in str(refused.value.details())


def test_dimensions_with_a_collection_are_refused(stub: pb_grpc.EmbedderStub) -> None:
    stub.CreateCollection(pb.CreateCollectionRequest(name="full"), timeout=30)
    with pytest.raises(grpc.RpcError) as refused:
        _embed(stub, collection="full", dimensions=128)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "collection holds full vectors" in str(refused.value.details())


def test_float16_halves_the_bytes_within_1e3(stub: pb_grpc.EmbedderStub) -> None:
    full = _unpack(_embed(stub))
    reply = _embed(stub, encoding=pb.VECTOR_ENCODING_FLOAT16)
    assert reply.encoding == pb.VECTOR_ENCODING_FLOAT16
    assert all(len(v) == 2 * 384 for v in reply.vectors)
    np.testing.assert_allclose(_unpack(reply, "<f2"), full, atol=1e-3)


def test_search_returns_vectors_in_the_encoding_asked_for(stub: pb_grpc.EmbedderStub) -> None:
    stub.CreateCollection(pb.CreateCollectionRequest(name="packed"), timeout=30)
    stored = _unpack(_embed(stub, collection="packed"))
    for encoding, dtype in ((pb.VECTOR_ENCODING_FLOAT32, "<f4"), (pb.VECTOR_ENCODING_FLOAT16, "<f2")):
        request = pb.SearchRequest(collection="packed", text=TEXTS[0], k=1, include_vectors=True, encoding=encoding)
        hit = stub.Search(request, timeout=30).hits[0]
        vector = np.frombuffer(hit.vector, dtype=dtype).astype(np.float32)
        assert vector.size == 384
        np.testing.assert_allclose(vector, stored[0], atol=1e-3)


def test_model_info_announces_sizes_and_limits(stub: pb_grpc.EmbedderStub, matryoshka: Running) -> None:
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    assert list(info.dimensions) == [128]
    settings = matryoshka.settings
    assert info.limits.max_request_documents == settings.max_request_documents == 7
    assert info.limits.max_request_bytes == settings.max_request_bytes
    assert info.limits.max_search_k == settings.max_search_k
    assert info.limits.max_delete_ids == settings.max_delete_ids
