"""The plan's memory figures measured: two real DeepSpeed steps per rank, on CPU.

Every tensor the rank allocates from before the model is built is counted while it lives,
by the same dispatch-mode tracker the plan runs on meta tensors (mmscale.plan.activations),
here on real ones. PyTorch's profiler (profile_memory) gives the same figure for one process,
but with gloo it misses frees made on the communication threads, and over-counts.
Between the steps the count is the model states and DeepSpeed's buffers (the first step
created Adam's states); its peak during the second step adds the activations.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import torch.multiprocessing as mp

from mmscale.config import Recipe, load_recipe
from mmscale.launch.ending import leave
from mmscale.models import build_vlm
from mmscale.plan.activations import LiveBytes
from mmscale.plan.batch import worst_case_batch
from mmscale.training.distributed import free_port, init_distributed, shutdown_distributed
from mmscale.training.engine import build_engine, deepspeed_config, use_bf16
from mmscale.training.freeze import freeze


@dataclass(frozen=True)
class Measured:
    states: int  # bytes held between steps: weights, gradients, optimizer states, buffers
    peak: int  # bytes at the peak of a step


def measure_step(recipe: Recipe, vocab_size: int, image_token_id: int) -> Measured:
    """Run two training steps of `recipe`'s planned batch on this rank (inside an initialised
    process group) and measure its memory."""
    train = recipe.train
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(train), enabled=train.zero_stage == 3):
        model = build_vlm(recipe.model, vocab_size, image_token_id)
    freeze(model, recipe.trainable_parts)
    tracker = LiveBytes()
    # Under ZeRO-3 a parameter's own tensor is an empty placeholder, its partition `ds_tensor`.
    tracker.hold(getattr(p, "ds_tensor", p) for p in model.parameters())
    with tracker:
        engine = build_engine(model, train)
        dtype = torch.bfloat16 if use_bf16(train) else torch.float32

        def step() -> None:
            for _ in range(train.grad_accum):
                batch = worst_case_batch(recipe, train.micro_batch_size, image_token_id)
                batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
                engine.backward(engine(**batch))
            engine.step()

        step()
        states = tracker.current
        tracker.peak = states
        step()
    return Measured(states=states, peak=tracker.peak)


def _rank(rank: int, world: int, port: int, recipe: str, overrides: list[str], ids: tuple[int, int], out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    init_distributed(timeout_s=600)
    measured = measure_step(load_recipe(recipe, overrides), *ids)
    Path(f"{out}.{rank}").write_text(json.dumps(measured.__dict__))
    shutdown_distributed()
    leave(0)  # as `mmscale train` ends a rank: without Python's finalization (see there why)


def measure_ranks(recipe: Path, overrides: list[str], world: int, vocab_size: int, image_token_id: int) -> Measured:
    """`measure_step` on `world` gloo ranks of this machine; the largest rank's figures."""
    with tempfile.TemporaryDirectory() as tmp:
        args = (world, free_port(), str(recipe), overrides, (vocab_size, image_token_id), f"{tmp}/rank")
        mp.spawn(_rank, args=args, nprocs=world, join=True)
        ranks = [json.loads(Path(f"{tmp}/rank.{r}").read_text()) for r in range(world)]
    return Measured(**{key: max(r[key] for r in ranks) for key in ("states", "peak")})
