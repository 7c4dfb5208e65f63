"""A non-finite loss skips its optimizer step; too many in a row stop the run (real DeepSpeed, gloo)."""

from __future__ import annotations

import pytest
import torch

from mmscale.errors import UserError
from tests.training.in_process import Tap, tiny_recipe, train_in_process


def _nan_pixels_at(steps: set[int]) -> Tap:
    """NaN pixels in the batches of the chosen (0-based) steps."""

    def tap(step: int, batch: dict) -> None:
        if step in steps:
            batch["pixel_values"] = torch.full_like(batch["pixel_values"], float("nan"))

    return tap


def _train(demo_data, tmp_path, poisoned: set[int], *overrides: str) -> list[dict]:
    recipe = tiny_recipe(demo_data, tmp_path / "run", *overrides)
    return train_in_process(recipe, lambda engine: _nan_pixels_at(poisoned))


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
