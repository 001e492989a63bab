"""One serving process, from start to a signal: what `embedpool serve` runs, alone or as each of its --workers."""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import AsyncIterator, Callable
from functools import partial

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from embedpool.config import Settings
from embedpool.errors import EmbedpoolError, one_line
from embedpool.server.app import Running, serve

__all__ = ["run"]


def run(settings: Settings, on_started: Callable[[Running], None] | None = None) -> int:
    """Serves until SIGINT/SIGTERM (a second one cuts the drain short); 0, or 2 after printing why it could not
    start or went on. `on_started` is called once the server serves."""
    try:
        anyio.run(_serve, settings, on_started, backend="asyncio")
    except BaseExceptionGroup as group:  # what serve raised, wrapped by the task group
        error = _sole_error(group)
        if error is None:
            raise
        print(f"embedpool: {one_line(error)}", file=sys.stderr)
        return 2
    return 0


async def _serve(settings: Settings, on_started: Callable[[Running], None] | None) -> None:
    stop, abort = anyio.Event(), anyio.Event()
    request_reload, reloads = anyio.create_memory_object_stream[None](1)
    # SIGHUP is taken over only to reload TLS files; without TLS it keeps ending the process with its terminal.
    hangup = (signal.SIGHUP,) if settings.tls_cert else ()
    # Open for the whole run: once a handler is gone, a second Ctrl-C kills the process and leaves Postgres up.
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, *hangup) as signals, reloads:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_on_signals, signals, stop, abort, request_reload)
            async with anyio.create_task_group() as serving:  # until serve returns: stopped and drained
                running = await serving.start(partial(serve, settings, stop, abort=abort, reload_tls=reloads))
                if on_started is not None:
                    on_started(running)
            tg.cancel_scope.cancel()


async def _on_signals(
    signals: AsyncIterator[signal.Signals],
    stop: anyio.Event,
    abort: anyio.Event,
    request_reload: MemoryObjectSendStream[None],
) -> None:
    """SIGHUP reloads the TLS files. The first other signal drains in-flight requests, then stops the pool and
    Postgres; a later one cuts the drain short, and Postgres is still stopped cleanly."""
    with request_reload:
        async for signum in signals:
            if signum == signal.SIGHUP:
                with contextlib.suppress(anyio.WouldBlock):  # one already pending reads the files as they are then
                    request_reload.send_nowait(None)
            else:
                (abort if stop.is_set() else stop).set()


def _sole_error(group: BaseExceptionGroup[BaseException]) -> EmbedpoolError | None:
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error if isinstance(error, EmbedpoolError) else None
