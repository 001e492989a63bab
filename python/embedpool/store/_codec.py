"""Per-connection setup: pgvector's types, plus a numpy codec for `vector` in binary format.

pgvector's own adapters go through its `Vector` class (a Python array and a byte swap per value); on the
COPY path and for search results we move numpy arrays straight to and from the wire format
(uint16 dim, uint16 unused, dim big-endian float32).
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pgvector.psycopg import register_vector_async
from psycopg import AsyncConnection
from psycopg.abc import Buffer
from psycopg.adapt import Dumper, Loader
from psycopg.pq import Format
from psycopg.types import TypeInfo

__all__ = ["configure_connection"]

_HEADER = struct.Struct(">HH")
_WIRE = np.dtype(">f4")


class _VectorBinaryDumper(Dumper):
    format = Format.BINARY

    def dump(self, obj: NDArray[np.float32]) -> Buffer:
        values = np.ascontiguousarray(obj, dtype=_WIRE)
        return _HEADER.pack(values.shape[0], 0) + values.tobytes()


class _VectorBinaryLoader(Loader):
    format = Format.BINARY

    def load(self, data: Buffer) -> NDArray[np.float32]:
        return np.frombuffer(data, dtype=_WIRE, offset=_HEADER.size).astype(np.float32)


async def configure_connection(conn: AsyncConnection[Any]) -> None:
    """The pool's `configure` callback; the connection must be in autocommit mode."""
    await register_vector_async(conn)
    info = await TypeInfo.fetch(conn, "vector")
    assert info is not None  # register_vector_async has raised otherwise
    dumper = type("VectorBinaryDumper", (_VectorBinaryDumper,), {"oid": info.oid})
    conn.adapters.register_dumper("numpy.ndarray", dumper)
    conn.adapters.register_loader(info.oid, _VectorBinaryLoader)
