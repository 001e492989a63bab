"""bench/long_inputs.py --quick runs end to end on a real server and writes its JSON (figures are the bench's)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# Appended, not prepended: bench/tokenize.py must not shadow the standard library's tokenize.
sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))

import long_inputs  # type: ignore[import-not-found]  # bench/ is not type-checked


def test_quick_run_writes_figures_for_both_modes(tmp_path: Path) -> None:
    assert long_inputs.main(["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "long_inputs.json").read_text())
    assert set(result["modes"]) == {"truncate", "chunk"}
    for figures in result["modes"].values():
        assert figures["docs_per_s"] > 0 and figures["embedded_tokens_per_s"] > 0 and figures["bad_replies"] == 0
    assert set(result["ratios_chunk_over_truncate"]) == {"docs_per_s", "document_tokens_per_s", "embedded_tokens_per_s"}
    assert all(result["correct"].values())
    assert result["config"]["windows_per_doc"] == 8  # 2,000 tokens in windows of 254
