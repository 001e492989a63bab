"""Helpers for the sync tests: a source table in a real Postgres, and the collection's rows read back."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest


def collection_rows(url: str, collection: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """id -> (text, metadata) of every document stored in `collection`."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT d.id, d.text, d.metadata FROM documents d JOIN collections c ON c.id = d.collection_id"
            " WHERE c.name = %s",
            (collection,),
        ).fetchall()
    return {doc_id: (text, metadata) for doc_id, text, metadata in rows}


def wait_until(check: Callable[[], bool], timeout: float = 60.0, what: str = "") -> None:
    """Polls `check` until it holds; fails naming `what` after `timeout` seconds."""
    ends = time.monotonic() + timeout
    while not check():
        if time.monotonic() > ends:
            pytest.fail(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.1)


def make_articles(url: str, table: str, n: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, title text, body text, tag text)")
        conn.execute(
            f"INSERT INTO {table} SELECT i, 'title ' || i, 'body of article ' || i, CASE WHEN i %% 2 = 0 THEN 'even'"
            " ELSE 'odd' END FROM generate_series(1, %s) i",
            (n,),
        )


def expected(url: str, table: str, where: str = "true") -> dict[str, tuple[str, dict[str, Any]]]:
    """What the collection should hold: the text and metadata of each row of `table` matching `where`."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(f"SELECT id::text, title || ' ' || body, tag FROM {table} WHERE {where}").fetchall()
    return {doc_id: (text, {"tag": tag}) for doc_id, text, tag in rows}
