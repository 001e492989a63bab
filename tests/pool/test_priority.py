"""Priority classes in the pool: interactive work is batched ahead of a bulk backlog, bulk still gets its share,
deadlines and cancellation hold for both, and admission keeps a reserve for interactive calls. Batches are seen
by a recording session (their order and rows), never timed."""

from __future__ import annotations

import itertools
import threading

import anyio
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numpy.typing import NDArray

from embedpool import _native
from embedpool.errors import DeadlineExceeded, Overloaded
from embedpool.model import EmbeddingSession
from embedpool.pool import BatchLimits, Permits, PoolConfig, Priority, running_pool

MARKED = "zeppelin"
"""The word in the texts whose rows the recording session tells apart (from a word no other text here has)."""


def _config(*, priorities: bool = True, max_size: int = 8, window_factor: int = 8, streak: int = 4) -> PoolConfig:
    return PoolConfig(
        dim=384,
        limits=BatchLimits(max_tokens=4096, max_size=max_size, pad_multiple=16, pad_id=0, window_factor=window_factor),
        max_concurrent_inputs=256,
        tokenizer_threads=2,
        priorities=priorities,
        max_interactive_streak=streak,
    )


class _Recording:
    """The real session, noting for each batch it runs which rows hold the marked word; while `gate` is closed,
    the engine call waits for it (so that a backlog builds behind the batch running)."""

    def __init__(self, inner: EmbeddingSession, marker: int, *, gated: bool = False) -> None:
        self.inner = inner
        self.marker = marker
        self.batches: list[list[bool]] = []
        self.entered = threading.Event()
        self.gate = threading.Event()
        if not gated:
            self.gate.set()

    def embed(self, input_ids: NDArray[np.int64], attention_mask: NDArray[np.int64]) -> NDArray[np.float32]:
        self.batches.append([bool((row == self.marker).any()) for row in input_ids])
        self.entered.set()
        self.gate.wait(60)
        return self.inner.embed(input_ids, attention_mask)

    @property
    def marked(self) -> list[bool]:
        """Per batch run: whether it held marked rows (asserting batches never mix the two)."""
        assert all(all(b) or not any(b) for b in self.batches), "a batch mixed marked and unmarked rows"
        return [b[0] for b in self.batches]


@pytest.fixture
def marker(tokenizer: _native.Tokenizer) -> int:
    ids, _ = tokenizer.encode_ragged([MARKED])
    return int(ids[1])


def _bulk_texts(n: int) -> list[str]:
    return [f"plain bulk document number {i} about subject {i % 7}" for i in range(n)]


@pytest.mark.anyio
@pytest.mark.parametrize("priorities", [True, False], ids=["on", "off"])
async def test_interactive_work_is_batched_ahead_of_a_bulk_backlog(
    session: EmbeddingSession, tokenizer: _native.Tokenizer, marker: int, priorities: bool
) -> None:
    recording = _Recording(session, marker, gated=True)
    # window_factor 1: batches are cut strictly in arrival order within a class, so that off shows plain FIFO.
    config = _config(priorities=priorities, window_factor=1)
    async with running_pool(tokenizer, [recording], config) as pool:
        results: dict[str, int] = {}

        async def call(name: str, texts: list[str], priority: Priority) -> None:
            results[name] = len((await pool.embed(texts, priority=priority, wait=True)).vectors)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(call, "bulk", _bulk_texts(48), Priority.BULK)
                await anyio.to_thread.run_sync(recording.entered.wait)  # its first batch runs; the rest queue
                tg.start_soon(call, "query", [f"{MARKED} query {k}" for k in range(3)], Priority.INTERACTIVE)
                await anyio.wait_all_tasks_blocked()  # the query is in the scheduler's hands
                recording.gate.set()
        assert results == {"bulk": 48, "query": 3}
        assert pool.permits_in_use == 0
    if priorities:  # the query's batch runs right after the bulk batch that was running, alone
        assert recording.marked[:2] == [False, True] and recording.batches[1] == [True] * 3
        assert recording.marked.count(True) == 1
    else:  # one queue: behind every bulk document
        assert recording.marked == [False] * 6 + [True]


@pytest.mark.anyio
async def test_bulk_gets_its_share_under_a_continuous_interactive_stream(
    session: EmbeddingSession, tokenizer: _native.Tokenizer, marker: int
) -> None:
    """32 callers sending queries back to back keep interactive documents queued all the time (batches hold 8);
    the bulk call still completes, and between two of its batches at most `streak` interactive batches are cut
    while it waits, plus those cut ahead while its previous batch ran (pipeline depth 2, 1 session: one)."""
    streak = 2
    recording = _Recording(session, marker)
    async with running_pool(tokenizer, [recording], _config(streak=streak)) as pool:
        bulk_done = anyio.Event()

        async def query(k: int) -> None:
            while not bulk_done.is_set():
                await pool.embed([f"{MARKED} query {k}"])

        async def bulk() -> None:
            assert len((await pool.embed(_bulk_texts(40), priority=Priority.BULK)).vectors) == 40
            bulk_done.set()

        with anyio.fail_after(60):  # starved, the bulk call would never end, nor would the queries
            async with anyio.create_task_group() as tg:
                for k in range(32):
                    tg.start_soon(query, k)
                await anyio.wait_all_tasks_blocked()
                before = len(recording.batches)  # run or running (a feeder thread records them)
                tg.start_soon(bulk)
        assert pool.permits_in_use == 0
    marked = recording.marked
    bulk_at = [i for i, m in enumerate(marked) if not m]
    assert len(bulk_at) == 5  # 40 documents, 8 a batch
    gaps = [b - a - 1 for a, b in itertools.pairwise(bulk_at)]
    assert max(gaps) <= streak + 1, marked
    assert bulk_at[0] - before <= streak + 2, marked  # its first one too: after those in flight when it came


@pytest.mark.anyio
@pytest.mark.parametrize("priority", list(Priority), ids=lambda p: p.value)
async def test_cancel_and_deadline_free_permits_in_either_class(
    session: EmbeddingSession, tokenizer: _native.Tokenizer, priority: Priority
) -> None:
    async with running_pool(tokenizer, [session], _config()) as pool:
        with anyio.move_on_after(0.01):
            await pool.embed(["a long text " * 50] * 64, priority=priority)
        assert pool.permits_in_use == 0
        with pytest.raises(DeadlineExceeded):
            await pool.embed(["too late"] * 8, deadline=anyio.current_time() - 1, priority=priority, wait=True)
        assert pool.permits_in_use == 0
        assert (await pool.embed(["after"], priority=priority)).vectors.shape == (1, 384)


@pytest.mark.anyio
@pytest.mark.parametrize("priority", list(Priority), ids=lambda p: p.value)
async def test_a_job_whose_deadline_passes_while_queued_is_never_run(
    session: EmbeddingSession, tokenizer: _native.Tokenizer, marker: int, priority: Priority
) -> None:
    """Behind a bulk batch held running: a bulk job waits in the queue, an interactive one in the batch channel;
    either way its rows are dropped before any work once its caller got DeadlineExceeded."""
    recording = _Recording(session, marker, gated=True)
    async with running_pool(tokenizer, [recording], _config()) as pool:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: pool.embed(_bulk_texts(16), priority=Priority.BULK))
                await anyio.to_thread.run_sync(recording.entered.wait)
                with pytest.raises(DeadlineExceeded):
                    await pool.embed([f"{MARKED} {k}" for k in range(4)], deadline=anyio.current_time() + 0.05)
                recording.gate.set()
        assert pool.permits_in_use == 0
    assert recording.marked == [False, False]


def test_admission_keeps_a_reserve_for_interactive_calls() -> None:
    permits = Permits(100, 10_000, interactive_reserve=0.25)
    permits.acquire(70, 0, Priority.BULK)
    with pytest.raises(Overloaded):
        permits.acquire(10, 0, Priority.BULK)  # 80 > bulk's 75
    permits.acquire(30, 0, Priority.INTERACTIVE)
    assert permits.in_use == 100
    permits.release(70, 0, Priority.BULK)
    permits.release(30, 0, Priority.INTERACTIVE)
    permits.acquire(90, 0, Priority.BULK)  # alone, a bulk request larger than bulk's share is still admitted
    assert permits.bulk_in_use == 90


@pytest.mark.anyio
async def test_waiting_bulk_work_leaves_the_reserve_to_interactive_calls() -> None:
    permits = Permits(8, 10_000, interactive_reserve=0.25)
    permits.acquire(6, 0, Priority.BULK)
    got: list[int] = []

    async def waiter() -> None:
        await permits.acquire_waiting(4, 0, Priority.BULK)
        got.append(4)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        permits.acquire(2, 0, Priority.INTERACTIVE)  # the reserve: the waiting bulk work could not take it
        permits.release(2, 0, Priority.INTERACTIVE)
        await anyio.wait_all_tasks_blocked()
        assert got == []  # 6 + 4 > bulk's 6
        permits.release(6, 0, Priority.BULK)
    assert got == [4] and permits.bulk_in_use == 4


@given(
    ops=st.lists(
        st.tuples(st.sampled_from(list(Priority)), st.integers(1, 40), st.booleans()), min_size=1, max_size=60
    ),
    reserve=st.sampled_from([0.0, 0.1, 0.25, 0.5]),
)
def test_bulk_never_holds_the_reserve_unless_alone(ops: list[tuple[Priority, int, bool]], reserve: float) -> None:
    permits = Permits(64, 1_000_000, interactive_reserve=reserve)
    held: list[tuple[Priority, int]] = []
    for priority, n, release in ops:
        if release and held:
            p, k = held.pop(0)
            permits.release(k, 0, p)
            continue
        try:
            permits.acquire(n, 0, priority)
        except Overloaded:
            assert permits.in_use + n > permits.total or priority is Priority.BULK
            continue
        held.append((priority, n))
        bulk = [k for p, k in held if p is Priority.BULK]
        assert permits.in_use <= permits.total
        assert permits.bulk_in_use == sum(bulk)
        assert permits.bulk_in_use <= permits.bulk_total or len(bulk) == 1
