"""bench/priority.py --quick runs end to end (two real servers, a bulk load, the prober) and writes its JSON with
every figure the report needs. Timings are recorded, never judged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(420)  # two servers start, then a few seconds per arm; minutes only on a crowded box
def test_quick_run_writes_the_comparison(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "bench" / "priority.py"), "--quick", "--streams", "1", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "priority.json").read_text())
    assert (tmp_path / "priority.png").stat().st_size > 0
    quantiles = {"p50_ms", "p99_ms", "calls"}
    assert set(result["idle"]) == quantiles and result["idle"]["calls"] > 0
    for mode in ("on", "off"):
        arm = result["under_bulk"][mode]
        assert set(arm) == quantiles | {"bulk_docs_per_s", "batch_inference_ms"}
        assert arm["calls"] > 0 and arm["bulk_docs_per_s"] > 0 and arm["batch_inference_ms"] > 0
    assert set(result["goal"]) == {"rule", "limit_ms", "p99_on_ms", "met", "met_in_rounds", "rounds"}
    assert isinstance(result["goal"]["met"], bool) and result["goal"]["rounds"] == 1
    assert set(result["ratios"]) == {"p99_off_vs_on", "p50_off_vs_on", "bulk_docs_on_vs_off"}
    assert [(r["round"], r["mode"], "goal" in r) for r in result["rounds"]] == [(0, "on", True), (0, "off", False)]
    assert "goal:" in done.stdout
