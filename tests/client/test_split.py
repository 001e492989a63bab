"""Inputs over a server's announced limits go out as several calls and come back whole, in input order."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from numpy.typing import NDArray
from prometheus_client import REGISTRY

from embedpool.client import Client, Document, Limits
from embedpool.errors import InvalidArgument
from embedpool.server.app import Running
from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc

from ..conftest import SettingsFactory, serving

DOCS, BYTES, IDS = 8, 4096, 5


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory, make_settings: SettingsFactory) -> Iterator[Running]:
    """A server that takes 8 documents, 4 KiB and 5 ids a request."""
    settings = make_settings(
        tmp_path_factory.mktemp("small"), max_request_documents=DOCS, max_request_bytes=BYTES, max_delete_ids=IDS
    )
    with serving(settings) as running:
        yield running


@pytest.fixture(scope="module")
def client(small: Running) -> Iterator[Client]:
    with Client(f"127.0.0.1:{small.port}") as c:
        yield c


def _calls(method: str, code: str = "OK") -> float:
    """RPCs the in-process servers have answered so far (they share this process's metrics)."""
    return REGISTRY.get_sample_value("embedpool_rpc_duration_seconds_count", {"method": method, "code": code}) or 0.0


def _embed_alone(small: Running, texts: list[str]) -> NDArray[np.float32]:
    """The texts embedded a request each, straight over the stub: what the split results must equal."""
    with grpc.insecure_channel(f"127.0.0.1:{small.port}") as channel:
        stub = pb_grpc.EmbedderStub(channel)
        rows = [stub.Embed(pb.EmbedRequest(documents=[pb.Document(text=t)])).vectors[0] for t in texts]
    return np.frombuffer(b"".join(rows), dtype="<f4").reshape(len(texts), -1)


def _assert_same_rows(got: NDArray[np.float32], want: NDArray[np.float32]) -> None:
    assert got.shape == want.shape
    cosines = np.sum(got * want, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cosines.min() >= 0.99999, cosines.argmin()


def test_the_client_reads_the_announced_limits(client: Client) -> None:
    limits = client.model_info().limits
    assert (limits.max_request_documents, limits.max_request_bytes, limits.max_delete_ids) == (DOCS, BYTES, IDS)


def test_embed_of_ten_times_the_document_limit_comes_back_in_order(small: Running, client: Client) -> None:
    texts = [f"sentence {i} on subject {i % 9}, variant {i * 7 % 11}" for i in range(10 * DOCS)]
    client.model_info()  # the limits are asked for once; not counted below
    before = _calls("Embed")
    vectors = client.embed(texts)
    assert _calls("Embed") - before == 10
    assert vectors.dtype == np.float32 and vectors.flags.writeable
    _assert_same_rows(vectors, _embed_alone(small, texts))


def test_upsert_over_the_limit_keeps_ids_in_input_order(client: Client) -> None:
    client.create_collection("split-upsert")
    documents: list[Document | str] = [
        Document(f"stored text {i}", id=f"u{i:03}", metadata={"i": i}) for i in range(77)
    ]
    documents[5] = "a plain string gets an id derived from its text"
    result = client.upsert("split-upsert", documents)
    assert result.inserted == 77 and result.rejected == []
    assert [i for n, i in enumerate(result.ids) if n != 5] == [f"u{i:03}" for i in range(77) if i != 5]
    assert result.ids[5] and result.ids[5] not in {f"u{i:03}" for i in range(77)}
    assert client.get_collection("split-upsert").count == 77
    again = client.upsert("split-upsert", documents)  # idempotent: what a retried split call does
    assert (again.inserted, again.updated, again.unchanged, again.ids) == (0, 0, 77, result.ids)


def test_texts_over_the_byte_limit_split_by_size(small: Running, client: Client) -> None:
    # About 1.4 KB each: two fit under 4 KiB with the request's own bytes, three do not.
    texts = [f"document {i}: " + " ".join(f"word{i}x{j}" for j in range(150)) for i in range(7)]
    assert all(1300 < len(t) < 2000 for t in texts)
    before = _calls("Embed")
    vectors = client.embed(texts)
    assert _calls("Embed") - before == 4
    _assert_same_rows(vectors, _embed_alone(small, texts))


def test_one_document_over_the_byte_limit_is_the_servers_to_refuse(client: Client) -> None:
    before = _calls("Embed", "INVALID_ARGUMENT")
    with pytest.raises(InvalidArgument, match="over the limit of 4096"):
        client.embed(["short", "x" * 5000])
    assert _calls("Embed", "INVALID_ARGUMENT") - before == 1  # sent once, alone, not retried


def test_an_error_names_the_document_as_the_caller_counts(client: Client) -> None:
    with pytest.raises(InvalidArgument, match=r"documents\[21\]"):
        client.embed([f"fine {i}" for i in range(21)] + ["   "])


def test_delete_over_the_id_limit(client: Client) -> None:
    client.create_collection("split-delete")
    client.upsert("split-delete", [Document(f"text {i}", id=f"d{i}") for i in range(12)])
    before = _calls("DeleteDocuments")
    assert client.delete("split-delete", [f"d{i}" for i in range(12)] + ["missing"]) == 12
    assert _calls("DeleteDocuments") - before == 3
    assert client.get_collection("split-delete").count == 0


def test_empty_inputs_need_no_call(client: Client) -> None:
    assert client.embed([]).shape == (0, 384)
    assert client.upsert("split-upsert", []).ids == []


def test_limits_given_to_the_client_replace_the_announced_ones(small: Running) -> None:
    with Client(f"127.0.0.1:{small.port}", limits=Limits(max_request_documents=3)) as c:
        before = _calls("Embed")
        assert c.embed([f"t{i}" for i in range(7)]).shape == (7, 384)
        assert _calls("Embed") - before == 3
