"""One version: Cargo.toml's, which the package metadata, `embedpool.__version__` and `--version` all report."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.version import Version

import embedpool
from embedpool import cli

ROOT = Path(__file__).resolve().parents[1]


def test_the_package_reports_cargo_tomls_version() -> None:
    cargo = tomllib.loads((ROOT / "Cargo.toml").read_text())["package"]["version"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"], "pyproject must take Cargo.toml's version"
    # Compared as PEP 440 versions: Cargo's 1.0.0-rc.1 is Python's 1.0.0rc1.
    assert Version(embedpool.__version__) == Version(cargo), "installed metadata is stale: `make install` rebuilds it"


def test_cli_prints_the_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        cli.main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out == f"embedpool {embedpool.__version__}\n"
