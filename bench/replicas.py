"""Replicas: how N `embedpool serve` processes on one Postgres behave behind real gRPC load balancers.

Three questions, one run:
  1. Throughput: 1 replica reached directly (the baseline) vs 3 replicas behind nginx, behind HAProxy, and
     reached by embedpool's client round-robin, each path measured alone, in alternating rounds.
  2. Failover: all three paths under load at once; one replica SIGKILLed, then another drained with SIGTERM.
     Failed calls (after the client's retries) per path, and seconds until each path's throughput is back to
     0.6x its rate before the fault.
  3. Processes or sessions: 2 ONNX Runtime sessions in one process vs 2 processes of one session each (the
     same inference threads; only the Python front end is doubled). Where the front end is the bottleneck (a
     GPU), separate processes win; where inference is (these CPUs), they tie.

On a 2-core machine the replicas share two cores, so (1) shows what a balancer costs, not scaling; on a machine
with a core budget (or a GPU) per replica it shows the scaling. Writes JSON (+ PNG of the failover timeline).

    python bench/replicas.py            # full: 3 x 8 s throughput rounds, 24 s failover
    python bench/replicas.py --quick    # a minute or so
"""

from __future__ import annotations

import os
import sys

# Run as a script, this folder comes first on sys.path and bench/tokenize.py would shadow the stdlib
# `tokenize`; keep it, but last.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

import argparse
import json
import signal
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _fleet import Fleet, balancers

from embedpool.client import Client
from embedpool.config import Settings
from embedpool.engine import prepare
from embedpool.store.embedded import EmbeddedPostgres

RECOVERED = 0.6  # the bar: throughput back to this fraction of the rate before the fault
BUCKET_S = 0.5


def texts(n: int, seed: int = 0) -> list[str]:
    words = ("replica", "balancer", "vector", "search", "document", "embedding", "postgres", "failover", "drain")
    return [" ".join(words[(seed + i * 7 + j) % len(words)] for j in range(12 + i % 9)) for i in range(n)]


@dataclass
class PathLoad:
    """One way in (a balancer, or the client's own list of replicas) under closed-loop load."""

    name: str
    targets: list[str]
    done: list[float] = field(default_factory=list)  # monotonic completion times of successful calls
    failures: list[tuple[float, str]] = field(default_factory=list)

    def rate(self, start: float, end: float) -> float:
        return sum(start <= t < end for t in self.done) / max(end - start, 1e-9)


def run_load(
    paths: Sequence[PathLoad],
    seconds: float,
    *,
    threads: int = 2,
    docs: int = 16,
    events: Sequence[tuple[float, Callable[[], None]]] = (),
    timeout: float = 30.0,
) -> float:
    """Each path gets `threads` closed-loop callers of Embed(`docs` texts) through one embedpool Client, for
    `seconds`; `events` run at their offsets from the start (faults). Returns the start time."""
    stop = threading.Event()
    batch = texts(docs)

    def caller(path: PathLoad, client: Client) -> None:
        while not stop.is_set():
            try:
                client.embed(batch, timeout=timeout)
            except Exception as e:  # counted, not raised: the figure is how many calls failed
                path.failures.append((time.monotonic(), f"{type(e).__name__}: {e}"[:300]))
            else:
                path.done.append(time.monotonic())

    clients = [Client(p.targets, timeout=timeout) for p in paths]
    workers = [
        threading.Thread(target=caller, args=(p, c), daemon=True)
        for p, c in zip(paths, clients, strict=True)
        for _ in range(threads)
    ]
    start = time.monotonic()
    try:
        for w in workers:
            w.start()
        for at, action in sorted(events, key=lambda e: e[0]):
            time.sleep(max(0.0, start + at - time.monotonic()))
            action()
        time.sleep(max(0.0, start + seconds - time.monotonic()))
    finally:
        stop.set()
        for w in workers:
            w.join(timeout + 5)
        for c in clients:
            c.close()
    return start


def recovery_s(path: PathLoad, start: float, fault_at: float, end: float, baseline: float) -> float | None:
    """Seconds from the fault until a 1-s window's rate is back to RECOVERED x `baseline` (None: never)."""
    t = start + fault_at
    while t + 1.0 <= end:
        if path.rate(t, t + 1.0) >= RECOVERED * baseline:
            return round(t - start - fault_at, 2)
        t += 0.1
    return None


def failover(
    fleet: Fleet, lb_targets: Mapping[str, str], *, seconds: float, kill_at: float, term_at: float, threads: int = 2
) -> dict[str, Any]:
    """All paths under load at once; replica 0 SIGKILLed at `kill_at`, replica 1 sent SIGTERM (drain) at `term_at`."""
    paths = [PathLoad(name, [target]) for name, target in lb_targets.items()]
    paths.append(PathLoad("client round-robin", fleet.targets))
    events = [
        (kill_at, lambda: fleet.replica(0).proc.send_signal(signal.SIGKILL)),
        (term_at, lambda: fleet.replica(1).proc.send_signal(signal.SIGTERM)),
    ]
    start = run_load(paths, seconds, threads=threads, events=events)
    end = start + seconds
    figures: dict[str, Any] = {"seconds": seconds, "kill_at": kill_at, "term_at": term_at, "paths": {}}
    for p in paths:
        before = p.rate(start + 1.0, start + kill_at)  # the first second warms the connections
        figures["paths"][p.name] = {
            "calls_ok": len(p.done),
            "calls_failed": len(p.failures),
            "failures": [f for _, f in p.failures[:5]],
            "rate_before": round(before, 2),
            "rate_after_both": round(p.rate(start + term_at + 5.0, end), 2),
            "recovery_after_kill_s": recovery_s(p, start, kill_at, end, before),
            "recovery_after_term_s": recovery_s(p, start, term_at, end, before),
            "ok_within_5s_of_kill": p.rate(start + kill_at, start + kill_at + 5.0) > 0,
            "ok_within_5s_of_term": p.rate(start + term_at, start + term_at + 5.0) > 0,
            # A 2-s window every half second: at a few calls a second, shorter ones are mostly noise.
            "timeline": [
                round(p.rate(max(start, start + b * BUCKET_S - 1.0), min(end, start + b * BUCKET_S + 1.0)), 2)
                for b in range(int(seconds / BUCKET_S) + 1)
            ],
        }
    return figures


def alternating(ways: Mapping[str, list[str]], *, rounds: int, seconds: float, threads: int) -> dict[str, Any]:
    """Each way in alone for `seconds`, the ways taking turns within each round; documents per second by way:
    the median (and its ratio to the first way's), the best, every round. A failed call voids the measurement."""
    docs = 16
    rates: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, targets in ways.items():
            path = PathLoad(name, targets)
            start = run_load([path], seconds, threads=threads, docs=docs)
            rates[name].append(path.rate(start + 1.0, start + seconds) * docs)
            if path.failures:
                raise RuntimeError(f"{name}: {len(path.failures)} calls failed: {path.failures[:2]}")
    base = statistics.median(next(iter(rates.values())))
    return {
        name: {
            "docs_per_s_median": round(statistics.median(r), 1),
            "docs_per_s_best": round(max(r), 1),
            "vs_first": round(statistics.median(r) / base, 2),
            "rounds": [round(x, 1) for x in r],
        }
        for name, r in rates.items()
    }


def throughput(
    fleet: Fleet, lb_targets: Mapping[str, str], *, rounds: int, seconds: float, threads: int
) -> dict[str, Any]:
    """1 replica reached directly (the baseline, first) vs the 3 behind each balancer and the client's round-robin."""
    ways = {"1 replica, direct": [fleet.targets[0]]}
    ways.update({f"3 replicas, {name}": [t] for name, t in lb_targets.items()})
    ways["3 replicas, client round-robin"] = fleet.targets
    return alternating(ways, rounds=rounds, seconds=seconds, threads=threads)


def processes_vs_sessions(
    root: Path, model: Path, database_url: str, *, sessions: int, rounds: int, seconds: float, threads: int
) -> dict[str, Any]:
    """`sessions` ONNX Runtime sessions in one process (one front end: one event loop, one GIL) vs as many
    processes with one session each, reached by the client's round-robin; one inference thread per session in
    both, so only the front end differs."""
    flags: dict[str, object] = {"http_port": -1, "intra_op_threads": 1}
    with (
        Fleet(1, root / "one", model, database_url, sessions_per_device=sessions, **flags) as one,
        Fleet(sessions, root / "many", model, database_url, **flags) as many,
    ):
        ways = {f"1 process x {sessions} sessions": one.targets, f"{sessions} processes x 1 session": many.targets}
        return alternating(ways, rounds=rounds, seconds=seconds, threads=threads)


def _table(result: dict[str, Any]) -> str:
    lines = ["throughput (closed loop, each path alone)", f"{'path':34} {'docs/s':>8} {'best':>8} {'vs 1':>6}"]
    for name, r in result["throughput"].items():
        lines.append(f"{name:34} {r['docs_per_s_median']:8.1f} {r['docs_per_s_best']:8.1f} {r['vs_first']:6.2f}")
    f = result["failover"]
    lines += [
        "",
        f"failover (all paths at once; SIGKILL replica 0 at {f['kill_at']} s, SIGTERM replica 1 at {f['term_at']} s)",
        f"{'path':22} {'ok':>5} {'failed':>6} {'calls/s before':>14} {'after':>6} {'back@kill':>9} {'back@term':>9}",
    ]
    for name, p in f["paths"].items():
        lines.append(
            f"{name:22} {p['calls_ok']:5d} {p['calls_failed']:6d} {p['rate_before']:14.1f} {p['rate_after_both']:6.1f}"
            f" {p['recovery_after_kill_s']!s:>9} {p['recovery_after_term_s']!s:>9}"
        )
    if "processes_vs_sessions" in result:
        lines += ["", "processes vs sessions (one inference thread each; client round-robin)"]
        for name, r in result["processes_vs_sessions"].items():
            lines.append(f"{name:34} {r['docs_per_s_median']:8.1f} docs/s {r['vs_first']:6.2f}x")
    return "\n".join(lines)


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f = result["failover"]
    fig, ax = plt.subplots(figsize=(9, 4))
    for name, p in f["paths"].items():
        xs = [i * BUCKET_S for i in range(len(p["timeline"]))]
        ax.plot(xs, p["timeline"], label=name)
    ax.axvline(f["kill_at"], color="red", linestyle="--", label="SIGKILL replica 0")
    ax.axvline(f["term_at"], color="orange", linestyle="--", label="SIGTERM replica 1")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("seconds")
    ax.set_ylabel("calls/s, 2-s window (16 documents each)")
    ax.set_title("3 replicas under load: failover behind nginx, HAProxy and client round-robin")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 x 4 s rounds, a 14 s failover")
    parser.add_argument("--threads", type=int, default=4, help="closed-loop callers per path (throughput)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "replicas")
    args = parser.parse_args(argv)
    rounds, seconds, fail_s = (2, 4.0, 14.0) if args.quick else (3, 8.0, 24.0)
    model = prepare(Settings()).root
    with (
        tempfile.TemporaryDirectory(prefix="embedpool-replicas-") as tmp,
        EmbeddedPostgres(Path(tmp) / "pg") as pg,
        Fleet(3, Path(tmp), model, pg.uri, http_port=-1, grace_seconds=3.0) as f,
        balancers(f.targets, Path(tmp) / "lb") as lbs,
    ):
        lb_targets = {name: b.target for name, b in lbs.items()}
        result: dict[str, Any] = {"cores": len(os.sched_getaffinity(0)), "replicas": 3}
        result["throughput"] = throughput(f, lb_targets, rounds=rounds, seconds=seconds, threads=args.threads)
        result["failover"] = failover(
            f, lb_targets, seconds=fail_s, kill_at=fail_s * 0.25, term_at=fail_s * 0.5, threads=2
        )
        f.close()
        result["processes_vs_sessions"] = processes_vs_sessions(
            Path(tmp), model, pg.uri, sessions=2, rounds=rounds, seconds=seconds, threads=args.threads
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "replicas.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(result, args.out / "replicas.png")
    print(_table(result))
    print(f"\nwrote {args.out / 'replicas.json'} and replicas.png")
    failed = sum(p["calls_failed"] for p in result["failover"]["paths"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
