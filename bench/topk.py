"""Question: how fast is the native exact top-k cosine search against numpy, and how close to memory bandwidth?

The corpus is raw (not unit length), as the service stores it, so cosine needs the corpus norms on
every call. Two numpy baselines, both `q @ c.T` + argpartition + sort of the top k:

- numpy: computes the same thing as native inside the timed region, corpus norms included (with
  einsum, numpy's cheapest single pass). This is the fair comparison and the headline ratio.
- numpy_prenormalised: the corpus is normalised once outside the timed region, so numpy skips the
  norms (its best case; native still computes them).

Correctness is recorded next to each timing: the fraction of native hits whose numpy score reaches
numpy's k-th best (float32 rounding allowed). The bandwidth probe is a multi-threaded numpy copy of
the corpus's size; the fraction of bandwidth is the 1-query native corpus read rate over it.
Timings are medians of repeats. Writes OUT/topk.json and OUT/topk.png.
"""

from __future__ import annotations

import os
import sys

# Run as a script, this folder would come first on sys.path and bench/tokenize.py would shadow the
# stdlib `tokenize` (imported by numpy via inspect/linecache).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from embedpool._native import topk_cosine

DIM = 384
K = 10
QUERY_COUNTS = (1, 16, 256)

Result = tuple[NDArray[np.int64], NDArray[np.float32]]


def unit(queries: NDArray[np.float32]) -> NDArray[np.float32]:
    norms = np.linalg.norm(queries, axis=1, keepdims=True)
    return queries / np.where(norms == 0, 1, norms)


def top_k(scores: NDArray[np.float32], k: int) -> Result:
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(part_scores, order, axis=1)


def numpy_topk(queries: NDArray[np.float32], corpus: NDArray[np.float32], k: int) -> Result:
    """Cosine against a raw corpus: what native computes."""
    norms = np.sqrt(np.einsum("ij,ij->i", corpus, corpus))
    return top_k((unit(queries) @ corpus.T) / np.where(norms == 0, 1, norms), k)


def numpy_topk_prenormalised(queries: NDArray[np.float32], unit_corpus: NDArray[np.float32], k: int) -> Result:
    return top_k(unit(queries) @ unit_corpus.T, k)


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(nbytes: int, threads: int, repeats: int) -> float:
    """Bytes/s moved (read + write) by a multi-threaded numpy copy of nbytes."""
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in np.array_split(np.arange(src.size), threads) if p.size]
    with ThreadPoolExecutor(threads) as pool:

        def run() -> None:
            list(pool.map(lambda b: np.copyto(dst[b[0] : b[1]], src[b[0] : b[1]]), bounds))

        run()
        return 2 * nbytes / median_time(run, repeats)


def agreement(native: Result, queries: NDArray[np.float32], unit_corpus: NDArray[np.float32], k: int) -> float:
    """Fraction of native hits at least as good as numpy's k-th best score (float32 rounding allowed)."""
    scores = unit(queries) @ unit_corpus.T
    kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1 : k]
    hit_scores = np.take_along_axis(scores, native[0], axis=1)
    return float(np.mean(hit_scores >= kth - 1e-5))


def plot(cases: list[dict[str, float]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [str(c["queries"]) for c in cases]
    x = np.arange(len(cases))
    width = 0.27
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (key, name) in enumerate(
        [("native_s", "native"), ("numpy_s", "numpy (norms in timing)"), ("numpy_prenorm_s", "numpy (pre-normalised)")]
    ):
        ax.bar(x + (i - 1) * width, [c[key] * 1e3 for c in cases], width, label=name)
    ax.set_xticks(x, labels)
    ax.set_xlabel("queries per call")
    ax.set_ylabel("ms per call (median, log scale)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100k x 384 corpus instead of 1M x 384")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    parser.add_argument("--rows", type=int, default=None, help="corpus rows (overrides --quick's 100k)")
    args = parser.parse_args()

    rows = args.rows or (100_000 if args.quick else 1_000_000)
    repeats = 7 if args.quick else 5
    rng = np.random.default_rng(0)
    # Raw vectors with varied lengths, as a store holds them.
    corpus = rng.standard_normal((rows, DIM), dtype=np.float32)
    corpus *= rng.uniform(0.5, 2.0, size=(rows, 1)).astype(np.float32)
    unit_corpus = unit(corpus)
    half = corpus.astype(np.float16)
    threads = os.cpu_count() or 1

    # All native timings first, then numpy's: OpenBLAS worker threads keep spinning for a while after
    # a call, and would steal the cores from whatever runs next.
    query_sets = {n: rng.standard_normal((n, DIM), dtype=np.float32) for n in QUERY_COUNTS}
    native_s = {n: median_time(lambda q=q: topk_cosine(q, corpus, K), repeats) for n, q in query_sets.items()}
    # float16 corpus (halfvec): half the bytes to stream; numpy has no fast float16 matmul to compare.
    one = query_sets[1]
    half_s = median_time(lambda: topk_cosine(one, half, K), repeats)
    time.sleep(0.5)
    numpy_s = {n: median_time(lambda q=q: numpy_topk(q, corpus, K), repeats) for n, q in query_sets.items()}
    prenorm_s = {
        n: median_time(lambda q=q: numpy_topk_prenormalised(q, unit_corpus, K), repeats) for n, q in query_sets.items()
    }
    agree = {n: agreement(topk_cosine(q, corpus, K), q, unit_corpus, K) for n, q in query_sets.items()}
    half_agree = agreement(topk_cosine(one, half, K), one, unit(half.astype(np.float32)), K)

    cases = []
    print(f"corpus {rows:,} x {DIM} float32 (raw, {corpus.nbytes / 1e6:.0f} MB), k={K}, {threads} threads")
    print(
        f"{'queries':>7} {'native ms':>10} {'numpy ms':>9} {'speedup':>8}"
        f" {'prenorm ms':>11} {'speedup':>8} {'agree':>6} {'native GB/s':>11}"
    )
    for n in QUERY_COUNTS:
        gbps = corpus.nbytes / native_s[n] / 1e9
        case = {
            "queries": n,
            "native_s": native_s[n],
            "numpy_s": numpy_s[n],
            "numpy_prenorm_s": prenorm_s[n],
            "speedup": numpy_s[n] / native_s[n],
            "speedup_vs_prenormalised": prenorm_s[n] / native_s[n],
            "agreement_with_numpy": agree[n],
            "native_corpus_gb_per_s": gbps,
        }
        cases.append(case)
        print(
            f"{n:>7} {native_s[n] * 1e3:>10.2f} {numpy_s[n] * 1e3:>9.2f} {case['speedup']:>7.2f}x"
            f" {prenorm_s[n] * 1e3:>11.2f} {case['speedup_vs_prenormalised']:>7.2f}x {agree[n]:>6.3f} {gbps:>11.1f}"
        )
    print(
        f"float16 corpus, 1 query: native {half_s * 1e3:.2f} ms,"
        f" {half.nbytes / half_s / 1e9:.1f} GB/s, agree {half_agree:.3f}"
    )

    bandwidth = copy_bandwidth(corpus.nbytes, threads, repeats)
    fraction = corpus.nbytes / cases[0]["native_s"] / bandwidth
    geo_mean = math.exp(statistics.fmean(math.log(c["speedup"]) for c in cases))
    geo_prenorm = math.exp(statistics.fmean(math.log(c["speedup_vs_prenormalised"]) for c in cases))
    print(
        f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write);"
        f" 1-query native reads the corpus at {fraction:.0%} of it"
    )
    print(
        f"native / numpy, geometric mean over query counts: {geo_mean:.2f}x"
        f" (vs pre-normalised numpy {geo_prenorm:.2f}x)"
    )
    result = {
        "question": "native topk_cosine vs numpy matmul + argpartition, exact cosine on a raw corpus",
        "corpus_rows": rows,
        "dim": DIM,
        "k": K,
        "threads": threads,
        "rayon_threads": os.environ.get("RAYON_NUM_THREADS", str(threads)),
        "timing": f"median of {repeats}",
        "cases": cases,
        "float16_1_query": {"native_s": half_s, "corpus_gb_per_s": half.nbytes / half_s / 1e9, "agreement": half_agree},
        "copy_bandwidth_bytes_per_s": bandwidth,
        "fraction_of_bandwidth": fraction,
        "ratios": {
            "native_vs_numpy": geo_mean,
            **{f"native_vs_numpy_q{c['queries']}": c["speedup"] for c in cases},
            "native_vs_numpy_prenormalised": geo_prenorm,
            **{f"native_vs_numpy_prenormalised_q{c['queries']}": c["speedup_vs_prenormalised"] for c in cases},
        },
        "quick": args.quick,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "topk.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(cases, f"top-{K} cosine, {rows:,} x {DIM} float32, {threads} threads", args.out / "topk.png")


if __name__ == "__main__":
    main()
