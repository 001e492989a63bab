"""The databases syncs read from: embedpool's own ('default') and those named by --sync-databases.

Each gets two connection pools of its own: the workers', bounded by --sync-workers (a batch holds its connection
while it embeds), and one connection for managing syncs and reading their queues, so that a status call never
waits behind a batch. Sync work never takes more source connections than that (plus one LISTEN connection per
database), and never takes the store's, which requests need.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, Final

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from embedpool.errors import InvalidArgument, NotFound
from embedpool.store.dberrors import database_errors
from embedpool.store.liveness import IdleCheck

__all__ = ["APPLICATION_NAME", "DEFAULT", "SourceDatabases", "parse_databases"]

DEFAULT: Final = "default"
APPLICATION_NAME: Final = "embedpool-sync"


def parse_databases(raw: str, own_url: str) -> dict[str, str]:
    """`NAME=URL` pairs separated by whitespace; 'default' is embedpool's own database unless given."""
    urls = {DEFAULT: own_url}
    for item in raw.split():
        name, sep, url = item.partition("=")
        if not sep or not name or not url:
            raise InvalidArgument(f"sync_databases: {name or item[:20]!r} is not NAME=URL")
        urls[name] = url
    return urls


class SourceDatabases:
    def __init__(self, urls: dict[str, str], *, max_connections: int, timeout: float = 10.0) -> None:
        self._urls = urls
        self._max = max(1, max_connections)
        self._timeout = timeout
        self._pools: dict[tuple[str, bool], AsyncConnectionPool[AsyncConnection[Any]]] = {}

    @property
    def names(self) -> list[str]:
        return sorted(self._urls)

    def url(self, name: str) -> str:
        """For the LISTEN connection, which is held outside the pool."""
        try:
            return self._urls[name]
        except KeyError:
            raise NotFound(f"database: no source database {name!r} is configured (--sync-databases)") from None

    @contextlib.asynccontextmanager
    async def connection(self, name: str, *, work: bool = False) -> AsyncIterator[AsyncConnection[Any]]:
        """A connection to source database `name`: from the workers' pool with `work`, else the one for
        managing syncs and reading their queues."""
        pool = self._pools.get((name, work))
        if pool is None:
            pool = AsyncConnectionPool(
                self.url(name),
                min_size=0,
                max_size=self._max if work else 1,
                kwargs={
                    "autocommit": True,
                    "connect_timeout": max(1, round(self._timeout)),
                    "application_name": APPLICATION_NAME,  # so an operator can see (and count) them
                },
                check=(check := IdleCheck()),
                timeout=self._timeout,
                reconnect_timeout=self._timeout,
                open=False,
                name=f"embedpool-sync-{name}-{'work' if work else 'manage'}",
            )
            check.watch(pool)
            self._pools[(name, work)] = pool
            await pool.open(wait=False)
        with database_errors():
            async with pool.connection() as conn:
                yield conn

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.close()
        self._pools.clear()
