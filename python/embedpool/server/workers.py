"""`embedpool serve --workers N`: N serving processes on the same gRPC and HTTP ports (SO_REUSEPORT), the kernel
spreading connections over them, each with its own asyncio loop, pool, ONNX Runtime sessions and database
connections. One process's Python front end (decoding, tokenization hand-off, encoding) caps what it can feed a
GPU; workers multiply it without a balancer.

This process, the supervisor, serves nothing itself. It owns what there must be one of: the embedded Postgres
(the workers get its URL), the converted model (prepared once, before the workers load it), the ports (held
with SO_REUSEPORT from start to end, so a restarted worker gets the same ones), and /metrics, merged from the
workers' files by prometheus_client's multiprocess mode. A worker that dies is started again, after a delay that
doubles while it keeps dying young. SIGTERM or SIGINT is passed on once (each worker drains); a second one cuts
the drains short. SIGHUP is passed on (TLS reload).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

from embedpool import tracing
from embedpool.config import Settings
from embedpool.errors import EmbedpoolError, StartupError, one_line
from embedpool.logs import configure
from embedpool.server.app import Running
from embedpool.server.tls import ServerTls

__all__ = ["supervise"]

log = logging.getLogger("embedpool.server")

_READY_TIMEOUT_S = 600.0  # a worker loads and warms its model; on a cold GPU that can take minutes
_RESTART_DELAY_S = 0.5
_RESTART_DELAY_CAP_S = 30.0
_YOUNG_S = 30.0  # a worker that dies sooner than this after starting doubles the next delay
_POLL_S = 0.2
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def supervise(settings: Settings) -> int:
    """Runs `settings.workers` workers until a signal, then waits for their drains; 0, or 2 after printing why
    they could not start."""
    try:
        with contextlib.ExitStack() as stack:
            return _Supervisor(settings, stack).run()
    except EmbedpoolError as e:
        print(f"embedpool: {one_line(e)}", file=sys.stderr)
        return 2


@dataclass
class _Worker:
    index: int
    process: BaseProcess
    ready: Connection
    started_at: float
    serving: bool = False


class _Supervisor:
    def __init__(self, settings: Settings, stack: contextlib.ExitStack) -> None:
        from embedpool.engine import prepare

        self.settings = settings
        self.stack = stack
        self.signals: list[int] = []
        self.tls: ServerTls | None = None
        self.ports = [self._reserve(settings.port, "gRPC")]
        http_port = -1 if settings.http_port < 0 else self._reserve(settings.http_port, "HTTP")
        url = settings.database_url or self._embedded_postgres()
        prepare(settings)  # converted once here: the workers would race to write the same files
        self.metrics_dir = tempfile.mkdtemp(prefix="embedpool-metrics-")
        stack.callback(shutil.rmtree, self.metrics_dir, ignore_errors=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir  # inherited: the workers write their files there
        self.metrics_port = self._metrics()
        self.worker_settings = dataclasses.replace(
            _share_cores(settings),
            workers=1,
            reuse_port=True,
            port=self.ports[0],
            http_port=http_port,
            metrics_port=-1,
            database_url=url,
        )
        self.context = multiprocessing.get_context("spawn")  # no fork: the parent's threads and sockets stay here
        self.workers: list[_Worker] = []
        self.delays = [_RESTART_DELAY_S] * settings.workers
        self.restart_at: dict[int, float] = {}

    # Start-up: the shared parts, then every worker serving.

    def _reserve(self, port: int, what: str) -> int:
        """Binds (without listening) a SO_REUSEPORT socket on the port, kept for the supervisor's life: port 0
        becomes a fixed one every worker and restart gets, and no other program takes it in between."""
        family = socket.getaddrinfo(self.settings.host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        self.stack.callback(sock.close)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((self.settings.host, port))
        except OSError as e:
            raise StartupError(f"cannot listen on {self.settings.host}:{port} for {what}: {e.strerror}") from e
        return int(sock.getsockname()[1])

    def _embedded_postgres(self) -> str:
        from embedpool.store.embedded import EmbeddedPostgres

        embedded = EmbeddedPostgres(self.settings.data_dir / "pg")
        embedded.claim()  # a second server on this data dir stops here
        self.stack.callback(embedded.close)
        return embedded.start()

    def _metrics(self) -> int:
        if self.settings.metrics_port < 0:
            return -1
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        from embedpool.server.metrics_http import MetricsServer
        from embedpool.server.tls import server_tls

        registry = CollectorRegistry()
        MultiProcessCollector(registry, self.metrics_dir)  # type: ignore[no-untyped-call]
        tls = server_tls(self.settings)
        try:
            server = MetricsServer(
                self.settings.metrics_host, self.settings.metrics_port, tls.ssl_context if tls else None, registry
            )
        except OSError as e:
            raise StartupError(
                f"cannot listen on {self.settings.metrics_host}:{self.settings.metrics_port} for /metrics: {e.strerror}"
            ) from e
        self.stack.callback(server.close)
        self.tls = tls
        return server.port

    def _spawn(self, index: int) -> _Worker:
        receive, send = self.context.Pipe(duplex=False)
        process = self.context.Process(
            target=_worker_main,
            args=(self.worker_settings, send, os.getpid()),
            name=f"embedpool-worker-{index}",
            daemon=False,
        )
        process.start()
        send.close()  # the child's end: ours closes so that its exit reads as EOF
        return _Worker(index, process, receive, time.monotonic())

    def run(self) -> int:
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            self.workers = [self._spawn(i) for i in range(self.settings.workers)]
            self._wait_serving()
            log.info(
                "serving on %s:%d with %d workers (supervisor pid %d)",
                self.settings.host,
                self.ports[0],
                len(self.workers),
                os.getpid(),
                extra={
                    "port": self.ports[0],
                    "metrics_port": self.metrics_port,
                    "http_port": self.worker_settings.http_port,
                },
            )
            self._supervise()
            return 0 if all(w.process.exitcode == 0 for w in self.workers) else 1
        finally:
            self._stop_all(force=True)
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _on_signal(self, signum: int, _: FrameType | None) -> None:
        self.signals.append(signum)

    def _wait_serving(self) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while not all(w.serving for w in self.workers):
            if any(s != signal.SIGHUP for s in self.signals):
                raise StartupError("stopped before every worker was serving")
            for w in self.workers:
                if not w.serving and not self._check_ready(w) and not w.process.is_alive():
                    raise StartupError(f"worker {w.index} exited with {w.process.exitcode} before serving")
            if time.monotonic() > deadline:
                raise StartupError(f"the workers were not serving after {_READY_TIMEOUT_S:.0f} s")
            self._wait(_POLL_S)

    def _check_ready(self, worker: _Worker) -> bool:
        with contextlib.suppress(EOFError, OSError):
            if worker.ready.poll():
                worker.serving = worker.ready.recv() == "serving"
        return worker.serving

    def _wait(self, timeout: float) -> None:
        sentinels: list[Any] = [w.process.sentinel for w in self.workers if w.process.is_alive()]
        if sentinels:
            multiprocessing.connection.wait(sentinels, timeout)
        else:
            time.sleep(timeout)

    # Serving: restarts, signals, then the drains.

    def _supervise(self) -> None:
        stopping = 0
        while True:
            while self.signals:
                signum = self.signals.pop(0)
                if signum == signal.SIGHUP:
                    if self.tls is not None:
                        self.tls.reload()
                    self._signal_all(signal.SIGHUP)
                    continue
                stopping += 1
                log.info("stopping: %s to every worker", "draining" if stopping == 1 else "aborting the drains")
                self._signal_all(signal.SIGTERM)
            if stopping:
                if not any(w.process.is_alive() for w in self.workers):
                    return
            else:
                self._restart_dead()
            for w in self.workers:
                if not w.serving:
                    self._check_ready(w)
            self._wait(_POLL_S)

    def _restart_dead(self) -> None:
        from prometheus_client import multiprocess

        now = time.monotonic()
        for i, w in enumerate(self.workers):
            if w.process.is_alive():
                continue
            if i not in self.restart_at:
                w.process.join()
                # Its live gauges stop counting.
                multiprocess.mark_process_dead(w.process.pid, self.metrics_dir)  # type: ignore[no-untyped-call]
                young = now - w.started_at < _YOUNG_S
                self.delays[i] = min(2 * self.delays[i], _RESTART_DELAY_CAP_S) if young else _RESTART_DELAY_S
                self.restart_at[i] = now + self.delays[i]
                log.warning(
                    "worker %d (pid %s) exited with %s; starting it again in %.1f s",
                    i,
                    w.process.pid,
                    w.process.exitcode,
                    self.delays[i],
                )
            elif now >= self.restart_at[i]:
                del self.restart_at[i]
                w.ready.close()
                self.workers[i] = self._spawn(i)

    def _signal_all(self, signum: int) -> None:
        for w in self.workers:
            if w.process.is_alive() and w.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.process.pid, signum)

    def _stop_all(self, *, force: bool) -> None:
        """What is still running when the supervisor leaves (start-up failed, or an error): SIGTERM, then after
        the grace period SIGKILL."""
        alive = [w for w in self.workers if w.process.is_alive()]
        if not alive:
            return
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.drain_delay + self.settings.grace_seconds + 10.0
        for w in alive:
            w.process.join(max(0.0, deadline - time.monotonic()))
            if force and w.process.is_alive():
                w.process.kill()
                w.process.join()


def _follow(supervisor: int) -> None:
    """Linux: SIGTERM (drain, then exit) when the supervisor dies, even by SIGKILL, so that no worker serves on
    without it (without its Postgres, its /metrics, anyone to restart it)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _share_cores(settings: Settings) -> Settings:
    """On CPU, ONNX Runtime's default (intra_op_threads 0) gives each session every core: N workers would
    oversubscribe them N times over, so they share them instead. A GPU's sessions need one thread anyway."""
    from embedpool.engine import pick_device

    if settings.intra_op_threads or settings.device == "null" or pick_device(settings.device) == "cuda":
        return settings
    sessions = settings.workers * settings.sessions_per_device
    return dataclasses.replace(settings, intra_op_threads=max(1, (os.cpu_count() or 1) // sessions))


def _worker_main(settings: Settings, ready: Connection, supervisor: int) -> None:
    """A worker: one ordinary server on the shared ports; tells the supervisor once it serves."""
    os.setpgrp()  # a Ctrl-C at the terminal reaches the supervisor alone, which passes one SIGTERM on
    _follow(supervisor)
    from embedpool.server.process import run

    configure(settings.log_level, settings.log_format)
    tracing.configure()

    def serving(_: Running) -> None:
        ready.send("serving")
        ready.close()

    try:
        code = run(settings, serving)
    finally:
        tracing.shutdown()
    sys.exit(code)
