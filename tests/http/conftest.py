"""The HTTP door's fixtures: two real servers shared by every test in tests/http (starting one costs seconds).

`open_server` takes calls without keys; `keyed_server` runs with `--auth keys`. Both declare a Matryoshka size
(128) and small request limits, so the limit tests need no large bodies."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest

from embedpool.server.app import Running
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc

from ..conftest import SettingsFactory, create_key, serving

MODEL = "all-MiniLM-L6-v2"
MAX_DOCUMENTS = 16
MAX_BYTES = 64 * 1024
MATRYOSHKA = 128
ERROR_FIELDS = {"message", "type", "param", "code"}


def _limits() -> dict[str, Any]:
    return {
        "matryoshka_dims": (MATRYOSHKA,),
        "max_request_documents": MAX_DOCUMENTS,
        "max_request_bytes": MAX_BYTES,
    }


@pytest.fixture(scope="package")
def open_server(tmp_path_factory: pytest.TempPathFactory, make_settings: SettingsFactory) -> Iterator[Running]:
    with serving(make_settings(tmp_path_factory.mktemp("http-open"), **_limits())) as running:
        yield running


@pytest.fixture(scope="package")
def keyed_server(tmp_path_factory: pytest.TempPathFactory, make_settings: SettingsFactory) -> Iterator[Running]:
    with serving(make_settings(tmp_path_factory.mktemp("http-keyed"), auth="keys", **_limits())) as running:
        yield running


@pytest.fixture(scope="package")
def http(open_server: Running) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url(open_server), timeout=60) as client:
        yield client


@pytest.fixture(scope="package")
def keyed_http(keyed_server: Running) -> Iterator[httpx.Client]:
    """No key of its own: each call passes `headers=bearer(key)`."""
    with httpx.Client(base_url=base_url(keyed_server), timeout=60) as client:
        yield client


@pytest.fixture(scope="package")
def open_stub(open_server: Running) -> Iterator[pb_grpc.EmbedderStub]:
    with grpc.insecure_channel(f"127.0.0.1:{open_server.port}") as channel:
        yield pb_grpc.EmbedderStub(channel)


@pytest.fixture(scope="package")
def keyed_stub(keyed_server: Running) -> Iterator[pb_grpc.EmbedderStub]:
    with grpc.insecure_channel(f"127.0.0.1:{keyed_server.port}") as channel:
        yield pb_grpc.EmbedderStub(channel)


def base_url(running: Running) -> str:
    return f"http://127.0.0.1:{running.http_port}"


def make_key(running: Running, tenant: str, role: str, **options: Any) -> str:
    """A new key, written straight into the server's key table (as `embedpool keys create` does)."""
    return create_key(running.database_url, tenant, role, **options)


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def grpc_bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def assert_error(response: httpx.Response, status: int) -> dict[str, Any]:
    """The response is `status` with OpenAI's error shape; returns the error object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == ERROR_FIELDS, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert error["param"] is None or isinstance(error["param"], str)
    assert error["code"] is None or isinstance(error["code"], str)
    return error  # type: ignore[no-any-return]
