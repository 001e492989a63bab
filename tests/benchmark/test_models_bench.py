"""bench/models.py runs end to end at tiny sizes (three real servers: model a alone, b alone, both) and writes its
JSON with every figure the report needs, every call answered. Timings are recorded, never judged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)  # three servers start at once, then one second per arm; minutes only on a crowded box
def test_tiny_run_writes_the_comparison(tmp_path: Path) -> None:
    cmd = [sys.executable, "-P", str(ROOT / "bench" / "models.py"), "--seconds", "1", "--rounds", "1"]
    cmd += ["--docs", "16", "--per-request", "2", "--callers", "2", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "models.json").read_text())
    assert result["errors"] == 0 and result["models"]["same_checkpoint"]
    figures = {"docs_per_s", "p50_ms", "p99_ms", "calls"}
    for arm in ("alone", "mixed"):
        assert set(result["summary"][arm]) == {"a", "b"}
        for model in "ab":
            assert set(result["summary"][arm][model]) == figures
            assert result["summary"][arm][model]["calls"] > 0
            assert result["rounds"][0][arm][model]["error_count"] == 0
    assert set(result["ratios"]) == {
        "a_mixed_vs_alone",
        "b_mixed_vs_alone",
        "sum_mixed_vs_alone",
        "a_p99_mixed_vs_alone",
        "b_p99_mixed_vs_alone",
    }
    assert result["ideal"]["each_mixed_vs_alone"] == 0.5 and result["ideal"]["sum_mixed_vs_alone"] == 1.0
    assert set(result["sum_docs_per_s"]) == {"mixed", "alone_mean"}
    assert [r["order"] for r in result["rounds"]] == [["alone", "mixed"]]
    assert "errors: 0" in done.stdout
