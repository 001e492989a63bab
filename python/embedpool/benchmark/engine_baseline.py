"""Raw ONNX Runtime on the model file, as well as a user could drive it: the ceiling a server is measured against.

Texts are tokenized once, sorted by token count and cut into batches padded to their longest text, so padding is
as small as sorting makes it; the batch size is swept (8 ... 256 on CPU, up to 1024 on a GPU) and the best kept.
Timing covers inference only (tokenizing and padding are done up front), through embedpool.model's session, the
same ONNX Runtime options and graph the server runs.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from embedpool import _native
from embedpool.benchmark.sweep import SweepPoint, batch_latency_ms, run_sweep, sweep_report
from embedpool.model import EmbeddingSession, ModelBundle
from embedpool.model.session import Device, VariantChoice

__all__ = ["engine_sweep"]

Batch = tuple[NDArray[np.int64], NDArray[np.int64]]


def _sorted_rows(tokenizer: _native.Tokenizer, texts: list[str]) -> list[NDArray[np.int64]]:
    """Each text's token ids (cut at the model's limit), shortest first."""
    flat, offsets = tokenizer.encode_ragged(texts)
    rows = [flat[offsets[i] : offsets[i + 1]] for i in range(len(texts))]
    return sorted(rows, key=len)


def _batches(rows: list[NDArray[np.int64]], size: int, pad_id: int, multiple: int) -> list[Batch]:
    return [_native.pad_batch(rows[i : i + size], pad_id=pad_id, multiple=multiple) for i in range(0, len(rows), size)]


def _run(
    session: EmbeddingSession, batches: list[Batch], size: int, stop: threading.Event, warm_all: bool
) -> SweepPoint:
    # First passes over a shape are slow on a GPU: warm every shape there; on CPU the largest batch is enough.
    for ids, mask in batches if warm_all else batches[-1:]:
        if stop.is_set():
            break
        session.embed(ids, mask)
    latencies: list[float] = []
    docs = tokens = padded = 0
    started = time.perf_counter()
    for ids, mask in batches:
        if stop.is_set():
            break
        t0 = time.perf_counter()
        session.embed(ids, mask)
        latencies.append(time.perf_counter() - t0)
        docs += ids.shape[0]
        tokens += int(mask.sum())
        padded += mask.size
    seconds = time.perf_counter() - started
    return SweepPoint(
        batch_size=size,
        docs=docs,
        tokens=tokens,
        seconds=seconds,
        padding_efficiency=tokens / padded if padded else None,
        batch_latency_ms=batch_latency_ms(latencies),
        partial=docs < sum(b[0].shape[0] for b in batches),
    )


def engine_sweep(
    bundle: ModelBundle,
    texts: list[str],
    batch_sizes: list[int],
    *,
    variant: VariantChoice,
    device: Device,
    threads: int = 0,
    stop: threading.Event | None = None,
    on_point: Callable[[SweepPoint], None] | None = None,
) -> dict[str, Any]:
    """Docs/s of each batch size over `texts` (each size one timed pass after its warm-up), and the best.
    `threads`: ONNX Runtime's intra-op threads (0: every core, as a server alone on the machine uses them).
    Setting `stop` ends the sweep after the batch in progress."""
    stop = stop or threading.Event()
    threads = threads or os.cpu_count() or 1
    session = EmbeddingSession(bundle, variant=variant, device=device, intra_op_threads=threads)
    tokenizer = _native.Tokenizer(str(bundle.tokenizer_path), max_length=bundle.config.max_tokens)
    rows = _sorted_rows(tokenizer, texts)
    multiple = 8 if device == "cuda" else 1  # tensor cores like multiples of 8; a CPU gains nothing from padding

    def measure(size: int) -> SweepPoint:
        batches = _batches(rows, size, tokenizer.pad_id, multiple)
        return _run(session, batches, size, stop, warm_all=device == "cuda")

    points = run_sweep(batch_sizes, len(rows), measure, stop, on_point)
    return sweep_report(
        points,
        engine="onnxruntime",
        model=bundle.config.name,
        file=bundle.onnx[session.variant].name,
        variant=session.variant,
        device=device,
        provider=session.provider,
        threads=threads,
        docs=len(texts),
        sorted_by_tokens=True,
    )
