"""API keys against a real server and Postgres: exactly the allowed calls succeed, tenants never see each
other's collections, refusals carry the precise status, revocation reaches a second server within 1 s, and
a key over its rate gets RESOURCE_EXHAUSTED with RetryInfo while another key is unaffected."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from embedpool.security import keyring
from embedpool.server.app import Running
from embedpool.server.auth import RULES
from embedpool.store import Store
from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc

from ..conftest import SettingsFactory, serving
from ..conftest import create_key as make_key

_names = itertools.count()


def revoke(url: str, key: str) -> None:
    async def run() -> None:
        store = await Store.open(url, max_size=1)
        try:
            await keyring.revoke_key(store, key.split("_")[1])
        finally:
            await store.close()

    anyio.run(run)


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory, make_settings: SettingsFactory) -> Iterator[Running]:
    with serving(make_settings(tmp_path_factory.mktemp("auth"), auth="keys")) as running:
        yield running


@pytest.fixture(scope="module")
def channel(keyed: Running) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{keyed.port}") as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.EmbedderStub:
    return pb_grpc.EmbedderStub(channel)


@pytest.fixture(scope="module")
def admins(keyed: Running, stub: pb_grpc.EmbedderStub) -> dict[str, str]:
    """An admin key each for tenants alpha and beta, each of which owns `<tenant>-docs` with one document."""
    keys = {t: make_key(keyed.database_url, t, "admin") for t in ("alpha", "beta")}
    for tenant, key in keys.items():
        stub.CreateCollection(pb.CreateCollectionRequest(name=f"{tenant}-docs"), metadata=bearer(key))
        stub.Embed(
            pb.EmbedRequest(collection=f"{tenant}-docs", documents=[pb.Document(id="d1", text=f"{tenant} text")]),
            metadata=bearer(key),
        )
    return keys


def _doc() -> list[pb.Document]:
    return [pb.Document(id=f"x{next(_names)}", text="a short document")]


# Each RPC as the tested key makes it, on a collection `name`. `setup(admin_key)` makes what the call needs.
Call = Callable[[pb_grpc.EmbedderStub, str, Any], Any]
CALLS: dict[str, tuple[str, Call]] = {
    "Embed": ("reader", lambda s, name, md: s.Embed(pb.EmbedRequest(documents=_doc()), metadata=md)),
    "GetModelInfo": ("reader", lambda s, name, md: s.GetModelInfo(pb.GetModelInfoRequest(), metadata=md)),
    "Search": ("reader", lambda s, name, md: s.Search(pb.SearchRequest(collection=name, text="q", k=1), metadata=md)),
    "GetCollection": ("reader", lambda s, name, md: s.GetCollection(pb.GetCollectionRequest(name=name), metadata=md)),
    "EmbedInto": (
        "writer",
        lambda s, name, md: s.Embed(pb.EmbedRequest(collection=name, documents=_doc()), metadata=md),
    ),
    "Ingest": (
        "writer",
        lambda s, name, md: list(
            s.Ingest(iter([pb.IngestRequest(collection=name, batch_id=1, documents=_doc())]), metadata=md)
        ),
    ),
    "DeleteDocuments": (
        "writer",
        lambda s, name, md: s.DeleteDocuments(pb.DeleteDocumentsRequest(collection=name, ids=["nope"]), metadata=md),
    ),
    "DropCollection": ("admin", lambda s, name, md: s.DropCollection(pb.DropCollectionRequest(name=name), metadata=md)),
}
RANK = {"reader": 1, "writer": 2, "admin": 3}


def _code(call: Callable[[], Any]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_every_method_of_the_service_has_a_rule() -> None:
    methods = set(pb.DESCRIPTOR.services_by_name["Embedder"].methods_by_name)
    assert methods == set(RULES)


@pytest.mark.parametrize("role", ["reader", "writer", "admin"])
def test_role_by_rpc_by_tenant_matrix(
    keyed: Running, stub: pb_grpc.EmbedderStub, admins: dict[str, str], role: str
) -> None:
    """Own tenant: exactly the calls the role allows succeed. Other tenant: none does; the collection is
    NOT_FOUND when the role would allow the call, PERMISSION_DENIED when it would not."""
    key = make_key(keyed.database_url, "beta", role)
    outcomes: dict[tuple[str, str], grpc.StatusCode] = {}
    for rpc, (needed, call) in CALLS.items():
        allowed = RANK[role] >= RANK[needed]
        own = f"beta-scratch-{next(_names)}"
        stub.CreateCollection(pb.CreateCollectionRequest(name=own), metadata=bearer(admins["beta"]))
        outcomes[rpc, "own"] = _code(functools.partial(call, stub, own, bearer(key)))
        outcomes[rpc, "other"] = _code(functools.partial(call, stub, "alpha-docs", bearer(key)))
        assert outcomes[rpc, "own"] == (grpc.StatusCode.OK if allowed else grpc.StatusCode.PERMISSION_DENIED), rpc
        if rpc not in ("Embed", "GetModelInfo"):  # these name no collection
            expected = grpc.StatusCode.NOT_FOUND if allowed else grpc.StatusCode.PERMISSION_DENIED
            assert outcomes[rpc, "other"] == expected, rpc
    create = _code(
        lambda: stub.CreateCollection(pb.CreateCollectionRequest(name=f"beta-new-{role}"), metadata=bearer(key))
    )
    assert create == (grpc.StatusCode.OK if role == "admin" else grpc.StatusCode.PERMISSION_DENIED)
    # alpha's collection is untouched by all of it
    alpha = stub.GetCollection(pb.GetCollectionRequest(name="alpha-docs"), metadata=bearer(admins["alpha"]))
    assert alpha.name == "alpha-docs"
    assert alpha.count == 1


def test_a_tenant_lists_only_its_own_collections_by_its_own_names(
    stub: pb_grpc.EmbedderStub, admins: dict[str, str]
) -> None:
    listed = stub.ListCollections(pb.ListCollectionsRequest(), metadata=bearer(admins["alpha"]))
    names = {c.name for c in listed.collections}
    assert "alpha-docs" in names
    assert not any("beta" in n or "/" in n for n in names)
    # the same name in two tenants is two collections
    for key in admins.values():
        stub.CreateCollection(pb.CreateCollectionRequest(name="shared-name"), metadata=bearer(key))
    stub.Embed(
        pb.EmbedRequest(collection="shared-name", documents=[pb.Document(id="a", text="only alpha")]),
        metadata=bearer(admins["alpha"]),
    )
    hits = stub.Search(pb.SearchRequest(collection="shared-name", text="alpha", k=5), metadata=bearer(admins["beta"]))
    assert list(hits.hits) == []


def test_a_collection_grant_limits_a_key_to_matching_names(
    keyed: Running, stub: pb_grpc.EmbedderStub, admins: dict[str, str]
) -> None:
    stub.CreateCollection(pb.CreateCollectionRequest(name="team-a"), metadata=bearer(admins["alpha"]))
    key = make_key(keyed.database_url, "alpha", "writer", collections="team-*")
    stub.Search(pb.SearchRequest(collection="team-a", text="q", k=1), metadata=bearer(key))
    assert _code(
        lambda: stub.Search(pb.SearchRequest(collection="alpha-docs", text="q", k=1), metadata=bearer(key))
    ) == (grpc.StatusCode.PERMISSION_DENIED)
    listed = stub.ListCollections(pb.ListCollectionsRequest(), metadata=bearer(key))
    assert {c.name for c in listed.collections} == {"team-a"}


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        (("authorization", "Basic dXNlcjpwYXNz"),),
        (("authorization", "Bearer not-a-key"),),
        (("authorization", "Bearer ep_0123456789ab_" + "A" * 43),),  # well formed, unknown
    ],
    ids=["missing", "not-bearer", "malformed", "unknown"],
)
def test_without_a_valid_key_every_rpc_is_unauthenticated(
    stub: pb_grpc.EmbedderStub, metadata: tuple[tuple[str, str], ...]
) -> None:
    for rpc, (_, call) in CALLS.items():
        try:
            call(stub, "alpha-docs", metadata)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED, rpc
            details = e.details()
            assert details is not None, rpc
            assert "postgres" not in details.lower() and "select" not in details.lower()
            assert "/" not in details.replace("'Bearer <key>'", "")
        else:
            pytest.fail(f"{rpc} succeeded without a key")


def test_a_wrong_secret_for_a_real_key_id_is_unauthenticated(keyed: Running, stub: pb_grpc.EmbedderStub) -> None:
    key = make_key(keyed.database_url, "alpha", "reader")
    forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    assert _code(lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=bearer(forged))) == (
        grpc.StatusCode.UNAUTHENTICATED
    )


def test_health_and_reflection_need_no_key(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    services = {s.name for r in replies for s in r.list_services_response.service}
    assert "embedpool.v1.Embedder" in services


def test_reflection_can_be_turned_off(tmp_path: Path, make_settings: SettingsFactory) -> None:
    with (
        serving(make_settings(tmp_path, reflection=False)) as running,
        grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch,
    ):
        replies = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        with pytest.raises(grpc.RpcError) as caught:
            list(replies)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def _retry_delay(error: grpc.RpcError) -> float:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no google.rpc.Status in the trailers"
    for detail in status.details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return float(info.retry_delay.ToNanoseconds()) / 1e9
    raise AssertionError("no RetryInfo in the status details")


def test_a_key_over_its_document_rate_is_told_when_to_retry_and_others_are_unaffected(
    keyed: Running, stub: pb_grpc.EmbedderStub
) -> None:
    limited = make_key(keyed.database_url, "alpha", "reader", docs_per_s=4)
    other = make_key(keyed.database_url, "alpha", "reader", docs_per_s=4)
    docs = [pb.Document(text=f"text {i}") for i in range(4)]
    stub.Embed(pb.EmbedRequest(documents=docs), metadata=bearer(limited))
    with pytest.raises(grpc.RpcError) as caught:
        stub.Embed(pb.EmbedRequest(documents=docs), metadata=bearer(limited))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    delay = _retry_delay(caught.value)
    assert 0 < delay <= 1.0
    stub.Embed(pb.EmbedRequest(documents=docs), metadata=bearer(other))  # its own bucket
    time.sleep(delay)
    stub.Embed(pb.EmbedRequest(documents=docs), metadata=bearer(limited))  # after the delay it was told


def test_tokens_are_charged_after_the_call_and_the_debt_delays_the_next(
    keyed: Running, stub: pb_grpc.EmbedderStub
) -> None:
    key = make_key(keyed.database_url, "alpha", "reader", tokens_per_s=20)
    long = pb.Document(text=" ".join(["word"] * 100))  # ~100 tokens: five seconds of this key's rate
    stub.Embed(pb.EmbedRequest(documents=[long]), metadata=bearer(key))
    with pytest.raises(grpc.RpcError) as caught:
        stub.Embed(pb.EmbedRequest(documents=[pb.Document(text="short")]), metadata=bearer(key))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert 3.0 < _retry_delay(caught.value) < 6.0


def test_usage_is_booked_per_tenant_in_the_table_and_the_metrics(
    keyed: Running, stub: pb_grpc.EmbedderStub, admins: dict[str, str]
) -> None:
    stub.Search(pb.SearchRequest(collection="beta-docs", text="beta", k=1), metadata=bearer(admins["beta"]))
    stub.Embed(pb.EmbedRequest(documents=[pb.Document(text="counted")]), metadata=bearer(admins["beta"]))

    async def usage() -> tuple[int, int, int]:
        import psycopg

        async with await psycopg.AsyncConnection.connect(keyed.database_url) as conn:
            cur = await conn.execute(
                "SELECT coalesce(sum(searches), 0), coalesce(sum(tokens), 0), coalesce(sum(documents), 0)"
                " FROM tenant_usage WHERE tenant = 'beta'"
            )
            row = await cur.fetchone()
            assert row is not None
            return int(row[0]), int(row[1]), int(row[2])

    deadline = time.monotonic() + 15
    while (booked := anyio.run(usage))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.5)  # the server adds its counts to the table every few seconds
    searches, tokens, documents = booked
    assert searches >= 1 and tokens > 0 and documents >= 1
    body = urllib.request.urlopen(f"http://127.0.0.1:{keyed.metrics_port}/metrics", timeout=5).read().decode()
    assert 'embedpool_tenant_searches_total{tenant="beta"}' in body
    assert 'embedpool_tenant_tokens_total{tenant="alpha"}' in body


def test_revocation_reaches_a_second_server_within_a_second(
    keyed: Running, tmp_path: Path, make_settings: SettingsFactory
) -> None:
    """Two servers on one Postgres: a key revoked through one database connection is refused by both within
    1 s (each drops it from its cache on the notification)."""
    second = dataclasses.replace(keyed.settings, data_dir=tmp_path, database_url=keyed.database_url, port=0)
    key = make_key(keyed.database_url, "alpha", "reader")
    with serving(second) as other:
        targets = [f"127.0.0.1:{keyed.port}", f"127.0.0.1:{other.port}"]
        channels = [grpc.insecure_channel(t) for t in targets]
        try:
            stubs = [pb_grpc.EmbedderStub(ch) for ch in channels]
            for s in stubs:  # both have the key cached now
                s.GetModelInfo(pb.GetModelInfoRequest(), metadata=bearer(key))
            revoke(keyed.database_url, key)
            revoked_at = time.monotonic()
            refused_after = []
            for s in stubs:
                while _code(functools.partial(s.GetModelInfo, pb.GetModelInfoRequest(), metadata=bearer(key))) == (
                    grpc.StatusCode.OK
                ):
                    assert time.monotonic() - revoked_at < 5, "the revoked key still works after 5 s"
                    time.sleep(0.01)
                refused_after.append(time.monotonic() - revoked_at)
            assert max(refused_after) <= 1.0, refused_after
        finally:
            for ch in channels:
                ch.close()


def test_admins_manage_their_own_tenants_keys_over_grpc(
    keyed: Running, stub: pb_grpc.EmbedderStub, admins: dict[str, str]
) -> None:
    alpha = bearer(admins["alpha"])
    made = stub.CreateKey(pb.CreateKeyRequest(role="reader", docs_per_s=50, note="made over gRPC"), metadata=alpha)
    assert made.key.startswith(f"ep_{made.info.id}_") and made.info.tenant == "alpha"
    assert made.info.docs_per_s == 50 and not made.info.HasField("tokens_per_s")
    assert stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=bearer(made.key)).dim > 0
    listed = stub.ListKeys(pb.ListKeysRequest(), metadata=alpha)
    assert made.info.id in {k.id for k in listed.keys} and {k.tenant for k in listed.keys} == {"alpha"}
    beta_key = stub.CreateKey(pb.CreateKeyRequest(role="reader"), metadata=bearer(admins["beta"]))
    assert _code(lambda: stub.RevokeKey(pb.RevokeKeyRequest(id=beta_key.info.id), metadata=alpha)) == (
        grpc.StatusCode.NOT_FOUND
    )
    revoked = stub.RevokeKey(pb.RevokeKeyRequest(id=made.info.id), metadata=alpha)
    assert revoked.revoked_at_unix_ms > 0
    deadline = time.monotonic() + 1.0
    while _code(lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=bearer(made.key))) == (grpc.StatusCode.OK):
        assert time.monotonic() < deadline, "the key revoked over gRPC still works after 1 s"
        time.sleep(0.01)


def test_only_an_admin_granted_every_collection_manages_keys(keyed: Running, stub: pb_grpc.EmbedderStub) -> None:
    for key in (
        make_key(keyed.database_url, "alpha", "writer"),
        make_key(keyed.database_url, "alpha", "admin", collections="team-*"),  # could grant itself "*"
    ):
        for call in (
            lambda md: stub.CreateKey(pb.CreateKeyRequest(role="admin"), metadata=md),
            lambda md: stub.ListKeys(pb.ListKeysRequest(), metadata=md),
            lambda md: stub.RevokeKey(pb.RevokeKeyRequest(id="0123456789ab"), metadata=md),
        ):
            assert _code(functools.partial(call, bearer(key))) == grpc.StatusCode.PERMISSION_DENIED
    bad = stub.CreateKey
    admin = make_key(keyed.database_url, "alpha", "admin")
    assert _code(lambda: bad(pb.CreateKeyRequest(role="root"), metadata=bearer(admin))) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )


def test_key_management_input_postgres_cannot_hold_is_invalid(keyed: Running, stub: pb_grpc.EmbedderStub) -> None:
    """Found by the chaos fuzzer once it covered every method: a NUL reached Postgres and came back INTERNAL."""
    admin = bearer(make_key(keyed.database_url, "alpha", "admin"))
    for call in (
        lambda: stub.RevokeKey(pb.RevokeKeyRequest(id="0123456789a\x00"), metadata=admin),
        lambda: stub.RevokeKey(pb.RevokeKeyRequest(id="not a key id"), metadata=admin),
        lambda: stub.CreateKey(pb.CreateKeyRequest(role="reader", note="a\x00b"), metadata=admin),
        lambda: stub.CreateKey(pb.CreateKeyRequest(role="reader", collections="a\x00*"), metadata=admin),
    ):
        assert _code(call) == grpc.StatusCode.INVALID_ARGUMENT
