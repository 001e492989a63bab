"""Question: how fast is the native exact top-k cosine search against numpy, and how close to memory bandwidth?

numpy baseline: (q / |q|) @ c.T on a pre-normalised corpus, then argpartition + sort of the top k
(normalising the corpus is left out of numpy's time, which favours numpy). The native side gets the
same pre-normalised corpus. Correctness is recorded next to each timing: the fraction of native
results whose numpy score equals numpy's k-th best or better. Writes OUT/topk.json.
"""

from __future__ import annotations

import os
import sys

# Run as a script, this folder would come first on sys.path and bench/tokenize.py would shadow the
# stdlib `tokenize` (imported by numpy via inspect/linecache).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from numpy.typing import NDArray  # noqa: E402

from embedpool._native import topk_cosine  # noqa: E402

DIM = 384
K = 10
QUERY_COUNTS = (1, 16, 256)

Result = tuple[NDArray[np.int64], NDArray[np.float32]]


def numpy_topk(queries: NDArray[np.float32], unit_corpus: NDArray[np.float32], k: int) -> Result:
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    scores = q @ unit_corpus.T
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(part_scores, order, axis=1)


def best_of(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def copy_bandwidth(nbytes: int, threads: int) -> float:
    """Bytes/s moved (read + write) by a multi-threaded numpy copy of nbytes."""
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    parts = np.array_split(np.arange(src.size), threads)
    bounds = [(p[0], p[-1] + 1) for p in parts if p.size]

    def run() -> None:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda b: np.copyto(dst[b[0] : b[1]], src[b[0] : b[1]]), bounds))

    return 2 * nbytes / best_of(run, 3)


def agreement(native: Result, queries: NDArray[np.float32], corpus: NDArray[np.float32], k: int) -> float:
    """Fraction of native hits at least as good as numpy's k-th best score (float32 rounding allowed)."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    scores = q @ corpus.T
    kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1 : k]
    hit_scores = np.take_along_axis(scores, native[0], axis=1)
    return float(np.mean(hit_scores >= kth - 1e-5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="100k x 384 corpus instead of 1M x 384")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = parser.parse_args()

    rows = 100_000 if args.quick else 1_000_000
    repeats = 3 if args.quick else 5
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((rows, DIM), dtype=np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    threads = os.cpu_count() or 1

    cases = []
    print(f"corpus {rows:,} x {DIM} float32, k={K}, {threads} threads")
    print(f"{'queries':>7} {'native ms':>10} {'numpy ms':>10} {'speedup':>8} {'agree':>6} {'native GB/s':>11}")
    for n_queries in QUERY_COUNTS:
        queries = rng.standard_normal((n_queries, DIM), dtype=np.float32)
        native = topk_cosine(queries, corpus, K)
        agree = agreement(native, queries, corpus, K)
        native_s = best_of(lambda q=queries: topk_cosine(q, corpus, K), repeats)
        numpy_s = best_of(lambda q=queries: numpy_topk(q, corpus, K), repeats)
        gbps = corpus.nbytes / native_s / 1e9
        cases.append(
            {
                "queries": n_queries,
                "native_s": native_s,
                "numpy_s": numpy_s,
                "speedup": numpy_s / native_s,
                "agreement_with_numpy": agree,
                "native_corpus_gb_per_s": gbps,
            }
        )
        print(
            f"{n_queries:>7} {native_s * 1e3:>10.1f} {numpy_s * 1e3:>10.1f}"
            f" {numpy_s / native_s:>7.2f}x {agree:>6.3f} {gbps:>11.1f}"
        )

    bandwidth = copy_bandwidth(corpus.nbytes, threads)
    single = cases[0]
    fraction = corpus.nbytes / single["native_s"] / bandwidth
    geo_mean = math.exp(sum(math.log(c["speedup"]) for c in cases) / len(cases))
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; 1-query native reads at {fraction:.0%} of it")
    print(f"native / numpy (geometric mean over query counts): {geo_mean:.2f}x")
    result = {
        "question": "native topk_cosine vs numpy matmul + argpartition, exact cosine",
        "corpus_rows": rows,
        "dim": DIM,
        "k": K,
        "threads": threads,
        "cases": cases,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "fraction_of_bandwidth": fraction,
        "ratios": {"native_vs_numpy": geo_mean, **{f"native_vs_numpy_q{c['queries']}": c["speedup"] for c in cases}},
        "quick": args.quick,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "topk.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
