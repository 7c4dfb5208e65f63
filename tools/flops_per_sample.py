"""Training FLOPs per sample of a recipe (the numerator of the MFU that `mmscale train` logs),
as counted now (`mmscale.models.flops`: frozen parts pay their forward, and their backward
only when gradients pass through them; a tiled image counts its own tiles) and as counted
before issue 18 (every part 3x its forward, every image `max_num_tiles` tiles).

    .venv/bin/python tools/flops_per_sample.py [--recipe recipes/X.yaml ...] [--text 64 512] [--tiles 1 4]

MFU = FLOPs per sample x samples per second / (peak FLOP/s per GPU x GPUs), so at one
measured throughput the two counts' MFUs differ by their ratio. The table gives each
count's MFU at one sample per second per H100 (989 TFLOP/s dense bf16): multiply by a
measured samples/s/GPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mmscale.config import load_recipe
from mmscale.config.schema import MODEL_PARTS
from mmscale.models.flops import training_flops_per_sample
from mmscale.training.metrics import PEAK_BF16_FLOPS

REPO = Path(__file__).resolve().parents[1]
RECIPES = ["recipes/llava15_7b_align.yaml", "recipes/llama32_11b_vision_adapter.yaml"]
H100 = dict(PEAK_BF16_FLOPS)["H100"]


def rows(recipe_path: Path, texts: list[int], tiles: list[int]) -> list[list]:
    recipe = load_recipe(recipe_path)
    cfg = recipe.model
    vocab = cfg.llm.vocab_size
    if cfg.arch == "decoder":
        shapes = [(cfg.image_tokens + text, (1,), f"1 image ({cfg.image_tokens} tokens) + {text} text") for text in texts]
        max_tiles = 1
    else:
        max_tiles = cfg.tiled_vision.max_num_tiles
        shapes = [(text, (n,), f"1 image of {n} tile{'s' * (n > 1)} + {text} text") for n in tiles for text in texts]
    out = []
    for tokens, image_tiles, description in shapes:
        now = training_flops_per_sample(cfg, tokens, image_tiles, vocab, recipe.trainable_parts)
        before = training_flops_per_sample(cfg, tokens, (max_tiles,) * len(image_tiles), vocab, MODEL_PARTS)
        out.append([recipe_path.name, recipe.train.trainable, description, before / 1e12, now / 1e12, now / before,
                    100 * before / H100, 100 * now / H100])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", nargs="+", type=Path, default=[REPO / r for r in RECIPES])
    parser.add_argument("--text", nargs="+", type=int, default=[64, 512], help="text tokens per sample")
    parser.add_argument("--tiles", nargs="+", type=int, default=[1, 4], help="tiles of a cross-attention image")
    args = parser.parse_args()
    header = ["recipe", "trainable", "sample", "TFLOP before", "TFLOP now", "now / before",
              "MFU % before at 1 sample/s/H100", "MFU % now"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for path in args.recipe:
        for row in rows(path, args.text, args.tiles):
            print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row) + " |")


if __name__ == "__main__":
    main()
