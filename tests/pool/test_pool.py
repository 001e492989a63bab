"""The worker pool under load, cancellation, deadlines and engine faults, with the real model."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import anyio
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numpy.typing import NDArray

from embedpool import _native
from embedpool.errors import DeadlineExceeded, InferenceFailed, Overloaded, Unavailable
from embedpool.model import EmbeddingSession
from embedpool.pool import BatchLimits, PoolConfig, running_pool


def _config(permits: int = 256, max_size: int = 16, max_tokens: int = 2048) -> PoolConfig:
    return PoolConfig(
        dim=384,
        limits=BatchLimits(max_tokens=max_tokens, max_size=max_size, pad_multiple=16, pad_id=0),
        max_concurrent_inputs=permits,
        tokenizer_threads=2,
    )


def _alone(session: EmbeddingSession, tokenizer: _native.Tokenizer, texts: Sequence[str]) -> NDArray[np.float32]:
    """Reference: each text embedded on its own, no padding."""
    rows = []
    for text in texts:
        ids, mask, _ = tokenizer.encode([text])
        rows.append(session.embed(ids, mask)[0])
    return np.stack(rows)


@pytest.mark.anyio
async def test_concurrent_callers_get_their_own_vectors_in_order(
    session: EmbeddingSession, tokenizer: _native.Tokenizer, golden: tuple[list[str], NDArray[np.float32]]
) -> None:
    texts, expected = golden
    groups = [texts[i::5] for i in range(5)]
    results: dict[int, NDArray[np.float32]] = {}
    async with running_pool(tokenizer, [session], _config()) as pool:

        async def call(g: int) -> None:
            results[g] = (await pool.embed(groups[g])).vectors

        async with anyio.create_task_group() as tg:
            for g in range(len(groups)):
                tg.start_soon(call, g)
        assert pool.permits_in_use == 0
    for g in range(len(groups)):
        cos = (results[g] * expected[g::5]).sum(axis=1)
        assert cos.min() >= 0.9999


@pytest.mark.anyio
async def test_overload_refuses_at_once_and_answers_everyone_admitted(
    session: EmbeddingSession, tokenizer: _native.Tokenizer
) -> None:
    texts = [f"request {i} " + "word " * (i % 40) for i in range(8)]
    outcomes: list[str] = []
    async with running_pool(tokenizer, [session], _config(permits=24)) as pool:

        async def call(i: int) -> None:
            try:
                got = await pool.embed(texts)
            except Overloaded as exc:
                assert "capacity" in str(exc)
                outcomes.append("refused")
            else:
                assert got.vectors.shape == (8, 384)
                np.testing.assert_allclose(np.linalg.norm(got.vectors, axis=1), 1.0, atol=1e-5)
                outcomes.append("ok")

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for i in range(40):
                    tg.start_soon(call, i)
        assert pool.permits_in_use == 0
        assert (await pool.embed(["still healthy"])).vectors.shape == (1, 384)
    assert outcomes.count("refused") > 0 and outcomes.count("ok") >= 3


@pytest.mark.anyio
async def test_cancel_and_deadline_free_permits(session: EmbeddingSession, tokenizer: _native.Tokenizer) -> None:
    async with running_pool(tokenizer, [session], _config()) as pool:
        with anyio.move_on_after(0.01):
            await pool.embed(["a long text " * 50] * 64)
        assert pool.permits_in_use == 0
        with pytest.raises(DeadlineExceeded):
            await pool.embed(["too late"] * 8, deadline=anyio.current_time() - 1)
        assert pool.permits_in_use == 0
        with pytest.raises(DeadlineExceeded):
            await pool.embed(["a long text " * 50] * 128, deadline=anyio.current_time() + 0.05)
        assert pool.permits_in_use == 0
        assert (await pool.embed(["after"])).vectors.shape == (1, 384)


@pytest.mark.anyio
async def test_a_poison_document_fails_only_its_own_request(
    session: EmbeddingSession, tokenizer: _native.Tokenizer, poisoned: Any
) -> None:
    texts = [f"plain text number {i}" for i in range(6)]
    results: dict[int, Any] = {}
    async with running_pool(tokenizer, [poisoned], _config(max_size=8)) as pool:

        async def call(k: int, batch: list[str]) -> None:
            try:
                results[k] = (await pool.embed(batch)).vectors
            except InferenceFailed as e:
                results[k] = e

        async with anyio.create_task_group() as tg:  # admitted together, so they share batches
            for k in range(3):
                tg.start_soon(call, k, texts[2 * k : 2 * k + 2])
            tg.start_soon(call, 3, ["a zeppelin", "fine company"])
        assert pool.permits_in_use == 0
        assert pool.sessions_in_rotation == 1
    assert isinstance(results[3], InferenceFailed)
    assert "zeppelin" not in str(results[3]) and "injected" not in str(results[3])  # the engine's words stay in the log
    np.testing.assert_allclose(
        np.concatenate([results[k] for k in range(3)]), _alone(session, tokenizer, texts), atol=2e-5
    )
    assert poisoned.failures >= 2  # the shared batch, then the halves holding the poison


@pytest.mark.anyio
async def test_a_client_retrying_its_poison_document_does_not_take_the_session_out(
    tokenizer: _native.Tokenizer, poisoned: Any
) -> None:
    from embedpool.pool import feeder

    async with running_pool(tokenizer, [poisoned], _config()) as pool:
        for _ in range(feeder.FAILED_BATCHES_TO_REMOVE + 2):
            with pytest.raises(InferenceFailed):
                await pool.embed(["zeppelin"])
        assert pool.sessions_in_rotation == 1  # the canary still works: the input was the problem
        assert (await pool.embed(["still serving"])).vectors.shape == (1, 384)


@pytest.mark.anyio
async def test_a_waiting_caller_gets_in_when_room_frees_and_a_unary_one_is_refused(
    session: EmbeddingSession, tokenizer: _native.Tokenizer
) -> None:
    async with running_pool(tokenizer, [session], _config(permits=8)) as pool:
        results: list[int] = []

        async def holder() -> None:
            results.append(len((await pool.embed(["a long text that takes a moment " * 20] * 8)).vectors))

        async def waiter() -> None:
            results.append(len((await pool.embed(["waits for room"] * 8, wait=True)).vectors))

        async with anyio.create_task_group() as tg:
            tg.start_soon(holder)
            await anyio.sleep(0)  # the holder is admitted first
            assert pool.permits_in_use == 8
            with pytest.raises(Overloaded):
                await pool.embed(["no room"])
            tg.start_soon(waiter)
        assert results == [8, 8]
        async with anyio.create_task_group() as tg:
            tg.start_soon(holder)
            await anyio.sleep(0)
            with pytest.raises(DeadlineExceeded, match="waiting for room"):
                await pool.embed(["x"] * 8, wait=True, deadline=anyio.current_time() + 0.001)
        assert pool.permits_in_use == 0


class _Panicking:
    """A session whose engine call raises a BaseException, as a Rust panic (pyo3's PanicException) does."""

    class Panic(BaseException):
        pass

    def __init__(self, inner: EmbeddingSession) -> None:
        self.inner = inner
        self.broken = True

    def embed(self, input_ids: NDArray[np.int64], attention_mask: NDArray[np.int64]) -> NDArray[np.float32]:
        if self.broken:
            raise self.Panic("rust panicked")
        return self.inner.embed(input_ids, attention_mask)


@pytest.mark.anyio
async def test_a_failing_session_leaves_rotation_and_returns_when_it_works(
    session: EmbeddingSession, tokenizer: _native.Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from embedpool.pool import feeder

    monkeypatch.setattr(feeder, "PROBE_INTERVAL_S", 0.3)
    broken = _Panicking(session)
    async with running_pool(tokenizer, [broken], _config()) as pool:
        for _ in range(feeder.FAILED_BATCHES_TO_REMOVE):  # panics fail the request, never the pool
            with pytest.raises(InferenceFailed):
                await pool.embed(["text"])
        assert pool.sessions_in_rotation == 0
        with pytest.raises(Unavailable):
            await pool.embed(["refused at once while no session works"])
        broken.broken = False
        with anyio.fail_after(10):
            while pool.sessions_in_rotation == 0:
                await anyio.sleep(0.05)
        assert (await pool.embed(["works again"])).vectors.shape == (1, 384)
        assert pool.permits_in_use == 0


@given(
    requests=st.lists(
        st.lists(st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=300), min_size=1, max_size=6),
        min_size=1,
        max_size=6,
    )
)
def test_mixed_lengths_under_concurrency_match_embedding_alone(
    session: EmbeddingSession, tokenizer: _native.Tokenizer, requests: list[list[str]]
) -> None:
    results: list[NDArray[np.float32] | None] = [None] * len(requests)

    async def main() -> None:
        async with running_pool(tokenizer, [session], _config(max_size=8, max_tokens=1024)) as pool:

            async def call(r: int) -> None:
                results[r] = (await pool.embed(requests[r], deadline=math.inf)).vectors

            async with anyio.create_task_group() as tg:
                for r in range(len(requests)):
                    tg.start_soon(call, r)

    anyio.run(main, backend="asyncio")
    for texts, got in zip(requests, results, strict=True):
        assert got is not None
        cos = (got * _alone(session, tokenizer, texts)).sum(axis=1)
        assert cos.min() >= 0.9999


class _Recording:
    """The real session, noting each engine run that `terminate()` stopped."""

    def __init__(self, inner: EmbeddingSession) -> None:
        self.inner = inner
        self.stopped = 0
        self.started = anyio.Event()

    def embed(self, input_ids: NDArray[np.int64], attention_mask: NDArray[np.int64]) -> NDArray[np.float32]:
        from embedpool.model.session import Terminated

        self.started.set()
        try:
            return self.inner.embed(input_ids, attention_mask)
        except Terminated:
            self.stopped += 1
            raise

    def terminate(self) -> None:
        self.inner.terminate()


@pytest.mark.anyio
async def test_a_run_whose_callers_all_left_is_stopped_and_is_no_failure(
    session: EmbeddingSession, tokenizer: _native.Tokenizer
) -> None:
    recording = _Recording(session)
    long_texts = [f"a long passage number {i} " + "with many words in it " * 40 for i in range(32)]
    async with running_pool(tokenizer, [recording], _config(max_size=32, max_tokens=32 * 256)) as pool:
        with anyio.move_on_after(0.3):  # the caller leaves while its batch runs
            await pool.embed(long_texts)
        with anyio.fail_after(60):
            served = await pool.embed(["the next caller is served"])
        assert served.vectors.shape == (1, 384)
        assert recording.stopped == 1
        assert pool.sessions_in_rotation == 1 and pool.permits_in_use == 0
