"""The /metrics listener: prometheus_client's WSGI app on a thread-per-connection server, HTTPS when given TLS.

Not prometheus_client's `start_http_server`: with TLS it wraps the listening socket, so every handshake runs in
the accept loop (one client that connects and stays silent stalls every scrape) and its certificate is fixed
for the server's life. Here each connection is wrapped with the context current when it is accepted and
shakes hands in its own thread, so a rotated certificate serves the next scrape.
"""

from __future__ import annotations

import logging
import socket
import ssl
import sys
import threading
from collections.abc import Callable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app

__all__ = ["MetricsServer"]

log = logging.getLogger("embedpool.server")

# A connection that sends nothing (or never finishes its handshake) holds one thread for this long at most.
_IDLE_TIMEOUT_S = 10.0


class MetricsServer:
    """Serves /metrics on `host:port` from a daemon thread until `close()`; `tls` gives the context for each new
    connection (None: plain HTTP); `registry`: what it serves (this process's metrics by default). OSError when
    the address cannot be bound."""

    def __init__(
        self,
        host: str,
        port: int,
        tls: Callable[[], ssl.SSLContext] | None = None,
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        self._http = _Server((host, port), family, tls)
        self._http.set_app(make_wsgi_app(registry))
        self._thread = threading.Thread(target=self._http.serve_forever, name="metrics", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._http.server_port)

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(timeout=5)


class _Handler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged: a line every few seconds would drown the server's own."""


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in progress does not hold up the server's exit

    def __init__(
        self, address: tuple[str, int], family: socket.AddressFamily, tls: Callable[[], ssl.SSLContext] | None
    ) -> None:
        self.address_family = family
        self._tls = tls
        super().__init__(address, _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, address = super().get_request()
        conn.settimeout(_IDLE_TIMEOUT_S)
        if self._tls is None:
            return conn, address
        try:
            # The handshake happens on the first read, in the connection's thread, not here in the accept loop.
            return self._tls().wrap_socket(conn, server_side=True, do_handshake_on_connect=False), address
        except OSError:
            conn.close()
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):  # failed handshakes, plain HTTP to HTTPS, resets, timeouts
            log.debug("/metrics connection from %s failed", client_address, exc_info=True)
        else:
            log.exception("/metrics request from %s failed", client_address)
