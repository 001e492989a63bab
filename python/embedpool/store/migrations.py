"""Schema migrations: migrations/NNNN_name.up.sql and .down.sql, applied in order, each in its own transaction.

Applied versions are recorded in `schema_migrations`. A session-level advisory lock serializes runners, so
several servers starting against one database apply each migration once.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import AsyncConnection

__all__ = ["MIGRATIONS_DIR", "Migration", "applied_versions", "discover", "migrate_down", "migrate_up"]

# Shipped inside the package (embedpool/migrations), so an installed wheel finds them; the repository's
# top-level migrations/ is a link to it.
MIGRATIONS_DIR = Path(__file__).resolve().parents[1] / "migrations"
# Any constant works; it only has to be the same for every runner. (The bytes of "embedpool".)
_LOCK_KEY = 0x656D626564706F6F
_FILE = re.compile(r"^(\d{4})_(\w+)\.(up|down)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    up: Path
    down: Path


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Migrations in version order; every version needs both an .up.sql and a .down.sql."""
    found: dict[tuple[int, str], dict[str, Path]] = {}
    for path in directory.iterdir():
        if match := _FILE.match(path.name):
            found.setdefault((int(match[1]), match[2]), {})[match[3]] = path
    versions = [v for v, _ in found]
    if len(versions) != len(set(versions)):
        raise RuntimeError(f"two migrations share a version number in {directory}")
    migrations = []
    for (version, name), files in sorted(found.items()):
        if set(files) != {"up", "down"}:
            raise RuntimeError(f"migration {version:04d}_{name} needs both .up.sql and .down.sql")
        migrations.append(Migration(version, name, files["up"], files["down"]))
    return migrations


async def applied_versions(conn: AsyncConnection[Any]) -> list[int]:
    await _ensure_table(conn)
    cur = await conn.execute("SELECT version FROM schema_migrations ORDER BY version")
    return [row[0] for row in await cur.fetchall()]


async def migrate_up(
    conn: AsyncConnection[Any], target: int | None = None, *, directory: Path = MIGRATIONS_DIR
) -> list[int]:
    """Apply pending migrations up to `target` (all when None); return the versions applied.

    `conn` must be in autocommit mode: each migration runs in a transaction of its own.
    """
    migrations = discover(directory)
    async with _runner_lock(conn):
        done = set(await applied_versions(conn))
        applied = []
        for m in migrations:
            if m.version in done or (target is not None and m.version > target):
                continue
            async with conn.transaction():
                await conn.execute(m.up.read_bytes())
                await conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (m.version, m.name))
            applied.append(m.version)
        return applied


async def migrate_down(conn: AsyncConnection[Any], target: int, *, directory: Path = MIGRATIONS_DIR) -> list[int]:
    """Revert applied migrations newer than `target` (0 reverts all), newest first; return the versions reverted."""
    by_version = {m.version: m for m in discover(directory)}
    async with _runner_lock(conn):
        reverted = []
        for version in sorted(await applied_versions(conn), reverse=True):
            if version <= target:
                break
            if version not in by_version:
                raise RuntimeError(f"migration {version:04d} is applied but its files are missing")
            async with conn.transaction():
                await conn.execute(by_version[version].down.read_bytes())
                await conn.execute("DELETE FROM schema_migrations WHERE version = %s", (version,))
            reverted.append(version)
        return reverted


async def _ensure_table(conn: AsyncConnection[Any]) -> None:
    await conn.execute(
        """CREATE TABLE IF NOT EXISTS schema_migrations (
               version    integer     PRIMARY KEY,
               name       text        NOT NULL,
               applied_at timestamptz NOT NULL DEFAULT now())"""
    )


@contextlib.asynccontextmanager
async def _runner_lock(conn: AsyncConnection[Any]) -> AsyncIterator[None]:
    """Session-level advisory lock, held across the per-migration transactions."""
    if not conn.autocommit:
        raise ValueError("the migration runner needs an autocommit connection")
    await conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
    try:
        yield
    finally:
        # On a broken connection the server has already released the lock with the session.
        with contextlib.suppress(psycopg.OperationalError):
            await conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
