"""End-to-end serving throughput and latency vs the raw ONNX Runtime engine (and sentence-transformers).

    python bench/serve.py [--quick] [--device cpu|cuda] [--out DIR]

Starts `embedpool serve` as a separate process (so the load generator does not share its GIL), drives it
over loopback with N concurrent clients at several concurrency levels on the shared real-text corpus, and in
the same run measures the baselines:
- raw ONNX Runtime on the very model file the service uses, the best a user could write: pre-tokenized, sorted
  by token count, each batch padded to its longest, the batch size swept (8 ... 256 on CPU, up to 1024 on a
  GPU) and the best kept (embedpool bench's engine baseline) — so the ratio measures serving overhead honestly;
- raw ONNX Runtime on the fp32 graph (the CPU goal is stated against it);
- sentence-transformers, where it is importable (or from --baseline-site DIR, e.g. `pip install --target DIR
  sentence-transformers`, which keeps torch out of .venv), its batch_size swept the same way;
- authentication off vs on (`--auth keys`, every call with an API key): two servers side by side, driven in
  alternating rounds, for Embed throughput and the per-call cost on a call without inference (GetModelInfo);
- the doors, on one server in alternating rounds at the best concurrency: gRPC Embed through the raw stub,
  HTTP /v1/embeddings with `float` and with `base64` vectors (httpx, responses parsed as a caller would), and
  gRPC through embedpool.client (its overhead over the raw stub).
Prints a table, writes DIR/serve.json and DIR/serve.png (throughput and p99 vs concurrency).

    python bench/serve.py --engine null [--quick] [--out DIR]

The front end's ceiling instead: the server started with `--device null` (the whole serving path, inference
taken out) and a GPU's batching (65,536 tokens, 256 documents), 16 concurrent callers at 1, 8, 32 and 128
documents per Embed call: docs/s, tokens/s, latency, and the server's CPU (cores busy and CPU ms per call); beside
each, the bare tokenizer on the same texts and cores in the same run (bench/frontend.py's `bare_tokenizer`, one
thread per core). Writes DIR/frontend_serve.json.
"""

from __future__ import annotations

import os
import sys

# Run as a script, this folder comes first on sys.path and bench/tokenize.py would shadow the stdlib
# `tokenize`; keep the folder, but last, for `corpus`.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

import argparse
import asyncio
import json
import platform
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import orjson
from corpus import passages

from embedpool.benchmark.engine_baseline import engine_sweep
from embedpool.benchmark.st_baseline import st_sweep
from embedpool.benchmark.sweep import default_batch_sizes
from embedpool.client import AsyncClient
from embedpool.config import Settings
from embedpool.engine import pick_device, prepare, serving_variant
from embedpool.model import ModelBundle, default_checkpoint
from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc


def raw_engine(bundle: ModelBundle, variant: str, device: str, texts: list[str], threads: int) -> dict[str, Any]:
    """The engine loop a user would write at its best: embedpool bench's engine baseline (tokenized up front,
    sorted by token count, each batch padded to its longest, the batch size swept) on the very file the service
    runs; the best batch size's docs/s, with the whole sweep."""
    result = engine_sweep(
        bundle,
        texts,
        list(default_batch_sizes(device)),
        variant=variant,
        device=device,
        threads=threads,
    )
    best = result["best"]
    return {
        "docs_per_s": best["docs_per_s"],
        "tokens_per_s": best["tokens_per_s"],
        "batch_size": best["batch_size"],
        "variant": result["variant"],
        "sweep": result["sweep"],
    }


def sentence_transformers_baseline(texts: list[str], device: str) -> dict[str, Any] | None:
    """sentence-transformers with its batch_size swept (embedpool bench's baseline); None where not importable."""
    result = st_sweep(default_checkpoint(), texts, list(default_batch_sizes(device)), device=device)
    if result.get("best") is None:
        return None
    return {**result["best"], "precision": result["precision"], "sweep": result["sweep"]}


def start_server(
    args: argparse.Namespace, model_dir: Path, data_dir: Path, *extra: str, tree: Path | None = None
) -> tuple[subprocess.Popen[str], int, int]:
    """The server process, its gRPC port and its HTTP port. `tree`: a checkout whose embedpool it runs (its own
    `_native` built), instead of this one's."""
    cmd = [sys.executable, "-m", "embedpool.cli", "serve", "--port", "0", "--metrics-port", "-1", "--http-port", "0"]
    cmd += extra
    cmd += ["--model", str(model_dir), "--data-dir", str(data_dir), "--device", args.device, "--variant", args.variant]
    # No query cache: the corpus cycles, and calls of a few texts would be answered from it rather than served
    # (bench/query_cache.py measures the cache).
    cmd += ["--log-level", "info", "--max-concurrent-inputs", "65536", "--query-cache-bytes", "0"]
    env = {**os.environ, "EMBEDPOOL_LOG_FORMAT": "json", "EMBEDPOOL_LOG_LEVEL": "info"}
    if tree is not None:
        env["PYTHONPATH"] = str(tree / "python")
    proc = subprocess.Popen(cmd + list(args.server_arg), stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    logged: list[str] = []
    for line in proc.stderr:
        if line.startswith("{") and '"port"' in line:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the log pipe drained
            ready = json.loads(line)
            return proc, int(ready["port"]), int(ready["http_port"])
        logged = [*logged[-19:], line]
    raise RuntimeError(f"server exited with {proc.wait()}; its last lines:\n{''.join(logged)}")


Metadata = tuple[tuple[str, str], ...]
KEYS_CREATE = (sys.executable, "-m", "embedpool.cli", "keys", "create")


Call = Callable[[list[str]], Awaitable[tuple[int, int]]]
"""One request of a batch of texts: (documents embedded, tokens)."""


async def closed_loop(
    call: Call, texts: list[str], concurrency: int, per_request: int, seconds: float
) -> dict[str, Any]:
    """`concurrency` clients, each sending requests of `per_request` documents back to back for `seconds` (after
    one warm-up request): docs/s, tokens/s and latency quantiles."""
    requests = [texts[i : i + per_request] for i in range(0, len(texts), per_request)]
    latencies: list[float] = []
    docs = tokens = cursor = 0
    await call(requests[0])
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal docs, tokens, cursor
        while time.perf_counter() < deadline:
            batch = requests[cursor % len(requests)]
            cursor += 1
            t0 = time.perf_counter()
            embedded, counted = await call(batch)  # not `docs += (await ...)[0]`: docs would be read before it
            latencies.append(time.perf_counter() - t0)
            docs += embedded
            tokens += counted

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    q = np.quantile(latencies, [0.5, 0.95, 0.99]) * 1000
    return {
        "concurrency": concurrency,
        "docs_per_request": per_request,
        "docs_per_s": docs / elapsed,
        "tokens_per_s": tokens / elapsed,
        "p50_ms": float(q[0]),
        "p95_ms": float(q[1]),
        "p99_ms": float(q[2]),
        "requests": len(latencies),
    }


async def drive(
    port: int, texts: list[str], concurrency: int, per_request: int, seconds: float, metadata: Metadata = ()
) -> dict[str, Any]:
    """gRPC Embed through the raw generated stub."""
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 1 << 28)]
    ) as ch:
        stub = pb_grpc.EmbedderStub(ch)

        async def call(batch: list[str]) -> tuple[int, int]:
            request = pb.EmbedRequest(documents=[pb.Document(text=t) for t in batch])
            reply = await stub.Embed(request, metadata=metadata)
            return len(reply.vectors), sum(reply.token_counts)

        return await closed_loop(call, texts, concurrency, per_request, seconds)


async def drive_http(
    port: int, texts: list[str], concurrency: int, per_request: int, seconds: float, encoding: str, model: str
) -> dict[str, Any]:
    """HTTP /v1/embeddings through httpx, each response parsed (orjson) as a caller would."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=60) as http:

        async def call(batch: list[str]) -> tuple[int, int]:
            body = orjson.dumps({"input": batch, "model": model, "encoding_format": encoding})
            reply = await http.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
            reply.raise_for_status()
            parsed = orjson.loads(reply.content)
            return len(parsed["data"]), int(parsed["usage"]["total_tokens"])

        return await closed_loop(call, texts, concurrency, per_request, seconds)


async def drive_client(
    port: int, texts: list[str], concurrency: int, per_request: int, seconds: float
) -> dict[str, Any]:
    """gRPC Embed through embedpool.client (vectors come back as one numpy array per call)."""
    async with AsyncClient(f"127.0.0.1:{port}") as client:

        async def call(batch: list[str]) -> tuple[int, int]:
            return len(await client.embed(batch)), 0  # the client returns vectors only

        return await closed_loop(call, texts, concurrency, per_request, seconds)


def doors(
    args: argparse.Namespace, port: int, http_port: int, texts: list[str], concurrency: int, seconds: float
) -> dict[str, Any]:
    """gRPC (raw stub), HTTP float, HTTP base64 and embedpool.client on one server, in rounds that rotate which
    arm goes first (the machine's noise drifts). Medians of the rounds, and their ratios to the raw stub."""
    model = "all-MiniLM-L6-v2"
    arms: dict[str, Any] = {
        "grpc_stub": lambda: drive(port, texts, concurrency, args.per_request, seconds),
        "http_float": lambda: drive_http(http_port, texts, concurrency, args.per_request, seconds, "float", model),
        "http_base64": lambda: drive_http(http_port, texts, concurrency, args.per_request, seconds, "base64", model),
        "grpc_client": lambda: drive_client(port, texts, concurrency, args.per_request, seconds),
    }
    rounds = 3 if args.quick else 5
    runs: dict[str, list[float]] = {name: [] for name in arms}
    names = list(arms)
    for i in range(rounds):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            runs[name].append(asyncio.run(arms[name]())["docs_per_s"])
    docs = {name: statistics.median(values) for name, values in runs.items()}
    return {
        "concurrency": concurrency,
        "docs_per_request": args.per_request,
        "rounds": rounds,
        "docs_per_s_rounds": runs,
        "docs_per_s": docs,
        "http_float_vs_grpc": docs["http_float"] / docs["grpc_stub"],
        "http_base64_vs_grpc": docs["http_base64"] / docs["grpc_stub"],
        "client_vs_stub": docs["grpc_client"] / docs["grpc_stub"],
    }


async def idle_latency(port: int, n: int) -> dict[str, float]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.EmbedderStub(ch)
        request = pb.EmbedRequest(documents=[pb.Document(text="a short query about python generators")])
        for _ in range(10):
            await stub.Embed(request)
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            await stub.Embed(request)
            samples.append(time.perf_counter() - t0)
    q = np.quantile(samples, [0.5, 0.99]) * 1000
    return {"p50_ms": float(q[0]), "p99_ms": float(q[1]), "mean_ms": statistics.fmean(samples) * 1000}


async def call_costs(ports: dict[str, tuple[int, Metadata]], blocks: int, per_block: int) -> dict[str, Any]:
    """Microseconds per GetModelInfo round trip (no inference, no database: the transport, the interceptor and
    the handler) on each server, in short alternating blocks so that the machine's drift hits both alike.
    Returns the median block of each, and the median of the blocks' paired differences."""
    channels = {k: grpc.aio.insecure_channel(f"127.0.0.1:{port}") for k, (port, _) in ports.items()}
    per: dict[str, list[float]] = {k: [] for k in ports}
    try:
        stubs = {k: pb_grpc.EmbedderStub(ch) for k, ch in channels.items()}
        for _ in range(blocks + 1):  # the first block warms up and is dropped
            for k, stub in stubs.items():
                metadata = ports[k][1]
                t0 = time.perf_counter()
                for _ in range(per_block):
                    await stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata)
                per[k].append((time.perf_counter() - t0) / per_block * 1e6)
    finally:
        for ch in channels.values():
            await ch.close()
    blocks = {k: v[1:] for k, v in per.items()}

    def paired(a: str, b: str) -> float:
        return statistics.median(y - x for x, y in zip(blocks[a], blocks[b], strict=True))

    return {
        "blocks_us": blocks,
        **{f"{k}_us": statistics.median(v) for k, v in blocks.items()},
        "overhead_us": paired("off", "on"),
        # The same header sent to the server that ignores it: the client's cost of sending it, so that
        # on - off_with_header is what the server spends on authentication.
        "client_header_us": paired("off", "off_with_header"),
        "server_auth_us": paired("off_with_header", "on"),
    }


async def authenticate_cost(data_dir: Path, key: str, n: int) -> float:
    """Microseconds per `Authenticator.authenticate` in this process, on the keyed server's database with the
    key cached: what authentication itself costs, without the transport's noise around it."""
    from embedpool.security.authenticator import Authenticator
    from embedpool.store import Store
    from embedpool.store.embedded import running_uri

    url = running_uri(data_dir / "pg")
    assert url is not None, "the keyed server's Postgres is not running"
    store = await Store.open(url, max_size=1)
    try:
        auth = Authenticator(store, required=True)
        async with auth.running():
            header = f"Bearer {key}"
            for _ in range(100):
                await auth.authenticate(header)
            t0 = time.perf_counter()
            for _ in range(n):
                await auth.authenticate(header)
            return (time.perf_counter() - t0) / n * 1e6
    finally:
        await store.close()


def auth_overhead(
    args: argparse.Namespace, model_dir: Path, texts: list[str], concurrency: int, seconds: float, rounds: int
) -> dict[str, Any]:
    """The same load on a server without authentication and one with `--auth keys`, in alternating rounds (the
    machine's noise drifts; alternating spreads it over both). Medians of the rounds."""
    with tempfile.TemporaryDirectory() as off_dir, tempfile.TemporaryDirectory() as on_dir:
        created = subprocess.run(
            [*KEYS_CREATE, "--data-dir", on_dir, "--tenant", "bench", "--role", "writer"],
            capture_output=True,
            text=True,
            check=True,
        )
        key = json.loads(created.stdout)["key"]
        metadata: Metadata = (("authorization", f"Bearer {key}"),)
        off, off_port, _ = start_server(args, model_dir, Path(off_dir))
        on, on_port, _ = start_server(args, model_dir, Path(on_dir), "--auth", "keys")
        throughput: dict[str, list[float]] = {"off": [], "on": []}
        try:
            arms = [("off", off_port, ()), ("on", on_port, metadata)]
            for i in range(rounds):
                for label, port, md in arms if i % 2 == 0 else arms[::-1]:  # neither always goes first
                    load = asyncio.run(drive(port, texts, concurrency, args.per_request, seconds, md))
                    throughput[label].append(load["docs_per_s"])
            calls = asyncio.run(
                call_costs(
                    {"off": (off_port, ()), "off_with_header": (off_port, metadata), "on": (on_port, metadata)},
                    10 if args.quick else 30,
                    200,
                )
            )
            authenticate_us = asyncio.run(authenticate_cost(Path(on_dir), key, 20_000))
        finally:
            for proc in (off, on):
                proc.terminate()
                proc.wait(60)
    docs = {k: statistics.median(v) for k, v in throughput.items()}
    return {
        "concurrency": concurrency,
        "rounds": rounds,
        "docs_per_s_rounds": throughput,
        "off": {"docs_per_s": docs["off"], "call_us": calls["off_us"]},
        "on": {"docs_per_s": docs["on"], "call_us": calls["on_us"]},
        "throughput_on_vs_off": docs["on"] / docs["off"],
        "call_overhead_us": calls["overhead_us"],
        "client_header_us": calls["client_header_us"],
        "server_auth_us": calls["server_auth_us"],
        "call_blocks_us": calls["blocks_us"],
        "authenticate_us": authenticate_us,
    }


FRONT_END_CALL_SIZES = (1, 8, 32, 128)
FRONT_END_CALLERS = 16


def front_end(args: argparse.Namespace) -> None:
    """The ceiling table of a `--device null` server (see the module docstring); with `--before DIR`, of that
    checkout's server too, the two driven in turn round by round."""
    import contextlib

    import psutil
    from frontend import bare_tokenizer, load_tokenizer

    cores = os.cpu_count() or 1
    seconds = args.seconds or (4 if args.quick else 15)
    rounds = args.rounds or (2 if args.before else 1)
    texts = passages(n=4096)
    tokenizer, _, _ = load_tokenizer()
    args.device, args.variant = "null", "auto"
    trees: dict[str, Path | None] = {"after": None}
    if args.before:
        trees = {"before": args.before.resolve(), **trees}
    runs: dict[str, dict[str, list[Any]]] = {
        arm: {"per_call": [], **{str(n): [] for n in FRONT_END_CALL_SIZES}} for arm in trees
    }
    bare: dict[int, dict[str, float]] = {}
    with contextlib.ExitStack() as stack:
        gpu_batching = ("--max-batch-tokens", "65536", "--max-batch-size", "256")
        servers: dict[str, tuple[int, Any]] = {}
        for arm, tree in trees.items():
            data_dir = stack.enter_context(tempfile.TemporaryDirectory())
            proc, port, _ = start_server(args, prepare(Settings()).root, Path(data_dir), *gpu_batching, tree=tree)
            stack.callback(proc.wait, 60)
            stack.callback(proc.terminate)
            servers[arm] = (port, psutil.Process(proc.pid))
            asyncio.run(drive(port, texts, FRONT_END_CALLERS, 8, min(1.0, seconds)))  # warm: connections, first calls
        for r in range(rounds):
            order = list(trees) if r % 2 == 0 else list(reversed(trees))
            for arm in order:
                port, server = servers[arm]
                per_call = asyncio.run(server_cpu_per_call(port, server, 200 if args.quick else 3000))
                cpu_before = sum(server.cpu_times()[:2])
                calls = asyncio.run(model_info_load(port, FRONT_END_CALLERS, min(seconds, 5.0)))
                per_call["model_info_loaded"] = (sum(server.cpu_times()[:2]) - cpu_before) / calls * 1e6
                runs[arm]["per_call"].append(per_call)
            for size in FRONT_END_CALL_SIZES:
                for arm in order:
                    port, server = servers[arm]
                    cpu_before, wall_before = sum(server.cpu_times()[:2]), time.perf_counter()
                    load = asyncio.run(drive(port, texts, FRONT_END_CALLERS, size, seconds))
                    cpu = sum(server.cpu_times()[:2]) - cpu_before
                    wall = time.perf_counter() - wall_before
                    load["server_cores_busy"] = cpu / wall
                    load["server_cpu_ms_per_call"] = cpu / max(1, load["requests"]) * 1000
                    runs[arm][str(size)].append(load)
                if r == 0:
                    bare[size] = bare_tokenizer(tokenizer, texts, size, cores, min(seconds, 5.0))

    def median_of(values: list[dict[str, Any]], key: str) -> float:
        return float(statistics.median(v[key] for v in values))

    summaries: dict[str, dict[str, Any]] = {}
    for arm in trees:
        rows = []
        for size in FRONT_END_CALL_SIZES:
            loads = runs[arm][str(size)]
            row: dict[str, Any] = {"docs_per_request": size, "requests": sum(x["requests"] for x in loads)}
            for key in (
                "docs_per_s",
                "tokens_per_s",
                "p50_ms",
                "p99_ms",
                "server_cores_busy",
                "server_cpu_ms_per_call",
            ):
                row[key] = median_of(loads, key)
            row["bare_tokenizer"] = bare[size]
            row["vs_bare_tokenizer"] = row["tokens_per_s"] / bare[size]["tokens_per_s"]
            rows.append(row)
        per_call = {key: median_of(runs[arm]["per_call"], key) for key in runs[arm]["per_call"][0]}
        # Under the table's load, a 1-document Embed's server CPU beyond the transport (GetModelInfo at the same
        # concurrency) and beyond tokenizing its text (the bare tokenizer's CPU per document, all cores busy):
        # what the Python path itself costs per call.
        one = rows[0]
        tokenize_us = cores / one["bare_tokenizer"]["docs_per_s"] * 1e6
        per_call["tokenize_loaded"] = tokenize_us
        per_call["embed_path_loaded"] = (
            one["server_cpu_ms_per_call"] * 1e3 - per_call["model_info_loaded"] - tokenize_us
        )
        summaries[arm] = {"rows": rows, "server_cpu_us_per_call": per_call}
    report: dict[str, Any] = {
        "question": "the front end's ceiling: the whole server path with no inference, beside the bare tokenizer",
        "machine": {"cpus": cores, "platform": platform.platform(), "python": platform.python_version()},
        "server": {"device": "null", "max_batch_tokens": 65536, "max_batch_size": 256, "extra": args.server_arg},
        "callers": FRONT_END_CALLERS,
        "seconds_per_size": seconds,
        "rounds": rounds,
        "statistic": "median over rounds",
        "corpus": {"docs": len(texts), "mean_chars": float(np.mean([len(t) for t in texts]))},
        **summaries["after"],
        "runs": runs,
        "load_average_end": os.getloadavg(),
    }
    if args.before:
        report["before"] = {"tree": str(args.before), **summaries["before"]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "frontend_serve.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"front-end ceiling: --device null, {FRONT_END_CALLERS} callers, {cores} cpus, {seconds:g} s per size")
    for arm in trees:
        rows, per_call = summaries[arm]["rows"], summaries[arm]["server_cpu_us_per_call"]
        if len(trees) > 1:
            print(f"[{arm}]")
        print(
            f"{'docs/call':>9}{'docs/s':>10}{'tokens/s':>12}{'p50 ms':>8}{'p99 ms':>8}{'srv cores':>10}"
            f"{'ms cpu/call':>12}{'bare tok/s':>12}{'vs bare':>8}"
        )
        for r in rows:
            print(
                f"{r['docs_per_request']:>9}{r['docs_per_s']:>10.0f}{r['tokens_per_s']:>12,.0f}{r['p50_ms']:>8.1f}"
                f"{r['p99_ms']:>8.1f}{r['server_cores_busy']:>10.2f}{r['server_cpu_ms_per_call']:>12.3f}"
                f"{r['bare_tokenizer']['tokens_per_s']:>12,.0f}{r['vs_bare_tokenizer']:>8.2f}"
            )
        print(
            f"server CPU per sequential call: Embed of one short text {per_call['embed_one']:.0f} us, GetModelInfo"
            f" {per_call['model_info']:.0f} us; the embed path beyond the transport {per_call['embed_path']:.0f} us"
        )
        print(
            f"under {FRONT_END_CALLERS} callers, per 1-document call: Embed"
            f" {rows[0]['server_cpu_ms_per_call'] * 1e3:.0f} us, GetModelInfo {per_call['model_info_loaded']:.0f} us,"
            " tokenizing its text"
            f" {per_call['tokenize_loaded']:.0f} us; the embed path beyond both {per_call['embed_path_loaded']:.0f} us"
        )
    if args.before:
        print("after / before:")
        for a, b in zip(summaries["after"]["rows"], summaries["before"]["rows"], strict=True):
            print(
                f"  {a['docs_per_request']:>4} docs/call: docs/s {a['docs_per_s'] / b['docs_per_s']:.2f}x,"
                f" server CPU per call {a['server_cpu_ms_per_call'] / b['server_cpu_ms_per_call']:.2f}x"
            )
        after, before = (summaries[arm]["server_cpu_us_per_call"] for arm in ("after", "before"))
        print(f"  embed path beyond the transport: {after['embed_path']:.0f} us vs {before['embed_path']:.0f} us")
        print(
            f"  under load, beyond transport and tokenizing: {after['embed_path_loaded']:.0f} us"
            f" vs {before['embed_path_loaded']:.0f} us"
        )
    print(f"wrote {args.out / 'frontend_serve.json'}")


async def model_info_load(port: int, concurrency: int, seconds: float) -> int:
    """`concurrency` callers sending GetModelInfo back to back for `seconds` (closed_loop): the calls made. What the
    transport, the interceptors and a handler without work cost per call at the load the front-end table runs."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.EmbedderStub(ch)

        async def call(_: list[str]) -> tuple[int, int]:
            await stub.GetModelInfo(pb.GetModelInfoRequest())
            return 0, 0

        load = await closed_loop(call, [""], concurrency, 1, seconds)
    return max(1, int(load["requests"]) + 1)  # and closed_loop's warm-up call, inside the CPU measured


async def server_cpu_per_call(port: int, server: Any, calls: int) -> dict[str, float]:
    """The server's CPU microseconds per call, one caller at a time: Embed of one short text and GetModelInfo (the
    transport, interceptors and a handler without work), in alternating blocks; their difference is what the embed
    path itself costs (parse, validate, admit, tokenize, schedule, fan back, pack)."""
    request = pb.EmbedRequest(documents=[pb.Document(text="a short query about python generators")])
    spent = {"embed_one": 0.0, "model_info": 0.0}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.EmbedderStub(ch)
        arms: dict[str, Callable[[], Awaitable[Any]]] = {
            "embed_one": lambda: stub.Embed(request),
            "model_info": lambda: stub.GetModelInfo(pb.GetModelInfoRequest()),
        }
        block = 100
        for _ in range(max(1, calls // block)):
            for name, call in arms.items():
                before = sum(server.cpu_times()[:2])
                for _ in range(block):
                    await call()
                spent[name] += sum(server.cpu_times()[:2]) - before
    per = {name: seconds / (max(1, calls // block) * block) * 1e6 for name, seconds in spent.items()}
    per["embed_path"] = per["embed_one"] - per["model_info"]
    return per


def plot(levels: list[dict[str, Any]], raw: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    xs = [lv["concurrency"] for lv in levels]
    left.plot(xs, [lv["docs_per_s"] for lv in levels], "o-", label="embedpool (gRPC, end to end)")
    raw_label = f"raw ORT ({raw['variant']}, best batch size {raw['batch_size']})"
    left.axhline(raw["docs_per_s"], color="gray", linestyle="--", label=raw_label)
    left.set(xscale="log", xlabel="concurrent clients", ylabel="docs/s", title="throughput")
    left.legend()
    right.plot(xs, [lv["p99_ms"] for lv in levels], "o-", color="C3", label="p99")
    right.plot(xs, [lv["p50_ms"] for lv in levels], "o-", color="C2", label="p50")
    right.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="ms per request", title="latency")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small corpus and short runs (< 3 min on 2 cores)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument(
        "--engine",
        choices=("onnx", "null"),
        default="onnx",
        help="null: the front end's ceiling, a `--device null` server beside the bare tokenizer (nothing else)",
    )
    parser.add_argument("--variant", default="auto")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    parser.add_argument("--levels", default=None, help="comma-separated concurrency levels")
    parser.add_argument("--per-request", type=int, default=32, help="documents per Embed request")
    parser.add_argument("--seconds", type=float, default=None, help="duration of each level")
    parser.add_argument("--server-arg", action="append", default=[], help="extra `embedpool serve` argument")
    parser.add_argument("--no-auth", action="store_true", help="skip the authentication off/on comparison")
    parser.add_argument(
        "--before",
        type=Path,
        help="with --engine null: another checkout (its _native built) whose server runs beside this one's, in turns",
    )
    parser.add_argument("--rounds", type=int, default=None, help="with --engine null: rounds per arm (2 with --before)")
    parser.add_argument("--no-doors", action="store_true", help="skip the gRPC vs HTTP vs client comparison")
    parser.add_argument(
        "--baseline-site",
        type=Path,
        help="a directory with sentence-transformers and torch (pip install --target DIR ...), appended to this"
        " process's sys.path for the baseline only: the project's own packages still win, and .venv stays torch-free",
    )
    args = parser.parse_args()
    if args.engine == "null":
        front_end(args)
        return
    if args.baseline_site:
        sys.path.append(str(args.baseline_site.resolve()))
    args.device = args.device or pick_device("auto")
    cuda = args.device == "cuda"
    bundle = prepare(Settings())
    if args.variant == "auto":  # what the server's auto picks
        chosen = serving_variant("auto", args.device, bundle)
        args.variant = chosen if chosen != "auto" else ("fp16" if cuda else "fp32_opt")
    n_docs = (4096 if cuda else 256) if args.quick else (50_000 if cuda else 1024)
    seconds = args.seconds or ((6 if cuda else 8) if args.quick else (20 if cuda else 30))
    levels = [int(x) for x in (args.levels or ("1,8,64,256" if cuda else "1,4,16")).split(",")]
    corpus = passages(n=n_docs)  # as many passages as the installed docstrings give (a few thousand)
    texts = [corpus[i % len(corpus)] for i in range(n_docs)]  # a GPU needs more than that to time
    threads = os.cpu_count() or 1

    raw = raw_engine(bundle, args.variant, args.device, texts, threads)
    raw_fp32 = raw if args.variant == "fp32" else raw_engine(bundle, "fp32", args.device, texts, threads)
    st = sentence_transformers_baseline(texts, args.device)

    with tempfile.TemporaryDirectory() as data_dir:
        proc, port, http_port = start_server(args, bundle.root, Path(data_dir))
        try:
            idle = asyncio.run(idle_latency(port, 100 if args.quick else 500))
            results = [asyncio.run(drive(port, texts, c, args.per_request, seconds)) for c in levels]
            best = max(results, key=lambda r: r["docs_per_s"])
            door = None if args.no_doors else doors(args, port, http_port, texts, best["concurrency"], seconds)
        finally:
            proc.terminate()
            proc.wait(60)

    auth = None
    if not args.no_auth:
        auth = auth_overhead(args, bundle.root, texts, best["concurrency"], seconds, 4 if args.quick else 6)
    ratios = {
        "service_vs_raw_ort": best["docs_per_s"] / raw["docs_per_s"],
        "service_vs_raw_ort_fp32": best["docs_per_s"] / raw_fp32["docs_per_s"],
    }
    if st is not None:
        ratios["service_vs_sentence_transformers"] = best["docs_per_s"] / st["docs_per_s"]
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "device": args.device},
        "variant": args.variant,
        "corpus": {"docs": len(texts), "mean_chars": float(np.mean([len(t) for t in texts]))},
        "raw_ort": raw,
        "raw_ort_fp32": raw_fp32,
        "sentence_transformers": st,
        "idle_one_short_text": idle,
        "levels": results,
        "ratios": ratios,
        "auth": auth,
        "doors": door,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve.json").write_text(json.dumps(report, indent=2))
    plot(results, raw, args.out / "serve.png")

    print(f"device={args.device} variant={args.variant} docs={len(texts)} cpus={os.cpu_count()}")
    print(f"{'what':<34}{'docs/s':>10}{'tokens/s':>12}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}")
    label = f"raw ORT {args.variant} b={raw['batch_size']}"
    print(f"{label:<34}{raw['docs_per_s']:>10.1f}{raw['tokens_per_s']:>12.0f}")
    if raw_fp32 is not raw:
        label = f"raw ORT fp32 b={raw_fp32['batch_size']}"
        print(f"{label:<34}{raw_fp32['docs_per_s']:>10.1f}{raw_fp32['tokens_per_s']:>12.0f}")
    if st is not None:
        label = f"sentence-transformers {st['precision']} b={st['batch_size']}"
        print(f"{label:<34}{st['docs_per_s']:>10.1f}")
    for r in results:
        label = f"embedpool c={r['concurrency']} x{r['docs_per_request']}"
        print(
            f"{label:<34}{r['docs_per_s']:>10.1f}{r['tokens_per_s']:>12.0f}"
            f"{r['p50_ms']:>9.1f}{r['p95_ms']:>9.1f}{r['p99_ms']:>9.1f}"
        )
    print(f"{'idle, one short text':<34}{'':>22}{idle['p50_ms']:>9.2f}{'':>9}{idle['p99_ms']:>9.2f}")
    if auth is not None:
        for label in ("off", "on"):
            name = f"auth {label} c={auth['concurrency']} x{args.per_request}"
            print(f"{name:<34}{auth[label]['docs_per_s']:>10.1f}   GetModelInfo {auth[label]['call_us']:.0f} us/call")
        ratios["auth_on_vs_off_throughput"] = auth["throughput_on_vs_off"]
        print(
            f"auth: per-call overhead {auth['call_overhead_us']:.1f} us over loopback (median of paired blocks):"
            f" client sending the header {auth['client_header_us']:.1f} us, server {auth['server_auth_us']:.1f} us;"
            f" authenticate() itself {auth['authenticate_us']:.1f} us"
        )
    if door is not None:
        for name, value in door["docs_per_s"].items():
            label = f"{name} c={door['concurrency']} x{door['docs_per_request']}"
            print(f"{label:<34}{value:>10.1f}   {value / door['docs_per_s']['grpc_stub']:.2f}x the raw gRPC stub")
        for key in ("http_float_vs_grpc", "http_base64_vs_grpc", "client_vs_stub"):
            ratios[key] = door[key]
    print("ratios: " + ", ".join(f"{k}={v:.2f}" for k, v in ratios.items()))
    print(f"wrote {args.out / 'serve.json'} and {args.out / 'serve.png'}")


if __name__ == "__main__":
    main()
