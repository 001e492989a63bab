"""The GPU check between GPU loans: bench/gpu_check.py's CPU dry run (`--device cpu --quick`: every stage runs,
fidelity passes, the provider is the CPU's and recorded as such), and bench/gpu_stage.py's packing of what
`make gpu-check` stages into commands the device tool accepts."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = [
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
]
CPU = "CPUExecutionProvider"
MIB = 1 << 20

DryRun = tuple[subprocess.CompletedProcess[str], dict[str, Any], Path]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> DryRun:
    out = tmp_path_factory.mktemp("gpu_check")
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--quick", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=360)
    assert (out / "gpu_check.json").is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    return done, json.loads((out / "gpu_check.json").read_text()), out


def result(report: dict[str, Any], stage: str) -> dict[str, Any]:
    found: dict[str, Any] = report["stages"][stage]["result"]
    return found


@pytest.mark.timeout(420)  # the dry run itself: about 80 s on 2 cores
def test_dry_run_runs_every_stage_and_passes(dry_run: DryRun) -> None:
    done, report, out = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert list(report["stages"]) == STAGES
    assert report["passed"] is True and report["failed"] == []
    for name, stage in report["stages"].items():
        if stage["status"] == "skipped":  # only the baseline that needs torch, and it says why
            assert name == "sentence_transformers" and "not importable" in stage["note"]
        else:
            assert stage["status"] == "ok", (name, stage.get("error"))
            assert stage["seconds"] > 0 and stage["budget_s"] > 0
    assert (out / "gpu_check.png").stat().st_size > 0
    assert report["goals"] is None  # the goals are the GPU's
    assert "PASSED" in done.stdout


@pytest.mark.timeout(420)
def test_dry_run_records_the_cpu_provider(dry_run: DryRun) -> None:
    report = dry_run[1]
    providers = result(report, "providers")
    assert providers["provider"] == CPU and report["summary"]["provider"] == CPU
    assert providers["placement"]["session_providers"] == [CPU]
    assert set(providers["placement"]["nodes_by_provider"]) == {CPU}
    assert providers["fused_operators"].get("Attention", 0) > 0  # the fused graph, as on the GPU
    assert providers["iobinding"]["used"] is False and providers["iobinding"]["calls"] == []
    assert result(report, "environment")["onnxruntime"]["available_providers"][-1] == CPU
    assert result(report, "engine")["provider"] == CPU
    served = result(report, "serve")["served"]["model_info"]
    assert served["device"] == "cpu" and served["variant"] == "fp32_opt"


@pytest.mark.timeout(420)
def test_dry_run_fidelity(dry_run: DryRun) -> None:
    fidelity = result(dry_run[1], "fidelity")
    assert fidelity["variant"] == "fp32_opt" and fidelity["texts"] == 57
    assert fidelity["golden_min_cos"] >= 0.9999
    assert fidelity["batch_invariance_min_cos"] >= 0.99999
    assert fidelity["tokenizer_matches_golden_ids"] is True
    assert result(dry_run[1], "serve")["served"]["golden_min_cos"] >= 0.9999


@pytest.mark.timeout(420)
def test_dry_run_figures_add_up(dry_run: DryRun) -> None:
    report = dry_run[1]
    serve = result(report, "serve")
    per_request = serve["docs_per_request"]
    assert [level["concurrency"] for level in serve["levels"]] == report["plan"]["levels"]
    for step in [*serve["levels"], serve["load_80"]]:
        assert step["errors"] == {} and step["ok_requests"] == step["requests"] > 0
        assert step["docs"] == step["requests"] * per_request
        assert step["latency_ms"]["p50"] <= step["latency_ms"]["p99"]
    assert serve["load_80"]["target_docs_per_s"] == pytest.approx(0.8 * serve["best"]["docs_per_s"])
    assert result(report, "engine")["best"]["docs_per_s"] > 0
    assert result(report, "tokenize")["identical_output"] is True
    assert result(report, "ingest")["docs_per_s"]["e2e"] > 0
    assert len(result(report, "topk")["cases"]) == 3
    summary = report["summary"]
    assert summary["serve_vs_engine_ceiling"] == pytest.approx(
        summary["serve_best_docs_per_s"] / summary["engine_ceiling_docs_per_s"]
    )


def gpu_stage() -> ModuleType:
    """bench/gpu_stage.py, loaded by path (bench/ is no package, and its tokenize.py would shadow the stdlib's)."""
    if "gpu_stage" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_stage", ROOT / "bench" / "gpu_stage.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_stage"] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["gpu_stage"]


def test_parts_and_wheels_fill_six_commands_under_the_limit() -> None:
    """As staged today: onnxruntime-gpu in five parts (52 MiB each but the last), the model's wheel cut to fill the
    room they leave, and the final command with the other wheels and the check: six commands, the fewest the
    bytes allow."""
    stage = gpu_stage()
    budget = stage.LIMIT - int(1.7 * MIB) - stage.MARGIN  # a working tree of 1.7 MiB travels with each
    ort = [(f".gpu/ort{i}", 52 * MIB) for i in range(1, 5)] + [(".gpu/ort5", 37_465_465)]
    commands = stage.pack(ort, [(".gpu/wheels", 38_300_000), (".gpu/check", 300_000)], budget)
    model = 83_506_384
    placed = stage.fill(commands, model, budget)
    assert sum(n for _, n in placed) == model and all(n >= stage.MIN_PART for _, n in placed)
    for command, n in placed:
        if command not in commands:
            commands.insert(-1, command)
        command.carry.append("part")
        command.bytes += n
    assert len(commands) == 6 == -(-sum(c.bytes for c in commands) // budget)
    assert commands[-1].carry[:2] == [".gpu/wheels", ".gpu/check"]
    assert all(c.bytes <= budget and len(c.carry) <= stage.MAX_CARRY for c in commands)


def test_a_part_too_big_for_any_command_is_refused() -> None:
    stage = gpu_stage()
    with pytest.raises(SystemExit, match="over the"):
        stage.pack([(".gpu/ort1", 70 * MIB)], [(".gpu/wheels", MIB)], 60 * MIB)


@pytest.mark.parametrize(
    ("wheel", "loads"),
    [
        ("embedpool-0.1.0-cp311-abi3-manylinux_2_34_x86_64.whl", True),
        ("grpcio-1.85.1-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl", True),
        ("psutil-7.2.2-cp36-abi3-manylinux2010_x86_64.manylinux_2_12_x86_64.manylinux_2_28_x86_64.whl", True),
        ("fastapi-0.165.0-py3-none-any.whl", True),
        ("grpcio-1.85.1-cp311-cp311-manylinux2014_x86_64.whl", False),  # built for this machine's 3.11
        ("embedpool-0.1.0-cp311-abi3-manylinux_2_34_aarch64.whl", False),
        ("orjson-3.13.0-cp312-cp312-macosx_11_0_arm64.whl", False),
    ],
)
def test_wheel_tags_for_the_machine(wheel: str, loads: bool) -> None:
    assert gpu_stage().loads_on_machine(wheel) is loads
