"""`embedpool serve --workers 2`: two serving processes on one port (SO_REUSEPORT) under a supervisor that owns the
embedded Postgres and serves their merged /metrics. Real processes throughout: the kernel spreads connections
over both workers, a SIGKILLed worker leaves the other serving and is started again, SIGTERM drains both."""

from __future__ import annotations

import collections
import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil
import pytest

from embedpool.client import Client
from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(300)

# Per worker. 64-document calls are bulk work, which may hold only 3/4 of it (pool.admission): 768 leaves room for
# all eight draining calls below (512 documents) even if the kernel hashes all their connections to one worker.
CAPACITY = 1024


class Supervised:
    """`embedpool serve --workers 2` on free ports; ready once the supervisor's own "serving" line is logged."""

    def __init__(self, data_dir: Path, model_dir: Path) -> None:
        self.data_dir = data_dir
        cmd = [sys.executable, "-m", "embedpool.cli", "serve", "--workers", "2", "--data-dir", str(data_dir)]
        cmd += ["--model", str(model_dir), "--port", "0", "--http-port", "-1", "--metrics-port", "0"]
        cmd += ["--max-concurrent-inputs", str(CAPACITY), "--max-request-documents", "256"]
        cmd += ["--log-format", "json", "--grace-seconds", "30"]  # drains on a loaded 2-core machine
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        self.log: collections.deque[str] = collections.deque(maxlen=500)
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 180
        for line in self.proc.stderr:
            self.log.append(line)
            if "workers (supervisor pid" in line:
                entry = json.loads(line)
                self.port, self.metrics_port = int(entry["port"]), int(entry["metrics_port"])
                break
            if time.monotonic() > deadline:
                break
        else:
            raise AssertionError(f"the supervisor exited ({self.proc.poll()}): {''.join(self.log)}")
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self._drainer.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def workers(self) -> list[psutil.Process]:
        """The serving children (multiprocessing's resource tracker is a child too, and is not one)."""
        return [
            child
            for child in psutil.Process(self.proc.pid).children()
            if "spawn_main" in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE
        ]

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        sums: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                series, _, value = line.rpartition(" ")
                name = series.partition("{")[0]  # summed over labels (the pool's metrics carry the model's)
                sums[name] = sums.get(name, 0.0) + float(value)
        return sums

    def close(self) -> None:
        workers = self.workers() if self.proc.poll() is None else []
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for worker in workers:  # they follow the supervisor out (see the test below); stragglers are killed
            with contextlib.suppress(psutil.Error):
                worker.wait(30)
            with contextlib.suppress(psutil.Error):
                worker.kill()
        self._drainer.join(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        for child in psutil.process_iter(["cmdline"]):
            if str(self.data_dir) in " ".join(child.info["cmdline"] or []):
                child.kill()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Supervised]:
    """Shared by the tests in file order; the last one stops it with SIGTERM."""
    server = Supervised(tmp_path_factory.mktemp("workers") / "data", model_dir)
    try:
        yield server
    finally:
        server.close()


def _embed_on_a_new_connection(target: str, i: int) -> int:
    # A local subchannel pool: grpc would otherwise share one connection among the process's channels.
    with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        reply = pb_grpc.EmbedderStub(channel).Embed(
            pb.EmbedRequest(documents=[pb.Document(text=f"connection {i} sends document {j}") for j in range(8)]),
            timeout=60,
        )
    return len(reply.vectors)


def test_two_workers_share_the_connections_and_one_metrics_endpoint_merges_them(served: Supervised) -> None:
    workers = served.workers()
    assert len(workers) == 2
    cpu_before = {w.pid: w.cpu_times().user + w.cpu_times().system for w in workers}
    documents_before = served.metrics().get("embedpool_documents_total", 0.0)
    with ThreadPoolExecutor(4) as pool:
        embedded = sum(pool.map(lambda i: _embed_on_a_new_connection(served.target, i), range(60)))
    assert embedded == 480
    # The kernel hashes each new connection to one of the two listeners: both did work.
    cpu_used = {w.pid: w.cpu_times().user + w.cpu_times().system - cpu_before[w.pid] for w in workers}
    assert all(used > 0.1 for used in cpu_used.values()), cpu_used
    merged = served.metrics()
    assert merged["embedpool_documents_total"] - documents_before == 480
    assert merged["embedpool_permits_capacity"] == 2 * CAPACITY  # livesum over the live workers
    assert merged["embedpool_sessions_in_rotation"] == 2
    assert merged["embedpool_ready"] == 1


def test_a_sigkilled_worker_leaves_the_other_serving_and_is_started_again(served: Supervised) -> None:
    victim = served.workers()[0]
    victim.kill()
    victim.wait(10)
    with Client(served.target, timeout=60) as client:  # retries what reached the dead worker's listener
        for i in range(20):
            assert client.embed([f"while one worker is down {i}"]).shape == (1, 384)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        pids = {w.pid for w in served.workers()}
        if len(pids) == 2 and victim.pid not in pids and served.metrics()["embedpool_sessions_in_rotation"] == 2:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"the worker was not started again: {list(served.log)[-10:]}")
    assert served.metrics()["embedpool_permits_capacity"] == 2 * CAPACITY  # the dead one's gauges left the sum
    assert any("exited with -9; starting it again" in line for line in served.log)


def test_sigterm_drains_both_workers_then_stops_postgres(served: Supervised) -> None:
    """Calls in flight on both workers when the supervisor gets SIGTERM all complete; the supervisor exits 0 and
    leaves no Postgres behind. (8 x 64 documents: admitted even if all land on one worker.)"""
    results: list[int | str] = []
    started = threading.Barrier(9)

    def call(i: int) -> None:
        with grpc.insecure_channel(served.target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            stub = pb_grpc.EmbedderStub(channel)
            stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)  # connected before the signal
            started.wait(30)
            request = pb.EmbedRequest(documents=[pb.Document(text=f"draining {i} {j} " * 10) for j in range(64)])
            try:
                results.append(len(stub.Embed(request, timeout=60).vectors))
            except grpc.RpcError as e:
                results.append(str(e.code()))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    started.wait(30)
    # All eight admitted (the workers' permits, merged): a call that only arrives once draining has begun is
    # rightly refused with UNAVAILABLE, for its client to send elsewhere.
    deadline = time.monotonic() + 30
    while served.metrics()["embedpool_permits_in_use"] < 8 * 64:
        assert time.monotonic() < deadline, "the calls were not all admitted"
        time.sleep(0.02)
    served.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(90)
    assert served.proc.wait(60) == 0
    assert results == [64] * 8
    assert any("stopping: draining to every worker" in line for line in served.log)
    leftovers = [
        p.pid for p in psutil.process_iter(["cmdline"]) if str(served.data_dir) in " ".join(p.info["cmdline"] or [])
    ]
    assert not leftovers, "Postgres (or a worker) outlived the supervisor"


def test_workers_on_cpu_share_the_cores_instead_of_each_taking_all() -> None:
    from embedpool.config import Settings
    from embedpool.server.workers import _share_cores

    shared = _share_cores(Settings(workers=2, device="cpu", sessions_per_device=1))
    assert shared.intra_op_threads == max(1, (psutil.cpu_count() or 1) // 2)
    assert _share_cores(Settings(workers=2, device="cpu", intra_op_threads=3)).intra_op_threads == 3  # as asked
    assert _share_cores(Settings(workers=2, device="cuda")).intra_op_threads == 0  # the GPU default, resolved later


def test_workers_follow_a_sigkilled_supervisor_out(tmp_path: Path, model_dir: Path) -> None:
    """No worker serves on without its supervisor (its Postgres, /metrics, restarts gone): they drain and exit."""
    server = Supervised(tmp_path / "data", model_dir)
    try:
        workers = server.workers()
        assert len(workers) == 2
        server.proc.kill()
        server.proc.wait()
        _, alive = psutil.wait_procs(workers, timeout=60)
        assert not alive, f"workers outlived the supervisor: {[p.pid for p in alive]}"
    finally:
        server.close()
