"""Freed heap is handed back to the OS only while idle, and not more often than the interval."""

from __future__ import annotations

import sys

import pytest

from embedpool.server.heap import Trimmer, limit_heap_growth

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
async def test_trims_when_idle_and_not_too_often() -> None:
    trimmer = Trimmer(interval=60.0)
    garbage = [bytearray(1 << 20) for _ in range(64)]  # 64 MB freed below: something to hand back
    del garbage
    assert not await trimmer.maybe_trim(idle=False)
    assert await trimmer.maybe_trim(idle=True)
    assert not await trimmer.maybe_trim(idle=True)  # within the interval


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_the_mmap_threshold_and_arenas_can_be_pinned() -> None:
    assert limit_heap_growth()
