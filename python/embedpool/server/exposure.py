"""Which listeners face the network, and the refusal to serve them unprotected without being told to.

On a loopback address only local processes reach a listener. Bound to any other address, gRPC and HTTP need
TLS or API keys (`--auth keys`), and /metrics (which has no keys) needs TLS; otherwise everyone on the network could
read every stored text and drop any collection. Serving so anyway needs `--insecure`, said explicitly, and
is warned about at every start. Keys without TLS are allowed but warned about: they cross the network in
plaintext.
"""

from __future__ import annotations

import ipaddress
import logging

from embedpool.config import Settings
from embedpool.errors import StartupError

__all__ = ["check_exposure", "is_loopback"]

log = logging.getLogger("embedpool.server")
_KEYED = ("gRPC", "HTTP")  # the listeners that check API keys


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback IP literals; any other name or address may be reached from outside."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings) -> None:
    """StartupError for a non-loopback listener without `insecure`; with it, a warning naming each one."""
    tls = bool(settings.tls_cert)
    exposed = [(what, host) for what, host in _listeners(settings) if not is_loopback(host)]
    unprotected = [(w, h) for w, h in exposed if not (tls or (w in _KEYED and settings.auth == "keys"))]
    if unprotected:
        names = ", ".join(f"{what} on {host}" for what, host in unprotected)
        if not settings.insecure:
            raise StartupError(
                f"refusing to serve {names} to the network with neither TLS nor API keys: bind to a loopback"
                " address, give --tls-cert/--tls-key (and --auth keys for gRPC and HTTP), or pass --insecure"
                " (EMBEDPOOL_INSECURE=1) to accept that anyone who reaches it can read and change every collection"
            )
        log.warning("INSECURE: serving %s with neither TLS nor API keys (--insecure)", names)
    if not tls and settings.auth == "keys" and any(what in _KEYED for what, _ in exposed):
        log.warning("API keys cross the network in plaintext: give --tls-cert and --tls-key")


def _listeners(settings: Settings) -> list[tuple[str, str]]:
    listeners = [("gRPC", settings.host)]
    if settings.http_port >= 0:
        listeners.append(("HTTP", settings.host))
    if settings.metrics_port >= 0:
        listeners.append(("/metrics", settings.metrics_host))
    return listeners
