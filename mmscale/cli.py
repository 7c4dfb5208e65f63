"""The `mmscale` command line: a thin layer over the package."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmscale.config import load_recipe
from mmscale.errors import UserError


def _train(args: argparse.Namespace) -> None:
    recipe = load_recipe(args.recipe, args.overrides)
    from mmscale.train import train  # deferred: importing DeepSpeed costs seconds

    train(recipe)


def _shards_demo(args: argparse.Namespace) -> None:
    from mmscale.data.demo import build_demo_dataset

    build_demo_dataset(Path(args.out), seed=args.seed, train_samples=args.train_samples, val_samples=args.val_samples)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmscale", description="Train vision-language models at scale.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a recipe (single process, or under torchrun/srun)")
    train.add_argument("recipe", help="recipe YAML, e.g. recipes/demo.yaml")
    train.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides, e.g. train.steps=50")
    train.set_defaults(func=_train)

    shards = commands.add_parser("shards", help="build WebDataset shards").add_subparsers(dest="shards", required=True)
    demo = shards.add_parser("demo", help="render the OpenMoji demo corpus and its tokenizer (no download)")
    demo.add_argument("--out", required=True, help="output folder (train/, val/, tokenizer/, manifest.json)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--train-samples", type=int, default=8000)
    demo.add_argument("--val-samples", type=int, default=512)
    demo.set_defaults(func=_shards_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (UserError, FileExistsError) as e:
        print(f"mmscale {args.command}: error: {_message(e)}", file=sys.stderr)
        sys.exit(2)


def _message(error: Exception) -> str:
    """The error's own message; a DataLoader worker's re-raise embeds the worker's traceback
    in the message, and its last line is the original `module.Class: message`."""
    text = str(error)
    if "Original Traceback" in text:
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return text


if __name__ == "__main__":
    main()
