"""Vectors in HTTP responses: JSON numbers, or base64 of little-endian float32 (OpenAI's) or float16 bytes."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import orjson
from numpy.typing import NDArray

_DTYPE: dict[str, np.dtype[Any]] = {"base64": np.dtype("<f4"), "base64_float16": np.dtype("<f2")}


def vectors(values: NDArray[np.float32], encoding: str) -> list[Any]:
    """One item per row: the row itself for "float" (orjson writes numpy arrays without a Python list in
    between, see `dumps`), else its base64 string."""
    if encoding == "float":
        return list(values)
    rows = np.ascontiguousarray(values, dtype=_DTYPE[encoding])
    return [base64.b64encode(row.tobytes()).decode("ascii") for row in rows]


def dumps(body: Any) -> bytes:
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
