"""Every caller mistake gets a precise status and a message that says what is wrong; never UNKNOWN/INTERNAL."""

from __future__ import annotations

import math
import struct
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from embedpool.server.codec import dict_to_struct
from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def known(stub: pb_grpc.EmbedderStub) -> str:
    name = f"known_{uuid.uuid4().hex[:8]}"
    stub.CreateCollection(pb.CreateCollectionRequest(name=name))
    return name


def _doc(text: str = "fine", **kw: Any) -> pb.Document:
    return pb.Document(text=text, **kw)


def _doc_with_metadata(metadata: dict[str, Any]) -> pb.Document:
    return pb.Document(text="some text", metadata=dict_to_struct(metadata))


CASES: list[tuple[str, Callable[[str], tuple[str, Any]], grpc.StatusCode, str]] = [
    ("empty batch", lambda c: ("Embed", pb.EmbedRequest()), INVALID, "at least one document"),
    ("empty text", lambda c: ("Embed", pb.EmbedRequest(documents=[_doc(), _doc("")])), INVALID, "documents[1].text"),
    ("blank text", lambda c: ("Embed", pb.EmbedRequest(documents=[_doc("  \n")])), INVALID, "documents[0].text"),
    (
        "too many documents",
        lambda c: ("Embed", pb.EmbedRequest(documents=[_doc()] * 1025)),
        INVALID,
        "over the limit of 1024",
    ),
    (
        "too many bytes",
        lambda c: ("Embed", pb.EmbedRequest(documents=[_doc("x" * (17 * 1024 * 1024))])),
        INVALID,
        "bytes, over the limit",
    ),
    (
        "unknown collection",
        lambda c: ("Embed", pb.EmbedRequest(documents=[_doc()], collection="nope_missing")),
        grpc.StatusCode.NOT_FOUND,
        "nope_missing",
    ),
    (
        "bad collection name",
        lambda c: ("Embed", pb.EmbedRequest(documents=[_doc()], collection="drop table;")),
        INVALID,
        "not a valid name",
    ),
    (
        "NUL in stored text",
        lambda c: ("Embed", pb.EmbedRequest(documents=[_doc("a\x00b")], collection=c)),
        INVALID,
        "NUL",
    ),
    (
        "NUL in stored metadata",
        lambda c: (
            "Embed",
            pb.EmbedRequest(documents=[_doc(), _doc_with_metadata({"tags": ["ok", "a\x00b"]})], collection=c),
        ),
        INVALID,
        "documents[1].metadata: contains a NUL",
    ),
    (
        "NaN in stored metadata",
        lambda c: ("Embed", pb.EmbedRequest(documents=[_doc_with_metadata({"x": {"y": math.nan}})], collection=c)),
        INVALID,
        "documents[0].metadata: nan is not a JSON number",
    ),
    ("k zero", lambda c: ("Search", pb.SearchRequest(collection=c, text="q", k=0)), INVALID, "k: must be in"),
    ("k too large", lambda c: ("Search", pb.SearchRequest(collection=c, text="q", k=100_000)), INVALID, "k: must be"),
    ("no query", lambda c: ("Search", pb.SearchRequest(collection=c, k=3)), INVALID, "query"),
    (
        "wrong dimension",
        lambda c: ("Search", pb.SearchRequest(collection=c, vector=struct.pack("<3f", 1, 2, 3), k=3)),
        INVALID,
        "expected 384 float32",
    ),
    (
        "NaN vector",
        lambda c: ("Search", pb.SearchRequest(collection=c, vector=struct.pack("<384f", *[float("nan")] * 384), k=3)),
        INVALID,
        "NaN",
    ),
    (
        "zero vector",
        lambda c: ("Search", pb.SearchRequest(collection=c, vector=bytes(4 * 384), k=3)),
        INVALID,
        "all zeros",
    ),
    (
        "search unknown collection",
        lambda c: ("Search", pb.SearchRequest(collection="nope_missing", text="q", k=3)),
        grpc.StatusCode.NOT_FOUND,
        "nope_missing",
    ),
    ("delete no ids", lambda c: ("DeleteDocuments", pb.DeleteDocumentsRequest(collection=c)), INVALID, "ids"),
    (
        "delete too many ids",
        lambda c: ("DeleteDocuments", pb.DeleteDocumentsRequest(collection=c, ids=[f"i{n}" for n in range(10_001)])),
        INVALID,
        "over the limit of 10000",
    ),
    (
        "delete NUL id",
        lambda c: ("DeleteDocuments", pb.DeleteDocumentsRequest(collection=c, ids=["a\x00b"])),
        INVALID,
        "ids[0]",
    ),
    (
        "filter too large",
        lambda c: ("Search", pb.SearchRequest(collection=c, text="q", k=3, filter=dict_to_struct({"k": "v" * 20_000}))),
        INVALID,
        "filter: ",
    ),
    (
        "metadata too large",
        lambda c: ("Embed", pb.EmbedRequest(documents=[_doc_with_metadata({"k": "v" * 70_000})], collection=c)),
        INVALID,
        "documents[0].metadata: ",
    ),
    (
        "delete ids and filter",
        lambda c: (
            "DeleteDocuments",
            pb.DeleteDocumentsRequest(collection=c, ids=["a"], filter=dict_to_struct({"k": 1})),
        ),
        INVALID,
        "exactly one",
    ),
    (
        "delete empty filter",
        lambda c: ("DeleteDocuments", pb.DeleteDocumentsRequest(collection=c, filter=dict_to_struct({}))),
        INVALID,
        "filter",
    ),
    (
        "get unknown collection",
        lambda c: ("GetCollection", pb.GetCollectionRequest(name="nope_missing")),
        grpc.StatusCode.NOT_FOUND,
        "nope_missing",
    ),
    (
        "drop unknown",
        lambda c: ("DropCollection", pb.DropCollectionRequest(name="nope_missing")),
        grpc.StatusCode.NOT_FOUND,
        "nope_missing",
    ),
    ("create bad name", lambda c: ("CreateCollection", pb.CreateCollectionRequest(name="")), INVALID, "name"),
]


@pytest.mark.parametrize(("label", "build", "code", "fragment"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_precise_status(
    stub: pb_grpc.EmbedderStub,
    known: str,
    label: str,
    build: Callable[[str], tuple[str, Any]],
    code: grpc.StatusCode,
    fragment: str,
) -> None:
    method, request = build(known)
    with pytest.raises(grpc.RpcError) as err:
        getattr(stub, method)(request, timeout=30)
    assert err.value.code() == code, f"{label}: {err.value.code()} {err.value.details()}"
    assert fragment in (err.value.details() or ""), f"{label}: message was {err.value.details()!r}"


documents = st.lists(
    st.builds(pb.Document, id=st.text(max_size=20), text=st.text(max_size=200)),
    max_size=8,
)


@given(docs=documents, store=st.booleans())
def test_arbitrary_embed_requests_never_fail_internally(
    stub: pb_grpc.EmbedderStub, known: str, docs: list[pb.Document], store: bool
) -> None:
    request = pb.EmbedRequest(documents=docs, collection=known if store else "")
    try:
        reply = stub.Embed(request, timeout=60)
    except grpc.RpcError as err:
        assert err.code() == INVALID, f"{err.code()}: {err.details()}"
        return
    assert len(reply.vectors) == len(docs) and all(d.text.strip() for d in docs)


@given(k=st.integers(min_value=0, max_value=3000), text=st.text(max_size=50), candidates=st.integers(0, 20_000))
def test_arbitrary_search_requests_never_fail_internally(
    stub: pb_grpc.EmbedderStub, known: str, k: int, text: str, candidates: int
) -> None:
    try:
        reply = stub.Search(pb.SearchRequest(collection=known, text=text, k=k, candidates=candidates), timeout=60)
    except grpc.RpcError as err:
        assert err.code() == INVALID, f"{err.code()}: {err.details()}"
        return
    assert len(reply.hits) <= k
