"""A server with API keys for the client's tests, shared by the package, and a way to make keys on it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from embedpool.server.app import Running

from ..conftest import SettingsFactory, create_key, serving

KeyFactory = Callable[..., str]


@pytest.fixture(scope="package")
def keyed(tmp_path_factory: pytest.TempPathFactory, make_settings: SettingsFactory) -> Iterator[Running]:
    with serving(make_settings(tmp_path_factory.mktemp("keyed"), auth="keys")) as running:
        yield running


@pytest.fixture(scope="package")
def make_key(keyed: Running) -> KeyFactory:
    """`make_key(role="reader", **rates)`: a new key of tenant acme on the keyed server."""

    def make(role: str = "reader", **options: Any) -> str:
        return create_key(keyed.database_url, "acme", role, **options)

    return make
