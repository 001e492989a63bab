"""Two models on one server (issue 14): each model's throughput under a mixed load vs serving it alone.

    python -P bench/models.py [--quick] [--callers N] [--per-request N] [--seconds S] [--rounds R] [--out DIR]

Three `embedpool serve` processes (started as bench/serve.py starts one, each on its own embedded Postgres, the
query cache off: the corpus cycles and calls of a few short texts would be answered from it), all up for the
whole run: `--model a=DIR` (model `a` alone), `--model b=DIR` (model `b` alone) and
`--model a=DIR,b=DIR` (both). DIR is the bundled checkpoint (embedpool.model.default_checkpoint()) unless --b
names another: by default the two models are equal, the honest case for "does each keep its share". Arms, in
rounds whose order alternates (the box is noisy), each a closed loop over gRPC (the raw stub, EmbedRequest.model
set) on the shared real-text corpus:
- alone a: --callers clients on the `a` server;
- alone b: --callers clients on the `b` server;
- mixed: --callers clients on model `a` and --callers on model `b` at once, on the server with both.
Per arm and model: docs/s, p50/p99 per call, calls and errors (any failed call fails the run). Reported (medians
over rounds): each model's mixed docs/s vs alone, and the sum of the two mixed vs the mean of alone. On CPU the two
models of one server split the cores evenly (each pool gets half the intra-op threads), so the ideal is each
model at half its alone throughput and the sum at one alone: the sum's ratio is what multi-model serving costs
(or gains: two pools may fill the cores better than one). Prints a table, writes DIR/models.json.
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
import contextlib
import json
import platform
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from corpus import passages

from embedpool.model import default_checkpoint
from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc


@contextlib.contextmanager
def servers(*models: str, device: str, extra: list[str]) -> Iterator[list[int]]:
    """`embedpool serve --model M` for each M, started at once, each on a temporary data dir (its own embedded
    Postgres); their gRPC ports."""
    with contextlib.ExitStack() as stack:
        procs = []
        for m in models:
            data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="embedpool-models-"))
            cmd = [sys.executable, "-m", "embedpool.cli", "serve", "--port", "0", "--metrics-port", "-1"]
            cmd += ["--http-port", "-1", "--model", m, "--data-dir", data_dir, "--device", device]
            cmd += ["--log-level", "info", "--max-concurrent-inputs", "65536", "--query-cache-bytes", "0", *extra]
            env = {**os.environ, "EMBEDPOOL_LOG_FORMAT": "json", "EMBEDPOOL_LOG_LEVEL": "info"}
            proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
            procs.append(proc)
            stack.callback(proc.wait, 60)
            stack.callback(proc.terminate)
        ports = []
        for m, proc in zip(models, procs, strict=True):
            assert proc.stderr is not None
            for line in proc.stderr:
                if line.startswith("{") and '"port"' in line:
                    threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the log pipe drained
                    ports.append(int(json.loads(line)["port"]))
                    break
            else:
                raise RuntimeError(f"server --model {m} exited with {proc.wait()}")
        yield ports


async def closed_loop(
    port: int, model: str, texts: list[str], callers: int, per_request: int, seconds: float
) -> dict[str, Any]:
    """`callers` clients on model `model`, each sending Embed calls of `per_request` documents back to back for
    `seconds` (after one warm-up call): docs/s, p50/p99 per call, calls and errors."""
    requests = [texts[i : i + per_request] for i in range(0, len(texts), per_request)]
    latencies: list[float] = []
    errors: list[str] = []
    docs = cursor = 0
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 1 << 28)]
    ) as ch:
        stub = pb_grpc.EmbedderStub(ch)

        def request(batch: list[str]) -> pb.EmbedRequest:
            return pb.EmbedRequest(documents=[pb.Document(text=t) for t in batch], model=model)

        await stub.Embed(request(requests[0]))
        deadline = time.perf_counter() + seconds

        async def client() -> None:
            nonlocal docs, cursor
            while time.perf_counter() < deadline:
                batch = requests[cursor % len(requests)]
                cursor += 1
                t0 = time.perf_counter()
                try:
                    reply = await stub.Embed(request(batch))
                except grpc.aio.AioRpcError as e:
                    errors.append(f"{e.code().name}: {e.details()}")
                    continue
                latencies.append(time.perf_counter() - t0)
                if len(reply.vectors) != len(batch):
                    errors.append(f"{len(reply.vectors)} vectors for {len(batch)} documents")
                docs += len(reply.vectors)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(callers)))
        elapsed = time.perf_counter() - started
    q = np.quantile(latencies, [0.5, 0.99]) * 1000 if latencies else [float("nan")] * 2
    return {
        "docs_per_s": docs / elapsed,
        "p50_ms": float(q[0]),
        "p99_ms": float(q[1]),
        "calls": len(latencies),
        "errors": errors[:5],
        "error_count": len(errors),
    }


async def mixed(port: int, texts: list[str], callers: int, per_request: int, seconds: float) -> dict[str, Any]:
    """Both models at once on one server, `callers` clients each."""
    a, b = await asyncio.gather(
        closed_loop(port, "a", texts, callers, per_request, seconds),
        closed_loop(port, "b", texts[len(texts) // 2 :] + texts[: len(texts) // 2], callers, per_request, seconds),
    )
    return {"a": a, "b": b}


def median(rounds: list[dict[str, Any]], arm: str, model: str, key: str) -> float:
    return statistics.median(r[arm][model][key] for r in rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short arms and fewer rounds (< 2 min on 2 cores)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--b", type=Path, default=None, help="model b's checkpoint dir (default: the bundled one)")
    parser.add_argument("--callers", type=int, default=4, help="closed-loop clients per model")
    parser.add_argument("--per-request", type=int, default=8, help="documents per Embed call")
    parser.add_argument("--seconds", type=float, default=None, help="duration of each arm")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--docs", type=int, default=None, help="corpus size (texts cycle)")
    parser.add_argument("--server-arg", action="append", default=[], help="extra `embedpool serve` argument")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    args = parser.parse_args()
    seconds = args.seconds or (8.0 if args.quick else 20.0)
    rounds_n = args.rounds or (2 if args.quick else 5)
    n_docs = args.docs or (256 if args.quick else 1024)
    corpus = passages(n=n_docs)
    texts = [corpus[i % len(corpus)] for i in range(n_docs)]
    dir_a = default_checkpoint()
    dir_b = args.b.resolve() if args.b else dir_a

    rounds: list[dict[str, Any]] = []
    with servers(f"a={dir_a}", f"b={dir_b}", f"a={dir_a},b={dir_b}", device=args.device, extra=args.server_arg) as (
        port_a,
        port_b,
        port_ab,
    ):
        for i in range(rounds_n):
            arms = ["alone", "mixed"] if i % 2 == 0 else ["mixed", "alone"]
            result: dict[str, Any] = {"round": i, "order": arms}
            for arm in arms:
                if arm == "mixed":
                    result["mixed"] = asyncio.run(mixed(port_ab, texts, args.callers, args.per_request, seconds))
                else:
                    alone = {}
                    for model, port in (("a", port_a), ("b", port_b))[:: 1 if i % 2 == 0 else -1]:
                        alone[model] = asyncio.run(
                            closed_loop(port, model, texts, args.callers, args.per_request, seconds)
                        )
                    result["alone"] = alone
            rounds.append(result)
            line = " | ".join(
                f"{arm} a {result[arm]['a']['docs_per_s']:.1f} b {result[arm]['b']['docs_per_s']:.1f}" for arm in arms
            )
            print(f"round {i}: {line} docs/s", flush=True)

    summary: dict[str, Any] = {}
    for arm in ("alone", "mixed"):
        summary[arm] = {
            m: {k: median(rounds, arm, m, k) for k in ("docs_per_s", "p50_ms", "p99_ms", "calls")} for m in "ab"
        }
    mixed_sum = [r["mixed"]["a"]["docs_per_s"] + r["mixed"]["b"]["docs_per_s"] for r in rounds]
    alone_mean = [(r["alone"]["a"]["docs_per_s"] + r["alone"]["b"]["docs_per_s"]) / 2 for r in rounds]
    ratios = {
        "a_mixed_vs_alone": statistics.median(
            r["mixed"]["a"]["docs_per_s"] / r["alone"]["a"]["docs_per_s"] for r in rounds
        ),
        "b_mixed_vs_alone": statistics.median(
            r["mixed"]["b"]["docs_per_s"] / r["alone"]["b"]["docs_per_s"] for r in rounds
        ),
        "sum_mixed_vs_alone": statistics.median(s / m for s, m in zip(mixed_sum, alone_mean, strict=True)),
        "a_p99_mixed_vs_alone": summary["mixed"]["a"]["p99_ms"] / summary["alone"]["a"]["p99_ms"],
        "b_p99_mixed_vs_alone": summary["mixed"]["b"]["p99_ms"] / summary["alone"]["b"]["p99_ms"],
    }
    shared = args.device == "cpu"
    ideal = {
        "each_mixed_vs_alone": 0.5 if shared else None,
        "sum_mixed_vs_alone": 1.0 if shared else None,
        "why": "on CPU the two pools split the same cores evenly: each model half of alone, the sum one alone"
        if shared
        else "on a GPU the two models share one device: no fixed split",
    }
    errors = sum(r[arm][m]["error_count"] for r in rounds for arm in ("alone", "mixed") for m in "ab")
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "device": args.device, "load": load},
        "models": {"a": str(dir_a), "b": str(dir_b), "same_checkpoint": dir_a == dir_b},
        "options": {
            "callers_per_model": args.callers,
            "docs_per_request": args.per_request,
            "seconds": seconds,
            "rounds": rounds_n,
            "docs": n_docs,
            "server_args": args.server_arg,
        },
        "summary": summary,
        "sum_docs_per_s": {"mixed": statistics.median(mixed_sum), "alone_mean": statistics.median(alone_mean)},
        "ratios": ratios,
        "ideal": ideal,
        "errors": errors,
        "rounds": rounds,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "models.json").write_text(json.dumps(report, indent=2))

    print(
        f"device={args.device} cpus={os.cpu_count()} {args.callers} callers/model x{args.per_request} docs,"
        f" {seconds:.0f} s/arm, {rounds_n} rounds (medians); b {'= a' if dir_a == dir_b else dir_b}"
    )
    print(f"{'arm':<10}{'model':<7}{'docs/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'vs alone':>10}")
    for arm in ("alone", "mixed"):
        for m in "ab":
            s = summary[arm][m]
            rel = f"{ratios[f'{m}_mixed_vs_alone']:.2f}x" if arm == "mixed" else ""
            print(f"{arm:<10}{m:<7}{s['docs_per_s']:>10.1f}{s['p50_ms']:>10.1f}{s['p99_ms']:>10.1f}{rel:>10}")
    print(
        f"{'mixed':<10}{'a+b':<7}{report['sum_docs_per_s']['mixed']:>10.1f}{'':>20}"
        f"{ratios['sum_mixed_vs_alone']:>9.2f}x  (vs the mean of alone a and b)"
    )
    if shared:
        print("ideal on CPU (the two pools split the cores): each 0.50x of alone, the sum 1.00x")
    print(f"errors: {errors}; wrote {args.out / 'models.json'}")
    if errors:
        raise SystemExit(
            f"{errors} calls failed: {[r[a][m]['errors'] for r in rounds for a in ('alone', 'mixed') for m in 'ab']}"
        )


if __name__ == "__main__":
    main()
