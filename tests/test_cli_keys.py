"""`embedpool keys` as an operator runs it: a real process on the embedded Postgres, with no server running
(it starts the database for the command) and beside a running server (it connects to that server's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc

from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc

from .conftest import SettingsFactory, serving

KEYS = [sys.executable, "-m", "embedpool.cli", "keys"]


def _keys(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KEYS, *args], capture_output=True, text=True, timeout=120)


def test_create_list_revoke_without_a_server(tmp_path: Path) -> None:
    created = _keys("create", "--data-dir", str(tmp_path), "--tenant", "acme", "--role", "reader", "--note", "ci")
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    assert key["key"].startswith(f"ep_{key['id']}_") and "only this once" in created.stderr
    listed = _keys("list", "--data-dir", str(tmp_path))
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["id"], r["tenant"], r["role"], r["note"], r["revoked_at"]) for r in rows] == [
        (key["id"], "acme", "reader", "ci", None)
    ]
    assert key["key"].split("_", 2)[2] not in listed.stdout  # the secret is never shown again
    revoked = _keys("revoke", "--data-dir", str(tmp_path), key["id"])
    assert revoked.returncode == 0 and json.loads(revoked.stdout)["revoked_at"] is not None
    unknown = _keys("revoke", "--data-dir", str(tmp_path), "000000000000")
    assert unknown.returncode == 2 and unknown.stderr.strip() == "embedpool: no key '000000000000'"


def test_bad_arguments_are_one_line(tmp_path: Path) -> None:
    for args, expected in (
        (["--tenant", "Not A Tenant", "--role", "reader"], "tenant: 'Not A Tenant' is not a valid name"),
        (["--tenant", "acme", "--role", "reader", "--docs-per-s", "-1"], "docs_per_s must be a positive number"),
        (["--tenant", "acme", "--role", "reader", "--collections", "a/b"], "collections: a glob"),
    ):
        done = _keys("create", "--data-dir", str(tmp_path), *args)
        assert done.returncode == 2 and expected in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_a_key_made_beside_a_running_server_works_at_once(tmp_path: Path, make_settings: SettingsFactory) -> None:
    with serving(make_settings(tmp_path, auth="keys")) as running:
        created = _keys("create", "--data-dir", str(tmp_path), "--tenant", "acme", "--role", "admin")
        assert created.returncode == 0, created.stderr
        key = json.loads(created.stdout)["key"]
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.EmbedderStub(channel)
            info = stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=(("authorization", f"Bearer {key}"),))
            assert info.dim > 0
