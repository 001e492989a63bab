"""A session that does no inference: the same unit vector for every document, to measure what feeds the engine.

Serving with it (`--device null`) runs the whole real path (doors, gate, pool, tokenizer, scheduler, feeders)
with the engine's time taken out, so a benchmark of it is the front end's ceiling: the most a GPU behind this
process could be fed. Its vectors mean nothing.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


class NullSession:
    variant = "null"

    def __init__(self, dim: int, max_batch_size: int) -> None:
        # Made once: a batch is answered with a view of these rows, so the engine's share of the time is ~0.
        self._rows = np.full((max(1, max_batch_size), dim), 1 / np.sqrt(dim), dtype=np.float32)

    def embed(self, input_ids: NDArray[np.int64], attention_mask: NDArray[np.int64]) -> NDArray[np.float32]:
        n = len(input_ids)
        if n > len(self._rows):  # a batch larger than the configured size (the canary never is): grow once
            self._rows = np.resize(self._rows, (n, self._rows.shape[1]))
        return self._rows[:n]
