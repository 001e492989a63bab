"""Assembles and runs the server: model, pool, store, gRPC (with health and reflection) and /metrics."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any, NoReturn

import anyio
import anyio.to_thread
import grpc.aio
import psycopg
from anyio.abc import ObjectReceiveStream, TaskStatus
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from embedpool import metrics
from embedpool.config import Settings
from embedpool.engine import Engine, load_engines
from embedpool.errors import StartupError, Unavailable, one_line
from embedpool.http.app import create_app
from embedpool.http.server import HttpServer
from embedpool.http.server import bind as bind_http
from embedpool.pool import EmbeddingPool, running_pool
from embedpool.security.audit import Auditor
from embedpool.security.authenticator import Authenticator
from embedpool.security.quota import Quotas
from embedpool.security.usage import UsageBook
from embedpool.server.auth import Guard
from embedpool.server.decoding import add_embedder
from embedpool.server.exposure import check_exposure
from embedpool.server.heap import Trimmer, limit_heap_growth
from embedpool.server.metrics_http import MetricsServer
from embedpool.server.servicer import EmbedderServicer
from embedpool.server.tls import ServerTls, server_tls
from embedpool.service import EmbeddingService, Limits
from embedpool.service.gate import Gate
from embedpool.service.models import Models
from embedpool.service.sync_worker import SyncWorkerConfig, SyncWorkers
from embedpool.service.syncs import Syncs
from embedpool.store import Store
from embedpool.store.embedded import EmbeddedPostgres
from embedpool.store.sources import SourceDatabases, parse_databases
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
    http_port: int = -1


@dataclass
class _Readiness:
    """What HTTP /ready reports (gRPC health says the same as one status): kept by `_supervise`."""

    database: bool = True
    inference: bool = True
    draining: bool = False

    def checks(self) -> dict[str, bool]:
        return {"model": self.inference, "database": self.database, "accepting": not self.draining}

    def publish(self) -> None:
        """Sets the `embedpool_ready` gauge from the checks (call after changing them)."""
        metrics.READY.set(1 if all(self.checks().values()) else 0)


# The database probe behind gRPC health: one kept-open connection, one round trip a second.
_PROBE_INTERVAL_S = 1.0
_PROBE_TIMEOUT_S = 3.0
# Restarts of a dead embedded Postgres: right after a crash its old backends may still hold the shared memory,
# and a restart fails until they have noticed and exited; so retry, with doubling delays up to the cap.
_RESTART_DELAY_S = 0.5
_RESTART_DELAY_CAP_S = 30.0


@asynccontextmanager
async def open_store(settings: Settings, embedded: EmbeddedPostgres | None = None) -> AsyncIterator[tuple[Store, str]]:
    """The configured Postgres, or the embedded one under the data dir (`embedded`, when the caller claimed it
    already), started for this process and stopped again at the end."""
    url = settings.database_url
    embedded = None if url else (embedded or EmbeddedPostgres(settings.data_dir / "pg"))
    try:
        if embedded is not None:
            url = await anyio.to_thread.run_sync(embedded.start)
        try:
            store = await Store.open(
                url,
                max_size=settings.db_pool_size,
                statement_timeout=settings.db_statement_timeout,
                lock_timeout=settings.db_lock_timeout,
            )
        except Unavailable as e:  # its own message is the caller's short one; the operator wants the cause
            raise StartupError(f"cannot reach the database at {_redacted(url)}: {one_line(e.__cause__ or e)}") from e
        except psycopg.Error as e:  # e.g. no right to create the extension or the tables
            raise StartupError(f"cannot set up the database at {_redacted(url)}: {one_line(e)}") from e
        try:
            yield store, url
        finally:
            with anyio.CancelScope(shield=True):
                await store.close()
    finally:
        if embedded is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(embedded.close)


async def _require_pgvector(url: str) -> None:
    """An external database must offer pgvector; without it the first migration fails with a bare SQL error."""
    try:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=10) as conn:
            cursor = await conn.execute(
                "SELECT 1 FROM pg_available_extensions WHERE name = 'vector'"
                " UNION ALL SELECT 1 FROM pg_extension WHERE extname = 'vector'"
            )
            found = await cursor.fetchone() is not None
    except psycopg.Error as e:
        raise StartupError(f"cannot reach the database at {_redacted(url)}: {one_line(e)}") from e
    if not found:
        raise StartupError(
            f"the database at {_redacted(url)} has no pgvector extension: install pgvector on that Postgres server"
        )


def _redacted(url: str) -> str:
    params = psycopg.conninfo.conninfo_to_dict(url)
    params.pop("password", None)
    return psycopg.conninfo.make_conninfo("", **params)


class _Probe:
    """Whether the database answers, on one connection kept open (a connection per probe forks a backend)."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def ok(self) -> bool:
        try:
            with anyio.fail_after(_PROBE_TIMEOUT_S):
                if self._conn is None:
                    self._conn = await psycopg.AsyncConnection.connect(
                        self._url, autocommit=True, connect_timeout=int(_PROBE_TIMEOUT_S)
                    )
                await self._conn.execute("SELECT 1")
        except (psycopg.Error, OSError, TimeoutError):
            await self.close()
            return False
        return True

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with anyio.CancelScope(shield=True), contextlib.suppress(psycopg.Error, OSError):
                await conn.close()


async def _set_health(health: HealthServicer, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
    for name in ("", SERVICE_NAME):
        await health.set(name, status)


async def _supervise(
    url: str,
    embedded: EmbeddedPostgres | None,
    health: HealthServicer,
    pools: Sequence[EmbeddingPool],
    ready: _Readiness,
) -> NoReturn:
    """Health follows the database and the inference sessions: NOT_SERVING while the database does not answer
    or a model has no session in rotation (see pool.feeder), SERVING once both work again. A dead embedded Postgres is
    started again (the store's pool replaces its broken connections by itself). While nothing is in flight,
    freed heap goes back to the operating system (server.heap)."""
    probe = _Probe(url)
    trimmer = Trimmer()
    serving = True
    delay = _RESTART_DELAY_S

    async def set_serving(ok: bool, why: str) -> None:
        nonlocal serving
        if ok != serving:
            log.warning("%s: %s", why, "SERVING" if ok else "NOT_SERVING until it does")
            await _set_health(
                health, health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            serving = ok

    try:
        while True:
            if (embedded is None or embedded.running) and await probe.ok():
                delay = _RESTART_DELAY_S
                inference = all(pool.sessions_in_rotation > 0 for pool in pools)
                ready.database, ready.inference = True, inference
                ready.publish()
                if inference:
                    await set_serving(True, "database and inference work")
                else:
                    await set_serving(False, "a model has no inference session in rotation")
                await trimmer.maybe_trim(idle=all(pool.permits_in_use == 0 for pool in pools))
                await anyio.sleep(_PROBE_INTERVAL_S)
                continue
            ready.database = False
            ready.publish()
            await set_serving(False, "database does not answer")
            if embedded is None or embedded.running:
                await anyio.sleep(_PROBE_INTERVAL_S)  # an external one, or ours still starting or recovering
                continue
            try:
                await anyio.to_thread.run_sync(embedded.start)
            except Exception as e:  # whatever failed, the next attempt may succeed; the log says why
                log.warning("restarting the embedded Postgres failed (%s); next try in %.1f s", one_line(e), delay)
                await anyio.sleep(delay)
                delay = min(2 * delay, _RESTART_DELAY_CAP_S)
            else:
                log.warning("embedded Postgres in %s restarted", embedded.data_dir)
    finally:
        await probe.close()


async def _check_database(settings: Settings, stack: AsyncExitStack) -> EmbeddedPostgres | None:
    """First of all, so that a second server on the same data dir stops before it loads or binds anything, and a
    database that cannot work is named before the model loads: the embedded Postgres's directory, claimed, or
    the external database, checked for pgvector."""
    if settings.database_url:
        await _require_pgvector(settings.database_url)
        return None
    embedded = EmbeddedPostgres(settings.data_dir / "pg")
    embedded.claim()
    stack.push_async_callback(_shielded_close, embedded)  # open_store closes it too, unless never reached
    return embedded


async def _shielded_close(embedded: EmbeddedPostgres) -> None:
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(embedded.close)


def _ensure_free(host: str, port: int, what: str, reuse_port: bool = False) -> None:
    """Binds and lets go of the port, to fail with a clear message before grpc prints its own C++ log line.
    Only a port in use or not ours to take counts: grpc itself copes with, say, a host without IPv6."""
    if port <= 0:
        return
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return  # grpc reports a host it cannot resolve
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc and http.server do
            if reuse_port:  # the port's other processes (serve --workers) hold it with SO_REUSEPORT too
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                probe.bind(address)
            except OSError as e:
                if e.errno in (errno.EADDRINUSE, errno.EACCES):
                    raise StartupError(f"cannot listen on {host}:{port} for {what}: {e.strerror}") from e


def _metrics_server(settings: Settings, stack: AsyncExitStack, tls: ServerTls | None) -> int:
    if settings.metrics_port < 0:
        return -1
    try:
        http = MetricsServer(settings.metrics_host, settings.metrics_port, tls.ssl_context if tls else None)
    except OSError as e:
        raise StartupError(
            f"cannot listen on {settings.metrics_host}:{settings.metrics_port} for /metrics: {e.strerror}"
        ) from e
    stack.callback(http.close)
    log.info("/metrics on %s:%d: %s", settings.metrics_host, http.port, tls.mode if tls else "plain HTTP")
    return http.port


def _http_socket(settings: Settings, stack: AsyncExitStack) -> socket.socket | None:
    if settings.http_port < 0:
        return None
    sock = bind_http(settings.host, settings.http_port, settings.reuse_port)
    stack.callback(sock.close)
    return sock


async def serve(
    settings: Settings,
    stop: anyio.Event | None = None,
    *,
    abort: anyio.Event | None = None,
    engine: Engine | None = None,
    engines: Sequence[Engine] = (),
    reload_tls: ObjectReceiveStream[None] | None = None,
    priorities: bool = True,
    task_status: TaskStatus[Running] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serves until `stop` is set, then drains: health goes NOT_SERVING (and, for `drain_delay` seconds, new calls
    are still served, while balancers notice), in-flight RPCs get `grace_seconds`
    (cut short when `abort` is set), and only then do the pool and the store shut down. Cancelling instead
    aborts without draining, because cancellation reaches the pool's tasks too. `engine` (or `engines`, one per
    model, the default first) may be passed in already loaded (e.g. wrapped for fault injection); by default
    every --model is loaded from `settings`. With TLS, each
    item from `reload_tls` (the CLI's SIGHUP) reads the certificate files again (see server.tls). `priorities`
    off (one queue for all work, pool.priority) is only a benchmark's baseline: no setting offers it.

    Start-up checks what it can before the slow parts (the data dir's ownership, then the ports, then the model,
    then the database) and fails with a one-line `StartupError` (or another `EmbedpoolError`). While serving,
    health follows the database, and a dead embedded Postgres is restarted.
    """
    if engine is not None:
        engines = [engine]
    if engines:
        settings = _serving_settings(settings if engine is None else engine.settings, engines)
    settings = settings.validate()  # the same checks as the CLI's, for settings built in code
    check_exposure(settings)
    limit_heap_growth()  # large requests' memory goes back when freed (server.heap)
    async with AsyncExitStack() as stack:
        embedded = await _check_database(settings, stack)
        guard = Guard()  # every Embedder call passes it (server.auth); armed once the store is open
        server = grpc.aio.server(
            interceptors=[guard],
            options=[
                # The transport limit sits above the validated one, so an oversized request gets a precise
                # INVALID_ARGUMENT from validation instead of the transport's RESOURCE_EXHAUSTED.
                ("grpc.max_receive_message_length", 2 * settings.max_request_bytes + (1 << 20)),
                ("grpc.max_send_message_length", 256 * 1024 * 1024),
                ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
            ],
        )
        stack.push_async_callback(server.stop, None)  # a no-op after the drain; releases the port before it
        tls = server_tls(settings)
        port = _bind(server, settings, tls)
        metrics_port = _metrics_server(settings, stack, tls)
        http_socket = _http_socket(settings, stack)
        if not engines:
            engines = await anyio.to_thread.run_sync(_load_engines, settings)
            settings = _serving_settings(settings, engines)
        engine = engines[0]
        store, url = await stack.enter_async_context(open_store(settings, embedded))
        await stack.enter_async_context(store.running())  # collection cache (LISTEN), interrupted index builds
        authenticator = Authenticator(store, required=settings.auth == "keys")
        await stack.enter_async_context(authenticator.running())  # key cache (LISTEN): revocations reach it
        usage = UsageBook(store)
        gate = Gate(authenticator, Auditor(store), usage, Quotas())
        guard.arm(gate)
        pools = [
            await stack.enter_async_context(
                running_pool(
                    e.tokenizer,
                    e.sessions,
                    dataclasses.replace(e.pool_config(), priorities=priorities),
                    e.splitter(),
                )
            )
            for e in engines
        ]
        models = Models.of([(pool, e.model) for pool, e in zip(pools, engines, strict=True)], store)
        service = EmbeddingService(
            models, store, Limits.from_settings(settings), query_cache_bytes=settings.query_cache_bytes
        )
        sources = SourceDatabases(
            parse_databases(settings.sync_databases, url),
            max_connections=settings.sync_workers,
            timeout=settings.db_statement_timeout or 10.0,
        )
        stack.push_async_callback(sources.close)
        syncs = Syncs(service, store, sources)
        sync_workers = SyncWorkers(
            service,
            store,
            sources,
            SyncWorkerConfig(
                workers=settings.sync_workers,
                batch_size=settings.sync_batch_size,
                max_attempts=settings.sync_max_attempts,
                poll_seconds=settings.sync_poll_seconds,
            ),
        )
        servicer = EmbedderServicer(service, syncs)
        ready = _Readiness()
        http = (
            HttpServer(
                create_app(service, gate, ready.checks, syncs),
                http_socket,
                tls.ssl_context if tls else None,
                settings.grace_seconds,
            )
            if http_socket is not None
            else None
        )
        add_embedder(servicer, server)
        health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        if settings.reflection:
            reflection.enable_server_reflection(
                (SERVICE_NAME, reflection.SERVICE_NAME, "grpc.health.v1.Health"), server
            )
        await server.start()
        await _set_health(health, health_pb2.HealthCheckResponse.SERVING)
        ready.publish()
        http_port = http.port if http is not None else -1
        if http is not None:
            log.info("HTTP on %s:%d: %s", settings.host, http_port, tls.mode if tls else "plain HTTP")
        log.info(
            "serving %s on %s:%d (pid %d, auth %s)",
            ", ".join(f"{e.model.name}/{e.model.variant}" for e in engines),
            settings.host,
            port,
            os.getpid(),
            settings.auth,
            extra={"port": port, "metrics_port": metrics_port, "http_port": http_port},
        )
        task_status.started(
            Running(port=port, metrics_port=metrics_port, database_url=url, settings=settings, http_port=http_port)
        )
        syncing = anyio.CancelScope()

        async def work_syncs() -> None:
            with syncing:  # a batch cut short rolls back: its rows are worked again, by this or another server
                await sync_workers.run()

        async with anyio.create_task_group() as tg:
            tg.start_soon(_supervise, url, embedded, health, pools, ready)
            tg.start_soon(work_syncs)
            if http is not None:
                tg.start_soon(http.run)
            if tls is not None:
                tg.start_soon(tls.watch, reload_tls)
            tg.start_soon(usage.run)  # flushes once more when cancelled, while the store is still open
            try:
                await (stop.wait() if stop is not None else anyio.sleep_forever())
            finally:
                with anyio.CancelScope(shield=True):
                    log.info("draining: %d documents in flight", sum(pool.permits_in_use for pool in pools))
                    await health.enter_graceful_shutdown()
                    ready.draining = True
                    ready.publish()
                    syncing.cancel()
                    if settings.drain_delay > 0:  # still serving, reported not ready; a second signal ends it
                        log.info("not ready; serving %.1f s more before draining", settings.drain_delay)
                        with anyio.move_on_after(settings.drain_delay):
                            await (abort.wait() if abort is not None else anyio.sleep_forever())
                    service.drain()
                    async with anyio.create_task_group() as draining:
                        if http is not None:
                            draining.start_soon(http.stop, settings.grace_seconds, abort)
                        await _drain(server, settings.grace_seconds, abort)
                tg.cancel_scope.cancel()  # the supervisor, before the stack stops the store and Postgres


def _bind(server: grpc.aio.Server, settings: Settings, tls: ServerTls | None) -> int:
    _ensure_free(settings.host, settings.port, "gRPC", settings.reuse_port)
    address = f"{settings.host}:{settings.port}"
    try:
        port = (
            server.add_insecure_port(address) if tls is None else server.add_secure_port(address, tls.grpc_credentials)
        )
    except RuntimeError as e:  # taken between the check and the bind
        raise StartupError(f"cannot listen on {settings.host}:{settings.port} for gRPC: {e}") from e
    log.info("gRPC on %s:%d: %s", settings.host, port, tls.mode if tls else "plaintext")
    return port


def _serving_settings(settings: Settings, engines: Sequence[Engine]) -> Settings:
    """The first engine's settings (device-derived defaults filled in), with the server-wide budgets and models
    as configured (each engine has its share)."""
    return dataclasses.replace(
        engines[0].settings,
        model=settings.model,
        max_concurrent_inputs=settings.max_concurrent_inputs,
        max_concurrent_chars=settings.max_concurrent_chars,
        matryoshka_dims=settings.matryoshka_dims,
    )


def _load_engines(settings: Settings) -> list[Engine]:
    try:
        return load_engines(settings)
    except OSError as e:  # an unreadable model dir, or a model cache that cannot be written
        raise StartupError(f"cannot load the model: {one_line(e)}") from e


async def _drain(server: grpc.aio.Server, grace: float, abort: anyio.Event | None) -> None:
    """`server.stop(grace)`, unless `abort` is set first: then the RPCs still running are cancelled at once."""
    async with anyio.create_task_group() as tg:
        if abort is not None:

            async def on_abort() -> None:
                await abort.wait()
                log.warning("aborting the requests still in flight")
                await server.stop(None)

            tg.start_soon(on_abort)
        await server.stop(grace)
        tg.cancel_scope.cancel()
