"""Syncs end to end: a real server (with a fault-injecting engine session), its Postgres, the real model.

The collection converges to exactly the source table's current contents after inserts, quick repeated
updates, deletes and rows leaving the filter; a poison row is dead-lettered with its error without holding up
the others, and retried once it is changed; bad requests get precise statuses. (Several server processes,
and SIGKILL: test_sync_processes.py.)
"""

from __future__ import annotations

import dataclasses
import functools
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import httpx
import psycopg
import pytest

from embedpool.client import Client
from embedpool.engine import Engine, load_engine
from embedpool.errors import AlreadyExists, InvalidArgument, NotFound
from embedpool.server.app import Running
from embedpool.store import sync_source as source_db

from ..conftest import SettingsFactory, serving
from .conftest import collection_rows, expected, make_articles, wait_until

pytestmark = pytest.mark.timeout(300)
POISON = "zeppelin"


@pytest.fixture(scope="module")
def sync_server(
    tmp_path_factory: pytest.TempPathFactory, make_settings: SettingsFactory, poisoned_session: Callable[..., Any]
) -> Iterator[Running]:
    settings = make_settings(
        tmp_path_factory.mktemp("sync"),
        sync_poll_seconds=0.5,
        sync_max_attempts=2,
        sync_batch_size=16,
        variant="fp32_opt",
    )
    engine: Engine = load_engine(settings)
    poison = int(engine.tokenizer.encode_ragged([POISON])[0][1])
    engine = dataclasses.replace(engine, sessions=[poisoned_session(engine.sessions[0], poison)])
    with serving(settings, engine) as running:
        yield running


@pytest.fixture(scope="module")
def client(sync_server: Running) -> Iterator[Client]:
    with Client(f"127.0.0.1:{sync_server.port}") as c:
        yield c


def _name() -> str:
    return f"s_{uuid.uuid4().hex[:8]}"


def _converged(url: str, client: Client, name: str, table: str, where: str = "true") -> Callable[[], bool]:
    collection = client.get_sync(name).collection

    def check() -> bool:
        return client.get_sync(name).backlog_rows == 0 and collection_rows(url, collection) == expected(
            url, table, where
        )

    return check


def test_the_collection_follows_inserts_updates_deletes_and_the_filter(sync_server: Running, client: Client) -> None:
    url = sync_server.database_url
    name = table = _name()
    make_articles(url, table, 40)
    created = client.create_sync(
        name,
        source=table,
        id_column="id",
        text="title || ' ' || body",
        collection=name,
        metadata_columns=["tag"],
        where="tag <> 'hidden'",
    )
    assert created.backfilled_rows == 40
    assert (created.source, created.collection, created.metadata_columns) == (f"public.{table}", name, ("tag",))
    wait_until(_converged(url, client, name, table, "tag <> 'hidden'"), what="the backfill")

    with psycopg.connect(url, autocommit=True) as conn:
        for k in range(5):  # quick repeated updates: the last text wins
            conn.execute(f"UPDATE {table} SET body = %s WHERE id = 3", (f"rewritten {k}",))
        conn.execute(f"UPDATE {table} SET body = 'doomed' WHERE id = 5")
        conn.execute(f"DELETE FROM {table} WHERE id = 5")  # a delete wins over the update before it
        conn.execute(f"DELETE FROM {table} WHERE id BETWEEN 10 AND 14")
        conn.execute(f"UPDATE {table} SET tag = 'hidden' WHERE id = 8")  # leaves the filter: removed
        conn.execute(f"UPDATE {table} SET id = 400 WHERE id = 9")  # a new key: the old id goes
        conn.execute(f"INSERT INTO {table} VALUES (41, 'new', 'an inserted article', 'odd')")
        with conn.transaction():  # a transaction's changes arrive together
            conn.execute(f"INSERT INTO {table} VALUES (42, 'newer', 'in a transaction', 'even')")
            conn.execute(f"UPDATE {table} SET title = 'retitled' WHERE id = 1")
    wait_until(_converged(url, client, name, table, "tag <> 'hidden'"), what="the changes")
    stored = collection_rows(url, name)
    assert stored["3"][0] == "title 3 rewritten 4" and "5" not in stored and "8" not in stored
    assert "9" not in stored and stored["400"][0] == "title 9 body of article 9"
    status = client.get_sync(name)
    assert (status.backlog_rows, status.dead_rows, status.lag_seconds) == (0, 0, 0.0)
    assert status.rows_per_second > 0  # the rows of the last minute
    assert name in [s.name for s in client.list_syncs()]


def _stored_documents(running: Running) -> dict[str, float]:
    """embedpool_store_documents_total by outcome (process-wide: the module's tests run one at a time)."""
    found = {}
    for line in httpx.get(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=10).text.splitlines():
        if line.startswith("embedpool_store_documents_total{"):
            found[line.split('"')[1]] = float(line.split()[-1])
    return found


def test_a_truncate_reaches_the_collection_and_a_reload_embeds_nothing_again(
    sync_server: Running, client: Client
) -> None:
    url = sync_server.database_url
    name = table = _name()
    make_articles(url, table, 12)
    client.create_sync(
        name, source=table, id_column="id", text="title || ' ' || body", collection=name, metadata_columns=["tag"]
    )
    wait_until(_converged(url, client, name, table), what="the backfill")
    before = _stored_documents(sync_server)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE TEMP TABLE saved AS SELECT * FROM {table} WHERE id <= 8")
        with conn.transaction():  # the usual reload: empty the table and load it again, 4 rows fewer
            conn.execute(f"TRUNCATE {table}")
            conn.execute(f"INSERT INTO {table} SELECT * FROM saved")
    wait_until(_converged(url, client, name, table), what="the reload")
    assert sorted(collection_rows(url, name), key=int) == [str(i) for i in range(1, 9)]
    after = _stored_documents(sync_server)
    # The 8 reloaded rows were seen unchanged (neither embedded nor written); the 4 others were removed.
    assert after.get("inserted", 0) == before.get("inserted", 0)
    assert after.get("updated", 0) == before.get("updated", 0)
    assert after.get("unchanged", 0) - before.get("unchanged", 0) >= 8

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {table}")
        conn.execute(f"INSERT INTO {table} VALUES (50, 'after', 'the second truncate', 'even')")
    wait_until(_converged(url, client, name, table), what="the second truncate")
    assert list(collection_rows(url, name)) == ["50"]


def test_a_sync_installed_before_truncate_capture_gets_it(sync_server: Running) -> None:
    """An older embedpool installed the row trigger only: `upgrade` (run by a worker once per sync) adds the
    TRUNCATE capture and its table, and a second run finds nothing to do."""
    url = sync_server.database_url
    table = _name()
    make_articles(url, table, 2)
    source = source_db.SyncSource(table, "public", table, "id", "integer", "body")

    async def run(step: Callable[[psycopg.AsyncConnection[Any]], Awaitable[Any]]) -> Any:
        async with await psycopg.AsyncConnection.connect(url) as conn, conn.transaction():
            return await step(conn)

    async def as_before(conn: psycopg.AsyncConnection[Any]) -> None:
        await source_db.install(conn, source)
        await conn.execute(f"DROP TRIGGER {source.truncate_trigger_name} ON {table}")
        await conn.execute("DROP TABLE embedpool_sync.truncations")

    def truncate_triggers() -> int:
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_trigger WHERE tgrelid = %s::regclass AND tgname = %s",
                (table, source.truncate_trigger_name),
            ).fetchone()
        assert row is not None
        return int(row[0])

    anyio.run(run, as_before)
    assert truncate_triggers() == 0
    assert anyio.run(run, functools.partial(source_db.upgrade, source=source)) is True
    assert truncate_triggers() == 1
    assert anyio.run(run, functools.partial(source_db.upgrade, source=source)) is False
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {table}")
        marked = conn.execute("SELECT count(*) FROM embedpool_sync.truncations WHERE sync = %s", (table,)).fetchone()
    assert marked == (1,)
    anyio.run(run, functools.partial(source_db.uninstall, source=source))
    assert truncate_triggers() == 0


def test_pause_queues_changes_and_resume_works_them(sync_server: Running, client: Client) -> None:
    url = sync_server.database_url
    name = table = _name()
    make_articles(url, table, 5)
    client.create_sync(name, source=table, id_column="id", text="title || ' ' || body", collection=name)
    wait_until(lambda: len(collection_rows(url, name)) == 5, what="the backfill")
    assert client.pause_sync(name).paused
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"UPDATE {table} SET body = 'while paused' WHERE id <= 3")
    status = client.get_sync(name)
    assert status.paused and status.backlog_rows == 3 and status.pending_changes == 3
    assert not client.resume_sync(name).paused
    wait_until(
        lambda: (
            client.get_sync(name).backlog_rows == 0
            and collection_rows(url, name) == {k: (v[0], {}) for k, v in expected(url, table).items()}
        ),
        what="the changes made while paused",
    )


def test_drop_removes_the_trigger_and_queue_and_keeps_the_collection(sync_server: Running, client: Client) -> None:
    url = sync_server.database_url
    name = table = _name()
    make_articles(url, table, 3)
    client.create_sync(name, source=table, id_column="id", text="body", collection=name)
    wait_until(lambda: len(collection_rows(url, name)) == 3, what="the backfill")
    client.drop_sync(name)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"INSERT INTO {table} VALUES (99, 't', 'after the drop', 'odd')")
        triggers = conn.execute(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = %s::regclass AND NOT tgisinternal", (table,)
        ).fetchone()
        queued = conn.execute("SELECT count(*) FROM embedpool_sync.changes WHERE sync = %s", (name,)).fetchone()
    assert triggers == (0,) and queued == (0,)
    assert len(collection_rows(url, name)) == 3
    with pytest.raises(NotFound):
        client.get_sync(name)
    with pytest.raises(NotFound):
        client.drop_sync(name)


def test_a_poison_row_is_dead_lettered_and_retried_once_changed(sync_server: Running, client: Client) -> None:
    url = sync_server.database_url
    name = table = _name()
    make_articles(url, table, 12)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"UPDATE {table} SET body = %s WHERE id = 6", (f"a {POISON} crashes the engine",))
    client.create_sync(name, source=table, id_column="id", text="title || ' ' || body", collection=name)
    wait_until(lambda: client.get_sync(name).dead_rows == 1, what="the poison row dead-lettered")
    status = client.get_sync(name)
    assert status.last_error_row == "6" and "inference failed" in status.last_error
    assert status.backlog_rows == 0
    assert set(collection_rows(url, name)) == {str(i) for i in range(1, 13)} - {"6"}

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"UPDATE {table} SET body = 'fixed' WHERE id = 6")
    wait_until(lambda: collection_rows(url, name).get("6", ("",))[0] == "title 6 fixed", what="the fixed row")
    wait_until(lambda: client.get_sync(name).dead_rows == 0, what="the dead letter cleared")


def test_a_null_text_is_a_row_error(sync_server: Running, client: Client) -> None:
    url = sync_server.database_url
    name = table = _name()
    make_articles(url, table, 4)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"UPDATE {table} SET body = NULL WHERE id = 2")
    client.create_sync(name, source=table, id_column="id", text="title || ' ' || body", collection=name)
    wait_until(lambda: client.get_sync(name).dead_rows == 1, what="the NULL row dead-lettered")
    assert "NULL" in client.get_sync(name).last_error
    assert set(collection_rows(url, name)) == {"1", "3", "4"}


def test_bad_requests_get_precise_errors(sync_server: Running, client: Client) -> None:
    url = sync_server.database_url
    table = _name()
    make_articles(url, table, 1)
    good: dict[str, Any] = {"source": table, "id_column": "id", "text": "body", "collection": "c_ok"}
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"source": "no_such_table"}, InvalidArgument, "no table"),
        ({"id_column": "nope"}, InvalidArgument, "column 'nope'"),
        ({"text": "bdy || title"}, InvalidArgument, '"bdy" does not exist'),
        ({"text": "body; DROP TABLE x"}, InvalidArgument, "one SQL expression"),
        ({"where": "tag +"}, InvalidArgument, "syntax error"),
        ({"metadata_columns": ["ghost"]}, InvalidArgument, '"ghost" does not exist'),
        ({"collection": "bad name!"}, InvalidArgument, "collection"),
        ({"database": "elsewhere"}, NotFound, "no source database"),
    ]
    for change, error, words in cases:
        with pytest.raises(error) as caught:
            client.create_sync(_name(), **{**good, **change})
        assert words in str(caught.value), (change, caught.value)
        assert "postgresql://" not in str(caught.value)
    with pytest.raises(InvalidArgument, match="sync name"):
        client.create_sync("Bad-Name", **good)
    name = _name()
    first = client.create_sync(name, **good)
    again = client.create_sync(name, **good)  # a retried create (its first answer lost) is the same sync
    assert (first.backfilled_rows, again.backfilled_rows, again.name) == (1, 0, name)
    with pytest.raises(AlreadyExists, match="another definition"):
        client.create_sync(name, **{**good, "text": "title"})
    with pytest.raises(NotFound):
        client.pause_sync(_name())


def test_the_http_door_manages_syncs(sync_server: Running) -> None:
    url = sync_server.database_url
    name = table = _name()
    make_articles(url, table, 4)
    body = {"name": name, "source": table, "id_column": "id", "text": "body", "collection": name}
    with httpx.Client(base_url=f"http://127.0.0.1:{sync_server.http_port}/v1", timeout=30) as http:
        created = http.post("/syncs", json=body)
        assert created.status_code == 200 and created.json()["backfilled_rows"] == 4, created.text
        assert http.post("/syncs", json=body).status_code == 200  # the same definition again: the same sync
        assert http.post("/syncs", json={**body, "text": "title"}).status_code == 409
        wait_until(lambda: http.get(f"/syncs/{name}").json()["backlog_rows"] == 0, what="the backfill")
        assert len(collection_rows(url, name)) == 4
        assert http.post(f"/syncs/{name}/pause").json()["paused"] is True
        assert http.post(f"/syncs/{name}/resume").json()["paused"] is False
        assert name in [s["name"] for s in http.get("/syncs").json()["data"]]
        assert http.delete(f"/syncs/{name}").json() == {"object": "sync.deleted", "name": name, "deleted": True}
        missing = http.get(f"/syncs/{name}")
        assert missing.status_code == 404 and "no sync" in missing.json()["error"]["message"]
        bad = http.post("/syncs", json={**body, "name": _name(), "text": "nope()"})
        assert bad.status_code == 400 and "nope" in bad.json()["error"]["message"]
        unknown_field = http.post("/syncs", json={**body, "name": _name(), "extra": 1})
        assert unknown_field.status_code == 400
