"""The tokenizing stage (pool.tokenizing) with the real tokenizer: calls encoded together get what each would get
alone, a bad text fails only its own call, and waiting calls are answered when the stage stops."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedpool import _native
from embedpool.errors import InvalidArgument, Unavailable
from embedpool.pool.tokenizing import RUN_CHARS, TokenizeStage, Tokens

pytestmark = pytest.mark.anyio

WORDS = ["the", "pool", "tokenizes", "many", "small", "calls", "at", "once", "über", "naïve", "日本", "🙂"]


class Counting:
    """The real tokenizer, counting its native calls and the texts of each."""

    def __init__(self, tokenizer: _native.Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.runs: list[int] = []

    def encode_ragged(self, texts: Sequence[str], *, truncate: bool = True) -> Tokens:
        self.runs.append(len(texts))
        return self.tokenizer.encode_ragged(texts, truncate=truncate)


async def encode_all(stage: TokenizeStage, calls: list[tuple[list[str], bool]]) -> list[Tokens | Exception]:
    """Every call sent at once while the stage runs; each call's tokens or error, in order."""
    out: list[Tokens | Exception] = [ValueError("not answered")] * len(calls)

    async def one(k: int, texts: list[str], truncate: bool) -> None:
        try:
            out[k] = await stage.encode(texts, sum(map(len, texts)), truncate)
        except (InvalidArgument, Unavailable) as exc:
            out[k] = exc

    async with anyio.create_task_group() as tg:
        tg.start_soon(stage.run)
        async with anyio.create_task_group() as callers:
            for k, (texts, truncate) in enumerate(calls):
                callers.start_soon(one, k, texts, truncate)
        tg.cancel_scope.cancel()
    return out


def assert_same(got: Tokens | Exception, want: Tokens) -> None:
    assert not isinstance(got, Exception), got
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert got[1][0] == 0 and got[1][-1] == len(got[0])


texts_st = st.lists(st.lists(st.sampled_from(WORDS), min_size=0, max_size=40).map(" ".join), min_size=1, max_size=6)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(calls=st.lists(st.tuples(texts_st, st.booleans()), min_size=1, max_size=24), threads=st.integers(1, 3))
async def test_calls_encoded_together_get_what_each_gets_alone(
    tokenizer: _native.Tokenizer, calls: list[tuple[list[str], bool]], threads: int
) -> None:
    stage = TokenizeStage(tokenizer, threads, capacity=len(calls))
    got = await encode_all(stage, calls)
    for (texts, truncate), tokens in zip(calls, got, strict=True):
        assert_same(tokens, tokenizer.encode_ragged(texts, truncate=truncate))


async def test_many_waiting_calls_share_a_few_native_calls(tokenizer: _native.Tokenizer) -> None:
    counting = Counting(tokenizer)
    calls = [([f"call {k} of many small ones", "a second text"], True) for k in range(64)]
    got = await encode_all(TokenizeStage(counting, 1, capacity=64), calls)
    for (texts, _), tokens in zip(calls, got, strict=True):
        assert_same(tokens, tokenizer.encode_ragged(texts))
    assert sum(counting.runs) == 128
    assert len(counting.runs) <= 4, counting.runs  # one hop for all but the first few, not one per call


async def test_a_run_stops_at_its_character_budget(tokenizer: _native.Tokenizer) -> None:
    counting = Counting(tokenizer)
    text = "abc " * (RUN_CHARS // 16)  # four of them fill a run
    calls = [([text], True) for _ in range(12)]
    got = await encode_all(TokenizeStage(counting, 1, capacity=12), calls)
    for tokens in got:
        assert_same(tokens, tokenizer.encode_ragged([text]))
    assert max(counting.runs) <= 4 and len(counting.runs) >= 3, counting.runs


async def test_a_bad_text_fails_only_its_own_call_and_names_its_own_document(tokenizer: _native.Tokenizer) -> None:
    calls = [(["fine", "also fine"], True) for _ in range(8)]
    calls[3] = (["fine", "fine", "\ud800 not unicode"], True)  # a lone surrogate: not valid UTF-8
    calls[5] = (["short", "word " * 600], False)  # too long, and not to be truncated
    got = await encode_all(TokenizeStage(tokenizer, 1, capacity=8), calls)
    assert isinstance(got[3], InvalidArgument) and "text 2 " in str(got[3]), got[3]
    assert isinstance(got[5], InvalidArgument) and "text 1 " in str(got[5]), got[5]
    for k in (0, 1, 2, 4, 6, 7):
        assert_same(got[k], tokenizer.encode_ragged(calls[k][0]))


async def test_calls_waiting_when_the_stage_stops_are_answered_unavailable(tokenizer: _native.Tokenizer) -> None:
    stage = TokenizeStage(tokenizer, 0, capacity=4)  # no workers: the calls wait until the stage stops
    errors: list[Exception] = []

    async def call() -> None:
        try:
            await stage.encode(["never tokenized"], 15, True)
        except Unavailable as exc:
            errors.append(exc)

    async with anyio.create_task_group() as callers:
        for _ in range(3):
            callers.start_soon(call)
        async with anyio.create_task_group() as running:
            running.start_soon(stage.run)
            await anyio.wait_all_tasks_blocked()
            running.cancel_scope.cancel()
    assert len(errors) == 3
    with pytest.raises(Unavailable):  # and a call after it stopped
        await stage.encode(["late"], 4, True)


async def test_a_cancelled_call_is_skipped_and_the_others_are_answered(tokenizer: _native.Tokenizer) -> None:
    counting = Counting(tokenizer)
    stage = TokenizeStage(counting, 1, capacity=8)
    got: list[Tokens] = []

    async def call(texts: list[str]) -> None:
        got.append(await stage.encode(texts, sum(map(len, texts)), True))

    async with anyio.create_task_group() as tg:
        with anyio.CancelScope() as gone:
            gone.cancel()  # cancelled before any worker ran: it waits at its first checkpoint and leaves
            await stage.encode(["abandoned " * 10], 100, True)
        tg.start_soon(stage.run)
        await call(["kept"])
        tg.cancel_scope.cancel()
    assert_same(got[0], tokenizer.encode_ragged(["kept"]))
    assert counting.runs == [1], counting.runs  # the abandoned call's text was never encoded
