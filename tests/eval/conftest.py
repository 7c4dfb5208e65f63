"""Eval shards for the tests, once per session (tests/helpers/eval_shards.py writes them): until the demo
has its own eval split, made from the demo's validation samples, one question and one answer each."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.eval_shards import write_eval_shards


@pytest.fixture(scope="session")
def eval_shards(demo_data, tmp_path_factory) -> Path:
    return write_eval_shards(demo_data / "val", tmp_path_factory.mktemp("eval") / "eval")
