"""The tenant_usage table (migration 0005): per tenant and hour, what servers used on its behalf."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection

__all__ = ["UsageRow", "add", "rows"]


@dataclass(frozen=True, slots=True)
class UsageRow:
    tenant: str
    hour: datetime
    requests: int
    tokens: int
    documents: int
    searches: int
    bytes_out: int


async def add(conn: AsyncConnection[Any], counts: Sequence[tuple[str, int, int, int, int, int]]) -> None:
    """Adds (tenant, requests, tokens, documents, searches, bytes_out) to the current hour's rows."""
    # In tenant order, so two servers adding for the same tenants cannot deadlock.
    async with conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO tenant_usage AS u (tenant, hour, requests, tokens, documents, searches, bytes_out)"
            " VALUES (%s, date_trunc('hour', now()), %s, %s, %s, %s, %s)"
            " ON CONFLICT (tenant, hour) DO UPDATE SET requests = u.requests + excluded.requests,"
            " tokens = u.tokens + excluded.tokens, documents = u.documents + excluded.documents,"
            " searches = u.searches + excluded.searches, bytes_out = u.bytes_out + excluded.bytes_out",
            sorted(counts),
        )


async def rows(conn: AsyncConnection[Any], tenant: str | None = None) -> list[UsageRow]:
    cur = await conn.execute(
        "SELECT tenant, hour, requests, tokens, documents, searches, bytes_out FROM tenant_usage"
        " WHERE %(tenant)s::text IS NULL OR tenant = %(tenant)s ORDER BY hour, tenant",
        {"tenant": tenant},
    )
    return [UsageRow(*row) for row in await cur.fetchall()]
