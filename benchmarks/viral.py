"""Step time of the demo model without and with VIRAL, on CPU. Run by hand:

    .venv/bin/python benchmarks/viral.py [--steps 10] [--batch 16] [--teacher-image-size 0]

Each variant: forward + backward + AdamW step of recipes/demo_viral.yaml's model on a fixed
random batch of --batch one-image samples (plain PyTorch, one process: the difference is the
model's, not DeepSpeed's), median over --steps after a warm-up step.

1. baseline: the plain DecoderVLM (model.alignment off);
2. VIRAL online: the teacher runs every step;
3. VIRAL cached: the batch carries the teacher's features in fp16, as the loader gives them
   from shards written by `mmscale shards cache-teacher`; the teacher does not run;
4. teacher only: the teacher's forward alone, i.e. what the cache saves per step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmscale.alignment import with_alignment  # noqa: E402
from mmscale.config import load_recipe  # noqa: E402
from mmscale.models.decoder_vlm import DecoderVLM  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
IMAGE_ID, VOCAB, SEQ = 3, 1024, 160


def batch(model: DecoderVLM, size: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(10, VOCAB, (size, SEQ), generator=generator)
    input_ids[:, 1 : 1 + model.image_token_count] = IMAGE_ID
    side = model.cfg.vision.image_size
    return {"input_ids": input_ids, "labels": input_ids.clone(),
            "pixel_values": torch.randn(size, 3, side, side, generator=generator)}


def median_seconds(step, steps: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_step_time(model: torch.nn.Module, inputs: dict, steps: int) -> float:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        model(**inputs).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return median_seconds(step, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--teacher-image-size", type=int, default=0, help="0: the student's grid x patch 14")
    args = parser.parse_args()
    overrides = [f"model.alignment.teacher_image_size={args.teacher_image_size}"] if args.teacher_image_size else []
    cfg = load_recipe(REPO / "recipes" / "demo_viral.yaml", overrides).model
    torch.manual_seed(0)
    vlm = DecoderVLM(cfg, VOCAB, IMAGE_ID).train()
    inputs = batch(vlm, args.batch)
    baseline = train_step_time(vlm, inputs, args.steps)
    aligned = with_alignment(vlm, cfg).train()
    online = train_step_time(aligned, inputs, args.steps)
    features = aligned.teacher.features(inputs["pixel_values"]).half()  # what the cached shards hold
    calls = aligned.teacher.forward_calls
    cached = train_step_time(aligned, {**inputs, "teacher_features": features}, args.steps)
    if aligned.teacher.forward_calls != calls:
        raise RuntimeError("the teacher ran on cached features")
    teacher = median_seconds(lambda: aligned.teacher.features(inputs["pixel_values"]), args.steps)

    print(f"demo model, batch {args.batch} x {SEQ} tokens, {torch.get_num_threads()} threads; teacher "
          f"{aligned.teacher.name} at {aligned.teacher.image_size} px")
    print("| variant | step ms | vs baseline |\n|---|---|---|")
    rows = (("baseline", baseline), ("VIRAL online", online), ("VIRAL cached", cached),
            ("teacher forward only", teacher))
    for name, seconds in rows:
        print(f"| {name} | {seconds * 1e3:.1f} | {seconds / baseline:.3f} |")


if __name__ == "__main__":
    main()
