"""gRPC's vector options, as HTTP has them: Matryoshka `dimensions` (for Embed and for collections), the packed
encodings (float16, int8 with a scale per vector, sign bits) and the limits ModelInfo announces. On a real
server whose model is declared to take 128 dimensions (`--matryoshka-dims 128`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from numpy.typing import NDArray

from embedpool import cli
from embedpool.client import Client, Document
from embedpool.errors import InvalidArgument
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
    assert "dim it was created with" in str(refused.value.details())


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


def _int8_within_a_step(decoded: NDArray[np.float32], full: NDArray[np.float32]) -> None:
    """int8: every component within one quantization step (max |x| / 127) of the float32 one, per vector."""
    step = np.abs(full).max(axis=1, keepdims=True) / 127
    assert (np.abs(decoded - full) <= step / 2 + 1e-7).all()


def test_int8_packs_a_scale_then_dim_int8(stub: pb_grpc.EmbedderStub) -> None:
    full = _unpack(_embed(stub))
    reply = _embed(stub, encoding=pb.VECTOR_ENCODING_INT8)
    assert reply.encoding == pb.VECTOR_ENCODING_INT8 and all(len(v) == 4 + 384 for v in reply.vectors)
    scales = np.array([np.frombuffer(v[:4], "<f4")[0] for v in reply.vectors])
    np.testing.assert_allclose(scales, np.abs(full).max(axis=1) / 127, rtol=1e-6)
    q = np.stack([np.frombuffer(v[4:], np.int8) for v in reply.vectors]).astype(np.float32)
    _int8_within_a_step(q * scales[:, None].astype(np.float32), full)
    assert (np.abs(q).max(axis=1) == 127).all()  # the largest component uses the whole range


def test_binary_packs_the_sign_bits(stub: pb_grpc.EmbedderStub) -> None:
    full = _unpack(_embed(stub))
    reply = _embed(stub, encoding=pb.VECTOR_ENCODING_BINARY)
    assert all(len(v) == 384 // 8 for v in reply.vectors)
    bits = np.unpackbits(np.stack([np.frombuffer(v, np.uint8) for v in reply.vectors]), axis=1)
    np.testing.assert_array_equal(bits, (full > 0).astype(np.uint8))
    short = _embed(stub, dimensions=128, encoding=pb.VECTOR_ENCODING_BINARY)
    assert short.dim == 128 and all(len(v) == 16 for v in short.vectors)


def test_an_unknown_encoding_is_refused(stub: pb_grpc.EmbedderStub) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        _embed(stub, encoding=9)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "encoding" in str(refused.value.details())


def test_the_client_decodes_every_encoding(matryoshka: Running) -> None:
    """int8 comes back dequantized to float32, binary as packed sign bits (uint8), in Embed and Search."""
    with Client(f"127.0.0.1:{matryoshka.port}") as client:
        full = client.embed(TEXTS)
        np.testing.assert_allclose(client.embed(TEXTS, encoding="float16"), full, atol=1e-3)
        int8 = client.embed(TEXTS, encoding="int8")
        assert int8.dtype == np.float32
        _int8_within_a_step(int8, full)
        bits = client.embed(TEXTS, encoding="binary")
        assert bits.dtype == np.uint8 and bits.shape == (3, 48)
        np.testing.assert_array_equal(np.unpackbits(bits, axis=1), (full > 0).astype(np.uint8))
        with pytest.raises(InvalidArgument, match="encoding"):
            client.embed(TEXTS, encoding="int4")  # type: ignore[call-overload]
        client.create_collection("decoded", exist_ok=True)
        client.upsert("decoded", [Document(t, id=str(i)) for i, t in enumerate(TEXTS)])
        for name in ("int8", "binary"):
            hit = client.search("decoded", TEXTS[1], k=1, include_vectors=True, encoding=name)[0]
            assert hit.id == "1" and hit.vector is not None
            if name == "int8":
                _int8_within_a_step(np.asarray(hit.vector, np.float32)[None, :], full[1:2])
            else:
                packed = np.asarray(hit.vector, np.uint8)
                np.testing.assert_array_equal(np.unpackbits(packed), (full[1] > 0).astype(np.uint8))


def test_a_collection_of_a_declared_matryoshka_size(matryoshka: Running, stub: pb_grpc.EmbedderStub) -> None:
    """Stored vectors are the first 128 components normalised again; text searches are cut the same way."""
    created = stub.CreateCollection(pb.CreateCollectionRequest(name="short", dimensions=128), timeout=30)
    assert created.dim == 128
    reply = _embed(stub, collection="short")
    full = _unpack(_embed(stub))
    expected = full[:, :128] / np.linalg.norm(full[:, :128], axis=1, keepdims=True)
    assert reply.dim == 128
    np.testing.assert_allclose(_unpack(reply), expected, atol=1e-6)
    hits = stub.Search(pb.SearchRequest(collection="short", text=TEXTS[2], k=3), timeout=30).hits
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose([h.score for h in hits], np.sort(expected @ expected[2])[::-1], atol=1e-5)
    with Client(f"127.0.0.1:{matryoshka.port}") as client:
        assert client.get_collection("short").dim == 128
        client.create_collection("short16", storage="float16", dimensions=128)
        assert {c.name: (c.dim, c.storage) for c in client.list_collections()}["short16"] == (128, "float16")


def test_the_ingest_command_creates_a_collection_of_a_declared_size(
    matryoshka: Running, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"id": f"d{i}", "text": text}) + "\n" for i, text in enumerate(TEXTS)))
    command = ["ingest", "short-cli", str(source), "--target", f"127.0.0.1:{matryoshka.port}", "--quiet"]
    assert cli.main([*command, "--dimensions", "128"]) == 0
    assert json.loads(capsys.readouterr().out)["inserted"] == len(TEXTS)
    with Client(f"127.0.0.1:{matryoshka.port}") as client:
        assert client.get_collection("short-cli").dim == 128
    assert cli.main([*command, "--dimensions", "64"]) == 1  # a size the model does not declare
    assert "InvalidArgument" in capsys.readouterr().err
