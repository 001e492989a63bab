"""What the sync and the async client share: their options, targets and deadlines."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final, Literal, overload

import grpc
import grpc.aio

from embedpool.channel import open_channel
from embedpool.client.ingest import IterableSource, Source
from embedpool.client.retry import Deadline, RetryPolicy
from embedpool.client.targets import Targets, parse_targets
from embedpool.client.types import Document, Limits, ModelInfo
from embedpool.errors import InvalidArgument

__all__ = ["ClientBase"]

# Replies are not bounded by the request limits (Search with vectors, k=1000, 4096 dims is 16 MiB): take what
# the server may send (its grpc.max_send_message_length).
_MAX_REPLY_BYTES: Final = 256 * 1024 * 1024


class ClientBase:
    """A client of one embedpool server, or of several replicas taken in turn (`targets`: "host:port", a list,
    or a comma-separated string).

    `timeout`: seconds each method may take in all (its split calls, retries and waits), None for no limit; a
    method's own `timeout` replaces it. `retry`: how RESOURCE_EXHAUSTED and UNAVAILABLE are retried.
    `concurrency`: split calls in flight at once. `limits`: split inputs by these instead of the limits the
    server announces. `api_key`, `tls_*`: as `embedpool.channel.open_channel`; `options`: grpc channel options.
    Errors are embedpool.errors' domain errors, never grpc.RpcError.
    """

    def __init__(
        self,
        targets: str | Sequence[str],
        *,
        api_key: str = "",
        tls_ca: str = "",
        tls_cert: str = "",
        tls_key: str = "",
        timeout: float | None = 120.0,
        retry: RetryPolicy | None = None,
        concurrency: int = 4,
        limits: Limits | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if concurrency < 1:
            raise InvalidArgument(f"concurrency: must be positive, got {concurrency}")
        if timeout is not None and timeout <= 0:
            raise InvalidArgument(f"timeout: must be positive or None, got {timeout}")
        self._retry = retry or RetryPolicy()
        self._targets = Targets(parse_targets(targets), self._retry.cooldown)
        self._timeout = timeout
        self._concurrency = concurrency
        self._limits_given = limits
        self._info: ModelInfo | None = None
        self._credentials = (api_key, tls_ca, tls_cert, tls_key)
        self._options = [("grpc.max_receive_message_length", _MAX_REPLY_BYTES), *options]
        self._connect()

    def _connect(self) -> None:
        """Sets up the transport (the end of __init__)."""
        raise NotImplementedError

    @overload
    def _open(self, target: str, *, aio: Literal[False]) -> grpc.Channel: ...

    @overload
    def _open(self, target: str, *, aio: Literal[True]) -> grpc.aio.Channel: ...

    def _open(self, target: str, *, aio: bool) -> grpc.Channel | grpc.aio.Channel:
        api_key, tls_ca, tls_cert, tls_key = self._credentials
        options = self._options
        if aio:
            return open_channel(
                target, api_key=api_key, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, aio=True, options=options
            )
        return open_channel(target, api_key=api_key, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, options=options)

    @property
    def targets(self) -> list[str]:
        return list(self._targets.addresses)

    def _deadline(self, timeout: float | None) -> Deadline:
        """A method's deadline: its own `timeout`, else the client's."""
        return Deadline(self._timeout if timeout is None else timeout)

    def _checkpoint_target(self) -> str:
        """Names the servers in a checkpoint; order-free, so a replica list given in another order resumes."""
        return ",".join(sorted(self._targets.addresses))


def as_source(documents: Iterable[Document | str] | Source) -> Source:
    if isinstance(documents, str):
        raise InvalidArgument("documents: expected an iterable of documents, got one string")
    return documents if isinstance(documents, Source) else IterableSource(documents)


def checkpoint_file(checkpoint: str | Path | None) -> Path | None:
    return None if checkpoint is None else Path(checkpoint)
