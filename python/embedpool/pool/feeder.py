"""Feeders: one dedicated thread per inference session, taking batches from the batch channel (pool.handoff).

A batch the engine fails on is split in halves and each half retried, down to single documents, so a
poison document fails only its own request and an out-of-memory batch is served in smaller pieces. When
every document of a batch failed, a known-good canary input tells a broken session from a batch of poison
(a client retrying its poison document must not take the server down). A session that failed the canary
too, several batches in a row, is taken out of rotation: it stops taking batches while another session is
in rotation (and answers them at once with UNAVAILABLE while none is), and is probed with the canary every
few seconds until it works again. Rows whose callers left are dropped before a batch runs, and a run whose
callers all left is stopped (`stop_if_unwanted`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

import anyio
import anyio.from_thread
import numpy as np
from anyio.lowlevel import EventLoopToken
from numpy.typing import NDArray

from embedpool import metrics, tracing
from embedpool.pool.handoff import END, Handoff, Mail, Mailbox
from embedpool.pool.scheduler import Batch

log = logging.getLogger(__name__)

FAILED_BATCHES_TO_REMOVE: Final = 3
"""Batches in a row with no document embedded, and the canary failing too, before a session leaves rotation."""
PROBE_INTERVAL_S: Final = 5.0
_IDLE_POLL_S: Final = 0.05


class InferenceSession(Protocol):
    """What the pool needs from an engine: padded ids and mask in, [batch, dim] unit vectors out."""

    def embed(self, input_ids: NDArray[np.int64], attention_mask: NDArray[np.int64]) -> NDArray[np.float32]: ...


@dataclass(frozen=True, slots=True)
class Outcome:
    """One batch's result: `vectors` rows are valid except those in `failed` (why is in the log)."""

    vectors: NDArray[np.float32]
    failed: set[int]
    seconds: float
    unavailable: bool = False
    """True when no session was in rotation and the batch was not tried at all."""
    stopped: bool = False
    """True when the run was stopped because every caller of the batch had left (see Feeder.stop_if_unwanted)."""
    started_ns: int = 0
    ended_ns: int = 0
    """When the engine ran the batch, on the clock spans are stamped with (0: it did not run)."""


# Runs on the event loop.
Completion = Callable[[Batch, Outcome], None]

_LOOP_GONE = (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.RunFinishedError)


@dataclass
class Rotation:
    """The sessions serving batches; shared by the feeder threads, read by the pool and health."""

    total: int
    meters: metrics.PoolMetrics = field(default_factory=lambda: metrics.pool_metrics("default"))
    _out: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def in_rotation(self) -> int:
        with self._lock:
            return self.total - len(self._out)

    def take_out(self, name: str) -> None:
        with self._lock:
            self._out.add(name)
            self.meters.sessions_in_rotation.set(self.total - len(self._out))

    def put_back(self, name: str) -> None:
        with self._lock:
            self._out.discard(name)
            self.meters.sessions_in_rotation.set(self.total - len(self._out))


class Feeder:
    """A thread that owns one session. The engine call blocks (and releases the GIL inside ONNX Runtime), so
    it belongs on a thread; a dedicated one keeps the session on a stable OS thread, which CUDA prefers.
    """

    def __init__(
        self,
        name: str,
        session: InferenceSession,
        handoff: Handoff,
        on_done: Completion,
        token: EventLoopToken,
        rotation: Rotation,
        dim: int,
        canary: tuple[NDArray[np.int64], NDArray[np.int64]],
    ) -> None:
        self._name = name
        self._session = session
        self._handoff = handoff
        self._mailbox = Mailbox(self._take)
        self._on_done = on_done
        self._token = token
        self._rotation = rotation
        self._dim = dim
        self._canary = canary
        self._failed_in_a_row = 0
        self._out = False
        self._probe_at = 0.0
        self._stopping = threading.Event()
        self._running: Batch | None = None
        """The batch being embedded; set and read on the event loop."""
        self._stop_requested = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """The pool is ending: a feeder out of rotation stops waiting for its probe (the others end when the
        batch channel does)."""
        self._stopping.set()

    def join(self) -> None:
        self._thread.join()

    def _run(self) -> None:
        # A served batch's outcome is handed back in the same call onto the event loop that takes the next batch
        # (pool.handoff): under load, one crossing between the threads per batch.
        finished: tuple[Batch, Outcome] | None = None
        while True:
            if self._out and time.monotonic() >= self._probe_at:
                self._try_probe()
            try:
                if self._out and self._rotation.in_rotation > 0:
                    if finished is not None:
                        anyio.from_thread.run_sync(self._finish, *finished, token=self._token)
                        finished = None
                    # Others serve; this one only waits for its next probe (or the end of the pool).
                    if self._stopping.wait(_IDLE_POLL_S):
                        return
                    continue
                # Out of rotation with none in it, batches are still taken, to be answered at once, but a wait
                # for one ends when a probe is due.
                item = self._next(finished, _IDLE_POLL_S if self._out else None)
            except _LOOP_GONE:
                return
            finished = None
            if isinstance(item, Batch):
                finished = (item, self._serve(item))
            elif item is END:
                return

    def _next(self, finished: tuple[Batch, Outcome] | None, timeout: float | None) -> Mail | None:
        """On the thread: hands `finished` back and takes the next batch, waiting up to `timeout` for one."""
        # Posted without waiting for the event loop's reply: whatever it is comes through the mailbox, so a thread
        # that finds no batch waiting is woken once, by the next one, not also by the reply that there is none.
        # (`run_sync_soon` is the backend call anyio's own from_thread helpers post with.)
        self._token.backend_class.run_sync_soon(self._exchange, (finished,), self._token.native_token)
        item = self._mailbox.get(timeout)
        if item is None and not anyio.from_thread.run_sync(self._handoff.unpark, self._mailbox, token=self._token):
            item = self._mailbox.get()  # handed over just before the wait ended
        return item

    def _exchange(self, finished: tuple[Batch, Outcome] | None) -> None:
        """On the event loop: the thread waits on its mailbox for what this puts there."""
        try:
            if finished is not None:
                self._finish(*finished)
            item = self._handoff.take_or_park(self._mailbox)
        except BaseException:
            self._mailbox.put(END)  # the thread must not wait for ever; the error is the loop's to report
            raise
        if item is not None:
            self._mailbox.put(item)

    def _take(self, batch: Batch) -> Batch:
        """On the event loop, as `batch` is handed to this feeder: without rows whose callers left meanwhile."""
        batch = batch.live(anyio.current_time())
        self._running, self._stop_requested = batch, False
        return batch

    def stop_if_unwanted(self) -> None:
        """On the event loop, when a caller leaves: if nobody waits for the batch being embedded any more, stop
        the engine's run (a session with `terminate()`), so the next work starts now rather than after it."""
        batch = self._running
        if batch is None or self._stop_requested:
            return
        now = anyio.current_time()
        if all(job.expired(now) for job in batch.jobs):
            terminate = getattr(self._session, "terminate", None)
            if terminate is not None:
                self._stop_requested = True
                terminate()

    def _finish(self, batch: Batch, outcome: Outcome) -> None:
        """On the event loop: the batch is no longer running; hand its outcome on."""
        self._running = None
        self._on_done(batch, outcome)

    def _serve(self, batch: Batch) -> Outcome:
        n = len(batch)
        vectors = np.zeros((n, self._dim), np.float32)
        if n == 0:  # every caller left while it waited in the channel
            return Outcome(vectors, set(), 0.0, stopped=True)
        if self._out:  # no session in rotation: answer now rather than let callers wait
            return Outcome(vectors, set(range(n)), 0.0, unavailable=True)
        started, started_ns = time.perf_counter(), tracing.wall_ns()
        failed: set[int] = set()
        self._infer(batch.ids, batch.mask, 0, n, vectors, failed)
        seconds = time.perf_counter() - started
        ended_ns = started_ns + round(seconds * 1e9)
        if self._stop_requested:
            return Outcome(vectors, set(range(n)), seconds, stopped=True)
        if len(failed) < n or self._canary_works():
            self._failed_in_a_row = 0
        else:
            self._failed_in_a_row += 1
            if self._failed_in_a_row >= FAILED_BATCHES_TO_REMOVE:
                self._out = True
                self._probe_at = time.monotonic() + PROBE_INTERVAL_S
                self._rotation.take_out(self._name)
                log.error("%s: out of rotation after %d failed batches in a row", self._name, self._failed_in_a_row)
        return Outcome(vectors, failed, seconds, started_ns=started_ns, ended_ns=ended_ns)

    def _infer(
        self,
        ids: NDArray[np.int64],
        mask: NDArray[np.int64],
        start: int,
        stop: int,
        out: NDArray[np.float32],
        failed: set[int],
    ) -> None:
        """Rows start..stop into `out`; on a failure the halves are tried on their own, down to single rows."""
        try:
            out[start:stop] = self._session.embed(ids[start:stop], mask[start:stop])
            return
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # a Rust panic is a BaseException: it fails rows, not the thread
            if self._stop_requested:  # stopped on purpose (stop_if_unwanted): not the engine's fault
                return
            if stop - start == 1:
                log.error("%s: inference failed on a document: %r", self._name, exc)
                failed.add(start)
                return
        self._rotation.meters.inference_splits.inc()
        middle = (start + stop) // 2
        self._infer(ids, mask, start, middle, out, failed)
        self._infer(ids, mask, middle, stop, out, failed)

    def _canary_works(self) -> bool:
        try:
            self._session.embed(*self._canary)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            log.warning("%s: the canary failed too (%r)", self._name, exc)
            return False
        return True

    def _try_probe(self) -> None:
        if not self._canary_works():
            self._probe_at = time.monotonic() + PROBE_INTERVAL_S
            return
        self._out = False
        self._failed_in_a_row = 0
        self._rotation.put_back(self._name)
        log.warning("%s: back in rotation", self._name)
