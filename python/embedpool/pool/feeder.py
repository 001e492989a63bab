"""Feeders: one dedicated thread per inference session, pulling batches from the batch channel."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

import anyio
import anyio.from_thread
import numpy as np
from anyio.lowlevel import EventLoopToken
from anyio.streams.memory import MemoryObjectReceiveStream
from numpy.typing import NDArray

from embedpool.pool.scheduler import Batch

log = logging.getLogger(__name__)


class InferenceSession(Protocol):
    """What the pool needs from an engine: padded ids and mask in, [batch, dim] unit vectors out."""

    def embed(self, input_ids: NDArray[np.int64], attention_mask: NDArray[np.int64]) -> NDArray[np.float32]: ...


# (batch, vectors or None, error or None, seconds spent in the engine); runs on the event loop.
Completion = Callable[[Batch, NDArray[np.float32] | None, Exception | None, float], None]

_LOOP_GONE = (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.RunFinishedError)


class Feeder:
    """A thread that owns one session. The engine call blocks (and releases the GIL inside ONNX Runtime), so
    it belongs on a thread; a dedicated one keeps the session on a stable OS thread, which CUDA prefers.
    """

    def __init__(
        self,
        name: str,
        session: InferenceSession,
        batches: MemoryObjectReceiveStream[Batch],
        on_done: Completion,
        token: EventLoopToken,
    ) -> None:
        self._session = session
        self._batches = batches
        self._on_done = on_done
        self._token = token
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self._thread.join()

    def close(self) -> None:
        """Closes this feeder's end of the channel; call on the event loop once the thread has ended."""
        self._batches.close()

    def _run(self) -> None:
        while True:
            try:
                batch = anyio.from_thread.run(self._batches.receive, token=self._token)
            except _LOOP_GONE:
                return
            started = time.perf_counter()
            out: NDArray[np.float32] | None = None
            error: Exception | None = None
            try:
                out = self._session.embed(batch.ids, batch.mask)
            except Exception as exc:  # an engine fault fails this batch only; the feeder keeps serving
                log.exception("inference failed on a batch of %d documents", len(batch.entries))
                error = exc
            try:
                anyio.from_thread.run_sync(
                    self._on_done, batch, out, error, time.perf_counter() - started, token=self._token
                )
            except _LOOP_GONE:
                return
