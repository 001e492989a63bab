"""A listener off loopback needs --insecure, said explicitly, and is warned about; /metrics binds on its own."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pytest

from embedpool import config
from embedpool.config import Settings
from embedpool.errors import StartupError
from embedpool.server.exposure import check_exposure, is_loopback


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.9.9.9", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
        ("db.example", False),
    ],
)
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_loopback_serves_as_before() -> None:
    check_exposure(Settings())  # the defaults: gRPC and /metrics on 127.0.0.1


@pytest.mark.parametrize(
    ("changes", "named"),
    [({"host": "0.0.0.0"}, "gRPC on 0.0.0.0"), ({"metrics_host": "0.0.0.0"}, "/metrics on 0.0.0.0")],
)
def test_an_exposed_listener_needs_insecure_and_is_warned_about(
    changes: dict[str, Any], named: str, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(StartupError, match=f"refusing to serve {named}"):
        check_exposure(dataclasses.replace(Settings(), **changes))
    with caplog.at_level(logging.WARNING, logger="embedpool.server"):
        check_exposure(dataclasses.replace(Settings(), insecure=True, **changes))
    assert any("INSECURE" in r.getMessage() and named in r.getMessage() for r in caplog.records)


def test_gRPC_exposed_leaves_metrics_on_loopback_by_default() -> None:
    settings = config.load(None, {"EMBEDPOOL_HOST": "0.0.0.0", "EMBEDPOOL_INSECURE": "1"})
    assert (settings.host, settings.metrics_host, settings.insecure) == ("0.0.0.0", "127.0.0.1", True)


def test_insecure_is_a_flag() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    assert config.load(parser.parse_args(["--insecure"]), {}).insecure is True
    assert config.load(parser.parse_args([]), {}).insecure is False


def test_tls_protects_every_listener_and_keys_protect_grpc(caplog: pytest.LogCaptureFixture) -> None:
    exposed = dataclasses.replace(Settings(), host="0.0.0.0", metrics_host="0.0.0.0")
    check_exposure(dataclasses.replace(exposed, tls_cert="c.pem", tls_key="k.pem"))
    with pytest.raises(StartupError, match=r"refusing to serve /metrics on 0\.0\.0\.0"):  # /metrics has no keys
        check_exposure(dataclasses.replace(exposed, auth="keys"))
    with caplog.at_level(logging.WARNING, logger="embedpool.server"):
        check_exposure(dataclasses.replace(Settings(), host="0.0.0.0", auth="keys"))
    assert any("cross the network in plaintext" in r.getMessage() for r in caplog.records)
