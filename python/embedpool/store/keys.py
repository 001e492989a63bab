"""The api_keys table (migration 0005): create, look up, list, revoke. Secrets never reach this module;
only their hashes do."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from psycopg import AsyncConnection

from embedpool.errors import NotFound

__all__ = ["CHANNEL", "KeyRecord", "insert", "list_keys", "lookup", "revoke"]

CHANNEL: Final = "embedpool_keys"
_COLUMNS: Final = "id, secret_hash, tenant, role, collections, tokens_per_s, docs_per_s, note, created_at, revoked_at"


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    secret_hash: bytes
    tenant: str
    role: str
    collections: str
    tokens_per_s: float | None
    docs_per_s: float | None
    note: str
    created_at: datetime
    revoked_at: datetime | None


def _record(row: tuple[Any, ...]) -> KeyRecord:
    id, secret_hash, tenant, role, collections, tokens_per_s, docs_per_s, note, created_at, revoked_at = row
    return KeyRecord(
        id, bytes(secret_hash), tenant, role, collections, tokens_per_s, docs_per_s, note, created_at, revoked_at
    )


async def insert(
    conn: AsyncConnection[Any],
    *,
    id: str,
    secret_hash: bytes,
    tenant: str,
    role: str,
    collections: str,
    tokens_per_s: float | None,
    docs_per_s: float | None,
    note: str,
) -> KeyRecord:
    cur = await conn.execute(
        f"INSERT INTO api_keys (id, secret_hash, tenant, role, collections, tokens_per_s, docs_per_s, note)"
        f" VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING {_COLUMNS}",
        (id, secret_hash, tenant, role, collections, tokens_per_s, docs_per_s, note),
    )
    row = await cur.fetchone()
    assert row is not None
    return _record(row)


async def lookup(conn: AsyncConnection[Any], id: str) -> KeyRecord | None:
    cur = await conn.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE id = %s", (id,))
    row = await cur.fetchone()
    return None if row is None else _record(row)


async def list_keys(conn: AsyncConnection[Any], tenant: str | None = None) -> list[KeyRecord]:
    cur = await conn.execute(
        f"SELECT {_COLUMNS} FROM api_keys WHERE %(tenant)s::text IS NULL OR tenant = %(tenant)s"
        " ORDER BY tenant, created_at, id",
        {"tenant": tenant},
    )
    return [_record(row) for row in await cur.fetchall()]


async def revoke(conn: AsyncConnection[Any], id: str, tenant: str | None = None) -> KeyRecord:
    """Marks the key revoked (kept for the audit log's key ids); NotFound for an unknown id, or one of
    another tenant when `tenant` is given. Revoking twice keeps the first time."""
    cur = await conn.execute(
        f"UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())"
        f" WHERE id = %(id)s AND (%(tenant)s::text IS NULL OR tenant = %(tenant)s) RETURNING {_COLUMNS}",
        {"id": id, "tenant": tenant},
    )
    row = await cur.fetchone()
    if row is None:
        raise NotFound(f"no key {id!r}")
    return _record(row)
