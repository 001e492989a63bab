"""Every failure reaches the caller as one of embedpool.errors' domain errors, never as a grpc.RpcError."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
import pytest

from embedpool.client import Client, Document, IndexOptions
from embedpool.errors import (
    AlreadyExists,
    EmbedpoolError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from embedpool.server.app import Running

from .conftest import KeyFactory


@pytest.fixture(scope="module")
def client(server: Running) -> Iterator[Client]:
    with Client(f"127.0.0.1:{server.port}") as c:
        yield c


def _no_grpc_inside(error: BaseException) -> None:
    seen: BaseException | None = error
    while seen is not None:
        assert not isinstance(seen, grpc.RpcError), repr(seen)
        seen = seen.__cause__ or seen.__context__


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.get_collection("errors-none"),
        lambda c: c.search("errors-none", "query"),
        lambda c: c.upsert("errors-none", ["text"]),
        lambda c: c.delete("errors-none", ["id"]),
        lambda c: c.drop_collection("errors-none"),
        lambda c: c.ingest("errors-none", ["text"]),
    ],
    ids=["get", "search", "upsert", "delete", "drop", "ingest"],
)
def test_an_unknown_collection_is_not_found(client: Client, call: Callable[[Client], object]) -> None:
    with pytest.raises(NotFound, match="errors-none") as raised:
        call(client)
    _no_grpc_inside(raised.value)


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.embed(["fine", ""]),
        lambda c: c.embed(["fine"], dimensions=7),
        lambda c: c.search("errors-ok", "query", k=0),
        lambda c: c.search("errors-ok", [0.5, 0.5]),  # not the collection's dimension
        lambda c: c.create_collection("not a name!"),
        lambda c: c.delete("errors-ok"),  # neither ids nor a filter
        lambda c: c.upsert("errors-ok", [Document("text", metadata={"bad": float("nan")})]),
        lambda c: c.embed("one string, not a list"),
    ],
    ids=["empty-text", "dimensions", "k", "vector", "name", "delete", "metadata", "str"],
)
def test_a_malformed_call_is_an_invalid_argument(client: Client, call: Callable[[Client], object]) -> None:
    client.create_collection("errors-ok", exist_ok=True)
    with pytest.raises(InvalidArgument) as raised:
        call(client)
    _no_grpc_inside(raised.value)


def test_create_is_idempotent_and_exist_ok_takes_the_collection_as_it_is(client: Client) -> None:
    made = client.create_collection("errors-create", index=IndexOptions(m=8))
    assert client.create_collection("errors-create", index=IndexOptions(m=8)) == made  # a retried create
    with pytest.raises(AlreadyExists):
        client.create_collection("errors-create")
    assert client.create_collection("errors-create", exist_ok=True).index.m == 8
    assert "errors-create" in {c.name for c in client.list_collections()}
    client.drop_collection("errors-create")
    with pytest.raises(NotFound):
        client.get_collection("errors-create")


def test_keys_are_checked(keyed: Running, make_key: KeyFactory) -> None:
    target = f"127.0.0.1:{keyed.port}"
    with Client(target) as anonymous, pytest.raises(Unauthenticated):
        anonymous.embed(["who am I"])
    with Client(target, api_key="ep_nope_nope") as forged, pytest.raises(Unauthenticated):
        forged.embed(["who am I"])
    with Client(target, api_key=make_key("reader")) as reader, pytest.raises(PermissionDenied):
        reader.create_collection("errors-reader")


def test_domain_errors_share_one_base(client: Client) -> None:
    with pytest.raises(EmbedpoolError):
        client.get_collection("errors-none")
