"""The official `openai` SDK against the HTTP door: the vectors equal gRPC Embed's (float, base64, and the SDK's
own default, base64 decoded by the SDK), Matryoshka sizes, and each refusal as the SDK's exception for its
status (413, 400, 404, 401, 403, 429 with Retry-After)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import httpx
import httpx2
import numpy as np
import openai
import pytest
from numpy.typing import NDArray

from embedpool.server.app import Running
from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc

from .conftest import MATRYOSHKA, MAX_DOCUMENTS, MODEL, assert_error, base_url, bearer, grpc_bearer, make_key

TENANT = "sdk"
DIM = 384


def sdk(running: Running, key: str, http_client: httpx2.Client | None = None) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{base_url(running)}/v1", api_key=key, max_retries=0, timeout=60, http_client=http_client
    )


@pytest.fixture(scope="module")
def reader(keyed_server: Running) -> str:
    return make_key(keyed_server, TENANT, "reader")


@pytest.fixture(scope="module")
def client(keyed_server: Running, reader: str) -> Iterator[openai.OpenAI]:
    with sdk(keyed_server, reader) as c:
        yield c


@pytest.fixture(scope="module")
def texts(golden: tuple[list[str], NDArray[np.float32]]) -> list[str]:
    return golden[0][:6]  # long texts (up to the 256-token limit): a few keep each request well under a second


@pytest.fixture(scope="module")
def expected(keyed_stub: pb_grpc.EmbedderStub, reader: str, texts: list[str]) -> NDArray[np.float32]:
    """gRPC Embed's vectors for `texts`: what every HTTP answer is compared with."""
    reply = keyed_stub.Embed(
        pb.EmbedRequest(documents=[pb.Document(text=t) for t in texts]), metadata=grpc_bearer(reader), timeout=60
    )
    return np.stack([np.frombuffer(v, dtype="<f4") for v in reply.vectors])


def _matrix(response: openai.types.CreateEmbeddingResponse) -> NDArray[np.float32]:
    assert [item.index for item in response.data] == list(range(len(response.data)))
    rows = [item.embedding for item in response.data]
    if isinstance(rows[0], str):
        return np.stack([np.frombuffer(base64.b64decode(row), dtype="<f4") for row in rows])
    return np.asarray(rows, dtype=np.float32)


def _assert_same(got: NDArray[np.float32], want: NDArray[np.float32]) -> None:
    assert got.shape == want.shape
    cosines = (got * want).sum(axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cosines.min() >= 0.99999, cosines


def _truncated(vectors: NDArray[np.float32], dim: int) -> NDArray[np.float32]:
    head = vectors[:, :dim]
    return head / np.linalg.norm(head, axis=1, keepdims=True)  # type: ignore[no-any-return]


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_vectors_equal_grpc_embeds(
    client: openai.OpenAI, texts: list[str], expected: NDArray[np.float32], encoding_format: str
) -> None:
    response = client.embeddings.create(input=texts, model=MODEL, encoding_format=encoding_format)  # type: ignore[arg-type]
    assert all(isinstance(item.embedding, str) == (encoding_format == "base64") for item in response.data)
    _assert_same(_matrix(response), expected)
    assert response.model == MODEL
    assert response.usage.prompt_tokens == response.usage.total_tokens > len(texts)


def test_the_sdk_default_asks_for_base64_and_decodes_it(
    keyed_server: Running, reader: str, texts: list[str], expected: NDArray[np.float32]
) -> None:
    sent: list[dict[str, object]] = []
    hooks = {"request": [lambda request: sent.append(json.loads(request.content))]}
    with httpx2.Client(event_hooks=hooks) as http, sdk(keyed_server, reader, http) as client:
        response = client.embeddings.create(input=texts, model=MODEL)
    assert sent[0]["encoding_format"] == "base64"
    assert all(isinstance(item.embedding, list) for item in response.data)
    _assert_same(_matrix(response), expected)


def test_one_text_and_a_hub_style_model_name(
    client: openai.OpenAI, texts: list[str], expected: NDArray[np.float32]
) -> None:
    response = client.embeddings.create(input=texts[0], model=f"sentence-transformers/{MODEL}", user="someone")
    assert len(response.data) == 1
    _assert_same(_matrix(response), expected[:1])


@pytest.mark.parametrize("encoding_format", ["float", "base64", None])
def test_dimensions_cut_and_renormalise_the_full_vector(
    client: openai.OpenAI, texts: list[str], expected: NDArray[np.float32], encoding_format: str | None
) -> None:
    options = {"encoding_format": encoding_format} if encoding_format else {}
    response = client.embeddings.create(input=texts, model=MODEL, dimensions=MATRYOSHKA, **options)  # type: ignore[arg-type]
    got = _matrix(response)
    assert got.shape == (len(texts), MATRYOSHKA)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    _assert_same(got, _truncated(expected, MATRYOSHKA))


def test_the_full_size_is_a_valid_dimensions(
    client: openai.OpenAI, texts: list[str], expected: NDArray[np.float32]
) -> None:
    _assert_same(_matrix(client.embeddings.create(input=texts, model=MODEL, dimensions=DIM)), expected)


def test_an_undeclared_dimensions_is_a_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(input="text", model=MODEL, dimensions=100)
    assert caught.value.status_code == 400
    assert caught.value.param == "dimensions"


def test_more_inputs_than_the_limit_is_413(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client.embeddings.create(input=[f"text {i}" for i in range(MAX_DOCUMENTS + 1)], model=MODEL)
    assert caught.value.status_code == 413
    assert not isinstance(caught.value, openai.BadRequestError)
    assert str(MAX_DOCUMENTS) in caught.value.message


@pytest.mark.parametrize("empty", ["", [], ["ok", "  "]])
def test_an_empty_input_is_a_bad_request(client: openai.OpenAI, empty: str | list[str]) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(input=empty, model=MODEL)
    assert caught.value.param is not None and caught.value.param.startswith("input")


def test_an_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.embeddings.create(input="text", model="text-embedding-3-small")
    assert caught.value.code == "model_not_found"
    assert caught.value.param == "model"


def test_a_wrong_key_is_an_authentication_error(keyed_server: Running) -> None:
    for key in ("sk-not-an-embedpool-key", f"ep_{'0' * 12}_{'x' * 43}"):
        with sdk(keyed_server, key) as client, pytest.raises(openai.AuthenticationError):
            client.embeddings.create(input="text", model=MODEL)
        with sdk(keyed_server, key) as client, pytest.raises(openai.AuthenticationError):
            client.models.list()


def test_a_missing_key_is_401_on_every_v1_route(keyed_http: httpx.Client) -> None:
    for method, path, body in [
        ("POST", "/v1/embeddings", {"input": "text", "model": MODEL}),
        ("GET", "/v1/models", None),
        ("GET", f"/v1/models/{MODEL}", None),
        ("GET", "/v1/collections", None),
        ("POST", "/v1/collections", {"name": "nokey"}),
        ("GET", "/v1/collections/nokey", None),
        ("DELETE", "/v1/collections/nokey", None),
        ("POST", "/v1/collections/nokey/documents", {"documents": [{"text": "t"}]}),
        ("POST", "/v1/collections/nokey/documents/delete", {"ids": ["a"]}),
        ("POST", "/v1/collections/nokey/search", {"query": "t"}),
    ]:
        error = assert_error(keyed_http.request(method, path, json=body), 401)
        assert error["type"] == "authentication_error", (method, path)
    for path in ("/health", "/ready", "/openapi.json", "/docs"):
        assert keyed_http.get(path).status_code == 200, path


def test_a_reader_cannot_create_a_collection(keyed_server: Running, keyed_http: httpx.Client, reader: str) -> None:
    response = keyed_http.post("/v1/collections", json={"name": "readers"}, headers=bearer(reader))
    assert assert_error(response, 403)["type"] == "permission_error"
    with sdk(keyed_server, reader) as client, pytest.raises(openai.PermissionDeniedError):
        client.post("/collections", body={"name": "readers"}, cast_to=object)


def test_a_key_over_its_document_rate_gets_429_with_retry_after(keyed_server: Running) -> None:
    limited = make_key(keyed_server, TENANT, "reader", docs_per_s=2)
    other = make_key(keyed_server, TENANT, "reader", docs_per_s=2)
    with sdk(keyed_server, limited) as client:
        client.embeddings.create(input=["one", "two"], model=MODEL)
        with pytest.raises(openai.RateLimitError) as caught:
            client.embeddings.create(input=["one", "two"], model=MODEL)
    assert caught.value.status_code == 429
    assert 1 <= int(caught.value.response.headers["retry-after"]) <= 2
    with sdk(keyed_server, other) as client:
        client.embeddings.create(input=["one", "two"], model=MODEL)  # its own bucket


def test_a_key_over_its_token_rate_gets_429_with_retry_after(keyed_server: Running, keyed_http: httpx.Client) -> None:
    key = make_key(keyed_server, TENANT, "reader", tokens_per_s=20)
    with sdk(keyed_server, key) as client:
        client.embeddings.create(input=" ".join(["word"] * 100), model=MODEL)  # ~100 tokens: 5 s of its rate
        with pytest.raises(openai.RateLimitError) as caught:
            client.embeddings.create(input="short", model=MODEL)
    assert 3 <= int(caught.value.response.headers["retry-after"]) <= 6
    response = keyed_http.post("/v1/embeddings", json={"input": "short", "model": MODEL}, headers=bearer(key))
    assert assert_error(response, 429)["type"] == "rate_limit_error"
    assert response.headers["retry-after"].isdigit()


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    models = list(client.models.list())
    assert [m.id for m in models] == [MODEL]
    card = models[0]
    assert card.object == "model" and card.owned_by == "embedpool"
    assert card.dimensions == [DIM, MATRYOSHKA]  # type: ignore[attr-defined]
    assert client.models.retrieve(MODEL).id == MODEL
    assert client.models.retrieve(f"sentence-transformers/{MODEL}").id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("text-embedding-3-small")
