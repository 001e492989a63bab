"""bench/sync.py runs end to end, small: its JSON has the figures the issue asks for, and both arms stored every
row (the timings are the bench's to report, not asserted here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "sync.py"
pytestmark = pytest.mark.timeout(600)


def test_bench_sync_quick_stores_every_row_in_both_arms_and_reports_the_figures(tmp_path: Path) -> None:
    rows = 150
    flags = ["--quick", "--rows", str(rows), "--lag-seconds", "1", "--out", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, "-P", str(BENCH), *flags],
        capture_output=True,
        text=True,
        timeout=570,
        env=os.environ.copy(),
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "sync.json").read_text())
    assert (tmp_path / "sync.png").stat().st_size > 0
    assert result["rows"] == rows and result["rounds"] == 1
    backfill = result["backfill"]
    for arm in ("ingest", "sync"):
        (only,) = backfill[arm]["rounds"]
        assert only["stored"] == rows and only["wrong_rows"] == 0 and only["stored_ok"], (arm, only)
        assert backfill[arm]["rows_per_s_median"] > 0
    assert backfill["sync"]["rounds"][0]["backfilled"] == rows
    assert backfill["all_rows_stored"]
    assert backfill["ratio_sync_vs_ingest"] > 0
    assert isinstance(backfill["meets_goal"], bool)
    lag = result["lag"]
    assert lag["writes"] == 100  # 100 rows/s for 1 s
    assert lag["rows_in_table"] == rows + lag["writes"] // 5  # one write in 5 inserts a row
    assert lag["collection_matches_table"] and lag["wrong_rows_at_end"] == 0
    assert lag["drain_s"] is not None
    assert lag["end_to_end_unseen"] == 0 and lag["end_to_end_s"]["n"] > 0
    for figure in ("lag_seconds", "backlog_rows", "end_to_end_s"):
        assert set(lag[figure]) == {"n", "p50", "p95", "max"}
    assert lag["timeline"] and all(len(sample) == 3 for sample in lag["timeline"])
    assert result["server_errors"] == []
