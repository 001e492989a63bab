"""Root fixtures: hypothesis profiles (HYPOTHESIS_PROFILE=ci|dev|thorough), the golden data, the real model, and
a real embedpool server on 127.0.0.1 (own event loop thread) with its embedded Postgres."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import grpc
import numpy as np
import pytest
from anyio.from_thread import start_blocking_portal
from hypothesis import HealthCheck, settings
from numpy.typing import NDArray

from embedpool.config import Settings
from embedpool.engine import Engine
from embedpool.pool import InferenceSession
from embedpool.security import keyring
from embedpool.server.app import Running, serve
from embedpool.store import Store
from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc

DATA = Path(__file__).resolve().parent / "data"

settings.register_profile("ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def golden() -> tuple[list[str], NDArray[np.float32]]:
    meta = json.loads((DATA / "minilm_golden.json").read_text())
    return meta["texts"], np.load(DATA / "minilm_golden.npy")


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The converted default model, from the user's cache (`make model` fills it; converted here otherwise)."""
    from embedpool.engine import prepare

    return prepare(Settings()).root


SettingsFactory = Callable[..., Settings]


@pytest.fixture(scope="session")
def make_settings(model_dir: Path) -> SettingsFactory:
    """Settings for a test server: free ports, the given data dir, fp32 so golden comparisons are exact."""

    def make(tmp: Path, **overrides: Any) -> Settings:
        return dataclasses.replace(_base_settings(tmp, model_dir), **overrides)

    return make


def _base_settings(tmp: Path, model_dir: Path) -> Settings:
    return Settings(
        port=0,
        metrics_port=0,
        http_port=0,
        data_dir=tmp,
        model=str(model_dir),
        variant="fp32",  # the golden comparisons need the full-precision graph
        max_concurrent_inputs=1024,
        grace_seconds=2.0,
        log_level="warning",
    )


@contextlib.contextmanager
def serving(settings: Settings, engine: Engine | None = None) -> Iterator[Running]:
    """A real server on its own event loop thread for the block (tests import this from conftest)."""
    with start_blocking_portal(backend="asyncio") as portal:
        future, running = portal.start_task(functools.partial(serve, engine=engine), settings)
        try:
            yield running
        finally:
            future.cancel()


def create_key(database_url: str, tenant: str, role: str, **options: Any) -> str:
    """A new API key, written straight into the key table at `database_url`, as `embedpool keys create` does
    (tests import this from conftest)."""

    async def create() -> str:
        store = await Store.open(database_url, max_size=1)
        try:
            key, _ = await keyring.create_key(store, tenant=tenant, role=role, **options)
            return key
        finally:
            await store.close()

    return anyio.run(create)


def ingest_batches(
    collection: str, n_batches: int, size: int, *, start: int = 0, prefix: str = "d"
) -> Iterator[pb.IngestRequest]:
    """Ingest batches start..n_batches-1 of `size` documents with ids `{prefix}{batch}-{i}`; the first one names
    the collection (tests import this from conftest)."""
    for b in range(start, n_batches):
        documents = [
            pb.Document(id=f"{prefix}{b}-{i}", text=f"batch {b} document {i} about subject {i % 7}")
            for i in range(size)
        ]
        yield pb.IngestRequest(collection=collection if b == start else "", batch_id=b, documents=documents)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, make_settings: SettingsFactory) -> Iterator[Running]:
    with serving(make_settings(tmp_path_factory.mktemp("server"))) as running:
        yield running


@pytest.fixture(scope="session")
def channel(server: Running) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


@pytest.fixture(scope="session")
def stub(channel: grpc.Channel) -> pb_grpc.EmbedderStub:
    return pb_grpc.EmbedderStub(channel)


class PoisonedSession:
    """A real session that fails any batch containing the token id `poison`: an injected engine fault."""

    def __init__(self, inner: InferenceSession, poison: int) -> None:
        self.inner = inner
        self.poison = poison
        self.failures = 0

    def embed(self, input_ids: NDArray[np.int64], attention_mask: NDArray[np.int64]) -> NDArray[np.float32]:
        if (input_ids == self.poison).any():
            self.failures += 1
            raise RuntimeError("injected engine fault")
        return self.inner.embed(input_ids, attention_mask)


@pytest.fixture(scope="session")
def poisoned_session() -> type[PoisonedSession]:
    """The fault-injecting session wrapper (a fixture, since test modules cannot import conftest)."""
    return PoisonedSession
