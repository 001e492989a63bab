"""The scheduler: the single owner of the queue. Cuts token-budget batches whenever a feeder can take one."""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

import anyio
import numpy as np
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from numpy.typing import NDArray

from embedpool import _native, metrics
from embedpool.pool.job import Job


@dataclass(frozen=True)
class BatchLimits:
    max_tokens: int  # padded cost: longest (rounded up to pad_multiple) x count
    max_size: int
    pad_multiple: int
    pad_id: int
    window_factor: int = 8  # how many max-size batches of the oldest inputs are considered for length sorting


@dataclass(eq=False)
class Batch:
    ids: NDArray[np.int64]
    mask: NDArray[np.int64]
    entries: list[tuple[Job, int]]
    real_tokens: int

    @property
    def padded_tokens(self) -> int:
        return int(self.ids.size)

    def live(self, now: float) -> Batch:
        """This batch without the rows of jobs that expired since it was cut (their callers left, or their
        deadline or another row's failure ended them): no work is spent on results nobody waits for."""
        keep = [row for row, (job, _) in enumerate(self.entries) if not job.expired(now)]
        if len(keep) == len(self.entries):
            return self
        rows = np.asarray(keep, dtype=np.intp)
        mask = self.mask[rows]
        return Batch(self.ids[rows], mask, [self.entries[r] for r in keep], int(mask.sum()))


class Scheduler:
    """Pulls jobs from the ingress channel, keeps their documents in arrival order, and cuts one batch each
    time a feeder is free (`capacity` counts free feeder slots). Cutting only then, never on a timer, means no
    device waits for a fuller batch, and batches grow by themselves when devices are busy.
    """

    def __init__(
        self,
        ingress: MemoryObjectReceiveStream[Job],
        batches: MemoryObjectSendStream[Batch],
        capacity: anyio.Semaphore,
        limits: BatchLimits,
    ) -> None:
        self._ingress = ingress
        self._batches = batches
        self._capacity = capacity
        self._limits = limits
        self._queue: deque[tuple[Job, int]] = deque()
        self._queued_tokens = 0

    async def run(self) -> None:
        async with self._ingress, self._batches:
            open_ = True
            while open_ or self._queue:
                if not self._queue:
                    try:
                        self._enqueue(await self._ingress.receive())
                    except anyio.EndOfStream:
                        open_ = False
                        continue
                await self._capacity.acquire()
                open_ = self._drain_ready() and open_
                batch = self._cut()
                if batch is None:
                    self._capacity.release()
                    continue
                await self._batches.send(batch)

    def _enqueue(self, job: Job) -> None:
        n = len(job)
        self._queue.extend(zip(itertools.repeat(job, n), range(n), strict=True))
        self._queued_tokens += sum(job.lengths)
        self._publish_depth()

    def _drain_ready(self) -> bool:
        """Takes every job already waiting, without blocking. False once the ingress is closed."""
        while True:
            try:
                self._enqueue(self._ingress.receive_nowait())
            except anyio.WouldBlock:
                return True
            except anyio.EndOfStream:
                return False

    def _take_window(self) -> list[tuple[Job, int]]:
        """The oldest live documents, dropping abandoned or expired ones on the way (before any work)."""
        now = anyio.current_time()
        window: list[tuple[Job, int]] = []
        limit = self._limits.max_size * self._limits.window_factor
        while self._queue and len(window) < limit:
            job, i = self._queue.popleft()
            if job.expired(now):
                self._queued_tokens -= job.token_count(i)
                continue
            window.append((job, i))
        return window

    def _cut(self) -> Batch | None:
        window = self._take_window()
        if not window:
            self._publish_depth()
            return None
        lengths = np.array([job.lengths[i] for job, i in window], dtype=np.int64)
        plan = _native.plan_batches(
            lengths,
            max_batch_tokens=self._limits.max_tokens,
            max_batch_size=self._limits.max_size,
            multiple=self._limits.pad_multiple,
        )
        chosen = plan[0]  # holds window[0], the oldest document: nothing starves behind shorter ones
        picked = set(chosen.tolist())
        self._queue.extendleft(reversed([w for j, w in enumerate(window) if j not in picked]))
        entries = [window[j] for j in chosen.tolist()]
        ids, mask = _native.pad_batch(
            [job.tokens(i) for job, i in entries], pad_id=self._limits.pad_id, multiple=self._limits.pad_multiple
        )
        real = int(lengths[chosen].sum())
        self._queued_tokens -= real
        self._publish_depth()
        return Batch(ids=ids, mask=mask, entries=entries, real_tokens=real)

    def _publish_depth(self) -> None:
        metrics.QUEUE_INPUTS.set(len(self._queue))
        metrics.QUEUE_TOKENS.set(self._queued_tokens)
