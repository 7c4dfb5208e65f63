"""5. Checkpoint: save and load time of a DeepSpeed checkpoint against the disk's sequential bandwidth.

The benchmark recipe with a wider, deeper LLM (about 41M parameters, so the checkpoint is
hundreds of MB) in mmscale's engine, after one optimizer step so that AdamW's states
exist, is saved with `mmscale.training.checkpoint.save_checkpoint` (DeepSpeed's files,
then mmscale's commit: a marker, fsync of every file, one rename) and restored with
`load_latest_checkpoint`. `dd` measures the same disk in the same run: a write of at least
the checkpoint's size with conv=fdatasync, and a read of it. Before each read and each load
the page cache is dropped (as root, /proc/sys/vm/drop_caches), so both come from the disk;
where that is not allowed (or with --smoke) they come from memory, and the table says so. The steps repeat
in turns (save, load, dd write, dd read), and the table gives medians.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import torch

from benchmarks.common import Context, world_of_one
from benchmarks.report import Table

MB = 1e6  # as dd counts
# A 768-wide, 6-block LLM: about 41M parameters, 16 bytes each in the checkpoint
# (fp32 weights, ZeRO's fp32 optimizer partition, AdamW's two moments).
BIG_LLM = ["model.llm.hidden_size=768", "model.llm.num_layers=6", "model.llm.num_heads=12",
           "model.llm.num_kv_heads=4", "model.llm.intermediate_size=2048"]


def run(ctx: Context) -> list[Table]:
    world_of_one()
    engine = trained_engine(ctx)
    repeats = 1 if ctx.smoke else 3
    times: dict[str, list[float]] = {"dd write": [], "save": [], "dd read": [], "load": []}
    size, cold = 0, True
    for turn in range(repeats):
        run_dir = ctx.scratch / f"checkpoint-{turn}"
        start = time.perf_counter()
        save(engine, run_dir)
        times["save"].append(time.perf_counter() - start)
        size = folder_bytes(run_dir)
        cold &= drop_page_cache(ctx)
        start = time.perf_counter()
        load(engine, run_dir)
        times["load"].append(time.perf_counter() - start)
        shutil.rmtree(run_dir)
        dd_file = ctx.scratch / "dd.bin"
        dd_size = max(size, (16 if ctx.smoke else 256) * 2**20)
        times["dd write"].append(dd_write(dd_file, dd_size))
        cold &= drop_page_cache(ctx)
        times["dd read"].append(dd_read(dd_file))
        dd_file.unlink()
    return [checkpoint_table(times, size, dd_size, cold)]


def trained_engine(ctx: Context):
    """mmscale's engine for the benchmark model (a big LLM unless --smoke) after one optimizer step."""
    from mmscale.data.tokenizer import load_tokenizer
    from mmscale.models import build_model
    from mmscale.training.engine import build_engine

    recipe = ctx.recipe([] if ctx.smoke else BIG_LLM)
    torch.manual_seed(0)
    model = build_model(recipe.model, load_tokenizer(recipe.data.tokenizer))
    engine = build_engine(model, recipe.train)
    tokens, side = model.image_token_count, recipe.model.vision.image_size
    input_ids = torch.randint(10, model.language_model.lm_head.out_features, (2, tokens + 32))
    input_ids[:, 1 : 1 + tokens] = model.image_token_id
    engine.backward(engine(input_ids=input_ids, labels=input_ids, pixel_values=torch.randn(2, 3, side, side)))
    engine.step()
    return engine


def save(engine, run_dir: Path) -> None:
    from mmscale.training.checkpoint import save_checkpoint

    save_checkpoint(engine, run_dir, step=1, client_state={"step": 1})


def load(engine, run_dir: Path) -> None:
    from mmscale.training.checkpoint import load_latest_checkpoint

    if load_latest_checkpoint(engine, run_dir) is None:
        raise RuntimeError(f"no checkpoint found in {run_dir}")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def drop_page_cache(ctx: Context) -> bool:
    """Write dirty pages back and empty the page cache, so reads come from the disk; False where
    not allowed (not root), and with --smoke, which must not slow a test machine's other work."""
    if ctx.smoke:
        return False
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def dd(*operands: str) -> float:
    """Seconds dd reports for its copy."""
    done = subprocess.run(["dd", *operands], capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
    if done.returncode:
        raise RuntimeError(f"dd {' '.join(operands)} failed: {done.stderr}")
    return float(re.search(r"copied, ([0-9.e+-]+) s", done.stderr).group(1))


def dd_write(path: Path, size: int) -> float:
    # fdatasync: the time includes getting the data onto the disk, as the checkpoint's fsyncs do.
    return dd("if=/dev/zero", f"of={path}", "bs=1M", f"count={-(-size // 2**20)}", "conv=fdatasync")


def dd_read(path: Path) -> float:
    return dd(f"if={path}", "of=/dev/null", "bs=1M")


def checkpoint_table(times: dict[str, list[float]], size: int, dd_size: int, cold: bool) -> Table:
    seconds = {name: statistics.median(values) for name, values in times.items()}
    dd_bytes = -(-dd_size // 2**20) * 2**20
    write_rate, read_rate = dd_bytes / seconds["dd write"], dd_bytes / seconds["dd read"]
    source = "disk (page cache dropped)" if cold else "page cache (not dropped: --smoke, or not root)"
    table = Table("5. Checkpoint save and load against the disk's sequential bandwidth (dd)",
                  ["operation", "MB", "seconds", "MB/s", "share of dd's MB/s"])
    table.rows += [
        ["dd write, conv=fdatasync", dd_bytes / MB, seconds["dd write"], write_rate / MB, 1.0],
        ["checkpoint save (save_checkpoint: DeepSpeed + fsync + commit)", size / MB, seconds["save"],
         size / seconds["save"] / MB, size / seconds["save"] / write_rate],
        [f"dd read, from the {source}", dd_bytes / MB, seconds["dd read"], read_rate / MB, 1.0],
        [f"checkpoint load (load_latest_checkpoint), from the {source}", size / MB, seconds["load"],
         size / seconds["load"] / MB, size / seconds["load"] / read_rate],
    ]
    table.notes.append(
        f"Medians of {len(times['save'])} turns; MB = 10^6 bytes. The checkpoint holds fp32 weights, ZeRO-2's fp32 "
        "optimizer partition and AdamW's two moments of one process; on several ranks each writes its own part."
    )
    return table
