"""The tokenizing stage: calls waiting to be tokenized are encoded together, one worker-thread hop for many calls.

A call handed to a worker thread on its own pays the hop there and back on the event loop, which every call
shares: for calls of a few documents that costs as much loop time as tokenizing them there, so they were
tokenized on the loop, one at a time, and many small calls used one core. Here each of `threads` threads takes
the calls waiting (about `RUN_CHARS` characters), encodes their texts in one native call (the GIL released,
the texts split over rayon's threads), and cuts each call's tokens back out: under load the loop's share per
call is a send and a wake-up, and the tokenizing spreads over the cores.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

import anyio
import anyio.to_thread
import numpy as np
from anyio.lowlevel import EventLoopToken, current_token
from numpy.typing import NDArray

from embedpool.errors import InvalidArgument, Unavailable

RUN_CHARS: Final = 32 * 1024
"""A run takes waiting calls until it holds this many characters (a larger call runs alone): a call that arrives
while every worker is busy waits for a run, so a run is kept to a few milliseconds of one core's tokenizing."""

Tokens = tuple[NDArray[np.int64], NDArray[np.int64]]


class Tokenizer(Protocol):
    def encode_ragged(self, texts: Sequence[str], *, truncate: bool = True) -> Tokens: ...


@dataclass(eq=False)
class _Call:
    texts: Sequence[str]
    chars: int
    truncate: bool
    done: anyio.Event = field(default_factory=anyio.Event)
    tokens: Tokens | None = None
    error: Exception | None = None
    abandoned: bool = False


class TokenizeStage:
    """Calls wait in a bounded stream; `threads` dedicated threads encode them. Every method but `_serve` and
    `_encode*` runs on the event loop. A thread that finishes a run posts it back onto the loop in one callback,
    which takes the next run for it, or marks it idle; calls that arrive while a thread is idle are handed to it
    by the dispatcher task, at its next turn on the loop. (anyio's `to_thread.run_sync` costs about three times
    the CPU per hop, in a task, a cancel scope and a cross-thread future.)"""

    def __init__(self, tokenizer: Tokenizer, threads: int, capacity: int) -> None:
        """`capacity`: calls waiting at most; the pool admits no more calls than this, so a send never waits."""
        self._tokenizer = tokenizer
        self._threads = [
            threading.Thread(target=self._serve, name=f"tokenizer-{k}", daemon=True) for k in range(threads)
        ]
        self._send, self._receive = anyio.create_memory_object_stream[_Call](capacity)
        self._runs: queue.SimpleQueue[list[_Call] | None] = queue.SimpleQueue()
        self._idle = 0
        self._token: EventLoopToken | None = None
        # A call arriving at an idle thread kicks the dispatcher task rather than handing itself over: the task runs
        # after the callers woken in the same turn of the loop have sent theirs, so they share one run.
        self._kick, self._kicked = anyio.create_memory_object_stream[None](1)

    async def encode(self, texts: Sequence[str], chars: int, truncate: bool) -> Tokens:
        """`texts` tokenized with others waiting at the same time; ValueError from the tokenizer becomes
        InvalidArgument naming the document within this call."""
        call = _Call(texts, chars, truncate)
        try:
            self._send.send_nowait(call)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError) as exc:
            raise Unavailable("the server is shutting down") from exc
        if self._idle:
            with contextlib.suppress(anyio.WouldBlock):  # already kicked
                self._kick.send_nowait(None)
        try:
            await call.done.wait()
        finally:
            call.abandoned = not call.done.is_set()  # cancelled: a thread that has not started it skips it
        if call.error is not None:
            raise call.error
        assert call.tokens is not None
        return call.tokens

    async def run(self) -> None:
        """The threads, until cancelled; calls still waiting then are answered Unavailable."""
        self._token = current_token()
        for thread in self._threads:
            thread.start()
        self._idle = len(self._threads)
        try:
            self._dispatch()
            async for _ in self._kicked:
                self._dispatch()
        finally:
            self._kick.close()
            self._kicked.close()
            self._send.close()
            while (run := self._next_run()) is not None:
                for call in run:
                    call.error = Unavailable("the server is shutting down")
                    call.done.set()
            self._receive.close()
            for _ in self._threads:
                self._runs.put(None)
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._join)

    def _join(self) -> None:
        for thread in self._threads:
            thread.join()

    def _dispatch(self) -> None:
        """Idle threads get the calls waiting."""
        while self._idle and (run := self._next_run()) is not None:
            self._idle -= 1
            self._runs.put(run)

    def _next_run(self) -> list[_Call] | None:
        """Every call waiting, until the run holds RUN_CHARS characters; None when none is waiting."""
        calls: list[_Call] = []
        chars = 0
        while chars < RUN_CHARS:
            try:
                call = self._receive.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
            calls.append(call)
            chars += call.chars
        return calls or None

    def _finished(self, calls: list[_Call]) -> None:
        """Posted by a thread that encoded `calls`: they are answered, and the thread takes the next run."""
        for call in calls:
            call.done.set()
        run = self._next_run()
        if run is None:
            self._idle += 1
        else:
            self._runs.put(run)

    def _serve(self) -> None:
        """A tokenizing thread."""
        token = self._token
        assert token is not None
        while (calls := self._runs.get()) is not None:
            self._encode(calls)
            # (`run_sync_soon` is the backend call anyio's own from_thread helpers post with, as pool.feeder's.)
            token.backend_class.run_sync_soon(self._finished, (calls,), token.native_token)

    def _encode(self, calls: list[_Call]) -> None:
        """On a worker thread: every live call's tokens, one native call per truncation setting."""
        live = [call for call in calls if not call.abandoned]
        for truncate in (True, False):
            group = [call for call in live if call.truncate is truncate]
            if len(group) == 1:
                self._encode_alone(group[0])
            elif group:
                self._encode_together(group, truncate)

    def _encode_together(self, calls: list[_Call], truncate: bool) -> None:
        texts: list[str] = []
        for call in calls:
            texts.extend(call.texts)
        try:
            ids, offsets = self._tokenizer.encode_ragged(texts, truncate=truncate)
        except Exception:
            # A message names a document of the whole run: each call again alone, to name its own.
            for call in calls:
                self._encode_alone(call)
            return
        start = 0
        for call in calls:
            end = start + len(call.texts)
            first, last = offsets[start], offsets[end]
            call.tokens = ids[first:last], offsets[start : end + 1] - first
            start = end

    def _encode_alone(self, call: _Call) -> None:
        try:
            call.tokens = self._tokenizer.encode_ragged(call.texts, truncate=call.truncate)
        except ValueError as exc:  # the extension's NativeError family: bad input, message names the document
            call.error = InvalidArgument(str(exc))
        except Exception as exc:  # raised to the caller that waits for it, as from its own thread
            call.error = exc
