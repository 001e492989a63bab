"""The run's JSON document: built up step by step and written after each one (atomically), so that an interrupted
run, or one killed outright, leaves a valid file with everything measured until then."""

from __future__ import annotations

import json
import os
import platform
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from embedpool import __version__

__all__ = ["FORMAT", "Report"]

FORMAT = "embedpool-bench/1"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Report:
    def __init__(self, out: Path | None, *, mode: str, settings: dict[str, Any]) -> None:
        self.path = out / "bench.json" if out is not None else None
        self._lock = threading.Lock()  # engine sweeps report from a worker thread
        self.data: dict[str, Any] = {
            "format": FORMAT,
            "embedpool": __version__,
            "started_at": _now(),
            "finished_at": None,
            "complete": False,
            "interrupted": False,
            "command": ["embedpool", *sys.argv[1:]],
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "target": {"kind": mode, "addresses": [], "server": None},
            "settings": settings,
            "metrics_urls": [],
            "workloads": [],
            "warmup": [],
            "steps": [],
            "baselines": {},
            "ratios": {},
            "notes": [],
        }

    def note(self, text: str) -> None:
        with self._lock:
            if text not in self.data["notes"]:
                self.data["notes"].append(text)

    def add(self, section: str, item: dict[str, Any]) -> None:
        """Appends to "warmup", "steps" or "workloads", and writes the file."""
        with self._lock:
            self.data[section].append(item)
        self.write()

    def baseline(self, workload: str, name: str, result: dict[str, Any]) -> None:
        with self._lock:
            self.data["baselines"].setdefault(workload, {})[name] = result
        self.write()

    def finish(self, *, interrupted: bool, complete: bool = True) -> None:
        with self._lock:
            self.data["finished_at"] = _now()
            self.data["interrupted"] = interrupted
            self.data["complete"] = complete and not interrupted
            self.data["ratios"] = ratios(self.data)
        self.write()

    def write(self) -> None:
        if self.path is None:
            return
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_suffix(".json.partial")
            partial.write_text(json.dumps(self.data, indent=2))
            partial.replace(self.path)  # a reader never sees half a file


def best_step(steps: list[dict[str, Any]], workload: str) -> dict[str, Any] | None:
    """The workload's closed-loop step with the most docs/s."""
    closed = [s for s in steps if s["workload"] == workload and s["mode"] == "closed" and not s["partial"]]
    return max(closed, key=lambda s: s["docs_per_s"]) if closed else None


def ratios(data: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per workload: the best closed-loop step's docs/s over each baseline's best."""
    out: dict[str, dict[str, float]] = {}
    for workload, baselines in data["baselines"].items():
        best = best_step(data["steps"], workload)
        if best is None:
            continue
        for name, result in baselines.items():
            top = result.get("best")
            if top and top["docs_per_s"] > 0:
                out.setdefault(workload, {})[f"service_vs_{name}"] = best["docs_per_s"] / top["docs_per_s"]
    return out
