"""`embedpool bench --compare A.json B.json`: B's figures as ratios to A's, step by matching step (same workload,
mode, concurrency or rate, and documents per request), then each baseline's best."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from embedpool.benchmark.report import FORMAT
from embedpool.benchmark.table import step_label
from embedpool.errors import InvalidArgument

__all__ = ["compare", "load"]

StepKey = tuple[str, str, Any, Any, int]


def load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise InvalidArgument(f"{path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{path}: not JSON ({exc.msg})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InvalidArgument(f"{path}: not an embedpool bench result ({FORMAT})")
    return data


def _key(step: dict[str, Any]) -> StepKey:
    return (step["workload"], step["mode"], step["concurrency"], step["rate"], step["docs_per_request"])


def _ratio(b: float | None, a: float | None) -> str:
    if a is None or b is None or a == 0:
        return "-"
    return f"{b / a:.2f}x"


def _title(data: dict[str, Any], path: Path) -> str:
    target = data["target"]
    server = target.get("server") or {}
    where = ", ".join(target["addresses"]) or server.get("model", "")
    return f"{path}: {target['kind']} {where} {server.get('variant', '')} ({data['started_at']})".rstrip()


def compare(path_a: Path, path_b: Path) -> list[str]:
    """The lines to print."""
    a, b = load(path_a), load(path_b)
    lines = [f"A = {_title(a, path_a)}", f"B = {_title(b, path_b)}", ""]
    head = f"{'workload':<14}{'step':<22}{'A docs/s':>10}{'B docs/s':>10}"
    lines.append(head + f"{'docs/s':>8}{'p50':>8}{'p99':>8}{'errors A/B':>12}")
    steps_b = {_key(s): s for s in b["steps"]}
    unmatched = []
    for step_a in a["steps"]:
        step_b = steps_b.pop(_key(step_a), None)
        if step_b is None:
            unmatched.append(f"only in A: {step_a['workload']} {step_label(step_a)}")
            continue
        la, lb = step_a["latency_ms"], step_b["latency_ms"]
        errors = f"{sum(step_a['errors'].values())}/{sum(step_b['errors'].values())}"
        lines.append(
            f"{step_a['workload'][:13]:<14}{step_label(step_a):<22}{step_a['docs_per_s']:>10.1f}{step_b['docs_per_s']:>10.1f}"
            f"{_ratio(step_b['docs_per_s'], step_a['docs_per_s']):>8}{_ratio(lb['p50'], la['p50']):>8}"
            f"{_ratio(lb['p99'], la['p99']):>8}{errors:>12}"
        )
    unmatched += [f"only in B: {s['workload']} {step_label(s)}" for s in steps_b.values()]
    for workload, baselines in a["baselines"].items():
        for name, result in baselines.items():
            other = b["baselines"].get(workload, {}).get(name) or {}
            best_a, best_b = result.get("best"), other.get("best")
            if best_a and best_b:
                lines.append(
                    f"{workload[:13]:<14}{name + ' best':<22}{best_a['docs_per_s']:>10.1f}{best_b['docs_per_s']:>10.1f}"
                    f"{_ratio(best_b['docs_per_s'], best_a['docs_per_s']):>8}"
                )
    lines.append("ratios are B / A: above 1x B is faster (docs/s) or slower (latency)")
    return lines + unmatched
