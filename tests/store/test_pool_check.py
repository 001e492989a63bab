"""The pool's check of a connection it hands out: a healthy idle connection costs no round trip, one whose
backend is gone is found out and replaced before a request draws it, and the first one found dead has the pool
swept of the others."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import AsyncConnection

from embedpool.store import EmbeddedPostgres, Store
from embedpool.store.liveness import check_idle

from .conftest import rows, unique_name, unit_vectors

pytestmark = pytest.mark.anyio


async def _traced_check(conn: AsyncConnection[Any], trace: Path) -> None:
    """`check_idle(conn)` with libpq's protocol trace on: every message it sends or reads lands in `trace`."""
    with trace.open("w") as out:
        conn.pgconn.trace(out.fileno())
        try:
            await check_idle(conn)
        finally:
            conn.pgconn.untrace()


async def test_a_healthy_idle_connection_is_checked_without_a_round_trip(
    postgres: EmbeddedPostgres, tmp_path: Path
) -> None:
    async with await AsyncConnection.connect(postgres.uri, autocommit=True) as conn:
        await conn.execute("SELECT 1")
        await _traced_check(conn, tmp_path / "idle.trace")
        assert (tmp_path / "idle.trace").read_text() == ""
        # It was checked, not skipped: the same connection still answers.
        assert await (await conn.execute("SELECT 2")).fetchone() == (2,)


async def test_a_terminated_backend_fails_the_check(postgres: EmbeddedPostgres, tmp_path: Path) -> None:
    async with (
        await AsyncConnection.connect(postgres.uri, autocommit=True) as victim,
        await AsyncConnection.connect(postgres.uri, autocommit=True) as admin,
    ):
        await admin.execute("SELECT pg_terminate_backend(%s, 5000)", (victim.info.backend_pid,))
        with pytest.raises(psycopg.OperationalError):
            await _traced_check(victim, tmp_path / "dead.trace")
        # The check went to the server to find out: the trace shows the message it read.
        assert (tmp_path / "dead.trace").read_text() != ""
        with pytest.raises(psycopg.OperationalError):
            await check_idle(victim)  # and a broken connection stays refused


async def test_requests_after_every_backend_was_terminated_draw_fresh_connections_in_time(
    postgres: EmbeddedPostgres,
) -> None:
    name = unique_name("check")
    async with await AsyncConnection.connect(postgres.uri, autocommit=True) as admin:
        backends = "SELECT array_agg(pid) FROM pg_stat_activity WHERE backend_type = 'client backend'"
        before = set((await (await admin.execute(backends)).fetchone() or [[]])[0])
        # psycopg_pool waits 1 s, 2 s, 4 s, ... between a request's failed checks: drawn one by one, eight dead
        # connections would outlast the 3 s timeout. The first one found dead has the pool swept of the others.
        store = await Store.open(postgres.uri, min_size=8, max_size=8, timeout=3.0)
        try:
            await store.create_collection(name, model="m", dim=8)
            assert (await store.upsert(name, rows(unit_vectors(20, 8, seed=3)))).inserted == 20
            pool = set((await (await admin.execute(backends)).fetchone() or [[]])[0]) - before
            assert len(pool) == 8, pool
            cur = await admin.execute(
                "SELECT bool_and(pg_terminate_backend(pid, 5000)) FROM unnest(%s) pid", (list(pool),)
            )
            assert await cur.fetchone() == (True,)
            # Every pooled connection is dead; each request still succeeds on a fresh one.
            for _ in range(6):
                assert (await store.stats(name)).count == 20
            now = set((await (await admin.execute(backends)).fetchone() or [[]])[0]) - before
            assert now and not now & pool, (now, pool)  # served by new backends only
        finally:
            await store.close()
