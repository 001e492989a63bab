"""What a baseline's batch-size sweep reports: each size's run, and the best of them."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["SweepPoint", "run_sweep", "sweep_report"]

CPU_BATCH_SIZES = (8, 16, 32, 64, 128, 256)
GPU_BATCH_SIZES = (8, 16, 32, 64, 128, 256, 512, 1024)


def default_batch_sizes(device: str) -> tuple[int, ...]:
    return GPU_BATCH_SIZES if device == "cuda" else CPU_BATCH_SIZES


def useful_batch_sizes(sizes: list[int], docs: int) -> list[int]:
    """Sizes up to the first that holds every document: larger ones would run the same single batch."""
    out: list[int] = []
    for size in sorted(set(sizes)):
        out.append(size)
        if size >= docs:
            break
    return out


@dataclass(frozen=True, slots=True)
class SweepPoint:
    batch_size: int
    docs: int
    tokens: int
    seconds: float
    padding_efficiency: float | None
    batch_latency_ms: dict[str, float]
    partial: bool = False
    """Stopped (Ctrl-C) before every document was embedded."""

    @property
    def docs_per_s(self) -> float:
        return self.docs / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["docs_per_s"] = self.docs_per_s
        out["tokens_per_s"] = self.tokens / self.seconds if self.seconds > 0 else 0.0
        return out


def batch_latency_ms(seconds: list[float]) -> dict[str, float]:
    values = np.asarray(seconds or [0.0]) * 1000
    p50, p99 = np.quantile(values, [0.5, 0.99])
    return {"p50": float(p50), "p99": float(p99), "max": float(values.max())}


def run_sweep(
    batch_sizes: list[int],
    docs: int,
    measure: Callable[[int], SweepPoint],
    stop: threading.Event | None,
    on_point: Callable[[SweepPoint], None] | None,
) -> list[SweepPoint]:
    """`measure(size)` for each useful batch size, until `stop` is set; each point passed to `on_point` as it
    comes (so an interrupted sweep keeps the sizes it measured)."""
    points: list[SweepPoint] = []
    for size in useful_batch_sizes(batch_sizes, docs):
        if stop is not None and stop.is_set():
            break
        points.append(measure(size))
        if on_point is not None:
            on_point(points[-1])
    return points


def sweep_report(points: list[SweepPoint], **about: Any) -> dict[str, Any]:
    """`about` (what ran, where) with every point and the best complete one (by docs/s)."""
    complete = [p for p in points if not p.partial]
    best = max(complete, key=lambda p: p.docs_per_s) if complete else None
    return {**about, "sweep": [p.as_dict() for p in points], "best": best.as_dict() if best else None}
