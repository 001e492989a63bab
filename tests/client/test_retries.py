"""Retries: UNAVAILABLE and RESOURCE_EXHAUSTED are tried again with backoff, after the server's RetryInfo delay,
and never past the caller's deadline."""

from __future__ import annotations

import logging
import socket
import time

import pytest
from prometheus_client import REGISTRY

from embedpool.client import Client, Limits, RetryPolicy
from embedpool.errors import Overloaded, Unavailable
from embedpool.server.app import Running

from .conftest import KeyFactory

SLACK_S = 0.5


def _refusals() -> float:
    """Calls the in-process servers refused for a key's rate (they share this process's metrics)."""
    return REGISTRY.get_sample_value("embedpool_quota_refusals_total") or 0.0


def _nothing_listens() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _retries(caplog: pytest.LogCaptureFixture) -> int:
    return sum("retrying" in r.getMessage() for r in caplog.records if r.name == "embedpool.client")


def test_an_unreachable_target_is_retried_until_the_deadline_and_no_longer(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="embedpool.client")
    policy = RetryPolicy(max_attempts=1000, initial_backoff=0.05, max_backoff=0.4)
    # Limits given: no GetModelInfo first, the Embed call itself is what is retried.
    with Client(_nothing_listens(), timeout=1.5, retry=policy, limits=Limits()) as client:
        started = time.monotonic()
        with pytest.raises(Unavailable, match="past the deadline"):
            client.embed(["hello"])
        elapsed = time.monotonic() - started
    assert elapsed < 1.5 + SLACK_S
    assert _retries(caplog) >= 3


def test_a_call_timeout_replaces_the_clients(caplog: pytest.LogCaptureFixture) -> None:
    with Client(_nothing_listens(), timeout=60, limits=Limits()) as client:
        started = time.monotonic()
        with pytest.raises(Unavailable):
            client.embed(["hello"], timeout=0.5)
        assert time.monotonic() - started < 0.5 + SLACK_S


def test_a_rate_limited_call_waits_as_the_server_says_then_succeeds(keyed: Running, make_key: KeyFactory) -> None:
    # A bucket of 4 documents refilled at 4 a second: the second call of 4 must wait a second.
    with Client(f"127.0.0.1:{keyed.port}", api_key=make_key(docs_per_s=4), timeout=10) as client:
        client.model_info()
        client.embed([f"first {i}" for i in range(4)])
        before, started = _refusals(), time.monotonic()
        assert client.embed([f"second {i}" for i in range(4)]).shape == (4, 384)
        elapsed = time.monotonic() - started
    # RetryInfo honoured: one refusal, then a wait of about its delay (backoff alone would come back sooner
    # and be refused again).
    assert 1 <= _refusals() - before <= 2
    assert 0.8 < elapsed < 3.0


def test_a_retry_delay_past_the_deadline_is_not_slept(keyed: Running, make_key: KeyFactory) -> None:
    # Half a document a second: after one document the next waits 2 s, more than the 1.5 s the call has.
    with Client(f"127.0.0.1:{keyed.port}", api_key=make_key(docs_per_s=0.5), timeout=1.5) as client:
        client.model_info()
        client.embed(["spends the bucket"])
        before, started = _refusals(), time.monotonic()
        with pytest.raises(Overloaded) as refused:
            client.embed(["must wait"])
        elapsed = time.monotonic() - started
    assert elapsed < SLACK_S  # raised at once, not after sleeping towards a certain timeout
    assert refused.value.retry_after is not None and 1.5 < refused.value.retry_after <= 2.0
    assert _refusals() - before == 1
