"""A server with API keys for the client's tests, shared by the package, and a way to make keys on it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest

from embedpool.security import keyring
from embedpool.server.app import Running
from embedpool.store import Store

from ..conftest import SettingsFactory, serving

KeyFactory = Callable[..., str]


@pytest.fixture(scope="package")
def keyed(tmp_path_factory: pytest.TempPathFactory, make_settings: SettingsFactory) -> Iterator[Running]:
    with serving(make_settings(tmp_path_factory.mktemp("keyed"), auth="keys")) as running:
        yield running


@pytest.fixture(scope="package")
def make_key(keyed: Running) -> KeyFactory:
    """`make_key(role="reader", **rates)`: a new key of tenant acme on the keyed server."""

    def make(role: str = "reader", **options: Any) -> str:
        async def create() -> str:
            store = await Store.open(keyed.database_url, max_size=1)
            try:
                key, _ = await keyring.create_key(store, tenant="acme", role=role, **options)
                return key
            finally:
                await store.close()

        return anyio.run(create)

    return make
