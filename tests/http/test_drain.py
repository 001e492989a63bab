"""Stopping with HTTP requests in flight: a stop lets them finish within the grace period; a second signal (the
`abort` event) cuts them short at once, as it does gRPC calls."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import grpc
import httpx
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedpool.server.app import Running, serve

from ..conftest import SettingsFactory

MODEL = "all-MiniLM-L6-v2"
# Enough work to be in flight for seconds on two cores (about 9 s on a slow AVX2 host), well under the limits.
SLOW = {"input": [f"a long passage about draining servers, number {i}. " * 24 for i in range(96)], "model": MODEL}


@dataclass
class Served:
    portal: BlockingPortal
    running: Running
    stop: anyio.Event
    abort: anyio.Event


@pytest.fixture
def served(tmp_path: Path, make_settings: SettingsFactory) -> Iterator[Served]:
    settings = make_settings(tmp_path, grace_seconds=60.0)
    with start_blocking_portal(backend="asyncio") as portal:
        stop, abort = portal.call(anyio.Event), portal.call(anyio.Event)
        future, running = portal.start_task(functools.partial(serve, stop=stop, abort=abort), settings)
        try:
            yield Served(portal, running, stop, abort)
        finally:
            portal.call(stop.set)
            portal.call(abort.set)
            future.result(timeout=60)


def _in_flight(port: int, results: list[object]) -> threading.Thread:
    def call() -> None:
        try:
            results.append(httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json=SLOW, timeout=120).status_code)
        except httpx.HTTPError as e:
            results.append(e)

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(1.0)  # the request is being embedded
    return thread


def test_a_stop_lets_the_request_in_flight_finish(served: Served) -> None:
    results: list[object] = []
    thread = _in_flight(served.running.http_port, results)
    served.portal.call(served.stop.set)
    thread.join(120)
    assert results == [200]


def test_a_second_signal_cuts_the_request_in_flight_short(served: Served) -> None:
    results: list[object] = []
    thread = _in_flight(served.running.http_port, results)
    served.portal.call(served.stop.set)
    time.sleep(0.3)
    cut = time.monotonic()
    served.portal.call(served.abort.set)
    thread.join(120)
    assert time.monotonic() - cut < 10, "the abort waited for the grace period (60 s)"
    assert results and results[0] != 200, results


def test_a_drain_delay_reports_not_ready_while_it_still_serves(tmp_path: Path, make_settings: SettingsFactory) -> None:
    """For `drain_delay` after the stop, /ready and gRPC health say not ready (balancers take the replica out)
    while new calls are still served; then the server drains and ends."""
    settings = make_settings(tmp_path, drain_delay=4.0)
    with start_blocking_portal(backend="asyncio") as portal:
        stop = portal.call(anyio.Event)
        future, running = portal.start_task(functools.partial(serve, stop=stop), settings)
        base = f"http://127.0.0.1:{running.http_port}"
        assert httpx.get(f"{base}/ready", timeout=10).status_code == 200
        stopped_at = time.monotonic()
        portal.call(stop.set)
        time.sleep(0.3)
        ready = httpx.get(f"{base}/ready", timeout=10)
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        reply = httpx.post(f"{base}/v1/embeddings", json={"input": ["still served"], "model": MODEL}, timeout=30)
        assert time.monotonic() - stopped_at < settings.drain_delay, "the checks ran too late to mean anything"
        future.result(timeout=60)
    assert ready.status_code == 503 and ready.json()["checks"]["accepting"] is False
    assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert reply.status_code == 200 and len(reply.json()["data"]) == 1
