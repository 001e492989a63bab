"""One step's requests, as measured, summed up: throughput, latency quantiles, errors by status."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Sample", "summarize"]


@dataclass(frozen=True, slots=True)
class Sample:
    """One request. Latency runs from `scheduled` (open loop: when it was due, so that a request held up behind
    others counts its wait; closed loop: when it was sent) to `done`."""

    scheduled: float
    sent: float
    done: float
    docs: int
    """Documents embedded (0 when it failed)."""
    tokens: int | None
    error: str | None
    """The failure's status: the domain error class over gRPC, the HTTP status over HTTP; None when it succeeded."""


def _quantiles_ms(latencies: list[float]) -> dict[str, float | None]:
    if not latencies:
        return {"p50": None, "p95": None, "p99": None, "max": None, "mean": None}
    values = np.asarray(latencies) * 1000
    p50, p95, p99 = np.quantile(values, [0.5, 0.95, 0.99])
    return {
        "p50": float(p50),
        "p95": float(p95),
        "p99": float(p99),
        "max": float(values.max()),
        "mean": float(values.mean()),
    }


def summarize(samples: list[Sample], started: float, ended: float) -> dict[str, Any]:
    """Counts, rates over the step's wall time (`started`..`ended`) and latency quantiles of the requests that
    succeeded (a failure's latency says how fast it was refused, not how fast work is done)."""
    elapsed = max(ended - started, 1e-9)
    ok = [s for s in samples if s.error is None]
    docs = sum(s.docs for s in ok)
    tokens = None if any(s.tokens is None for s in ok) else sum(s.tokens or 0 for s in ok)
    lag = [s.sent - s.scheduled for s in samples]
    return {
        "requests": len(samples),
        "ok_requests": len(ok),
        "docs": docs,
        "tokens": tokens,
        "errors": dict(sorted(Counter(s.error for s in samples if s.error is not None).items())),
        "elapsed_s": elapsed,
        "requests_per_s": len(samples) / elapsed,
        "docs_per_s": docs / elapsed,
        "tokens_per_s": None if tokens is None else tokens / elapsed,
        "latency_ms": _quantiles_ms([s.done - s.scheduled for s in ok]),
        "send_lag_ms_max": float(max(lag) * 1000) if lag else 0.0,
    }
