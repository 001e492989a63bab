"""Runs the HTTP door with uvicorn as a task in the server's own asyncio loop, beside grpc.aio: one process,
one pool, one store. The socket is bound here (a port in use is a StartupError before anything loads, and
port 0 reports the port it got); signals stay the CLI's (uvicorn's own handlers are not installed).

Why this stack: FastAPI gives strict request schemas and the OpenAPI 3.1 document from the same code, uvicorn
with httptools is the fastest well-kept ASGI server that runs inside an existing asyncio loop, and the routes
write vectors with orjson straight from numpy, bypassing response models on the hot path. What it costs is
measured, not assumed: bench/serve.py runs HTTP `float` and `base64` against gRPC Embed on one server in the
same run (bench/results/http/serve.json)."""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import ssl
from collections.abc import Callable, Generator

import anyio
import uvicorn
from fastapi import FastAPI

from embedpool.errors import StartupError

log = logging.getLogger("embedpool.http")


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # the CLI owns SIGINT/SIGTERM (and SIGHUP for TLS): a stop reaches us through `stop`


def bind(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """The HTTP listener; `reuse_port`: shared with other processes on the same port (SO_REUSEPORT)."""
    sock: socket.socket | None = None
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError as e:
        if sock is not None:
            sock.close()
        reason = e.strerror if e.errno in (errno.EADDRINUSE, errno.EACCES) else str(e)
        raise StartupError(f"cannot listen on {host}:{port} for HTTP: {reason}") from e
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def _following(current: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    """A context for the listener that hands each handshake the current context (the server-name callback runs
    before the certificate is chosen), so rotated certificates serve new connections without a restart."""
    front = current()

    def use_current(connection: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        connection.context = current()

    front.sni_callback = use_current
    return front


class HttpServer:
    def __init__(
        self, app: FastAPI, sock: socket.socket, tls: Callable[[], ssl.SSLContext] | None, grace: float
    ) -> None:
        """`tls`: the current server context (server.tls makes a new one on each certificate reload)."""
        config = uvicorn.Config(
            app,
            http="httptools",
            lifespan="off",
            access_log=False,
            log_config=None,  # our logging (embedpool.logs), not uvicorn's
            timeout_graceful_shutdown=max(1, round(grace)),
            server_header=False,
        )
        config.load()
        config.ssl = _following(tls) if tls is not None else None
        self._server = _Server(config)
        self._sock = sock
        self.port: int = sock.getsockname()[1]

    async def run(self) -> None:
        try:
            await self._server.serve(sockets=[self._sock])
        finally:
            self._sock.close()

    async def stop(self, grace: float, abort: anyio.Event | None = None) -> None:
        """Stops accepting and lets requests in flight finish, for up to `grace` seconds or until `abort` is
        set; then cancels what still runs."""
        self._server.should_exit = True
        with anyio.move_on_after(grace):
            async with anyio.create_task_group() as tg:
                if abort is not None:

                    async def on_abort() -> None:
                        await abort.wait()
                        tg.cancel_scope.cancel()

                    tg.start_soon(on_abort)
                while self._server.started and not self._done():
                    await anyio.sleep(0.05)
                tg.cancel_scope.cancel()
        if not self._done():
            self._server.force_exit = True
            for task in list(self._server.server_state.tasks):
                task.cancel()

    def _done(self) -> bool:
        return not self._server.server_state.connections and not self._server.server_state.tasks
