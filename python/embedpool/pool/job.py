"""A job: one caller's tokenized documents on their way through the pool, and the place results land."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import anyio
import numpy as np
from numpy.typing import NDArray

from embedpool.errors import EmbedpoolError
from embedpool.pool.priority import Priority


@dataclass(slots=True)
class Stages:
    """When a traced job's documents went through the pool (wall clock, ns), for its spans after the fact: a
    batch serves many jobs, on a feeder thread, so the spans are made in the caller's own context once it is done.
    """

    queued_ns: int
    ran_ns: int = 0
    """The first batch holding one of its documents started."""
    done_ns: int = 0
    """The last one ended."""
    batches: int = 0
    largest_batch: int = 0
    padded_tokens: int = 0
    """Of the batches its documents ran in (shared with other jobs)."""
    _last_batch: object = None

    def ran(self, batch: object, size: int, padded_tokens: int, started_ns: int, ended_ns: int) -> None:
        """One of its documents ran in `batch` (told once per row: a batch counts once)."""
        if batch is self._last_batch or not started_ns:
            return
        self._last_batch = batch
        self.ran_ns = min(self.ran_ns, started_ns) if self.ran_ns else started_ns
        self.done_ns = max(self.done_ns, ended_ns)
        self.batches += 1
        self.largest_batch = max(self.largest_batch, size)
        self.padded_tokens += padded_tokens


@dataclass(eq=False)
class Job:
    """Created by the caller, filled in by feeders (on the event loop), awaited by the caller.

    `ids`/`offsets` are the ragged token ids from the tokenizer: document i is ids[offsets[i]:offsets[i+1]]. The
    scheduler and the fan back handle a job's documents as index arrays, never one Python step per document.
    """

    ids: NDArray[np.int64]
    offsets: NDArray[np.int64]
    dim: int
    deadline: float  # anyio.current_time() clock; inf when the caller set none
    vectors: NDArray[np.float32] = field(init=False)
    token_counts: NDArray[np.int64] = field(init=False)
    remaining: int = field(init=False)
    done: anyio.Event = field(default_factory=anyio.Event)
    error: EmbedpoolError | None = None
    abandoned: bool = False  # the caller gave up (cancelled or past deadline): skip its queued documents
    stages: Stages | None = None  # only when the call is traced
    priority: Priority = Priority.INTERACTIVE
    queued_ns: int = field(default_factory=time.time_ns)  # wall clock, as Outcome.started_ns
    ran: bool = False  # a batch holding one of its documents ran (its queue wait is recorded then)

    def __post_init__(self) -> None:
        self.token_counts = self.offsets[1:] - self.offsets[:-1]  # np.diff, without its cost on a small call
        self.remaining = len(self.token_counts)
        self.vectors = np.empty((self.remaining, self.dim), dtype=np.float32)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def tokens(self) -> int:
        return int(self.offsets[-1] - self.offsets[0])

    def expired(self, now: float) -> bool:
        return self.abandoned or self.error is not None or now >= self.deadline

    @property
    def finished(self) -> bool:
        """Answered or failed (`done` is set): no row of a batch is for it any more."""
        return self.remaining == 0 or self.error is not None

    def deliver(self, documents: NDArray[np.int64], vectors: NDArray[np.float32]) -> None:
        """The vectors of `documents` (each delivered once)."""
        self.vectors[documents] = vectors
        self.remaining -= len(documents)
        if self.remaining == 0:
            self.done.set()

    def fail(self, error: EmbedpoolError) -> None:
        if self.error is None and not self.done.is_set():
            self.error = error
            self.done.set()
