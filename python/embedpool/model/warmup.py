"""Runs every input shape a session will see once, before the server reports ready."""

from __future__ import annotations

import numpy as np

from embedpool.model.session import EmbeddingSession


def warm_up(
    session: EmbeddingSession,
    *,
    max_tokens: int,
    pad_multiple: int,
    max_batch_size: int,
    max_batch_tokens: int,
    cuda: bool,
) -> None:
    """The first pass over a new shape was ~10x slower on the GPU. Lengths are padded to `pad_multiple`, so those
    are the shapes; on a GPU each length is warmed at the largest batch the token budget allows for it."""
    for length in range(pad_multiple, max_tokens + pad_multiple, pad_multiple):
        length = min(length, max_tokens)
        rows = max(1, min(max_batch_size, max_batch_tokens // length)) if cuda else 1
        ids = np.full((rows, length), 100, dtype=np.int64)  # any real token id; the values do not matter
        session.embed(ids, np.ones_like(ids))
