"""TLS for the server's listeners: the PEM files of tls_cert, tls_key and tls_client_ca, checked when read,
served to gRPC and to /metrics, and read again while serving without dropping a connection.

The files are parsed here before grpc or OpenSSL see them, so a bad one stops the start with one line naming
its setting (not a C++ log line), and a bad one met on a reload (a half-written file, say) leaves the current
certificate in place. A reload happens on request (`reload()`, the CLI's SIGHUP) or when a file's
(mtime, size, inode) changes: grpc asks for the configuration at every handshake and gets the stats checked at
most once a second; /metrics, which has no such hook, is covered by `watch()` checking on the same beat.
Connections already open keep the certificate they shook hands with.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import anyio
import anyio.to_thread
import grpc
from anyio.abc import ObjectReceiveStream
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from embedpool.config import Settings
from embedpool.errors import StartupError, one_line

__all__ = ["ServerTls", "server_tls"]

log = logging.getLogger("embedpool.server")

_CHECK_INTERVAL_S = 1.0

# Per file, what changes when it is rewritten or replaced by a rename; None while it cannot be read.
_Stamp = tuple[tuple[int, int, int] | None, ...]


def server_tls(settings: Settings) -> ServerTls | None:
    """The listeners' TLS as configured; None when `tls_cert` is not set (plaintext)."""
    if not settings.tls_cert:
        return None
    return ServerTls(settings.tls_cert, settings.tls_key, settings.tls_client_ca)


class ServerTls:
    """The certificate the listeners present and the CA their clients' certificates must chain to (mTLS).

    Loaded when made (StartupError on a bad file); `grpc_credentials` and `ssl_context()` follow every successful
    reload. `grpc_credentials` belongs to one server: a reload reaches the next handshake through it once."""

    def __init__(self, cert: str, key: str, client_ca: str = "") -> None:
        self._files = _Files(cert, key, client_ca)
        self._lock = threading.Lock()  # held by grpc's handshakes and the worker threads of `watch`
        self._stamp = self._files.stamp()  # before reading: a change while reading is seen at the next check
        material = self._files.load()
        self._context = _ssl_context(self._files, material)
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._checked_at = time.monotonic()
        self.grpc_credentials = grpc.dynamic_ssl_server_credentials(
            _grpc_configuration(material),
            self._fetch,  # type: ignore[arg-type]  # grpc-stubs leaves out that None means "unchanged"
            require_client_authentication=self.mutual,
        )

    @property
    def mutual(self) -> bool:
        """Whether clients must present a certificate (mTLS)."""
        return bool(self._files.client_ca)

    @property
    def mode(self) -> str:
        return "mTLS" if self.mutual else "TLS"

    def ssl_context(self) -> ssl.SSLContext:
        """The context for the next /metrics connection: a new one after each reload, so a connection never sees
        a certificate and key from two different loads."""
        return self._context

    def reload(self) -> bool:
        """Reads the files now, changed or not; False (and a warning) when they are not a valid set, and the
        current certificate stays."""
        with self._lock:
            return self._reload(self._files.stamp())

    def check(self) -> bool:
        """Reloads when a file changed since the last look."""
        with self._lock:
            return self._check()

    async def watch(self, reloads: ObjectReceiveStream[None] | None = None) -> None:
        """Runs `reload()` for each request from `reloads` (until it closes), and `check()` every second."""
        while True:
            requested = False
            with anyio.move_on_after(_CHECK_INTERVAL_S):
                if reloads is not None:
                    try:
                        await reloads.receive()
                        requested = True
                    except anyio.EndOfStream:
                        reloads = None
                if not requested:
                    await anyio.sleep_forever()
            await anyio.to_thread.run_sync(self.reload if requested else self.check)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc's hook at every handshake: the new configuration, once, after a reload; None keeps the current."""
        if not self._lock.acquire(blocking=False):
            return None  # a reload is under way in another thread: a later handshake gets its result
        try:
            if time.monotonic() - self._checked_at >= _CHECK_INTERVAL_S:
                self._check()
            configuration, self._pending = self._pending, None
            return configuration
        finally:
            self._lock.release()

    def _check(self) -> bool:
        self._checked_at = time.monotonic()
        stamp = self._files.stamp()
        return stamp != self._stamp and self._reload(stamp)

    def _reload(self, stamp: _Stamp) -> bool:
        self._stamp = stamp  # a bad set is warned about once, and read again when it changes next
        try:
            material = self._files.load()
            context = _ssl_context(self._files, material)
        except StartupError as e:
            log.warning("TLS files not reloaded, the current certificate stays: %s", one_line(e))
            return False
        self._context, self._pending = context, _grpc_configuration(material)
        log.info("TLS certificate reloaded from %s", self._files.cert)
        return True


@dataclass(frozen=True)
class _Material:
    """What the files hold, as parsed and written out again: grpc gets exactly what was checked."""

    chain: bytes
    key: bytes
    client_ca: bytes  # b"": no mTLS


@dataclass(frozen=True)
class _Files:
    cert: str
    key: str
    client_ca: str

    def stamp(self) -> _Stamp:
        return tuple(_stat(path) for path in (self.cert, self.key, self.client_ca) if path)

    def load(self) -> _Material:
        """The files parsed and checked together; StartupError naming the setting of the first bad one."""
        chain = _certificates("tls_cert", self.cert)
        key = _private_key(self.key)
        if _spki(key.public_key()) != _spki(chain[0].public_key()):
            raise StartupError(f"tls_key: {self.key} does not match the certificate in tls_cert ({self.cert})")
        if chain[0].not_valid_after_utc < datetime.now(UTC):
            log.warning("tls_cert: the certificate in %s expired on %s", self.cert, chain[0].not_valid_after_utc)
        return _Material(
            chain=_pem(chain),
            key=key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()),
            client_ca=_pem(_certificates("tls_client_ca", self.client_ca)) if self.client_ca else b"",
        )


def _grpc_configuration(material: _Material) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(material.key, material.chain)], root_certificates=material.client_ca or None
    )


def _ssl_context(files: _Files, material: _Material) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        # OpenSSL reads a chain and key from files only; a change since `load` shows in the next stamp.
        context.load_cert_chain(files.cert, files.key, password=_no_password)
        if material.client_ca:
            context.load_verify_locations(cadata=material.client_ca.decode("ascii"))
            context.verify_mode = ssl.CERT_REQUIRED
    except OSError as e:  # ssl.SSLError included
        raise StartupError(f"tls_cert, tls_key: OpenSSL cannot use them: {e.strerror or e}") from None
    return context


def _no_password() -> bytes:
    return b""  # OpenSSL would otherwise ask for one on the terminal; an encrypted key fails instead


def _stat(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def _read(setting: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise StartupError(f"{setting}: cannot read {path}: {e.strerror}") from e


# Parse errors are dropped (`from None`): messages name the setting and the path, never what the file holds.
def _certificates(setting: str, path: str) -> list[x509.Certificate]:
    data = _read(setting, path)
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise StartupError(f"{setting}: not a PEM certificate ({path})") from None


def _private_key(path: str) -> PrivateKeyTypes:
    data = _read("tls_key", path)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise StartupError(f"tls_key: the private key in {path} is encrypted; give it unencrypted") from None
    except (ValueError, UnsupportedAlgorithm):
        raise StartupError(f"tls_key: not a PEM private key ({path})") from None


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _pem(certificates: list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(Encoding.PEM) for c in certificates)
