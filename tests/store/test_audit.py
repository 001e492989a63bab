"""The audit log in a real Postgres: appends are chained in order under concurrency, the table refuses
UPDATE, DELETE and TRUNCATE, and every kind of after-the-fact edit by a superuser is caught by `verify`."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import psycopg
import pytest
from psycopg import AsyncConnection

from embedpool.security.audit import verify
from embedpool.store import EmbeddedPostgres, Store
from embedpool.store import audit as audit_rows

pytestmark = pytest.mark.anyio
_databases = itertools.count()


@pytest.fixture
async def store(postgres: EmbeddedPostgres) -> AsyncIterator[Store]:
    """A database of its own: audit rows can never be removed, so each test starts from an empty log."""
    if not postgres.running:
        postgres.start()
    url = postgres.create_database(f"audit_{next(_databases)}")
    s = await Store.open(url, max_size=4, timeout=3.0)
    try:
        yield s
    finally:
        await s.close()


async def _append(store: Store, n: int, *, tenant: str = "acme") -> None:
    async def one(i: int) -> None:
        async with store.connection() as conn:
            await audit_rows.append(
                conn,
                request_id=f"r{i}",
                tenant=tenant,
                key_id="0123456789ab",
                peer="ipv4:127.0.0.1:1",
                method="Ingest",
                collection="docs",
                documents=i,
                status="OK",
            )

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(one, i)


async def _as_superuser_bypassing_triggers(store: Store, statement: str) -> None:
    """What an operator with superuser rights could do: switch the triggers off for a session and edit."""
    async with await AsyncConnection.connect(store.url, autocommit=True) as conn:
        await conn.execute("SET session_replication_role = replica")
        await conn.execute(statement)


async def test_concurrent_appends_form_one_gapless_chain(store: Store) -> None:
    await _append(store, 40)
    result = await verify(store)
    assert result.ok, result.reason
    assert result.rows == result.head_seq == 40
    async with store.connection() as conn:
        seqs = [row.seq async for row in audit_rows.rows(conn, batch=7)]  # several batches
    assert seqs == list(range(1, 41))


@pytest.mark.parametrize(
    "statement", ["UPDATE audit_log SET documents = 0", "DELETE FROM audit_log", "TRUNCATE audit_log"]
)
async def test_the_server_role_cannot_change_or_remove_rows(store: Store, statement: str) -> None:
    await _append(store, 3)
    async with store.connection() as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await conn.execute(statement)
    assert (await verify(store)).rows == 3


Tamper = Callable[[Store], Awaitable[Any]]
TAMPERING: dict[str, tuple[str, int, str]] = {
    "edit a field": ("UPDATE audit_log SET tenant = 'other' WHERE seq = 5", 5, "contents"),
    "edit and rehash one row": (
        "UPDATE audit_log SET documents = 99, hash = sha256(hash) WHERE seq = 5",
        5,
        "contents",
    ),
    "delete a row": ("DELETE FROM audit_log WHERE seq = 5", 5, "missing"),
    "insert a row": (
        "INSERT INTO audit_log SELECT seq + 100, at, request_id, tenant, key_id, peer, method, collection, documents,"
        " status, prev_hash, hash FROM audit_log WHERE seq = 3",
        101,
        "missing",
    ),
}


@pytest.mark.parametrize("kind", list(TAMPERING))
async def test_an_edit_made_past_the_triggers_is_caught(store: Store, kind: str) -> None:
    statement, broken_at, reason = TAMPERING[kind]
    await _append(store, 10)
    assert (await verify(store)).ok
    await _as_superuser_bypassing_triggers(store, statement)
    result = await verify(store)
    assert not result.ok
    assert result.broken_at == (11 if kind == "insert a row" else broken_at)
    assert reason in result.reason


async def test_removing_the_newest_rows_is_caught_against_a_recorded_head(store: Store) -> None:
    await _append(store, 6)
    head = await verify(store)
    await _append(store, 2)
    assert (await verify(store, expect=(head.head_seq, head.head_hash))).ok  # growth keeps the old head
    await _as_superuser_bypassing_triggers(store, "DELETE FROM audit_log WHERE seq >= 6")
    assert (await verify(store)).ok  # without a recorded head, a cut tail looks like a shorter log
    cut = await verify(store, expect=(head.head_seq, head.head_hash))
    assert not cut.ok and "no longer" in cut.reason
