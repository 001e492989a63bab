"""Packed vector encodings for the wire, shared by both doors (gRPC VectorEncoding, HTTP encoding_format).

- float32: little-endian float32, 4 bytes a component.
- float16: little-endian IEEE float16, 2 bytes a component.
- int8: symmetric, one scale per vector: a little-endian float32 scale = max|x| / 127, then dim int8
  q = round(x / scale); component i is q[i] * scale (within scale / 2 of x). 4 + dim bytes.
- binary: sign bits, 1 where a component is > 0 (pgvector's binary_quantize), most significant bit first
  within each byte (numpy.packbits), ceil(dim / 8) bytes: for Hamming-distance prefiltering only.

embedpool.client.wire decodes them (it may not import this module: see ARCHITECTURE.md).
"""

from __future__ import annotations

from typing import Final

import numpy as np
from numpy.typing import NDArray

from embedpool.errors import InvalidArgument

__all__ = ["ENCODINGS", "pack", "packed_rows"]

ENCODINGS: Final = ("float32", "float16", "int8", "binary")


def packed_rows(vectors: NDArray[np.float32], encoding: str) -> NDArray[np.uint8]:
    """One row of bytes per vector, as a 2-d uint8 array (every row is the same length)."""
    values = np.asarray(vectors, dtype=np.float32)
    if values.ndim != 2:
        values = values.reshape(len(values), -1)
    if encoding == "float32":
        return np.ascontiguousarray(values, dtype="<f4").view(np.uint8)
    if encoding == "float16":
        return np.ascontiguousarray(values, dtype="<f2").view(np.uint8)
    if encoding == "int8":
        peak = np.abs(values).max(axis=1, initial=0.0)
        scales = (peak / np.float32(127.0)).astype("<f4")
        safe = np.where(scales > 0, scales, np.float32(1.0))[:, None]
        q = np.clip(np.rint(values / safe), -127, 127).astype(np.int8)
        out = np.empty((len(values), 4 + values.shape[1]), np.uint8)
        out[:, :4] = scales[:, None].view(np.uint8)
        out[:, 4:] = q.view(np.uint8)
        return out
    if encoding == "binary":
        return np.packbits(values > 0, axis=1)
    raise InvalidArgument(f"encoding: must be one of {', '.join(ENCODINGS)}, got {encoding!r}")


def pack(vectors: NDArray[np.float32], encoding: str) -> list[bytes]:
    return [row.tobytes() for row in packed_rows(vectors, encoding)]
