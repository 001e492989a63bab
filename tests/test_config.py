"""Settings: flag > env var > default, validated once, and the README's table is the real one."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from embedpool import config
from embedpool.errors import InvalidArgument

README = Path(__file__).resolve().parents[1] / "README.md"


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    return parser.parse_args(argv)


def test_flag_beats_env_beats_default() -> None:
    env = {"EMBEDPOOL_PORT": "6000", "EMBEDPOOL_MAX_SEARCH_K": "50"}
    settings = config.load(_parse(["--port", "7000"]), env)
    assert (settings.port, settings.max_search_k, settings.host) == (7000, 50, "127.0.0.1")


def test_bad_values_are_refused_with_the_variable_named() -> None:
    with pytest.raises(InvalidArgument, match="EMBEDPOOL_PORT"):
        config.load(None, {"EMBEDPOOL_PORT": "many"})
    with pytest.raises(InvalidArgument, match="max_concurrent_inputs"):
        config.load(None, {"EMBEDPOOL_MAX_CONCURRENT_INPUTS": "0"})


def test_a_request_the_admission_budget_cannot_hold_is_refused_at_start() -> None:
    with pytest.raises(InvalidArgument, match="could never be admitted"):
        config.load(None, {"EMBEDPOOL_MAX_CONCURRENT_INPUTS": "100", "EMBEDPOOL_MAX_REQUEST_DOCUMENTS": "101"})
    with pytest.raises(InvalidArgument, match="could never be admitted"):
        config.load(None, {"EMBEDPOOL_MAX_CONCURRENT_CHARS": "1000", "EMBEDPOOL_MAX_REQUEST_BYTES": "1001"})


def test_matryoshka_dims_are_comma_separated_ints() -> None:
    assert config.Settings().matryoshka_dims == ()
    assert config.load(_parse(["--matryoshka-dims", "128,256,64"]), {}).matryoshka_dims == (256, 128, 64)
    assert config.load(None, {"EMBEDPOOL_MATRYOSHKA_DIMS": " 64, 128 ,64"}).matryoshka_dims == (128, 64)
    with pytest.raises(InvalidArgument, match=r"EMBEDPOOL_MATRYOSHKA_DIMS: .* comma-separated ints"):
        config.load(_parse(["--matryoshka-dims", "256;128"]), {})
    with pytest.raises(InvalidArgument, match="matryoshka_dims must each be >= 1"):
        config.load(None, {"EMBEDPOOL_MATRYOSHKA_DIMS": "128,0"})


def test_device_defaults_are_filled() -> None:
    cpu = config.Settings().resolved(cuda=False, cores=2)
    gpu = config.Settings().resolved(cuda=True, cores=16)
    assert (cpu.max_batch_tokens, cpu.max_batch_size, cpu.intra_op_threads) == (8192, 64, 2)
    assert (gpu.max_batch_tokens, gpu.max_batch_size) == (65536, 256)


def test_readme_lists_every_setting() -> None:
    between = re.search(r"<!-- settings-table -->\n(.*?)\n<!-- /settings-table -->", README.read_text(), re.S)
    assert between is not None, "README lost its <!-- settings-table --> ... <!-- /settings-table --> markers"
    assert between.group(1) == config.settings_table(), "README settings table is stale: `make readme`"
