"""Round robin over two replicas of one database, without a load balancer: SIGKILL one mid-run and no call
fails; the calls, and an Ingest stream that was open on the killed one, carry on on the survivor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from embedpool.client import Client, Document, IngestProgress, IngestSummary, RetryPolicy
from embedpool.server.app import Running

WAIT_S = 120
BATCH, AHEAD, DOCS = 16, 64, 160


@pytest.fixture
def victim(
    tmp_path_factory: pytest.TempPathFactory, model_dir: Path, server: Running
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """`embedpool serve` as a process of its own on the session server's database: the replica to kill."""
    data_dir = tmp_path_factory.mktemp("victim")
    cmd = [sys.executable, "-m", "embedpool.cli", "serve", "--port", "0", "--metrics-port", "-1"]
    cmd += ["--data-dir", str(data_dir), "--model", str(model_dir), "--database-url", server.database_url]
    cmd += ["--variant", "fp32", "--log-format", "json", "--grace-seconds", "1"]
    env = {**os.environ, "EMBEDPOOL_HTTP_PORT": "-1"}
    with subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env) as proc:
        try:
            yield f"127.0.0.1:{_ready_port(proc)}", proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def _ready_port(proc: subprocess.Popen[str]) -> int:
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("{") and '"port"' in line:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keeps the pipe from filling up
            return int(json.loads(line)["port"])
    raise AssertionError(f"the replica exited before it was ready: {''.join(lines[-10:])}")


def _embeds_answered() -> float:
    """Embed calls the in-process survivor has answered (it shares this process's metrics)."""
    labels = {"method": "Embed", "code": "OK"}
    return REGISTRY.get_sample_value("embedpool_rpc_duration_seconds_count", labels) or 0.0


class _Caller(threading.Thread):
    """Embed calls one after another until told to stop, counting successes and keeping failures."""

    def __init__(self, client: Client) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.ok = 0
        self.failures: list[BaseException] = []
        self.stop = threading.Event()
        self.progressed = threading.Condition()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.client.embed([f"call {self.ok} of the steady stream"])
            except Exception as e:
                self.failures.append(e)
            else:
                with self.progressed:
                    self.ok += 1
                    self.progressed.notify_all()

    def wait_for(self, calls: int) -> None:
        with self.progressed:
            assert self.progressed.wait_for(lambda: self.ok >= calls or bool(self.failures), WAIT_S), self.ok
        assert not self.failures, self.failures


def test_killing_a_replica_fails_no_call(victim: tuple[str, subprocess.Popen[str]], server: Running) -> None:
    target, proc = victim
    survivor = f"127.0.0.1:{server.port}"
    policy = RetryPolicy(cooldown=0.2)  # the dead replica is tried again, and refused, several times below
    killed, ahead_acknowledged = threading.Event(), threading.Event()

    def documents() -> Iterator[Document]:
        for i in range(DOCS):
            if i == AHEAD:  # the stream idles on the victim, every batch so far acknowledged, until it dies
                assert killed.wait(WAIT_S)
            yield Document(f"failover passage {i}", id=f"f{i}")

    def progress(report: IngestProgress) -> None:
        if report.acknowledged >= AHEAD:
            ahead_acknowledged.set()

    summaries: list[IngestSummary] = []
    with Client([target, survivor], retry=policy) as caller_client, Client([target, survivor], retry=policy) as loader:
        loader.create_collection("failover", exist_ok=True)
        # A fresh client starts at its first target: the stream opens on the victim.
        ingest = threading.Thread(
            target=lambda: summaries.append(
                loader.ingest("failover", documents(), batch_size=BATCH, progress=progress)
            ),
            daemon=True,
        )
        ingest.start()
        caller = _Caller(caller_client)
        caller.start()
        try:
            caller.wait_for(20)
            assert ahead_acknowledged.wait(WAIT_S)
            before_kill, answered = caller.ok, _embeds_answered()
            proc.send_signal(signal.SIGKILL)
            killed.set()
            caller.wait_for(before_kill + 60)
        finally:
            caller.stop.set()
            killed.set()
            caller.join(WAIT_S)
            ingest.join(WAIT_S)
        after_kill = caller.ok - before_kill
        assert caller.failures == []
        assert _embeds_answered() - answered >= after_kill  # every call since went to the survivor
        assert len(summaries) == 1, "the ingest did not finish"
        summary = summaries[0]
        assert (summary.documents, summary.inserted + summary.unchanged + summary.skipped_unchanged) == (DOCS, DOCS)
        assert summary.retries >= 1  # its stream was opened again, on the survivor
        assert loader.get_collection("failover").count == DOCS
