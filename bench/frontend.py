"""Question: does tokenization scale with the cores, alone and through the pool's path?

    python bench/frontend.py [--quick] [--threads 1,2] [--out DIR]

For each thread count k (default 1 .. every core), in a fresh process pinned to k cores (sched_setaffinity), whose
rayon pool has k threads (RAYON_NUM_THREADS) and whose pool has k tokenizing workers (`tokenizer_threads`), on the
shared real-text corpus, at 1, 8, 32 and 128 documents per call:
- bare: the native tokenizer's `encode_ragged` alone, k caller threads each encoding whole calls (its GIL is
  released, so the threads run at once; a large call is also split over rayon);
- pool: `EmbeddingPool.embed` with a session that does no inference (`--device null`'s), 64 concurrent callers:
  admission, tokenizing (pool.tokenizing: on the event loop while the pool is quiet or the call query-sized,
  else in the tokenizing stage with every call waiting), scheduling, padding and the fan back, i.e. what the pool
  adds to tokenizing, and whether its path uses the cores;
- pool_offload: the same at 1 document per call with every call sent to the tokenizing stage (none tokenized on
  the event loop).
Tokens/s and docs/s per k, and each k's tokens/s over k x one thread's (the goal: >= 0.8). Every call's token
counts are checked against one reference encoding. Also the Python cost per document where tokenizing is next to
nothing (calls of 128 one-word texts, one caller, this process's CPU time): through the pool, and the core's
check of the texts. Writes DIR/frontend.json.

bench/serve.py --engine null measures the whole server's front end beside the bare figure from here.
"""

from __future__ import annotations

import os
import sys

# Run as a script, this folder comes first on sys.path and bench/tokenize.py would shadow the stdlib `tokenize`.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

import argparse
import json
import platform
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from corpus import passages

from embedpool import _native
from embedpool.config import Settings
from embedpool.engine import PAD_MULTIPLE, prepare
from embedpool.model.null import NullSession
from embedpool.pool import BatchLimits, PoolConfig, running_pool
from embedpool.pool.pool import INLINE_TOKENIZE_CHARS
from embedpool.service import limits as check

CALL_SIZES = (1, 8, 32, 128)
POOL_CALLERS = 64


def corpus_texts(n: int) -> list[str]:
    corpus = passages(n=n)  # as many passages as the installed docstrings give (a few thousand)
    return [corpus[i % len(corpus)] for i in range(n)]


def load_tokenizer() -> tuple[_native.Tokenizer, int, int]:
    """The served model's tokenizer, as the server builds it; its dimension and token limit."""
    bundle = prepare(Settings())
    tokenizer = _native.Tokenizer(
        str(bundle.tokenizer_path), max_length=bundle.config.max_tokens, pad_to_multiple_of=PAD_MULTIPLE
    )
    return tokenizer, bundle.config.dim, bundle.config.max_tokens


def calls_of(texts: list[str], size: int) -> list[list[str]]:
    return [texts[i : i + size] for i in range(0, len(texts) - size + 1, size)]


def bare_tokenizer(
    tokenizer: _native.Tokenizer, texts: list[str], size: int, threads: int, seconds: float
) -> dict[str, Any]:
    """`threads` threads each encoding calls of `size` texts back to back for `seconds`: docs/s and tokens/s."""
    calls = calls_of(texts, size)
    counts = [0, 0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def worker(start: int) -> None:
        docs = tokens = 0
        i = start
        while time.perf_counter() < stop:
            _, offsets = tokenizer.encode_ragged(calls[i % len(calls)])
            docs += len(offsets) - 1
            tokens += int(offsets[-1])
            i += threads
        with lock:
            counts[0] += docs
            counts[1] += tokens

    workers = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    started = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - started
    return {"docs_per_s": counts[0] / elapsed, "tokens_per_s": counts[1] / elapsed}


async def pool_path(
    tokenizer: _native.Tokenizer,
    dim: int,
    texts: list[str],
    size: int,
    threads: int,
    seconds: float,
    inline_chars: int = INLINE_TOKENIZE_CHARS,
) -> dict[str, Any]:
    """`POOL_CALLERS` callers of `EmbeddingPool.embed` (GPU batching, no inference) for `seconds`; every reply's
    token counts are compared with the reference encoding of its call."""
    calls = calls_of(texts, size)
    expected = [np.diff(tokenizer.encode_ragged(call)[1]) for call in calls[:64]]
    config = PoolConfig(
        dim=dim,
        limits=BatchLimits(max_tokens=65536, max_size=256, pad_multiple=PAD_MULTIPLE, pad_id=0),
        max_concurrent_inputs=65536,
        tokenizer_threads=threads,
        inline_tokenize_chars=inline_chars,
    )
    docs = tokens = 0
    correct = True
    async with running_pool(tokenizer, [NullSession(dim, 256)], config) as pool:
        stop = anyio.current_time() + seconds

        async def caller(start: int) -> None:
            nonlocal docs, tokens, correct
            i = start
            while anyio.current_time() < stop:
                result = await pool.embed(calls[i % len(calls)])
                if i % len(calls) < len(expected):
                    correct = correct and np.array_equal(result.token_counts, expected[i % len(calls)])
                docs += len(result.token_counts)
                tokens += int(result.token_counts.sum())
                i += POOL_CALLERS

        started = anyio.current_time()
        async with anyio.create_task_group() as tg:
            for k in range(POOL_CALLERS):
                tg.start_soon(caller, k)
        elapsed = anyio.current_time() - started
    return {"docs_per_s": docs / elapsed, "tokens_per_s": tokens / elapsed, "token_counts_match": correct}


def one_k(threads: int, n_texts: int, seconds: float) -> dict[str, Any]:
    """Every call size, bare and through the pool, at `threads` (this process's rayon pool has that many)."""
    cpus = sorted(os.sched_getaffinity(0))
    if threads <= len(cpus):  # the event loop, the feeder and the callers share the k cores too
        os.sched_setaffinity(0, cpus[:threads])
    tokenizer, dim, _ = load_tokenizer()
    texts = corpus_texts(n_texts)
    tokenizer.encode_ragged(texts[:256])  # starts rayon's pool
    out: dict[str, Any] = {"threads": threads, "bare": {}, "pool": {}, "pool_offload": {}}
    for size in CALL_SIZES:
        out["bare"][str(size)] = bare_tokenizer(tokenizer, texts, size, threads, seconds)
        out["pool"][str(size)] = anyio.run(pool_path, tokenizer, dim, texts, size, threads, seconds, backend="asyncio")
    out["pool_offload"]["1"] = anyio.run(pool_path, tokenizer, dim, texts, 1, threads, seconds, 0, backend="asyncio")
    out["pool_offload"]["1"]["vs_pool"] = out["pool_offload"]["1"]["tokens_per_s"] / out["pool"]["1"]["tokens_per_s"]
    return out


def python_per_document(tokenizer: _native.Tokenizer, dim: int, calls: int) -> dict[str, float]:
    """CPU microseconds per document of the pool's path and of `limits.texts`, on texts that tokenize in next to
    no time, so what is left is mostly Python's per-document work."""
    texts = [f"w{i}" for i in range(128)]
    config = PoolConfig(
        dim=dim,
        limits=BatchLimits(max_tokens=65536, max_size=256, pad_multiple=PAD_MULTIPLE, pad_id=0),
        max_concurrent_inputs=65536,
        tokenizer_threads=1,
    )

    async def through_pool() -> float:
        async with running_pool(tokenizer, [NullSession(dim, 256)], config) as pool:
            for _ in range(min(50, calls)):
                await pool.embed(texts)
            started = time.process_time()
            for _ in range(calls):
                await pool.embed(texts)
            return (time.process_time() - started) / (calls * len(texts)) * 1e6

    limits = check.Limits.from_settings(Settings())
    started = time.process_time()
    for _ in range(calls * 10):
        check.texts(texts, limits)
    checking = (time.process_time() - started) / (calls * 10 * len(texts)) * 1e6
    return {"pool_us": anyio.run(through_pool, backend="asyncio"), "check_texts_us": checking}


def scaling(threads: list[int], n_texts: int, seconds: float) -> list[dict[str, Any]]:
    """One fresh process per thread count (rayon's pool is sized once per process)."""
    results = []
    for k in threads:
        env = {**os.environ, "RAYON_NUM_THREADS": str(k)}
        cmd = [sys.executable, __file__, "--one", str(k), "--texts", str(n_texts), "--seconds", str(seconds)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    one = results[0]
    for r in results:
        k = r["threads"] / one["threads"]
        for path in ("bare", "pool", "pool_offload"):
            for size, figures in r[path].items():
                figures["vs_k_x_one"] = figures["tokens_per_s"] / (k * one[path][size]["tokens_per_s"])
    return results


def print_table(results: list[dict[str, Any]]) -> None:
    print(
        f"{'path':<13}{'docs/call':>10}"
        + "".join(f"{'k=' + str(r['threads']) + ' tok/s':>16}{'/k·1':>7}" for r in results)
    )
    for path, sizes in (("bare", CALL_SIZES), ("pool", CALL_SIZES), ("pool_offload", (1,))):
        for size in map(str, sizes):
            row = f"{path:<13}{size:>10}"
            for r in results:
                f = r[path][size]
                row += f"{f['tokens_per_s']:>16,.0f}{f['vs_k_x_one']:>7.2f}"
            print(row)
    print(
        "pool_offload / pool at 1 document per call: "
        + ", ".join(f"k={r['threads']} {r['pool_offload']['1']['vs_pool']:.2f}x" for r in results)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs")
    parser.add_argument("--threads", default="", help="comma-separated thread counts (default 1 .. every core)")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per measurement")
    parser.add_argument("--texts", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    parser.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)  # a child: one thread count
    args = parser.parse_args()
    seconds = args.seconds or (1.0 if args.quick else 4.0)
    if args.one:
        print(json.dumps(one_k(args.one, args.texts, seconds)))
        return
    cores = os.cpu_count() or 1
    threads = [int(x) for x in args.threads.split(",")] if args.threads else list(range(1, cores + 1))
    results = scaling(threads, args.texts, seconds)
    tokenizer, dim, _ = load_tokenizer()
    per_document = python_per_document(tokenizer, dim, 50 if args.quick else 1500)
    report = {
        "question": "tokenization tokens/s with k threads, bare and through the pool, vs k x one thread",
        "pinned": "each k's process to k cores",
        "machine": {"cpus": cores, "platform": platform.platform()},
        "call_sizes": list(CALL_SIZES),
        "pool_callers": POOL_CALLERS,
        "seconds_per_measurement": seconds,
        "texts": args.texts,
        "results": results,
        "python_us_per_document": per_document,
    }
    print_table(results)
    print(
        f"Python per document (128 one-word texts a call): pool {per_document['pool_us']:.1f} us,"
        f" limits.texts {per_document['check_texts_us']:.3f} us"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "frontend.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out / 'frontend.json'}")


if __name__ == "__main__":
    main()
