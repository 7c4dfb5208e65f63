"""The `mmscale` command line: a thin layer over the package.

Each command imports what it runs inside its function: torch, transformers and DeepSpeed take
seconds to import, which `mmscale --help` and the other commands need not pay.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from mmscale.cli_launch import add_commands as add_launch_commands
from mmscale.config import load_recipe
from mmscale.errors import UserError
from mmscale.launch.ending import StopSignals, leave
from mmscale.utils.options import given


def _train(args: argparse.Namespace) -> None:
    # First: a stop signal during the seconds of imports, model build or resume must not kill the rank.
    with StopSignals() as stop:
        from mmscale.monitor.timeline import Timeline

        timeline = Timeline()  # this attempt's time, counted from the process's (and its launcher's) start
        recipe = load_recipe(args.recipe, args.overrides)
        from mmscale.train import train  # deferred: importing DeepSpeed costs seconds

        train(recipe, stop, timeline)


def _shards_demo(args: argparse.Namespace) -> None:
    from mmscale.demo.corpus import build_demo_dataset

    build_demo_dataset(
        Path(args.out), **given(args, "seed", "train_samples", "val_samples", "eval_samples", "caption_glyphs")
    )


def _shards_build(args: argparse.Namespace) -> None:
    from mmscale.data.build import build_shards, read_captions, read_llava

    source = Path(args.llava or args.captions)
    if not source.is_file():
        raise UserError(f"input file {source} does not exist")
    records = read_llava(source) if args.llava else read_captions(source)
    manifest = build_shards(
        records,
        Path(args.image_root),
        Path(args.out),
        shard_samples=args.shard_samples,
        shard_bytes=int(args.shard_mb * 2**20) if args.shard_mb else None,
        source=args.source,
        workers=args.workers,
        **given(args, "name", "readers", "seed"),
    )
    skipped = ", ".join(f"{reason} {n}" for reason, n in manifest["skipped"].items()) or "none"
    sizes = sorted({s["samples"] for s in manifest["shards"]})
    sizes = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
    n_empty = manifest["empty_shards"]
    empty = f", {n_empty} left empty by skipped records not written" if n_empty else ""
    print(f"{manifest['samples']} of {manifest['inputs']} inputs in {len(manifest['shards'])} shards of {sizes} "
          f"samples for {manifest['readers']} readers{empty} ({manifest['bytes'] / 2**20:.1f} MiB) at {args.out}; "
          f"skipped: {skipped}")


def _shards_cache_teacher(args: argparse.Namespace) -> None:
    from mmscale.alignment.cache import cache_teacher
    from mmscale.data.shards import resolve_shards

    recipe = load_recipe(args.recipe[0], args.recipe[1:])
    shards = resolve_shards(args.input, "IN")
    manifest = cache_teacher(shards, Path(args.out), recipe.model, device=args.device, **given(args, "batch_size"))
    uncached = ", ".join(f"{reason} {n}" for reason, n in manifest["uncached"].items()) or "none"
    print(f"{manifest['samples']} samples in {len(manifest['shards'])} shards ({manifest['bytes'] / 2**20:.1f} MiB) "
          f"at {args.out} with the features of {manifest['teacher']['model']}; copied without features: {uncached}")


def _shards_inspect(args: argparse.Namespace) -> None:
    from mmscale.data.shard_tools import inspect_shards
    from mmscale.data.shards import resolve_shards

    print(json.dumps(inspect_shards(resolve_shards(args.shards, "shards"), args.show), indent=2, ensure_ascii=False))


def _shards_validate(args: argparse.Namespace) -> None:
    from mmscale.data.shard_tools import validate_shards
    from mmscale.data.shards import resolve_shards

    good, problems = validate_shards(resolve_shards(args.shards, "shards"))
    for p in problems:
        print(f"{p.reason}\t{p.shard}\t{p.key or '-'}\t{p.message}")
    print(f"{good} good samples, {len(problems)} problems")
    if problems:
        sys.exit(1)


def _convert(args: argparse.Namespace) -> None:
    kinds = (args.source_format[0] if args.source_format else "mmscale", args.to[0])
    if kinds == ("hf", "mmscale") and args.source is None:
        from mmscale.convert.mmscale_folder import import_hf

        print(import_hf(Path(args.source_format[1]), Path(args.to[1])))
    elif kinds == ("mmscale", "hf") and args.source is not None:
        from mmscale.convert.export import describe, export_hf, from_run
        from mmscale.convert.mmscale_folder import from_mmscale_folder, is_mmscale_folder
        from mmscale.convert.release_files import check_absent

        source, out = Path(args.source).resolve(), Path(args.to[1])
        check_absent(out)  # before hours of consolidating a large checkpoint
        if is_mmscale_folder(source):
            loaded = from_mmscale_folder(source)
        else:
            loaded = from_run(source, args.step, args.tokenizer)
        result = export_hf(loaded, out, args.dtype, release_source=True, **given(args, "max_abs_diff", "max_kl"))
        print(describe(loaded, result, out, args.dtype))
    else:
        raise UserError(
            "use `mmscale convert RUN_OR_CHECKPOINT --to hf OUT` or `mmscale convert --from hf FOLDER --to mmscale OUT`"
        )


def _eval(args: argparse.Namespace) -> None:
    from mmscale.eval.run import evaluate
    from mmscale.eval.score import table

    result = evaluate(Path(args.model), args.data, args.max_samples, args.step, tokenizer=args.tokenizer,
                      **given(args, "max_new_tokens", "batch_size"))
    print(f"{result['model']} on {args.data}")
    print(table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {args.out}")


def _plan(args: argparse.Namespace) -> None:
    from mmscale.plan import Cluster, make_plan, report

    options = given(args, "gpu_memory_gb", "peak_tflops", "mfu", "write_gbps")
    cluster = Cluster(args.nodes, args.gpus_per_node, **options)
    plan = make_plan(load_recipe(args.recipe, args.overrides), cluster)
    print(report(plan))
    if not plan.fits:
        sys.exit(3)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmscale", description="Train vision-language models at scale.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a recipe (one process, or one per rank under torchrun)")
    train.add_argument("recipe", help="recipe YAML, e.g. recipes/demo.yaml")
    train.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides, e.g. train.steps=50")
    train.set_defaults(func=_train)
    add_launch_commands(commands)  # submit, jobs

    plan = commands.add_parser("plan", help="memory per GPU, step time, checkpoint size and shard balance, before launch")
    plan.add_argument("recipe", help="recipe YAML")
    plan.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")
    plan.add_argument("--nodes", type=int, default=1)
    plan.add_argument("--gpus-per-node", type=int, default=8)
    plan.add_argument("--gpu-memory", type=float, dest="gpu_memory_gb", help="GB per GPU (default: an H100's, 80)")
    plan.add_argument("--peak-tflops", type=float, help="dense bf16 TFLOPs per GPU (default: an H100 SXM's, 989)")
    plan.add_argument("--mfu", type=float, help="model FLOPs utilisation assumed for the step time (default 0.4)")
    plan.add_argument("--write-gbps", type=float, help="checkpoint write bandwidth per node, GB/s (default 2)")
    plan.set_defaults(func=_plan)

    convert = commands.add_parser(
        "convert", help="a checkpoint to a verified transformers folder (--to hf), or a transformers folder to mmscale"
    )
    convert.add_argument("source", nargs="?", metavar="RUN_OR_CHECKPOINT",
                         help="run directory, checkpoints/step_N directory, or mmscale model folder")
    convert.add_argument("--to", nargs=2, required=True, metavar=("FORMAT", "OUT"), help="hf OUT, or mmscale OUT")
    convert.add_argument("--from", dest="source_format", nargs=2, metavar=("FORMAT", "FOLDER"),
                         help="hf FOLDER: import a local LLaVA or Mllama folder (with --to mmscale)")
    convert.add_argument("--dtype", choices=["fp32", "bf16"],
                         help="weights' dtype in OUT (default: the dtype a run trained in, an imported folder's own)")
    convert.add_argument("--step", type=int, help="the run's checkpoint of this step (default: the newest complete)")
    convert.add_argument("--tokenizer", help="the run's tokenizer folder, if not where its recipe says")
    convert.add_argument("--max-abs-diff", type=float, help="largest logit difference accepted (default 1e-4)")
    convert.add_argument("--max-kl", type=float, help="largest mean KL divergence accepted (default 1e-8)")
    convert.set_defaults(func=_convert)

    evaluate = commands.add_parser(
        "eval", help="exact-match accuracy per question type of a run or a transformers folder on eval shards"
    )
    evaluate.add_argument("model", metavar="RUN_OR_FOLDER",
                          help="run directory, checkpoints/step_N directory, or exported transformers folder")
    evaluate.add_argument("--data", required=True, help="eval shards: folder of .tar shards, brace pattern or URL")
    evaluate.add_argument("--max-samples", type=int, help="evaluate the first N samples only")
    evaluate.add_argument("--out", help="write the accuracies and every sample's answer to this JSON file")
    evaluate.add_argument("--step", type=int, help="the run's checkpoint of this step (default: the newest complete)")
    evaluate.add_argument("--max-new-tokens", type=int, help="longest answer generated (default 16)")
    evaluate.add_argument("--batch-size", type=int, help="questions answered together (default 16)")
    evaluate.add_argument("--tokenizer", help="a run's tokenizer folder, if not where its recipe says (a relative "
                                              "path there is relative to where the run started)")
    evaluate.set_defaults(func=_eval)

    shards = commands.add_parser("shards", help="build WebDataset shards").add_subparsers(dest="shards", required=True)
    demo = shards.add_parser("demo", help="render the OpenMoji demo corpus and its tokenizer (no download)")
    demo.add_argument("--out", required=True, help="output folder (train/, val/, eval/, tokenizer/, manifest.json)")
    demo.add_argument("--seed", type=int, help="default 0")
    demo.add_argument("--train-samples", type=int, help="default 8000")
    demo.add_argument("--val-samples", type=int, help="default 512")
    demo.add_argument("--eval-samples", type=int,
                      help="held-out questions, one per image, balanced over 4 types (a multiple of 4; default 512)")
    demo.add_argument("--caption-glyphs", type=int, help="glyphs the captions name: the 16 scene objects and a fixed "
                      "draw of others (up to 1463; default 64)")
    demo.set_defaults(func=_shards_demo)

    build = shards.add_parser("build", help="convert a LLaVA-style JSON or a caption list + image folder to shards")
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument("--llava", help="LLaVA JSON: a list of {id, image, conversations, meta (optional)}")
    source.add_argument("--captions", help="captions: JSONL of {image, caption} or TSV of image<TAB>caption")
    build.add_argument("--image-root", required=True, help="folder the image paths are relative to")
    build.add_argument("--out", required=True, help="output folder (shards, manifest.json)")
    build.add_argument("--name", help="shard file prefix (default: shard)")
    build.add_argument("--readers", type=int,
                       help="the readers (ranks x data.num_workers) to size shards for: a multiple of this many "
                            "shards of equal size, each at most 10,000 samples (default 256: 64 ranks x 4 workers, "
                            "and evenly divided by any power of two below)")
    build.add_argument("--shard-samples", type=int, help="samples per shard instead (warns if readers would be uneven)")
    build.add_argument("--shard-mb", type=float,
                       help="image MiB per shard, on average, instead (warns if readers would be uneven)")
    build.add_argument("--seed", type=int, help="seed of the shuffle that deals records to shards (default 0)")
    build.add_argument("--source", help='the samples\' "source" (default: a record\'s own, else llava or captions)')
    build.add_argument("--workers", type=int, default=os.cpu_count(), help="processes")
    build.set_defaults(func=_shards_build)

    cache = shards.add_parser("cache-teacher", help="copy shards adding VIRAL teacher features (fp16) per image")
    cache.add_argument("input", metavar="IN", help="folder of .tar shards, brace pattern or URL")
    cache.add_argument("out", metavar="OUT", help="output folder (shards, manifest.json with the teacher's identity)")
    cache.add_argument("--recipe", nargs="+", required=True, metavar=("RECIPE", "KEY=VALUE"),
                       help="the training recipe and overrides: its model.alignment teacher, model.vision pixels")
    cache.add_argument("--batch-size", type=int, help="images per teacher forward (default 64)")
    cache.add_argument("--device", help="where the teacher runs (default: cuda if available, else cpu)")
    cache.set_defaults(func=_shards_cache_teacher)

    for name, func, text in (("inspect", _shards_inspect, "counts, length histogram and a few samples"),
                             ("validate", _shards_validate, "read every member; list every problem with shard and key")):
        tool = shards.add_parser(name, help=text)
        tool.add_argument("shards", help="folder of .tar shards, brace pattern or URL")
        if name == "inspect":
            tool.add_argument("--show", type=int, default=3, help="samples to print")
        tool.set_defaults(func=func)
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, its `key.sub=value` overrides allowed before, between and after the
    options (`mmscale submit RECIPE --nodes 2 train.steps=60`): argparse alone ends a positional
    list at the first option, and its intermixed parsing does not support subcommands."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run a command; `mmscale train` then ends its process however it went (mmscale.launch.ending)."""
    args = parse(argv)
    if args.command != "train":
        code = _run(args)
        if code:
            sys.exit(code)
        return
    try:
        code = _run(args)
    except BaseException:  # a bug, or ^C: its traceback, then the same end as every rank's
        traceback.print_exc()
        code = 1
    leave(code)  # without Python's finalization: see there why


def _run(args: argparse.Namespace) -> int:
    """The command's exit status: 0, or 2 after printing a UserError's message."""
    try:
        args.func(args)
    except (UserError, FileExistsError) as e:
        print(f"mmscale {args.command}: error: {_message(e)}", file=sys.stderr)
        return 2
    return 0


def _message(error: Exception) -> str:
    """The error's own message; a DataLoader worker's re-raise embeds the worker's traceback
    in the message, and its last line is the original `module.Class: message`."""
    text = str(error)
    if "Original Traceback" in text:
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return text


if __name__ == "__main__":
    main()
