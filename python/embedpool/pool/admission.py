"""Admission control: documents and characters in flight, each with a budget.

Unary calls are refused at once (never queued) when the budget is spent: a waiting caller holds memory and a
connection, and under sustained overload it only turns into a timeout later; RESOURCE_EXHAUSTED now lets
clients back off. An Ingest stream instead waits for room (bounded by its deadline): its client has no
better thing to do than send the batch again, and the wait holds back its reads, so gRPC flow control
slows the sender. Only touched from the event loop thread, so plain counters are enough.

Bulk work (pool.priority) may hold only the budget less `interactive_reserve` of it: bulk streams waiting for room
fill whatever frees, so without a reserve an interactive call arriving under a bulk load finds none and is refused.
One bulk request larger than bulk's share is still let in while no other bulk work holds permits, so that every
request the whole budget can hold is admitted eventually (the server's settings bound a request by the whole budget).
"""

from __future__ import annotations

import anyio

from embedpool import metrics
from embedpool.errors import Overloaded
from embedpool.pool.priority import Priority


class Permits:
    def __init__(
        self, documents: int, chars: int, interactive_reserve: float = 0.0, meters: metrics.PoolMetrics | None = None
    ) -> None:
        if not 0.0 <= interactive_reserve < 1.0:
            raise ValueError(f"interactive_reserve must be in [0, 1), got {interactive_reserve}")
        self.total = documents
        self.total_chars = chars
        self.bulk_total = documents - int(documents * interactive_reserve)
        self.bulk_total_chars = chars - int(chars * interactive_reserve)
        self._meters = meters or metrics.pool_metrics("default")
        self._meters.permits_capacity.set(documents)
        self.in_use = 0
        self.chars_in_use = 0
        self.bulk_in_use = 0
        self.bulk_chars_in_use = 0
        self._freed = anyio.Event()
        self._waiting = 0

    def _fits(self, n: int, chars: int, priority: Priority) -> bool:
        if self.in_use + n > self.total or self.chars_in_use + chars > self.total_chars:
            return False
        if priority is Priority.INTERACTIVE or self.bulk_in_use == 0:
            return True
        return self.bulk_in_use + n <= self.bulk_total and self.bulk_chars_in_use + chars <= self.bulk_total_chars

    def acquire(self, n: int, chars: int = 0, priority: Priority = Priority.INTERACTIVE) -> None:
        """Take `n` documents of `chars` characters in all, or raise Overloaded."""
        if not self._fits(n, chars, priority):
            self._meters.rejections.inc()
            raise Overloaded(
                f"server at capacity: {self.in_use} of {self.total} documents in flight, {n} more asked; retry later"
            )
        self._take(n, chars, priority)

    async def acquire_waiting(self, n: int, chars: int = 0, priority: Priority = Priority.INTERACTIVE) -> None:
        """Take `n` documents of `chars` characters once they fit (the caller bounds the wait). Asking for
        more than the whole budget is refused: it would never fit."""
        if n > self.total or chars > self.total_chars:
            raise Overloaded(f"{n} documents ({chars} characters) exceed the whole admission budget")
        while not self._fits(n, chars, priority):
            self._waiting += 1
            try:
                await self._freed.wait()
            finally:
                self._waiting -= 1
        self._take(n, chars, priority)

    def _take(self, n: int, chars: int, priority: Priority) -> None:
        self.in_use += n
        self.chars_in_use += chars
        if priority is Priority.BULK:
            self.bulk_in_use += n
            self.bulk_chars_in_use += chars

    def release(self, n: int, chars: int = 0, priority: Priority = Priority.INTERACTIVE) -> None:
        self.in_use -= n
        self.chars_in_use -= chars
        if priority is Priority.BULK:
            self.bulk_in_use -= n
            self.bulk_chars_in_use -= chars
        if self._waiting:  # an event per release would be most of what admission costs a call
            self._freed.set()
            self._freed = anyio.Event()

    def publish(self) -> None:
        """Sets the permits gauge (pool.EmbeddingPool publishes it a few times a second, not on every change)."""
        self._meters.permits_in_use.set(self.in_use)
