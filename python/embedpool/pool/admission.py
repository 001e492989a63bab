"""Admission control: documents and characters in flight, each with a budget.

Unary calls are refused at once (never queued) when the budget is spent: a waiting caller holds memory and a
connection, and under sustained overload it only turns into a timeout later; RESOURCE_EXHAUSTED now lets
clients back off. An Ingest stream instead waits for room (bounded by its deadline): its client has no
better thing to do than send the batch again, and the wait holds back its reads, so gRPC flow control
slows the sender. Only touched from the event loop thread, so plain counters are enough.
"""

from __future__ import annotations

import anyio

from embedpool import metrics
from embedpool.errors import Overloaded


class Permits:
    def __init__(self, documents: int, chars: int) -> None:
        self.total = documents
        self.total_chars = chars
        metrics.PERMITS_CAPACITY.set(documents)
        self.in_use = 0
        self.chars_in_use = 0
        self._freed = anyio.Event()

    def _fits(self, n: int, chars: int) -> bool:
        return self.in_use + n <= self.total and self.chars_in_use + chars <= self.total_chars

    def acquire(self, n: int, chars: int = 0) -> None:
        """Take `n` documents of `chars` characters in all, or raise Overloaded."""
        if not self._fits(n, chars):
            metrics.REJECTIONS.inc()
            raise Overloaded(
                f"server at capacity: {self.in_use} of {self.total} documents in flight, {n} more asked; retry later"
            )
        self._take(n, chars)

    async def acquire_waiting(self, n: int, chars: int = 0) -> None:
        """Take `n` documents of `chars` characters once they fit (the caller bounds the wait). Asking for
        more than the whole budget is refused: it would never fit."""
        if n > self.total or chars > self.total_chars:
            raise Overloaded(f"{n} documents ({chars} characters) exceed the whole admission budget")
        while not self._fits(n, chars):
            await self._freed.wait()
        self._take(n, chars)

    def _take(self, n: int, chars: int) -> None:
        self.in_use += n
        self.chars_in_use += chars
        metrics.PERMITS_IN_USE.set(self.in_use)

    def release(self, n: int, chars: int = 0) -> None:
        self.in_use -= n
        self.chars_in_use -= chars
        metrics.PERMITS_IN_USE.set(self.in_use)
        self._freed.set()
        self._freed = anyio.Event()
