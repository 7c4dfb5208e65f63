"""Data loader throughput and packing fill, on one core. Run by hand:

    .venv/bin/python benchmarks/data_loader.py [--samples 2000] [--image-size 336]

1. samples/s/core of the whole per-sample path: tar read, JSON and schema check, PNG decode,
   resize + normalise to image-size px, chat template + tokenisation with label masking,
   and packing, in one process (num_workers=0), after a warm-up batch.
2. fill (real tokens / token slots) of padded micro-batches vs packed rows, on the demo
   corpus and on the LLaVA-665K-like length mix documented in mmscale/data/packing.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmscale.config import load_recipe  # noqa: E402
from mmscale.data.demo import build_demo_dataset  # noqa: E402
from mmscale.data.loader import build_dataloader  # noqa: E402
from mmscale.data.packing import first_fit_decreasing, llava_665k_like_lengths  # noqa: E402
from mmscale.data.tokenizer import load_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def loader_rate(data_dir: Path, image_size: int, samples: int, pack: bool) -> tuple[float, float, float]:
    """(samples per second on one core, fill, budget use) reading `samples` samples of the demo train split.

    fill: real tokens / token slots of the batches (padding to the longest row); budget use,
    for packed rows: real tokens / (rows x pack_len), the share of the planned budget used.
    """
    overrides = [
        f"data.train={data_dir / 'train'}", f"data.tokenizer={data_dir / 'tokenizer'}", "data.num_workers=0",
        f"model.vision.image_size={image_size}", "model.vision.patch_size=14", "data.max_seq_len=1024",
        f"data.pack={str(pack).lower()}", "data.pack_len=4096", "data.pack_block=64", "data.shuffle_buffer=100",
    ]
    recipe = load_recipe(REPO / "recipes" / "demo.yaml", overrides)
    tokenizer = load_tokenizer(recipe.data.tokenizer, recipe.data.chat_template, recipe.data.image_token)
    batch = 1 if pack else 16
    loader = build_dataloader(recipe.data, recipe.model, tokenizer, split="train", batch_size=batch, seed=0)
    batches = iter(loader)
    next(batches)  # warm-up: imports, font and tokenizer caches
    start, seen, real, slots, rows = time.perf_counter(), 0, 0, 0, 0
    while seen < samples:
        b = next(batches)
        seen += len(b["meta"]["samples"])
        real += int(b["meta"]["lengths"].sum())
        slots += b["meta"]["slots"]
        rows += len(b["meta"]["lengths"])
    rate = seen / (time.perf_counter() - start)
    return rate, real / slots, real / (rows * recipe.data.pack_len) if pack else float("nan")


def synthetic_fill(lengths: list[int], budget: int, block: int, micro_batch: int) -> tuple[float, float]:
    padded = sum(max(lengths[i : i + micro_batch]) * len(lengths[i : i + micro_batch])
                 for i in range(0, len(lengths), micro_batch))
    rows = []
    for start in range(0, len(lengths), block):
        chunk = lengths[start : start + block]
        rows += [sum(chunk[i] for i in row) for row in first_fit_decreasing(chunk, budget)]
    return sum(lengths) / padded, sum(rows) / (len(rows) * budget)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=336, help="a multiple of the 14-px patch")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "demo"
        build_demo_dataset(data, image_size=args.image_size, train_samples=max(256, args.samples), val_samples=64)
        rows = [("padded, micro-batch 16", *loader_rate(data, args.image_size, args.samples, pack=False)),
                ("packed, 4096-token rows", *loader_rate(data, args.image_size, args.samples, pack=True))]
    padded, packed = synthetic_fill(llava_665k_like_lengths(8192), budget=8192, block=512, micro_batch=8)
    print(f"data loader, 1 core ({os.cpu_count()} on the machine), {args.image_size} px, demo corpus:")
    print("| mode | samples/s/core | fill | budget use |\n|---|---|---|---|")
    for name, rate, fill, use in rows:
        print(f"| {name} | {rate:.0f} | {fill:.3f} | {use:.3f} |")
    print(f"\nLLaVA-665K-like length mix: padded (micro-batch 8) fill {padded:.3f}, "
          f"packed (8192-token rows, blocks of 512) fill {packed:.3f}")


if __name__ == "__main__":
    main()
