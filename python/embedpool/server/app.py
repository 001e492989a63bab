"""Assembles and runs the server: model, pool, store, gRPC (with health and reflection) and /metrics."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import anyio
import anyio.to_thread
import grpc.aio
import prometheus_client
from anyio.abc import TaskStatus
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from embedpool.config import Settings
from embedpool.engine import Engine, load_engine
from embedpool.pool import PoolConfig, running_pool
from embedpool.pool.scheduler import BatchLimits
from embedpool.server import validation
from embedpool.server.decoding import add_embedder
from embedpool.server.servicer import EmbedderServicer
from embedpool.store import Store
from embedpool.store.embedded import EmbeddedPostgres
from embedpool.v1 import embedpool_pb2

log = logging.getLogger("embedpool.server")

SERVICE_NAME = embedpool_pb2.DESCRIPTOR.services_by_name["Embedder"].full_name


@dataclass(frozen=True)
class Running:
    """What `serve` reports once ready (tests read the bound ports from it)."""

    port: int
    metrics_port: int
    database_url: str
    settings: Settings


@asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[tuple[Store, str]]:
    """The configured Postgres, or the embedded one under the data dir, started for this process."""
    embedded: EmbeddedPostgres | None = None
    url = settings.database_url
    if not url:
        embedded = EmbeddedPostgres(settings.data_dir / "pg")
        url = await anyio.to_thread.run_sync(embedded.start)
    try:
        store = await Store.open(url)
        try:
            yield store, url
        finally:
            with anyio.CancelScope(shield=True):
                await store.close()
    finally:
        if embedded is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(embedded.stop)


def _metrics_server(settings: Settings, stack: AsyncExitStack) -> int:
    if settings.metrics_port < 0:
        return -1
    http, thread = prometheus_client.start_http_server(settings.metrics_port, addr=settings.host)

    def stop() -> None:
        http.shutdown()
        http.server_close()
        thread.join(timeout=5)

    stack.callback(stop)
    return int(http.server_port)


def _pool_config(settings: Settings, engine: Engine) -> PoolConfig:
    return PoolConfig(
        dim=engine.model.dim,
        limits=BatchLimits(
            max_tokens=settings.max_batch_tokens,
            max_size=settings.max_batch_size,
            pad_multiple=engine.pad_multiple,
            pad_id=engine.tokenizer.pad_id,
        ),
        max_concurrent_inputs=settings.max_concurrent_inputs,
        tokenizer_threads=settings.tokenizer_threads,
    )


async def serve(
    settings: Settings,
    stop: anyio.Event | None = None,
    *,
    engine: Engine | None = None,
    task_status: TaskStatus[Running] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serves until `stop` is set, then drains: health goes NOT_SERVING, in-flight RPCs get `grace_seconds`,
    and only then do the pool and the store shut down. Cancelling instead aborts without draining, because
    cancellation reaches the pool's tasks too. `engine` may be passed in already loaded (e.g. wrapped for
    fault injection); by default it is loaded from `settings`.
    """
    if engine is None:
        engine = await anyio.to_thread.run_sync(load_engine, settings)
    settings = engine.settings
    async with AsyncExitStack() as stack:
        store, url = await stack.enter_async_context(open_store(settings))
        await stack.enter_async_context(store.watching())  # collection rows cached, kept right by LISTEN
        pool = await stack.enter_async_context(
            running_pool(engine.tokenizer, engine.sessions, _pool_config(settings, engine))
        )
        metrics_port = _metrics_server(settings, stack)
        server = grpc.aio.server(
            options=[
                # The transport limit sits above the validated one, so an oversized request gets a precise
                # INVALID_ARGUMENT from validation instead of the transport's RESOURCE_EXHAUSTED.
                ("grpc.max_receive_message_length", 2 * settings.max_request_bytes + (1 << 20)),
                ("grpc.max_send_message_length", 256 * 1024 * 1024),
                ("grpc.so_reuseport", 0),
            ]
        )
        limits = validation.Limits(
            settings.max_request_documents,
            settings.max_request_bytes,
            settings.max_search_k,
            settings.ingest_window,
            settings.ingest_stores,
        )
        add_embedder(EmbedderServicer(pool, store, engine.model, limits), server)
        health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        reflection.enable_server_reflection((SERVICE_NAME, reflection.SERVICE_NAME, "grpc.health.v1.Health"), server)
        port = server.add_insecure_port(f"{settings.host}:{settings.port}")
        await server.start()
        for name in ("", SERVICE_NAME):
            await health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving %s/%s on %s:%d (pid %d)",
            engine.model.name,
            engine.model.variant,
            settings.host,
            port,
            os.getpid(),
            extra={"port": port, "metrics_port": metrics_port},
        )
        task_status.started(Running(port=port, metrics_port=metrics_port, database_url=url, settings=settings))
        try:
            await (stop.wait() if stop is not None else anyio.sleep_forever())
        finally:
            with anyio.CancelScope(shield=True):
                log.info("draining: %d documents in flight", pool.permits_in_use)
                await health.enter_graceful_shutdown()
                await server.stop(settings.grace_seconds)
