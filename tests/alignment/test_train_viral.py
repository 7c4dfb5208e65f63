"""recipes/demo_viral.yaml end to end through the CLI and DeepSpeed: the loss terms reach the
metrics, the alignment rises, and the projector (never the teacher) is in the checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mmscale.training.distributed import free_port
from tests.helpers.outputs import logged_metrics
from tests.helpers.processes import run_command
from tests.helpers.recipes import REPO

RECIPE = str(REPO / "recipes" / "demo_viral.yaml")


def _module_state(run_dir: Path, step: int) -> dict:
    files = sorted((run_dir / "checkpoints" / f"step_{step:07d}").glob("*model_states.pt"))
    return torch.load(files[0], map_location="cpu", weights_only=False)["module"]


def test_demo_viral_logs_rising_alignment_and_checkpoints_the_head(tiny_overrides):
    run_dir = Path(tiny_overrides[-1].split("=", 1)[1])
    proc = run_command([sys.executable, "-m", "mmscale", "train", RECIPE, *tiny_overrides, "train.steps=20"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    train, val = logged_metrics(run_dir)
    assert all({"loss_lm", "loss_align", "align_cos"} <= r.keys() for r in train)
    for r in train:
        # Every demo sample has an image, so each term is the micro-batches' mean: loss = lm + 0.5 align.
        assert r["loss_align"] == pytest.approx(-r["align_cos"])
        assert r["loss"] == pytest.approx(r["loss_lm"] + 0.5 * r["loss_align"], rel=1e-5)
    assert train[-1]["align_cos"] > train[0]["align_cos"] + 0.2
    assert val and all("align_cos" not in r for r in val)
    state = _module_state(run_dir, 20)
    assert any(k.startswith("alignment_head.") for k in state)
    assert all(k.split(".")[0] in {"vision_tower", "connector", "language_model", "alignment_head"} for k in state)


@pytest.mark.slow
def test_two_ranks_under_zero3_with_packing_train_the_head(tiny_overrides):
    run_dir = Path(tiny_overrides[-1].split("=", 1)[1])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port())]
    proc = run_command([*torchrun, "-m", "mmscale", "train", RECIPE, *tiny_overrides, "train.zero_stage=3",
                 "data.pack=true", "train.steps=6"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    train, _ = logged_metrics(run_dir)
    assert all(r["align_cos"] is not None and -1 <= r["align_cos"] <= 1 for r in train)
    assert train[-1]["align_cos"] > train[0]["align_cos"]
