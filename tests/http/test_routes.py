"""Every collections route over HTTP against a real server with keys: create, list, get, upsert, search, delete,
drop; 404s and tenancy; one core behind both doors (what one writes the other reads); health, readiness,
request ids and the body limit."""

from __future__ import annotations

import base64
import itertools
import re
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from google.protobuf import struct_pb2
from numpy.typing import NDArray

from embedpool.server.app import Running
from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc

from .conftest import MAX_BYTES, MODEL, assert_error, bearer, grpc_bearer, make_key

DIM = 384
_names = itertools.count()


def fresh(prefix: str) -> str:
    """A collection name no other test uses (the server is shared by the package)."""
    return f"{prefix}-{next(_names)}"


class Api:
    """One key's view of the HTTP door: each call returns the decoded 200 body, or fails with the error."""

    def __init__(self, http: httpx.Client, key: str) -> None:
        self.http = http
        self.headers = bearer(key)

    def request(self, method: str, path: str, body: Any = None) -> httpx.Response:
        return self.http.request(method, path, json=body, headers=self.headers)

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        response = self.request(method, path, body)
        assert response.status_code == 200, response.text
        return response.json()

    def create(self, name: str, **index: Any) -> dict[str, Any]:
        return self.ok("POST", "/v1/collections", {"name": name, **({"index": index} if index else {})})  # type: ignore[no-any-return]

    def upsert(self, name: str, documents: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
        return self.ok("POST", f"/v1/collections/{name}/documents", {"documents": documents, **options})  # type: ignore[no-any-return]

    def search(self, name: str, **query: Any) -> list[dict[str, Any]]:
        return self.ok("POST", f"/v1/collections/{name}/search", query)["data"]  # type: ignore[no-any-return]

    def get(self, name: str) -> dict[str, Any]:
        return self.ok("GET", f"/v1/collections/{name}")  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def keys(keyed_server: Running) -> dict[str, str]:
    """Keys of tenant alpha by role, and an admin key of tenant beta."""
    made = {role: make_key(keyed_server, "alpha", role) for role in ("reader", "writer", "admin")}
    made["beta"] = make_key(keyed_server, "beta", "admin")
    return made


@pytest.fixture(scope="module")
def alpha(keyed_http: httpx.Client, keys: dict[str, str]) -> Api:
    return Api(keyed_http, keys["admin"])


@pytest.fixture(scope="module")
def beta(keyed_http: httpx.Client, keys: dict[str, str]) -> Api:
    return Api(keyed_http, keys["beta"])


@pytest.fixture(scope="module")
def shelf(alpha: Api) -> str:
    """Tenant alpha's collection of four documents with metadata, for the read-only tests."""
    name = fresh("shelf")
    alpha.create(name)
    alpha.upsert(
        name,
        [
            {"id": "cat", "text": "the cat sat on the mat", "metadata": {"kind": "animal", "legs": 4}},
            {"id": "dog", "text": "a dog barked at the postman", "metadata": {"kind": "animal", "legs": 4}},
            {"id": "car", "text": "the car needs new tyres", "metadata": {"kind": "machine"}},
            {"id": "sql", "text": "SELECT id FROM documents WHERE score > 0.5", "metadata": {"kind": "code"}},
        ],
    )
    return name


def _decode(vector: str, dtype: str = "<f4") -> NDArray[np.float32]:
    return np.frombuffer(base64.b64decode(vector), dtype=dtype).astype(np.float32)


# Create, list, get


def test_create_is_idempotent_and_refuses_other_index_options(alpha: Api) -> None:
    name = fresh("create")
    made = alpha.create(name, m=8, ef_construction=32, halfvec=True)
    assert made["object"] == "collection" and made["name"] == name
    assert (made["model"], made["dim"], made["metric"], made["count"]) == (MODEL, DIM, "cosine", 0)
    assert made["index"] == {"m": 8, "ef_construction": 32, "halfvec": True}
    again = alpha.create(name, m=8, ef_construction=32, halfvec=True)
    assert again["index"] == made["index"]
    for other in ({"m": 16}, {"m": 8, "ef_construction": 32}, None):
        body = {"name": name, **({"index": other} if other else {})}
        error = assert_error(alpha.request("POST", "/v1/collections", body), 409)
        assert error["type"] == "conflict_error"


def test_create_defaults(alpha: Api) -> None:
    made = alpha.create(fresh("defaults"))
    assert made["index"] == {"m": 16, "ef_construction": 64, "halfvec": False}


def test_list_shows_the_tenants_collections_by_their_names(alpha: Api, beta: Api, shelf: str) -> None:
    mine = fresh("listed")
    alpha.create(mine)
    theirs = fresh("theirs")
    beta.create(theirs)
    listed = alpha.ok("GET", "/v1/collections")
    assert listed["object"] == "list"
    names = {c["name"] for c in listed["data"]}
    assert {mine, shelf} <= names
    assert theirs not in names
    assert not any("/" in n for n in names)  # the tenant namespace never shows
    entry = next(c for c in listed["data"] if c["name"] == shelf)
    assert entry["dim"] == DIM and isinstance(entry["count_estimated"], bool)


def test_get_counts_exactly(alpha: Api, shelf: str) -> None:
    got = alpha.get(shelf)
    assert got["name"] == shelf
    assert (got["count"], got["count_estimated"], got["indexed"]) == (4, False, True)
    assert got["index_bytes"] > 0 and got["table_bytes"] > 0


# Upsert


def test_upsert_reports_inserted_updated_and_unchanged(alpha: Api) -> None:
    name = fresh("upsert")
    alpha.create(name)
    docs: list[dict[str, Any]] = [
        {"id": "a", "text": "first text"},
        {"id": "b", "text": "second text", "metadata": {"n": 1}},
    ]
    first = alpha.upsert(name, docs)
    assert first["object"] == "upsert"
    assert first["ids"] == ["a", "b"]
    assert (first["inserted"], first["updated"], first["unchanged"], first["skipped_unchanged"]) == (2, 0, 0, 0)
    assert first["rejected"] == [] and first["vectors"] is None
    assert first["usage"]["prompt_tokens"] == first["usage"]["total_tokens"] > 0

    resent = alpha.upsert(name, docs)
    assert resent["skipped_unchanged"] == 2
    assert (resent["inserted"], resent["updated"]) == (0, 0)
    assert resent["usage"]["total_tokens"] == 0  # nothing embedded again

    changed = alpha.upsert(name, [docs[0], {**docs[1], "metadata": {"n": 2}}, {"id": "c", "text": "third"}])
    assert (changed["inserted"], changed["updated"], changed["skipped_unchanged"]) == (1, 1, 1)
    assert alpha.get(name)["count"] == 3


def test_ids_derived_from_the_text_are_stable(alpha: Api) -> None:
    name = fresh("derived")
    alpha.create(name)
    first = alpha.upsert(name, [{"text": "no id given"}])
    again = alpha.upsert(name, [{"text": "no id given"}])
    assert first["ids"] == again["ids"] and len(first["ids"][0]) == 64
    assert again["skipped_unchanged"] == 1
    assert alpha.get(name)["count"] == 1


def test_the_last_version_of_an_id_wins(alpha: Api) -> None:
    name = fresh("last")
    alpha.create(name)
    alpha.upsert(name, [{"id": "x", "text": "an old apple pie recipe"}, {"id": "x", "text": "a new rocket engine"}])
    assert alpha.get(name)["count"] == 1
    assert alpha.search(name, query="rocket engine", k=1)[0]["text"] == "a new rocket engine"
    alpha.upsert(name, [{"id": "x", "text": "a later bicycle repair", "metadata": {"v": 3}}])
    hit = alpha.search(name, query="rocket engine", k=1)[0]
    assert (hit["id"], hit["text"], hit["metadata"]) == ("x", "a later bicycle repair", {"v": 3})


def test_upsert_returns_vectors_when_asked(alpha: Api) -> None:
    name = fresh("vectors")
    alpha.create(name)
    floats = alpha.upsert(name, [{"id": "v", "text": "vector please"}], return_vectors=True)["vectors"]
    packed = alpha.upsert(name, [{"id": "w", "text": "vector please"}], return_vectors=True, encoding_format="base64")
    assert len(floats) == 1 and len(floats[0]) == DIM
    np.testing.assert_allclose(_decode(packed["vectors"][0]), np.asarray(floats[0], dtype=np.float32), atol=1e-6)


# Search


def test_search_by_text_ranks_the_matching_document_first(alpha: Api, shelf: str) -> None:
    hits = alpha.search(shelf, query="a cat on a mat", k=4)
    assert next(h["id"] for h in hits) == "cat"
    assert len(hits) == 4
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert hits[0]["metadata"] == {"kind": "animal", "legs": 4} and hits[0]["vector"] is None


def test_search_filter_k_and_min_score(alpha: Api, shelf: str) -> None:
    animals = alpha.search(shelf, query="pets", filter={"kind": "animal"})
    assert {h["id"] for h in animals} == {"cat", "dog"}
    assert len(alpha.search(shelf, query="pets", k=1)) == 1
    assert alpha.search(shelf, query="the cat sat on the mat", min_score=0.99)[0]["id"] == "cat"
    assert all(h["score"] >= 0.99 for h in alpha.search(shelf, query="the cat sat on the mat", min_score=0.99))


def test_search_by_vector(alpha: Api, shelf: str) -> None:
    stored = alpha.search(shelf, query="car tyres", k=1, include_vectors=True)[0]
    assert stored["id"] == "car"
    hits = alpha.search(shelf, vector=stored["vector"], k=2)
    assert hits[0]["id"] == "car" and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("scale", [1e20, 1e-30])
def test_a_query_vectors_scale_does_not_matter(alpha: Api, shelf: str, scale: float) -> None:
    """Cosine ignores length: any finite float32 vector that is not zero ranks as its unit vector does. (Squared
    in float32, 1e20 overflows and 1e-30 underflows: the norm must not be taken in float32.)"""
    unit = np.asarray(alpha.search(shelf, query="car tyres", k=1, include_vectors=True)[0]["vector"])
    want = alpha.search(shelf, vector=unit.tolist())
    got = alpha.search(shelf, vector=(unit * scale).tolist())
    assert [h["id"] for h in got] == [h["id"] for h in want]
    assert [h["score"] for h in got] == pytest.approx([h["score"] for h in want], abs=1e-5)


def test_candidates_zero_means_the_default_as_over_grpc(
    alpha: Api, shelf: str, keyed_stub: pb_grpc.EmbedderStub, keys: dict[str, str]
) -> None:
    """gRPC's candidates=0 is the server default; the same request over HTTP is not refused (and the message
    of the refusal says 0 is allowed)."""
    over_grpc = keyed_stub.Search(
        pb.SearchRequest(collection=shelf, text="pets", k=2, candidates=0), metadata=grpc_bearer(keys["admin"])
    )
    assert len(over_grpc.hits) == 2
    response = alpha.request("POST", f"/v1/collections/{shelf}/search", {"query": "pets", "k": 2, "candidates": 0})
    assert response.status_code == 200, response.text
    assert [h["id"] for h in response.json()["data"]] == [h.id for h in over_grpc.hits]


@pytest.mark.parametrize("size", [DIM - 1, DIM + 1, 1])
def test_a_vector_of_the_wrong_dimension_is_400(alpha: Api, shelf: str, size: int) -> None:
    response = alpha.request("POST", f"/v1/collections/{shelf}/search", {"vector": [0.1] * size})
    assert assert_error(response, 400)["param"] == "vector"


@pytest.mark.parametrize("encoding", ["base64", "base64_float16"])
def test_include_vectors_packed(alpha: Api, shelf: str, encoding: str) -> None:
    plain = alpha.search(shelf, query="code", include_vectors=True)
    packed = alpha.search(shelf, query="code", include_vectors=True, encoding_format=encoding)
    assert [h["id"] for h in packed] == [h["id"] for h in plain]
    for p, f in zip(packed, plain, strict=True):
        assert isinstance(p["vector"], str)
        got = _decode(p["vector"], "<f4" if encoding == "base64" else "<f2")
        np.testing.assert_allclose(got, np.asarray(f["vector"]), atol=1e-6 if encoding == "base64" else 1e-3)


# Delete, drop


def test_delete_by_ids_and_by_filter(alpha: Api) -> None:
    name = fresh("delete")
    alpha.create(name)
    alpha.upsert(name, [{"id": f"d{i}", "text": f"document {i}", "metadata": {"even": i % 2 == 0}} for i in range(6)])
    by_ids = alpha.ok("POST", f"/v1/collections/{name}/documents/delete", {"ids": ["d1", "d3", "nope"]})
    assert by_ids == {"object": "documents.deleted", "deleted": 2}
    by_filter = alpha.ok("POST", f"/v1/collections/{name}/documents/delete", {"filter": {"even": True}})
    assert by_filter["deleted"] == 3
    assert alpha.get(name)["count"] == 1
    assert [h["id"] for h in alpha.search(name, query="document")] == ["d5"]


@pytest.mark.parametrize("body", [{}, {"ids": []}, {"filter": {}}, {"ids": ["a"], "filter": {"k": 1}}])
def test_delete_needs_exactly_one_of_ids_and_filter(alpha: Api, shelf: str, body: dict[str, Any]) -> None:
    assert_error(alpha.request("POST", f"/v1/collections/{shelf}/documents/delete", body), 400)


def test_drop(alpha: Api) -> None:
    name = fresh("drop")
    alpha.create(name)
    alpha.upsert(name, [{"text": "soon gone"}])
    assert alpha.ok("DELETE", f"/v1/collections/{name}") == {
        "object": "collection.deleted",
        "name": name,
        "deleted": True,
    }
    assert_error(alpha.request("GET", f"/v1/collections/{name}"), 404)
    assert_error(alpha.request("DELETE", f"/v1/collections/{name}"), 404)
    alpha.create(name)  # the name is free again
    assert alpha.get(name)["count"] == 0


ROUTES_ON_A_COLLECTION: list[tuple[str, str, Any]] = [
    ("GET", "", None),
    ("DELETE", "", None),
    ("POST", "/documents", {"documents": [{"text": "t"}]}),
    ("POST", "/documents/delete", {"ids": ["a"]}),
    ("POST", "/search", {"query": "t"}),
]


@pytest.mark.parametrize(("method", "suffix", "body"), ROUTES_ON_A_COLLECTION)
def test_an_unknown_collection_is_404(alpha: Api, method: str, suffix: str, body: Any) -> None:
    error = assert_error(alpha.request(method, f"/v1/collections/no-such-collection{suffix}", body), 404)
    assert error["type"] == "not_found_error"
    assert "no-such-collection" in error["message"]


@pytest.mark.parametrize(("method", "suffix", "body"), ROUTES_ON_A_COLLECTION)
def test_another_tenants_collection_is_404(
    alpha: Api, beta: Api, shelf: str, method: str, suffix: str, body: Any
) -> None:
    error = assert_error(beta.request(method, f"/v1/collections/{shelf}{suffix}", body), 404)
    assert "alpha" not in error["message"]  # nor does the namespace leak
    assert alpha.get(shelf)["count"] == 4


def test_tenants_have_separate_namespaces(alpha: Api, beta: Api) -> None:
    name = fresh("same-name")
    alpha.create(name)
    beta.create(name, m=8)  # no conflict: another tenant's collection
    alpha.upsert(name, [{"id": "a", "text": "alpha's document"}])
    beta.upsert(name, [{"id": "b", "text": "beta's document"}, {"id": "c", "text": "another"}])
    assert (alpha.get(name)["count"], beta.get(name)["count"]) == (1, 2)
    assert [h["id"] for h in alpha.search(name, query="document")] == ["a"]


@pytest.mark.parametrize(
    ("role", "method", "suffix", "body", "allowed"),
    [
        ("reader", "GET", "", None, True),
        ("reader", "POST", "/search", {"query": "t"}, True),
        ("reader", "POST", "/documents", {"documents": [{"id": "r", "text": "t"}]}, False),
        ("reader", "POST", "/documents/delete", {"ids": ["r"]}, False),
        ("reader", "DELETE", "", None, False),
        ("writer", "POST", "/documents", {"documents": [{"id": "w", "text": "t"}]}, True),
        ("writer", "POST", "/documents/delete", {"ids": ["w"]}, True),
        ("writer", "DELETE", "", None, False),
    ],
)
def test_roles(
    keyed_http: httpx.Client,
    keys: dict[str, str],
    alpha: Api,
    role: str,
    method: str,
    suffix: str,
    body: Any,
    allowed: bool,
) -> None:
    name = fresh("roles")
    alpha.create(name)
    response = Api(keyed_http, keys[role]).request(method, f"/v1/collections/{name}{suffix}", body)
    if allowed:
        assert response.status_code == 200, response.text
    else:
        assert assert_error(response, 403)["type"] == "permission_error"


# One core behind both doors


def test_what_http_writes_grpc_reads(alpha: Api, keyed_stub: pb_grpc.EmbedderStub, keys: dict[str, str]) -> None:
    name = fresh("to-grpc")
    md = grpc_bearer(keys["admin"])
    alpha.create(name, m=12)
    document = {"id": "h1", "text": "written over http", "metadata": {"door": "http"}}
    written = alpha.upsert(name, [document], return_vectors=True)
    assert written["inserted"] == 1
    vector = np.asarray(written["vectors"][0], dtype=np.float32)
    info = keyed_stub.GetCollection(pb.GetCollectionRequest(name=name), metadata=md)
    assert (info.count, info.index.m) == (1, 12)
    assert name in {c.name for c in keyed_stub.ListCollections(pb.ListCollectionsRequest(), metadata=md).collections}
    hits = keyed_stub.Search(
        pb.SearchRequest(collection=name, text="written over http", k=1, include_vectors=True), metadata=md
    ).hits
    assert (hits[0].id, hits[0].text, dict(hits[0].metadata)) == ("h1", "written over http", {"door": "http"})
    np.testing.assert_allclose(np.frombuffer(hits[0].vector, dtype="<f4"), vector, atol=1e-6)
    again = keyed_stub.Embed(
        pb.EmbedRequest(
            collection=name,
            documents=[pb.Document(id="h1", text="written over http", metadata=_struct({"door": "http"}))],
        ),
        metadata=md,
    )
    assert again.upsert.inserted == 0 and again.upsert.updated == 0  # the same row, seen as unchanged


def test_what_grpc_writes_http_reads(alpha: Api, keyed_stub: pb_grpc.EmbedderStub, keys: dict[str, str]) -> None:
    name = fresh("from-grpc")
    md = grpc_bearer(keys["admin"])
    keyed_stub.CreateCollection(pb.CreateCollectionRequest(name=name), metadata=md)
    reply = keyed_stub.Embed(
        pb.EmbedRequest(
            collection=name,
            documents=[pb.Document(id="g1", text="written over grpc", metadata=_struct({"door": "grpc"}))],
        ),
        metadata=md,
    )
    assert alpha.get(name)["count"] == 1
    hit = alpha.search(name, query="written over grpc", k=1, include_vectors=True)[0]
    assert (hit["id"], hit["text"], hit["metadata"]) == ("g1", "written over grpc", {"door": "grpc"})
    np.testing.assert_allclose(np.asarray(hit["vector"]), np.frombuffer(reply.vectors[0], dtype="<f4"), atol=1e-6)
    resent = alpha.upsert(name, [{"id": "g1", "text": "written over grpc", "metadata": {"door": "grpc"}}])
    assert resent["skipped_unchanged"] == 1
    alpha.ok("POST", f"/v1/collections/{name}/documents/delete", {"ids": ["g1"]})
    assert keyed_stub.GetCollection(pb.GetCollectionRequest(name=name), metadata=md).count == 0
    alpha.ok("DELETE", f"/v1/collections/{name}")
    with pytest.raises(grpc.RpcError) as caught:
        keyed_stub.GetCollection(pb.GetCollectionRequest(name=name), metadata=md)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(value)
    return s


# Operations: health, readiness, request ids, the body limit


def test_health_and_ready_need_no_key(keyed_http: httpx.Client) -> None:
    health = keyed_http.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    ready = keyed_http.get("/ready")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ok", "checks": {"model": True, "database": True, "accepting": True}}


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("GET", "/health", None, 200),
        ("GET", "/v1/models", None, 200),
        ("GET", "/v1/collections/no-such-collection", None, 404),
        ("POST", "/v1/embeddings", {"input": 3}, 400),
        ("POST", "/v1/embeddings", {"input": "t", "model": MODEL}, 401),
    ],
)
def test_the_request_id_is_echoed(
    keyed_http: httpx.Client, keys: dict[str, str], method: str, path: str, body: Any, status: int
) -> None:
    headers = {} if status == 401 else bearer(keys["reader"])
    response = keyed_http.request(method, path, json=body, headers={**headers, "x-request-id": "req-42"})
    assert response.status_code == status
    assert response.headers["x-request-id"] == "req-42"
    generated = keyed_http.request(method, path, json=body, headers=headers)
    assert re.fullmatch(r"[0-9a-f]{32}", generated.headers["x-request-id"])


@pytest.fixture
def big_body() -> bytes:
    return b'{"input": "' + b"a" * MAX_BYTES + b'", "model": "' + MODEL.encode() + b'"}'


def test_a_body_over_the_limit_is_413_with_content_length(
    keyed_http: httpx.Client, keys: dict[str, str], big_body: bytes
) -> None:
    headers = {**bearer(keys["reader"]), "content-type": "application/json"}
    response = keyed_http.post("/v1/embeddings", content=big_body, headers=headers)
    assert assert_error(response, 413)["type"] == "invalid_request_error"
    assert response.headers["x-request-id"]


def test_a_body_over_the_limit_is_413_when_chunked(
    keyed_http: httpx.Client, keys: dict[str, str], big_body: bytes
) -> None:
    def chunks() -> Iterator[bytes]:
        for start in range(0, len(big_body), 4096):
            yield big_body[start : start + 4096]

    headers = {**bearer(keys["reader"]), "content-type": "application/json"}
    response = keyed_http.post("/v1/embeddings", content=chunks(), headers=headers)
    assert "content-length" not in response.request.headers
    assert_error(response, 413)


def test_a_body_just_under_the_limit_is_read(keyed_http: httpx.Client, keys: dict[str, str]) -> None:
    filler = " " * (MAX_BYTES - 200)
    body = f'{{"input": "a short text", "model": "{MODEL}"{filler}}}'.encode()
    headers = {**bearer(keys["reader"]), "content-type": "application/json"}
    assert keyed_http.post("/v1/embeddings", content=body, headers=headers).status_code == 200


# --- deadlines ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("header", ["x-request-timeout", "x-stainless-read-timeout"])
def test_work_past_the_callers_budget_is_dropped_with_504(http: httpx.Client, header: str) -> None:
    texts = [f"a text long enough to take a while to embed, number {i} " * 20 for i in range(16)]
    body = {"input": texts, "model": MODEL}
    error = assert_error(http.post("/v1/embeddings", json=body, headers={header: "0.001"}), 504)
    assert error["type"] == "timeout_error"
    assert http.post("/v1/embeddings", json=body, headers={header: "120"}).status_code == 200


def test_an_unparsable_budget_is_ignored(http: httpx.Client) -> None:
    reply = http.post("/v1/embeddings", json={"input": "hello", "model": MODEL}, headers={"x-request-timeout": "soon"})
    assert reply.status_code == 200


def test_requests_are_timed_by_route_template_and_status(http: httpx.Client, open_server: Running) -> None:
    http.post("/v1/embeddings", json={"input": "timed", "model": MODEL})
    http.get("/v1/collections/not-there")
    http.get("/no/such/route")
    scraped = httpx.get(f"http://127.0.0.1:{open_server.metrics_port}/metrics", timeout=10).text
    series = "embedpool_http_request_duration_seconds_count"
    assert f'{series}{{route="/v1/embeddings",status="200"}}' in scraped
    assert f'{series}{{route="/v1/collections/{{name}}",status="404"}}' in scraped  # the template, not the name
    assert f'{series}{{route="unmatched",status="404"}}' in scraped


def test_numbers_are_one_document_whichever_door_sent_them(
    alpha: Api, keyed_stub: pb_grpc.EmbedderStub, keys: dict[str, str]
) -> None:
    """A Struct carries every number as a double; JSON writes 1 or 1.0. Whole numbers are stored as ints, so the
    same document hashes alike through both doors and a resend through the other is not written again."""
    name = fresh("numbers")
    md = grpc_bearer(keys["admin"])
    alpha.create(name)
    metadata = {"page": 3, "score": 0.5, "nested": {"count": 2.0}, "list": [1, 2.5]}
    keyed_stub.Embed(
        pb.EmbedRequest(collection=name, documents=[pb.Document(id="n", text="numbers", metadata=_struct(metadata))]),
        metadata=md,
    )
    resent = alpha.upsert(name, [{"id": "n", "text": "numbers", "metadata": metadata}])
    assert (resent["updated"], resent["skipped_unchanged"]) == (0, 1)
    hit = alpha.search(name, query="numbers", k=1)[0]
    assert hit["metadata"] == {"page": 3, "score": 0.5, "nested": {"count": 2}, "list": [1, 2.5]}
    assert isinstance(hit["metadata"]["page"], int)


def test_metadata_nested_too_deep_is_refused_before_it_is_stored(alpha: Api, keyed_http: httpx.Client) -> None:
    name = fresh("deep")
    alpha.create(name)
    deep: dict[str, Any] = {"leaf": 1}
    for _ in range(40):
        deep = {"x": deep}
    error = assert_error(
        keyed_http.post(
            f"/v1/collections/{name}/documents",
            json={"documents": [{"text": "deep", "metadata": deep}]},
            headers=alpha.headers,
        ),
        400,
    )
    assert "nested deeper than 32 levels" in error["message"] and error["param"] == "documents[0].metadata"
    shallow: dict[str, Any] = {"leaf": 1}
    for _ in range(30):
        shallow = {"x": shallow}
    alpha.upsert(name, [{"id": "s", "text": "shallow enough", "metadata": shallow}])
    assert alpha.search(name, query="shallow", k=1)[0]["metadata"] == shallow  # and it comes back out


def test_the_key_is_checked_before_the_body(keyed_http: httpx.Client) -> None:
    """As on gRPC: a caller without a valid key learns nothing of the request schema."""
    for path in ("/v1/embeddings", "/v1/collections", "/v1/collections/any/search"):
        assert_error(keyed_http.post(path, json={"not": "a valid body"}), 401)
        assert_error(keyed_http.post(path, json={}, headers=bearer("ep_000000000000_" + "x" * 43)), 401)


def test_every_response_is_booked_to_the_callers_tenant(
    alpha: Api, shelf: str, keyed_http: httpx.Client, keyed_server: Running
) -> None:
    """As gRPC books every reply's size: the bytes of each HTTP response, whatever the route."""

    def booked() -> float:
        scraped = httpx.get(f"http://127.0.0.1:{keyed_server.metrics_port}/metrics", timeout=10).text
        match = re.search(r'^embedpool_tenant_bytes_out_total\{tenant="alpha"\} (\S+)$', scraped, re.M)
        return float(match.group(1)) if match else 0.0

    for method, path in (("GET", "/v1/collections"), ("GET", f"/v1/collections/{shelf}"), ("GET", "/v1/models")):
        before = booked()
        reply = alpha.request(method, path)
        assert reply.status_code == 200
        assert booked() - before == len(reply.content), path
