"""Postgres errors -> domain errors, in one place: what a caller may retry, what is its own mistake, and what
is ours. The caller sees a short message; the engine's own (which can name sockets, hosts, relations and
SQL) goes to the log, with the request id.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import psycopg
from psycopg import errors as pg

from embedpool.errors import DeadlineExceeded, NotFound, Overloaded, Unavailable

__all__ = ["database_errors"]

_log = logging.getLogger("embedpool.store")


@contextlib.contextmanager
def database_errors() -> Iterator[None]:
    try:
        yield
    except pg.UndefinedTable as e:
        # A partition's name holds its collection's id: it vanishes only when the collection is dropped.
        _log.info("collection dropped during the request: %s", e)
        raise NotFound("the collection was dropped while the request ran") from e
    except pg.QueryCanceled as e:  # statement_timeout (a caller's cancellation never reaches here)
        _log.warning("database statement timed out: %s", e)
        raise DeadlineExceeded("a database statement took longer than the server's statement timeout") from e
    except (pg.LockNotAvailable, pg.DeadlockDetected, pg.SerializationFailure) as e:
        _log.warning("database conflict: %s", e)
        raise Unavailable("the database was busy with a conflicting change; retry") from e
    except pg.InsufficientResources as e:  # class 53: disk full, out of memory, too many connections
        _log.error("database out of resources: %s", e)
        raise Overloaded("the database is out of resources; retry later") from e
    except psycopg.OperationalError as e:
        # A server that is down, shutting down or restarting, a dropped connection, the pool's own timeout
        # (PoolTimeout subclasses it): all mean "retry later", none is the caller's fault.
        _log.warning("database unavailable: %s", e)
        raise Unavailable("database unavailable; retry later") from e
