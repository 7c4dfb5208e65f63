"""4. VIRAL: step time of the demo model without VIRAL, with its teacher online, and with cached features.

Each variant: forward + backward + AdamW step of recipes/demo_viral.yaml's model on a fixed
random batch of one-image samples (plain PyTorch, one process: the difference is the
model's, not DeepSpeed's), median over the timed steps after a warm-up step.

1. baseline: the plain DecoderVLM (model.alignment off);
2. VIRAL online: the teacher runs every step;
3. VIRAL cached: the batch carries the teacher's features in fp16, as the loader gives them
   from shards written by `mmscale shards cache-teacher`; the teacher does not run;
4. teacher only: the teacher's forward alone, i.e. what the cache saves per step.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from benchmarks.common import REPO, Context, one_thread
from benchmarks.report import Table
from mmscale.alignment import with_alignment
from mmscale.config import load_recipe
from mmscale.models.decoder_vlm import DecoderVLM

IMAGE_ID, VOCAB, SEQ = 3, 1024, 160


def run(ctx: Context) -> list[Table]:
    steps, size = (1, 2) if ctx.smoke else (10, 16)
    cfg = load_recipe(REPO / "recipes" / "demo_viral.yaml").model
    torch.manual_seed(0)
    vlm = DecoderVLM(cfg, VOCAB, IMAGE_ID).train()
    inputs = batch(vlm, size)
    aligned = with_alignment(vlm, cfg).train()
    features = aligned.teacher.features(inputs["pixel_values"]).half()  # what the cached shards hold
    with one_thread():
        baseline = train_step_time(vlm, inputs, steps)
        online = train_step_time(aligned, inputs, steps)
        calls = aligned.teacher.forward_calls
        cached = train_step_time(aligned, {**inputs, "teacher_features": features}, steps)
        if aligned.teacher.forward_calls != calls:
            raise RuntimeError("the teacher ran on cached features")
        teacher = median_cpu_seconds(lambda: aligned.teacher.features(inputs["pixel_values"]), steps)

    table = Table("4. VIRAL: step time without VIRAL, with the teacher online, with cached teacher features",
                  ["variant", "step ms (CPU time)", "vs baseline"])
    for name, seconds in (("baseline", baseline), ("VIRAL online", online), ("VIRAL cached", cached),
                          ("teacher forward only", teacher)):
        table.rows.append([name, seconds * 1e3, seconds / baseline])
    table.notes.append(
        f"recipes/demo_viral.yaml's model, batch {size} x {SEQ} tokens, one image each, one thread, plain PyTorch + "
        f"AdamW; median CPU time of {steps} steps after a warm-up step. Teacher {aligned.teacher.name} "
        f"at {aligned.teacher.image_size} px (a seeded tiny random DINOv2: a real DINOv2-B/14 costs far more)."
    )
    return [table]


def batch(model: DecoderVLM, size: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(10, VOCAB, (size, SEQ), generator=generator)
    input_ids[:, 1 : 1 + model.image_token_count] = IMAGE_ID
    side = model.cfg.vision.image_size
    return {"input_ids": input_ids, "labels": input_ids.clone(),
            "pixel_values": torch.randn(size, 3, side, side, generator=generator)}


def train_step_time(model: torch.nn.Module, inputs: dict, steps: int) -> float:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        model(**inputs).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return median_cpu_seconds(step, steps)


def median_cpu_seconds(step: Callable[[], None], repeats: int) -> float:
    """Median CPU time of this process for `step`, over `repeats` calls after one warm-up call."""
    step()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        step()
        times.append(time.process_time() - start)
    return statistics.median(times)
