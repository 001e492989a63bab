"""Collection rows by name, cached only while a LISTEN connection hears of every change to them.

Migration 0004 makes Postgres announce each insert, update or delete of a `collections` row, whoever makes
it: another replica, an operator, a migration. While `watch` is connected, a cached row is dropped when its
change is announced; while it is not (starting, after a connection loss, or never run), nothing is cached
and every lookup goes to the database, so a missed notification can never leave a stale entry behind. A
stale entry in the window between a commit and its notification fails loudly downstream: writes look the
row up again under a lock, and a partition's name holds the collection's never-reused id (UndefinedTable).
"""

from __future__ import annotations

import logging
from typing import Any, Final

import anyio
import psycopg
from anyio.abc import TaskStatus
from psycopg import AsyncConnection

from embedpool.store.records import CollectionInfo

__all__ = ["CHANNEL", "CollectionCache"]

CHANNEL: Final = "embedpool_collections"
_RETRY_S: Final = (0.1, 0.5, 1.0, 2.0, 5.0)
_log = logging.getLogger(__name__)


class CollectionCache:
    def __init__(self) -> None:
        self._infos: dict[str, CollectionInfo] = {}
        self._live = False
        self._generation = 0
        """Advanced by every announced change: a row read before a change is not cached after it."""

    @property
    def live(self) -> bool:
        return self._live

    @property
    def generation(self) -> int:
        return self._generation

    def get(self, name: str) -> CollectionInfo | None:
        return self._infos.get(name) if self._live else None

    def put(self, info: CollectionInfo, generation: int) -> None:
        """Cache `info`, read when `generation` was current, unless a change was announced since."""
        if self._live and generation == self._generation:
            self._infos[info.name] = info

    def forget(self, name: str) -> None:
        self._generation += 1
        self._infos.pop(name, None)

    def _set_live(self, live: bool) -> None:
        self._generation += 1
        self._infos.clear()
        self._live = live

    async def watch(self, url: str, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled, reconnecting after a loss; reports started once first listening (or after
        the first failed attempt: the cache is an optimisation, never a reason to wait)."""
        started = False
        failures = 0
        while True:
            try:
                conn: AsyncConnection[Any] = await AsyncConnection.connect(url, autocommit=True, connect_timeout=5)
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self._set_live(True)
                    failures = 0
                    if not started:
                        started = True
                        task_status.started()
                    async for notify in conn.notifies():
                        self.forget(notify.payload)
            except psycopg.OperationalError as e:
                _log.debug("collection watcher disconnected: %s", e)
            finally:
                self._set_live(False)
            if not started:
                started = True
                task_status.started()
            await anyio.sleep(_RETRY_S[min(failures, len(_RETRY_S) - 1)])
            failures += 1
