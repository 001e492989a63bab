"""The worker pool under load, cancellation, deadlines and engine faults, with the real model."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numpy.typing import NDArray

from embedpool import _native
from embedpool.errors import DeadlineExceeded, InferenceFailed, Overloaded
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
async def test_failing_batch_fails_only_its_requests(
    session: EmbeddingSession, tokenizer: _native.Tokenizer, poisoned_session: Callable[..., Any]
) -> None:
    ids, _ = tokenizer.encode_ragged(["zeppelin"])
    poisoned = poisoned_session(session, poison=int(ids[1]))
    async with running_pool(tokenizer, [poisoned], _config(max_size=4)) as pool:
        with pytest.raises(InferenceFailed, match="injected engine fault"):
            await pool.embed(["a zeppelin"])
        good = await pool.embed(["plain text", "more text"])
        assert good.vectors.shape == (2, 384)
        assert pool.permits_in_use == 0
    assert poisoned.failures == 1


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
