"""Real training inside the test process (in tests.helpers.processes.one_rank_world): the real loader,
DeepSpeed engine, Trainer and metrics, with a tap that sees (and may change) each batch before
the trainer does.

Shared by the NaN-guard tests (tests/training/test_nan_guard.py) and the non-finite reliability
scenario (tests/reliability/test_nonfinite.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import deepspeed
import torch

from mmscale.config import Recipe, load_recipe
from mmscale.data.loader import build_dataloader
from mmscale.data.stream import StatefulLoader
from mmscale.data.tokenizer import load_tokenizer
from mmscale.models import build_model
from mmscale.training import Trainer, build_engine
from mmscale.training.budget import training_budget
from mmscale.training.run_dir import prepare_run_dir
from mmscale.training.tracking import Tracker
from tests.helpers.recipes import REPO, TINY_OVERRIDES

# Called with each batch and its 0-based step (one micro-batch per step) before the trainer gets it.
Tap = Callable[[int, dict], None]


def tiny_recipe(demo_data: Path, run_dir: Path, *overrides: str) -> Recipe:
    """The tiny demo recipe for 8 steps, logged every step, without validation, checkpoints or workers."""
    return load_recipe(REPO / "recipes" / "demo.yaml", [
        *TINY_OVERRIDES, f"data.train={demo_data / 'train'}", f"data.tokenizer={demo_data / 'tokenizer'}",
        "data.val=null", "data.num_workers=0", f"run.dir={run_dir}", "train.steps=8", "train.log_every=1",
        "train.checkpoint_every=0", *overrides,
    ])


class Tapped:
    """The real loader, with `tap` called on each batch."""

    def __init__(self, loader: StatefulLoader, tap: Tap):
        self.loader, self.tap, self.closed = loader, tap, False

    def __iter__(self) -> Iterator[dict]:
        try:
            for step, batch in enumerate(self.loader):
                self.tap(step, batch)
                yield batch
        finally:
            self.closed = True

    def __getattr__(self, name: str):
        return getattr(self.loader, name)


def train_in_process(recipe: Recipe, tap_for: Callable[[deepspeed.DeepSpeedEngine], Tap]) -> list[dict]:
    """Train `recipe` with the batches tapped by `tap_for(engine)`; returns the metrics records."""
    tok = load_tokenizer(recipe.data.tokenizer)
    loader = build_dataloader(recipe.data, recipe.model, tok, split="train", batch_size=recipe.train.micro_batch_size,
                              seed=recipe.run.seed)
    run_dir = Path(recipe.run.dir)
    prepare_run_dir(run_dir, recipe)
    torch.manual_seed(0)
    engine = build_engine(build_model(recipe.model, tok), recipe.train)
    batches = Tapped(loader, tap_for(engine))
    # One thread, as the tests' CLI runs (OMP_NUM_THREADS=1): on a busy 2-core machine, torch's
    # threads spin against the other processes, which makes these tiny steps 3 times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with Tracker(recipe, run_dir, 0) as tracker:
            Trainer(recipe, engine, batches, None, run_dir, training_budget(recipe), tracker).train()
    finally:
        torch.set_num_threads(threads)
        # The trainer closes its batch stream however it stops (loader workers ignore SIGTERM,
        # so a stream left open would make the process wait for them forever at exit).
        assert batches.closed
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
