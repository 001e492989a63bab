"""Priority classes: interactive work (a query, a small Embed) goes ahead of bulk work (Ingest, sync backfills).

The scheduler keeps one queue per class and cuts batches from interactive work first, with a share reserved for
bulk so that it never starves; admission keeps part of its budget for interactive calls, so that bulk work waiting
for room cannot make them fail with Overloaded. The values are the `priority` label of the pool's metrics.
"""

from __future__ import annotations

import enum


class Priority(enum.Enum):
    INTERACTIVE = "interactive"
    """Someone waits for the answer now: cut ahead, refused at once when the admission budget is spent."""
    BULK = "bulk"
    """Throughput counts, not each call's latency: runs when no interactive work waits, and in its reserved share."""
