from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from psycopg import AsyncConnection
from psycopg.rows import TupleRow

import embedpool
from embedpool.store import EmbeddedPostgres
from embedpool.store.migrations import MIGRATIONS_DIR, applied_versions, discover, migrate_down, migrate_up

pytestmark = pytest.mark.anyio


async def _tables(conn: AsyncConnection[TupleRow]) -> set[str]:
    cur = await conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {row[0] for row in await cur.fetchall()}


def test_migrations_ship_inside_the_package() -> None:
    """A wheel carries the package directory only: the SQL must live there (the top-level folder links to it)."""
    package = Path(embedpool.__file__).resolve().parent
    assert MIGRATIONS_DIR.is_relative_to(package)
    assert [m.version for m in discover()] == list(range(1, len(discover()) + 1))
    top_level = package.parents[1] / "migrations"
    assert top_level.resolve() == MIGRATIONS_DIR


async def test_up_down_up(postgres: EmbeddedPostgres) -> None:
    uri = postgres.create_database("migrations_up_down")
    latest = discover()[-1].version
    async with await AsyncConnection.connect(uri, autocommit=True) as conn:
        await migrate_down(conn, 0)  # a clean slate, whatever a previous run left
        assert await migrate_up(conn) == [m.version for m in discover()]
        assert await applied_versions(conn) == [m.version for m in discover()]
        assert {"collections", "documents", "schema_migrations"} <= await _tables(conn)
        assert await migrate_up(conn) == []  # idempotent

        assert await migrate_down(conn, 0) == [m.version for m in reversed(discover())]
        assert await _tables(conn) == {"schema_migrations"}
        assert await applied_versions(conn) == []

        assert await migrate_up(conn, target=latest) == [m.version for m in discover()]
        assert {"collections", "documents"} <= await _tables(conn)


async def test_concurrent_runners_apply_each_migration_once(postgres: EmbeddedPostgres) -> None:
    uri = postgres.create_database("migrations_concurrent")
    applied: list[list[int]] = []

    async def run() -> None:
        async with await AsyncConnection.connect(uri, autocommit=True) as conn:
            applied.append(await migrate_up(conn))

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(run)
    assert sorted(v for batch in applied for v in batch) == [m.version for m in discover()]


async def test_runner_needs_autocommit(postgres: EmbeddedPostgres) -> None:
    async with await AsyncConnection.connect(postgres.uri) as conn:
        with pytest.raises(ValueError, match="autocommit"):
            await migrate_up(conn)
