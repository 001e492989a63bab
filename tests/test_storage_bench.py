"""bench/storage.py, tiny, against the session's real server (--server: no second server to start): every
storage arm runs and the JSON has the shape the report reads (recall, bytes, latency per arm; Matryoshka said
not applicable for a model without sizes; the wire table). Figures are the bench's to print: only their
presence and bounds are checked here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

from embedpool.server.app import Running

ROOT = Path(__file__).resolve().parents[1]
ARM_FIELDS = {
    "storage",
    "dim",
    "candidates",
    "recall_at_10",
    "search_ms_p50",
    "search_ms_p90",
    "vector_bytes",
    "index_bytes_per_vector",
    "partition_bytes_per_row",
    "vector_bytes_vs_float32",
}


def test_storage_bench_quick_writes_its_json(tmp_path: Path, server: Running) -> None:
    cmd = [sys.executable, "-P", str(ROOT / "bench" / "storage.py"), "--quick", "--docs", "40", "--queries", "3"]
    cmd += ["--server", f"127.0.0.1:{server.port}", "--database-url", server.database_url]
    cmd += ["--prefix", f"bench-{uuid.uuid4().hex[:8]}-"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python")}
    done = subprocess.run([*cmd, "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "storage.json").read_text())
    assert (report["documents"], report["queries"], report["k"], report["dim"]) == (40, 3, 10, 384)
    arms = report["arms"]
    assert {"float32", "float16", "binary", "binary_c100"} <= set(arms)
    for name in ("float32", "float16", "binary", "binary_c100"):
        assert set(arms[name]) >= ARM_FIELDS, name
        assert 0.0 <= arms[name]["recall_at_10"] <= 1.0
    assert arms["float32"]["recall_at_10"] == 1.0  # exact: 40 rows, 100 candidates
    # float16 keeps half of float32's bytes; binary keeps the float32 vector and adds its bits.
    assert arms["float16"]["vector_bytes"] < 0.6 * arms["float32"]["vector_bytes"]
    assert arms["binary"]["vector_bytes"] > arms["float32"]["vector_bytes"]
    assert arms["matryoshka"]["applicable"] is False
    assert {name: entry["bytes_per_vector"] for name, entry in report["wire"].items()} == {
        "float32": 1536,
        "float16": 768,
        "int8": 388,
        "binary": 48,
    }
    assert "recall@10" in done.stdout
