"""`embedpool bench` against a real server, over gRPC and over HTTP: the JSON's fields, and that its counts add
up (documents = requests x documents per request, errors counted by status, the server's own counters agree).
Timings are recorded, never judged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from embedpool.benchmark.local_model import TokenCounter
from embedpool.model import load_model_dir
from embedpool.server.app import Running

from .conftest import Bench, grpc_target, http_target

SHORT = ["--tokens", "16", "--docs", "24", "--per-request", "4", "--concurrency", "1,3", "--warmup", "0.2"]
SMALL = ["--docs", "8", "--per-request", "2", "--concurrency", "2", "--warmup", "0", "--baseline", "none"]
LATENCY = {"p50", "p95", "p99", "max", "mean"}
SERVER = {
    "documents",
    "tokens",
    "batches",
    "batch_size_mean",
    "padding_efficiency",
    "padding_efficiency_batch_mean",
    "engine_busy",
    "rejections",
}


def check_step(step: dict[str, Any], per_request: int) -> None:
    """A step's counts agree with each other and with the server's counters."""
    assert step["docs_per_request"] == per_request
    assert step["requests"] == step["ok_requests"] + sum(step["errors"].values())
    assert step["docs"] == step["ok_requests"] * per_request
    assert set(step["latency_ms"]) == LATENCY
    assert step["elapsed_s"] > 0 and step["docs_per_s"] == pytest.approx(step["docs"] / step["elapsed_s"])
    server = step["server"]
    assert set(server) == SERVER
    assert server["documents"] == step["docs"]  # nothing else runs on this server meanwhile
    assert server["tokens"] == step["tokens"]  # the tokens counted here are the tokens the server counted
    assert server["batches"] >= 1 and 1 <= server["batch_size_mean"] <= step["docs"]
    assert 0 < server["padding_efficiency"] <= 1


def check_run(data: dict[str, Any], kind: str, per_request: int, steps: int) -> None:
    assert data["format"] == "embedpool-bench/1"
    assert data["complete"] and not data["interrupted"]
    assert data["target"]["kind"] == kind
    assert data["target"]["server"]["model"] == "all-MiniLM-L6-v2"
    assert data["metrics_urls"]
    assert len(data["steps"]) == steps
    for step in data["steps"] + data["warmup"]:
        assert step["target"] == kind and not step["partial"]
        check_step(step, per_request)


@pytest.fixture(scope="module")
def grpc_run(bench_server: Running, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from embedpool.cli import main

    out = tmp_path_factory.mktemp("grpc-run")
    assert (
        main(["bench", *grpc_target(bench_server), *SHORT, "--baseline", "none", "--out", str(out), "--no-progress"])
        == 0
    )
    data: dict[str, Any] = json.loads((out / "bench.json").read_text())
    return data


def test_closed_loop_over_grpc(grpc_run: dict[str, Any]) -> None:
    check_run(grpc_run, "grpc", per_request=4, steps=2)
    assert [s["concurrency"] for s in grpc_run["steps"]] == [1, 3]
    for step in grpc_run["steps"]:
        assert step["mode"] == "closed" and step["workload"] == "tokens=16"
        assert (step["requests"], step["docs"], step["tokens"], step["errors"]) == (6, 24, 24 * 16, {})
    (warmup,) = grpc_run["warmup"]
    assert warmup["mode"] == "warmup" and warmup["concurrency"] == 1 and warmup["requests"] >= 1
    (workload,) = grpc_run["workloads"]
    assert workload["docs"] == 24 and workload["tokens_mean"] == 16
    assert sum(s["docs"] for s in grpc_run["steps"]) == 48


def test_closed_loop_over_http(bench: Bench, bench_server: Running) -> None:
    data = bench(*http_target(bench_server), *SHORT, "--baseline", "none")
    check_run(data, "http", per_request=4, steps=2)
    assert data["settings"]["http_encoding"] == "base64"
    assert [(s["requests"], s["docs"], s["errors"]) for s in data["steps"]] == [(6, 24, {})] * 2


@pytest.mark.parametrize(("transport", "status"), [("grpc", "InvalidArgument"), ("http", "400")])
def test_refused_requests_are_counted_by_status(
    bench: Bench, bench_server: Running, tmp_path: Path, transport: str, status: str
) -> None:
    texts = [f"document number {i} about a subject" for i in range(7)]
    texts.insert(5, "   ")  # the server refuses a blank text: the request holding it fails, the others do not
    source = tmp_path / "texts.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    target = grpc_target(bench_server) if transport == "grpc" else http_target(bench_server)
    data = bench(*target, "--jsonl", str(source), *SMALL)
    (step,) = data["steps"]
    assert data["workloads"][0]["name"] == "jsonl:texts.jsonl"
    assert (step["requests"], step["ok_requests"], step["errors"], step["docs"]) == (4, 3, {status: 1}, 6)
    check_step(step, per_request=2)


def test_corpus_with_the_engine_baseline(bench: Bench, bench_server: Running, model_dir: Path) -> None:
    data = bench(
        *grpc_target(bench_server),
        "--docs", "8", "--per-request", "4", "--concurrency", "2", "--warmup", "0",
        "--baseline", "engine", "--batch-sizes", "4,8",
    )  # fmt: skip
    (step,) = data["steps"]
    check_step(step, per_request=4)
    counter = TokenCounter(load_model_dir(model_dir))
    from embedpool.benchmark.corpus import passages

    assert step["tokens"] == int(counter.count(passages(n=8)).sum())  # the same 8 passages, each sent once
    engine = data["baselines"]["corpus"]["engine"]
    assert engine["variant"] == "fp32" and engine["device"] == "cpu"  # the graph the server runs
    assert [p["batch_size"] for p in engine["sweep"]] == [4, 8]
    for point in engine["sweep"]:
        assert (point["docs"], point["tokens"], point["partial"]) == (8, step["tokens"], False)
        assert 0 < point["padding_efficiency"] <= 1
    assert engine["best"]["docs_per_s"] == max(p["docs_per_s"] for p in engine["sweep"])
    ratio = data["ratios"]["corpus"]["service_vs_engine"]
    assert ratio == pytest.approx(step["docs_per_s"] / engine["best"]["docs_per_s"])


def test_open_loop(bench: Bench, bench_server: Running) -> None:
    data = bench(
        *grpc_target(bench_server),
        "--tokens", "16", "--docs", "12", "--per-request", "2", "--warmup", "0", "--baseline", "none",
        "--concurrency", "none", "--rate", "40", "--arrivals", "uniform",
    )  # fmt: skip
    (step,) = data["steps"]
    assert (step["mode"], step["rate"], step["arrivals"], step["concurrency"]) == ("open", 40.0, "uniform", None)
    assert (step["requests"], step["docs"], step["errors"]) == (6, 12, {})
    check_step(step, per_request=2)
    # Six requests due 25 ms apart: the step lasts at least until the last one was due.
    assert step["elapsed_s"] >= 5 * 0.025


def test_compare_prints_ratios_of_matching_steps(
    bench: Bench, bench_server: Running, grpc_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from embedpool.cli import main

    http_run = bench(*http_target(bench_server), *SHORT, "--baseline", "none")
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(grpc_run))
    b.write_text(json.dumps(http_run))
    capsys.readouterr()
    assert main(["bench", "--compare", str(a), str(b)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"A = {a}: grpc") and lines[1].startswith(f"B = {b}: http")
    for step_a, step_b in zip(grpc_run["steps"], http_run["steps"], strict=True):
        (row,) = [line for line in lines if f"c={step_a['concurrency']} x4" in line]
        assert f"{step_b['docs_per_s'] / step_a['docs_per_s']:.2f}x" in row
    assert not [line for line in lines if line.startswith("only in")]


def test_replicas_are_taken_in_turn(bench: Bench, bench_server: Running) -> None:
    # Two names of one server: the client's round robin over replicas, and no /metrics port to guess for them.
    replicas = [f"127.0.0.1:{bench_server.port}", f"localhost:{bench_server.port}"]
    data = bench("--target", ",".join(replicas), "--tokens", "16", *SMALL)
    assert data["target"]["addresses"] == replicas
    (step,) = data["steps"]
    assert (step["requests"], step["docs"], step["errors"], step["server"]) == (4, 8, {}, None)
    assert any("--metrics URL,URL" in note for note in data["notes"])


@pytest.mark.parametrize(("transport", "refusal"), [("grpc", ": the API key is malformed"), ("http", " answered 401")])
def test_api_key(
    bench: Bench,
    keyed_server: Running,
    api_key: str,
    transport: str,
    refusal: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from embedpool.cli import main

    target = grpc_target(keyed_server) if transport == "grpc" else http_target(keyed_server)
    # A key the server refuses ends the run at its first call, with one line.
    assert main(["bench", *target, *SMALL, "--api-key", "ep_not-a-key", "--no-progress"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("embedpool: ") and refusal in line
    data = bench(*target, "--tokens", "16", *SMALL, "--api-key", api_key)
    (step,) = data["steps"]
    assert (step["requests"], step["docs"], step["errors"]) == (4, 8, {})
    check_step(step, per_request=2)
