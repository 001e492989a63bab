"""The audit_log table (migration 0005): append one event; read the chain back in order.

The insert trigger assigns seq, time and the hash chain; this module never computes a hash, so that
`security.audit.verify` checks the database's work with an implementation of its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from psycopg import AsyncConnection

__all__ = ["AuditRow", "append", "rows"]

_COLUMNS: Final = "seq, at, request_id, tenant, key_id, peer, method, collection, documents, status, prev_hash, hash"


@dataclass(frozen=True, slots=True)
class AuditRow:
    seq: int
    at: datetime
    request_id: str
    tenant: str
    key_id: str
    peer: str
    method: str
    collection: str
    documents: int
    status: str
    prev_hash: bytes
    hash: bytes


async def append(
    conn: AsyncConnection[Any],
    *,
    request_id: str,
    tenant: str,
    key_id: str,
    peer: str,
    method: str,
    collection: str,
    documents: int,
    status: str,
) -> int:
    """Appends one event; returns its seq."""
    cur = await conn.execute(
        "INSERT INTO audit_log (seq, at, request_id, tenant, key_id, peer, method, collection, documents, status,"
        " prev_hash, hash) VALUES (0, now(), %s, %s, %s, %s, %s, %s, %s, %s, '', '') RETURNING seq",
        (request_id, tenant, key_id, peer, method, collection, documents, status),
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def rows(conn: AsyncConnection[Any], *, after: int = 0, batch: int = 10_000) -> AsyncIterator[AuditRow]:
    """Every row with seq > `after`, in seq order, read in batches (the log may be large)."""
    while True:
        cur = await conn.execute(
            f"SELECT {_COLUMNS} FROM audit_log WHERE seq > %s ORDER BY seq LIMIT %s", (after, batch)
        )
        fetched = await cur.fetchall()
        for row in fetched:
            seq, at, rid, tenant, key_id, peer, method, collection, documents, status, prev_hash, hash = row
            yield AuditRow(
                seq, at, rid, tenant, key_id, peer, method, collection, documents, status, bytes(prev_hash), bytes(hash)
            )
        if len(fetched) < batch:
            return
        after = fetched[-1][0]
