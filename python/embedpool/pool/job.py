"""A job: one caller's tokenized documents on their way through the pool, and the place results land."""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio
import numpy as np
from numpy.typing import NDArray

from embedpool.errors import EmbedpoolError


@dataclass(eq=False)
class Job:
    """Created by the caller, filled in by feeders (on the event loop), awaited by the caller.

    `ids`/`offsets` are the ragged token ids from the tokenizer: document i is ids[offsets[i]:offsets[i+1]].
    """

    ids: NDArray[np.int64]
    offsets: NDArray[np.int64]
    dim: int
    deadline: float  # anyio.current_time() clock; inf when the caller set none
    vectors: NDArray[np.float32] = field(init=False)
    remaining: int = field(init=False)
    done: anyio.Event = field(default_factory=anyio.Event)
    error: EmbedpoolError | None = None
    abandoned: bool = False  # the caller gave up (cancelled or past deadline): skip its queued documents

    def __post_init__(self) -> None:
        self.remaining = len(self.offsets) - 1
        self.vectors = np.empty((self.remaining, self.dim), dtype=np.float32)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def tokens(self, i: int) -> NDArray[np.int64]:
        return self.ids[self.offsets[i] : self.offsets[i + 1]]

    def token_count(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    def expired(self, now: float) -> bool:
        return self.abandoned or self.error is not None or now >= self.deadline

    def deliver(self, i: int, vector: NDArray[np.float32]) -> None:
        self.vectors[i] = vector
        self.remaining -= 1
        if self.remaining == 0:
            self.done.set()

    def fail(self, error: EmbedpoolError) -> None:
        if self.error is None and not self.done.is_set():
            self.error = error
            self.done.set()
