"""`embedpool bench --model DIR`: the engine alone, its batch size swept over length-sorted texts."""

from __future__ import annotations

from pathlib import Path

from embedpool.engine import pick_device, serving_variant
from embedpool.model import load_model_dir

from .conftest import Bench


def test_engine_only_sweeps_the_batch_size(bench: Bench, model_dir: Path) -> None:
    data = bench(
        "--model", str(model_dir), "--tokens", "16,32", "--docs", "20", "--batch-sizes", "4,8,64", "--baseline", "none"
    )
    assert data["complete"] and data["target"]["kind"] == "engine" and data["steps"] == []
    variant = serving_variant("auto", pick_device("auto"), load_model_dir(model_dir))
    for length in (16, 32):
        engine = data["baselines"][f"tokens={length}"]["engine"]
        assert engine["variant"] == (variant if variant != "auto" else engine["variant"])
        assert engine["sorted_by_tokens"] and engine["docs"] == 20
        # 64 holds every document at once: a size above it would run the same single batch.
        assert [p["batch_size"] for p in engine["sweep"]] == [4, 8, 64]
        for point in engine["sweep"]:
            assert (point["docs"], point["tokens"], point["partial"]) == (20, 20 * length, False)
            assert point["padding_efficiency"] == 1.0  # texts of one length: no padding
            assert point["docs_per_s"] > 0
        assert engine["best"] == max(engine["sweep"], key=lambda p: p["docs_per_s"])
    assert (Path(data["_out"]) / "bench.png").is_file()
