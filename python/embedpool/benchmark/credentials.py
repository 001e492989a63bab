"""The client flags (`--api-key`, `--tls-ca`, `--tls-cert`, `--tls-key`) for the HTTP connections a run opens:
/v1/embeddings and /metrics. The same rules as the gRPC channel's (embedpool.channel): a key travels only over
TLS or to a loopback address, mTLS needs the server's CA."""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from embedpool.errors import InvalidArgument

__all__ = ["Credentials", "is_loopback"]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class Credentials:
    api_key: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""

    def _ssl_context(self) -> ssl.SSLContext | None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise InvalidArgument("--tls-cert and --tls-key go together: give both or neither")
        if self.tls_cert and not self.tls_ca:
            raise InvalidArgument("--tls-cert (mTLS) needs --tls-ca, the CA that signed the server's certificate")
        if not self.tls_ca:
            return None
        try:
            context = ssl.create_default_context(cafile=self.tls_ca)
            if self.tls_cert:
                context.load_cert_chain(self.tls_cert, self.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise InvalidArgument(f"--tls-ca/--tls-cert/--tls-key: {exc}") from None
        return context

    def http_client(self, base_url: str, *, connections: int, timeout: float | None) -> httpx.AsyncClient:
        """An HTTP client of `base_url` holding up to `connections` connections, with the key on every request."""
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidArgument(f"{base_url!r}: expected http://host:port or https://host:port")
        if self.api_key and parts.scheme != "https" and not is_loopback(parts.hostname):
            raise InvalidArgument(f"--api-key: not sent in plaintext to {parts.hostname}; use https:// and --tls-ca")
        context = self._ssl_context()
        headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        return httpx.AsyncClient(
            base_url=base_url,
            headers=headers,
            limits=limits,
            timeout=timeout,
            verify=context if context is not None else True,
        )
