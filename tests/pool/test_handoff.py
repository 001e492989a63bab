"""The batch channel's far end (pool.handoff): a batch reaches exactly one feeder, parked ones in turn, and the end
reaches every one; and through the pool, calls spread over several sessions."""

from __future__ import annotations

import threading

import anyio
import numpy as np
import pytest
from numpy.typing import NDArray

from embedpool import _native
from embedpool.model.null import NullSession
from embedpool.pool import BatchLimits, PoolConfig, running_pool
from embedpool.pool.handoff import END, Handoff, Mailbox
from embedpool.pool.scheduler import Batch


def _batch(tag: int) -> Batch:
    ids = np.full((1, 8), tag, dtype=np.int64)
    empty = np.empty(0, dtype=np.int64)
    return Batch(ids=ids, mask=np.ones_like(ids), jobs=[], sources=empty, documents=empty, real_tokens=8)


@pytest.mark.anyio
async def test_parked_feeders_get_batches_in_turn_then_the_end() -> None:
    send, receive = anyio.create_memory_object_stream[Batch](4)
    handoff = Handoff(receive)
    taken: list[Batch] = []

    def take(batch: Batch) -> Batch:
        taken.append(batch)
        return batch

    first, second = Mailbox(take), Mailbox(take)
    waiting = _batch(1)
    send.send_nowait(waiting)
    assert handoff.take_or_park(first) is waiting  # one was waiting: no park
    assert handoff.take_or_park(first) is None  # none now: parked
    assert handoff.take_or_park(second) is None
    for tag in (2, 3, 4):
        send.send_nowait(_batch(tag))
        handoff.sent()
    got = [first.get(0), second.get(0)]
    assert [int(b.ids[0, 0]) for b in got if isinstance(b, Batch)] == [2, 3]  # the one parked longest first
    assert first.get(0) is None and second.get(0) is None  # one item each, no more
    assert taken[1:] == got  # each handed over through `take`, on the loop
    assert int(receive.receive_nowait().ids[0, 0]) == 4  # nobody parked: it stays in the channel

    assert handoff.take_or_park(first) is None
    assert handoff.unpark(first)  # a feeder that stops waiting (out of rotation, a probe due) leaves the queue
    assert not handoff.unpark(first)
    send.send_nowait(_batch(5))
    handoff.sent()
    assert first.get(0) is None  # it was not parked any more: the batch waits for whoever asks
    assert handoff.take_or_park(second) is not None

    assert handoff.take_or_park(first) is None
    assert handoff.take_or_park(second) is None
    send.close()
    handoff.sent()  # closed and drained: every parked feeder is told to end
    assert first.get(0) is END and second.get(0) is END
    assert handoff.take_or_park(first) is END
    handoff.close()


@pytest.mark.anyio
async def test_a_batch_handed_over_as_the_wait_ends_is_not_lost() -> None:
    """The race `Feeder._next` covers: its wait timed out, but the batch was put before `unpark` ran."""
    send, receive = anyio.create_memory_object_stream[Batch](1)
    handoff = Handoff(receive)
    mailbox = Mailbox(lambda batch: batch)
    assert handoff.take_or_park(mailbox) is None
    assert mailbox.get(0.01) is None  # the thread's wait ends
    send.send_nowait(_batch(7))
    handoff.sent()  # ... and a batch is handed over before its unpark reaches the loop
    assert not handoff.unpark(mailbox)
    item = mailbox.get()
    assert isinstance(item, Batch) and int(item.ids[0, 0]) == 7
    send.close()
    handoff.close()


class _Recording(NullSession):
    def __init__(self, dim: int) -> None:
        super().__init__(dim, 256)
        self.threads: set[str] = set()
        self.batches = 0

    def embed(self, input_ids: NDArray[np.int64], attention_mask: NDArray[np.int64]) -> NDArray[np.float32]:
        self.threads.add(threading.current_thread().name)
        self.batches += 1
        return super().embed(input_ids, attention_mask)


@pytest.mark.anyio
async def test_calls_spread_over_every_session_and_each_gets_its_own_rows(tokenizer: _native.Tokenizer) -> None:
    sessions = [_Recording(384) for _ in range(3)]
    config = PoolConfig(
        dim=384,
        limits=BatchLimits(max_tokens=4096, max_size=4, pad_multiple=8, pad_id=0),
        max_concurrent_inputs=1024,
        tokenizer_threads=2,
        pipeline_depth=1,
    )
    texts = [f"document number {i}" for i in range(300)]
    async with running_pool(tokenizer, sessions, config) as pool:
        results: dict[int, int] = {}

        async def call(i: int) -> None:
            out = await pool.embed(texts[i : i + 3])
            results[i] = int(out.token_counts.sum())

        async with anyio.create_task_group() as tg:
            for i in range(0, 300, 3):
                tg.start_soon(call, i)
        assert pool.permits_in_use == 0
    expected = {i: int(np.diff(tokenizer.encode_ragged(texts[i : i + 3])[1]).sum()) for i in range(0, 300, 3)}
    assert results == expected
    assert all(s.batches > 0 for s in sessions)  # a batch goes to whichever feeder is free: all three were
    assert {name for s in sessions for name in s.threads} == {"feeder-0", "feeder-1", "feeder-2"}
