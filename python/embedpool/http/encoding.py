"""Vectors in HTTP responses: JSON numbers, or base64 of packed bytes: little-endian float32 (OpenAI's), or one
of embedpool's encodings (service.encodings: float16, int8 with a scale per vector, sign bits)."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import orjson
from numpy.typing import NDArray

from embedpool.service import encodings

_PACKING: dict[str, str] = {
    "base64": "float32",
    "base64_float16": "float16",
    "base64_int8": "int8",
    "base64_binary": "binary",
}


def vectors(values: NDArray[np.float32], encoding: str) -> list[Any]:
    """One item per row: the row itself for "float" (orjson writes numpy arrays without a Python list in
    between, see `dumps`), else its base64 string."""
    if encoding == "float":
        return list(values)
    rows = encodings.packed_rows(values, _PACKING[encoding])
    return [base64.b64encode(row.tobytes()).decode("ascii") for row in rows]


def dumps(body: Any) -> bytes:
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
