"""Load generators. Closed loop: `concurrency` callers, each sending its next request when the last one is
answered. Open loop: requests sent at scheduled times whatever happens to the earlier ones, latency counted from
the scheduled time, so a server that falls behind shows its queueing (no coordinated omission)."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Literal

import anyio

from embedpool.benchmark.stats import Sample
from embedpool.benchmark.target import Target
from embedpool.benchmark.workload import Request

__all__ = ["Arrivals", "arrival_times", "closed_loop", "open_loop"]

Arrivals = Literal["poisson", "uniform"]
OnSample = Callable[[Sample], None]


async def _send(target: Target, request: Request, scheduled: float, record: OnSample) -> None:
    sent = anyio.current_time()
    docs, error = await target.embed(request.texts)
    record(Sample(scheduled, sent, anyio.current_time(), docs, request.tokens if error is None else 0, error))


async def closed_loop(
    target: Target,
    requests: list[Request],
    concurrency: int,
    record: OnSample,
    *,
    until: float | None = None,
    repeat: bool = False,
) -> None:
    """Each request once (every request again and again when `repeat`), `concurrency` at a time; no request is
    started after the loop time `until`."""
    order: Iterator[int] = itertools.cycle(range(len(requests))) if repeat else iter(range(len(requests)))

    async def caller() -> None:
        for i in order:  # shared by the callers: each request goes to one of them
            now = anyio.current_time()
            if until is not None and now >= until:
                return
            await _send(target, requests[i], now, record)

    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(caller)


def arrival_times(rate: float, arrivals: Arrivals, seed: int = 0) -> Iterator[float]:
    """Offsets from the start, in seconds, of requests arriving at `rate` per second: exponential gaps (a Poisson
    process, as independent callers make) or equal ones."""
    rng = random.Random(seed)
    t = 0.0
    while True:
        yield t
        t += rng.expovariate(rate) if arrivals == "poisson" else 1.0 / rate


async def open_loop(
    target: Target,
    requests: list[Request],
    rate: float,
    arrivals: Arrivals,
    record: OnSample,
    *,
    until: float | None = None,
) -> None:
    """Each request once, at its arrival time; none is scheduled after the loop time `until`."""
    start = anyio.current_time()
    schedule: Iterable[tuple[Request, float]] = zip(requests, arrival_times(rate, arrivals), strict=False)
    async with anyio.create_task_group() as tg:
        for request, offset in schedule:
            due = start + offset
            if until is not None and due >= until:
                break
            await anyio.sleep_until(due)
            tg.start_soon(_send, target, request, due, record)
