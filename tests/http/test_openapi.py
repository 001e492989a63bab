"""/openapi.json is a valid OpenAPI 3.1 document that lists exactly the routes the HTTP door serves, documents the
statuses they answer with, and describes the bodies they really send; /docs serves the interactive page."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate

from embedpool import __version__

from .conftest import MODEL

# Every route of the HTTP door. A new route fails test_the_spec_has_exactly_the_known_routes until it is added
# here, and with it the tests of tests/http that cover it.
ROUTES: set[tuple[str, str]] = {
    ("post", "/v1/embeddings"),
    ("get", "/v1/models"),
    ("get", "/v1/models/{model_id}"),
    ("post", "/v1/collections"),
    ("get", "/v1/collections"),
    ("get", "/v1/collections/{name}"),
    ("delete", "/v1/collections/{name}"),
    ("post", "/v1/collections/{name}/documents"),
    ("post", "/v1/collections/{name}/documents/delete"),
    ("post", "/v1/collections/{name}/search"),
    ("post", "/v1/syncs"),  # the syncs' routes: tests/sync/test_sync.py
    ("get", "/v1/syncs"),
    ("get", "/v1/syncs/{name}"),
    ("post", "/v1/syncs/{name}/pause"),
    ("post", "/v1/syncs/{name}/resume"),
    ("delete", "/v1/syncs/{name}"),
    ("get", "/health"),
    ("get", "/ready"),
}
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
# What every /v1 operation can answer besides 200 (status.py's table; 409 only where something is created).
V1_ERRORS = {"400", "401", "403", "404", "413", "429", "503"}


@pytest.fixture(scope="module")
def spec(http: httpx.Client) -> dict[str, Any]:
    response = http.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    return response.json()  # type: ignore[no-any-return]


def _operations(spec: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method, path): operation
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if method in HTTP_METHODS
    }


def test_the_spec_is_valid_openapi_3_1(spec: dict[str, Any]) -> None:
    assert spec["openapi"].startswith("3.1")
    validate(spec)
    assert spec["info"]["title"] == "embedpool"
    assert spec["info"]["version"] == __version__


def test_the_spec_has_exactly_the_known_routes(spec: dict[str, Any]) -> None:
    documented = set(_operations(spec))
    assert documented - ROUTES == set(), "routes this test does not know: add them to ROUTES and test them"
    assert ROUTES - documented == set(), "routes missing from /openapi.json"


def test_every_v1_operation_documents_its_errors_in_openai_shape(spec: dict[str, Any]) -> None:
    for (method, path), operation in _operations(spec).items():
        if not path.startswith("/v1/"):
            continue
        responses = operation["responses"]
        assert "200" in responses, (method, path)
        assert set(responses) >= V1_ERRORS, (method, path, sorted(responses))
        for status in V1_ERRORS:
            schema = responses[status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (method, path, status)


def test_a_conflict_is_documented_where_the_server_answers_409(spec: dict[str, Any]) -> None:
    """Creating an existing collection with other index options is 409 (test_routes checks the server)."""
    assert "409" in spec["paths"]["/v1/collections"]["post"]["responses"]
    assert "409" in spec["paths"]["/v1/syncs"]["post"]["responses"]


def test_no_status_is_documented_that_the_server_never_sends(spec: dict[str, Any]) -> None:
    """Request validation errors are 400 in OpenAI's shape (test_fuzz), never FastAPI's 422."""
    for (method, path), operation in _operations(spec).items():
        assert "422" not in operation["responses"], (method, path)
    assert "HTTPValidationError" not in spec["components"]["schemas"]


def test_request_bodies_are_documented(spec: dict[str, Any]) -> None:
    bodies = {
        ("post", "/v1/embeddings"): "EmbeddingsRequest",
        ("post", "/v1/collections"): "CreateCollection",
        ("post", "/v1/collections/{name}/documents"): "UpsertDocuments",
        ("post", "/v1/collections/{name}/documents/delete"): "DeleteDocuments",
        ("post", "/v1/collections/{name}/search"): "SearchRequest",
        ("post", "/v1/syncs"): "CreateSync",
    }
    operations = _operations(spec)
    for route, schema in bodies.items():
        body = operations[route]["requestBody"]
        assert body["required"] is True
        assert body["content"]["application/json"]["schema"]["$ref"] == f"#/components/schemas/{schema}"
    schemas = spec["components"]["schemas"]
    encoding = schemas["EmbeddingsRequest"]["properties"]["encoding_format"]
    assert set(encoding["enum"]) == {"float", "base64", "base64_float16", "base64_int8", "base64_binary"}
    assert "scale" in encoding["description"] and "sign bits" in encoding["description"]
    create = schemas["CreateCollection"]["properties"]
    assert set(create["storage"]["enum"]) == {"float32", "float16", "binary"} and "dimensions" in create
    assert set(schemas["EmbeddingsRequest"]["required"]) == {"input", "model"}


def _conforms(spec: dict[str, Any], schema: str, instance: Any) -> None:
    """`instance` is valid against components/schemas/`schema` of the spec, in OpenAPI 3.1's JSON Schema dialect."""
    document = {"$ref": f"#/components/schemas/{schema}", "components": spec["components"]}
    OAS31Validator(document).validate(instance)


def test_the_bodies_sent_are_the_ones_documented(spec: dict[str, Any], http: httpx.Client) -> None:
    name = "openapi-conformance"

    def ok(method: str, path: str, body: Any = None) -> Any:
        response = http.request(method, path, json=body)
        assert response.status_code == 200, response.text
        return response.json()

    _conforms(spec, "EmbeddingsResponse", ok("POST", "/v1/embeddings", {"input": ["a", "b"], "model": MODEL}))
    packed = ok("POST", "/v1/embeddings", {"input": "a", "model": MODEL, "encoding_format": "base64"})
    _conforms(spec, "EmbeddingsResponse", packed)
    _conforms(spec, "ModelList", ok("GET", "/v1/models"))
    _conforms(spec, "ModelCard", ok("GET", f"/v1/models/{MODEL}"))
    _conforms(spec, "Collection", ok("POST", "/v1/collections", {"name": name}))
    documents = [{"id": "a", "text": "a document", "metadata": {"k": [1, "x", None]}}]
    _conforms(spec, "UpsertResult", ok("POST", f"/v1/collections/{name}/documents", {"documents": documents}))
    upserted = ok("POST", f"/v1/collections/{name}/documents", {"documents": documents, "return_vectors": True})
    _conforms(spec, "UpsertResult", upserted)
    _conforms(spec, "Collection", ok("GET", f"/v1/collections/{name}"))
    _conforms(spec, "CollectionList", ok("GET", "/v1/collections"))
    found = ok("POST", f"/v1/collections/{name}/search", {"query": "document", "include_vectors": True})
    _conforms(spec, "SearchResult", found)
    _conforms(spec, "DeletedDocuments", ok("POST", f"/v1/collections/{name}/documents/delete", {"ids": ["a"]}))
    _conforms(spec, "Deleted", ok("DELETE", f"/v1/collections/{name}"))
    _conforms(spec, "Health", ok("GET", "/health"))
    _conforms(spec, "Health", ok("GET", "/ready"))
    _conforms(spec, "ErrorResponse", http.get(f"/v1/collections/{name}").json())


def test_docs_is_the_interactive_page(http: httpx.Client) -> None:
    response = http.get("/docs")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "<html" in response.text.lower() and "/openapi.json" in response.text


def test_docs_work_without_a_network(http: httpx.Client) -> None:
    """Every script and stylesheet of /docs comes from this server: air-gapped machines reach no CDN."""
    page = http.get("/docs").text
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page)
    assert assets and all(a.startswith("/") for a in assets), assets
    for asset in assets:
        reply = http.get(asset)
        assert reply.status_code == 200 and len(reply.content) > 1000, asset
