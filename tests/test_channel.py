"""open_channel against a small grpc server that echoes the `authorization` metadata it got: the key arrives as
a bearer token over TLS and over plaintext to loopback, nothing is sent without one, and flags that do not go
together are refused before connecting."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import grpc.aio
import pytest
import trustme

from embedpool.channel import open_channel
from embedpool.errors import InvalidArgument

_METHOD = "/test.Echo/Authorization"


class _Echo(grpc.GenericRpcHandler):  # type: ignore[type-arg]  # generic in the stubs only
    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        def authorization(request: bytes, context: grpc.ServicerContext) -> bytes:
            # A str: only the values of keys ending in -bin are bytes.
            return cast(str, dict(context.invocation_metadata()).get("authorization", "(none)")).encode()

        return grpc.unary_unary_rpc_method_handler(authorization) if details.method == _METHOD else None


@dataclass
class Echo:
    plaintext: str
    tls: str
    ca_file: str


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Echo]:
    ca, ca_file = trustme.CA(), tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    pair = (leaf.private_key_pem.bytes(), b"".join(b.bytes() for b in leaf.cert_chain_pems))
    server = grpc.server(ThreadPoolExecutor(max_workers=2), handlers=[_Echo()])
    plaintext = server.add_insecure_port("127.0.0.1:0")
    tls = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([pair]))
    server.start()
    try:
        yield Echo(f"127.0.0.1:{plaintext}", f"127.0.0.1:{tls}", str(ca_file))
    finally:
        server.stop(None).wait()


def _authorization(target: str, **credentials: Any) -> str:
    with open_channel(target, **credentials) as channel:
        return bytes(channel.unary_unary(_METHOD)(b"", timeout=10)).decode()


def test_plaintext_without_a_key_sends_none(echo: Echo) -> None:
    assert _authorization(echo.plaintext) == "(none)"


def test_a_key_goes_as_bearer_token_to_a_loopback_plaintext_target(echo: Echo) -> None:
    assert _authorization(echo.plaintext, api_key="k1") == "Bearer k1"
    assert _authorization(echo.plaintext.replace("127.0.0.1", "localhost"), api_key="k1") == "Bearer k1"


def test_a_key_goes_as_bearer_token_over_tls(echo: Echo) -> None:
    assert _authorization(echo.tls, api_key="k2", tls_ca=echo.ca_file) == "Bearer k2"
    assert _authorization(echo.tls, tls_ca=echo.ca_file) == "(none)"


def test_an_aio_channel_sends_the_key_too(echo: Echo) -> None:
    async def call() -> bytes:
        async with open_channel(echo.tls, api_key="k3", tls_ca=echo.ca_file, aio=True) as channel:
            assert isinstance(channel, grpc.aio.Channel)
            rpc = channel.unary_unary(_METHOD)  # type: ignore[call-arg]  # grpc-stubs: the serializers default to None
            return bytes(await rpc(b"", timeout=10))

    assert asyncio.run(call()) == b"Bearer k3"


@pytest.mark.parametrize(
    ("credentials", "message"),
    [
        ({"tls_ca": "ca.pem", "tls_cert": "c.pem"}, "--tls-cert and --tls-key go together"),
        ({"tls_cert": "c.pem", "tls_key": "k.pem"}, "--tls-cert \\(mTLS\\) needs --tls-ca"),
        ({"tls_ca": "missing.pem"}, "--tls-ca: cannot read .*missing.pem: No such file"),
    ],
)
def test_flags_that_cannot_work_are_refused(tmp_path: Path, credentials: dict[str, str], message: str) -> None:
    paths: dict[str, Any] = {k: str(tmp_path / v) for k, v in credentials.items()}
    with pytest.raises(InvalidArgument, match=message):
        open_channel("127.0.0.1:1", **paths)
