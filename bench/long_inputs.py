"""Long inputs: 2,000-token documents embedded whole (long_inputs chunk: windows of the model's length, pooled)
against truncated to the model's length (the default), on a real server in this process (gRPC over loopback).

Documents: real text (standard-library docstrings, bench/corpus.py) cut at whole words to 2,000 content tokens.
Rounds alternate truncate and chunk (so drift on a shared machine hits both alike); each round runs --clients
threads sending Embed calls of --docs documents back to back for --round-s seconds. Per mode, the median over
rounds of: docs/s, document tokens/s (each whole document's tokens, as token_counts report them) and embedded
tokens/s (the tokens the model ran: truncated, the model's length per document; chunked, every window's, overlap
and special tokens included). Correctness next to timing: every vector unit length, window_counts as the window
arithmetic says, truncated token_counts at the model's length.

    .venv/bin/python -P bench/long_inputs.py [--quick] [--overlap N] [--out DIR]   # DIR/long_inputs.json
"""

from __future__ import annotations

import os
import sys

# Run as a script, this folder comes first on sys.path and bench/tokenize.py would shadow the stdlib `tokenize`.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

import argparse
import functools
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from anyio.from_thread import start_blocking_portal

from embedpool import _native
from embedpool.config import Settings
from embedpool.engine import prepare
from embedpool.pool.windows import spans
from embedpool.server.app import serve
from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc

CONTENT_TOKENS = 2000
MODES = {"truncate": pb.LONG_INPUTS_TRUNCATE, "chunk": pb.LONG_INPUTS_CHUNK}


def documents(tokenizer_path: Path, n: int, max_length: int) -> list[str]:
    """`n` texts of CONTENT_TOKENS tokens: WordPiece splits at whitespace, so a text's tokens are its words'."""
    import corpus

    words = " ".join(corpus.passages(n=4 * n, max_words=400)).split()
    tokenizer = _native.Tokenizer(str(tokenizer_path), max_length=max_length)
    _, offsets = tokenizer.encode_ragged(words)
    sizes = (np.diff(offsets) - 2).tolist()
    out: list[str] = []
    start = 0
    while len(out) < n:
        total, end = 0, start
        while total + sizes[end % len(words)] <= CONTENT_TOKENS:
            total += sizes[end % len(words)]
            end += 1
        if total == CONTENT_TOKENS:
            out.append(" ".join(words[i % len(words)] for i in range(start, end)))
        start = end + 1
    return out


def _round(
    stub: pb_grpc.EmbedderStub, texts: list[str], mode: str, overlap: int, clients: int, docs: int, seconds: float
) -> dict[str, Any]:
    """Calls back to back from `clients` threads for `seconds`; counts and checks every reply."""
    lock = threading.Lock()
    totals = {"docs": 0, "document_tokens": 0, "windows": 0, "bad": 0}
    stop = time.perf_counter() + seconds

    def client(k: int) -> None:
        i = k * docs
        while time.perf_counter() < stop:
            batch = [texts[(i + j) % len(texts)] for j in range(docs)]
            i += clients * docs
            chunk = {"chunk_overlap_tokens": overlap} if mode == "chunk" else {}
            reply = stub.Embed(
                pb.EmbedRequest(documents=[pb.Document(text=t) for t in batch], long_inputs=MODES[mode], **chunk),
                timeout=300,
            )
            vectors = np.stack([np.frombuffer(v, dtype="<f4") for v in reply.vectors])
            bad = int((np.abs(np.linalg.norm(vectors, axis=1) - 1.0) > 1e-4).sum())
            with lock:
                totals["docs"] += len(batch)
                totals["document_tokens"] += sum(reply.token_counts)
                totals["windows"] += sum(reply.window_counts) if mode == "chunk" else len(batch)
                totals["bad"] += bad + (len(reply.vectors) != len(batch))
                totals.setdefault("window_counts", set()).update(reply.window_counts)
                totals.setdefault("token_counts", set()).update(reply.token_counts)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    totals["seconds"] = time.perf_counter() - started
    return totals


def run(args: argparse.Namespace) -> dict[str, Any]:
    model_dir = prepare(Settings()).root
    with tempfile.TemporaryDirectory(prefix="bench-long-") as tmp:
        settings = Settings(
            port=0, metrics_port=0, http_port=0, data_dir=Path(tmp), model=str(model_dir), log_level="warning"
        )
        with start_blocking_portal(backend="asyncio") as portal:
            future, running = portal.start_task(functools.partial(serve), settings)
            try:
                with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                    stub = pb_grpc.EmbedderStub(channel)
                    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=60)
                    max_tokens = info.max_tokens
                    texts = documents(model_dir / "tokenizer.json", args.texts, max_tokens)
                    _round(stub, texts, "chunk", args.overlap, 1, 2, 0.0)  # warm up both paths
                    _round(stub, texts, "truncate", args.overlap, 1, 2, 0.0)
                    rounds = {mode: [] for mode in MODES}  # type: dict[str, list[dict[str, Any]]]
                    for _ in range(args.rounds):
                        for mode in MODES:
                            rounds[mode].append(
                                _round(stub, texts, mode, args.overlap, args.clients, args.docs, args.round_s)
                            )
            finally:
                future.cancel()
    windows = len(spans(CONTENT_TOKENS, max_tokens - 2, args.overlap))
    embedded_per_doc = {"truncate": max_tokens, "chunk": CONTENT_TOKENS + 2 * windows + args.overlap * (windows - 1)}
    modes: dict[str, Any] = {}
    for mode, results in rounds.items():
        docs_s = [r["docs"] / r["seconds"] for r in results]
        modes[mode] = {
            "docs_per_s": statistics.median(docs_s),
            "document_tokens_per_s": statistics.median(r["document_tokens"] / r["seconds"] for r in results),
            "embedded_tokens_per_s": statistics.median(d * embedded_per_doc[mode] for d in docs_s),
            "docs_per_s_rounds": docs_s,
            "embedded_tokens_per_doc": embedded_per_doc[mode],
            "documents": sum(r["docs"] for r in results),
            "bad_replies": sum(r["bad"] for r in results),
            "token_counts_seen": sorted({c for r in results for c in r.get("token_counts", ())}),
        }
    chunk_windows = sorted({c for r in rounds["chunk"] for c in r.get("window_counts", ())})
    correct = {
        "unit_vectors_and_counts": modes["truncate"]["bad_replies"] == modes["chunk"]["bad_replies"] == 0,
        "chunk_window_counts": chunk_windows == [windows],
        "chunk_token_counts": modes["chunk"]["token_counts_seen"] == [CONTENT_TOKENS + 2],
        "truncate_token_counts": modes["truncate"]["token_counts_seen"] == [max_tokens],
    }
    return {
        "question": "docs/s and tokens/s of 2,000-token documents embedded whole (chunk) vs truncated",
        "config": {
            "content_tokens": CONTENT_TOKENS,
            "max_tokens": max_tokens,
            "overlap": args.overlap,
            "windows_per_doc": windows,
            "docs_per_request": args.docs,
            "clients": args.clients,
            "round_s": args.round_s,
            "rounds": args.rounds,
            "cpus": os.cpu_count(),
            "model": info.name,
            "variant": info.variant,
        },
        "modes": modes,
        "ratios_chunk_over_truncate": {
            key: modes["chunk"][key] / modes["truncate"][key]
            for key in ("docs_per_s", "document_tokens_per_s", "embedded_tokens_per_s")
        },
        "correct": correct,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 round of 1.5 s per mode, 4 documents a call")
    parser.add_argument("--overlap", type=int, default=0, help="chunk_overlap_tokens")
    parser.add_argument("--docs", type=int, default=16, help="documents per Embed call")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--round-s", type=float, default=10.0)
    parser.add_argument("--texts", type=int, default=64, help="distinct documents cycled through")
    parser.add_argument("--out", type=Path, default=Path(_HERE) / "results")
    args = parser.parse_args(argv)
    if args.quick:
        args.docs, args.rounds, args.round_s, args.texts, args.clients = 4, 1, 1.5, 8, 1
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "long_inputs.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"ratios": result["ratios_chunk_over_truncate"], "correct": result["correct"]}, indent=2))
    for mode, figures in result["modes"].items():
        print(
            f"{mode:8s} {figures['docs_per_s']:8.1f} docs/s {figures['document_tokens_per_s']:10.0f} doc tokens/s"
            f" {figures['embedded_tokens_per_s']:10.0f} embedded tokens/s"
        )
    return 0 if all(result["correct"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
