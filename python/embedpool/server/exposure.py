"""Which listeners face the network, and the refusal to serve plaintext there without being told to.

The server has no TLS and no credentials yet: on a loopback address only local processes reach it, but bound
to any other address everyone on the network can read every stored text and drop any collection. So such a
bind needs `--insecure`, said explicitly, and is warned about at every start.
"""

from __future__ import annotations

import ipaddress
import logging

from embedpool.config import Settings
from embedpool.errors import StartupError

__all__ = ["check_exposure", "is_loopback"]

log = logging.getLogger("embedpool.server")


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
    exposed = [(what, host) for what, host in _listeners(settings) if not is_loopback(host)]
    if not exposed:
        return
    names = ", ".join(f"{what} on {host}" for what, host in exposed)
    if not settings.insecure:
        raise StartupError(
            f"refusing to serve {names} in plaintext to the network without credentials: bind to a loopback"
            " address, or pass --insecure (EMBEDPOOL_INSECURE=1) to accept that anyone who reaches it can read"
            " and change every collection"
        )
    log.warning("INSECURE: serving %s in plaintext without credentials (--insecure)", names)


def _listeners(settings: Settings) -> list[tuple[str, str]]:
    listeners = [("gRPC", settings.host)]
    if settings.metrics_port >= 0:
        listeners.append(("/metrics", settings.metrics_host))
    return listeners
