"""Gives freed heap memory back to the operating system while the server is idle.

glibc keeps memory freed by large requests (a 16 MB message, its decoded documents and token arrays) for
reuse, and its mmap threshold adapts upwards after such requests, so RSS stays at its high-water mark for
good. `malloc_trim(0)` returns the free pages; it is cheap when there is little to return, and is called only
while no documents are in flight, at most every `interval` seconds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import time
from collections.abc import Callable

import anyio.to_thread

__all__ = ["Trimmer"]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None)  # glibc only (not musl, not macOS)
    if trim is None:
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim  # type: ignore[no-any-return]


class Trimmer:
    def __init__(self, interval: float = 10.0) -> None:
        self._interval = interval
        self._last = 0.0

    async def maybe_trim(self, idle: bool) -> bool:
        """Trim when `idle` and the last trim is `interval` seconds old; whether it trimmed."""
        trim = _malloc_trim()
        now = time.monotonic()
        if trim is None or not idle or now - self._last < self._interval:
            return False
        self._last = now
        await anyio.to_thread.run_sync(trim, 0)
        return True
