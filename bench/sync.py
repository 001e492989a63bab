"""Syncs (issue 15): how fast a sync backfills a table, against `embedpool ingest` of the same rows, and how far
behind it stays while an application writes to the table.

One real `embedpool serve` process (its embedded Postgres; --sync-workers and --sync-batch-size at the server's
defaults unless given) and N deterministic articles (a title and a 60-100-word body, a tag), the same in both arms:
  A. ingest: the rows as a JSONL file ({"id", "text": title + " " + body, "metadata": {"tag"}}), loaded by the
     CLI as a user would: `embedpool ingest COLLECTION FILE` into a fresh collection; rows/s = N / the seconds until
     the command returns (the CLI's start, `cli_start_s` in the JSON, included).
  B. sync: the rows in table `articles` of the server's database; Client.create_sync (what `embedpool sync
     create` calls, here one attempt: see sync_arm) into a fresh collection; rows/s = N / the seconds from the
     call until the sync's queue is empty and the collection holds N rows (both read from the database every
     0.1 s, with GetSync's own query: GetSync waits for a connection of the sync workers' pool, which a worker
     holds for the whole of its batch, so its answer can come a batch's duration late).
The arms alternate (A, B, A, B, ...: the machine may be shared, drift hits both), one fresh collection each;
each arm's median and the ratio B/A (the issue's goal: >= 0.8) are reported, and a ratio only if every round
stored exactly the table's rows (id, text, metadata compared one by one).

Then the lag: the last round's sync stays, caught up, while a writer changes the table at --write-rate rows/s for
--lag-seconds (one row per transaction on an even schedule; 4 updates of distinct existing rows to 1 insert).
The sync's lag (the age of its oldest pending change) and backlog are read every 0.5 s (as above), GetSync is
called every 0.5 s to time its answers, and for every 5th write the end-to-end seconds from its commit until the
collection holds the new text are measured (the documents table polled every 0.1 s). At the end the collection
must equal the table. A steady state needs the sync to embed faster than the writes come: the JSON records the
write rate over the backfill's rows/s (above 1, the lag can only grow while the writes last).

On a 2-core machine shared with others the default is 20,000 rows and 2 rounds; the issue's figure is for
100,000 rows: `--rows 100000` on a real machine. The time is the rows over the embedding rate, four times over:
these articles embed at 15-25 rows/s on the 2-core box under a load of 8 (--quick then takes about 5 minutes),
so 100 rows/s of writes outpace it there and the lag only grows while they last (--write-rate 10 shows the
steady state such a box can keep).

    .venv/bin/python -P bench/sync.py            # 20,000 rows, 2 rounds, 60 s of writes
    .venv/bin/python -P bench/sync.py --quick    # 2,000 rows, 1 round, 10 s of writes
    .venv/bin/python -P bench/sync.py --rows 100000 --rounds 3
Writes DIR/sync.json and DIR/sync.png (--out, default bench/results).
"""

from __future__ import annotations

import os
import sys

# Run as a script, this folder comes first on sys.path and bench/tokenize.py would shadow the stdlib
# `tokenize`; keep the folder, but last, for `_chaos_server`.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

import argparse
import json
import platform
import random
import re
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from _chaos_server import ServerProcess

from embedpool.client import Client, RetryPolicy
from embedpool.config import Settings
from embedpool.engine import prepare

TABLE = "articles"
TEXT_EXPR = "title || ' ' || body"
GOAL = 0.8  # the bar: sync backfill rows/s at least this fraction of ingest's
SAMPLE_EVERY = 5  # writes whose end-to-end time is measured
LAG_SAMPLE_S = 0.5
ROW_POLL_S = 0.1


# The rows.


def _vocabulary() -> list[str]:
    """Real English words (stdlib docstrings of a few modules, deterministic for a Python version), so that the
    tokenizer splits them as it would an article."""
    import argparse as a
    import asyncio
    import json as j
    import logging
    import statistics as s
    import subprocess as p
    import typing

    text = " ".join(m.__doc__ or "" for m in (a, asyncio, j, logging, s, p, typing, re, random))
    return sorted({w.lower() for w in re.findall(r"[A-Za-z]{3,12}", text)})


@dataclass(frozen=True, slots=True)
class Article:
    id: int
    title: str
    body: str
    tag: str

    @property
    def text(self) -> str:
        return f"{self.title} {self.body}"


def _words(rng: random.Random, vocab: Sequence[str], n: int) -> str:
    return " ".join(rng.choice(vocab) for _ in range(n))


def articles(n: int, vocab: Sequence[str]) -> list[Article]:
    out = []
    for i in range(1, n + 1):
        rng = random.Random(i)
        title = f"Article {i}: {_words(rng, vocab, 4)}"
        out.append(Article(i, title, _words(rng, vocab, 60 + rng.randrange(41)), f"tag{i % 10}"))
    return out


def write_jsonl(rows: Sequence[Article], path: Path) -> None:
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps({"id": str(r.id), "text": r.text, "metadata": {"tag": r.tag}}) + "\n")


def create_table(url: str, rows: Sequence[Article]) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
        conn.execute(f"CREATE TABLE {TABLE} (id int PRIMARY KEY, title text NOT NULL, body text NOT NULL, tag text)")
        with conn.cursor().copy(f"COPY {TABLE} (id, title, body, tag) FROM STDIN") as copy:
            for r in rows:
                copy.write_row((r.id, r.title, r.body, r.tag))
        conn.execute(f"ANALYZE {TABLE}")


def table_rows(url: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """What a collection kept equal to the table must hold: id -> (text, metadata)."""
    with psycopg.connect(url, autocommit=True) as conn:
        found = conn.execute(f"SELECT id::text, {TEXT_EXPR}, tag FROM {TABLE}").fetchall()
    return {i: (text, {"tag": tag}) for i, text, tag in found}


def collection_rows(url: str, collection: str) -> dict[str, tuple[str, dict[str, Any]]]:
    with psycopg.connect(url, autocommit=True) as conn:
        found = conn.execute(
            "SELECT d.id, d.text, d.metadata FROM documents d JOIN collections c ON c.id = d.collection_id"
            " WHERE c.name = %s",
            (collection,),
        ).fetchall()
    return {i: (text, metadata) for i, text, metadata in found}


def differences(want: dict[str, tuple[str, dict[str, Any]]], got: dict[str, tuple[str, dict[str, Any]]]) -> int:
    """Rows missing, extra, or stored with another text or metadata."""
    return sum(got.get(k) != v for k, v in want.items()) + len(got.keys() - want.keys())


# The backfill arms.


@dataclass(frozen=True, slots=True)
class Queue:
    backlog: int
    lag_s: float
    dead: int


def queue(conn: psycopg.Connection[Any], name: str) -> Queue:
    """A sync's backlog (rows), lag (age of its oldest pending change) and dead rows, as GetSync computes them, read
    from the queue directly: GetSync waits for a connection of the workers' pool, which each worker holds for the
    whole of its batch, so its answer can come a batch's duration late."""
    row = conn.execute(
        "SELECT count(DISTINCT row_id) FILTER (WHERE NOT dead),"
        " coalesce(extract(epoch FROM now() - min(enqueued_at) FILTER (WHERE NOT dead)), 0),"
        " count(DISTINCT row_id) FILTER (WHERE dead) FROM embedpool_sync.changes WHERE sync = %s",
        (name,),
    ).fetchone()
    assert row is not None
    return Queue(int(row[0]), float(row[1]), int(row[2]))


def stored(conn: psycopg.Connection[Any], collection: str) -> int:
    row = conn.execute(
        "SELECT count(*) FROM documents d JOIN collections c ON c.id = d.collection_id WHERE c.name = %s",
        (collection,),
    ).fetchone()
    return int(row[0]) if row else 0


def cli(target: str, *args: str) -> str:
    """`embedpool ARGS --target TARGET` as a user runs it (a new process); its stdout. A failure ends the run."""
    cmd = [sys.executable, "-m", "embedpool.cli", *args, "--target", target]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def cli_start_s() -> float:
    """What starting the CLI costs (`embedpool --version`), part of the ingest arm's time and not the sync's."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "embedpool.cli", "--version"], capture_output=True, check=True)
    return round(time.perf_counter() - started, 2)


def ingest_arm(server: ServerProcess, jsonl: Path, collection: str, state: Path) -> dict[str, Any]:
    state.mkdir()  # the checkpoint's folder (the CLI does not create it)
    started = time.perf_counter()
    out = cli(server.target, "ingest", collection, str(jsonl), "--quiet", "--restart", "--state-dir", str(state))
    seconds = time.perf_counter() - started
    summary = json.loads(out.strip().splitlines()[-1])
    return {"seconds": seconds, "reported_docs_per_s": summary["docs_per_s"], "documents": summary["documents"]}


def sync_arm(server: ServerProcess, name: str, collection: str, n: int) -> dict[str, Any]:
    """Client.create_sync, one attempt: `embedpool sync create` (the same call, retried by the client) can fail
    with AlreadyExists on a loaded machine, its first attempt having created the sync but answered UNAVAILABLE."""
    started = time.perf_counter()
    with Client(server.target, timeout=600, retry=RetryPolicy(max_attempts=1)) as client:
        sync = client.create_sync(
            name, source=TABLE, id_column="id", text=TEXT_EXPR, collection=collection, metadata_columns=("tag",)
        )
    created = time.perf_counter() - started
    backfilled = sync.backfilled_rows
    with psycopg.connect(server.database_uri(), autocommit=True) as conn:
        while True:
            q = queue(conn, name)
            if q.backlog == 0 and stored(conn, collection) == n:
                break
            if q.dead:
                raise RuntimeError(f"sync {name}: {q.dead} dead rows")
            time.sleep(0.1)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "create_s": created, "backfilled": backfilled}


def backfill(
    server: ServerProcess, client: Client, rows: Sequence[Article], work: Path, *, rounds: int
) -> dict[str, Any]:
    """A then B in each round, each into a fresh collection; every round's collection checked row by row against
    the table, then dropped (the last sync and its collection stay for the lag measurement)."""
    n = len(rows)
    jsonl = work / "articles.jsonl"
    write_jsonl(rows, jsonl)
    url = server.database_uri()
    want = table_rows(url)
    arms: dict[str, list[dict[str, Any]]] = {"ingest": [], "sync": []}
    for r in range(rounds):
        last = r == rounds - 1
        collection = f"ingested_{r}"
        result = ingest_arm(server, jsonl, collection, work / f"state-{r}")
        _check(result, url, collection, want, n)
        client.drop_collection(collection)
        arms["ingest"].append(result)
        _print_round(r, "ingest", result)

        name, collection = f"bench_{r}", f"synced_{r}"
        result = sync_arm(server, name, collection, n)
        _check(result, url, collection, want, n)
        if not last:
            client.drop_sync(name)
            client.drop_collection(collection)
        arms["sync"].append(result)
        _print_round(r, "sync", result)
    figures: dict[str, Any] = {}
    for arm, results in arms.items():
        rates = [x["rows_per_s"] for x in results]
        figures[arm] = {"rows_per_s_median": round(statistics.median(rates), 1), "rounds": results}
    stored_ok = all(x["stored_ok"] for results in arms.values() for x in results)
    ratio = figures["sync"]["rows_per_s_median"] / figures["ingest"]["rows_per_s_median"]
    figures["all_rows_stored"] = stored_ok
    figures["ratio_sync_vs_ingest"] = round(ratio, 3) if stored_ok else None
    figures["goal"] = GOAL
    figures["cli_start_s"] = cli_start_s()
    figures["meets_goal"] = stored_ok and ratio >= GOAL
    figures["sync"]["name"] = f"bench_{rounds - 1}"
    figures["sync"]["collection"] = f"synced_{rounds - 1}"
    return figures


def _check(result: dict[str, Any], url: str, collection: str, want: dict[str, Any], n: int) -> None:
    got = collection_rows(url, collection)
    result["rows"] = n
    result["stored"] = len(got)
    result["wrong_rows"] = differences(want, got)
    result["stored_ok"] = result["wrong_rows"] == 0 and len(got) == n
    result["rows_per_s"] = round(n / result["seconds"], 1)
    result["seconds"] = round(result["seconds"], 2)
    if "create_s" in result:
        result["create_s"] = round(result["create_s"], 2)


def _print_round(r: int, arm: str, result: dict[str, Any]) -> None:
    ok = "ok" if result["stored_ok"] else f"WRONG ({result['wrong_rows']} rows differ)"
    print(f"round {r + 1} {arm:>6}: {result['rows_per_s']:8.1f} rows/s ({result['seconds']:.1f} s), {ok}", flush=True)


# The lag under a write load.


@dataclass
class Probe:
    """A write whose end-to-end time is measured: committed at `at`, seen in the collection at `seen`."""

    row_id: str
    text: str
    at: float
    seen: float | None = None
    superseded: bool = False


@dataclass
class LagRun:
    writes: int = 0
    behind_s: float = 0.0  # the writer's worst slip behind its schedule
    probes: list[Probe] = field(default_factory=list)
    samples: list[tuple[float, float, int]] = field(default_factory=list)  # (t, lag_seconds, backlog_rows)
    get_sync_s: list[float] = field(default_factory=list)  # how long each GetSync took to answer
    get_sync_errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _writer(url: str, run: LagRun, n: int, rate: float, seconds: float, vocab: Sequence[str], t0: float) -> None:
    """One row per transaction every 1/rate s on an absolute schedule: 4 updates of distinct rows to 1 insert."""
    rng = random.Random(1)
    total = int(rate * seconds)
    updates = [str(i) for i in rng.sample(range(1, n + 1), min(n, total))]
    latest: dict[str, Probe] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        for k in range(total):
            due = t0 + k / rate
            now = time.monotonic()
            if now < due:
                time.sleep(due - now)
            else:
                run.behind_s = max(run.behind_s, now - due)
            body = f"revision {k} {_words(rng, vocab, 60 + rng.randrange(41))}"
            if k % 5 == 4 or not updates:
                row_id = str(n + 1 + k)
                title = f"Article {row_id}: new"
                conn.execute(
                    f"INSERT INTO {TABLE} (id, title, body, tag) VALUES (%s, %s, %s, 'new')", (int(row_id), title, body)
                )
            else:
                row_id = updates.pop()
                cur = conn.execute(
                    f"UPDATE {TABLE} SET body = %s WHERE id = %s RETURNING title", (body, int(row_id))
                ).fetchone()
                assert cur is not None
                title = cur[0]
            at = time.monotonic()
            run.writes += 1
            if k % SAMPLE_EVERY == 0:
                probe = Probe(row_id, f"{title} {body}", at)
                with run.lock:
                    if row_id in latest:
                        latest[row_id].superseded = True
                    latest[row_id] = probe
                    run.probes.append(probe)


def _watch_rows(url: str, collection: str, run: LagRun, stop: threading.Event) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        while not stop.is_set():
            with run.lock:
                pending = {p.row_id: p for p in run.probes if p.seen is None and not p.superseded}
            if pending:
                found = conn.execute(
                    "SELECT d.id, d.text FROM documents d JOIN collections c ON c.id = d.collection_id"
                    " WHERE c.name = %s AND d.id = ANY(%s)",
                    (collection, list(pending)),
                ).fetchall()
                now = time.monotonic()
                for row_id, text in found:
                    if text == pending[row_id].text:
                        pending[row_id].seen = now
            stop.wait(ROW_POLL_S)


def _watch_queue(url: str, name: str, run: LagRun, t0: float, stop: threading.Event) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        while not stop.is_set():
            q = queue(conn, name)
            run.samples.append((round(time.monotonic() - t0, 2), round(q.lag_s, 3), q.backlog))
            stop.wait(LAG_SAMPLE_S)


def _watch_get_sync(client: Client, name: str, run: LagRun, stop: threading.Event) -> None:
    """GetSync as an operator would call it (`embedpool sync status`), timed; one attempt each (no retries)."""
    while not stop.is_set():
        started = time.perf_counter()
        try:
            client.get_sync(name, timeout=60)
        except Exception as e:  # counted: the figure is how often status failed
            run.get_sync_errors.append(f"{type(e).__name__}: {e}"[:200])
        run.get_sync_s.append(time.perf_counter() - started)
        stop.wait(LAG_SAMPLE_S)


def _quantiles(xs: Sequence[float]) -> dict[str, float | int | None]:
    if not xs:
        return {"n": 0, "p50": None, "p95": None, "max": None}
    s = sorted(xs)
    return {
        "n": len(s),
        "p50": round(s[len(s) // 2], 3),
        "p95": round(s[min(len(s) - 1, int(len(s) * 0.95))], 3),
        "max": round(s[-1], 3),
    }


def lag(
    server: ServerProcess,
    name: str,
    collection: str,
    n: int,
    vocab: Sequence[str],
    *,
    rate: float,
    seconds: float,
    drain_timeout: float,
) -> dict[str, Any]:
    url = server.database_uri()
    run = LagRun()
    stop = threading.Event()
    status = Client(server.target, timeout=60, retry=RetryPolicy(max_attempts=1))
    t0 = time.monotonic() + 0.5
    watchers = [
        threading.Thread(target=_watch_rows, args=(url, collection, run, stop), daemon=True),
        threading.Thread(target=_watch_queue, args=(url, name, run, t0, stop), daemon=True),
        threading.Thread(target=_watch_get_sync, args=(status, name, run, stop), daemon=True),
    ]
    for w in watchers:
        w.start()
    _writer(url, run, n, rate, seconds, vocab, t0)
    wrote_s = time.monotonic() - t0
    ended = time.monotonic()
    drained_s: float | None = None
    with psycopg.connect(url, autocommit=True) as conn:
        while time.monotonic() - ended < drain_timeout:
            with run.lock:
                unseen = sum(p.seen is None and not p.superseded for p in run.probes)
            if queue(conn, name).backlog == 0 and unseen == 0:
                drained_s = time.monotonic() - ended
                break
            time.sleep(0.1)
    stop.set()
    for w in watchers:
        w.join(70)
    status.close()
    during = [(t, lag_s, backlog) for t, lag_s, backlog in run.samples if 0 <= t <= wrote_s]
    measured = [p for p in run.probes if not p.superseded]
    want, got = table_rows(url), collection_rows(url, collection)
    return {
        "write_rate_target": rate,
        "seconds": seconds,
        "writes": run.writes,
        "write_rate_achieved": round(run.writes / wrote_s, 1),
        "writer_worst_slip_s": round(run.behind_s, 3),
        "lag_seconds": _quantiles([x[1] for x in during]),
        "backlog_rows": _quantiles([x[2] for x in during]),
        "end_to_end_s": _quantiles([p.seen - p.at for p in measured if p.seen is not None]),
        "end_to_end_unseen": sum(p.seen is None for p in measured),
        "end_to_end_resolution_s": ROW_POLL_S,
        "get_sync_answer_s": _quantiles(run.get_sync_s),
        "get_sync_errors": len(run.get_sync_errors),
        "get_sync_error_examples": run.get_sync_errors[:3],
        "drain_s": None if drained_s is None else round(drained_s, 2),
        "rows_in_table": len(want),
        "wrong_rows_at_end": differences(want, got),
        "collection_matches_table": differences(want, got) == 0,
        "timeline": run.samples,
    }


# Output.


def _table(result: dict[str, Any]) -> str:
    b, lg = result["backfill"], result["lag"]
    lines = [
        f"backfill of {result['rows']} rows, {result['rounds']} round(s) per arm (median rows/s)",
        f"{'arm':8} {'rows/s':>9} {'rounds':>24} {'all stored':>11}",
    ]
    for arm in ("ingest", "sync"):
        rounds = ", ".join(f"{x['rows_per_s']:.0f}" for x in b[arm]["rounds"])
        ok = all(x["stored_ok"] for x in b[arm]["rounds"])
        lines.append(f"{arm:8} {b[arm]['rows_per_s_median']:9.1f} {rounds:>24} {ok!s:>11}")
    ratio = b["ratio_sync_vs_ingest"]
    verdict = "meets" if b["meets_goal"] else "misses"
    lines.append(f"sync / ingest: {ratio} ({verdict} the goal of >= {GOAL})")
    q = lg["lag_seconds"]
    e = lg["end_to_end_s"]
    lines += [
        "",
        f"lag under {lg['write_rate_target']:.0f} rows/s of writes for {lg['seconds']:.0f} s"
        f" ({lg['writes']} writes, {lg['write_rate_achieved']} rows/s achieved)",
        f"lag_seconds          p50 {q['p50']}  p95 {q['p95']}  max {q['max']}  ({q['n']} samples)",
        f"backlog rows         p50 {lg['backlog_rows']['p50']}  p95 {lg['backlog_rows']['p95']}"
        f"  max {lg['backlog_rows']['max']}",
        f"write -> stored (s)  p50 {e['p50']}  p95 {e['p95']}  max {e['max']}  ({e['n']} rows,"
        f" {lg['end_to_end_unseen']} unseen)",
        f"GetSync answered in  p50 {lg['get_sync_answer_s']['p50']}  max {lg['get_sync_answer_s']['max']} s"
        f"  ({lg['get_sync_errors']} failed)",
        f"writes / backfill rate: {lg['write_rate_vs_sync_backfill']}"
        + (
            " (above 1: the writes outpace what this machine embeds; no steady state)"
            if lg["write_rate_vs_sync_backfill"] > 1
            else ""
        ),
        f"drained {lg['drain_s']} s after the writes; collection equals table: {lg['collection_matches_table']}",
    ]
    return "\n".join(lines)


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b, lg = result["backfill"], result["lag"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 2]})
    for k, arm in enumerate(("ingest", "sync")):
        rates = [x["rows_per_s"] for x in b[arm]["rounds"]]
        left.bar(k, b[arm]["rows_per_s_median"], color=("tab:blue", "tab:orange")[k], alpha=0.7)
        left.scatter([k] * len(rates), rates, color="black", s=12, zorder=3)
    left.set_xticks([0, 1], ["embedpool ingest", "sync backfill"])
    left.set_ylabel("rows/s (bar: median; dots: rounds)")
    left.set_title(f"backfill of {result['rows']} rows: ratio {b['ratio_sync_vs_ingest']}")
    ts = [t for t, _, _ in lg["timeline"]]
    right.plot(ts, [x for _, x, _ in lg["timeline"]], label="lag_seconds (oldest pending change)")
    right.axvspan(0, lg["seconds"], color="grey", alpha=0.15, label=f"{lg['write_rate_target']:.0f} rows/s of writes")
    right.set_xlabel("seconds")
    right.set_ylabel("seconds")
    twin = right.twinx()
    twin.plot(ts, [x for _, _, x in lg["timeline"]], color="tab:red", alpha=0.6, label="backlog rows")
    twin.set_ylabel("rows")
    right.set_title("lag while writing (queue read every 0.5 s)")
    handles = right.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    right.legend(handles=handles, fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2,000 rows, 1 round, 10 s of writes")
    parser.add_argument("--rows", type=int, default=0, help="rows backfilled (default 20,000; --quick 2,000)")
    parser.add_argument("--rounds", type=int, default=0, help="rounds per arm (default 2; --quick 1)")
    parser.add_argument("--lag-seconds", type=float, default=0.0, help="seconds of writes (default 60; --quick 10)")
    parser.add_argument("--write-rate", type=float, default=100.0, help="rows written per second during the lag run")
    parser.add_argument("--sync-workers", type=int, default=2, help="the server's --sync-workers")
    parser.add_argument("--sync-batch-size", type=int, default=256, help="the server's --sync-batch-size")
    parser.add_argument("--out", type=Path, default=Path(_HERE) / "results")
    args = parser.parse_args(argv)
    args.rows = args.rows or (2000 if args.quick else 20000)
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.lag_seconds = args.lag_seconds or (10.0 if args.quick else 60.0)

    vocab = _vocabulary()
    rows = articles(args.rows, vocab)
    load_start = os.getloadavg()[0]
    model = prepare(Settings()).root
    flags = {"sync_workers": args.sync_workers, "sync_batch_size": args.sync_batch_size}
    with (
        tempfile.TemporaryDirectory(prefix="bench-sync-") as tmp,
        ServerProcess(Path(tmp) / "data", model, **flags) as server,
    ):
        print(f"server ready in {server.ready_s:.1f} s", flush=True)
        create_table(server.database_uri(), rows)
        with Client(server.target, timeout=60) as client:
            client.embed([r.text for r in rows[:64]])  # warm-up: sessions, allocator, connections
            figures = backfill(server, client, rows, Path(tmp), rounds=args.rounds)
            lag_figures = lag(
                server,
                figures["sync"]["name"],
                figures["sync"]["collection"],
                args.rows,
                vocab,
                rate=args.write_rate,
                seconds=args.lag_seconds,
                # the backlog the writes can leave, at the backfill's rate, with room to spare
                drain_timeout=max(60.0, 3 * args.write_rate * args.lag_seconds / figures["sync"]["rows_per_s_median"]),
            )
        errors = list(server.errors)
    words = [len(r.text.split()) for r in rows]
    result: dict[str, Any] = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "load_avg_1m_at_start": round(load_start, 2),
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "rows": args.rows,
        "rounds": args.rounds,
        "words_per_row": {"min": min(words), "median": statistics.median(words), "max": max(words)},
        "backfill": figures,
        "lag": {
            **lag_figures,
            "write_rate_vs_sync_backfill": round(args.write_rate / figures["sync"]["rows_per_s_median"], 2),
        },
        "server_errors": errors[:20],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sync.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(result, args.out / "sync.png")
    print(_table(result))
    print(f"\nwrote {args.out / 'sync.json'} and sync.png")
    correct = figures["all_rows_stored"] and lag_figures["collection_matches_table"] and not errors
    return 0 if correct else 1


if __name__ == "__main__":
    sys.exit(main())
