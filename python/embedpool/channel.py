"""Client channels to an embedpool server: plaintext, TLS or mTLS, with or without an API key.

The key goes as `authorization: Bearer <key>` call metadata, attached by grpc's call credentials, which grpc
sends only over a channel with transport security: TLS, or local credentials, which connect to loopback
addresses only. So a key never crosses the network in plaintext.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, overload

import grpc
import grpc.aio

from embedpool.errors import InvalidArgument

__all__ = ["open_channel"]


@overload
def open_channel(
    target: str,
    *,
    api_key: str = "",
    tls_ca: str = "",
    tls_cert: str = "",
    tls_key: str = "",
    aio: Literal[False] = False,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel: ...


@overload
def open_channel(
    target: str,
    *,
    api_key: str = "",
    tls_ca: str = "",
    tls_cert: str = "",
    tls_key: str = "",
    aio: Literal[True],
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel: ...


def open_channel(
    target: str,
    *,
    api_key: str = "",
    tls_ca: str = "",
    tls_cert: str = "",
    tls_key: str = "",
    aio: bool = False,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel | grpc.aio.Channel:
    """A channel to `target` (host:port): TLS verified against the CA bundle in `tls_ca` when given (with the
    client certificate `tls_cert` and its key `tls_key` for mTLS), else plaintext; `api_key` on every call;
    a grpc.aio channel when `aio`. InvalidArgument for flags that do not go together or an unreadable file."""
    credentials = _credentials(api_key, tls_ca, tls_cert, tls_key)
    if aio:
        if credentials is None:
            return grpc.aio.insecure_channel(target, options=options)
        return grpc.aio.secure_channel(target, credentials, options=options)
    if credentials is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, credentials, options=options)


def _credentials(api_key: str, tls_ca: str, tls_cert: str, tls_key: str) -> grpc.ChannelCredentials | None:
    """None for a plaintext channel without a key (grpc's insecure channel)."""
    if bool(tls_cert) != bool(tls_key):
        raise InvalidArgument("--tls-cert and --tls-key go together: give both or neither")
    if tls_cert and not tls_ca:
        raise InvalidArgument("--tls-cert (mTLS) needs --tls-ca, the CA that signed the server's certificate")
    if tls_ca:
        channel = grpc.ssl_channel_credentials(
            root_certificates=_read("--tls-ca", tls_ca),
            private_key=_read("--tls-key", tls_key) if tls_key else None,
            certificate_chain=_read("--tls-cert", tls_cert) if tls_cert else None,
        )
    elif api_key:
        channel = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
    else:
        return None
    if not api_key:
        return channel
    return grpc.composite_channel_credentials(channel, grpc.metadata_call_credentials(_Bearer(api_key)))


class _Bearer(grpc.AuthMetadataPlugin):
    def __init__(self, key: str) -> None:
        self._metadata = (("authorization", f"Bearer {key}"),)

    def __call__(self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback) -> None:
        callback(self._metadata, None)


def _read(flag: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise InvalidArgument(f"{flag}: cannot read {path}: {e.strerror}") from e
