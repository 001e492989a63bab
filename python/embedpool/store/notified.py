"""A cache of database rows kept only while a LISTEN connection hears of every change to them.

A table's trigger announces each changed row's key on a channel (migrations 0004, 0005), whoever makes the
change: another replica, an operator, a migration. While `watch` is connected, an entry is dropped when its
key is announced; while it is not (starting, after a connection loss, or never run), nothing is cached and
every lookup goes to the database, so a missed notification can never leave a stale entry behind.
"""

from __future__ import annotations

import logging
from typing import Any, Final, Generic, TypeVar

import anyio
import psycopg
from anyio.abc import TaskStatus
from psycopg import AsyncConnection, sql

__all__ = ["NotifiedCache"]

V = TypeVar("V")
_RETRY_S: Final = (0.1, 0.5, 1.0, 2.0, 5.0)
_log = logging.getLogger(__name__)


class NotifiedCache(Generic[V]):
    def __init__(self, channel: str, *, max_entries: int = 100_000) -> None:
        self.channel = channel
        self._max_entries = max_entries
        self._values: dict[str, V] = {}
        self._live = False
        self._generation = 0
        """Advanced by every announced change: a row read before a change is not cached after it."""

    @property
    def live(self) -> bool:
        return self._live

    @property
    def generation(self) -> int:
        return self._generation

    def lookup(self, key: str) -> tuple[bool, V | None]:
        """(True, value) when `key` is cached, (False, None) otherwise (a cached value may itself be None)."""
        if not self._live or key not in self._values:
            return False, None
        return True, self._values[key]

    def put(self, key: str, value: V, generation: int) -> None:
        """Cache `value`, read when `generation` was current, unless a change was announced since."""
        if self._live and generation == self._generation:
            if len(self._values) >= self._max_entries:  # bounded whatever the callers look up; rare, so crude
                self._values.clear()
            self._values[key] = value

    def forget(self, key: str) -> None:
        self._generation += 1
        self._values.pop(key, None)

    def _set_live(self, live: bool) -> None:
        self._generation += 1
        self._values.clear()
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
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                    self._set_live(True)
                    failures = 0
                    if not started:
                        started = True
                        task_status.started()
                    async for notify in conn.notifies():
                        self.forget(notify.payload)
            except psycopg.OperationalError as e:
                _log.debug("%s watcher disconnected: %s", self.channel, e)
            finally:
                self._set_live(False)
            if not started:
                started = True
                task_status.started()
            await anyio.sleep(_RETRY_S[min(failures, len(_RETRY_S) - 1)])
            failures += 1
