"""The worker pool facade: admit, tokenize, queue, batch, infer, fan results back to each caller."""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final

import anyio
import anyio.to_thread
import numpy as np
from anyio.abc import TaskStatus
from anyio.lowlevel import current_token
from numpy.typing import NDArray

from embedpool import metrics, tracing
from embedpool.errors import DeadlineExceeded, InferenceFailed, InvalidArgument, Unavailable
from embedpool.pool.admission import Permits
from embedpool.pool.feeder import Feeder, InferenceSession, Outcome, Rotation
from embedpool.pool.handoff import Handoff
from embedpool.pool.job import Job, Stages
from embedpool.pool.priority import Priority
from embedpool.pool.scheduler import Batch, BatchLimits, ClassPolicy, Scheduler
from embedpool.pool.tokenizing import Tokenizer, TokenizeStage, Tokens
from embedpool.pool.windows import Chunking, Splitter, Windows, pooled

# Where a call is tokenized (pool.tokenizing): on the event loop it costs no hop, but holds the one loop every call
# shares (~20 µs per 100 characters). A query-sized call stays there always: tokenizing it costs less than
# handing it to the tokenizing stage. A call of up to INLINE_TOKENIZE_CHARS stays there while the pool is quiet
# (QUIET_CALLS calls in flight at most), when the loop has time to spare and the hop would only add latency.
# Otherwise calls go to the stage, which tokenizes every call waiting in one hop, over the cores.
INLINE_TOKENIZE_CHARS: Final = 2048
ALWAYS_INLINE_CHARS: Final = 256
QUIET_CALLS: Final = 2


GAUGE_INTERVAL_S: Final = 0.25
_NO_SCOPE: Final = contextlib.nullcontext()


@dataclass(frozen=True)
class PoolConfig:
    dim: int
    limits: BatchLimits
    max_concurrent_inputs: int
    tokenizer_threads: int
    max_concurrent_chars: int = 64 * 1024 * 1024
    pipeline_depth: int = 2  # batches cut ahead per session, so the next one is ready when the engine frees up
    inline_tokenize_chars: int = INLINE_TOKENIZE_CHARS
    """Calls of up to this many characters are tokenized on the event loop while the pool is quiet (0: never)."""
    priorities: bool = True
    """Interactive work ahead of bulk (pool.priority, pool.scheduler); off, one queue in arrival order for all."""
    max_interactive_streak: int = 4
    """Interactive batches cut in a row, at most, while bulk work waits and could run: under any interactive load,
    bulk still gets about 1 batch in 5, while a query under a bulk load waits behind one bulk batch at most."""
    interactive_reserve: float = 0.25
    """Share of the admission budget bulk work may not hold, so that interactive calls under a bulk load are
    admitted (bulk streams waiting for room would otherwise take every permit freed)."""
    model: str = "default"
    """The `model` label of this pool's metrics (a server runs one pool per model)."""


@dataclass(frozen=True)
class Embeddings:
    vectors: NDArray[np.float32]  # [n, dim], unit length, in input order
    token_counts: NDArray[np.int64]  # [n], after truncation (chunked: the whole document's)
    window_counts: NDArray[np.int64] | None = None  # [n], when chunked: windows each document was embedded in


class EmbeddingPool:
    def __init__(
        self,
        tokenizer: Tokenizer,
        sessions: Sequence[InferenceSession],
        config: PoolConfig,
        splitter: Splitter | None = None,
    ) -> None:
        """`splitter`: for long inputs embedded in windows (`embed(chunking=...)`); None: this pool only truncates."""
        if not sessions:
            raise ValueError("the pool needs at least one inference session")
        self._tokenizer = tokenizer
        self._splitter = splitter
        self._sessions = list(sessions)
        self._config = config
        self._meters = meters = metrics.pool_metrics(config.model)
        self._permits = Permits(
            config.max_concurrent_inputs,
            config.max_concurrent_chars,
            config.interactive_reserve if config.priorities else 0.0,
            meters,
        )
        self._tokenize_limiter = anyio.CapacityLimiter(config.tokenizer_threads)
        self._stage = TokenizeStage(tokenizer, config.tokenizer_threads, config.max_concurrent_inputs)
        self._calls = 0  # admitted and not yet answered: how busy the event loop is likely to be
        # Every admitted job fits: a job holds >= 1 permit, so the channel can never hold more jobs than this.
        self._ingress_send, self._ingress_receive = anyio.create_memory_object_stream[Job](config.max_concurrent_inputs)
        depth = len(self._sessions) * config.pipeline_depth
        self._batch_send, self._batch_receive = anyio.create_memory_object_stream[Batch](depth)
        self._free_slots = anyio.Semaphore(depth)
        classes = ClassPolicy(config.max_interactive_streak, len(self._sessions)) if config.priorities else None
        self._handoff = Handoff(self._batch_receive)
        self._scheduler = Scheduler(
            self._ingress_receive,
            self._batch_send,
            self._free_slots,
            config.limits,
            classes,
            meters,
            sent=self._handoff.sent,
        )
        self._rotation = Rotation(len(self._sessions), meters)
        self._feeders: list[Feeder] = []
        meters.sessions_in_rotation.set(len(self._sessions))
        self._closed = False

    @property
    def dim(self) -> int:
        return self._config.dim

    @property
    def splitter(self) -> Splitter | None:
        """How this pool splits long inputs into windows (None: it only truncates)."""
        return self._splitter

    @property
    def permits_in_use(self) -> int:
        return self._permits.in_use

    @property
    def sessions_in_rotation(self) -> int:
        """Inference sessions serving batches; 0 means every one failed repeatedly (see pool.feeder)."""
        return self._rotation.in_rotation

    async def embed(
        self,
        texts: Sequence[str],
        *,
        truncate: bool = True,
        deadline: float = math.inf,
        wait: bool = False,
        priority: Priority = Priority.INTERACTIVE,
        chunking: Chunking | None = None,
    ) -> Embeddings:
        """Embeds `texts` in order. Without room in the admission budget, raises Overloaded at once, or with
        `wait` waits for room (until `deadline`). `priority`: see pool.priority. `chunking`: every text embedded
        whole, in windows of the model's length pooled into one vector (pool.windows); `truncate` is then unused.
        """
        if self._closed:
            raise Unavailable("the server is shutting down")
        if self._rotation.in_rotation == 0:
            raise Unavailable("no inference session is working; retry later")
        chars = sum(map(len, texts))
        # Chunked, the texts are tokenized before admission: the budget counts windows (each is a row of work),
        # and only the tokens tell how many there are.
        windows = None if chunking is None else await self._windows(texts, chars, chunking)
        n = len(texts) if windows is None else len(windows)
        job: Job | None = None
        admitted = False
        traced = tracing.recording()
        tokenizing_ns = 0
        try:
            # No cancel scope without a deadline: it is a fair share of what a small call costs.
            with anyio.fail_after(max(0.0, deadline - anyio.current_time())) if deadline < math.inf else _NO_SCOPE:
                if wait:
                    await self._permits.acquire_waiting(n, chars, priority)
                else:
                    self._permits.acquire(n, chars, priority)
                admitted = True
                self._calls += 1
                if traced:
                    tokenizing_ns = tracing.wall_ns()
                ids, offsets = (
                    (windows.ids, windows.offsets)
                    if windows is not None
                    else await self._tokenize(texts, chars, truncate)
                )
                job = Job(ids=ids, offsets=offsets, dim=self._config.dim, deadline=deadline, priority=priority)
                if traced:
                    job.stages = Stages(queued_ns=tracing.wall_ns())
                # Never full (see __init__): no checkpoint, which would cost a turn of the event loop per call.
                self._ingress_send.send_nowait(job)
                self._scheduler.notify()
                await job.done.wait()
        except TimeoutError as exc:
            if not admitted:
                raise DeadlineExceeded(f"deadline passed waiting for room for {n} documents") from exc
            raise DeadlineExceeded(
                f"deadline passed with {job.remaining if job else n} of {n} documents pending"
            ) from exc
        except anyio.ClosedResourceError as exc:
            raise Unavailable("the server is shutting down") from exc
        finally:
            if job is not None and not job.done.is_set():
                job.abandoned = True  # its queued documents are skipped, and a run only it waits for stopped
                for feeder in self._feeders:
                    feeder.stop_if_unwanted()
            if admitted:
                self._calls -= 1
                self._permits.release(n, chars, priority)
            if job is not None and job.stages is not None:
                _record_stages(job, job.stages, tokenizing_ns, chars)
        if job.error is not None:
            raise job.error
        if windows is not None:
            return Embeddings(pooled(job.vectors, windows), windows.token_counts, windows.counts)
        return Embeddings(vectors=job.vectors, token_counts=job.token_counts)

    async def _windows(self, texts: Sequence[str], chars: int, chunking: Chunking) -> Windows:
        splitter = self._splitter
        if splitter is None:
            raise InvalidArgument("long inputs: this model cannot embed texts in windows; truncate them instead")
        try:
            if chars <= self._config.inline_tokenize_chars:
                return splitter.windows(texts, chunking)
            return await anyio.to_thread.run_sync(
                lambda: splitter.windows(texts, chunking), limiter=self._tokenize_limiter
            )
        except InvalidArgument:
            raise
        except ValueError as exc:  # the extension's NativeError family, as in _tokenize
            raise InvalidArgument(str(exc)) from exc

    async def _tokenize(self, texts: Sequence[str], chars: int, truncate: bool) -> Tokens:
        try:
            if chars <= self._config.inline_tokenize_chars and (
                chars <= ALWAYS_INLINE_CHARS or self._calls <= QUIET_CALLS
            ):
                return self._tokenizer.encode_ragged(texts, truncate=truncate)
        except ValueError as exc:  # the extension's NativeError family: bad input, message names the document
            raise InvalidArgument(str(exc)) from exc
        return await self._stage.encode(texts, chars, truncate)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Runs the scheduler and the feeders until `close()`; then drains queued work and joins the threads."""
        token = current_token()
        self._feeders = feeders = [
            Feeder(
                f"feeder-{k}",
                session,
                self._handoff,
                self._complete,
                token,
                self._rotation,
                self._config.dim,
                self._canary(),
            )
            for k, session in enumerate(self._sessions)
        ]
        for feeder in feeders:
            feeder.start()
        task_status.started()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._publish_gauges)
                tg.start_soon(self._stage.run)
                await self._scheduler.run()
                tg.cancel_scope.cancel()
        finally:
            self._publish()
            with anyio.CancelScope(shield=True):
                self._handoff.sent()  # the channel is closed: parked feeders get what is left, then the end
                for feeder in feeders:
                    feeder.stop()
                for feeder in feeders:
                    await anyio.to_thread.run_sync(feeder.join)
                self._handoff.close()

    async def _publish_gauges(self) -> None:
        # Set on a timer rather than on every change: a call changes the queue and permit gauges four times, and
        # a scrape (every few seconds at most) sees values at most this old.
        while True:
            self._publish()
            await anyio.sleep(GAUGE_INTERVAL_S)

    def _publish(self) -> None:
        self._scheduler.publish()
        self._permits.publish()

    def _canary(self) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """A known-good one-document input, to tell a broken session from a batch of poison documents."""
        ids, _ = self._tokenizer.encode_ragged(["ok"])
        row = ids[None, :].astype(np.int64)
        return row, np.ones_like(row)

    def close(self) -> None:
        """Stops admitting work; `run` returns once everything admitted is answered."""
        self._closed = True
        self._ingress_send.close()
        self._scheduler.notify()

    def _complete(self, batch: Batch, outcome: Outcome) -> None:
        """Runs on the event loop: fans a batch's rows back to their jobs and frees the feeder slot."""
        meters = self._meters
        self._free_slots.release()
        self._scheduler.finished(batch)
        if outcome.stopped:  # nobody waits for these rows
            return
        failed = outcome.failed
        if not outcome.unavailable:
            meters.inference_seconds.observe(outcome.seconds)
        if failed:
            meters.batch_failures.inc()
        for job, rows in batch.by_job():  # a step per job, none per row
            if job.finished:
                continue
            if outcome.started_ns and not job.ran:
                job.ran = True
                meters.queue_wait_seconds(job.priority.value).observe((outcome.started_ns - job.queued_ns) / 1e9)
            bad = [row for row in rows.tolist() if row in failed] if failed else None
            if bad:
                # The engine's own message stays in the log: it can name paths, devices or internals.
                job.fail(
                    Unavailable("no inference session is working; retry later")
                    if outcome.unavailable
                    else InferenceFailed(
                        f"inference failed on document {int(batch.documents[bad].min())} of this request"
                    )
                )
            else:
                job.deliver(batch.documents[rows], outcome.vectors[rows])
            if job.stages is not None:
                job.stages.ran(batch, len(batch), batch.padded_tokens, outcome.started_ns, outcome.ended_ns)
        if outcome.unavailable:
            return
        embedded = len(batch) - len(failed)
        meters.batch_inputs.observe(len(batch))
        meters.batch_tokens.observe(batch.padded_tokens)
        meters.padding_efficiency.observe(batch.real_tokens / max(1, batch.padded_tokens))
        meters.tokens.inc(batch.real_tokens)
        meters.documents.inc(embedded)


def _record_stages(job: Job, stages: Stages, tokenizing_ns: int, chars: int) -> None:
    """The call's tokenize, queue wait and inference spans, from the times its job collected on the way."""
    tracing.record(
        "tokenize", tokenizing_ns, stages.queued_ns, documents=len(job), characters=chars, tokens=int(job.offsets[-1])
    )
    ran_ns = stages.ran_ns or tracing.wall_ns()  # never ran: it waited until it was answered or given up
    tracing.record("queue wait", stages.queued_ns, ran_ns)
    if stages.batches:
        tracing.record(
            "inference",
            ran_ns,
            stages.done_ns,
            batches=stages.batches,
            batch_size=stages.largest_batch,
            padded_tokens=stages.padded_tokens,
        )


@asynccontextmanager
async def running_pool(
    tokenizer: Tokenizer, sessions: Sequence[InferenceSession], config: PoolConfig, splitter: Splitter | None = None
) -> AsyncIterator[EmbeddingPool]:
    """`async with running_pool(...) as pool:` — the pool serves inside the block and drains on exit."""
    pool = EmbeddingPool(tokenizer, sessions, config, splitter)
    async with anyio.create_task_group() as tg:
        await tg.start(pool.run)
        try:
            yield pool
        finally:
            pool.close()
