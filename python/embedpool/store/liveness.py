"""Whether a pooled connection is still there, asked before a request draws it, for every pool of ours."""

from __future__ import annotations

import asyncio
import logging
import select
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

__all__ = ["IdleCheck", "check_idle"]

_log = logging.getLogger(__name__)


async def check_idle(conn: AsyncConnection[Any]) -> None:
    """Raises if the idle connection `conn` is gone. An idle connection's socket has nothing to read until the
    server says something unasked: the FATAL of a shutdown or a terminated backend, or the end of the stream when
    the server or the network dropped it. Only then does the check cost a round trip (psycopg_pool's own check,
    which raises for a dead one). A healthy connection is handed out without one: on a remote database, a
    network round trip less for every request."""
    if conn.closed or conn.broken:
        raise psycopg.OperationalError("the connection is closed")
    poller = select.poll()
    poller.register(conn.pgconn.socket, select.POLLIN)
    if poller.poll(0):
        await AsyncConnectionPool.check_connection(conn)


class IdleCheck:
    """A pool's `check`: `check_idle`, and when a connection is found dead, the whole pool checked at once in the
    background. One dead connection most likely means the server restarted and every idle one is dead: psycopg_pool
    would hand them to a request one after another, waiting 1 s, 2 s, 4 s, ... between them, until the pool's
    timeout ran out on a database that is up again. Swept at once, the request that found the first one finds a
    live connection after its first wait, and the requests after it at once."""

    def __init__(self) -> None:
        self._pool: AsyncConnectionPool[Any] | None = None
        self._sweep: asyncio.Task[None] | None = None

    def watch(self, pool: AsyncConnectionPool[Any]) -> None:
        """The pool this is the check of (it is made with the check, so it comes after)."""
        self._pool = pool

    async def __call__(self, conn: AsyncConnection[Any]) -> None:
        try:
            await check_idle(conn)
        except Exception:
            self._sweep_soon()
            raise

    def _sweep_soon(self) -> None:
        if self._pool is None or self._pool.closed or (self._sweep is not None and not self._sweep.done()):
            return
        self._sweep = asyncio.get_running_loop().create_task(self._pool.check())
        self._sweep.add_done_callback(_logged)


def _logged(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        _log.info("checking the pool's idle connections failed: %r", error)
