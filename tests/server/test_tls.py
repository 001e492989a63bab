"""TLS and mTLS on every listener, with real certificates (trustme) and real servers: who gets in, /metrics over
HTTPS, rotation without a dropped connection (replaced files, or a reload request as on SIGHUP), and bad PEM
files refused in one line that names the setting and never quotes the file.

One TLS server serves most of the module (the rotation tests change its certificate, so every test asks it
for the CA of the moment), one mTLS server the client-certificate tests."""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import logging
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import grpc
import pytest
import trustme
from anyio.from_thread import start_blocking_portal

from embedpool.channel import open_channel
from embedpool.errors import StartupError
from embedpool.server.app import Running, serve
from embedpool.server.tls import ServerTls
from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc

from ..conftest import SettingsFactory, serving

# Every connection attempt its own: grpc otherwise shares one connection among channels with equal arguments.
_FRESH = [("grpc.use_local_subchannel_pool", 1)]
# Certificate files are padded to this size, so a rewrite in place can leave (mtime, size, inode) as they were.
_FILE_SIZE = 4096


@dataclass
class Certs:
    """A server's certificate and key files, and where CA and client files go."""

    dir: Path

    @property
    def cert(self) -> Path:
        return self.dir / "server.pem"

    @property
    def key(self) -> Path:
        return self.dir / "server.key"

    def leaf(self, ca: trustme.CA) -> tuple[bytes, bytes]:
        leaf = ca.issue_cert("localhost", "127.0.0.1")
        chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
        return _padded(chain), _padded(leaf.private_key_pem.bytes())

    def install(self, ca: trustme.CA) -> None:
        """Replaces both files as a rotation should: each written aside, then renamed over the old one."""
        for path, data in zip((self.cert, self.key), self.leaf(ca), strict=True):
            _replace(path, data)

    def ca_file(self, ca: trustme.CA) -> str:
        path = self.dir / f"ca-{id(ca)}.pem"
        ca.cert_pem.write_to_path(str(path))
        return str(path)

    def client_files(self, ca: trustme.CA) -> dict[str, str]:
        leaf = ca.issue_cert("client.example")
        cert, key = self.dir / f"client-{id(leaf)}.pem", self.dir / f"client-{id(leaf)}.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        return {"tls_cert": str(cert), "tls_key": str(key)}


def _padded(pem: bytes) -> bytes:
    assert len(pem) <= _FILE_SIZE
    return pem + b"\n" * (_FILE_SIZE - len(pem))


def _replace(path: Path, data: bytes) -> None:
    aside = path.with_name(path.name + ".new")
    aside.write_bytes(data)
    os.replace(aside, path)


@dataclass
class TlsServer:
    running: Running
    certs: Certs
    ca: trustme.CA
    """The CA of the certificate served now."""
    request_reload: Callable[[], None]
    """What the CLI does on SIGHUP."""

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    @property
    def ca_file(self) -> str:
        return self.certs.ca_file(self.ca)


@contextlib.contextmanager
def _serving_with_reloads(settings: Any) -> Iterator[tuple[Running, Callable[[], None]]]:
    """conftest.serving, plus a way to send reload requests into the server's event loop."""
    request_reload, reloads = anyio.create_memory_object_stream[None](1)
    with request_reload, reloads, start_blocking_portal(backend="asyncio") as portal:
        future, running = portal.start_task(functools.partial(serve, reload_tls=reloads), settings)
        try:
            yield running, functools.partial(portal.call, request_reload.send, None)
        finally:
            future.cancel()


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory, make_settings: SettingsFactory) -> Iterator[TlsServer]:
    certs, ca = Certs(tmp_path_factory.mktemp("tls")), trustme.CA()
    certs.install(ca)
    settings = make_settings(tmp_path_factory.mktemp("tls-data"), tls_cert=str(certs.cert), tls_key=str(certs.key))
    with _serving_with_reloads(settings) as (running, request_reload):
        yield TlsServer(running, certs, ca, request_reload)


@dataclass
class MtlsServer:
    running: Running
    certs: Certs
    ca: trustme.CA
    client_ca: trustme.CA

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.running.port}"


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory: pytest.TempPathFactory, make_settings: SettingsFactory) -> Iterator[MtlsServer]:
    certs, ca, client_ca = Certs(tmp_path_factory.mktemp("mtls")), trustme.CA(), trustme.CA()
    certs.install(ca)
    settings = make_settings(
        tmp_path_factory.mktemp("mtls-data"),
        tls_cert=str(certs.cert),
        tls_key=str(certs.key),
        tls_client_ca=certs.ca_file(client_ca),
    )
    with serving(settings) as running:
        yield MtlsServer(running, certs, ca, client_ca)


def _model_info(target: str, **credentials: str) -> pb.ModelInfo:
    # aio named: else the str-valued credentials could be meant for it, and no overload would match.
    with open_channel(target, aio=False, options=_FRESH, **credentials) as channel:
        return pb_grpc.EmbedderStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)


def _refused(target: str, **credentials: str) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        _model_info(target, **credentials)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def _scrape(url: str, context: ssl.SSLContext | None = None) -> bytes:
    with urllib.request.urlopen(url, context=context, timeout=10) as reply:
        return bytes(reply.read())


def _trusting(ca: trustme.CA, client: trustme.LeafCert | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if client is not None:
        client.configure_cert(context)
    return context


def _eventually(attempt: Callable[[], object], timeout: float = 20.0) -> None:
    """The server looks at its files about once a second: retry until the change shows, up to `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            attempt()
            return
        except (grpc.RpcError, OSError, http.client.HTTPException):
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)


# --- TLS ---------------------------------------------------------------------------------------------------------


def test_a_client_trusting_the_ca_is_served(tls_server: TlsServer) -> None:
    assert _model_info(tls_server.target, tls_ca=tls_server.ca_file).dim == 384


def test_a_plaintext_client_is_refused(tls_server: TlsServer) -> None:
    _refused(tls_server.target)


def test_a_client_trusting_another_ca_is_refused(tls_server: TlsServer) -> None:
    _refused(tls_server.target, tls_ca=tls_server.certs.ca_file(trustme.CA()))


def test_metrics_serve_https_only(tls_server: TlsServer) -> None:
    port = tls_server.running.metrics_port
    assert b"embedpool_" in _scrape(f"https://127.0.0.1:{port}/metrics", _trusting(tls_server.ca))
    with pytest.raises((OSError, http.client.HTTPException)):
        _scrape(f"http://127.0.0.1:{port}/metrics")
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        _scrape(f"https://127.0.0.1:{port}/metrics", _trusting(trustme.CA()))


def test_http_serves_https_only(tls_server: TlsServer) -> None:
    port = tls_server.running.http_port
    assert b'"ok"' in _scrape(f"https://127.0.0.1:{port}/health", _trusting(tls_server.ca))
    with pytest.raises((OSError, http.client.HTTPException)):
        _scrape(f"http://127.0.0.1:{port}/health")
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        _scrape(f"https://127.0.0.1:{port}/health", _trusting(trustme.CA()))


def test_cli_connects_with_tls_ca(tls_server: TlsServer) -> None:
    embed = [sys.executable, "-m", "embedpool.cli", "embed", "hello world", "--target", tls_server.target]
    done = subprocess.run([*embed, "--tls-ca", tls_server.ca_file], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["dim"] == 384


def test_replaced_files_serve_new_connections_and_open_ones_stay(tls_server: TlsServer) -> None:
    with open_channel(tls_server.target, tls_ca=tls_server.ca_file, options=_FRESH) as kept:
        stub = pb_grpc.EmbedderStub(kept)
        stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)  # the connection is open
        old, tls_server.ca = tls_server.ca, trustme.CA()
        tls_server.certs.install(tls_server.ca)
        _eventually(lambda: _model_info(tls_server.target, tls_ca=tls_server.ca_file))
        _refused(tls_server.target, tls_ca=tls_server.certs.ca_file(old))
        # Had the connection been dropped, a new one would be refused (its client trusts the old CA only).
        stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    for url in (
        f"https://127.0.0.1:{tls_server.running.metrics_port}/metrics",
        f"https://127.0.0.1:{tls_server.running.http_port}/health",
    ):
        _eventually(lambda: _scrape(url, _trusting(tls_server.ca)))  # noqa: B023 - called before the loop moves on
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            _scrape(url, _trusting(old))


def test_a_half_written_key_keeps_the_certificate_until_a_valid_one_comes(
    tls_server: TlsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="embedpool.server")
    new = trustme.CA()
    cert, key = tls_server.certs.leaf(new)
    _replace(tls_server.certs.key, key[: len(key) // 3])
    deadline = time.monotonic() + 20
    while not any("not reloaded" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, "no warning about the half-written key"
        time.sleep(0.1)
    assert _model_info(tls_server.target, tls_ca=tls_server.ca_file).dim == 384
    _replace(tls_server.certs.cert, cert)
    _replace(tls_server.certs.key, key)
    tls_server.ca = new
    _eventually(lambda: _model_info(tls_server.target, tls_ca=tls_server.ca_file))


def test_a_reload_request_reads_files_whose_stats_did_not_change(tls_server: TlsServer) -> None:
    """As after `cp -p` of same-size files: only the reload request (SIGHUP) can tell."""
    new = trustme.CA()
    for path, data in zip((tls_server.certs.cert, tls_server.certs.key), tls_server.certs.leaf(new), strict=True):
        _overwrite_keeping_stat(path, data)
    tls_server.request_reload()
    tls_server.ca = new
    _eventually(lambda: _model_info(tls_server.target, tls_ca=tls_server.ca_file))


def _overwrite_keeping_stat(path: Path, data: bytes) -> None:
    before = os.stat(path)
    assert len(data) == before.st_size
    with path.open("r+b") as f:  # same inode, same size: nothing truncated
        f.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


# --- mTLS --------------------------------------------------------------------------------------------------------


def test_mtls_refuses_a_client_without_a_certificate(mtls_server: MtlsServer) -> None:
    _refused(mtls_server.target, tls_ca=mtls_server.certs.ca_file(mtls_server.ca))


def test_mtls_refuses_a_certificate_of_another_ca(mtls_server: MtlsServer) -> None:
    stranger = mtls_server.certs.client_files(trustme.CA())
    _refused(mtls_server.target, tls_ca=mtls_server.certs.ca_file(mtls_server.ca), **stranger)


def test_mtls_serves_a_certificate_of_the_client_ca(mtls_server: MtlsServer) -> None:
    client = mtls_server.certs.client_files(mtls_server.client_ca)
    assert _model_info(mtls_server.target, tls_ca=mtls_server.certs.ca_file(mtls_server.ca), **client).dim == 384


@pytest.mark.parametrize("listener", ["metrics", "http"])
def test_mtls_metrics_and_http_need_a_client_certificate(mtls_server: MtlsServer, listener: str) -> None:
    running = mtls_server.running
    url, expected = {
        "metrics": (f"https://127.0.0.1:{running.metrics_port}/metrics", b"embedpool_"),
        "http": (f"https://127.0.0.1:{running.http_port}/v1/models", b"all-MiniLM-L6-v2"),
    }[listener]
    client = mtls_server.client_ca.issue_cert("client.example")
    assert expected in _scrape(url, _trusting(mtls_server.ca, client))
    with pytest.raises((OSError, http.client.HTTPException)):
        _scrape(url, _trusting(mtls_server.ca))
    with pytest.raises((OSError, http.client.HTTPException)):
        _scrape(url, _trusting(mtls_server.ca, trustme.CA().issue_cert("client.example")))


# --- bad files ---------------------------------------------------------------------------------------------------

_SECRET = b"do-not-quote-me"


@pytest.fixture
def good(tmp_path: Path) -> Certs:
    certs = Certs(tmp_path)
    certs.install(trustme.CA())
    return certs


def _files(certs: Certs, **changes: str) -> dict[str, str]:
    return {"cert": str(certs.cert), "key": str(certs.key), "client_ca": "", **changes}


@pytest.mark.parametrize(
    ("which", "content", "message"),
    [
        ("cert", None, "tls_cert: cannot read {path}: No such file or directory"),
        ("cert", b"garbage " + _SECRET, "tls_cert: not a PEM certificate ({path})"),
        ("cert", "key", "tls_cert: not a PEM certificate ({path})"),
        ("key", b"-----BEGIN PRIVATE KEY-----\n" + _SECRET + b"\n-----END PRIVATE KEY-----\n", "tls_key: not a PEM"),
        ("key", "cert", "tls_key: not a PEM private key ({path})"),
        ("key", "other key", "tls_key: {path} does not match the certificate in tls_cert"),
        ("client_ca", b"garbage " + _SECRET, "tls_client_ca: not a PEM certificate ({path})"),
    ],
)
def test_a_bad_file_is_named_in_one_line_without_its_contents(
    good: Certs, which: str, content: bytes | str | None, message: str
) -> None:
    path = good.dir / f"bad-{which}"
    if content == "key":
        path.write_bytes(good.key.read_bytes())
    elif content == "cert":
        path.write_bytes(good.cert.read_bytes())
    elif content == "other key":
        path.write_bytes(good.leaf(trustme.CA())[1])
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(StartupError) as error:
        ServerTls(**_files(good, **{which: str(path)}))
    text = str(error.value)
    assert text.startswith(message.format(path=path)), text
    assert "\n" not in text and "BEGIN" not in text and _SECRET.decode() not in text


def test_serve_stops_on_a_bad_key_before_binding(
    good: Certs, tmp_path_factory: pytest.TempPathFactory, make_settings: SettingsFactory
) -> None:
    good.key.write_bytes(b"not a key")
    settings = make_settings(tmp_path_factory.mktemp("bad"), tls_cert=str(good.cert), tls_key=str(good.key))
    with pytest.raises(StartupError, match=r"^tls_key: not a PEM private key"), serving(settings):
        pass


def test_cli_serve_names_the_bad_file_in_one_line(good: Certs, tmp_path: Path, model_dir: Path) -> None:
    good.cert.write_bytes(b"not a certificate " + _SECRET)
    serve_cmd = [sys.executable, "-m", "embedpool.cli", "serve", "--port", "0", "--metrics-port", "0"]
    serve_cmd += ["--http-port", "0"]
    serve_cmd += ["--data-dir", str(tmp_path / "data"), "--model", str(model_dir)]
    serve_cmd += ["--tls-cert", str(good.cert), "--tls-key", str(good.key)]
    env = {**os.environ, "EMBEDPOOL_LOG_FORMAT": "json"}
    done = subprocess.run(serve_cmd, capture_output=True, text=True, timeout=120, env=env)
    lines = [line for line in done.stderr.splitlines() if not line.startswith("{")]  # JSON logs aside
    assert (done.returncode, lines) == (2, [f"embedpool: tls_cert: not a PEM certificate ({good.cert})"])
    assert _SECRET.decode() not in done.stderr


# --- reloads, without a server -------------------------------------------------------------------------------------


def test_a_bad_reload_warns_once_and_keeps_the_current_files(good: Certs, caplog: pytest.LogCaptureFixture) -> None:
    tls = ServerTls(**_files(good))
    context = tls.ssl_context()
    _replace(good.key, b"half a key")
    with caplog.at_level(logging.WARNING, logger="embedpool.server"):
        assert not tls.check()
        assert not tls.check()  # unchanged since: no second warning
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"TLS files not reloaded, the current certificate stays: tls_key: not a PEM private key ({good.key})"
    ]
    assert tls.ssl_context() is context
    assert tls._fetch() is None  # grpc keeps its certificate too
    good.install(trustme.CA())
    assert tls.check()
    assert tls.ssl_context() is not context
    assert isinstance(tls._fetch(), grpc.ServerCertificateConfiguration)
    assert tls._fetch() is None  # handed to grpc once


def test_reload_reads_files_whose_stats_did_not_change(good: Certs) -> None:
    tls = ServerTls(**_files(good))
    for path, data in zip((good.cert, good.key), good.leaf(trustme.CA()), strict=True):
        _overwrite_keeping_stat(path, data)
    assert not tls.check()
    assert tls.reload()
    assert isinstance(tls._fetch(), grpc.ServerCertificateConfiguration)
