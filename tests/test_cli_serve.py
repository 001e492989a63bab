"""`embedpool serve` as a user runs it: a real process, JSON logs, /metrics, one server per data dir, start-up
failures in one line, a supervised embedded Postgres, and a clean drain on SIGTERM (cut short by a second one).

One server process serves the whole module; the last test stops it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from psycopg import sql

from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc

SERVE = [sys.executable, "-m", "embedpool.cli", "serve"]
ENV = {**os.environ, "EMBEDPOOL_LOG_FORMAT": "json"}
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Served:
    proc: subprocess.Popen[str]
    data_dir: Path
    port: int
    metrics_port: int
    log: list[str] = field(default_factory=list)  # stderr lines after the ready one, as they come
    logged: threading.Condition = field(default_factory=threading.Condition)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def postmaster(self) -> list[str]:
        """postmaster.pid: pid, data dir, start time, port, socket dir, ..."""
        return (self.data_dir / "pg" / "postmaster.pid").read_text().split("\n")

    def wait_for_log(self, text: str, timeout: float = 60) -> None:
        with self.logged:
            if not self.logged.wait_for(lambda: any(text in line for line in self.log), timeout):
                raise AssertionError(f"no log line with {text!r} in {timeout} s: {self.log[-5:]}")

    def read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:  # also keeps the pipe from filling up
            with self.logged:
                self.log.append(line)
                self.logged.notify_all()


def _wait_ready(proc: subprocess.Popen[str]) -> dict[str, object]:
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("{"):
            entry = json.loads(line)
            if "port" in entry:
                return dict(entry)
    raise AssertionError(f"server exited before it was ready (code {proc.wait()}): {''.join(lines[-10:])}")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Served]:
    data_dir = tmp_path_factory.mktemp("serve")
    cmd = [
        *SERVE,
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--http-port",
        "0",
        "--data-dir",
        str(data_dir),
        "--model",
        str(model_dir),
    ]
    cmd += ["--variant", "int8", "--grace-seconds", "60"]
    with subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=ENV) as proc:
        try:
            ready = _wait_ready(proc)
            served = Served(proc, data_dir, int(str(ready["port"])), int(str(ready["metrics_port"])))
            threading.Thread(target=served.read_log, daemon=True).start()
            yield served
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            _quit_leftover_postmaster(data_dir / "pg")


def _quit_leftover_postmaster(pgdata: Path) -> None:
    """After a failed test killed the server: its postmaster, verified as this directory's, shuts down."""
    try:
        proc = psutil.Process(int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0]))
        if proc.cmdline()[1:3] == ["-D", str(pgdata)]:
            proc.send_signal(signal.SIGQUIT)
    except (OSError, ValueError, psutil.Error):
        pass


def _serve_fails(*args: str, env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """Runs a server expected to fail at start-up: its exit code and its stderr lines that are not JSON logs."""
    done = subprocess.run([*SERVE, *args], capture_output=True, text=True, env=env or ENV, timeout=120)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, [line for line in done.stderr.splitlines() if not line.startswith("{")]


def test_serve_answers_and_exports_metrics(served: Served) -> None:
    with grpc.insecure_channel(served.target) as channel:
        stub = pb_grpc.EmbedderStub(channel)
        info = stub.GetModelInfo(pb.GetModelInfoRequest())
        assert info.variant == "int8"  # asked for (without VNNI the server warns that its vectors stray further)
        reply = stub.Embed(pb.EmbedRequest(documents=[pb.Document(text="hello world")]))
        assert reply.dim == 384 and len(reply.vectors[0]) == 4 * 384
        stub.CreateCollection(pb.CreateCollectionRequest(name="metrics"))
        for _ in range(2):
            stub.Embed(pb.EmbedRequest(collection="metrics", documents=[pb.Document(id="a", text="stored once")]))

    metrics = urllib.request.urlopen(f"http://127.0.0.1:{served.metrics_port}/metrics").read().decode()
    assert 'embedpool_rpc_duration_seconds_count{code="OK",method="Embed"}' in metrics
    assert "embedpool_batch_padding_efficiency" in metrics
    assert 'embedpool_store_documents_total{outcome="inserted"} 1.0' in metrics
    assert 'embedpool_store_documents_total{outcome="unchanged"} 1.0' in metrics
    assert "embedpool_store_write_duration_seconds_count 2.0" in metrics


def test_a_second_server_on_the_same_data_dir_exits_at_once_naming_the_owner(served: Served) -> None:
    postmaster = served.postmaster()
    # With free ports it once served on the first one's Postgres; with the first one's metrics port it died on
    # it. Either way it stopped that Postgres on its way out.
    for metrics_port in (0, served.metrics_port):
        code, lines = _serve_fails(
            "--port", "0", "--metrics-port", str(metrics_port), "--http-port", "0", "--data-dir", str(served.data_dir)
        )
        assert code == 2
        assert lines == [
            f"embedpool: data directory {served.data_dir} is in use by another embedpool server"
            f" (pid {served.proc.pid}): stop it, or give this one another data directory"
        ]
    assert served.postmaster() == postmaster
    assert psutil.pid_exists(int(postmaster[0]))
    assert (served.data_dir / "pg.lock").read_text() == f"{served.proc.pid}\n"
    with grpc.insecure_channel(served.target) as channel:
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status == SERVING
        pb_grpc.EmbedderStub(channel).ListCollections(pb.ListCollectionsRequest(), timeout=10)


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


@pytest.fixture
def database_without_pgvector(served: Served) -> str:
    """A database on the served Postgres whose sessions find no extensions to install (PostgreSQL 18's
    extension_control_path), standing in for an external Postgres without pgvector."""
    lines = served.postmaster()
    admin = f"postgresql://postgres@/postgres?host={lines[4]}&port={lines[3]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = 'novector'").fetchone() is None:
            conn.execute("CREATE DATABASE novector")
        conn.execute(
            sql.SQL("ALTER DATABASE novector SET extension_control_path = {}").format(
                sql.Literal(str(served.data_dir / "no-extensions"))
            )
        )
    return admin.replace("/postgres?", "/novector?")


@pytest.mark.parametrize(
    "case",
    ["grpc-port", "metrics-port", "model-dir", "data-dir", "postgres-version", "external-pgvector", "exposed"],
)
def test_start_up_failures_end_in_one_line(
    case: str, tmp_path: Path, model_dir: Path, busy_port: int, request: pytest.FixtureRequest
) -> None:
    data_dir = tmp_path / "data"
    args = {
        "--port": "0",
        "--metrics-port": "0",
        "--http-port": "0",
        "--data-dir": str(data_dir),
        "--model": str(model_dir),
    }
    env = ENV
    if case == "grpc-port":
        args["--port"] = str(busy_port)
        expected = f"cannot listen on 127.0.0.1:{busy_port} for gRPC: Address already in use"
    elif case == "metrics-port":
        args["--metrics-port"] = str(busy_port)
        expected = f"cannot listen on 127.0.0.1:{busy_port} for /metrics: Address already in use"
    elif case == "exposed":
        args["--host"] = "0.0.0.0"
        expected = "refusing to serve gRPC on 0.0.0.0, HTTP on 0.0.0.0 to the network with neither TLS nor API keys"
    elif case == "model-dir":
        args["--model"] = str(tmp_path / "no-such-model")
        expected = f"model directory not found: {tmp_path / 'no-such-model'}"
    elif case == "data-dir":
        data_dir.write_text("a file, not a directory\n")
        expected = f"data directory {data_dir} is not a directory"
    elif case == "postgres-version":
        (data_dir / "pg").mkdir(parents=True)
        (data_dir / "pg" / "PG_VERSION").write_text("16\n")
        expected = f"{data_dir / 'pg'} holds a PostgreSQL 16 cluster but embedpool runs PostgreSQL 18"
    else:
        env = {**ENV, "EMBEDPOOL_DATABASE_URL": request.getfixturevalue("database_without_pgvector")}
        expected = "has no pgvector extension: install pgvector on that Postgres server"
    code, lines = _serve_fails(*(item for pair in args.items() for item in pair), env=env)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("embedpool: ") and expected in lines[0], lines
    if case != "data-dir":
        assert not (data_dir / "pg" / "postmaster.pid").exists()  # found wrong before any Postgres started


def test_a_killed_postgres_is_restarted_and_health_follows_it(served: Served) -> None:
    killed = int(served.postmaster()[0])
    statuses: list[int] = []
    with grpc.insecure_channel(served.target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=90)
        statuses.append(next(watch).status)
        os.kill(killed, signal.SIGKILL)
        for reply in watch:  # every change, in order, until the database answers again
            statuses.append(reply.status)
            if reply.status == SERVING:
                watch.cancel()
                break
        assert statuses == [SERVING, NOT_SERVING, SERVING]
        assert int(served.postmaster()[0]) != killed
        stub = pb_grpc.EmbedderStub(channel)
        stub.CreateCollection(pb.CreateCollectionRequest(name="after-restart"), timeout=30)
        stub.Embed(pb.EmbedRequest(collection="after-restart", documents=[pb.Document(id="a", text="back")]))
        assert stub.GetCollection(pb.GetCollectionRequest(name="after-restart")).count == 1


def test_sigterm_drains_and_a_second_one_cuts_the_drain_short(served: Served) -> None:
    """Last: it stops the server. The first SIGTERM lets a request in flight finish and ends an open Ingest
    stream at once with UNAVAILABLE (its client resumes elsewhere instead of holding the 60 s grace); a second
    SIGTERM cuts the rest of the drain short, and Postgres still stops cleanly."""
    release = threading.Event()

    def batches() -> Iterator[pb.IngestRequest]:
        yield pb.IngestRequest(collection="drain", batch_id=1, documents=[pb.Document(id="a", text="first")])
        release.wait(120)

    outcome: list[object] = []
    with grpc.insecure_channel(served.target) as channel:
        stub = pb_grpc.EmbedderStub(channel)
        stub.CreateCollection(pb.CreateCollectionRequest(name="drain"))
        acks = stub.Ingest(batches())
        assert next(acks).batch_id == 1  # type: ignore[call-overload]  # grpc-stubs lacks CallIterator.__next__

        big = pb.EmbedRequest(documents=[pb.Document(text="drain me " * 50)] * 64)

        def call() -> None:
            try:
                outcome.append(stub.Embed(big, timeout=60))
            except grpc.RpcError as err:
                outcome.append(err)

        worker = threading.Thread(target=call)
        worker.start()
        threading.Event().wait(0.3)
        served.proc.send_signal(signal.SIGTERM)
        worker.join(60)
        served.wait_for_log('"draining')
        with pytest.raises(grpc.RpcError) as ended:
            next(acks)  # type: ignore[call-overload]  # grpc-stubs lacks CallIterator.__next__
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "resend from the batch after the last acknowledged one" in (ended.value.details() or "")
        release.set()
        started = time.monotonic()
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(timeout=30) == 0
        assert time.monotonic() - started < 30
    assert outcome and isinstance(outcome[0], pb.EmbedResponse), outcome
    assert len(outcome[0].vectors) == 64
    pg_log = (served.data_dir / "pg" / "log").read_text().splitlines()
    assert "database system is shut down" in pg_log[-1]
    leftovers = [
        p for p in psutil.process_iter(["name", "cmdline"]) if str(served.data_dir) in " ".join(p.info["cmdline"] or [])
    ]
    assert not leftovers, f"embedded Postgres still running: {leftovers}"
