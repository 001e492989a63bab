"""sentence-transformers on the same checkpoint, where it is importable (never a dependency of embedpool): its
`encode` already sorts by length; its batch_size is swept as the engine's is, and the best kept (fp16 on a GPU,
as one would run it there)."""

from __future__ import annotations

import importlib
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from embedpool.benchmark.sweep import SweepPoint, run_sweep, sweep_report

__all__ = ["st_sweep"]


def st_sweep(
    checkpoint: Path,
    texts: list[str],
    batch_sizes: list[int],
    *,
    device: str,
    tokens: int = 0,
    site: Path | None = None,
    stop: threading.Event | None = None,
    on_point: Callable[[SweepPoint], None] | None = None,
) -> dict[str, Any]:
    """Docs/s of each batch_size over `texts` (`tokens` in all, for tokens/s), and the best; {"skipped": why}
    when sentence-transformers cannot be imported or cannot load `checkpoint`. `site`: a directory holding
    sentence-transformers and torch (`pip install --target DIR sentence-transformers`), appended to sys.path, so
    embedpool's packages still win."""
    if site is not None and str(site) not in sys.path:
        sys.path.append(str(site))
    try:
        # Imported by name: it is no dependency, so neither mypy nor the package may count on it.
        sentence_transformers = importlib.import_module("sentence_transformers")
    except ImportError:
        return {"skipped": "sentence-transformers is not importable (pip install it, or pass --baseline-site DIR)"}
    try:
        model = sentence_transformers.SentenceTransformer(str(checkpoint), device=device)
    except Exception as exc:  # whatever a checkpoint it cannot read makes it raise
        return {"skipped": f"sentence-transformers cannot load {checkpoint}: {type(exc).__name__}: {exc}"}
    if device == "cuda":
        model = model.half()

    def measure(size: int) -> SweepPoint:
        model.encode(texts[:size], batch_size=size)  # warm-up
        started = time.perf_counter()
        model.encode(texts, batch_size=size)
        seconds = time.perf_counter() - started
        return SweepPoint(size, len(texts), tokens, seconds, None, {})  # encode() times no batch by itself

    points = run_sweep(batch_sizes, len(texts), measure, stop, on_point)
    return sweep_report(
        points,
        engine="sentence-transformers",
        checkpoint=str(checkpoint),
        device=device,
        precision="fp16" if device == "cuda" else "fp32",
        docs=len(texts),
    )
