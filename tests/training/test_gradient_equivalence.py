"""One optimizer step's gradient does not depend on how the step is split: the same rows as
one micro-batch of 4, two accumulated micro-batches of 2, or one micro-batch of 2 on each of
2 ranks give the gradient of one token-weighted mean over all of them (mmscale.models.loss),
padded and packed, with and without VIRAL. Real trainer step, real DeepSpeed ZeRO-2 and ZeRO-3, fp32."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from deepspeed.utils import safe_get_full_grad

from mmscale.alignment import with_alignment
from mmscale.config import Recipe, load_recipe
from mmscale.data.collate import Collator
from mmscale.data.loader import build_dataloader
from mmscale.data.tokenizer import load_tokenizer
from mmscale.launch.ending import leave
from mmscale.models import build_model
from mmscale.models.loss import labelled_tokens
from mmscale.training import Trainer, build_engine, init_distributed, shutdown_distributed
from mmscale.training.budget import training_budget
from mmscale.training.distributed import free_port
from mmscale.training.freeze import freeze
from mmscale.training.tracking import Tracker
from tests.helpers.processes import one_rank_world
from tests.helpers.recipes import REPO, TINY_OVERRIDES

ROWS = 4
# (rows per micro-batch, micro-batches per step, ranks): three splits of the same four rows.
SPLITS = [(4, 1, 1), (2, 2, 1), (2, 1, 2)]
VARIANTS = {
    "padded": [],
    "packed": ["data.pack=true", "data.pack_len=192"],
    "padded+viral": ["model.alignment.enabled=true", "model.alignment.target=encoder"],
    "packed+viral": ["data.pack=true", "data.pack_len=192", "model.alignment.enabled=true",
                     "model.alignment.target=encoder"],
}
STAGES = (2, 3)  # ZeRO-2 reduces the gradients into partitions; ZeRO-3 also partitions the weights
TOLERANCE = 1e-6  # relative, per parameter


def _recipe(demo_data: Path, run_dir: Path, variant: str, micro_batch: int, accumulation: int, stage: int = 2) -> Recipe:
    return load_recipe(REPO / "recipes" / "demo.yaml", [
        *TINY_OVERRIDES, f"data.train={demo_data / 'train'}", f"data.val={demo_data / 'val'}",
        f"data.tokenizer={demo_data / 'tokenizer'}", "data.num_workers=0", f"run.dir={run_dir}",
        "train.trainable=finetune", f"train.zero_stage={stage}", "train.precision=fp32",
        f"train.micro_batch_size={micro_batch}", f"train.grad_accum={accumulation}", *VARIANTS[variant],
    ])


def step_rows(recipe: Recipe) -> list[dict]:
    """Four uncollated rows of the validation split (padded: one sample each; packed: packed
    rows), the two with the fewest labelled tokens first: a mean per micro-batch would weigh
    them as much as the two with the most."""
    tokenizer = load_tokenizer(recipe.data.tokenizer)
    loader = build_dataloader(recipe.data, recipe.model, tokenizer, split="val", batch_size=1, seed=0)
    rows = []
    for batch, _ in zip(loader, range(16)):
        meta = batch.pop("meta")
        row = {k: v[0] for k, v in batch.items() if k != "pixel_values"}
        rows.append({**row, "pixel_values": batch["pixel_values"], "samples": meta["samples"], "reader": (0, None)})
    rows.sort(key=lambda r: labelled_tokens(r["labels"][None]))
    return rows[:2] + rows[-2:]


def _model(recipe: Recipe) -> torch.nn.Module:
    tokenizer = load_tokenizer(recipe.data.tokenizer)
    torch.manual_seed(0)
    model = with_alignment(build_model(recipe.model, tokenizer), recipe.model)
    freeze(model, recipe.trainable_parts)
    return model


def trainer_gradients(recipe: Recipe, rows: list[dict], rank: int, world: int) -> dict[str, torch.Tensor]:
    """The full gradient of one `Trainer.train_step` over this rank's share of `rows`, taken
    where DeepSpeed has reduced it over micro-batches and ranks and not yet stepped."""
    pad = load_tokenizer(recipe.data.tokenizer).pad_token_id
    mine = rows[rank * len(rows) // world : (rank + 1) * len(rows) // world]
    size = recipe.train.micro_batch_size
    batches = [Collator(pad)([dict(r) for r in mine[i : i + size]]) for i in range(0, len(mine), size)]
    engine = build_engine(_model(recipe), recipe.train)
    grads: dict[str, torch.Tensor] = {}
    step = engine.step

    def capture_then_step() -> None:
        if engine.is_gradient_accumulation_boundary():
            for name, p in engine.module.named_parameters():
                if p.requires_grad:
                    grads[name] = safe_get_full_grad(p).detach().float().clone()
        step()

    engine.step = capture_then_step
    run_dir = Path(recipe.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with Tracker(recipe, run_dir, rank) as tracker:
        trainer = Trainer(recipe, engine, None, None, run_dir, training_budget(recipe), tracker)
        trainer.train_step(iter(batches))
    assert grads, "the step never reached its accumulation boundary"
    return grads


def autograd_gradients(recipe: Recipe, row_groups: list[list[dict]]) -> dict[str, torch.Tensor]:
    """Plain PyTorch: the gradient of the mean of each group's own mean loss."""
    model = _model(recipe).train()
    pad = load_tokenizer(recipe.data.tokenizer).pad_token_id
    for group in row_groups:
        batch = Collator(pad)([dict(r) for r in group])
        batch.pop("meta")
        (model(**batch) / len(row_groups)).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def relative_differences(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, float]:
    assert got.keys() == want.keys()
    return {name: float((got[name] - want[name]).norm() / want[name].norm().clamp_min(1e-30)) for name in want}


def overall_difference(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    flat = [torch.cat([g[name].flatten() for name in sorted(want)]) for g in (got, want)]
    return float((flat[0] - flat[1]).norm() / flat[1].norm())


def _two_ranks(rank: int, port: int, demo_data: Path, out: Path) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    init_distributed(timeout_s=120)
    for variant, stage in itertools.product(VARIANTS, STAGES):
        recipe = _recipe(demo_data, out / f"run-{variant}-{stage}", variant, 2, 1, stage)
        grads = trainer_gradients(recipe, torch.load(out / f"rows-{variant}.pt"), rank, 2)
        if rank == 0:
            torch.save(grads, out / f"grads-{variant}-{stage}.pt")
    shutdown_distributed()
    leave(0)  # as `mmscale train` ends a rank: without Python's finalization (see there why)


@pytest.fixture(scope="module")
def prepared(demo_data, tmp_path_factory) -> Path:
    """Each variant's rows (read here: a rank reads only its own shards) and their 2-rank gradients."""
    out = tmp_path_factory.mktemp("gradients")
    for variant in VARIANTS:
        torch.save(step_rows(_recipe(demo_data, out / "rows", variant, 4, 1)), out / f"rows-{variant}.pt")
    mp.spawn(_two_ranks, args=(free_port(), demo_data, out), nprocs=2, join=True)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_step_gradient_is_the_same_however_the_step_is_split(demo_data, tmp_path, prepared, variant):
    rows = torch.load(prepared / f"rows-{variant}.pt")
    reference = autograd_gradients(_recipe(demo_data, tmp_path / "ref", variant, 4, 1), [rows])
    # The rows differ enough that a mean per micro-batch would be another gradient.
    per_micro_batch = autograd_gradients(_recipe(demo_data, tmp_path / "ref", variant, 2, 2), [rows[:2], rows[2:]])
    assert overall_difference(per_micro_batch, reference) > 1e-2
    got = {}
    with one_rank_world():
        for (micro_batch, accumulation, _), stage in itertools.product(SPLITS[:2], STAGES):
            run_dir = tmp_path / f"run-{micro_batch}x{accumulation}-{stage}"
            recipe = _recipe(demo_data, run_dir, variant, micro_batch, accumulation, stage)
            got[f"{micro_batch}x{accumulation}, 1 rank, ZeRO-{stage}"] = trainer_gradients(recipe, rows, 0, 1)
    for stage in STAGES:
        got[f"2x1, 2 ranks, ZeRO-{stage}"] = torch.load(prepared / f"grads-{variant}-{stage}.pt")
    for split, grads in got.items():
        worst = max(relative_differences(grads, reference).items(), key=lambda kv: kv[1])
        print(f"{variant}, {split}: largest relative difference {worst[1]:.2e} ({worst[0]})")
        assert worst[1] <= TOLERANCE, (split, worst)
