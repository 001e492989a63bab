"""Embed over loopback: golden vectors, order, unit length, truncation and request ids."""

from __future__ import annotations

import random
from typing import Any, cast

import grpc
import numpy as np
import pytest
from numpy.typing import NDArray

from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc


def _vectors(reply: pb.EmbedResponse) -> NDArray[np.float32]:
    return np.stack([np.frombuffer(v, dtype="<f4") for v in reply.vectors])


def _embed(stub: pb_grpc.EmbedderStub, texts: list[str], **kwargs: Any) -> pb.EmbedResponse:
    return stub.Embed(pb.EmbedRequest(documents=[pb.Document(text=t) for t in texts], **kwargs), timeout=60)


def test_embed_matches_sentence_transformers(
    stub: pb_grpc.EmbedderStub, golden: tuple[list[str], NDArray[np.float32]]
) -> None:
    texts, expected = golden
    reply = _embed(stub, texts)
    got = _vectors(reply)
    assert reply.dim == expected.shape[1] == got.shape[1]
    assert len(reply.vectors) == len(texts)
    cosines = (got * expected).sum(axis=1)
    assert cosines.min() >= 0.9999, f"worst golden text: {texts[int(cosines.argmin())][:60]!r} cos={cosines.min()}"
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_vectors_come_back_in_request_order(
    stub: pb_grpc.EmbedderStub, golden: tuple[list[str], NDArray[np.float32]]
) -> None:
    texts, expected = golden
    order = list(range(len(texts)))
    random.Random(7).shuffle(order)
    got = _vectors(_embed(stub, [texts[i] for i in order]))
    cosines = (got * expected[order]).sum(axis=1)
    assert cosines.min() >= 0.9999


def test_token_counts_and_truncation(stub: pb_grpc.EmbedderStub) -> None:
    reply = _embed(stub, ["hello", "word " * 1000])
    assert reply.token_counts[0] == 3  # [CLS] hello [SEP]
    assert reply.token_counts[1] == 256  # truncated at the model's limit, like sentence-transformers


def test_truncate_false_rejects_long_text(stub: pb_grpc.EmbedderStub) -> None:
    try:
        _embed(stub, ["short", "word " * 1000], truncate=False)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "1" in (err.details() or "")
    else:
        raise AssertionError("an over-long text with truncate=false must be rejected")


def test_skip_vectors_returns_counts_only(stub: pb_grpc.EmbedderStub) -> None:
    reply = _embed(stub, ["a b c"], skip_vectors=True)
    assert list(reply.vectors) == []
    assert list(reply.token_counts) == [5]


def test_request_id_is_echoed(stub: pb_grpc.EmbedderStub) -> None:
    _, call = stub.GetModelInfo.with_call(pb.GetModelInfoRequest(), metadata=(("x-request-id", "abc-123"),))
    assert ("x-request-id", "abc-123") in list(call.trailing_metadata())
    _, call = stub.GetModelInfo.with_call(pb.GetModelInfoRequest())
    made_up = dict(call.trailing_metadata())["x-request-id"]
    assert len(made_up) == 32 and int(made_up, 16) >= 0  # the server's own, a uuid4 in hex
    with pytest.raises(grpc.RpcError) as refused:
        stub.Embed(pb.EmbedRequest(documents=[]), metadata=(("x-request-id", "refused-1"),))
    error = cast(grpc.Call, refused.value)  # a failed call's error is also its Call
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("x-request-id", "refused-1") in [tuple(m) for m in error.trailing_metadata() or ()]


def test_model_info(stub: pb_grpc.EmbedderStub) -> None:
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert (info.name, info.dim, info.max_tokens, info.pooling) == ("all-MiniLM-L6-v2", 384, 256, "mean")
    assert info.variant == "fp32" and info.device == "cpu" and info.normalized
