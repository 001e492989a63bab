"""Keeps freed heap memory from staying with the process (glibc only; elsewhere these do nothing).

glibc serves large blocks (a 16 MB message, its decoded documents and token arrays) with mmap and unmaps them
when freed, but after each such free it raises its mmap threshold to that size, so the next large blocks come
from the heap and their pages stay: RSS keeps its high-water mark for good. And each thread that allocates
(grpc's, the tokenizer's, ONNX Runtime's) may get an arena of its own, up to 8 per core, each keeping its
free pages. `limit_heap_growth` pins the threshold and allows one arena per core, and `Trimmer` calls
`malloc_trim(0)` (cheap when there is little to return) while no documents are in flight, at most every
`interval` seconds, for what fragmentation leaves behind.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import time
from collections.abc import Callable

import anyio.to_thread

__all__ = ["Trimmer", "limit_heap_growth"]

_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8  # glibc's mallopt parameter numbers
MMAP_THRESHOLD = 256 * 1024


@functools.cache
def _libc_function(name: str, *argtypes: type) -> Callable[..., int] | None:
    library = ctypes.util.find_library("c")
    function = getattr(ctypes.CDLL(library), name, None) if library else None  # glibc's (not musl's, macOS's)
    if function is None:
        return None
    function.argtypes, function.restype = list(argtypes), ctypes.c_int
    return function  # type: ignore[no-any-return]


def _malloc_trim() -> Callable[..., int] | None:
    return _libc_function("malloc_trim", ctypes.c_size_t)


def limit_heap_growth(mmap_threshold: int = MMAP_THRESHOLD, arenas: int | None = None) -> bool:
    """Blocks of `mmap_threshold` bytes and up are mmapped and unmapped when freed, whatever came before, and
    threads share at most `arenas` (default: one per core) heaps; whether glibc took both. Call it before the
    server's threads start (arenas already made stay)."""
    mallopt = _libc_function("mallopt", ctypes.c_int, ctypes.c_int)
    if mallopt is None:
        return False
    arenas = arenas or os.cpu_count() or 1
    return mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1 and mallopt(_M_ARENA_MAX, arenas) == 1


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
