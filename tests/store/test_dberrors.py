"""Postgres failures reach callers as precise domain errors, with none of the engine's words (paths, SQL)."""

from __future__ import annotations

import psycopg
import pytest

from embedpool.errors import DeadlineExceeded, NotFound, Unavailable
from embedpool.store import EmbeddedPostgres, Store
from embedpool.store.dberrors import database_errors

pytestmark = pytest.mark.anyio


def test_statement_timeout_is_deadline_exceeded(postgres: EmbeddedPostgres) -> None:
    conn = psycopg.connect(postgres.uri, autocommit=True, options="-c statement_timeout=50")
    with conn, pytest.raises(DeadlineExceeded) as err, database_errors():
        conn.execute("SELECT pg_sleep(2)")
    assert "pg_sleep" not in str(err.value)


def test_lock_timeout_is_unavailable(postgres: EmbeddedPostgres) -> None:
    with psycopg.connect(postgres.uri, autocommit=True) as holder:
        holder.execute("CREATE TABLE IF NOT EXISTS lock_probe (x int)")
        with holder.transaction():
            holder.execute("LOCK TABLE lock_probe IN ACCESS EXCLUSIVE MODE")
            waiter = psycopg.connect(postgres.uri, autocommit=True, options="-c lock_timeout=50")
            with waiter, pytest.raises(Unavailable, match="retry") as err, database_errors():
                waiter.execute("SELECT * FROM lock_probe")
    assert "lock_probe" not in str(err.value)


def test_a_dropped_table_is_not_found(postgres: EmbeddedPostgres) -> None:
    with psycopg.connect(postgres.uri, autocommit=True) as conn, pytest.raises(NotFound), database_errors():
        conn.execute("SELECT * FROM documents_c999999")


async def test_an_unreachable_database_names_no_socket_or_host(tmp_path: object) -> None:
    url = f"postgresql://postgres@/embedpool?host={tmp_path}"
    with pytest.raises(Unavailable) as err:
        await Store.open(url, timeout=1.0)
    assert str(tmp_path) not in str(err.value) and "socket" not in str(err.value)
    assert str(tmp_path) in str(err.value.__cause__)  # the detail is kept for the log


async def test_the_pool_applies_the_statement_timeout(postgres: EmbeddedPostgres) -> None:
    store = await Store.open(postgres.uri, max_size=1, statement_timeout=0.25, lock_timeout=0.5)
    try:
        async with store._connection() as conn:
            cur = await conn.execute("SHOW statement_timeout")
            assert (await cur.fetchone()) == ("250ms",)
            cur = await conn.execute("SHOW lock_timeout")
            assert (await cur.fetchone()) == ("500ms",)
    finally:
        await store.close()
