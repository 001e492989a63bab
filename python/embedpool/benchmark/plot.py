"""The run as a picture (matplotlib, a development dependency: without it the run says so and skips the plot).
Left: throughput against concurrency, each baseline's best as a dashed line. Right: latency against throughput,
closed-loop and open-loop steps alike (where the curve turns up is the server's capacity)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot"]


def plot(data: dict[str, Any], path: Path) -> str:
    """Writes the PNG; returns "" or why it was skipped."""
    try:
        import matplotlib
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    kind = data["target"]["kind"]
    for i, workload in enumerate(w["name"] for w in data["workloads"]):
        color = f"C{i % 10}"
        steps = [s for s in data["steps"] if s["workload"] == workload and s["docs_per_s"] > 0]
        closed = [s for s in steps if s["mode"] == "closed"]
        opened = [s for s in steps if s["mode"] == "open"]
        if closed:
            left.plot(
                [s["concurrency"] for s in closed],
                [s["docs_per_s"] for s in closed],
                "o-",
                color=color,
                label=f"embedpool {kind}, {workload}",
            )
        for style, name in (("--", "engine"), (":", "sentence_transformers")):
            sweep = data["baselines"].get(workload, {}).get(name) or {}
            if kind == "engine" and sweep.get("sweep"):
                points = sweep["sweep"]
                xs = [p["docs_per_s"] for p in points]
                left.plot([p["batch_size"] for p in points], xs, "o" + style, color=color, label=f"{name}, {workload}")
                if name == "engine":
                    p50 = [p["batch_latency_ms"]["p50"] for p in points]
                    right.plot(xs, p50, "o" + style, color=color, label=f"p50 of a batch, {workload}")
            elif sweep.get("best"):
                best = sweep["best"]
                left.axhline(
                    best["docs_per_s"],
                    color=color,
                    linestyle=style,
                    label=f"{name} best (batch {best['batch_size']}), {workload}",
                )
        for group, marker, mode in ((closed, "o", "closed"), (opened, "s", "open")):
            if group:
                xs = [s["docs_per_s"] for s in group]
                for s in group:  # which step each point is
                    name = f"c={s['concurrency']}" if mode == "closed" else f"{s['rate']:g}/s"
                    right.annotate(
                        name,
                        (s["docs_per_s"], s["latency_ms"]["p50"]),
                        fontsize=7,
                        xytext=(4, -10),
                        textcoords="offset points",
                    )
                right.plot(
                    xs,
                    [s["latency_ms"]["p50"] for s in group],
                    marker + "-",
                    color=color,
                    label=f"p50 {mode}, {workload}",
                )
                right.plot(
                    xs,
                    [s["latency_ms"]["p99"] for s in group],
                    marker + "--",
                    color=color,
                    alpha=0.6,
                    label=f"p99 {mode}, {workload}",
                )
    left.set(
        xscale="log",
        xlabel="batch size" if kind == "engine" else "concurrent requests",
        ylabel="documents/s",
        title="throughput",
    )
    per = "batch" if kind == "engine" else "request"
    right.set(yscale="log", xlabel="documents/s", ylabel=f"latency per {per}, ms", title="latency vs throughput")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    xs = sorted({s["concurrency"] for s in data["steps"] if s["mode"] == "closed"})
    if kind == "engine":
        xs = sorted(
            {p["batch_size"] for b in data["baselines"].values() for r in b.values() for p in r.get("sweep", [])}
        )
    if xs:
        left.set_xticks(xs, [str(x) for x in xs])
    left.set_ylim(bottom=0)
    right.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    right.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # 2000, not 2x10^3
    right.yaxis.set_minor_formatter(NullFormatter())
    for ax in (left, right):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"embedpool bench: {kind} {', '.join(data['target']['addresses'])}".strip(), fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return ""
