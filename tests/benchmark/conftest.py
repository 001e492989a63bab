"""One real server for the benchmark's tests (gRPC, HTTP and /metrics on free ports), and a way to run
`embedpool bench` against it in this process and read back its JSON. The servers have no query cache: the steps
send the same texts again, and the tests compare what was sent with what the server embedded."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from embedpool.cli import main
from embedpool.server.app import Running

from ..conftest import SettingsFactory, create_key, serving

Bench = Callable[..., dict[str, Any]]


@pytest.fixture(scope="package")
def bench_server(tmp_path_factory: pytest.TempPathFactory, make_settings: SettingsFactory) -> Iterator[Running]:
    with serving(make_settings(tmp_path_factory.mktemp("bench-server"), query_cache_bytes=0)) as running:
        yield running


def grpc_target(running: Running) -> list[str]:
    return ["--target", f"127.0.0.1:{running.port}", "--metrics", metrics_url(running)]


def http_target(running: Running) -> list[str]:
    return ["--http", f"http://127.0.0.1:{running.http_port}", "--metrics", metrics_url(running)]


def metrics_url(running: Running) -> str:
    return f"http://127.0.0.1:{running.metrics_port}/metrics"


@pytest.fixture
def bench(tmp_path: Path) -> Bench:
    """`bench(*flags)`: runs `embedpool bench *flags --out DIR --no-progress` here, checks it exits 0, and returns
    the JSON it wrote."""

    def run(*flags: str) -> dict[str, Any]:
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        assert main(["bench", *flags, "--out", str(out), "--no-progress"]) == 0
        data: dict[str, Any] = json.loads((out / "bench.json").read_text())
        data["_out"] = str(out)
        return data

    return run


@pytest.fixture(scope="package")
def keyed_server(tmp_path_factory: pytest.TempPathFactory, make_settings: SettingsFactory) -> Iterator[Running]:
    with serving(make_settings(tmp_path_factory.mktemp("bench-keyed"), auth="keys", query_cache_bytes=0)) as running:
        yield running


@pytest.fixture(scope="package")
def api_key(keyed_server: Running) -> str:
    """A writer key on the keyed server, written straight into its key table (as `embedpool keys create` does)."""
    return create_key(keyed_server.database_url, "bench", "writer")
