"""Syncs across server processes sharing one Postgres: two servers drain one queue without storing a row twice,
and a server SIGKILLed in the middle of a backfill leaves, once restarted, every row stored exactly once.

Stores are counted twice over: by each process's own /metrics, and by Postgres' own counters of the
collection's partition (inserts, updates, deletes), which no server can misreport.
"""

from __future__ import annotations

import collections
import json
import signal
import subprocess
import sys
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from embedpool.client import Client
from embedpool.store import EmbeddedPostgres, running_postgres
from embedpool.store.sources import APPLICATION_NAME

from .conftest import collection_rows, expected, make_articles, wait_until

pytestmark = pytest.mark.timeout(420)
BATCH = 32


class Server:
    """`embedpool serve` in a process of its own, on free ports, against `url`."""

    def __init__(self, url: str, model_dir: Path, data_dir: Path) -> None:
        cmd = [sys.executable, "-m", "embedpool.cli", "serve", "--database-url", url, "--data-dir", str(data_dir)]
        cmd += ["--model", str(model_dir), "--variant", "fp32_opt", "--port", "0", "--http-port", "-1"]
        cmd += ["--metrics-port", "0", "--log-format", "json", "--sync-batch-size", str(BATCH)]
        cmd += ["--sync-poll-seconds", "1"]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        self.log: collections.deque[str] = collections.deque(maxlen=300)
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            if '"serving ' in line:
                entry = json.loads(line)
                self.port, self.metrics_port = int(entry["port"]), int(entry["metrics_port"])
                break
        else:
            raise AssertionError(f"the server exited ({self.proc.poll()}): {''.join(self.log)}")
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self._drainer.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    def counter(self, name: str, labels: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as reply:
            for line in reply.read().decode().splitlines():
                if line.startswith(f"{name}{{{labels}}} "):
                    return float(line.split()[-1])
        return 0.0

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._drainer.join(10)  # the pipe's end: the process and its children are gone
        assert self.proc.stderr is not None
        self.proc.stderr.close()


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    with running_postgres(tmp_path / "pg") as pg:
        yield pg


def _partition_counts(url: str, collection: str) -> tuple[int, int, int]:
    """Postgres' own count of rows inserted, updated and deleted in the collection's partition."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_user_tables s JOIN collections c"
            " ON s.relname = 'documents_c' || c.id WHERE c.name = %s",
            (collection,),
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def _sync_connections(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (APPLICATION_NAME,))
        return int((row.fetchone() or (0,))[0])


def _stored_once(url: str, collection: str, n: int, rolled_back: int = 0) -> None:
    """No row was ever updated or deleted, and every insert but those of transactions a kill rolled back (at most
    `rolled_back`: Postgres counts their inserts too) is one of the n rows. Its statistics reach every count
    within a second or so of the transactions that made them."""
    wait_until(lambda: _partition_counts(url, collection)[0] >= n, timeout=30, what="the partition's statistics")
    inserted, updated, deleted = _partition_counts(url, collection)
    assert (updated, deleted) == (0, 0) and n <= inserted <= n + rolled_back, (inserted, updated, deleted)


def test_two_servers_drain_one_queue_without_storing_a_row_twice(
    postgres: EmbeddedPostgres, model_dir: Path, tmp_path: Path
) -> None:
    url, name, n = postgres.uri, f"s_{uuid.uuid4().hex[:8]}", 1200
    servers = [Server(url, model_dir, tmp_path / f"data{k}") for k in range(2)]
    try:
        make_articles(url, name, n)
        with Client(",".join(f"127.0.0.1:{s.port}" for s in servers)) as client:
            client.create_sync(
                name,
                source=name,
                id_column="id",
                text="title || ' ' || body",
                collection=name,
                metadata_columns=["tag"],
            )
            wait_until(
                lambda: client.get_sync(name).backlog_rows == 0 and len(collection_rows(url, name)) == n,
                timeout=300,
                what="the backfill by two servers",
            )
        assert collection_rows(url, name) == expected(url, name)
        settled = [s.counter("embedpool_sync_rows_total", f'sync="{name}"') for s in servers]
        updated = [s.counter("embedpool_store_documents_total", 'outcome="updated"') for s in servers]
        assert sum(settled) == n and updated == [0, 0], (settled, updated)
        assert all(k > 0 for k in settled), f"one server did all the work: {settled}"
        _stored_once(url, name, n)
    finally:
        for server in servers:
            server.stop()


def test_a_server_killed_during_a_backfill_loses_and_repeats_nothing(
    postgres: EmbeddedPostgres, model_dir: Path, tmp_path: Path
) -> None:
    url, name, n = postgres.uri, f"s_{uuid.uuid4().hex[:8]}", 2000
    make_articles(url, name, n)
    server = Server(url, model_dir, tmp_path / "data")
    try:
        with Client(f"127.0.0.1:{server.port}") as client:
            client.create_sync(
                name,
                source=name,
                id_column="id",
                text="title || ' ' || body",
                collection=name,
                metadata_columns=["tag"],
            )
        connections: list[int] = []

        def a_fifth_stored() -> bool:
            connections.append(_sync_connections(url))
            return len(collection_rows(url, name)) >= n // 5

        wait_until(a_fifth_stored, timeout=180, what="a fifth of the backfill")
        # --sync-workers (2) batch connections, the one for status and the LISTEN one, however many rows wait.
        assert 0 < max(connections) <= 4, connections
    finally:
        server.stop(signal.SIGKILL)
    assert server.proc.returncode == -signal.SIGKILL
    before = len(collection_rows(url, name))
    assert before < n, "the backfill ended before the kill: nothing was tested"

    server = Server(url, model_dir, tmp_path / "data")
    try:
        with Client(f"127.0.0.1:{server.port}") as client:
            wait_until(
                lambda: client.get_sync(name).backlog_rows == 0 and len(collection_rows(url, name)) == n,
                timeout=300,
                what="the rest of the backfill after the restart",
            )
        assert collection_rows(url, name) == expected(url, name)
        inserted = server.counter("embedpool_store_documents_total", 'outcome="inserted"')
        unchanged = server.counter("embedpool_store_documents_total", 'outcome="unchanged"')
        updated = server.counter("embedpool_store_documents_total", 'outcome="updated"')
        # Batches in flight at the kill may have stored their rows without deleting their queue entries: the
        # restart finds those rows unchanged (not embedded, not written again). Nothing else repeats.
        in_flight = 2 * BATCH
        assert inserted == n - before and updated == 0 and unchanged <= in_flight, (before, inserted, unchanged)
        _stored_once(url, name, n, rolled_back=in_flight)
    finally:
        server.stop()
