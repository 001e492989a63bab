"""The scheduler: the single owner of the queues. Cuts token-budget batches whenever a feeder can take one.

With priority classes on (pool.priority), interactive and bulk documents wait in a queue each, and each batch is
cut from one class:
- interactive first, and never mixed with bulk documents: those would make a query wait for their inference too;
- bulk still gets one batch after at most `max_interactive_streak` interactive ones cut while it could have run.
  The share is counted in batches: when interactive work alone keeps the engines busy, its batches grow full
  too, so a share of batches is about a share of engine time, with no cost model to keep right;
- at most one bulk batch per session is cut ahead (in the channel or running). A batch in the channel cannot be
  overtaken, so a query arriving under a bulk load waits for the rest of the bulk batch running, not for the next
  one as well; interactive batches keep the whole pipeline depth.
Off, every document waits in one queue in arrival order, whatever its class.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import anyio
import numpy as np
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from numpy.typing import NDArray

from embedpool import _native, metrics
from embedpool.pool.job import Job
from embedpool.pool.priority import Priority


@dataclass(frozen=True)
class BatchLimits:
    max_tokens: int  # padded cost: longest (rounded up to pad_multiple) x count
    max_size: int
    pad_multiple: int
    pad_id: int
    window_factor: int = 8  # how many max-size batches of the oldest inputs are considered for length sorting


@dataclass(frozen=True)
class ClassPolicy:
    """How priority classes share the engines (see the module docstring)."""

    max_interactive_streak: int
    bulk_slots: int  # bulk batches cut ahead at most: one per session


@dataclass(eq=False)
class Batch:
    """Rows of one or more callers' documents: row k is document `documents[k]` of `jobs[sources[k]]`."""

    ids: NDArray[np.int64]
    mask: NDArray[np.int64]
    jobs: list[Job]
    sources: NDArray[np.int64]
    documents: NDArray[np.int64]
    real_tokens: int
    bulk: bool = False  # cut from the bulk queue: counts against ClassPolicy.bulk_slots until it is finished

    def __len__(self) -> int:
        return len(self.sources)

    @property
    def padded_tokens(self) -> int:
        return int(self.ids.size)

    def live(self, now: float) -> Batch:
        """This batch without the rows of jobs that expired since it was cut (their callers left, or their
        deadline or another row's failure ended them): no work is spent on results nobody waits for."""
        expired = [job.expired(now) for job in self.jobs]
        if not any(expired):
            return self
        rows = np.flatnonzero(~np.asarray(expired, dtype=bool)[self.sources])
        mask = self.mask[rows]
        return Batch(
            self.ids[rows], mask, self.jobs, self.sources[rows], self.documents[rows], int(mask.sum()), self.bulk
        )

    def by_job(self) -> Iterator[tuple[Job, NDArray[np.intp]]]:
        """Each job with rows here, and its rows: a step per job, none per row."""
        if len(self.jobs) == 1:
            yield self.jobs[0], np.arange(len(self.sources))
            return
        order = np.argsort(self.sources, kind="stable")
        start = 0
        ends = np.cumsum(np.bincount(self.sources, minlength=len(self.jobs))).tolist()
        for job, end in zip(self.jobs, ends, strict=True):
            if end > start:
                yield job, order[start:end]
            start = end


Segment = tuple[Job, NDArray[np.int64]]
"""A job and its documents still waiting, in order (a job queues as one segment; a cut can split it)."""
Queue = deque[Segment]


class Scheduler:
    """Takes jobs from the ingress channel, keeps their documents in arrival order, and cuts one batch each
    time a feeder is free (`capacity` counts free feeder slots). Cutting only then, never on a timer, means no
    device waits for a fuller batch, and batches grow by themselves when devices are busy.

    It sleeps on one event that whatever changes what can be cut sets: `notify()` after a job is sent or the
    ingress closed, `finished()` when a bulk batch ends.
    """

    def __init__(
        self,
        ingress: MemoryObjectReceiveStream[Job],
        batches: MemoryObjectSendStream[Batch],
        capacity: anyio.Semaphore,
        limits: BatchLimits,
        classes: ClassPolicy | None = None,
        meters: metrics.PoolMetrics | None = None,
        sent: Callable[[], None] = lambda: None,
    ) -> None:
        """`sent`: called after each batch is sent (the feeders' side of the channel, pool.handoff)."""
        self._ingress = ingress
        self._sent = sent
        self._batches = batches
        self._capacity = capacity
        self._limits = limits
        self._classes = classes
        shared: Queue = deque()
        self._queues: dict[Priority, Queue] = {p: deque() if classes else shared for p in Priority}
        self._queued_tokens = 0
        self._depth = dict.fromkeys(Priority, 0)
        self._meters = meters or metrics.pool_metrics("default")
        self._depth_gauges = {p: self._meters.queue_class_inputs(p.value) for p in Priority}
        self._bulk_in_flight = 0
        self._streak = 0  # interactive batches cut in a row while a bulk one could have been
        self._open = True
        self._wake = anyio.Event()

    def notify(self) -> None:
        """On the event loop: a job was sent, or the ingress closed."""
        self._wake.set()

    def finished(self, batch: Batch) -> None:
        """On the event loop, once a feeder is done with `batch` (answered, failed or stopped)."""
        if batch.bulk:
            self._bulk_in_flight -= 1
            self._wake.set()

    async def run(self) -> None:
        async with self._ingress, self._batches:
            while True:
                if self._wake.is_set():
                    self._wake = anyio.Event()  # no await until the wait: nothing set in between is missed
                self._drain_ready()
                if self._next_class() is None:
                    if not self._open and not any(self._queues.values()):
                        return
                    await self._wake.wait()
                    continue
                # The non-blocking forms first: each checkpoint of the awaited ones is a turn of the event loop,
                # and a call of one document waits for every turn on its way.
                try:
                    self._capacity.acquire_nowait()
                except anyio.WouldBlock:
                    await self._capacity.acquire()
                self._drain_ready()
                batch = self._cut()
                if batch is None:
                    self._capacity.release()
                    continue
                self._batches.send_nowait(batch)  # a free slot is room in the channel: it holds one batch per slot
                self._sent()

    def _enqueue(self, job: Job) -> None:
        n = len(job)
        self._queues[job.priority].append((job, np.arange(n, dtype=np.int64)))
        self._queued_tokens += job.tokens
        self._depth[job.priority] += n

    def _drain_ready(self) -> None:
        """Takes every job already waiting, without blocking; notes when the ingress is closed."""
        while self._open:
            try:
                self._enqueue(self._ingress.receive_nowait())
            except anyio.WouldBlock:
                return
            except anyio.EndOfStream:
                self._open = False

    def _bulk_may_run(self) -> bool:
        return (
            self._classes is not None
            and bool(self._queues[Priority.BULK])
            and self._bulk_in_flight < self._classes.bulk_slots
        )

    def _next_class(self) -> Priority | None:
        """The queue the next batch is cut from; None when none may be cut now."""
        interactive = bool(self._queues[Priority.INTERACTIVE])  # with classes off, the one queue
        if (
            self._classes is not None
            and self._bulk_may_run()
            and (not interactive or self._streak >= self._classes.max_interactive_streak)
        ):
            return Priority.BULK
        return Priority.INTERACTIVE if interactive else None

    def _take_window(self, queue: Queue) -> list[Segment]:
        """The oldest live documents, up to the window's size; jobs that expired are dropped on the way (before
        any work)."""
        now = anyio.current_time()
        window: list[Segment] = []
        limit = self._limits.max_size * self._limits.window_factor
        taken = 0
        while queue and taken < limit:
            job, documents = queue.popleft()
            if job.expired(now):
                self._queued_tokens -= int(job.token_counts[documents].sum())
                self._depth[job.priority] -= len(documents)
                continue
            if taken + len(documents) > limit:
                queue.appendleft((job, documents[limit - taken :]))
                documents = documents[: limit - taken]
            window.append((job, documents))
            taken += len(documents)
        return window

    def _cut(self) -> Batch | None:
        cls = self._next_class()
        bulk_could_run = self._bulk_may_run()
        if cls is None:
            return None
        queue = self._queues[cls]
        window = self._take_window(queue)
        if not window:
            return None
        # The window as flat arrays (position p: document doc_of[p] of window[segment_of[p]]): numpy's steps and
        # a Python step per segment, none per document. A window of one job (an idle server, a large call) skips
        # the steps that only sort rows out between jobs: each numpy call costs microseconds on a small batch.
        one = len(window) == 1
        sizes = [len(documents) for _, documents in window]
        lengths = (
            window[0][0].token_counts[window[0][1]]
            if one
            else np.concatenate([job.token_counts[documents] for job, documents in window])
        )
        plan = _native.plan_batches(
            lengths,
            max_batch_tokens=self._limits.max_tokens,
            max_batch_size=self._limits.max_size,
            multiple=self._limits.pad_multiple,
        )
        chosen = plan[0]  # holds position 0, the oldest document: nothing starves behind shorter ones
        if len(chosen) < len(lengths):
            picked = np.zeros(len(lengths), dtype=bool)
            picked[chosen] = True
            left: list[Segment] = []
            start = 0
            for (job, documents), end in zip(window, itertools.accumulate(sizes), strict=True):
                rest = documents[~picked[start:end]]
                if len(rest):
                    left.append((job, rest))
                start = end
            queue.extendleft(reversed(left))  # back in front, oldest first
        if one:
            jobs = [window[0][0]]
            documents = window[0][1][chosen]
            sources = np.zeros(len(chosen), dtype=np.int64)
        else:
            doc_of = np.concatenate([documents for _, documents in window])
            segment_of = np.repeat(np.arange(len(window), dtype=np.int64), sizes)[chosen]
            per_segment = np.bincount(segment_of, minlength=len(window))
            used = np.flatnonzero(per_segment)
            renumber = np.cumsum(per_segment > 0) - 1
            jobs = [window[k][0] for k in used.tolist()]
            documents = doc_of[chosen]
            sources = renumber[segment_of]
        ids, mask = _native.pad_gather(
            [job.ids for job in jobs],
            [job.offsets for job in jobs],
            sources,
            documents,
            pad_id=self._limits.pad_id,
            multiple=self._limits.pad_multiple,
        )
        real = int(lengths[chosen].sum())
        self._queued_tokens -= real
        if self._classes is not None:
            self._depth[cls] -= len(chosen)  # a batch is cut from one class's queue
        else:
            for job, rows in zip(jobs, np.bincount(sources, minlength=len(jobs)).tolist(), strict=True):
                self._depth[job.priority] -= rows
        bulk = self._classes is not None and cls is Priority.BULK
        if bulk:
            self._bulk_in_flight += 1
            self._streak = 0
        elif bulk_could_run:
            self._streak += 1
        return Batch(ids, mask, jobs, sources, documents, real, bulk)

    def publish(self) -> None:
        """Sets the queue gauges (pool.EmbeddingPool publishes them a few times a second, not on every change)."""
        self._meters.queue_inputs.set(sum(self._depth.values()))
        self._meters.queue_tokens.set(self._queued_tokens)
        for priority, gauge in self._depth_gauges.items():
            gauge.set(self._depth[priority])
