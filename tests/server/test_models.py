"""Several models on one server: the bundled all-MiniLM-L6-v2 (the default) and a small BERT written by the test
(random weights, 32 dimensions, the MiniLM tokenizer) whose config_sentence_transformers.json declares e5-style
prompts. Requests name a model or get the default; a collection is bound to its model; prompts are the server's
to apply; each model has its own pool, admission budget and metrics.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import openai
import pytest
from numpy.typing import NDArray
from safetensors.numpy import save_file

from embedpool.model import default_checkpoint
from embedpool.server.app import Running
from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc

from ..conftest import SettingsFactory, serving
from ..model.conftest import TINY_CONFIG, TINY_HIDDEN, tiny_weights

SMALL, HIDDEN, POSITIONS = "small-e5", TINY_HIDDEN, 128
PROMPTS = {"query": "query: ", "passage": "passage: "}


def _small_checkpoint(root: Path) -> Path:
    """A sentence-transformers BERT checkpoint: random weights over the MiniLM vocabulary, mean pooling,
    normalised, with prompts."""
    vocab = json.loads((default_checkpoint() / "config.json").read_text())["vocab_size"]
    root.mkdir(parents=True)
    save_file(tiny_weights(7, vocab=vocab, positions=POSITIONS), str(root / "model.safetensors"))
    config = {**TINY_CONFIG, "vocab_size": vocab, "max_position_embeddings": POSITIONS}
    files = {
        "config.json": config,
        "modules.json": [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ],
        "1_Pooling/config.json": {"word_embedding_dimension": HIDDEN, "pooling_mode_mean_tokens": True},
        "sentence_bert_config.json": {"max_seq_length": POSITIONS},
        "config_sentence_transformers.json": {"prompts": PROMPTS, "default_prompt_name": None},
    }
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(content), encoding="utf-8")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (root / name).write_bytes((default_checkpoint() / name).read_bytes())
    return root


@pytest.fixture(scope="module")
def two_models(
    tmp_path_factory: pytest.TempPathFactory, make_settings: SettingsFactory, model_dir: Path
) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("models")
    small = _small_checkpoint(tmp / "small")
    settings = make_settings(
        tmp, model=f"{model_dir},{SMALL}={small}", max_concurrent_inputs=128, max_request_documents=64
    )
    with serving(settings) as running:
        yield running


@pytest.fixture(scope="module")
def stub(two_models: Running) -> Iterator[pb_grpc.EmbedderStub]:
    with grpc.insecure_channel(f"127.0.0.1:{two_models.port}") as channel:
        yield pb_grpc.EmbedderStub(channel)


def _vectors(reply: pb.EmbedResponse) -> NDArray[np.float32]:
    return np.stack([np.frombuffer(v, dtype="<f4") for v in reply.vectors])


def _embed(stub: pb_grpc.EmbedderStub, texts: list[str], model: str = "", input_type: str = "") -> pb.EmbedResponse:
    request = pb.EmbedRequest(documents=[pb.Document(text=t) for t in texts], model=model, input_type=input_type)
    reply: pb.EmbedResponse = stub.Embed(request)
    return reply


def test_list_models_names_both_the_default_first(stub: pb_grpc.EmbedderStub) -> None:
    models = stub.ListModels(pb.ListModelsRequest()).models
    assert [(m.name, m.dim, m.default) for m in models] == [("all-MiniLM-L6-v2", 384, True), (SMALL, HIDDEN, False)]
    assert dict(models[1].prompts) == PROMPTS and not models[0].prompts
    assert "VECTOR_ENCODING_FLOAT16" in models[0].encodings
    assert stub.GetModelInfo(pb.GetModelInfoRequest(model=SMALL)).dim == HIDDEN
    assert stub.GetModelInfo(pb.GetModelInfoRequest()).name == "all-MiniLM-L6-v2"


def test_a_request_names_its_model_or_gets_the_default(stub: pb_grpc.EmbedderStub) -> None:
    default = _embed(stub, ["a cat on a mat"])
    small = _embed(stub, ["a cat on a mat"], model=SMALL)
    hub_style = _embed(stub, ["a cat on a mat"], model=f"someorg/{SMALL}")
    assert (default.dim, small.dim) == (384, HIDDEN) and default.model.startswith("all-MiniLM-L6-v2/")
    assert small.model.startswith(f"{SMALL}/")
    np.testing.assert_array_equal(_vectors(small), _vectors(hub_style))
    with pytest.raises(grpc.RpcError) as missing:
        _embed(stub, ["x"], model="no-such-model")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND and "no-such-model" in (missing.value.details() or "")


def test_chunked_the_prompt_starts_every_window(stub: pb_grpc.EmbedderStub) -> None:
    """A 300-word query in windows of the small model's 128 positions: [CLS] "query" ":" 124 words [SEP]. Its
    vector is the mean of those windows' vectors, each embedded as the prompt and its words, weighted by words."""
    vocabulary = ["river", "stone", "light", "paper", "garden", "music", "window", "market", "winter", "table"]
    words = [vocabulary[(i * 7 + i // 10) % len(vocabulary)] for i in range(300)]
    # One token a word (the MiniLM vocabulary holds each whole).
    assert list(_embed(stub, [" ".join(vocabulary)], model=SMALL).token_counts) == [2 + len(vocabulary)]
    request = pb.EmbedRequest(
        documents=[pb.Document(text=" ".join(words))], model=SMALL, input_type="query", long_inputs=pb.LONG_INPUTS_CHUNK
    )
    chunked = stub.Embed(request, timeout=60)
    assert list(chunked.token_counts) == [2 + 2 + 300] and list(chunked.window_counts) == [3]
    spans = [(0, 124), (124, 248), (248, 300)]
    each = _vectors(_embed(stub, [" ".join(words[a:b]) for a, b in spans], model=SMALL, input_type="query"))
    mean = (each * np.array([[b - a] for a, b in spans], dtype=np.float32)).sum(axis=0)
    np.testing.assert_allclose(_vectors(chunked)[0], mean / np.linalg.norm(mean), atol=1e-5)


def test_the_models_prompt_goes_before_each_text(stub: pb_grpc.EmbedderStub) -> None:
    text = f"what is a vector database {uuid.uuid4().hex[:6]}"
    as_query = _embed(stub, [text], model=SMALL, input_type="query")
    by_hand = _embed(stub, [PROMPTS["query"] + text], model=SMALL)
    np.testing.assert_allclose(_vectors(as_query), _vectors(by_hand), atol=1e-6)
    assert list(as_query.token_counts) == list(by_hand.token_counts)  # the prompt's tokens are counted
    as_document = _embed(stub, [text], model=SMALL, input_type="document")  # the model calls it "passage"
    np.testing.assert_allclose(
        _vectors(as_document), _vectors(_embed(stub, ["passage: " + text], model=SMALL)), atol=1e-6
    )
    plain = _embed(stub, [text], model=SMALL)
    assert not np.allclose(_vectors(plain), _vectors(as_query), atol=1e-3)  # no default prompt: none applied
    # A model without prompts takes query and document as no prompt at all; other names are refused.
    np.testing.assert_array_equal(_vectors(_embed(stub, [text], input_type="query")), _vectors(_embed(stub, [text])))
    with pytest.raises(grpc.RpcError) as unknown:
        _embed(stub, [text], model=SMALL, input_type="classification")
    assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "input_type" in (unknown.value.details() or "")


def test_a_collection_is_bound_to_its_model(stub: pb_grpc.EmbedderStub) -> None:
    name = f"small_{uuid.uuid4().hex[:8]}"
    created = stub.CreateCollection(pb.CreateCollectionRequest(name=name, model=SMALL))
    assert (created.model, created.dim) == (SMALL, HIDDEN)
    docs = [pb.Document(id=f"d{i}", text=f"document {i} about {topic}") for i, topic in enumerate(["cats", "stocks"])]
    stored = stub.Embed(pb.EmbedRequest(collection=name, documents=docs))  # no model named: the collection's
    assert stored.dim == HIDDEN and stored.model.startswith(f"{SMALL}/")
    # Stored with the document prompt; a text search embeds with the query prompt.
    expected = _vectors(_embed(stub, [f"passage: {d.text}" for d in docs], model=SMALL))
    hits = stub.Search(pb.SearchRequest(collection=name, text="cats", k=2, include_vectors=True)).hits
    query = _vectors(_embed(stub, ["query: cats"], model=SMALL))[0]
    by_id = {h.id: h for h in hits}
    for i, doc in enumerate(docs):
        np.testing.assert_allclose(np.frombuffer(by_id[doc.id].vector, "<f4"), expected[i], atol=1e-5)
        assert by_id[doc.id].score == pytest.approx(float(expected[i] @ query), abs=1e-4)
    with pytest.raises(grpc.RpcError) as other_write:
        stub.Embed(pb.EmbedRequest(collection=name, documents=docs, model="all-MiniLM-L6-v2"))
    with pytest.raises(grpc.RpcError) as other_search:
        stub.Search(pb.SearchRequest(collection=name, text="cats", k=1, model="all-MiniLM-L6-v2"))
    for refused in (other_write.value, other_search.value):
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT and "model" in (refused.details() or "")


def test_each_model_has_its_own_admission_budget(two_models: Running, stub: pb_grpc.EmbedderStub) -> None:
    """One model's overload never refuses another's calls: while calls to the default overflow its share of the
    budget (RESOURCE_EXHAUSTED), every call to the small model is served."""
    metrics = httpx.get(f"http://127.0.0.1:{two_models.metrics_port}/metrics", timeout=10).text
    capacity = {
        line.split('"')[1]: float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("embedpool_permits_capacity{")
    }
    # An even share of 128 each (the default model's series is shared with the other servers of this process).
    assert capacity[SMALL] == 64.0
    refused: list[grpc.StatusCode] = []
    small_failures: list[grpc.StatusCode] = []
    lock = threading.Lock()

    def flood() -> None:
        texts = [f"a long document {i} " * 20 for i in range(64)]  # about 80 tokens: busy for seconds, not tens
        for _ in range(3):
            try:
                _embed(stub, texts)
            except grpc.RpcError as e:
                with lock:
                    refused.append(e.code())

    def small() -> None:
        for i in range(10):
            try:
                _embed(stub, [f"small model call {i}"], model=SMALL)
            except grpc.RpcError as e:
                with lock:
                    small_failures.append(e.code())

    threads = [threading.Thread(target=flood) for _ in range(4)] + [threading.Thread(target=small)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert small_failures == []
    assert refused and set(refused) == {grpc.StatusCode.RESOURCE_EXHAUSTED}, refused


def test_the_http_door_serves_both_models(two_models: Running) -> None:
    base = f"http://127.0.0.1:{two_models.http_port}/v1"
    with openai.OpenAI(base_url=base, api_key="unused") as client:
        assert [m.id for m in client.models.list().data] == ["all-MiniLM-L6-v2", SMALL]
        reply = client.embeddings.create(model=SMALL, input=["hello"])
        assert len(reply.data[0].embedding) == HIDDEN and reply.model == SMALL
        with pytest.raises(openai.NotFoundError) as missing:
            client.embeddings.create(model="text-embedding-3-small", input=["hello"])
        assert missing.value.code == "model_not_found"
    with httpx.Client(base_url=base, timeout=30) as http:
        card = http.get(f"/models/{SMALL}").json()
        assert card["prompts"] == PROMPTS and card["default"] is False
        as_query = http.post("/embeddings", json={"model": SMALL, "input": "cats", "input_type": "query"}).json()
        by_hand = http.post("/embeddings", json={"model": SMALL, "input": "query: cats"}).json()
        assert as_query["data"][0]["embedding"] == pytest.approx(by_hand["data"][0]["embedding"], abs=1e-6)
        name = f"http_{uuid.uuid4().hex[:8]}"
        created = http.post("/collections", json={"name": name, "model": SMALL}).json()
        assert (created["model"], created["dim"]) == (SMALL, HIDDEN)
