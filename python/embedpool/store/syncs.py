"""Sync definitions and progress (migration 0006), in embedpool's own database."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from psycopg import AsyncConnection

from embedpool.store.sync_source import SyncSource

__all__ = ["BUCKET_S", "SyncRecord", "create", "delete", "get", "list_all", "rate", "record_progress", "set_paused"]

BUCKET_S: Final = 10
_KEEP: Final = "1 hour"
_COLUMNS: Final = (
    "name, database, source_schema, source_table, id_column, id_type, text_expr, metadata_columns, where_expr,"
    " collection, paused, created_at"
)


@dataclass(frozen=True, slots=True)
class SyncRecord:
    source: SyncSource
    database: str
    collection: str
    paused: bool
    created_at: datetime | None = None

    @property
    def name(self) -> str:
        return self.source.name


def _record(row: tuple[Any, ...]) -> SyncRecord:
    name, database, schema, table, id_column, id_type, text_expr, metadata, where, collection, paused, created = row
    source = SyncSource(name, schema, table, id_column, id_type, text_expr, tuple(metadata), where)
    return SyncRecord(source, database, collection, bool(paused), created)


async def create(conn: AsyncConnection[Any], record: SyncRecord) -> bool:
    """False if a sync of that name exists."""
    s = record.source
    cur = await conn.execute(
        f"INSERT INTO syncs ({_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, now())"
        " ON CONFLICT (name) DO NOTHING",
        (
            s.name,
            record.database,
            s.schema,
            s.table,
            s.id_column,
            s.id_type,
            s.text_expr,
            list(s.metadata_columns),
            s.where_expr,
            record.collection,
            record.paused,
        ),
    )
    return cur.rowcount == 1


async def get(conn: AsyncConnection[Any], name: str) -> SyncRecord | None:
    cur = await conn.execute(f"SELECT {_COLUMNS} FROM syncs WHERE name = %s", (name,))
    row = await cur.fetchone()
    return None if row is None else _record(row)


async def list_all(conn: AsyncConnection[Any]) -> list[SyncRecord]:
    cur = await conn.execute(f"SELECT {_COLUMNS} FROM syncs ORDER BY name")
    return [_record(row) for row in await cur.fetchall()]


async def set_paused(conn: AsyncConnection[Any], name: str, paused: bool) -> bool:
    cur = await conn.execute("UPDATE syncs SET paused = %s WHERE name = %s", (paused, name))
    return cur.rowcount == 1


async def delete(conn: AsyncConnection[Any], name: str) -> bool:
    cur = await conn.execute("DELETE FROM syncs WHERE name = %s", (name,))
    return cur.rowcount == 1


async def record_progress(conn: AsyncConnection[Any], name: str, rows: int, failures: int) -> None:
    """Adds a batch's counts to the current bucket (and now and then prunes old buckets)."""
    await conn.execute(
        "INSERT INTO sync_progress (sync, bucket, rows, failures)"
        f" VALUES (%s, date_bin('{BUCKET_S} seconds', now(), 'epoch'), %s, %s)"
        " ON CONFLICT (sync, bucket) DO UPDATE"
        " SET rows = sync_progress.rows + EXCLUDED.rows, failures = sync_progress.failures + EXCLUDED.failures",
        (name, rows, failures),
    )
    await conn.execute(
        f"DELETE FROM sync_progress WHERE sync = %s AND bucket < now() - interval '{_KEEP}' AND random() < 0.01",
        (name,),
    )


async def rate(conn: AsyncConnection[Any], name: str, window_s: int = 60) -> tuple[float, int]:
    """Rows stored per second over the last `window_s` seconds by every replica, and rows failed then."""
    cur = await conn.execute(
        "SELECT coalesce(sum(rows), 0), coalesce(sum(failures), 0) FROM sync_progress"
        " WHERE sync = %s AND bucket >= now() - make_interval(secs => %s)",
        (name, window_s),
    )
    row = await cur.fetchone()
    assert row is not None
    return float(row[0]) / window_s, int(row[1])
