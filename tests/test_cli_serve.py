"""`embedpool serve` as a user runs it: a real process, JSON logs, /metrics, and a clean drain on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import grpc
import psutil

from embedpool.engine import cpu_has_vnni
from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc


def _wait_ready(proc: subprocess.Popen[str]) -> dict[str, object]:
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("{"):
            entry = json.loads(line)
            if "port" in entry:
                return dict(entry)
    raise AssertionError(f"server exited before it was ready (code {proc.wait()})")


def test_serve_answers_exports_metrics_and_drains_on_sigterm(tmp_path: Path, model_dir: Path) -> None:
    cmd = [sys.executable, "-m", "embedpool.cli", "serve", "--port", "0", "--metrics-port", "0"]
    cmd += ["--data-dir", str(tmp_path), "--model", str(model_dir), "--variant", "int8", "--grace-seconds", "20"]
    env = {**os.environ, "EMBEDPOOL_LOG_FORMAT": "json"}
    with subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env) as proc:
        try:
            _serve_and_stop(proc, tmp_path)
        finally:
            if proc.poll() is None:
                proc.kill()


def _serve_and_stop(proc: subprocess.Popen[str], tmp_path: Path) -> None:
    ready = _wait_ready(proc)
    assert proc.stderr is not None
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the log pipe from filling up
    with grpc.insecure_channel(f"127.0.0.1:{ready['port']}") as channel:
        stub = pb_grpc.EmbedderStub(channel)
        info = stub.GetModelInfo(pb.GetModelInfoRequest())
        assert info.variant == ("int8" if cpu_has_vnni() else "fp32_opt")
        reply = stub.Embed(pb.EmbedRequest(documents=[pb.Document(text="hello world")]))
        assert reply.dim == 384 and len(reply.vectors[0]) == 4 * 384
        stub.CreateCollection(pb.CreateCollectionRequest(name="metrics"))
        for _ in range(2):
            stub.Embed(pb.EmbedRequest(collection="metrics", documents=[pb.Document(id="a", text="stored once")]))

        metrics = urllib.request.urlopen(f"http://127.0.0.1:{ready['metrics_port']}/metrics").read().decode()
        assert 'embedpool_rpc_duration_seconds_count{code="OK",method="Embed"}' in metrics
        assert "embedpool_batch_padding_efficiency" in metrics
        assert 'embedpool_store_documents_total{outcome="inserted"} 1.0' in metrics
        assert 'embedpool_store_documents_total{outcome="unchanged"} 1.0' in metrics
        assert "embedpool_store_write_duration_seconds_count 2.0" in metrics

        # A request in flight when SIGTERM arrives is still answered (drain), then the process exits.
        big = pb.EmbedRequest(documents=[pb.Document(text="drain me " * 50)] * 64)
        outcome: list[object] = []

        def call() -> None:
            try:
                outcome.append(stub.Embed(big, timeout=60))
            except grpc.RpcError as err:
                outcome.append(err)

        worker = threading.Thread(target=call)
        worker.start()
        threading.Event().wait(0.3)
        proc.send_signal(signal.SIGTERM)
        worker.join(60)
    assert outcome and isinstance(outcome[0], pb.EmbedResponse), outcome
    assert len(outcome[0].vectors) == 64
    assert proc.wait(timeout=60) == 0
    leftovers = [
        p for p in psutil.process_iter(["name", "cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])
    ]
    assert not leftovers, f"embedded Postgres still running: {leftovers}"
