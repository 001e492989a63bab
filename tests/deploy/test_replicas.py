"""Three `embedpool serve` replicas on one Postgres, behind Debian's nginx and HAProxy (gRPC over HTTP/2) and
reached by the client's own round-robin: races between replicas leave the store right, and a replica SIGKILLed
and another drained with SIGTERM mid-load cost no call. Every process is started and stopped here.

Throughput figures (3 replicas vs 1, balancer vs client round-robin, seconds to recover) are bench/replicas.py's
to print; here only what must hold: no failed call, and calls completing again within 5 s of each fault."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedpool.client import Client, Document
from embedpool.store.embedded import EmbeddedPostgres
from embedpool.store.migrations import discover

# Appended, not prepended: bench/tokenize.py must not shadow the standard library's tokenize.
sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))

from _fleet import Fleet, balancers
from replicas import failover

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with EmbeddedPostgres(tmp_path_factory.mktemp("shared-pg")) as pg:
        yield pg.uri


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, model_dir: Path, database: str) -> Iterator[Fleet]:
    """Started at once against a fresh database: the three race to apply the migrations."""
    with Fleet(3, tmp_path_factory.mktemp("fleet"), model_dir, database, http_port=-1, grace_seconds=3.0) as f:
        yield f


def _serving(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="embedpool.v1.Embedder"), timeout=10
        )
    return int(reply.status)


def test_replicas_racing_on_a_fresh_database_apply_each_migration_once(fleet: Fleet, database: str) -> None:
    assert all(_serving(t) == health_pb2.HealthCheckResponse.SERVING for t in fleet.targets)
    with psycopg.connect(database) as conn:
        versions = [row[0] for row in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]
    assert versions == [m.version for m in discover()]


def test_replicas_racing_to_create_and_bulk_load_one_collection_store_each_document_once(
    fleet: Fleet, database: str
) -> None:
    """Each replica is asked to create the same collection and bulk-load overlapping documents into it at the same
    moment: one collection, every id once with its one text, and its HNSW index built at the end."""
    clients = [Client(t, timeout=120) for t in fleet.targets]
    # Three loads of 300 ids each, overlapping by 100 with the next; an id's text is the same whoever writes it.
    loads = [
        [Document(f"shared document {j} of the racing replicas", id=f"d{j}") for j in range(200 * i, 200 * i + 300)]
        for i in range(3)
    ]
    barrier = threading.Barrier(3)
    errors: list[BaseException] = []

    def race(client: Client, documents: list[Document]) -> None:
        try:
            barrier.wait(timeout=30)
            client.create_collection("raced")
            client.ingest("raced", documents, batch_size=50, bulk=True)
        except BaseException as e:  # re-raised below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=race, args=(c, d)) for c, d in zip(clients, loads, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for c in clients:
        c.close()
    assert not errors, errors
    with psycopg.connect(database) as conn:
        collections = conn.execute("SELECT id FROM collections WHERE name = 'raced'").fetchall()
        assert len(collections) == 1
        rows = conn.execute(
            "SELECT id, text FROM documents WHERE collection_id = %s ORDER BY id", (collections[0][0],)
        ).fetchall()
        indexes = conn.execute("SELECT indexdef FROM pg_indexes WHERE indexdef ILIKE '%USING hnsw%'").fetchall()
    expected = {f"d{j}": f"shared document {j} of the racing replicas" for j in range(700)}
    assert dict(rows) == expected
    assert len(rows) == len(expected)
    assert indexes, "no HNSW index after the bulk loads ended"
    with Client(fleet.targets[2]) as client:  # what one replica stored, another finds
        hits = client.search("raced", "shared document 42 of the racing replicas", k=1)
    assert hits[0].id == "d42"


def test_sigkill_and_sigterm_mid_load_fail_no_call_behind_nginx_haproxy_or_client_round_robin(
    fleet: Fleet, tmp_path: Path
) -> None:
    with balancers(fleet.targets, tmp_path) as lbs:
        figures = failover(fleet, {name: b.target for name, b in lbs.items()}, seconds=11.0, kill_at=3.0, term_at=6.0)
    print(figures)  # the bench's figures, for whoever reads the log (-s)
    assert not fleet.replica(0).alive()
    assert fleet.replica(1).proc.wait(30) == 0, "the drained replica did not exit cleanly"
    assert set(figures["paths"]) == {"nginx", "haproxy", "client round-robin"}
    for name, path in figures["paths"].items():
        assert path["calls_failed"] == 0, (name, path["failures"])
        assert path["calls_ok"] > 0, name
        assert path["ok_within_5s_of_kill"], (name, path["timeline"])
        assert path["ok_within_5s_of_term"], (name, path["timeline"])
