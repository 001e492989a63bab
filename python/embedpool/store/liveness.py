"""Whether a pooled connection is still there, asked before a request draws it, for every pool of ours."""

from __future__ import annotations

import select
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

__all__ = ["check_idle"]


async def check_idle(conn: AsyncConnection[Any]) -> None:
    """The pool's check of a connection it hands out: raises if it is gone. An idle connection's socket has
    nothing to read until the server says something unasked: the FATAL of a shutdown or a terminated backend,
    or the end of the stream when the server or the network dropped it. Only then does the check cost a round
    trip (psycopg_pool's own check, which raises for a dead one). A healthy connection is handed out without one:
    on a remote database, a network round trip less for every request."""
    if conn.closed or conn.broken:
        raise psycopg.OperationalError("the connection is closed")
    poller = select.poll()
    poller.register(conn.pgconn.socket, select.POLLIN)
    if poller.poll(0):
        await AsyncConnectionPool.check_connection(conn)
