"""Ownership of an embedded Postgres directory: one owner at a time, and only a verified postmaster that this
instance started is ever stopped or signalled."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from embedpool.errors import StartupError
from embedpool.store import EmbeddedPostgres


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    """A live process that is not a postmaster, for a postmaster.pid to name."""
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]) as proc:
        try:
            yield proc
        finally:
            proc.kill()


def _fake_pidfile(pgdata: Path, pid: int) -> None:
    """postmaster.pid as a running postmaster of `pgdata` writes it (pid, dir, start time, port, socket, ...)."""
    lines = [str(pid), str(pgdata), str(int(time.time())), "5432", str(pgdata), "", "0 0", "ready"]
    (pgdata / "postmaster.pid").write_text("\n".join(lines) + "\n")


def test_a_second_instance_is_refused_and_stops_nothing(postgres: EmbeddedPostgres) -> None:
    postmaster = (postgres.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
    intruder = EmbeddedPostgres(postgres.data_dir)
    with pytest.raises(StartupError, match=rf"in use by another embedpool server \(pid {os.getpid()}\)"):
        intruder.start()
    intruder.close()
    assert postgres.running
    assert (postgres.data_dir / "postmaster.pid").read_text().split("\n", 1)[0] == postmaster


def test_stop_never_signals_a_process_it_did_not_start(tmp_path: Path, bystander: subprocess.Popen[bytes]) -> None:
    pgdata = tmp_path / "pg"
    pgdata.mkdir()
    _fake_pidfile(pgdata, bystander.pid)
    pg = EmbeddedPostgres(pgdata)
    assert not pg.running  # the pid is alive, but it is no postmaster of this directory
    pg.stop()
    pg.close()
    with pytest.raises(subprocess.TimeoutExpired):
        bystander.wait(timeout=0.5)


def test_start_over_a_stale_pidfile_whose_pid_was_reused(
    postgres: EmbeddedPostgres, bystander: subprocess.Popen[bytes]
) -> None:
    uri = postgres.uri
    postgres.stop()
    try:
        _fake_pidfile(postgres.data_dir, bystander.pid)
        assert postgres.start() == uri
        assert postgres.running
        assert int((postgres.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]) != bystander.pid
    finally:
        if not postgres.running:
            (postgres.data_dir / "postmaster.pid").unlink(missing_ok=True)
            postgres.start()
    postgres.stop()
    postgres.start()
    with pytest.raises(subprocess.TimeoutExpired):
        bystander.wait(timeout=0.5)


def test_a_cluster_of_another_major_version_is_refused_before_anything_starts(tmp_path: Path) -> None:
    pgdata = tmp_path / "pg"
    pgdata.mkdir()
    (pgdata / "PG_VERSION").write_text("16\n")
    pg = EmbeddedPostgres(pgdata)
    with pytest.raises(StartupError, match="holds a PostgreSQL 16 cluster but embedpool runs PostgreSQL 18"):
        pg.start()
    pg.close()
    assert sorted(p.name for p in pgdata.iterdir()) == ["PG_VERSION"]


def test_a_postmaster_whose_owner_died_is_taken_over_and_stopped_at_close(tmp_path: Path) -> None:
    pgdata = tmp_path / "pg"
    owner = "import sys, time; from embedpool.store import EmbeddedPostgres; EmbeddedPostgres(sys.argv[1]).start();"
    owner += " print('up', flush=True); time.sleep(120)"
    with subprocess.Popen([sys.executable, "-c", owner, str(pgdata)], stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None and proc.stdout.readline() == "up\n"
        proc.kill()  # its lock goes with it; its postmaster does not
    orphan = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    pg = EmbeddedPostgres(pgdata)
    try:
        pg.start()
        assert int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0]) == orphan
    finally:
        pg.close()
    assert not pg.running
    assert not psutil.pid_exists(orphan) or psutil.Process(orphan).status() == psutil.STATUS_ZOMBIE
