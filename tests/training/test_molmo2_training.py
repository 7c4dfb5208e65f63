"""A Molmo2-style model (recipes/demo_molmo2.yaml, tiny) trains on the demo corpus: packed rows of
multi-crop images in one process, and on 2 ranks with ZeRO-2 and ZeRO-3, resuming exactly."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from mmscale.config import load_recipe
from mmscale.data.loader import build_dataloader
from mmscale.data.tokenizer import recipe_tokenizer
from mmscale.models import build_model
from mmscale.training.distributed import free_port
from tests.helpers.outputs import logged_metrics
from tests.helpers.processes import run_command
from tests.helpers.recipes import MOLMO2_OVERRIDES, REPO

RECIPE = REPO / "recipes" / "demo_molmo2.yaml"


def test_packed_batches_give_each_sample_its_own_logits(tiny_overrides):
    """The loader's packed rows (pooling tables re-indexed to the batch's crops, image tokens seeing
    each other only within their sample) give what each sample gives in an unpacked batch of its own."""
    recipe = load_recipe(RECIPE, [*tiny_overrides, *MOLMO2_OVERRIDES, "data.pack=true", "data.pack_len=192",
                                  "train.micro_batch_size=2"])
    tokenizer = recipe_tokenizer(recipe)
    torch.manual_seed(0)
    model = build_model(recipe.model, tokenizer).eval()
    packed = next(iter(build_dataloader(recipe.data, recipe.model, tokenizer, split="train", batch_size=2, seed=0)))
    assert packed["pixel_values"].shape[1:] == (3, 24, 24)
    assert len(packed["pixel_values"]) == 5 * sum(len(s[2]) for s in packed["meta"]["samples"])
    singles = recipe.model_copy(update={"data": recipe.data.model_copy(update={"pack": False})})
    loader = build_dataloader(singles.data, singles.model, tokenizer, split="train", batch_size=1, seed=0)
    ids = [s[0] for s in packed["meta"]["samples"]]
    alone = {}
    with torch.no_grad():
        logits = model.logits(**{k: v for k, v in packed.items() if k not in ("meta", "labels")})
        for batch, _ in zip(loader, range(96)):  # the tiny corpus's train split, one sample a batch
            (sample_id, _, _), = batch["meta"]["samples"]
            if sample_id in ids:
                alone[sample_id] = model.logits(**{k: v for k, v in batch.items() if k not in ("meta", "labels")})[0]
    segments = packed["segment_ids"]
    got = [logits[r][segments[r] == s] for r in range(len(segments)) for s in segments[r].unique() if s > 0]
    assert len(got) == len(ids) == len(alone)
    for sample_id, ours in zip(ids, got):
        torch.testing.assert_close(ours, alone[sample_id], atol=2e-5, rtol=0)

def test_trains_packed_in_one_process(tiny_overrides):
    run_dir = Path(tiny_overrides[-1].split("=", 1)[1])
    proc = run_command([sys.executable, "-m", "mmscale", "train", str(RECIPE), *tiny_overrides, *MOLMO2_OVERRIDES,
                 "data.pack=true", "data.pack_len=192", "train.micro_batch_size=2", "train.steps=8"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    train, val = logged_metrics(run_dir)
    assert len(val) >= 2 and val[-1]["val_loss"] < val[0]["val_loss"]
    assert all(r["samples_seen"] > 2 * r["step"] for r in train)  # rows carry several samples each
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000008"


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_resume_gives_the_uninterrupted_losses(tiny_overrides, stage):
    run_dir = Path(tiny_overrides[-1].split("=", 1)[1])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    command = [*torchrun, "-m", "mmscale", "train", str(RECIPE), *tiny_overrides, *MOLMO2_OVERRIDES,
               f"train.zero_stage={stage}", "train.precision=bf16", "data.pack=true", "data.pack_len=192",
               "train.micro_batch_size=2", "train.steps=8", "train.log_every=1", "train.val_every=0",
               "train.checkpoint_every=5"]
    first = run_command(command)
    assert first.returncode == 0, first.stderr[-3000:]
    train, _ = logged_metrics(run_dir)
    checkpoints = run_dir / "checkpoints"
    shutil.rmtree(checkpoints / "step_0000008")
    (checkpoints / "latest").write_text("step_0000005")
    command[command.index("--master_port") + 1] = str(free_port())
    resumed = run_command(command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = logged_metrics(run_dir)[0]
    assert [r["step"] for r in records] == list(range(1, 9))
    expected = [r for r in train if r["step"] > 5]
    for got, want in zip(records[5:], expected):
        assert (got["loss"], got["grad_norm"], got["tokens_seen"]) == (want["loss"], want["grad_norm"],
                                                                      want["tokens_seen"])
    assert train[-1]["loss"] < train[0]["loss"]
