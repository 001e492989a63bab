"""Ctrl-C: `embedpool bench` stops after the requests in flight and leaves a valid JSON of what it measured."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from embedpool.benchmark.command import EXIT_INTERRUPTED
from embedpool.server.app import Running

from .conftest import grpc_target


def _wait_for_step_start(path: Path, proc: subprocess.Popen[str], timeout: float = 60.0) -> None:
    """Until the run has recorded its workload (the closed loop starts right after): the file is the event."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if path.is_file() and json.loads(path.read_text())["workloads"]:
            return
        time.sleep(0.05)
    raise AssertionError("the run never started its first step")


def test_sigint_leaves_a_valid_partial_json(bench_server: Running, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "embedpool.cli", "bench", *grpc_target(bench_server), "--tokens", "16"]
    # Far more requests than the test waits for: the run is always cut short mid-step.
    cmd += ["--docs", "100000", "--per-request", "2", "--concurrency", "1", "--warmup", "0", "--baseline", "none"]
    proc = subprocess.Popen(
        [*cmd, "--out", str(out), "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        _wait_for_step_start(out / "bench.json", proc)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED, stderr
    assert "interrupted" in stdout
    data: dict[str, Any] = json.loads((out / "bench.json").read_text())
    assert data["interrupted"] and not data["complete"] and data["finished_at"]
    (step,) = data["steps"]
    assert step["partial"] and step["requests"] < 50_000
    assert step["docs"] == step["ok_requests"] * 2 and step["requests"] == step["ok_requests"] + sum(
        step["errors"].values()
    )
    assert (out / "bench.png").is_file()
