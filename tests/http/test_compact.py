"""Compact outputs over HTTP: encoding_format base64_int8 and base64_binary (embedpool extensions), and
collections created with a storage type and a Matryoshka size, on the package's open server (declares 128)."""

from __future__ import annotations

import base64
import itertools
from typing import Any

import httpx
import numpy as np
import pytest
from numpy.typing import NDArray

from .conftest import MATRYOSHKA, MODEL, assert_error

TEXTS = ["The cat sat on the mat.", "Stock markets fell sharply today.", "A kitten naps on a rug."]
_names = itertools.count()


def _embed(http: httpx.Client, encoding_format: str, **options: Any) -> list[Any]:
    body = {"input": TEXTS, "model": MODEL, "encoding_format": encoding_format, **options}
    response = http.post("/v1/embeddings", json=body)
    assert response.status_code == 200, response.text
    return [item["embedding"] for item in response.json()["data"]]


def _int8(encoded: str) -> NDArray[np.float32]:
    raw = base64.b64decode(encoded)
    scale = np.frombuffer(raw[:4], "<f4").astype(np.float32)
    return np.frombuffer(raw[4:], np.int8).astype(np.float32) * scale


def test_int8_and_binary_encodings(http: httpx.Client) -> None:
    full = np.array(_embed(http, "float"), np.float32)
    int8 = np.stack([_int8(e) for e in _embed(http, "base64_int8")])
    step = np.abs(full).max(axis=1, keepdims=True) / 127
    assert (np.abs(int8 - full) <= step / 2 + 1e-7).all()
    bits = np.stack([np.frombuffer(base64.b64decode(e), np.uint8) for e in _embed(http, "base64_binary")])
    assert bits.shape == (3, 48)
    np.testing.assert_array_equal(np.unpackbits(bits, axis=1), (full > 0).astype(np.uint8))
    short = [base64.b64decode(e) for e in _embed(http, "base64_binary", dimensions=MATRYOSHKA)]
    assert {len(b) for b in short} == {MATRYOSHKA // 8}


def test_an_unknown_encoding_names_the_field(http: httpx.Client) -> None:
    response = http.post("/v1/embeddings", json={"input": TEXTS, "model": MODEL, "encoding_format": "base64_int4"})
    assert assert_error(response, 400)["param"] == "encoding_format"


@pytest.mark.parametrize("storage", ["float16", "binary"])
def test_a_collection_with_a_storage_and_a_reduced_size(http: httpx.Client, storage: str) -> None:
    name = f"compact-{storage}-{next(_names)}"
    body = {"name": name, "storage": storage, "dimensions": MATRYOSHKA}
    created = http.post("/v1/collections", json=body).json()
    assert (created["storage"], created["dim"]) == (storage, MATRYOSHKA)
    documents = [{"id": str(i), "text": t} for i, t in enumerate(TEXTS)]
    assert http.post(f"/v1/collections/{name}/documents", json={"documents": documents}).status_code == 200
    query = {"query": TEXTS[2], "k": 3, "include_vectors": True, "encoding_format": "base64_int8"}
    hits = http.post(f"/v1/collections/{name}/search", json=query).json()["data"]
    assert hits[0]["id"] == "2" and len(hits) == 3
    vector = _int8(hits[0]["vector"])
    assert vector.size == MATRYOSHKA and float(np.linalg.norm(vector)) == pytest.approx(1.0, abs=0.02)
    assert http.get(f"/v1/collections/{name}").json()["storage"] == storage
    assert http.post("/v1/collections", json=body).status_code == 200  # the same definition again
    other = http.post("/v1/collections", json={"name": name})
    assert assert_error(other, 409)


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"storage": "int8"}, "storage", "float32"),
        ({"dimensions": 100}, "dimensions", "returns 384, 128"),
    ],
)
def test_bad_storage_options_are_400s_naming_the_field(
    http: httpx.Client, body: dict[str, Any], param: str, words: str
) -> None:
    error = assert_error(http.post("/v1/collections", json={"name": f"bad-{next(_names)}", **body}), 400)
    assert error["param"] == param or error["message"].startswith(param), error
    assert words in error["message"]
