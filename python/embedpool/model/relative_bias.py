"""MPNet's relative position buckets, as a table the graph indexes by (key position - query position).

The bucket of a distance depends on nothing but the distance, so the graph needs no log: it looks the bucket up
in a table of every distance the position table allows, computed here once.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

# MPNetEncoder.compute_position_bias's defaults: HF passes neither, whatever relative_attention_num_buckets says.
NUM_BUCKETS = 32
MAX_DISTANCE = 128


def bucket_table(max_positions: int) -> NDArray[np.int64]:
    """Bucket of each relative position -(max_positions - 1) .. max_positions - 1, at index relative + max - 1.

    HF's MPNet relative_position_bucket, step by step in float32 as torch computes it (a float64 log would move
    distances that sit on a bucket boundary)."""
    relative = np.arange(-(max_positions - 1), max_positions, dtype=np.int64)
    n = -relative
    half = NUM_BUCKETS // 2
    ret = (n < 0).astype(np.int64) * half
    n = np.abs(n)
    max_exact = half // 2
    with np.errstate(divide="ignore"):  # log(0) for the distances under max_exact, which the large branch skips
        scaled = np.log(n.astype(np.float32) / np.float32(max_exact))
        scaled = scaled / np.float32(math.log(MAX_DISTANCE / max_exact)) * np.float32(half - max_exact)
    large = max_exact + np.where(n < max_exact, 0, scaled).astype(np.int64)
    large = np.minimum(large, half - 1)
    return ret + np.where(n < max_exact, n, large)
