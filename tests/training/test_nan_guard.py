"""A non-finite loss skips its optimizer step; too many in a row stop the run (real DeepSpeed, gloo)."""

from __future__ import annotations

import pytest
import torch

from mmscale.errors import UserError
from mmscale.monitor.timeline import read_attempts
from tests.helpers.in_process import Tap, tiny_recipe, train_in_process
from tests.helpers.wandb_log import offline_runs, records, summary


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


def test_too_many_nan_steps_in_a_row_stop_the_run_and_alert(world_of_one, demo_data, tmp_path, wandb_env, capsys):
    with pytest.raises(UserError, match=r"2 optimizer steps in a row, the last at step 5, had a non-finite"):
        _train(demo_data, tmp_path, {3, 4}, "train.max_bad_steps=2", "run.wandb.enabled=true")
    run_dir = tmp_path / "run"
    assert not (run_dir / "checkpoints" / "latest").exists()  # nothing saved from the bad state
    # The log says it in one line; the offline W&B run keeps the alert and why it ended.
    out = capsys.readouterr()
    assert "mmscale: run stopped: too many non-finite steps in a row after step 4: 2 optimizer steps" in out.out + out.err
    (wandb_file,) = offline_runs(run_dir)
    (alert,) = records(wandb_file, "alert")
    assert alert["level"] == "ERROR" and alert["title"] == "demo: run stopped: too many non-finite steps in a row after step 4"
    assert "train.max_bad_steps=2" in alert["text"]
    run = summary(wandb_file)
    assert run["state"] == "failed" and run["summary"]["ended"] == "bad_steps"
    assert "train.max_bad_steps=2" in run["summary"]["ended_why"] and run["summary"]["goodput"] == 0
    (attempt,) = read_attempts(run_dir)
    assert attempt.ended == "bad_steps" and attempt.last_step == 4 and attempt.saved == []
