"""The loss the trainer optimises and logs: one token-weighted mean per optimizer step (real
loader, DeepSpeed engine and Trainer, in process)."""

from __future__ import annotations

import pytest
import torch

from mmscale.data.loader import build_dataloader
from mmscale.data.tokenizer import IGNORE_INDEX, load_tokenizer
from mmscale.models import build_model
from mmscale.models.loss import labelled_tokens
from tests.helpers.in_process import tiny_recipe, train_in_process


def test_the_logged_loss_is_the_steps_token_weighted_mean(world_of_one, demo_data, tmp_path):
    recipe = tiny_recipe(demo_data, tmp_path / "run", "train.grad_accum=2", "train.steps=2", "train.warmup_steps=1")
    records = train_in_process(recipe, lambda engine: lambda step, batch: None)
    # The first step's two micro-batches, under the initial weights (train_in_process seeds them with 0).
    tokenizer = load_tokenizer(recipe.data.tokenizer)
    loader = build_dataloader(recipe.data, recipe.model, tokenizer, split="train",
                              batch_size=recipe.train.micro_batch_size, seed=recipe.run.seed)
    torch.manual_seed(0)
    model = build_model(recipe.model, tokenizer).train()
    sums, counts, means = [], [], []
    with torch.no_grad():
        for batch, _ in zip(loader, range(2)):
            batch.pop("meta")
            mean = model(**batch).item()
            counts.append(labelled_tokens(batch["labels"]))
            sums.append(mean * counts[-1])
            means.append(mean)
    weighted, unweighted = sum(sums) / sum(counts), sum(means) / 2
    assert abs(weighted - unweighted) > 1e-4 * weighted  # the batches tell the two apart
    assert records[0]["loss"] == pytest.approx(weighted, rel=1e-5)
    assert records[0]["loss"] != pytest.approx(unweighted, rel=1e-5)  # not the mean of the two means


def test_micro_batches_without_labelled_tokens_add_zero_and_are_no_bad_steps(world_of_one, demo_data, tmp_path):
    def unlabelled(batch_index: int, batch: dict) -> None:
        if batch_index in (2, 4, 5):  # one of step 2's two micro-batches, both of step 3's
            batch["labels"].fill_(IGNORE_INDEX)

    recipe = tiny_recipe(demo_data, tmp_path / "run", "train.grad_accum=2", "train.steps=4", "train.warmup_steps=1")
    records = train_in_process(recipe, lambda engine: unlabelled)
    assert [r["skipped_steps"] for r in records] == [0, 0, 0, 0]
    assert all(r["loss"] is not None and r["loss"] == r["loss"] for r in records)  # no NaN
    assert records[1]["loss"] > 0 and records[2]["loss"] == 0.0 and records[2]["grad_norm"] == 0.0
