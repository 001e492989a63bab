"""What the server appends to the audit log: every write and admin action once, with the caller's tenant, key
id (never the key), collection and counts; refused credentials too; reads not at all. The same events go to
the JSON log, and `embedpool audit verify` (a real process) checks the chain."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator

import anyio
import grpc
import psycopg
import pytest

from embedpool.server.app import Running
from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc

from ..conftest import SettingsFactory, ingest_batches, serving
from ..conftest import create_key as make_key
from .test_auth import bearer


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory, make_settings: SettingsFactory) -> Iterator[Running]:
    with serving(make_settings(tmp_path_factory.mktemp("audit"), auth="keys")) as running:
        yield running


def _rows(url: str) -> dict[str, list[tuple[object, ...]]]:
    async def read() -> dict[str, list[tuple[object, ...]]]:
        async with await psycopg.AsyncConnection.connect(url) as conn:
            cur = await conn.execute(
                "SELECT request_id, tenant, key_id, method, collection, documents, status FROM audit_log ORDER BY seq"
            )
            found: dict[str, list[tuple[object, ...]]] = {}
            for row in await cur.fetchall():
                found.setdefault(row[0], []).append(row[1:])
            return found

    return anyio.run(read)


def _rid(rid: str, key: str) -> tuple[tuple[str, str], ...]:
    return (*bearer(key), ("x-request-id", rid))


def test_each_write_admin_action_and_refusal_is_audited_once(
    audited: Running, caplog: pytest.LogCaptureFixture
) -> None:
    url = audited.database_url
    admin = make_key(url, "acme", "admin")
    writer = make_key(url, "acme", "writer")
    reader = make_key(url, "acme", "reader")
    admin_id, writer_id, reader_id = (k.split("_")[1] for k in (admin, writer, reader))
    with (
        caplog.at_level(logging.INFO, logger="embedpool.audit"),
        grpc.insecure_channel(f"127.0.0.1:{audited.port}") as channel,
    ):
        stub = pb_grpc.EmbedderStub(channel)
        stub.CreateCollection(pb.CreateCollectionRequest(name="docs"), metadata=_rid("create", admin))
        stub.CreateCollection(pb.CreateCollectionRequest(name="scratch"), metadata=_rid("create2", admin))
        stub.Embed(
            pb.EmbedRequest(collection="docs", documents=[pb.Document(id=f"e{i}", text=f"t {i}") for i in range(3)]),
            metadata=_rid("embed-into", writer),
        )
        acks = list(stub.Ingest(ingest_batches("docs", 2, 4), metadata=_rid("ingest", writer)))
        assert len(acks) == 2
        deleted = stub.DeleteDocuments(
            pb.DeleteDocumentsRequest(collection="docs", ids=["e0", "e1", "missing"]), metadata=_rid("delete", writer)
        )
        assert deleted.deleted == 2
        stub.DropCollection(pb.DropCollectionRequest(name="scratch"), metadata=_rid("drop", admin))
        stub.Search(pb.SearchRequest(collection="docs", text="t", k=1), metadata=_rid("search", reader))
        stub.Embed(pb.EmbedRequest(documents=[pb.Document(text="no collection")]), metadata=_rid("embed", reader))
        with pytest.raises(grpc.RpcError):
            stub.Embed(
                pb.EmbedRequest(collection="docs", documents=[pb.Document(text="x")]), metadata=_rid("denied", reader)
            )
        with pytest.raises(grpc.RpcError):
            stub.GetModelInfo(
                pb.GetModelInfoRequest(),
                metadata=(("authorization", f"Bearer ep_{reader_id}_{'x' * 43}"), ("x-request-id", "forged")),
            )
    rows = _rows(url)
    assert rows["create"] == [("acme", admin_id, "CreateCollection", "docs", 0, "OK")]
    assert rows["create2"] == [("acme", admin_id, "CreateCollection", "scratch", 0, "OK")]
    assert rows["embed-into"] == [("acme", writer_id, "Embed", "docs", 3, "OK")]
    assert rows["ingest"] == [("acme", writer_id, "Ingest", "docs", 8, "OK")]
    assert rows["delete"] == [("acme", writer_id, "DeleteDocuments", "docs", 2, "OK")]
    assert rows["drop"] == [("acme", admin_id, "DropCollection", "scratch", 0, "OK")]
    assert rows["denied"] == [("acme", reader_id, "Embed", "docs", 0, "PERMISSION_DENIED")]
    assert rows["forged"] == [("", reader_id, "GetModelInfo", "", 0, "UNAUTHENTICATED")]
    assert "search" not in rows and "embed" not in rows  # reads are metered, not audited
    secrets = {k.split("_", 2)[2] for k in (admin, writer, reader)}
    assert not any(secret in str(rows) for secret in secrets)
    logged = {r.audit["request_id"]: r.audit for r in caplog.records if hasattr(r, "audit")}
    assert logged["ingest"]["documents"] == 8 and logged["ingest"]["tenant"] == "acme"
    assert logged["forged"]["status"] == "UNAUTHENTICATED"
    assert not any(secret in caplog.text for secret in secrets)


def test_audit_verify_cli_checks_the_servers_chain(audited: Running) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "embedpool.cli", "audit", "verify", "--database-url", audited.database_url],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "EMBEDPOOL_LOG_LEVEL": "warning"},
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is True and report["rows"] >= 1
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "embedpool.cli",
            "audit",
            "verify",
            "--database-url",
            audited.database_url,
            "--expect",
            report["head"],
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0 and json.loads(again.stdout)["ok"] is True, again.stderr
