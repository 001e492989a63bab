"""Question: what does the Python path cost a small Embed call, transport aside?

    python bench/call_path.py [--quick] [--before DIR] [--rounds N] [--out DIR]

In one process: the real core (`EmbeddingService` over a `--device null` engine: the real tokenizer, pool,
scheduler and feeder thread, an engine that returns at once; the store on an embedded Postgres, untouched by these
calls) and, per 1-document call, the gRPC door's own work around it without the transport: parse the request
bytes, read the texts, `EmbeddingService.embed` (validate, admit, tokenize, schedule, fan back), pack the vector
and serialize the reply. This process's CPU per call (all its threads), under 1 caller and under 16, for a
corpus passage and for a short query, and beside it the CPU of tokenizing the same text alone: the difference is
the Python path the issue bounds (0.3 ms). `--before DIR` runs another checkout (its `_native` built) the same way
in a child process, the two in turns round by round. Writes DIR/call_path.json.

bench/serve.py --engine null measures the same calls through the whole server, transport included.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

import argparse
import json
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

CALLERS = (1, 16)


def measure(calls: int) -> dict[str, Any]:
    """This process's figures (imports the checkout first on sys.path)."""
    import anyio
    from corpus import passages

    from embedpool.config import Settings
    from embedpool.engine import load_engine
    from embedpool.pool import running_pool
    from embedpool.server import codec
    from embedpool.service import EmbeddingService, Limits
    from embedpool.service.models import Models
    from embedpool.store import Store, running_postgres
    from embedpool.v1 import embedpool_pb2 as pb

    corpus = passages(n=512)
    texts = {"passage": corpus[len(corpus) // 2], "query": "how do I rotate an api key"}
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, running_postgres(Path(tmp) / "pg") as pg:
        settings = Settings(data_dir=Path(tmp), device="null", max_concurrent_inputs=65536)
        engine = load_engine(settings)

        async def main() -> None:
            store = await Store.open(pg.uri, max_size=2)
            try:
                async with running_pool(engine.tokenizer, engine.sessions, engine.pool_config()) as pool:
                    core = EmbeddingService(
                        Models.of([(pool, engine.model)], store), store, Limits.from_settings(engine.settings)
                    )

                    async def one_call(wire: bytes) -> bytes:
                        request = pb.EmbedRequest.FromString(wire)
                        embedded = await core.embed([doc.text for doc in request.documents])
                        return pb.EmbedResponse(
                            dim=embedded.vectors.shape[1],
                            vectors=codec.pack_vectors(embedded.vectors, request.encoding),
                            token_counts=embedded.token_counts,
                            model=embedded.model,
                            encoding=request.encoding,
                        ).SerializeToString()

                    for kind, text in texts.items():
                        wire = pb.EmbedRequest(documents=[pb.Document(text=text)]).SerializeToString()
                        for _ in range(200):
                            await one_call(wire)
                        started = time.process_time()
                        for _ in range(calls * 5):
                            engine.tokenizer.encode_ragged([text])
                        tokenize_us = (time.process_time() - started) / (calls * 5) * 1e6
                        row: dict[str, Any] = {"chars": len(text), "tokenize_us": tokenize_us}
                        for callers in CALLERS:

                            async def caller(n: int, wire: bytes = wire) -> None:
                                for _ in range(n):
                                    await one_call(wire)

                            started = time.process_time()
                            async with anyio.create_task_group() as tg:
                                for _ in range(callers):
                                    tg.start_soon(caller, calls // callers)
                            per_call = (time.process_time() - started) / (calls // callers * callers) * 1e6
                            row[f"call_us_{callers}"] = per_call
                            row[f"path_us_{callers}"] = per_call - tokenize_us
                        results[kind] = row
            finally:
                await store.close()

        anyio.run(main, backend="asyncio")
    return results


def run_arm(tree: Path | None, calls: int) -> dict[str, Any]:
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = str(tree / "python")
    out = subprocess.run(
        [sys.executable, "-P", __file__, "--one", str(calls)], env=env, check=True, capture_output=True, text=True
    ).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer calls")
    parser.add_argument("--calls", type=int, default=None, help="calls per measurement (default 4000, 800 quick)")
    parser.add_argument("--before", type=Path, default=None, help="another checkout, run beside this one in turns")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per arm (default 1, 3 with --before)")
    parser.add_argument("--out", type=Path, default=Path(_HERE) / "out")
    parser.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)  # a child: measure, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return
    calls = args.calls or (800 if args.quick else 4000)
    trees: dict[str, Path | None] = {"after": None}
    if args.before:
        trees = {"before": args.before.resolve(), **trees}
    rounds = args.rounds or (3 if args.before else 1)
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in trees}
    for r in range(rounds):
        for arm in list(trees) if r % 2 == 0 else list(reversed(trees)):
            runs[arm].append(run_arm(trees[arm], calls))
    summary = {
        arm: {
            kind: {key: statistics.median(run[kind][key] for run in arm_runs) for key in arm_runs[0][kind]}
            for kind in arm_runs[0]
        }
        for arm, arm_runs in runs.items()
    }
    print(f"Python path per 1-document Embed call, transport aside (CPU us per call; {os.cpu_count()} cpus)")
    print(f"{'arm':<7} {'text':<8} {'chars':>5} {'tokenize':>9}" + "".join(f" {'path @' + str(c):>9}" for c in CALLERS))
    for arm, kinds in summary.items():
        for kind, row in kinds.items():
            cells = "".join(f" {row[f'path_us_{c}']:>9.0f}" for c in CALLERS)
            print(f"{arm:<7} {kind:<8} {row['chars']:>5.0f} {row['tokenize_us']:>9.1f}{cells}")
    if "before" in summary:
        for kind in summary["after"]:
            ratios = ", ".join(
                f"{c} caller(s) {summary['after'][kind][f'path_us_{c}'] / summary['before'][kind][f'path_us_{c}']:.2f}x"
                for c in CALLERS
            )
            print(f"after/before, {kind}: {ratios}")
    report = {
        "question": "CPU per 1-document Embed call of the Python path (parse, core.embed, pack), transport aside",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "calls_per_measurement": calls,
        "rounds": rounds,
        "statistic": "median over rounds; path = call - tokenizing the text alone",
        "summary": summary,
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "call_path.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out / 'call_path.json'}")


if __name__ == "__main__":
    main()
