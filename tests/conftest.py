"""Pytest hooks and shared fixtures: a small demo corpus built once per session, a tiny recipe over it,
an offline W&B. The helpers test modules import live in tests/helpers/."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

# Importing tests.helpers sets DS_ACCELERATOR=cpu, before any test imports DeepSpeed.
from tests.helpers.recipes import TINY_DATA, TINY_OVERRIDES


def pytest_collection_modifyitems(config, items):
    """Tests marked `matrix` (the full matrix of tests/test_user_configurations.py) run only when
    the marker expression names them (`-m matrix`); the default run keeps a few of its cells."""
    if "matrix" in (config.option.markexpr or ""):
        return
    deselected = [item for item in items if item.get_closest_marker("matrix")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("matrix")]


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    from mmscale.demo.corpus import build_demo_dataset

    out = tmp_path_factory.mktemp("demo") / "data"
    build_demo_dataset(out, seed=0, **TINY_DATA)
    return out


@pytest.fixture
def tiny_overrides(demo_data, tmp_path) -> list[str]:
    """Overrides that turn recipes/demo.yaml into a seconds-long run on `demo_data`."""
    return TINY_OVERRIDES + [
        f"data.train={demo_data / 'train'}",
        f"data.val={demo_data / 'val'}",
        f"data.eval={demo_data / 'eval'}",
        f"data.tokenizer={demo_data / 'tokenizer'}",
        f"run.dir={tmp_path / 'run'}",
    ]


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Offline, silent, and with every W&B folder inside tmp_path; stops W&B's service afterwards."""
    import wandb

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home" / name.lower()))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    yield run_dir
    wandb.teardown()  # ends the wandb-core service process this test started
