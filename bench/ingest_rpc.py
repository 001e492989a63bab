"""End-to-end ingest over the Ingest RPC (embed + store) against its two halves alone, in the same run.

One embedded Postgres serves both the server (started as a separate process with --database-url, so the load
generator does not share its GIL) and the store-alone baseline:
- e2e: `embedpool.client.Client.ingest` of a FileSource, what `embedpool ingest FILE.jsonl` runs (one stream,
  batches of --batch documents, 4 in flight, bulk mode: the empty collection is loaded without its HNSW index,
  which is built when the streams end), into a fresh collection; --streams such clients at once, each on its
  own share of the shared real-text corpus. The time includes the index build.
- embed alone: the same texts through the Embed RPC with no collection (nothing stored), --streams clients
  sending --batch documents per request.
- store alone: `Store.upsert` of as many rows with pre-made vectors, batches of --batch, two at once (as the
  Ingest RPC stores them), inside `Store.bulk_load` (index built at the end, inside the timing), as e2e.
`e2e_vs_slower_half` = e2e / min(embed alone, store alone): 1.0 means embedding and storing overlap perfectly.

    .venv/bin/python -P bench/ingest_rpc.py [--quick] [--device cpu|cuda] [--streams N] [--out DIR]
"""

from __future__ import annotations

import os
import sys

# Run as a script, this folder comes first on sys.path and bench/tokenize.py would shadow the stdlib
# `tokenize`; keep the folder, but last, for `corpus` and `serve`.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

import argparse
import asyncio
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from corpus import passages
from serve import drive, start_server

from embedpool.client import Client, FileSource, IngestSummary
from embedpool.config import Settings
from embedpool.engine import pick_device, prepare
from embedpool.store import DocumentRow, EmbeddedPostgres, Store

DIM = 384


def write_sources(texts: list[str], streams: int, directory: Path) -> list[Path]:
    """One JSONL file per stream, every `streams`-th text, ids unique across streams."""
    paths = []
    for s in range(streams):
        path = directory / f"stream{s}.jsonl"
        with path.open("w") as f:
            for i in range(s, len(texts), streams):
                f.write(json.dumps({"id": f"s{s}-{i}", "text": texts[i], "metadata": {"stream": s}}) + "\n")
        paths.append(path)
    return paths


def ingest_file(target: str, source: Path, batch: int) -> IngestSummary:
    with Client(target) as client:  # a client (a connection) per stream, as separate `embedpool ingest` runs
        return client.ingest("bench", FileSource(source), batch_size=batch)


def e2e(target: str, sources: list[Path], batch: int) -> dict[str, Any]:
    with Client(target) as client:
        client.create_collection("bench", exist_ok=True)
    started = time.perf_counter()
    with ThreadPoolExecutor(len(sources)) as threads:
        summaries = list(threads.map(lambda source: ingest_file(target, source, batch), sources))
    elapsed = time.perf_counter() - started
    documents = sum(s.documents for s in summaries)
    inserted = sum(s.inserted for s in summaries)
    assert inserted == documents, f"{inserted} of {documents} documents inserted"
    return {"docs_per_s": documents / elapsed, "documents": documents, "seconds": elapsed}


async def store_alone(uri: str, n: int, batch: int) -> dict[str, Any]:
    vectors = np.random.default_rng(0).standard_normal((n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = [DocumentRow(f"r{i}", f"passage {i}", {"n": i}, str(i).encode(), vectors[i]) for i in range(n)]
    batches = iter([rows[i : i + batch] for i in range(0, n, batch)])
    store = await Store.open(uri)
    try:
        await store.create_collection("store_alone", model="bench", dim=DIM)

        async def writer() -> None:
            for rows_batch in batches:
                await store.upsert("store_alone", rows_batch)

        started = time.perf_counter()
        async with store.bulk_load("store_alone"), anyio.create_task_group() as tg:
            tg.start_soon(writer)
            tg.start_soon(writer)
        elapsed = time.perf_counter() - started
        assert (await store.stats("store_alone")).indexed
        assert (await store.stats("store_alone")).count == n
    finally:
        await store.close()
    return {"docs_per_s": n / elapsed, "documents": n, "seconds": elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small corpus (about 1 minute on 2 CPU cores)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--streams", type=int, default=None, help="concurrent Ingest streams (cpu 1, cuda 2)")
    parser.add_argument("--batch", type=int, default=256, help="documents per Ingest batch")
    parser.add_argument("--docs", type=int, default=None, help="documents (overrides --quick's cpu 256, cuda 20k)")
    parser.add_argument("--seconds", type=float, default=None, help="duration of the embed-alone run (quick 10)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    parser.add_argument("--server-arg", action="append", default=[], help="extra `embedpool serve` argument")
    args = parser.parse_args()
    args.device = args.device or pick_device("auto")
    args.variant = "auto"
    cuda = args.device == "cuda"
    streams = args.streams or (2 if cuda else 1)
    n_docs = args.docs or ((20_000 if cuda else 256) if args.quick else (200_000 if cuda else 1024))
    seconds = args.seconds or (10.0 if args.quick else 30.0)
    corpus = passages(n=n_docs)  # as many passages as the installed docstrings give (a few thousand)
    texts = [corpus[i % len(corpus)] for i in range(n_docs)]  # repeated under new ids: embedded and stored again
    bundle = prepare(Settings())

    with tempfile.TemporaryDirectory(prefix="embedpool-bench-") as tmp, EmbeddedPostgres(Path(tmp) / "pg") as pg:
        tmp_path = Path(tmp)
        stored = anyio.run(store_alone, pg.uri, n_docs, args.batch, backend="asyncio")
        args.server_arg = [*args.server_arg, "--database-url", pg.uri]
        proc, port = start_server(args, bundle.root, tmp_path / "data")[:2]  # (the HTTP port, where given, unused)
        try:
            target = f"127.0.0.1:{port}"
            sources = write_sources(texts, streams, tmp_path)
            # Warm-up: the server warmed every padded length before reporting ready; this warms the client.
            asyncio.run(drive(port, texts[: args.batch], streams, args.batch, 1.0))
            embedded = asyncio.run(drive(port, texts, streams, args.batch, seconds))
            end_to_end = e2e(target, sources, args.batch)
        finally:
            proc.terminate()
            proc.wait(60)

    slower = min(embedded["docs_per_s"], stored["docs_per_s"])
    result = {
        "docs_per_s": {
            "e2e": end_to_end["docs_per_s"],
            "embed_only": embedded["docs_per_s"],
            "store_only": stored["docs_per_s"],
        },
        "ratios": {
            "e2e_vs_slower_half": end_to_end["docs_per_s"] / slower,
            "e2e_vs_embed_only": end_to_end["docs_per_s"] / embedded["docs_per_s"],
        },
        "params": {
            "device": args.device,
            "documents": n_docs,
            "streams": streams,
            "batch": args.batch,
            "e2e_seconds": end_to_end["seconds"],
            "cpus": os.cpu_count(),
        },
    }
    print(f"device={args.device} documents={n_docs} streams={streams} batch={args.batch}")
    for key, rate in result["docs_per_s"].items():
        print(f"{key:<24}{rate:>12.1f} docs/s")
    for key, ratio in result["ratios"].items():
        print(f"{key:<24}{ratio:>11.2f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ingest_rpc.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out / 'ingest_rpc.json'}")


if __name__ == "__main__":
    main()
