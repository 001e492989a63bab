"""Single-model serving throughput before and after a change (issue 14: several models per server), same run.

    python -P bench/serve_regression.py [--quick] [--before REV] [--after REV|.] [--levels 1,4,16]
        [--per-request N] [--seconds S] [--rounds R] [--out DIR]

bench/serve.py's measurement (its `drive`: N concurrent gRPC Embed clients through the raw stub, closed loop, on
the shared real-text corpus) against two `embedpool serve` processes up side by side for the whole run: one
importing embedpool from --before's tree (default 9945554^, the parent of "Several models per server": a temporary
git worktree given this checkout's built `_native` extension, as bench/collection_size.py does; the Rust side did
not change), one from --after's (default `.`, this working tree). Both serve the same model files, variant and
flags (the query cache off, so no call is answered from it), each on its own embedded Postgres. Per round and
concurrency level both are driven one after the other, the order alternating (the box is noisy). Reported per
level: medians over rounds of docs/s and p50/p99 per call for each version, and the medians of the per-round ratios
after/before. Prints a table, writes DIR/serve_regression.json.
"""

from __future__ import annotations

import os
import sys

# Run as a script, this folder comes first on sys.path and bench/tokenize.py would shadow the stdlib
# `tokenize`; keep the folder, but last, for `corpus`, `serve` and `collection_size`.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

import argparse
import asyncio
import contextlib
import json
import platform
import statistics
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from collection_size import code_tree, revision
from corpus import passages
from serve import drive

from embedpool.config import Settings
from embedpool.engine import pick_device, prepare, serving_variant

VERSIONS = ("before", "after")


@contextlib.contextmanager
def version_servers(
    trees: dict[str, Path], model_dir: Path, device: str, variant: str, extra: list[str]
) -> Iterator[dict[str, int]]:
    """One `embedpool serve` per version, embedpool imported from its tree, started at once; their gRPC ports."""
    with contextlib.ExitStack() as stack:
        procs = {}
        for label, tree in trees.items():
            data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"embedpool-{label}-"))
            cmd = [sys.executable, "-m", "embedpool.cli", "serve", "--port", "0", "--metrics-port", "-1"]
            cmd += ["--http-port", "-1", "--model", str(model_dir), "--data-dir", data_dir, "--device", device]
            cmd += [
                "--variant",
                variant,
                "--log-level",
                "info",
                "--max-concurrent-inputs",
                "65536",
                "--query-cache-bytes",
                "0",
                *extra,
            ]
            env = {**os.environ, "EMBEDPOOL_LOG_FORMAT": "json", "EMBEDPOOL_LOG_LEVEL": "info"}
            env["PYTHONPATH"] = str(tree / "python")
            proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, cwd=tree)
            procs[label] = proc
            stack.callback(proc.wait, 60)
            stack.callback(proc.terminate)
        ports = {}
        for label, proc in procs.items():
            assert proc.stderr is not None
            for line in proc.stderr:
                if line.startswith("{") and '"port"' in line:
                    threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the log pipe drained
                    ports[label] = int(json.loads(line)["port"])
                    break
            else:
                raise RuntimeError(f"the {label} server exited with {proc.wait()}")
        yield ports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two levels, short runs, two rounds (< 3 min on 2 cores)")
    parser.add_argument("--before", default="9945554^", help="the revision before (default: multi-model's parent)")
    parser.add_argument("--after", default=".", help="the revision after (`.`: this working tree)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--variant", default="auto")
    parser.add_argument("--levels", default=None, help="comma-separated concurrency levels")
    parser.add_argument("--per-request", type=int, default=32, help="documents per Embed request")
    parser.add_argument("--seconds", type=float, default=None, help="duration of each level per version")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--docs", type=int, default=None, help="corpus size (texts cycle)")
    parser.add_argument("--server-arg", action="append", default=[], help="extra `embedpool serve` argument")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    args = parser.parse_args()
    device = args.device or pick_device("auto")
    bundle = prepare(Settings())
    variant = args.variant
    if variant == "auto":  # what the server's auto picks, as bench/serve.py resolves it: both get the same
        chosen = serving_variant("auto", device, bundle)
        variant = chosen if chosen != "auto" else ("fp16" if device == "cuda" else "fp32_opt")
    levels = [int(x) for x in (args.levels or ("1,4" if args.quick else "1,4,16")).split(",")]
    seconds = args.seconds or (6.0 if args.quick else 20.0)
    rounds_n = args.rounds or (2 if args.quick else 5)
    n_docs = args.docs or (256 if args.quick else 1024)
    corpus = passages(n=n_docs)
    texts = [corpus[i % len(corpus)] for i in range(n_docs)]

    rounds: list[dict[str, Any]] = []
    with code_tree(args.before) as before_tree, code_tree(args.after) as after_tree:
        trees = {"before": before_tree, "after": after_tree}
        code = {
            label: {"rev": rev, **revision(trees[label])}
            for label, rev in zip(VERSIONS, (args.before, args.after), strict=True)
        }
        with version_servers(trees, bundle.root, device, variant, args.server_arg) as ports:
            for i in range(rounds_n):
                for j, c in enumerate(levels):
                    order = VERSIONS if (i + j) % 2 == 0 else VERSIONS[::-1]
                    row: dict[str, Any] = {"round": i, "concurrency": c, "order": list(order)}
                    for label in order:
                        row[label] = asyncio.run(drive(ports[label], texts, c, args.per_request, seconds))
                    rounds.append(row)
                    print(
                        f"round {i} c={c}: "
                        + ", ".join(
                            f"{v} {row[v]['docs_per_s']:.1f} docs/s p99 {row[v]['p99_ms']:.0f} ms" for v in order
                        ),
                        flush=True,
                    )

    per_level = []
    for c in levels:
        rows = [r for r in rounds if r["concurrency"] == c]
        level: dict[str, Any] = {"concurrency": c}
        for v in VERSIONS:
            level[v] = {k: statistics.median(r[v][k] for r in rows) for k in ("docs_per_s", "p50_ms", "p99_ms")}
        level["after_vs_before"] = {
            k: statistics.median(r["after"][k] / r["before"][k] for r in rows)
            for k in ("docs_per_s", "p50_ms", "p99_ms")
        }
        per_level.append(level)
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "device": device, "load": load},
        "code": code,
        "variant": variant,
        "options": {
            "levels": levels,
            "docs_per_request": args.per_request,
            "seconds": seconds,
            "rounds": rounds_n,
            "docs": n_docs,
            "server_args": args.server_arg,
        },
        "levels": per_level,
        "rounds": rounds,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_regression.json").write_text(json.dumps(report, indent=2))

    names = {v: f"{v} {(code[v]['commit'] or '?')[:7]}{'+' if code[v]['dirty'] else ''}" for v in VERSIONS}
    print(
        f"device={device} variant={variant} x{args.per_request} docs/call, {seconds:.0f} s per level and version,"
        f" {rounds_n} rounds (medians); {names['before']} vs {names['after']}"
    )
    print(f"{'c':>4}{'version':>10}{'docs/s':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for level in per_level:
        for v in VERSIONS:
            s = level[v]
            print(f"{level['concurrency']:>4}{v:>10}{s['docs_per_s']:>10.1f}{s['p50_ms']:>10.1f}{s['p99_ms']:>10.1f}")
        r = level["after_vs_before"]
        print(f"{'':>4}{'after/bef':>10}{r['docs_per_s']:>9.2f}x{r['p50_ms']:>9.2f}x{r['p99_ms']:>9.2f}x")
    print(f"wrote {args.out / 'serve_regression.json'}")


if __name__ == "__main__":
    main()
