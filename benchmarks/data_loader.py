"""3. Data loader: samples/s on one core, and the share of training step time spent waiting for data.

1. samples/s/core of the whole per-sample path, in one process with one thread
   (data.num_workers=0), after a warm-up batch: tar read, JSON and schema check, PNG decode,
   resize + normalise, chat template + tokenisation with label masking, then batching or
   packing. On the demo corpus rendered at 336 px (576 image tokens with 14-px patches, as
   LLaVA-1.5's images) and on the benchmark corpus (`benchmarks.corpus`) that benchmark 1 trains.
2. data wait: a real `mmscale train` run of the benchmark recipe on the benchmark corpus,
   packed, with the recipe's loader worker (data.num_workers=1), reading the trainer's own
   `data_wait` metric (time blocked on the loader / step time) from its metrics.jsonl,
   leaving out the first logging window (the worker's start-up).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from benchmarks.common import DEMO_RECIPE, REPO, Context, one_thread
from benchmarks.report import Table
from mmscale.config import Recipe, load_recipe
from mmscale.data.loader import build_dataloader
from mmscale.data.tokenizer import load_tokenizer
from mmscale.demo.corpus import build_demo_dataset

TRAIN_ROWS = 6  # packed rows per step in the training run: about benchmark 1's packed micro-batch


def run(ctx: Context) -> list[Table]:
    samples = 48 if ctx.smoke else 2000
    size = 70 if ctx.smoke else 336  # a multiple of the 14-px patch
    demo = ctx.scratch / f"demo-{size}px"
    build_demo_dataset(demo, image_size=size, train_samples=max(256, samples), val_samples=64)
    columns = ["what", "samples/s (wall clock)", "samples/s/core (CPU time)", "fill", "data wait (share of step time)"]
    table = Table("3. Data loader: samples/s on one core, and data wait in training", columns)
    for pack in (False, True):
        mode = "packed rows of 4,096, blocks of 64" if pack else "padded, micro-batch 16"
        rates = loader_rate(demo_recipe(demo, size, pack), samples)
        table.rows.append([f"loader, demo corpus at {size} px, {mode}", *rates, None])
    mix = ctx.recipe(["data.num_workers=0", "data.pack=true", "data.pack_block=256"])
    rates = loader_rate(mix, samples)
    table.rows.append([f"loader, benchmark corpus, packed rows of {mix.data.max_seq_len}, blocks of 256", *rates, None])
    steps, log_every = (4, 2) if ctx.smoke else (30, 5)
    records = train_metrics(ctx, steps, log_every)
    steady = records[1:] or records
    table.rows.append([
        f"`mmscale train`, benchmark corpus, packed, {TRAIN_ROWS} rows per step, 1 loader worker",
        mean(r["samples_per_s"] for r in steady), None, mean(r["fill"] for r in steady),
        mean(r["data_wait"] for r in steady),
    ])
    table.notes += [
        f"Loader rows: about {samples:,} samples (whole blocks when packing) in one process with one thread, after "
        "a warm-up block; per core is per second of the process's CPU time, which other jobs on a shared machine "
        f"barely move (the wall clock they do). The demo corpus at {size} px has samples of about one "
        "length, so padding wastes little there.",
        f"Training row: {steps} steps of the benchmark recipe (ZeRO-2, fp32, one process); means over logging windows "
        f"2-{len(records)} of {log_every} steps (window 1, with the worker's start-up: data wait "
        f"{records[0]['data_wait']:.3f}). Wall clock: the trainer's threads and its loader worker share the "
        f"machine's {torch.get_num_threads()} cores with whatever else runs. Its fill is the trainer's: real tokens "
        "over rows x the longest row of each micro-batch.",
    ]
    return [table]


def mean(values: Iterator[float]) -> float:
    values = list(values)
    return sum(values) / len(values)


def demo_recipe(data_dir: Path, image_size: int, pack: bool) -> Recipe:
    """The demo recipe reading `data_dir` at `image_size` px in 14-px patches, in one process."""
    return load_recipe(DEMO_RECIPE, [
        f"data.train={data_dir / 'train'}", f"data.tokenizer={data_dir / 'tokenizer'}", "data.num_workers=0",
        f"model.vision.image_size={image_size}", "model.vision.patch_size=14", "data.max_seq_len=1024",
        f"data.pack={str(pack).lower()}", "data.pack_len=4096", "data.pack_block=64", "data.shuffle_buffer=100",
    ])


def loader_rate(recipe: Recipe, samples: int) -> tuple[float, float, float]:
    """(samples per second of wall clock, and of CPU time, fill) reading at least `samples` samples of
    the recipe's train split on one thread.

    Padded micro-batches of 16 samples, or packed batches of one row; fill is real tokens /
    token slots: of the padded batches, or of the packed rows at their full length. Packing
    encodes a whole block before it hands out the first row, so the clock runs over whole
    blocks (whole batches, unpacked), after one for warm-up (imports, font and tokenizer caches).
    """
    tokenizer = load_tokenizer(recipe.data.tokenizer, recipe.data.chat_template, recipe.data.image_token)
    batch_size = 1 if recipe.data.pack else 16
    unit = recipe.data.pack_block if recipe.data.pack else batch_size
    row_len = recipe.data.pack_len or recipe.data.max_seq_len
    loader = build_dataloader(recipe.data, recipe.model, tokenizer, split="train", batch_size=batch_size, seed=0)
    with one_thread(), contextlib.closing(iter(loader)) as batches:
        warm = 0
        while warm < unit:
            warm += len(next(batches)["meta"]["samples"])
        wall, cpu = time.perf_counter(), time.process_time()
        seen, real, slots = 0, 0, 0
        while seen < -(-samples // unit) * unit:
            batch = next(batches)
            seen += len(batch["meta"]["samples"])
            real += int(batch["meta"]["lengths"].sum())
            slots += len(batch["meta"]["lengths"]) * row_len if recipe.data.pack else batch["meta"]["slots"]
        return seen / (time.perf_counter() - wall), seen / (time.process_time() - cpu), real / slots


def train_metrics(ctx: Context, steps: int, log_every: int) -> list[dict]:
    """The training records of a `mmscale train` run of the benchmark recipe, packed, in a process of its own."""
    run_dir = ctx.scratch / "train-run"
    overrides = [
        *ctx.overrides(), "data.pack=true", "data.pack_block=256", f"train.micro_batch_size={TRAIN_ROWS}",
        f"train.steps={steps}", f"train.log_every={log_every}", f"train.warmup_steps={steps - 1}", f"run.dir={run_dir}",
    ]
    command = [sys.executable, "-m", "mmscale", "train", str(DEMO_RECIPE), *overrides]
    # Without this process's own process group (benchmarks.common.world_of_one): a world of its own.
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"`mmscale train` failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if "data_wait" in record]
