"""Hypothesis: any sequence of inserts, updates, id changes, deletes and TRUNCATEs in the source table,
interleaved with sync worker batches (some running while the table changes), ends with the collection equal to
the table.

The core is assembled in-process (real model, pool, store and Postgres; no door) so that the test decides when
a worker takes a batch: the server's own workers would take them whenever they liked.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread
import psycopg
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from embedpool.config import Settings
from embedpool.engine import load_engine
from embedpool.pool import running_pool
from embedpool.service import EmbeddingService, Limits
from embedpool.service.models import Models
from embedpool.service.sync_worker import SyncWorkerConfig, SyncWorkers
from embedpool.service.syncs import Syncs, SyncSpec
from embedpool.store import Store, running_postgres
from embedpool.store.sources import DEFAULT, SourceDatabases

from .conftest import collection_rows, expected

pytestmark = pytest.mark.timeout(600)
IDS = st.integers(0, 5)
TEXTS = st.sampled_from(["alpha", "beta", "gamma", "delta", "a longer text about databases"])


@dataclass
class Harness:
    url: str
    syncs: Syncs
    workers: SyncWorkers


@contextlib.asynccontextmanager
async def _harness(url: str, settings: Settings) -> AsyncIterator[Harness]:
    engine = await anyio.to_thread.run_sync(load_engine, settings)
    store = await Store.open(url, max_size=4)
    sources = SourceDatabases({DEFAULT: url}, max_connections=2)
    try:
        async with running_pool(engine.tokenizer, engine.sessions, engine.pool_config()) as pool:
            core = EmbeddingService(
                Models.of([(pool, engine.model)], store), store, Limits.from_settings(engine.settings)
            )
            config = SyncWorkerConfig(workers=0, batch_size=3, max_attempts=3)
            yield Harness(url, Syncs(core, store, sources), SyncWorkers(core, store, sources, config))
    finally:
        await sources.close()
        await store.close()


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[tuple[BlockingPortal, Harness]]:
    tmp = tmp_path_factory.mktemp("convergence")
    settings = Settings(model=str(model_dir), data_dir=tmp, variant="fp32_opt", max_concurrent_inputs=256)
    with (
        running_postgres(tmp / "pg") as pg,
        start_blocking_portal(backend="asyncio") as portal,
        portal.wrap_async_context_manager(_harness(pg.uri, settings)) as h,
    ):
        yield portal, h


Step = tuple[str, int, int, str]
STEPS = st.one_of(
    st.tuples(st.just("upsert"), IDS, st.just(0), TEXTS),
    st.tuples(st.just("delete"), IDS, st.just(0), st.just("")),
    st.tuples(st.just("rekey"), IDS, IDS, st.just("")),
    st.tuples(st.just("work"), st.integers(1, 3), st.just(0), st.just("")),
    st.tuples(st.just("work_while_changing"), IDS, st.just(0), TEXTS),
    st.tuples(st.just("truncate"), st.just(0), st.just(0), st.just("")),
    st.tuples(st.just("work_while_truncating"), st.just(0), st.just(0), st.just("")),
)


def _change(conn: psycopg.Connection[tuple[object, ...]], table: str, step: Step) -> None:
    kind, a, b, text = step
    if kind in ("upsert", "work_while_changing"):
        conn.execute(
            f"INSERT INTO {table} VALUES (%s, 't', %s, 'x') ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body",
            (a, text),
        )
    elif kind == "delete":
        conn.execute(f"DELETE FROM {table} WHERE id = %s", (a,))
    elif kind in ("truncate", "work_while_truncating"):  # waits for a batch that has read the table
        conn.execute(f"TRUNCATE {table}")
    elif kind == "rekey":
        conn.execute(
            f"UPDATE {table} SET id = %s WHERE id = %s AND NOT EXISTS (SELECT 1 FROM {table} WHERE id = %s)", (b, a, b)
        )


@hypothesis_settings(max_examples=25)
@given(steps=st.lists(STEPS, max_size=20))
def test_the_collection_converges_to_the_table(harness: tuple[BlockingPortal, Harness], steps: list[Step]) -> None:
    portal, h = harness
    name = f"h_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(h.url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, title text, body text, tag text)")
        conn.execute(f"INSERT INTO {name} VALUES (0, 't', 'seed', 'x'), (1, 't', 'seed one', 'x')")
        spec = SyncSpec(name, name, "id", "title || ' ' || body", name, metadata_columns=("tag",))
        record = portal.call(h.syncs.create, spec).record
        for step in steps:
            if step[0] == "work":
                for _ in range(step[1]):
                    portal.call(h.workers.batch, record)
            elif step[0] in ("work_while_changing", "work_while_truncating"):  # a batch in flight meanwhile
                batch = portal.start_task_soon(h.workers.batch, record)
                _change(conn, name, step)
                batch.result(60)
            else:
                _change(conn, name, step)
        while portal.call(h.workers.batch, record) > 0:
            pass
        assert portal.call(h.syncs.status, name).queue.pending_rows == 0
        assert collection_rows(h.url, name) == expected(h.url, name), steps
        portal.call(h.syncs.drop, name)
