"""The reliability campaign of bench/chaos.py, small: one real `embedpool serve` process takes hostile input,
overload and Postgres crashes, then a SIGTERM with calls in flight, and a second server on its data dir.

Only the correctness targets are asserted (no INTERNAL/UNKNOWN, the server alive, no lost or duplicated rows,
the last version wins, a clean restart); timing and memory figures are the bench's to print."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Appended, not prepended: bench/tokenize.py must not shadow the standard library's tokenize.
sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))

import chaos
from _chaos_server import ServerProcess

CAPACITY = 64  # small: the warm-up embeds 2 x CAPACITY of the longest passages, and a slow CPU takes minutes at 256
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[ServerProcess]:
    """Shared by the scenarios in file order; the shutdown one, last, stops it."""
    flags = {"max_concurrent_inputs": CAPACITY, "max_request_documents": CAPACITY, "grace_seconds": 3.0}
    with ServerProcess(tmp_path_factory.mktemp("chaos") / "data", model_dir, log_level="info", **flags) as served:
        yield served


def _assert_correct(result: chaos.Result) -> None:
    failed = result.failed("correctness")
    assert not failed, f"{result.scenario}: {failed}; figures: {result.figures}"


def test_hostile_input_to_every_rpc_never_gets_internal_or_unknown(server: ServerProcess) -> None:
    result = chaos.malformed(server, requests=150, settle_s=1.0)
    _assert_correct(result)


def test_overload_is_refused_without_crash_hang_or_internal(server: ServerProcess) -> None:
    result = chaos.overload(server, seconds=4.0, capacity=CAPACITY, processes=1)
    _assert_correct(result)
    assert result.figures["codes"].get("RESOURCE_EXHAUSTED", 0) > 0  # the load did reach the limit


def test_postgres_killed_during_ingest_loses_nothing_and_keeps_the_last_version(server: ServerProcess) -> None:
    result = chaos.db_faults(server, documents=200, kills=2, batch_size=40)
    _assert_correct(result)
    assert result.figures["ids_sent_twice"] == 20


def test_sigterm_with_calls_in_flight_then_a_clean_restart(server: ServerProcess) -> None:
    result = chaos.shutdown(server, sigterm_after=1.0, unary_clients=3, streams=2)
    _assert_correct(result)
    assert result.figures["committed_ids"] > 0
