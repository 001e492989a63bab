"""Admission control: one permit per document, refused at once (never queued) when none is free."""

from __future__ import annotations

from embedpool import metrics
from embedpool.errors import Overloaded


class Permits:
    """A non-blocking counting budget of documents in flight.

    Refusing immediately instead of waiting is the point: a waiting caller holds memory and a connection, and
    under sustained overload it only turns into a timeout later. RESOURCE_EXHAUSTED now lets clients back off.
    Only touched from the event loop thread, so a plain counter is enough.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.in_use = 0

    def acquire(self, n: int) -> None:
        if self.in_use + n > self.total:
            metrics.REJECTIONS.inc()
            raise Overloaded(
                f"server at capacity: {self.in_use} of {self.total} documents in flight, {n} more asked; retry later"
            )
        self.in_use += n
        metrics.PERMITS_IN_USE.set(self.in_use)

    def release(self, n: int) -> None:
        self.in_use -= n
        metrics.PERMITS_IN_USE.set(self.in_use)
