"""The terminal table: one row per step as it completes, one per baseline batch size, then the ratios."""

from __future__ import annotations

from typing import Any

__all__ = ["HEADER", "baseline_row", "ratio_lines", "step_label", "step_row"]

_COLUMNS = (
    ("workload", 14, "<"),
    ("step", 22, "<"),
    ("docs/s", 10, ">"),
    ("tokens/s", 11, ">"),
    ("p50 ms", 9, ">"),
    ("p95 ms", 9, ">"),
    ("p99 ms", 9, ">"),
    ("max ms", 9, ">"),
    ("errors", 8, ">"),
    ("pad eff", 8, ">"),
    ("batch", 7, ">"),
)
HEADER = "".join(f"{name:{align}{width}}" for name, width, align in _COLUMNS)


def _cell(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _row(cells: list[str]) -> str:
    return "".join(f"{cell:{align}{width}}" for cell, (_, width, align) in zip(cells, _COLUMNS, strict=True))


def step_label(step: dict[str, Any]) -> str:
    size = f"x{step['docs_per_request']}"
    if step["mode"] == "open":
        label = f"rate {step['rate']:g}/s {size} {step['arrivals'][:4]}"
    else:
        label = f"{'warm-up ' if step['mode'] == 'warmup' else ''}c={step['concurrency']} {size}"
    return label + (" (partial)" if step["partial"] else "")


def step_row(step: dict[str, Any]) -> str:
    latency = step["latency_ms"]
    server = step.get("server") or {}
    errors = sum(step["errors"].values())
    return _row(
        [
            step["workload"][:13],
            step_label(step),
            _cell(step["docs_per_s"]),
            _cell(step["tokens_per_s"], 0),
            *(_cell(latency[q]) for q in ("p50", "p95", "p99", "max")),
            str(errors),
            _cell(server.get("padding_efficiency"), 2),
            _cell(server.get("batch_size_mean")),
        ]
    )


def baseline_row(workload: str, name: str, point: dict[str, Any], best: bool) -> str:
    """A baseline's batch size: its batches' latency (the time of one batch, not of a request)."""
    latency = point["batch_latency_ms"]
    label = f"{name} b={point['batch_size']}{' best' if best else ''}{' (partial)' if point['partial'] else ''}"
    return _row(
        [
            workload[:13],
            label,
            _cell(point["docs_per_s"]),
            _cell(point["tokens_per_s"] or None, 0),
            _cell(latency.get("p50")),
            "-",
            _cell(latency.get("p99")),
            _cell(latency.get("max")),
            "0",
            _cell(point["padding_efficiency"], 2),
            str(point["batch_size"]),
        ]
    )


def ratio_lines(ratios: dict[str, dict[str, float]]) -> list[str]:
    return [
        f"{workload}: " + ", ".join(f"{name} {value:.2f}x" for name, value in values.items())
        for workload, values in ratios.items()
    ]
