"""How close does the store writer's fresh upsert come to the server's own binary COPY ceiling?

One embedded Postgres; each arm is a child process that imports embedpool from its own tree (the current one,
and with --before DIR another checkout with its own built `_native*.so`), so two versions of the writer run
against the same server in one run, taking turns round by round. In every round a child measures, on the
same 1,000-row batches of 384-d vectors:

- copy_ceiling: the pre-built binary COPY stream of each batch into a logged table with a primary key, the
  COPY its own transaction (autocommit: no BEGIN or COMMIT round trip); no upsert semantics and no client work
  inside the timing (as in bench/ingest.py).
- copy_partition: the same, into the partition of a second fresh collection (its primary key and metadata
  GIN index, no HNSW index): what Postgres spends on the rows where the writer puts them.
- writer_fresh: `Store.upsert` of the same rows into a fresh collection without its HNSW index, called as the
  server calls it (service.writes): the metadata already JSON-encoded (the service encodes it for the content
  hash) and `absent=True` (the service read the ids' stored hashes before embedding them and found none), where
  the tree has them, with the collection rows cached as in a running server (Store.running). Validation,
  encoding and COPY straight into the partition, one transaction per batch.
- writer_plain: the same into a third collection without those hints: the id lookup and the stored-hash read
  in the transaction, the metadata encoded by the writer (what any other caller of Store.upsert gets).
- writer_changed: the same ids again with new content (the staging table and merge).
- client: the client-side work alone: `validate` + `copy_chunks` of the batch, no database.

Everything is timed per batch and summarised by medians over all batches of all rounds. The figure that
matters is fresh_vs_ceiling: per batch, the ceiling COPY's time over the writer's for the same rows, measured
one right after the other, the four steps in an order that turns each batch (a step right after another
commit reads faster, so every arm takes every place equally often). Stored counts and hashes are checked
after every run.

    .venv/bin/python -P bench/writer.py [--quick] [--before DIR] [--rounds N] [--rows N] [--out DIR]

DIR for --before: `git worktree add DIR <commit>`, then build its extension there or copy in a `_native*.so`
whose Rust side matches it.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DIM, BATCH = 384, 1000
_HERE = Path(__file__).resolve().parent


async def _child(uri: str, n_rows: int, label: str) -> dict[str, list[float]]:
    import numpy as np
    from psycopg import AsyncConnection, sql

    from embedpool.store import DocumentRow, Store
    from embedpool.store.collections import index_name, partition_name
    from embedpool.store.writer import copy_chunks, validate

    v = np.random.default_rng(0).standard_normal((n_rows, DIM)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)

    def make_rows(tag: str) -> list[DocumentRow]:
        return [
            DocumentRow(f"doc-{i}", f"passage {i} {tag}", {"n": i, "tag": tag}, f"{i}:{tag}".encode(), v[i])
            for i in range(n_rows)
        ]

    # What the tree's writer takes (a --before tree may predate the hints).
    hinted = "absent" in inspect.signature(Store.upsert).parameters
    encoded = "metadata_json" in {f.name for f in dataclasses.fields(DocumentRow)}

    def as_served(rows: list[DocumentRow]) -> list[DocumentRow]:
        if not encoded:
            return rows
        return [dataclasses.replace(r, metadata_json=json.dumps(r.metadata, sort_keys=True)) for r in rows]

    fresh, changed = make_rows("v1"), make_rows("v2")
    served = as_served(fresh)
    batches = [fresh[i : i + BATCH] for i in range(0, n_rows, BATCH)]
    store = await Store.open(uri)
    # As the server runs it: collection rows cached (no lookup per upsert). Its start-up pass that builds missing
    # indexes is let finish first, so that it cannot build the ones these collections drop.
    async with store.running():
        await store.finish_interrupted_builds()
        keys = ("client", "copy_ceiling", "copy_partition", "writer_fresh", "writer_plain")
        ms: dict[str, list[float]] = {key: [] for key in keys}
        ms["writer_changed"] = []
        async with await AsyncConnection.connect(uri, autocommit=True) as plain:
            info = await store.create_collection(f"{label}_{os.getpid()}_{time.monotonic_ns()}", model="b", dim=DIM)
            await plain.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(index_name(info))))

            for batch in batches:
                started = time.perf_counter()
                list(copy_chunks(info.id, validate(batch, info)[0]))
                ms["client"].append((time.perf_counter() - started) * 1e3)

            table = sql.Identifier(f"ceiling_{info.id}")
            await plain.execute(
                sql.SQL(
                    "CREATE TABLE {} (collection_id int8, embedding vector, id text, text text, metadata jsonb,"
                    " content_hash bytea, PRIMARY KEY (collection_id, id))"
                ).format(table)
            )
            twin = await store.create_collection(f"twin_{info.name}", model="b", dim=DIM)
            await plain.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(index_name(twin))))
            generic = await store.create_collection(f"plain_{info.name}", model="b", dim=DIM)
            await plain.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(index_name(generic))))
            streams = [[bytes(c) for c in copy_chunks(info.id, validate(b, info)[0])] for b in batches]
            twin_streams = [[bytes(c) for c in copy_chunks(twin.id, validate(b, twin)[0])] for b in batches]
            copy = "COPY {} (collection_id, embedding, id, text, metadata, content_hash) FROM STDIN (FORMAT BINARY)"
            query, twin_query = (
                sql.SQL(copy).format(target) for target in (table, sql.Identifier(partition_name(twin)))
            )
            # Batch by batch, the ceiling's COPY and then the writer's upsert of the same rows: the load on a shared
            # machine drifts, and the two see the same moment of it.
            hints: dict[str, Any] = {"absent": True} if hinted else {}

            async def copy(key: str, target: sql.Composed, data: list[bytes]) -> None:
                started = time.perf_counter()
                # Autocommit: the COPY is its own transaction, no BEGIN or COMMIT round trip.
                async with plain.cursor() as cur, cur.copy(target) as stream:
                    for chunk in data:
                        await stream.write(chunk)
                ms[key].append((time.perf_counter() - started) * 1e3)

            async def upsert(key: str, name: str, rows: list[DocumentRow], **options: Any) -> None:
                started = time.perf_counter()
                result = await store.upsert(name, rows, **options)
                ms[key].append((time.perf_counter() - started) * 1e3)
                assert result.inserted == len(rows), result

            for b, (chunks, twin_chunks, batch) in enumerate(zip(streams, twin_streams, batches, strict=True)):
                steps = [
                    copy("copy_ceiling", query, chunks),
                    copy("copy_partition", twin_query, twin_chunks),
                    upsert("writer_fresh", info.name, served[b * BATCH : (b + 1) * BATCH], **hints),
                    upsert("writer_plain", generic.name, batch),
                ]
                # The order turns a step each batch: a step right after another commit reads a little faster, and
                # every arm takes every place equally often.
                for step in steps[b % 4 :] + steps[: b % 4]:
                    await step
            await plain.execute(sql.SQL("DROP TABLE {}").format(table))
            for name in (info.name, twin.name, generic.name):
                assert (await store.stats(name)).count == n_rows
            await store.drop_collection(twin.name)
            await store.drop_collection(generic.name)

            for i in range(0, n_rows, BATCH):
                started = time.perf_counter()
                await store.upsert(info.name, changed[i : i + BATCH])
                ms["writer_changed"].append((time.perf_counter() - started) * 1e3)
            assert (await store.stats(info.name)).count == n_rows
            stored = await store.existing_hashes(info.name, ["doc-0", f"doc-{n_rows - 1}"])
            assert stored == {"doc-0": b"0:v2", f"doc-{n_rows - 1}": f"{n_rows - 1}:v2".encode()}, stored
            await store.drop_collection(info.name)
    await store.close()
    return ms


def _run_child(tree: Path, uri: str, n_rows: int, label: str) -> dict[str, list[float]]:
    env = {**os.environ, "PYTHONPATH": str(tree / "python")}
    out = subprocess.run(
        [sys.executable, "-P", __file__, "--child", uri, "--rows", str(n_rows), "--label", label],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, list[float]] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _commit(tree: Path) -> str:
    """The tree's commit, marked dirty if what the bench runs (the store, the Rust side) has uncommitted changes."""
    git = ["git", "-C", str(tree)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "diff", "--quiet", "HEAD", "--", "python/embedpool/store", "rust"]).returncode != 0
    return commit + (" (dirty)" if dirty else "")


def _summary(runs: list[dict[str, list[float]]]) -> dict[str, float]:
    """Medians over every batch of every round: a stall (a checkpoint, a neighbour's burst) hits a batch or two,
    and the ratios pair each writer batch with the COPYs of the same rows just before it."""
    pooled = {key: [x for run in runs for x in run[key]] for key in runs[0]}
    summary = {f"{key}_ms": statistics.median(values) for key, values in pooled.items()}
    for writer in ("fresh", "plain"):
        for base in ("copy_ceiling", "copy_partition"):
            ratios = [c / w for run in runs for c, w in zip(run[base], run[f"writer_{writer}"], strict=True)]
            summary[f"{writer}_vs_{base.removeprefix('copy_')}"] = statistics.median(ratios)
    timed = [key for key in summary if key.endswith("_ms") and key != "client_ms"]
    summary.update({key.replace("_ms", "_rows_per_s"): BATCH * 1e3 / summary[key] for key in timed})
    return summary


def _table(result: dict[str, Any]) -> str:
    arms = result["arms"]
    keys = list(next(iter(arms.values()))["summary"])
    lines = [f"{'median over batches':<28}" + "".join(f"{arm:>12}" for arm in arms)]
    for key in keys:
        cells = [arms[arm]["summary"][key] for arm in arms]
        lines.append(f"{key:<28}" + "".join(f"{c:>12,.0f}" if key.endswith("per_s") else f"{c:>12.2f}" for c in cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="a checkout of the code to compare (with its _native built)")
    parser.add_argument("--quick", action="store_true", help="4 rounds of 5,000 rows (a minute or two on 2 cores)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=_HERE / "out")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--label", default="after", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import anyio

        print(json.dumps(anyio.run(_child, args.child, args.rows, args.label, backend="asyncio")))
        return

    from embedpool.store import EmbeddedPostgres

    if args.quick:
        args.rounds, args.rows = 4, 5_000

    trees = {"after": _HERE.parent}
    if args.before:
        trees = {"before": args.before.resolve(), **trees}
    runs: dict[str, list[dict[str, list[float]]]] = {arm: [] for arm in trees}
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="embedpool-bench-") as tmp, EmbeddedPostgres(Path(tmp) / "pg") as pg:
        for r in range(args.rounds):
            arms = list(trees) if r % 2 == 0 else list(reversed(trees))
            for arm in arms:
                runs[arm].append(_run_child(trees[arm], pg.uri, args.rows, arm))
                print(f"round {r} {arm}: " + json.dumps({k: round(v, 2) for k, v in _summary(runs[arm][-1:]).items()}))
    result: dict[str, Any] = {
        "arms": {arm: {"summary": _summary(rs), "runs": rs} for arm, rs in runs.items()},
        "params": {"dim": DIM, "batch": BATCH, "rows": args.rows, "rounds": args.rounds, "statistic": "median"},
        "trees": {arm: _commit(tree) for arm, tree in trees.items()},
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "units": {"*_ms": "ms per batch", "*_rows_per_s": "rows/s", "fresh_vs_*": "writer rate / COPY rate"},
    }
    table = _table(result)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "writer.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "writer.txt").write_text(table + "\n")


if __name__ == "__main__":
    main()
