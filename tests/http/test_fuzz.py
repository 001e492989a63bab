"""Hypothesis over what callers send the HTTP door: bodies for every route (shaped like the route's schema or
not, missing and extra fields, wrong types, huge numbers, NaN and Infinity as raw text, NUL characters, lone
surrogates, deeply nested JSON, invalid UTF-8, bytes that are not JSON), collection and model names in paths,
and request headers. Whatever arrives, the answer is never a 5xx, and every refusal has OpenAI's error shape
with a message free of server internals."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from embedpool.server.app import Running

from .conftest import MATRYOSHKA, MAX_DOCUMENTS, MODEL, assert_error, base_url, make_key

DIM = 384
TARGET = "fuzz-target"
# What no message of ours may show: Python exception names and tracebacks, file paths, database internals.
INTERNALS = re.compile(r"\b\w+(?:Error|Exception)\b|Traceback|site-packages|/work/|psycopg|postgres(?:ql)?://", re.I)

# Values: each of the right JSON type for its field but hostile in content (NUL, lone surrogates, huge and
# non-finite numbers), so that bodies get past the schema into the core's checks; `schema` then breaks one thing
# in some of them (a field of another type, a missing field, an unknown one).

TEXT = st.text(st.characters(exclude_categories=()), max_size=24) | st.sampled_from(
    ["", " ", "\x00", "a\x00b", "\ud800", "x\udfff", "hello world"]
)
INT = st.integers(-(2**70), 2**70) | st.sampled_from([0, -1, 1, 2**31, 2**63, 2**64, 10**30, -(10**30)])
SMALL_INT = st.integers(-2, 1100) | INT
FLOAT = st.floats()  # NaN and ±Infinity included: json.dumps writes them as the raw tokens NaN, Infinity
SCALAR = st.none() | st.booleans() | INT | FLOAT | TEXT
JSON = st.recursive(
    SCALAR, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4), max_leaves=12
)
OBJECT = st.dictionaries(TEXT, JSON, max_size=4)
ENCODING = st.sampled_from(["float", "base64", "base64_float16", "binary", ""])
NAME = st.from_regex(r"[A-Za-z0-9_.\-]{1,63}", fullmatch=True) | TEXT


def _one_at(size: int) -> st.SearchStrategy[list[float]]:
    """`size` zeros but one value: cheap to draw, and it reaches the vector checks (dimension, zero, NaN)."""
    return st.tuples(st.integers(0, max(size - 1, 0)), FLOAT).map(
        lambda iv: [iv[1] if i == iv[0] else 0.0 for i in range(size)]
    )


VECTOR = _one_at(DIM) | st.integers(0, 2 * DIM).flatmap(_one_at)


@st.composite
def schema(
    draw: st.DrawFn, /, required: dict[str, st.SearchStrategy[Any]], **optional: st.SearchStrategy[Any]
) -> dict[str, Any]:
    """Objects shaped like a request body, some of them broken in one place."""
    body = draw(st.fixed_dictionaries(required, optional=optional))
    how = draw(st.sampled_from(["intact", "intact", "wrong type", "missing", "unknown"]))
    if how == "wrong type":
        body[draw(st.sampled_from(sorted(required | optional)))] = draw(JSON)
    elif how == "missing" and body:
        del body[draw(st.sampled_from(sorted(body)))]
    elif how == "unknown":
        body[draw(st.text(max_size=8))] = draw(JSON)
    return body


DOCUMENT = schema({"text": TEXT}, id=TEXT, metadata=OBJECT)

# Each route with a body: its path, what its schema-shaped bodies look like, and where deep nesting can go.
BODY_ROUTES: dict[str, tuple[str, st.SearchStrategy[dict[str, Any]], bytes]] = {
    "embeddings": (
        "/v1/embeddings",
        schema(
            {
                "input": TEXT | st.lists(TEXT, max_size=MAX_DOCUMENTS + 2) | st.lists(INT, max_size=3),
                "model": st.sampled_from([MODEL, f"org/{MODEL}", "other"]) | TEXT,
            },
            encoding_format=ENCODING,
            dimensions=st.sampled_from([MATRYOSHKA, DIM, 100]) | INT,
            user=TEXT,
            truncate=st.booleans(),
        ),
        b'{"model": "' + MODEL.encode() + b'", "input": %s}',
    ),
    "create": (
        "/v1/collections",
        schema({"name": NAME}, index=schema({}, m=SMALL_INT, ef_construction=SMALL_INT, halfvec=st.booleans())),
        b'{"name": "deep", "index": %s}',
    ),
    "upsert": (
        f"/v1/collections/{TARGET}/documents",
        schema(
            {"documents": st.lists(DOCUMENT, max_size=MAX_DOCUMENTS + 2)},
            truncate=st.booleans(),
            return_vectors=st.booleans(),
            encoding_format=ENCODING,
        ),
        b'{"documents": [{"text": "deep", "metadata": %s}]}',
    ),
    "delete": (
        f"/v1/collections/{TARGET}/documents/delete",
        schema({}, ids=st.lists(TEXT, max_size=4), filter=OBJECT),
        b'{"filter": %s}',
    ),
    "search": (
        f"/v1/collections/{TARGET}/search",
        schema(
            {},
            query=TEXT,
            vector=VECTOR,
            k=SMALL_INT,
            filter=OBJECT,
            candidates=SMALL_INT,
            min_score=FLOAT,
            include_vectors=st.booleans(),
            encoding_format=ENCODING,
        ),
        b'{"query": "deep", "filter": %s}',
    ),
}

# Raw bytes

_VALUE = re.compile(rb'(?<=: )(?:-?\d[\d.eE+-]*|true|false|null|"(?:[^"\\]|\\.)*")')
_TOKENS = [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-0", b"\xff", b"\xc3(", b"\x00", b'"\\ud800"', b"{", b"]"]


def _encode(value: Any, ascii_only: bool) -> bytes:
    # Not ASCII-escaped, a lone surrogate goes out as its raw (CESU) bytes: invalid UTF-8.
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@st.composite
def _mutated(draw: st.DrawFn, shaped: st.SearchStrategy[dict[str, Any]]) -> bytes:
    """A schema-shaped body as JSON text, then one value replaced by a raw token, or the text cut short."""
    text = _encode(draw(shaped), draw(st.booleans()))
    values = list(_VALUE.finditer(text))
    replace: bool = draw(st.booleans())
    if values and replace:
        hit = values[draw(st.integers(0, len(values) - 1))]
        return text[: hit.start()] + draw(st.sampled_from(_TOKENS)) + text[hit.end() :]
    return text[: draw(st.integers(0, len(text)))]


def _nested(depth: int, kind: str) -> bytes:
    return (b'{"a": ' * depth + b"1" + b"}" * depth) if kind == "object" else (b"[" * depth + b"1" + b"]" * depth)


def bodies(route: str) -> st.SearchStrategy[bytes]:
    _, shaped, deep = BODY_ROUTES[route]
    nested = st.tuples(st.integers(1, 5000), st.sampled_from(["object", "array"])).map(lambda dk: deep % _nested(*dk))
    as_json = st.tuples(shaped, st.booleans()).map(lambda vb: _encode(*vb))
    return st.one_of(
        as_json,  # the body most likely to reach the core, so most of the examples
        as_json,
        as_json,
        st.tuples(JSON, st.booleans()).map(lambda vb: _encode(*vb)),
        _mutated(shaped),
        nested,
        st.binary(max_size=64),
    )


CONTENT_TYPES = st.sampled_from(["application/json"] * 4 + ["text/plain", "application/json; charset=latin-1", ""])

# Checks


def check(response: httpx.Response) -> None:
    """Never a 5xx; a refusal has the error shape and no server internals in its message."""
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = assert_error(response, response.status_code)
        assert not INTERNALS.search(error["message"]), error["message"]
    else:
        response.json()
    assert response.headers["x-request-id"]


# Fixtures


@pytest.fixture(scope="module")
def client(open_server: Running) -> Iterator[httpx.Client]:
    """A new connection for every request: after a 5xx uvicorn closes the connection, and a failure should be
    reported for the request that caused it, not as a reset on the next one."""
    limits = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=base_url(open_server), timeout=60, limits=limits) as c:
        yield c


@pytest.fixture(scope="module")
def target(client: httpx.Client) -> str:
    """The collection the document and search routes are fuzzed against, with a few documents in it."""
    assert client.post("/v1/collections", json={"name": TARGET}).status_code == 200
    documents = [{"id": f"d{i}", "text": f"document {i}", "metadata": {"n": i, "tag": "fuzz"}} for i in range(4)]
    assert client.post(f"/v1/collections/{TARGET}/documents", json={"documents": documents}).status_code == 200
    return TARGET


@pytest.fixture(scope="module")
def keyed_client(keyed_server: Running) -> Iterator[httpx.Client]:
    limits = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=base_url(keyed_server), timeout=60, limits=limits) as c:
        yield c


# Properties


@pytest.mark.parametrize("route", list(BODY_ROUTES))
@given(data=st.data())
def test_any_body_on_any_route(client: httpx.Client, target: str, route: str, data: st.DataObject) -> None:
    body = data.draw(bodies(route), label="body")
    content_type = data.draw(CONTENT_TYPES, label="content-type")
    headers = {"content-type": content_type} if content_type else {}
    check(client.post(BODY_ROUTES[route][0], content=body, headers=headers))


PATHS: dict[str, tuple[str, str, Any]] = {
    "get": ("GET", "/v1/collections/{}", None),
    "drop": ("DELETE", "/v1/collections/{}", None),
    "upsert": ("POST", "/v1/collections/{}/documents", {"documents": [{"text": "a document"}]}),
    "delete": ("POST", "/v1/collections/{}/documents/delete", {"ids": ["d0"]}),
    "search": ("POST", "/v1/collections/{}/search", {"query": "a query"}),
    "model": ("GET", "/v1/models/{}", None),
}


@pytest.mark.parametrize("route", list(PATHS))
# "", "." and ".." leave the path segment empty (the client normalises dot segments): another route.
@given(name=NAME.filter(lambda n: n not in (TARGET, "", ".", "..")))
def test_any_name_in_the_path(client: httpx.Client, target: str, route: str, name: str) -> None:
    method, template, body = PATHS[route]
    path = template.format(quote(name.encode("utf-8", "surrogatepass"), safe=""))
    check(client.request(method, path, json=body))


# Header values as h11 lets a client send them: visible ASCII and obs-text bytes.
HEADER_VALUE = st.lists(st.integers(0x21, 0xFF).filter(lambda b: b != 0x7F), max_size=200).map(bytes)


@given(request_id=HEADER_VALUE, authorization=HEADER_VALUE | HEADER_VALUE.filter(bool).map(lambda v: b"Bearer " + v))
def test_any_request_id_and_authorization(keyed_client: httpx.Client, request_id: bytes, authorization: bytes) -> None:
    response = keyed_client.get(
        "/v1/models", headers=[(b"x-request-id", request_id), (b"authorization", authorization)]
    )
    check(response)
    assert response.status_code == 401
    echoed = response.headers["x-request-id"]
    if 0 < len(request_id) <= 128 and request_id.isascii():
        assert echoed == request_id.decode()
    else:
        assert re.fullmatch(r"[0-9a-f]{32}", echoed)


def test_a_real_key_passes_whatever_the_request_id(keyed_server: Running, keyed_client: httpx.Client) -> None:
    key = make_key(keyed_server, "fuzz", "reader")
    headers = [(b"x-request-id", b"\xff" * 10), (b"authorization", f"Bearer {key}".encode())]
    response = keyed_client.get("/v1/models", headers=headers)
    assert response.status_code == 200


# Bodies found to reach a 500 or to leak internals (the fuzzing above finds them too, by chance): each a 400.

_DOCS = {"documents": [{"text": "a document"}]}
_IN_TARGET = f"/v1/collections/{TARGET}"
KNOWN: dict[str, tuple[str, str, Any]] = {
    "create: NUL in name": ("POST", "/v1/collections", {"name": "a\x00b"}),
    "drop: NUL in name": ("DELETE", "/v1/collections/a%00b", None),
    "upsert: NUL in name": ("POST", "/v1/collections/a%00b/documents", _DOCS),
    "delete: NUL in name": ("POST", "/v1/collections/a%00b/documents/delete", {"ids": ["x"]}),
    "upsert: lone surrogate in text": ("POST", f"{_IN_TARGET}/documents", {"documents": [{"text": "x\ud800"}]}),
    "upsert: lone surrogate in id": ("POST", f"{_IN_TARGET}/documents", {"documents": [{"text": "x", "id": "\ud800"}]}),
    "upsert: lone surrogate in metadata value": (
        "POST",
        f"{_IN_TARGET}/documents",
        {"documents": [{"text": "x", "metadata": {"k": "\ud800"}}]},
    ),
    "upsert: lone surrogate in metadata key": (
        "POST",
        f"{_IN_TARGET}/documents",
        {"documents": [{"text": "x", "metadata": {"\ud800": 1}}]},
    ),
    "delete: lone surrogate in ids": ("POST", f"{_IN_TARGET}/documents/delete", {"ids": ["\ud800"]}),
    "delete: lone surrogate in filter": ("POST", f"{_IN_TARGET}/documents/delete", {"filter": {"k": "\ud800"}}),
    "search: lone surrogate in filter": ("POST", f"{_IN_TARGET}/search", {"query": "q", "filter": {"k": "\ud800"}}),
    "search: lone surrogate in query": ("POST", f"{_IN_TARGET}/search", {"query": "\ud800"}),
    "embeddings: lone surrogate in input": ("POST", "/v1/embeddings", {"input": "\ud800", "model": MODEL}),
}


@pytest.mark.parametrize("case", list(KNOWN))
def test_known_hostile_bodies_are_400(client: httpx.Client, target: str, case: str) -> None:
    method, path, body = KNOWN[case]
    content = json.dumps(body).encode() if body is not None else None  # lone surrogates go as \ud800 escapes
    response = client.request(method, path, content=content, headers={"content-type": "application/json"})
    check(response)
    assert response.status_code == 400
