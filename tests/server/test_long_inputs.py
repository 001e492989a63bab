"""Long inputs over loopback: chunk (windows pooled into one vector) against windows embedded one by one, error,
truncate, the window cap, admission counting windows, and the HTTP door."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from numpy.typing import NDArray

from embedpool import _native
from embedpool.pool.windows import spans
from embedpool.server.app import Running
from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc

from ..conftest import SettingsFactory, serving

MAX_TOKENS = 256
WIDTH = MAX_TOKENS - 2  # content tokens of a window: [CLS] and [SEP] around each
# Words the model's vocabulary holds whole, so that a run of them is one token each and the text of a window
# is the words it covers (checked by `words` against the tokenizer).
VOCABULARY = [
    "river",
    "stone",
    "light",
    "paper",
    "garden",
    "music",
    "window",
    "market",
    "winter",
    "table",
    "story",
    "field",
    "train",
    "letter",
    "bread",
]


@pytest.fixture(scope="module")
def words(model_dir: Path) -> list[str]:
    """2,000 one-token words: a document of 2,002 tokens."""
    tokenizer = _native.Tokenizer(str(model_dir / "tokenizer.json"), max_length=MAX_TOKENS)
    _, offsets = tokenizer.encode_ragged(VOCABULARY)
    assert np.diff(offsets).tolist() == [3] * len(VOCABULARY), "each word must be one token"
    return [VOCABULARY[(i * 7 + i // 15) % len(VOCABULARY)] for i in range(2000)]


def _embed(stub: pb_grpc.EmbedderStub, texts: list[str], **kwargs: Any) -> pb.EmbedResponse:
    return stub.Embed(pb.EmbedRequest(documents=[pb.Document(text=t) for t in texts], **kwargs), timeout=120)


def _vectors(reply: pb.EmbedResponse) -> NDArray[np.float32]:
    return np.stack([np.frombuffer(v, dtype="<f4") for v in reply.vectors])


def _refused(stub: pb_grpc.EmbedderStub, texts: list[str], **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        _embed(stub, texts, **kwargs)
    return caught.value


@pytest.mark.parametrize("overlap", [0, 64])
def test_chunk_is_the_token_weighted_mean_of_its_windows(
    stub: pb_grpc.EmbedderStub, words: list[str], overlap: int
) -> None:
    document = " ".join(words)
    reply = _embed(stub, [document, "a short one"], long_inputs=pb.LONG_INPUTS_CHUNK, chunk_overlap_tokens=overlap)
    windows = spans(len(words), WIDTH, overlap)
    assert list(reply.window_counts) == [len(windows), 1]
    assert list(reply.token_counts) == [2002, 5]
    got = _vectors(reply)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)

    alone = _vectors(_embed(stub, [" ".join(words[a:b]) for a, b in windows]))
    weights = np.array([b - a for a, b in windows], dtype=np.float64)
    mean = (alone.astype(np.float64) * weights[:, None]).sum(axis=0)
    np.testing.assert_allclose(got[0], mean / np.linalg.norm(mean), atol=1e-5)
    # A text that fits one window is embedded as truncation would.
    np.testing.assert_allclose(got[1], _vectors(_embed(stub, ["a short one"]))[0], atol=1e-6)


def test_error_refuses_and_truncate_is_unchanged(stub: pb_grpc.EmbedderStub, words: list[str]) -> None:
    document = " ".join(words)
    for kwargs in ({"long_inputs": pb.LONG_INPUTS_ERROR}, {"truncate": False}):
        error = _refused(stub, ["fine", document], **kwargs)
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "documents[1].text" in (error.details() or "")
    default = _embed(stub, [document])
    explicit = _embed(stub, [document], long_inputs=pb.LONG_INPUTS_TRUNCATE, truncate=True)
    assert list(default.token_counts) == list(explicit.token_counts) == [MAX_TOKENS]
    assert not default.window_counts
    first = _vectors(_embed(stub, [" ".join(words[:WIDTH])]))
    np.testing.assert_allclose(_vectors(default), first, atol=1e-6)
    np.testing.assert_array_equal(_vectors(default), _vectors(explicit))


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"max_windows": 8}, "documents[1].text"),  # 1 + 8 windows
        ({"max_windows": 100_000}, "max_windows"),  # over the server's limit
        ({"chunk_overlap_tokens": MAX_TOKENS // 2}, "chunk_overlap_tokens"),
        ({"truncate": False}, "truncate"),
    ],
)
def test_chunk_options_are_checked(
    stub: pb_grpc.EmbedderStub, words: list[str], kwargs: dict[str, Any], named: str
) -> None:
    error = _refused(stub, ["fine", " ".join(words)], long_inputs=pb.LONG_INPUTS_CHUNK, **kwargs)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert named in (error.details() or "")


def test_chunk_options_need_chunk(stub: pb_grpc.EmbedderStub) -> None:
    error = _refused(stub, ["fine"], chunk_overlap_tokens=8)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "long_inputs chunk" in (error.details() or "")


def test_chunked_documents_are_stored_pooled_through_every_door(
    server: Running, stub: pb_grpc.EmbedderStub, words: list[str]
) -> None:
    stub.CreateCollection(pb.CreateCollectionRequest(name="long-inputs"), timeout=60)
    document = " ".join(words)
    chunk: dict[str, Any] = {"long_inputs": pb.LONG_INPUTS_CHUNK, "chunk_overlap_tokens": 16}
    pooled = _vectors(_embed(stub, [document], **chunk))[0]
    stored = stub.Embed(
        pb.EmbedRequest(documents=[pb.Document(id="embed", text=document)], collection="long-inputs", **chunk),
        timeout=120,
    )
    assert stored.upsert.inserted == 1 and list(stored.token_counts) == [2002]
    np.testing.assert_allclose(_vectors(stored)[0], pooled, atol=1e-6)
    batch = pb.IngestRequest(collection="long-inputs", documents=[pb.Document(id="ingest", text=document)], **chunk)
    acks = list(stub.Ingest(iter([batch]), timeout=120))
    assert acks[0].upsert.inserted == 1
    with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=120) as http:
        body = {"documents": [{"id": "http", "text": document}], "long_inputs": "chunk", "chunk_overlap_tokens": 16}
        assert http.post("/v1/collections/long-inputs/documents", json=body).json()["inserted"] == 1
    search = pb.SearchRequest(collection="long-inputs", vector=pooled.astype("<f4").tobytes(), k=3)
    hits = stub.Search(search, timeout=60).hits
    assert sorted(hit.id for hit in hits) == ["embed", "http", "ingest"]
    assert min(hit.score for hit in hits) == pytest.approx(1.0, abs=1e-5)
    # The row depends on how the text was embedded: sent again truncated it is another vector, then chunked again.
    again = {"collection": "long-inputs", "skip_vectors": True}
    assert _embed(stub, [document], **chunk, **again).upsert.inserted == 1  # a derived id: a new row
    assert _embed(stub, [document], **chunk, **again).upsert.unchanged == 1
    assert _embed(stub, [document], **again).upsert.updated == 1
    assert _embed(stub, [document], **chunk, **again).upsert.updated == 1


def _rows(stub: pb_grpc.EmbedderStub, collection: str, parent: str) -> list[pb.SearchHit]:
    """Every window row of `parent`, in window order."""
    query = pb.SearchRequest(collection=collection, text="river", k=100)
    query.filter.update({"parent_id": parent})
    return sorted(stub.Search(query, timeout=60).hits, key=lambda hit: float(hit.metadata["window"]))  # type: ignore[arg-type]


def test_windows_stored_as_passages_of_their_document(
    server: Running, stub: pb_grpc.EmbedderStub, words: list[str]
) -> None:
    stub.CreateCollection(pb.CreateCollectionRequest(name="passages"), timeout=60)
    document = " ".join(words)
    store: dict[str, Any] = {"collection": "passages", "long_inputs": pb.LONG_INPUTS_CHUNK, "store_windows": True}
    docs = [pb.Document(id="doc", text=document), pb.Document(id="other", text="bread and table")]
    reply = stub.Embed(pb.EmbedRequest(documents=docs, **store), timeout=120)
    windows = spans(len(words), WIDTH, 0)
    assert list(reply.ids) == [f"doc#w{k}" for k in range(len(windows))] + ["other#w0"]
    assert reply.upsert.inserted == len(windows) + 1
    rows = _rows(stub, "passages", "doc")
    assert [row.id for row in rows] == list(reply.ids)[:-1]
    for k, (row, (start, end)) in enumerate(zip(rows, windows, strict=True)):
        meta = row.metadata
        assert (meta["window"], meta["windows"], meta["token_start"], meta["token_end"]) == (
            k,
            len(windows),
            start,
            end,
        )
        chars = slice(int(meta["char_start"]), int(meta["char_end"]))  # type: ignore[arg-type]  # Struct numbers
        assert row.text == document[chars] == " ".join(words[start:end])
    # Each row's vector is its own text's.
    alone = _vectors(_embed(stub, [rows[3].text]))[0]
    np.testing.assert_allclose(_vectors(reply)[3], alone, atol=1e-6)

    query = pb.SearchRequest(collection="passages", text=rows[3].text, k=2, best_window_per_parent=True)
    best = stub.Search(query, timeout=60).hits
    assert [hit.id for hit in best] == ["doc#w3", "other#w0"]
    query.best_window_per_parent = False
    ungrouped = [hit.id for hit in stub.Search(query, timeout=60).hits]
    assert ungrouped[0] == "doc#w3" and ungrouped[1].startswith("doc#w")

    # The HTTP door: the same rows through the upsert route, one hit per document from its search.
    with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=120) as http:
        body = {"documents": [{"id": "web", "text": document}], "long_inputs": "chunk", "store_windows": True}
        assert http.post("/v1/collections/passages/documents", json=body).json()["ids"][3] == "web#w3"
        search = {"query": rows[3].text, "k": 3, "best_window_per_parent": True}
        found = http.post("/v1/collections/passages/search", json=search).json()["data"]
        assert sorted(hit["id"] for hit in found) == ["doc#w3", "other#w0", "web#w3"]

    # Shorter again: its extra windows go; the same again changes nothing.
    shorter = pb.Document(id="doc", text=" ".join(words[: 2 * WIDTH + 10]))
    assert stub.Embed(pb.EmbedRequest(documents=[shorter], **store), timeout=120).upsert.updated == 3
    assert [row.id for row in _rows(stub, "passages", "doc")] == ["doc#w0", "doc#w1", "doc#w2"]
    again = stub.Embed(pb.EmbedRequest(documents=[shorter], skip_vectors=True, **store), timeout=120)
    assert again.upsert.unchanged == 3


def test_concurrent_versions_of_a_document_never_leave_its_windows_mixed(
    server: Running, stub: pb_grpc.EmbedderStub, words: list[str]
) -> None:
    """A 4-window and a 2-window version of one document, sent at once, round after round: each write's rows and
    its removal of the longer version's extra windows are one transaction, so what is stored is always one whole
    version (separate statements could leave the long version's first windows with its last ones removed)."""
    stub.CreateCollection(pb.CreateCollectionRequest(name="versions"), timeout=60)
    store: dict[str, Any] = {"collection": "versions", "long_inputs": pb.LONG_INPUTS_CHUNK, "store_windows": True}
    for r in range(6):  # new words each round: every version is embedded and written again
        versions = [" ".join(words[r : r + 4 * WIDTH]), " ".join(words[r + 1 : r + 1 + 2 * WIDTH])]
        requests = [
            pb.EmbedRequest(documents=[pb.Document(id="doc", text=text)], skip_vectors=True, **store)
            for text in versions
        ]
        with ThreadPoolExecutor(2) as pool:
            replies = list(pool.map(lambda q: stub.Embed(q, timeout=120), requests))
        assert [len(reply.ids) for reply in replies] == [4, 2]
        rows = _rows(stub, "versions", "doc")
        assert [row.id for row in rows] == [f"doc#w{k}" for k in range(len(rows))]
        counts = {int(row.metadata["windows"]) for row in rows}  # type: ignore[arg-type]  # Struct numbers
        assert counts == {len(rows)}, (r, [dict(row.metadata) for row in rows])
        whole = next(text for text in versions if text.startswith(rows[0].text))
        assert whole.endswith(rows[-1].text)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [({"collection": "passages"}, "long_inputs chunk"), ({"long_inputs": pb.LONG_INPUTS_CHUNK}, "collection")],
)
def test_store_windows_needs_chunk_and_a_collection(
    stub: pb_grpc.EmbedderStub, kwargs: dict[str, Any], named: str
) -> None:
    error = _refused(stub, ["fine"], store_windows=True, **kwargs)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert named in (error.details() or "")


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory, make_settings: SettingsFactory) -> Iterator[Running]:
    """An admission budget of 4 documents: a document of 8 windows can never be admitted."""
    settings = make_settings(tmp_path_factory.mktemp("long-inputs"), max_concurrent_inputs=4, max_request_documents=4)
    with serving(settings) as running:
        yield running


def test_admission_counts_windows(small_server: Running, words: list[str]) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{small_server.port}") as channel:
        stub = pb_grpc.EmbedderStub(channel)
        error = _refused(stub, [" ".join(words)], long_inputs=pb.LONG_INPUTS_CHUNK)
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        fits = _embed(stub, [" ".join(words[: 3 * WIDTH])], long_inputs=pb.LONG_INPUTS_CHUNK)
        assert list(fits.window_counts) == [3]


def test_http_door(server: Running, stub: pb_grpc.EmbedderStub, words: list[str]) -> None:
    document = " ".join(words)
    with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=120) as http:
        body = {"model": "all-MiniLM-L6-v2", "input": [document], "long_inputs": "chunk", "chunk_overlap_tokens": 32}
        reply = http.post("/v1/embeddings", json=body)
        assert reply.status_code == 200, reply.text
        answer = reply.json()
        assert answer["window_counts"] == [len(spans(len(words), WIDTH, 32))]
        assert answer["usage"]["prompt_tokens"] == 2002
        grpc_reply = _embed(stub, [document], long_inputs=pb.LONG_INPUTS_CHUNK, chunk_overlap_tokens=32)
        np.testing.assert_allclose(answer["data"][0]["embedding"], _vectors(grpc_reply)[0], atol=1e-6)

        refused = http.post("/v1/embeddings", json={**body, "long_inputs": "error", "chunk_overlap_tokens": 0})
        assert refused.status_code == 400, refused.text
        assert "input[0]" in refused.json()["error"]["message"]
        plain = http.post("/v1/embeddings", json={"model": body["model"], "input": [document]}).json()
        assert "window_counts" not in plain
        assert plain["usage"]["prompt_tokens"] == MAX_TOKENS
