"""A fleet on loopback for bench/replicas.py and tests/deploy/test_replicas.py: N `embedpool serve` replicas on one
shared Postgres, and real gRPC load balancers in front of them (Debian's nginx and HAProxy, HTTP/2 to the
replicas). Every process is started and stopped here; nothing outlives the `with` block.

The balancers are configured as an operator would for gRPC: nginx `grpc_pass` to an upstream that passes a
connection refused or a reset before the response on to the next replica (`grpc_next_upstream error`), HAProxy
`proto h2` with `retries`/`redispatch` and a fast TCP check. What they cannot hide (an RPC cut mid-way by a
SIGKILL) reaches the client as UNAVAILABLE, which embedpool's client retries.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from _chaos_server import ServerProcess

__all__ = ["Balancer", "Fleet", "HAProxy", "Nginx", "balancers", "free_port", "program"]

_START_TIMEOUT_S = 20.0


def free_port() -> int:
    """A port free on 127.0.0.1 now (the kernel's choice): fixed ports let a replica restart where it was."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def program(name: str, package: str) -> str:
    """The path of a system program, or a loud error naming the Debian package (`make system-deps` installs it)."""
    for found in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if found and Path(found).is_file():
            return found
    raise RuntimeError(f"{name} is not installed: `make system-deps` (or apt-get install {package}) provides it")


def _wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path, what: str) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}): {log.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{what} did not listen on {port} within {_START_TIMEOUT_S:.0f} s")


class Fleet:
    """`n` replicas on fixed loopback ports sharing the Postgres at `database_url`, started at once (each loads
    the model on its own). `flags` go to every replica (see ServerProcess)."""

    def __init__(self, n: int, root: Path, model_dir: Path, database_url: str, **flags: object) -> None:
        self.root = root
        self.model_dir = model_dir
        self.database_url = database_url
        self.flags = flags
        self.ports = [free_port() for _ in range(n)]
        self.replicas: list[ServerProcess | None] = [None] * n
        self.start(*range(n))

    def _start_one(self, i: int, errors: list[BaseException]) -> None:
        try:
            self.replicas[i] = ServerProcess(
                self.root / f"replica-{i}",
                self.model_dir,
                port=self.ports[i],
                database_url=self.database_url,
                **self.flags,
            )
        except BaseException as e:  # reported by start(), in the caller's thread
            errors.append(e)

    def start(self, *indices: int) -> float:
        """(Re)starts the given replicas concurrently on their ports; the seconds until all were serving."""
        began = time.monotonic()
        errors: list[BaseException] = []
        threads = [threading.Thread(target=self._start_one, args=(i, errors)) for i in indices]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            self.close()
            raise RuntimeError(f"{len(errors)} replica(s) failed to start: {errors[0]}") from errors[0]
        return time.monotonic() - began

    @property
    def targets(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.ports]

    def replica(self, i: int) -> ServerProcess:
        server = self.replicas[i]
        assert server is not None, f"replica {i} is not running"
        return server

    def close(self) -> None:
        for server in self.replicas:
            if server is not None:
                server.kill()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Balancer:
    """A load balancer process listening on 127.0.0.1:`port`, in front of `backends` ("host:port")."""

    name = ""

    def __init__(self, backends: Sequence[str], workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = workdir / "balancer.log"
        config = workdir / "balancer.conf"
        config.write_text(self.config(backends))
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(self.command(config), stdout=out, stderr=subprocess.STDOUT)
        _wait_listening(self.port, self.proc, self.log, self.name)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def config(self, backends: Sequence[str]) -> str:
        raise NotImplementedError

    def command(self, config: Path) -> list[str]:
        raise NotImplementedError

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Balancer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Nginx(Balancer):
    """nginx `grpc_pass` over cleartext HTTP/2, round robin. A replica that refuses or resets a connection is
    passed over for `fail_timeout`, and the request goes to the next one (safe: nothing was sent back yet)."""

    name = "nginx"

    def config(self, backends: Sequence[str]) -> str:
        w = self.workdir
        servers = "\n".join(f"        server {b} max_fails=1 fail_timeout=3s;" for b in backends)
        return f"""worker_processes 1;
daemon off;
pid {w}/nginx.pid;
error_log {w}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {w}/body;
    proxy_temp_path {w}/proxy;
    fastcgi_temp_path {w}/fastcgi;
    uwsgi_temp_path {w}/uwsgi;
    scgi_temp_path {w}/scgi;
    client_max_body_size 64m;
    upstream embedpool {{
{servers}
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{self.port} http2;
        location / {{
            grpc_pass grpc://embedpool;
            grpc_next_upstream error timeout http_502 http_503 non_idempotent;
            grpc_next_upstream_tries 3;
            grpc_connect_timeout 2s;
            grpc_read_timeout 120s;
            grpc_send_timeout 120s;
        }}
    }}
}}
"""

    def command(self, config: Path) -> list[str]:
        return [program("nginx", "nginx"), "-p", str(self.workdir), "-c", str(config), "-e", "stderr"]


class HAProxy(Balancer):
    """HAProxy in HTTP mode, h2 on both sides, round robin; a TCP check every 250 ms takes a dead replica out,
    `retries` + `redispatch` + `retry-on` send a request whose replica failed before answering to another one."""

    name = "haproxy"

    def config(self, backends: Sequence[str]) -> str:
        servers = "\n".join(
            f"    server r{i} {b} proto h2 check inter 250ms fall 1 rise 2" for i, b in enumerate(backends)
        )
        return f"""global
    maxconn 2048
    log stdout format raw local0 info
defaults
    mode http
    log global
    option httplog
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    retries 3
    option redispatch 1
    # L7 retries: a request whose replica died before answering (connection refused or reset, no response yet)
    # is sent again to another one from HAProxy's buffer; one that got part of an answer is not.
    retry-on all-retryable-errors
frontend grpc
    bind 127.0.0.1:{self.port} proto h2
    default_backend replicas
backend replicas
    balance roundrobin
{servers}
"""

    def command(self, config: Path) -> list[str]:
        return [program("haproxy", "haproxy"), "-db", "-f", str(config)]


@contextlib.contextmanager
def balancers(backends: Sequence[str], workdir: Path) -> Iterator[dict[str, Balancer]]:
    """nginx and HAProxy, both in front of the same replicas."""
    with Nginx(backends, workdir / "nginx") as nginx, HAProxy(backends, workdir / "haproxy") as haproxy:
        yield {"nginx": nginx, "haproxy": haproxy}
