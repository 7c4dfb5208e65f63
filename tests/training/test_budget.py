"""Training length by steps, samples or epochs (sized from shard manifests)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from mmscale.config import load_recipe
from mmscale.data.shards import manifest_samples, resolve_shards
from mmscale.errors import UserError
from mmscale.training.budget import Budget, training_budget
from tests.helpers.outputs import logged_metrics
from tests.helpers.processes import run_command
from tests.helpers.recipes import RECIPE, REPO, TINY_DATA


def _recipe(overrides: list[str], *extra: str):
    return load_recipe(REPO / "recipes" / "demo.yaml", [*overrides, *extra])


def test_epochs_are_sized_from_the_manifest(tiny_overrides):
    train = next(o for o in tiny_overrides if o.startswith("data.train=")).split("=", 1)[1]
    assert manifest_samples(resolve_shards(train, "data.train"), "k") == TINY_DATA["train_samples"]
    budget = training_budget(_recipe(tiny_overrides, "train.steps=null", "train.epochs=1.5"))
    assert budget == Budget("samples", int(1.5 * TINY_DATA["train_samples"]))
    assert training_budget(_recipe(tiny_overrides, "train.steps=null", "train.samples=7")) == Budget("samples", 7)
    assert training_budget(_recipe(tiny_overrides)) == Budget("steps", 6)


def test_epochs_without_a_manifest_or_over_a_mixture_are_refused(tiny_overrides, demo_data, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(next((demo_data / "train").glob("*.tar")), bare)
    with pytest.raises(UserError, match="no manifest.json lists .*set train.samples or train.steps"):
        training_budget(_recipe(tiny_overrides, f"data.train={bare}", "train.steps=null", "train.epochs=1"))
    mixture = f"data.train=[{{shards: {demo_data / 'train'}, weight: 1}}, {{shards: {demo_data / 'train'}, weight: 2}}]"
    with pytest.raises(UserError, match="epoch of a weighted mixture is not defined"):
        training_budget(_recipe(tiny_overrides, mixture, "train.steps=null", "train.epochs=1"))


def test_only_one_length_may_be_set(tiny_overrides):
    with pytest.raises(UserError, match="train.steps and train.samples are all set; set one .*train.samples=null"):
        _recipe(tiny_overrides, "train.samples=10")


def test_a_packed_run_by_epochs_stops_at_the_first_step_past_its_samples(tiny_overrides):
    run_dir = tiny_overrides[-1].split("=", 1)[1]
    target = TINY_DATA["train_samples"] // 2
    proc = run_command([
        sys.executable, "-m", "mmscale", "train", RECIPE, *tiny_overrides, "train.steps=null", "train.epochs=0.5",
        "data.pack=true", "data.pack_len=192", "data.pack_block=8", "train.micro_batch_size=1",
        "train.log_every=1", "train.val_every=0", "train.checkpoint_every=0",
    ])
    assert proc.returncode == 0, proc.stderr[-3000:]
    train, _ = logged_metrics(Path(run_dir))
    seen = [r["samples_seen"] for r in train]
    assert seen == sorted(set(seen)) and seen[-2] < target <= seen[-1]
    assert any(b - a > 1 for a, b in zip([0, *seen], seen))  # packed rows carry several samples
    lrs = [r["lr"] for r in train]
    assert lrs[:2] == pytest.approx([5e-4, 1e-3])  # warmup over 2 steps to the demo's 1e-3
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))  # then the cosine, following samples
    assert lrs[-1] < 0.5e-3
