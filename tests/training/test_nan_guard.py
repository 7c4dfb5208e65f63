"""A non-finite loss skips its optimizer step; too many in a row stop the run (real DeepSpeed, gloo)."""

from __future__ import annotations

import json

import pytest
import torch

from mmscale.config import load_recipe
from mmscale.data.loader import build_dataloader
from mmscale.data.tokenizer import load_tokenizer
from mmscale.errors import UserError
from mmscale.models import build_model
from mmscale.training import Trainer, build_engine
from mmscale.training.budget import training_budget
from mmscale.training.checkpoint import prepare_run_dir
from mmscale.training.tracking import Tracker
from tests.conftest import REPO, TINY_OVERRIDES


class Poisoned:
    """The real loader, with NaN pixels in the batches of the chosen (0-based) steps."""

    def __init__(self, loader, steps: set[int]):
        self.loader, self.steps, self.closed = loader, steps, False

    def __iter__(self):
        try:
            for step, batch in enumerate(self.loader):
                if step in self.steps:
                    batch["pixel_values"] = torch.full_like(batch["pixel_values"], float("nan"))
                yield batch
        finally:
            self.closed = True

    def __getattr__(self, name):
        return getattr(self.loader, name)


def _train(demo_data, tmp_path, poisoned: set[int], *overrides: str) -> list[dict]:
    recipe = load_recipe(REPO / "recipes" / "demo.yaml", [
        *TINY_OVERRIDES, f"data.train={demo_data / 'train'}", f"data.tokenizer={demo_data / 'tokenizer'}",
        "data.val=null", "data.num_workers=0", f"run.dir={tmp_path / 'run'}", "train.steps=8", "train.log_every=1",
        "train.checkpoint_every=0", *overrides,
    ])
    tok = load_tokenizer(recipe.data.tokenizer)
    loader = build_dataloader(recipe.data, recipe.model, tok, split="train", batch_size=4, seed=0)
    run_dir = tmp_path / "run"
    prepare_run_dir(run_dir, recipe)
    torch.manual_seed(0)
    engine = build_engine(build_model(recipe.model, tok), recipe.train)
    batches = Poisoned(loader, poisoned)
    try:
        with Tracker(recipe, run_dir, 0) as tracker:
            Trainer(recipe, engine, batches, None, run_dir, training_budget(recipe), tracker).train()
    finally:
        # The trainer closes its batch stream however it stops (loader workers ignore SIGTERM,
        # so a stream left open would make the process wait for them forever at exit).
        assert batches.closed
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_nan_step_is_skipped_and_the_next_ones_train(world_of_one, demo_data, tmp_path, capsys):
    records = _train(demo_data, tmp_path, {2})
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert records[2]["grad_norm"] is None and records[2]["loss"] is None  # no applied step in that window
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if r["step"] != 3)
    assert records[-1]["loss"] < records[0]["loss"]
    out = capsys.readouterr().out + capsys.readouterr().err
    assert "step 3: non-finite loss or gradient norm" in out and "demo-train-" in out  # names its samples


def test_too_many_nan_steps_in_a_row_stop_the_run(world_of_one, demo_data, tmp_path):
    with pytest.raises(UserError, match=r"2 optimizer steps in a row, the last at step 5, had a non-finite"):
        _train(demo_data, tmp_path, {3, 4}, "train.max_bad_steps=2")
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()  # nothing saved from the bad state
