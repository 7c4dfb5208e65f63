"""What a start in a run directory with checkpoints may change: mmscale.training.run_dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmscale.config import load_recipe
from mmscale.errors import UserError
from mmscale.training.checkpoint import checkpoint_dir
from mmscale.training.run_dir import prepare_run_dir
from tests.helpers.recipes import REPO

DEMO = REPO / "recipes" / "demo.yaml"


def _started(run_dir: Path, overrides: list[str] = ()) -> None:
    """A run directory whose run was started with demo.yaml and `overrides`, and saved once."""
    prepare_run_dir(run_dir, load_recipe(DEMO, [f"run.dir={run_dir}", *overrides]))
    (checkpoint_dir(run_dir) / "step_0000001").mkdir(parents=True)


@pytest.mark.parametrize("change", [
    ["model.llm.activation_checkpointing=true", "model.vision.activation_checkpointing=true"],  # after an OOM
    ["model.attention=sdpa"],
])
def test_memory_knobs_that_keep_the_maths_may_change(world_of_one, tmp_path, change):
    _started(tmp_path)
    prepare_run_dir(tmp_path, load_recipe(DEMO, [f"run.dir={tmp_path}", *change]))


def test_paths_may_move_to_another_cluster_and_the_recipe_records_where(world_of_one, tmp_path):
    _started(tmp_path)
    moved = ["data.train=/cluster2/demo/train", "data.val=/cluster2/demo/val", "data.tokenizer=/cluster2/tok"]
    prepare_run_dir(tmp_path, load_recipe(DEMO, [f"run.dir={tmp_path}", *moved]))
    assert load_recipe(tmp_path / "recipe.yaml").data.train == "/cluster2/demo/train"


def test_a_mixtures_shards_may_move_but_not_its_weights(world_of_one, tmp_path):
    _started(tmp_path, ["data.train=[{shards: a/train, weight: 1}, {shards: b/train, weight: 2}]"])
    moved = "data.train=[{shards: /x/a, weight: 1}, {shards: /x/b, weight: 2}]"
    prepare_run_dir(tmp_path, load_recipe(DEMO, [f"run.dir={tmp_path}", moved]))
    reweighted = "data.train=[{shards: /x/a, weight: 1}, {shards: /x/b, weight: 3}]"
    with pytest.raises(UserError, match="differs in data.train"):
        prepare_run_dir(tmp_path, load_recipe(DEMO, [f"run.dir={tmp_path}", reweighted]))


@pytest.mark.parametrize("change, key", [
    (["train.lr=3e-4"], "train.lr"),
    (["data.val=null"], "data.val"),  # a path may move, not vanish
    (["model.vision.hidden_size=64"], "model.vision.hidden_size"),
])
def test_what_changes_the_training_is_still_refused(world_of_one, tmp_path, change, key):
    _started(tmp_path)
    with pytest.raises(UserError, match=f"differs in {key}"):
        prepare_run_dir(tmp_path, load_recipe(DEMO, [f"run.dir={tmp_path}", *change]))


def test_a_run_an_earlier_version_started_resumes_with_the_same_recipe(world_of_one, tmp_path):
    """Its recipe.yaml has both archs' sections, every tower field and `alignment.layer: 0.5`
    (tests/config/earlier/); the same recipe of this version resumes it, and a changed one does not."""
    earlier = (REPO / "tests" / "config" / "earlier" / "demo_viral.yaml").read_text()
    (tmp_path / "recipe.yaml").write_text(earlier.replace("dir: runs/demo_viral", f"dir: {tmp_path}"))
    (checkpoint_dir(tmp_path) / "step_0000001").mkdir(parents=True)
    viral = REPO / "recipes" / "demo_viral.yaml"
    prepare_run_dir(tmp_path, load_recipe(viral, [f"run.dir={tmp_path}"]))
    with pytest.raises(UserError, match="differs in model.alignment.layer_fraction"):
        prepare_run_dir(tmp_path, load_recipe(viral, [f"run.dir={tmp_path}", "model.alignment.layer_fraction=0.25"]))
