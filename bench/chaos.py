"""Reliability campaign (issue 9): a real `embedpool serve` process under overload, database crashes, SIGTERM and
hostile input.

    python bench/chaos.py [--quick] [--scenario overload|db_faults|shutdown|malformed ...] [--out DIR]

Each scenario starts its own server (temp EMBEDPOOL_DATA_DIR, free port, the real model, the embedded Postgres):
- overload: 10x the admitted capacity (--capacity = the server's --max-concurrent-inputs) for --seconds, Embed
  calls of 1..1000 documents (log-uniform) from client processes with many concurrent calls each. Reports
  crashes/hangs, peak RSS against a bound derived from the settings, RESOURCE_EXHAUSTED latency, counts by
  status, and how long a short Embed takes to succeed once the load stops.
- db_faults: an Ingest of --documents documents (10% of ids sent twice, the later version later in the stream)
  by a client that resends un-acknowledged batches on a new stream after a retryable status, while the embedded
  Postgres postmaster is SIGKILLed --kills times. Then, read from Postgres directly: one row per id, each the
  last version sent, none lost.
- shutdown: SIGTERM while Embed/Search calls and Ingest streams are in flight: how each call ends and when, then
  a second server on the same data dir: it starts, answers, and holds every acknowledged document.
- malformed: --requests hostile requests (hypothesis-built messages, hand-encoded wire bytes, random and
  mutated bytes, oversized messages; see bench/_chaos_fuzz.py) to every Embedder RPC, Ingest included:
  no INTERNAL/UNKNOWN, the server alive, RSS back within 10% of its start after a settle period.

Prints one row per scenario with PASS/FAIL per target; writes DIR/chaos.json; exits 1 when a target fails.
Correctness targets are asserted by tests/test_chaos.py too; timing targets only here.
"""

from __future__ import annotations

import os
import sys

# Run as a script, this folder comes first on sys.path and bench/tokenize.py would shadow the stdlib
# `tokenize`; keep the folder, but last, for `corpus` and the _chaos_* helpers.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

import argparse
import asyncio
import collections
import functools
import json
import math
import multiprocessing
import platform
import random
import signal
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np
from _chaos_server import (
    READABLE_LOG_LEVELS,
    RETRYABLE,
    SERVICE,
    RssSampler,
    ServerProcess,
    settle_rss,
    wait_until,
)
from corpus import passages

from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc

EMBED = f"/{SERVICE.full_name}/Embed"
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 1 << 28), ("grpc.max_send_message_length", 1 << 28)]
_RETRYABLE_NAMES = sorted(code.name for code in RETRYABLE)


@dataclass
class Check:
    name: str
    value: Any
    target: str
    passed: bool
    kind: str = "correctness"  # "timing" and "memory" targets are reported here, never asserted by tests


@dataclass
class Result:
    scenario: str
    figures: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0

    def check(self, name: str, value: Any, target: str, passed: bool, *, kind: str = "correctness") -> None:
        self.checks.append(Check(name, value, target, bool(passed), kind))

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failed(self, kind: str | None = None) -> list[Check]:
        return [c for c in self.checks if not c.passed and kind in (None, c.kind)]


def quantiles_ms(values: list[float], qs: tuple[float, ...] = (0.5, 0.99)) -> list[float | None]:
    if not values:
        return [None for _ in qs]
    return [round(float(v) * 1000, 2) for v in np.quantile(values, qs)]


def mib(n: float | None) -> float | None:
    return None if n is None else round(n / (1 << 20), 1)


@functools.cache
def texts(n: int = 4000) -> list[str]:
    """Real passages (standard-library docstrings), 8..200 words: most fit the model's 256 tokens."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # corpus.py (a verbatim shared copy) leaves files to the GC
        return passages(n)


def _channel(target: str, *, own_connection: bool = False) -> grpc.aio.Channel:
    options = list(_CHANNEL_OPTIONS)
    if own_connection:  # channels with the same target and options share one connection otherwise
        options.append(("grpc.use_local_subchannel_pool", 1))
    return grpc.aio.insecure_channel(target, options=options)


# ================================================================ overload


def _request_pool(corpus: list[str], count: int, seed: int) -> tuple[list[bytes], list[int]]:
    """`count` pre-serialized Embed requests of 1..1000 documents, log-uniform (many small, some huge)."""
    rng = random.Random(seed)
    payloads, sizes = [], []
    for _ in range(count):
        n = min(1000, max(1, round(math.exp(rng.uniform(0, math.log(1000))))))
        docs = [pb.Document(text=rng.choice(corpus)) for _ in range(n)]
        payloads.append(pb.EmbedRequest(documents=docs).SerializeToString())
        sizes.append(n)
    return payloads, sizes


def _overload_worker(
    target: str, payloads: list[bytes], sizes: list[int], end_at: float, clients: int, seed: int, call_timeout: float
) -> dict[str, Any]:
    """One load process: `clients` concurrent callers sending Embed back to back until `end_at` (time.time()),
    then cancelling what they have in flight (the load stops at once, as when clients go away)."""
    codes: collections.Counter[str] = collections.Counter()
    rejected_s: list[float] = []
    ok_s: list[float] = []
    ok_docs = 0
    hangs = 0

    async def run() -> int:
        nonlocal ok_docs, hangs
        channels = [_channel(target, own_connection=True) for _ in range(4)]
        methods = [ch.unary_unary(EMBED) for ch in channels]  # bytes in, bytes out: no client-side (de)serializing
        rng = random.Random(seed)

        async def client(k: int) -> None:
            nonlocal ok_docs, hangs
            method = methods[k % len(methods)]
            while time.time() < end_at:
                i = rng.randrange(len(payloads))
                started = time.perf_counter()
                try:
                    await method(payloads[i], timeout=call_timeout)
                    code = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as e:
                    code = e.code()
                elapsed = time.perf_counter() - started
                codes[code.name] += 1
                if code == grpc.StatusCode.OK:
                    ok_s.append(elapsed)
                    ok_docs += sizes[i]
                elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    rejected_s.append(elapsed)
                elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    hangs += 1

        tasks = [asyncio.create_task(client(k)) for k in range(clients)]
        await asyncio.sleep(max(0.0, end_at - time.time()))
        in_flight = sum(not t.done() for t in tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ch in channels:
            await ch.close()
        return in_flight

    cancelled_at_end = asyncio.run(run())
    return {
        "codes": dict(codes),
        "rejected_s": rejected_s,
        "ok_s": ok_s,
        "ok_docs": ok_docs,
        "hangs": hangs,
        "cancelled_at_end": cancelled_at_end,
    }


async def _first_success_after(target: str, when: float, timeout: float = 30.0) -> tuple[float | None, int]:
    """From wall-clock `when` on, a one-document Embed again and again until one succeeds: seconds from `when` to
    that success, and the number of attempts."""
    request = pb.EmbedRequest(documents=[pb.Document(text="a short query about python generators")])
    async with _channel(target) as ch:
        stub = pb_grpc.EmbedderStub(ch)
        await ch.channel_ready()
        await asyncio.sleep(max(0.0, when - time.time()))
        started = time.perf_counter()
        attempts = 0
        while time.perf_counter() - started < timeout:
            attempts += 1
            try:
                await stub.Embed(request, timeout=timeout)
            except grpc.aio.AioRpcError as e:
                if e.code() not in RETRYABLE:
                    raise
                await asyncio.sleep(0.001)
                continue
            return time.perf_counter() - started, attempts
    return None, attempts


def _warm_up(target: str, corpus: list[str], capacity: int) -> float:
    """Every batch shape the load will produce, once, so that the start RSS holds the engine's arena at its size.
    Returns the documents per second of the last (typical) request: the unloaded server's throughput."""
    longest = sorted(corpus, key=len)[-capacity:]
    with grpc.insecure_channel(target, options=_CHANNEL_OPTIONS) as ch:
        stub = pb_grpc.EmbedderStub(ch)
        for chunk in (longest, random.Random(1).sample(corpus, capacity)):
            started = time.perf_counter()
            stub.Embed(pb.EmbedRequest(documents=[pb.Document(text=t) for t in chunk]), timeout=300)
    return capacity / (time.perf_counter() - started)


def rss_bound(
    start_rss: int,
    *,
    capacity: int,
    concurrent_calls: int,
    largest_request: int,
    max_tokens: int,
    dim: int,
    batch_tokens: int,
    pipeline_batches: int,
) -> tuple[int, str, dict[str, int]]:
    """Peak RSS the settings allow, above the warmed-up start (model, ORT arena at the largest batch shape,
    Python, grpc). Every call the server has read holds its request (wire bytes, the parsed message, the texts as
    Python strings: counted as 3 copies) whether it is admitted or refused; admitted documents add their token
    ids (int64) and their vector (float32: the engine's output, the packed bytes, the reply); batches cut ahead
    hold ids, mask and type ids (int64). Allocator fragmentation and grpc's transport buffers are not counted."""
    terms = {
        "start_rss": start_rss,
        "requests_read": concurrent_calls * largest_request * 3,
        "admitted_documents": capacity * (max_tokens * 8 + dim * 4 * 3),
        "batches_cut_ahead": pipeline_batches * batch_tokens * 3 * 8,
    }
    formula = (
        "start_rss + calls*largest_request*3 + max_concurrent_inputs*(max_tokens*8 + dim*4*3)"
        " + pipeline_batches*max_batch_tokens*24"
    )
    return sum(terms.values()), formula, terms


def overload(
    server: ServerProcess, *, seconds: float, capacity: int, processes: int = 2, factor: float = 10.0, seed: int = 0
) -> Result:
    result = Result("overload")
    since = len(server.errors)
    corpus = texts()
    payloads, sizes = _request_pool(corpus, 120, seed)
    mean_docs = statistics.mean(sizes)
    # Enough callers that the documents they keep in flight are `factor` times what the server admits.
    clients = max(8 * processes, math.ceil(factor * capacity / mean_docs))
    idle_docs_per_s = _warm_up(server.target, corpus, capacity)
    start_rss = settle_rss(server, 2.0)
    server.reset_peak_rss()
    info = _model_info(server.target)
    end_at = time.time() + seconds + 1.0  # the workers need a moment to start
    per_proc = [clients // processes + (k < clients % processes) for k in range(processes)]
    context = multiprocessing.get_context("spawn")
    with RssSampler(server.pid) as sampler, ProcessPoolExecutor(processes, mp_context=context) as executor:
        futures = [
            executor.submit(_overload_worker, server.target, payloads, sizes, end_at, n, seed + k, 120.0)
            for k, n in enumerate(per_proc)
        ]
        recovery_s, attempts = asyncio.run(_first_success_after(server.target, end_at))
        parts = [f.result() for f in futures]
    codes: collections.Counter[str] = collections.Counter()
    for part in parts:
        codes.update(part["codes"])
    rejected = [x for p in parts for x in p["rejected_s"]]
    ok = [x for p in parts for x in p["ok_s"]]
    hangs = sum(p["hangs"] for p in parts)
    alive = server.answers()
    kernel_peak = server.peak_rss()
    peak = max(sampler.peak, kernel_peak or 0)
    resolved = _resolved_limits(server)
    bound, formula, terms = rss_bound(
        start_rss,
        capacity=capacity,
        concurrent_calls=clients,
        largest_request=max(map(len, payloads)),
        max_tokens=info.max_tokens,
        dim=info.dim,
        batch_tokens=resolved["max_batch_tokens"],
        pipeline_batches=resolved["pipeline_batches"],
    )
    rej_p50, rej_p99 = quantiles_ms(rejected)
    ok_p50, ok_p99 = quantiles_ms(ok)
    never_admissible = sum(n > capacity for n in sizes) / len(sizes)
    result.figures.update(
        seconds=seconds,
        capacity=capacity,
        clients=clients,
        client_processes=processes,
        offered_documents_in_flight=round(clients * mean_docs),
        request_sizes={"min": min(sizes), "mean": round(mean_docs, 1), "max": max(sizes)},
        share_of_requests_over_capacity=round(never_admissible, 3),
        codes=dict(codes),
        idle_docs_per_s=round(idle_docs_per_s, 1),
        ok_docs_per_s=round(sum(p["ok_docs"] for p in parts) / seconds, 1),
        ok_latency_ms={"p50": ok_p50, "p99": ok_p99},
        rejection_latency_ms={"p50": rej_p50, "p99": rej_p99, "n": len(rejected)},
        recovery_ms=None if recovery_s is None else round(recovery_s * 1000, 1),
        recovery_attempts=attempts,
        calls_cancelled_at_end=sum(p["cancelled_at_end"] for p in parts),
        start_rss_mib=mib(start_rss),
        peak_rss_mib=mib(peak),
        peak_rss_sampled_mib=mib(sampler.peak),
        peak_rss_kernel_mib=mib(kernel_peak),
        rss_bound_mib=mib(bound),
        rss_bound_formula=formula,
        rss_bound_terms_mib={k: mib(v) for k, v in terms.items()},
        server_log_lines=server.log_lines,
    )
    result.check("server alive and answering", alive, "true", alive)
    result.check("calls hung (client deadline 120 s)", hangs, "0", hangs == 0)
    bad = sum(codes[c] for c in ("INTERNAL", "UNKNOWN"))
    result.check("INTERNAL/UNKNOWN", bad, "0", bad == 0)
    result.check("peak RSS (MiB) vs bound", f"{mib(peak)} / {mib(bound)}", "<= bound", peak <= bound, kind="memory")
    _check_server_log(result, server, since)
    result.check("rejection p99 (ms)", rej_p99, "<= 50", rej_p99 is not None and rej_p99 <= 50, kind="timing")
    result.check(
        "recovery (ms)",
        result.figures["recovery_ms"],
        "<= 50",
        recovery_s is not None and recovery_s <= 0.050,
        kind="timing",
    )
    return result


def call_retrying(call: Callable[[pb_grpc.EmbedderStub], Any], target: str, timeout: float = 120.0) -> Any:
    """A set-up call, retried on a retryable status (the database may be restarting) until `timeout`."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target, options=_CHANNEL_OPTIONS) as ch:
        stub = pb_grpc.EmbedderStub(ch)
        while True:
            try:
                return call(stub)
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE or time.monotonic() > deadline:  # type: ignore[attr-defined]
                    raise
                time.sleep(0.2)


def _check_server_log(result: Result, server: ServerProcess, since: int) -> None:
    """The client may not see an INTERNAL the server answered (e.g. on a stream it already dropped); its log does."""
    errors = server.errors[since:]
    result.figures["server_errors_logged"] = [line.rstrip()[:3000] for line in errors[:10]]
    result.check("server-side errors/INTERNAL logged", len(errors), "0", not errors)


def _model_info(target: str) -> pb.ModelInfo:
    with grpc.insecure_channel(target) as ch:
        info: pb.ModelInfo = pb_grpc.EmbedderStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
        return info


def _resolved_limits(server: ServerProcess) -> dict[str, int]:
    """The batch limits the server resolved (its flags, else the device defaults of embedpool.config)."""
    from embedpool.config import Settings
    from embedpool.pool import PoolConfig

    flags = server.flags
    settings = Settings(
        max_batch_tokens=int(str(flags.get("max_batch_tokens", 0))),
        sessions_per_device=int(str(flags.get("sessions_per_device", 1))),
    ).resolved(cuda=False)
    depth = PoolConfig.__dataclass_fields__["pipeline_depth"].default
    return {"max_batch_tokens": settings.max_batch_tokens, "pipeline_batches": depth * settings.sessions_per_device}


# ================================================================ database faults


@dataclass
class _Stream:
    """The retrying Ingest client's record."""

    acked: int = 0  # batches acknowledged, a prefix of the plan
    streams: int = 0
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    stalls: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    progress: asyncio.Condition = field(default_factory=asyncio.Condition)
    acked_ids: set[str] = field(default_factory=set)


def ingest_plan(
    corpus: list[str], documents: int, batch_size: int, seed: int
) -> tuple[list[pb.IngestRequest], dict[str, str]]:
    """Batches of `documents` distinct ids, 10% of them sent a second time with other text, later in the stream
    (a few in the same batch, most 1..5 batches later); and id -> the text sent last."""
    rng = random.Random(seed)
    stream: list[tuple[str, str]] = [(f"doc-{i:06d}", rng.choice(corpus) + f" [v1 {i}]") for i in range(documents)]
    twice = sorted(rng.sample(range(documents), documents // 10))
    for i in reversed(twice):  # from the back, so the positions computed for earlier ones stay right
        later = min(len(stream), i + 1 + rng.choice([0, 1, 5, batch_size, 2 * batch_size, 5 * batch_size]))
        stream.insert(later, (f"doc-{i:06d}", rng.choice(corpus) + f" [v2 {i}]"))
    last = dict(stream)
    batches = [
        pb.IngestRequest(
            collection="", batch_id=k + 1, documents=[pb.Document(id=i, text=t) for i, t in stream[s : s + batch_size]]
        )
        for k, s in enumerate(range(0, len(stream), batch_size))
    ]
    return batches, last


async def retrying_ingest(
    target: str,
    collection: str,
    batches: list[pb.IngestRequest],
    state: _Stream,
    *,
    window: int = 8,
    stall_s: float = 120.0,
    give_up_s: float = 900.0,
) -> None:
    """Sends `batches` in order, at most `window` ahead of the acknowledgements; after any failure opens a new
    stream (backoff with jitter) and resends from the first unacknowledged batch. Acks must come in order."""
    rng = random.Random(7)
    started = time.monotonic()
    backoff = 0.1
    async with _channel(target) as ch:
        stub = pb_grpc.EmbedderStub(ch)
        while state.acked < len(batches):
            if time.monotonic() - started > give_up_s:
                state.failures["GAVE_UP"] += 1
                break
            state.streams += 1
            first = state.acked
            call = stub.Ingest()

            async def write(first: int = first, call: Any = call) -> None:
                for k in range(first, len(batches)):
                    async with state.progress:
                        await state.progress.wait_for(lambda k=k: k - state.acked < window)
                    request = pb.IngestRequest()
                    request.CopyFrom(batches[k])
                    request.collection = collection  # every message names it: a resend may open a stream
                    await call.write(request)
                await call.done_writing()

            writer = asyncio.create_task(write())
            acked_before = state.acked
            try:
                while state.acked < len(batches):
                    ack = await asyncio.wait_for(call.read(), stall_s)
                    if ack is grpc.aio.EOF:
                        code = await call.code()
                        state.failures["EOF_" + code.name] += 1
                        break
                    expected = batches[state.acked]
                    if ack.batch_id != expected.batch_id:
                        state.failures["OUT_OF_ORDER"] += 1
                        break
                    if ack.rejected:
                        state.failures["REJECTED_DOCS"] += len(ack.rejected)
                    state.acked_ids.update(ack.ids)
                    async with state.progress:
                        state.acked += 1
                        state.progress.notify_all()
                    backoff = 0.1
            except grpc.aio.AioRpcError as e:
                state.failures[e.code().name] += 1
            except TimeoutError:
                state.stalls += 1
                state.failures["STALLED"] += 1
            finally:
                call.cancel()
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
            if state.acked < len(batches):
                if state.acked == acked_before:
                    backoff = min(2.0, backoff * 2)
                await asyncio.sleep(backoff * rng.uniform(0.5, 1.5))
    state.done.set()


async def _kill_postmasters(
    server: ServerProcess, state: _Stream, total: int, kills: int, seed: int, record: list[dict[str, Any]]
) -> None:
    """SIGKILLs the postmaster `kills` times, each at a random point of the ingest's progress (plus a random
    0..300 ms), and only a postmaster that is up: it waits for the server to have restarted the previous one."""
    rng = random.Random(seed)
    points = sorted(rng.sample(range(1, max(2, total)), min(kills, max(1, total - 1))))
    points += [total - 1] * (kills - len(points))
    for n, point in enumerate(points):
        async with state.progress:
            await state.progress.wait_for(lambda point=point: state.acked >= point or state.done.is_set())
        await asyncio.sleep(rng.uniform(0, 0.3))
        waited = time.monotonic()
        pid = None
        while time.monotonic() - waited < 120:
            pid = server.postmaster_pid()
            if pid is not None and all(pid != r["pid"] for r in record):
                break
            pid = None
            await asyncio.sleep(0.05)
        if pid is None:
            record.append({"n": n, "pid": None, "error": "no restarted postmaster within 120 s"})
            return
        os.kill(pid, signal.SIGKILL)
        record.append(
            {"n": n, "pid": pid, "at_batch": state.acked, "waited_for_restart_s": round(time.monotonic() - waited, 2)}
        )


def db_faults(
    server: ServerProcess,
    *,
    documents: int,
    kills: int,
    batch_size: int = 100,
    seed: int = 0,
    collection: str = "chaos_db",
) -> Result:
    result = Result("db_faults")
    since = len(server.errors)
    corpus = texts()
    batches, last = ingest_plan(corpus, documents, batch_size, seed)
    call_retrying(
        lambda stub: stub.CreateCollection(pb.CreateCollectionRequest(name=collection), timeout=60), server.target
    )
    killed: list[dict[str, Any]] = []

    async def run() -> _Stream:
        state = _Stream()
        killer = asyncio.create_task(_kill_postmasters(server, state, len(batches), kills, seed, killed))
        await retrying_ingest(server.target, collection, batches, state)
        await killer
        return state

    started = time.monotonic()
    state = asyncio.run(run())
    elapsed = time.monotonic() - started
    # The last kill may land after the last ack: wait for the server to have its database back before reading.
    back = wait_until(lambda: server.postmaster_pid() is not None, 120)
    served_count = None
    if back:
        try:
            get = pb.GetCollectionRequest(name=collection)
            served_count = call_retrying(lambda stub: stub.GetCollection(get, timeout=30), server.target).count
        except grpc.RpcError:
            back = False
    rows: dict[str, str] = {}
    duplicates = -1
    if back:
        rows, duplicates = _read_rows(server, collection)
    lost = sorted(set(last) - set(rows))
    stale = sorted(i for i in set(last) & set(rows) if rows[i] != last[i])
    extra = sorted(set(rows) - set(last))
    alive = server.answers()
    restarts = len(server.logged("embedded Postgres in"))
    failed_restarts = len(server.logged("restarting the embedded Postgres failed"))
    twice = sum(1 for i in last if "[v2 " in last[i])
    result.figures.update(
        documents=documents,
        ids_sent_twice=twice,
        batches=len(batches),
        batch_size=batch_size,
        seconds=round(elapsed, 1),
        docs_per_s=round(sum(len(b.documents) for b in batches) / elapsed, 1),
        kills=len([k for k in killed if k.get("pid")]),
        kill_log=killed,
        streams_opened=state.streams,
        stream_failures=dict(state.failures),
        server_restarted_postgres=restarts,
        server_restart_failures_logged=failed_restarts,
        rows=len(rows),
        count_served_by_get_collection=served_count,
        lost=len(lost),
        lost_sample=lost[:10],
        stale=len(stale),
        stale_sample=[(i, rows[i][-20:], last[i][-20:]) for i in stale[:5]],
        unexpected_ids=len(extra),
    )
    result.check(
        "postmaster SIGKILLs",
        len([k for k in killed if k.get("pid")]),
        f"{kills}",
        len([k for k in killed if k.get("pid")]) == kills,
    )
    result.check("all batches acknowledged", f"{state.acked}/{len(batches)}", "all", state.acked == len(batches))
    result.check("database back after the last kill", back, "true", back)
    result.check("lost documents", len(lost), "0", back and not lost)
    result.check("ids with >1 row", duplicates, "0", duplicates == 0)
    result.check("rows not the last version sent", len(stale), "0", back and not stale)
    bad = sum(state.failures[c] for c in ("INTERNAL", "UNKNOWN", "EOF_INTERNAL", "EOF_UNKNOWN", "OUT_OF_ORDER"))
    result.check("INTERNAL/UNKNOWN/out-of-order on the stream", bad, "0", bad == 0)
    result.check("server alive and answering", alive, "true", alive)
    _check_server_log(result, server, since)
    return result


def _read_rows(server: ServerProcess, collection: str) -> tuple[dict[str, str], int]:
    """Rows read from Postgres directly; retried for a while, since the server may still be recovering it."""
    import psycopg

    deadline = time.monotonic() + 60
    while True:
        try:
            return server.rows(collection), server.duplicate_ids(collection)
        except (psycopg.OperationalError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


# ================================================================ shutdown


@dataclass
class _Call:
    kind: str
    started: float
    ended: float = math.nan
    code: str = ""


async def _shutdown_load(
    server: ServerProcess, collection: str, corpus: list[str], sigterm_after: float, unary_clients: int, streams: int
) -> tuple[list[_Call], set[str], float, float]:
    """Embed (storing and not), Search and Ingest traffic; SIGTERM `sigterm_after` seconds after the first
    acknowledgement; every caller
    stops once the process has exited. Returns the calls, the ids acknowledged (Ingest acks, OK storing
    Embeds), and the monotonic times of the SIGTERM and of the exit."""
    calls: list[_Call] = []
    committed: set[str] = set()
    exited = asyncio.Event()
    rng = random.Random(3)

    async with _channel(server.target) as ch:
        stub = pb_grpc.EmbedderStub(ch)
        await ch.channel_ready()

        async def unary(k: int) -> None:
            n = 0
            while not exited.is_set():
                n += 1
                kind = ("embed_store", "embed", "search")[n % 3]
                call = _Call(kind, time.monotonic())
                calls.append(call)
                ids = [f"u{k}-{n}-{i}" for i in range(16)]
                try:
                    if kind == "search":
                        await stub.Search(
                            pb.SearchRequest(collection=collection, text=rng.choice(corpus), k=5), timeout=60
                        )
                    else:
                        docs = [pb.Document(id=i, text=rng.choice(corpus)) for i in ids]
                        store = collection if kind == "embed_store" else ""
                        await stub.Embed(pb.EmbedRequest(collection=store, documents=docs), timeout=60)
                        if store:
                            committed.update(ids)
                    call.code = "OK"
                except grpc.aio.AioRpcError as e:
                    call.code = e.code().name
                call.ended = time.monotonic()
                if call.code != "OK":
                    await asyncio.sleep(0.01)

        async def ingest(k: int) -> None:
            attempt = 0
            while not exited.is_set():
                attempt += 1
                call = _Call("ingest", time.monotonic())
                calls.append(call)
                stream = stub.Ingest()

                async def send(stream: Any = stream, attempt: int = attempt) -> None:
                    for b in range(1, 10_000):
                        docs = [pb.Document(id=f"s{k}-{attempt}-{b}-{i}", text=rng.choice(corpus)) for i in range(32)]
                        await stream.write(pb.IngestRequest(collection=collection, batch_id=b, documents=docs))

                writer = asyncio.create_task(send())
                try:
                    async for ack in stream:
                        committed.update(ack.ids)
                    call.code = (await stream.code()).name
                except grpc.aio.AioRpcError as e:
                    # See _CLIENT_CORE_INTERNAL: grpc's aio client invents INTERNAL when its write races the
                    # server ending the stream; the server's own answers are checked in its log.
                    call.code = "CLIENT_SIDE_INTERNAL" if e.details() == _CLIENT_CORE_INTERNAL else e.code().name
                finally:
                    writer.cancel()
                    await asyncio.gather(writer, return_exceptions=True)
                call.ended = time.monotonic()
                await asyncio.sleep(0.01)

        async def watch() -> tuple[float, float]:
            # Only once work is being committed: on a loaded 2-core box the first batches take a while.
            waited = time.monotonic()
            while not committed and time.monotonic() - waited < 120:
                await asyncio.sleep(0.05)
            await asyncio.sleep(sigterm_after)
            term = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            while server.proc.poll() is None:
                await asyncio.sleep(0.02)
            exit_at = time.monotonic()
            exited.set()
            return term, exit_at

        tasks = [asyncio.create_task(unary(k)) for k in range(unary_clients)]
        tasks += [asyncio.create_task(ingest(k)) for k in range(streams)]
        term, exit_at = await watch()
        _, pending = await asyncio.wait(tasks, timeout=30)
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return calls, committed, term, exit_at


def shutdown(
    server: ServerProcess,
    *,
    sigterm_after: float = 3.0,
    unary_clients: int = 6,
    streams: int = 2,
    collection: str = "chaos_shutdown",
) -> Result:
    """SIGTERMs `server` (it is gone afterwards) and checks its data dir with a second server, stopped at the end."""
    result = Result("shutdown")
    since = len(server.errors)
    grace = float(str(server.flags.get("grace_seconds", 10.0)))
    corpus = texts()
    call_retrying(
        lambda stub: stub.CreateCollection(pb.CreateCollectionRequest(name=collection), timeout=60), server.target
    )
    calls, committed, term, exit_at = asyncio.run(
        _shutdown_load(server, collection, corpus, sigterm_after, unary_clients, streams)
    )
    exit_code = server.proc.wait()
    leftovers = server.leftover_processes()
    in_flight = [c for c in calls if c.started < term and not c.ended < term]
    after = [c for c in calls if c.started >= term]
    # A stream the server ended (UNAVAILABLE, in its log) can read CLIENT_SIDE_INTERNAL on the client's side.
    bad = [c for c in in_flight if c.code not in ("OK", "CLIENT_SIDE_INTERNAL", *_RETRYABLE_NAMES)]
    unfinished = [c for c in in_flight if math.isnan(c.ended)]
    last_end = max((c.ended - term for c in in_flight if not math.isnan(c.ended)), default=0.0)
    pg_log = (
        (server.pgdata / "log").read_text(errors="replace").splitlines() if (server.pgdata / "log").exists() else []
    )
    pg_clean = bool(pg_log) and "database system is shut down" in pg_log[-1]

    restarted_ok = False
    rows: dict[str, str] = {}
    restart_s = None
    try:
        with ServerProcess(server.data_dir, server.model_dir, env=server.env, **server.flags) as again:
            restart_s = round(again.ready_s, 2)
            restarted_ok = again.answers()
            rows = again.rows(collection)
            with grpc.insecure_channel(again.target) as ch:
                reply = pb_grpc.EmbedderStub(ch).Embed(
                    pb.EmbedRequest(collection=collection, documents=[pb.Document(id="after-restart", text="back")]),
                    timeout=60,
                )
                restarted_ok = restarted_ok and reply.upsert.inserted + reply.upsert.updated == 1
            second_exit = again.terminate(timeout=grace + 60)
    except RuntimeError as e:
        result.figures["restart_error"] = str(e)[-500:]
        second_exit = None
    lost = sorted(committed - set(rows))
    by_kind: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for c in in_flight:
        by_kind[c.kind][c.code or "UNFINISHED"] += 1
    result.figures.update(
        grace_seconds=grace,
        calls=len(calls),
        in_flight_at_sigterm=len(in_flight),
        in_flight_codes={k: dict(v) for k, v in by_kind.items()},
        started_after_sigterm=len(after),
        after_sigterm_codes=dict(collections.Counter(c.code for c in after)),
        last_in_flight_end_after_sigterm_s=round(last_end, 2),
        exit_after_sigterm_s=round(exit_at - term, 2),
        exit_code=exit_code,
        postgres_log_last_line=pg_log[-1] if pg_log else None,
        leftover_processes=leftovers,
        committed_ids=len(committed),
        rows_after_restart=len(rows),
        lost=len(lost),
        lost_sample=lost[:10],
        restart_ready_s=restart_s,
        second_exit_code=second_exit,
    )
    result.check(
        "in-flight calls ending other than OK/retryable", len(bad) + len(unfinished), "0", not bad and not unfinished
    )
    result.check("exit code", exit_code, "0", exit_code == 0)
    result.check(
        "Postgres shut down cleanly, no leftovers", pg_clean and not leftovers, "true", pg_clean and not leftovers
    )
    result.check("acknowledged documents lost", len(lost), "0", restarted_ok and not lost)
    result.check("second serve on the data dir answers", restarted_ok, "true", restarted_ok and second_exit == 0)
    _check_server_log(result, server, since)
    result.check(
        "in-flight calls ended within grace (s)", round(last_end, 2), f"<= {grace}", last_end <= grace, kind="timing"
    )
    return result


# ================================================================ malformed input


_CLIENT_CORE_INTERNAL = "Internal error from Core"


async def _send_cases(target: str, cases: list[Any], concurrency: int, timeout: float) -> dict[str, Any]:
    codes: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    bad: list[dict[str, Any]] = []
    queue: asyncio.Queue[Any] = asyncio.Queue()
    for case in cases:
        queue.put_nowait(case)

    async with _channel(target) as ch:
        unary = {m.name: ch.unary_unary(f"/{SERVICE.full_name}/{m.name}") for m in SERVICE.methods}
        ingest = ch.stream_stream(f"/{SERVICE.full_name}/Ingest")

        async def one(case: Any) -> str:
            try:
                if case.method == "Ingest":
                    call = ingest(iter(case.payloads), timeout=timeout)
                    async for _ in call:
                        pass
                    return (await call.code()).name
                await unary[case.method](case.payloads[0], timeout=timeout)
                return "OK"
            except grpc.aio.AioRpcError as e:
                if case.method == "Ingest" and e.details() == _CLIENT_CORE_INTERNAL:
                    # grpc's aio client makes this up itself when its write fails because the server already ended
                    # the stream (grpc/grpc#36066); what the server answered is in its log, checked separately.
                    return "CLIENT_SIDE_INTERNAL"
                if e.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                    bad.append(
                        {
                            "method": case.method,
                            "kind": case.kind,
                            "code": e.code().name,
                            "details": (e.details() or "")[:300],
                            "payload_head": case.payloads[0][:64].hex() if case.payloads else "",
                        }
                    )
                return e.code().name

        async def worker() -> None:
            while not queue.empty():
                case = queue.get_nowait()
                codes[case.method][await one(case)] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"codes": {m: dict(c) for m, c in codes.items()}, "bad": bad}


def malformed(
    server: ServerProcess, *, requests: int, seed: int = 0, concurrency: int = 16, settle_s: float = 5.0
) -> Result:
    from _chaos_fuzz import COLLECTIONS, draw_cases, fixed_cases

    result = Result("malformed")
    since = len(server.errors)
    generated = time.monotonic()
    oversized = fixed_cases()
    cases = draw_cases(requests, seed)
    generation_s = time.monotonic() - generated
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.EmbedderStub(ch)
        stub.CreateCollection(pb.CreateCollectionRequest(name=COLLECTIONS[0]), timeout=60)
        stub.CreateCollection(
            pb.CreateCollectionRequest(name=COLLECTIONS[1], index=pb.IndexOptions(halfvec=True)), timeout=60
        )
        docs = [pb.Document(id=f"seed-{i}", text=t) for i, t in enumerate(texts(64))]
        for name in COLLECTIONS:
            stub.Embed(pb.EmbedRequest(collection=name, documents=docs), timeout=300)
    start_rss = settle_rss(server, 2.0)
    sent = time.monotonic()
    with RssSampler(server.pid) as sampler:
        # The oversized ones first, alone, so that what they leave behind can be told from the rest.
        outcome = asyncio.run(_send_cases(server.target, oversized, concurrency, timeout=60.0))
        after_oversized_rss = settle_rss(server, settle_s) if server.alive() else 0
        drawn_outcome = asyncio.run(_send_cases(server.target, cases, concurrency, timeout=60.0))
    for method, counts in drawn_outcome["codes"].items():
        outcome["codes"].setdefault(method, {})
        for code, n in counts.items():
            outcome["codes"][method][code] = outcome["codes"][method].get(code, 0) + n
    outcome["bad"] += drawn_outcome["bad"]
    send_s = time.monotonic() - sent
    alive = server.answers()
    end_rss = settle_rss(server, settle_s) if server.alive() else 0
    totals: collections.Counter[str] = collections.Counter()
    for per_method in outcome["codes"].values():
        totals.update(per_method)
    kinds = collections.Counter(c.kind for c in oversized + cases)
    growth = (end_rss - start_rss) / start_rss if start_rss else math.inf
    result.figures.update(
        requests=len(oversized) + len(cases),
        kinds=dict(kinds),
        methods=sorted(outcome["codes"]),
        codes=dict(totals),
        codes_by_method=outcome["codes"],
        internal_or_unknown=outcome["bad"][:20],
        generation_s=round(generation_s, 1),
        send_s=round(send_s, 1),
        start_rss_mib=mib(start_rss),
        after_fixed_cases_rss_mib=mib(after_oversized_rss),
        peak_rss_mib=mib(sampler.peak),
        end_rss_mib=mib(end_rss),
        rss_growth_pct=round(growth * 100, 1),
        settle_s=settle_s,
    )
    bad = totals["INTERNAL"] + totals["UNKNOWN"]
    methods = {m.name for m in SERVICE.methods}
    result.check("INTERNAL/UNKNOWN", bad, "0", bad == 0)
    result.check(
        "RPCs covered", f"{len(set(outcome['codes']))}/{len(methods)}", "all", set(outcome["codes"]) == methods
    )
    result.check("server alive and answering", alive, "true", alive)
    _check_server_log(result, server, since)
    result.check("RSS growth after settle (%)", round(growth * 100, 1), "<= 10", growth <= 0.10, kind="memory")
    return result


# ================================================================ driver

SCENARIOS = ("overload", "db_faults", "shutdown", "malformed")


@contextmanager
def served(model_dir: Path, env: dict[str, str] | None = None, **flags: object) -> Iterator[ServerProcess]:
    with (
        tempfile.TemporaryDirectory(prefix="chaos-") as tmp,
        ServerProcess(Path(tmp) / "data", model_dir, env=env, **flags) as server,
    ):
        yield server


def run_scenario(name: str, args: argparse.Namespace, model_dir: Path) -> Result:
    flags: dict[str, object] = {
        "max_concurrent_inputs": args.capacity,
        # The server refuses to start with a request limit above what it can admit at once.
        "max_request_documents": min(1024, args.capacity),
        "grace_seconds": args.grace,
        "log_level": args.server_log_level,
    }
    runs: dict[str, Callable[[ServerProcess], Result]] = {
        "overload": lambda s: overload(
            s, seconds=args.seconds, capacity=args.capacity, processes=args.client_processes
        ),
        "db_faults": lambda s: db_faults(s, documents=args.documents, kills=args.kills),
        "shutdown": lambda s: shutdown(s),
        "malformed": lambda s: malformed(s, requests=args.requests),
    }
    started = time.monotonic()
    env = dict(item.split("=", 1) for item in args.server_env)
    with served(model_dir, env=env, **flags) as server:
        result = runs[name](server)
        result.figures["server_ready_s"] = round(server.ready_s, 2)
        result.figures["server_tail"] = [line.rstrip()[:400] for line in list(server.log)[-5:]]
    result.seconds = round(time.monotonic() - started, 1)
    return result


def headline(result: Result) -> str:
    f = result.figures
    if result.scenario == "overload":
        return (
            f"{f['clients']} clients, codes {f['codes']}, reject p50/p99 {f['rejection_latency_ms']['p50']}/"
            f"{f['rejection_latency_ms']['p99']} ms, recovery {f['recovery_ms']} ms, RSS start/peak/bound "
            f"{f['start_rss_mib']}/{f['peak_rss_mib']}/{f['rss_bound_mib']} MiB"
        )
    if result.scenario == "db_faults":
        return (
            f"{f['documents']} docs ({f['ids_sent_twice']} twice), {f['kills']} kills, {f['streams_opened']} streams, "
            f"rows {f['rows']}, lost {f['lost']}, stale {f['stale']}, {f['docs_per_s']} docs/s"
        )
    if result.scenario == "shutdown":
        return (
            f"{f['in_flight_at_sigterm']} in flight {f['in_flight_codes']},"
            f" last end +{f['last_in_flight_end_after_sigterm_s']} s"
            f" (grace {f['grace_seconds']}), exit {f['exit_code']} at +{f['exit_after_sigterm_s']} s, "
            f"{f['committed_ids']} acked, lost {f['lost']}"
        )
    return (
        f"{f['requests']} requests, codes {f['codes']}, RSS start/end {f['start_rss_mib']}/{f['end_rss_mib']} MiB"
        f" ({f['rss_growth_pct']:+}%)"
    )


def print_table(results: list[Result]) -> None:
    print()
    print(f"{'scenario':<10} {'target':<52} {'value':<24} {'want':<12} result")
    print("-" * 108)
    for r in results:
        for c in r.checks:
            label = c.name + (f" [{c.kind}]" if c.kind != "correctness" else "")
            print(f"{r.scenario:<10} {label:<52} {c.value!s:<24} {c.target:<12} {'PASS' if c.passed else 'FAIL'}")
        print(f"{'':<10} {headline(r)}")
        print("-" * 108)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10 s overload, 3k docs and 3 kills, 1k hostile requests")
    parser.add_argument("--scenario", action="append", choices=SCENARIOS, help="run only these (repeatable)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    parser.add_argument("--capacity", type=int, default=256, help="the server's --max-concurrent-inputs")
    parser.add_argument("--grace", type=float, default=10.0, help="the server's --grace-seconds")
    parser.add_argument("--seconds", type=float, help="overload duration (60; --quick 10)")
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument("--documents", type=int, help="db_faults ingest size (20000; --quick 3000)")
    parser.add_argument("--kills", type=int, help="db_faults postmaster SIGKILLs (20; --quick 3)")
    parser.add_argument("--requests", type=int, help="malformed requests (10000; --quick 1000)")
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment of the server process (e.g. MALLOC_ARENA_MAX=2); repeatable",
    )
    parser.add_argument(
        "--server-log-level",
        default="info",
        choices=READABLE_LOG_LEVELS,
        help="the server's --log-level (its default: info; the bench reads the bound port from its info-level"
        " ready line)",
    )
    args = parser.parse_args()
    args.seconds = args.seconds or (10.0 if args.quick else 60.0)
    args.documents = args.documents or (3000 if args.quick else 20_000)
    args.kills = args.kills if args.kills is not None else (3 if args.quick else 20)
    args.requests = args.requests or (1000 if args.quick else 10_000)

    from embedpool.config import Settings
    from embedpool.engine import prepare

    model_dir = prepare(Settings()).root
    results = []
    for name in args.scenario or SCENARIOS:
        print(f"== {name}", flush=True)
        result = run_scenario(name, args, model_dir)
        print(f"   {headline(result)} ({result.seconds} s)", flush=True)
        results.append(result)
    print_table(results)
    report = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "results": [asdict(r) | {"passed": r.passed} for r in results],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "chaos.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    failed = [f"{r.scenario}: {c.name}" for r in results for c in r.failed()]
    print(f"wrote {path}; {'all targets met' if not failed else 'FAILED: ' + '; '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
