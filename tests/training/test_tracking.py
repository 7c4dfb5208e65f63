"""Experiment tracking: metrics.jsonl on rank 0, and offline W&B runs read back with W&B's own
reader of its transaction log (`wandb leet inspect --json`), not by looking inside its files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from mmscale.config import Recipe
from mmscale.errors import UserError
from mmscale.training.tracking import METRICS_FILE, WANDB_ID_FILE, Tracker, flatten
from tests.helpers.wandb_log import history as _history
from tests.helpers.wandb_log import offline_runs as _offline_runs
from tests.helpers.wandb_log import records as _records
from tests.helpers.wandb_log import summary as _summary

RECORDS = [
    {"step": 10, "loss": 2.5, "lr": 1e-4, "tokens_per_s": 1234.5, "skipped": {"too_long": 2, "bad_image": 1}},
    {"step": 10, "val_loss": 2.75},
    {"step": 20, "loss": 2.25, "lr": 2e-4, "tokens_per_s": 1300.0, "skipped": {"too_long": 3}},
]


def _recipe(enabled: bool = True, **wandb: object) -> Recipe:
    return Recipe.model_validate(
        {
            "data": {"train": "unused", "tokenizer": "unused"},
            "run": {"name": "tracking-test", "wandb": {"enabled": enabled, **wandb}},
            "train": {"lr": 3e-4, "steps": 500},
        }
    )


def test_flatten_nests_with_slashes():
    assert flatten({"step": 3, "skipped": {"too_long": 2, "x": {"y": 1}}}) == {
        "step": 3,
        "skipped/too_long": 2,
        "skipped/x/y": 1,
    }


def test_offline_run_holds_records_config_and_id(wandb_env: Path):
    recipe = _recipe(tags=["stage1", "viral"])
    with Tracker(recipe, wandb_env, rank=0) as tracker:
        for record in RECORDS:
            tracker.log(record)

    assert [json.loads(line) for line in (wandb_env / METRICS_FILE).read_text().splitlines()] == RECORDS
    run_id = (wandb_env / WANDB_ID_FILE).read_text().strip()
    [wandb_file] = _offline_runs(wandb_env)
    summary = _summary(wandb_file)
    assert summary["run_id"] == run_id
    assert (summary["project"], summary["name"], summary["tags"]) == ("mmscale", "tracking-test", ["stage1", "viral"])
    assert summary["state"] == "finished" and summary["exit_code"] == 0
    assert summary["config"]["train"]["lr"] == recipe.train.lr
    assert summary["config"]["run"]["wandb"]["tags"] == ["stage1", "viral"]

    rows = _history(wandb_file)
    assert [row["_step"] for row in rows] == [0, 1, 2]
    for row, record in zip(rows, RECORDS, strict=True):
        assert {k: row[k] for k in flatten(record)} == flatten(record)
    # Every chart's x-axis is the trainer's step, not W&B's row number.
    assert {"glob_name": "*", "step_metric": "step"}.items() <= next(
        m for m in _records(wandb_file, "metric") if "glob_name" in m
    ).items()


def test_resume_continues_the_run_and_never_steps_back(wandb_env: Path):
    with Tracker(_recipe(), wandb_env, rank=0) as tracker:
        for step in (10, 20, 30):
            tracker.log({"step": step, "loss": 1.0 / step})
    run_id = (wandb_env / WANDB_ID_FILE).read_text()

    # Resumed from the checkpoint of step 20 after step 30 was logged: steps 30 and 40 follow.
    resumed = [{"step": 30, "loss": 0.5}, {"step": 40, "loss": 0.25}]
    with Tracker(_recipe(), wandb_env, rank=0) as tracker:
        for record in resumed:
            tracker.log(record)

    assert (wandb_env / WANDB_ID_FILE).read_text() == run_id
    first, second = _offline_runs(wandb_env)
    assert _summary(second)["run_id"] == run_id.strip()
    rows = _history(second)
    assert [(row["_step"], row["step"], row["loss"]) for row in rows] == [(3, 30, 0.5), (4, 40, 0.25)]
    assert [row["_step"] for row in _history(first)] == [0, 1, 2]
    assert len((wandb_env / METRICS_FILE).read_text().splitlines()) == 5


def test_failure_marks_the_run_failed(wandb_env: Path):
    with pytest.raises(RuntimeError), Tracker(_recipe(), wandb_env, rank=0) as tracker:
        tracker.log(RECORDS[0])
        raise RuntimeError("a rank died")
    summary = _summary(_offline_runs(wandb_env)[0])
    assert summary["exit_code"] == 1
    assert summary["summary"]["loss"] == RECORDS[0]["loss"]


def test_only_rank_zero_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # other ranks must not even import wandb
    for rank in (0, 1):
        (tmp_path / str(rank)).mkdir()
        with Tracker(_recipe(enabled=rank != 0), tmp_path / str(rank), rank=rank) as tracker:
            for record in RECORDS:
                tracker.log(record)
    assert (tmp_path / "0" / METRICS_FILE).read_text() == "".join(json.dumps(r) + "\n" for r in RECORDS)
    assert list((tmp_path / "1").iterdir()) == []


def test_disabled_wandb_writes_no_wandb_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    tracker = Tracker(_recipe(enabled=False), tmp_path, rank=0)
    tracker.log(RECORDS[0])
    tracker.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [METRICS_FILE]


def test_missing_wandb_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` sees when it is not installed
    with pytest.raises(UserError, match="pip install wandb"):
        Tracker(_recipe(), tmp_path, rank=0)


def test_wandb_config_is_strict_and_defaults_to_offline():
    cfg = _recipe(enabled=False).run.wandb
    assert (cfg.enabled, cfg.mode, cfg.project, cfg.tags) == (False, "offline", "mmscale", ())
    with pytest.raises(ValueError, match="mode"):
        _recipe(mode="cloud")
    with pytest.raises(ValueError, match="projekt"):
        _recipe(projekt="x")


def test_a_dead_wandb_service_costs_wandb_not_the_run(wandb_env: Path):
    """SLURM's SIGTERM kills W&B's service with the job; logging must go on without it."""
    tracker = Tracker(_recipe(), wandb_env, rank=0)
    tracker.log({"step": 1, "loss": 1.0})

    class Dead:
        step = 0

        def log(self, *args, **kwargs):
            raise ConnectionResetError("service gone")

        def finish(self, *args, **kwargs):
            raise ConnectionResetError("service gone")

    real, tracker._wandb_run = tracker._wandb_run, Dead()
    with pytest.warns(UserWarning, match="W&B stopped working"):
        tracker.log({"step": 2, "loss": 0.5})
    tracker.log({"step": 3, "loss": 0.25})
    tracker.close()
    real.finish()
    assert [json.loads(line)["step"] for line in (wandb_env / METRICS_FILE).read_text().splitlines()] == [1, 2, 3]
