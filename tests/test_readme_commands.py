"""Every `mmscale` command that README.md and slurm/README.md show, run as a user types it,
in a folder holding files named as the synopses name them (IMAGES, OUT, RUN_DIR, ...). The
commands that need GPUs (`submit` with --gpus-per-node 8, and `jobs` of such a run) are
parsed only (tests/test_cli.py; tests/launch submits on the local cluster's CPU nodes), and
`shards demo` is what `make demo` runs (tests/test_readme.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from mmscale.config import dump_recipe, load_recipe
from tests.helpers.eval_shards import write_eval_shards
from tests.helpers.readmes import SHOWN, as_typed
from tests.helpers.recipes import REPO, TINY_OVERRIDES

# `submit` asks SLURM for 8 GPUs a node (tests/launch runs it on CPU nodes); `jobs` reads that run.
NOT_HERE = ("mmscale shards demo", "mmscale submit", "mmscale jobs runs/llava15_7b_finetune")
RUNNABLE = [line for line in SHOWN if not line.startswith(NOT_HERE)]
# What each synopsis writes to OUT or RUN_DIR: removed before it runs, as a user starts afresh.
WRITES = {"shards build": "OUT", "cache-teacher": "OUT", "--to hf": "OUT", "--to mmscale": "OUT"}


def _typed(line: str, overrides: list[str]) -> list[str]:
    words = as_typed(line)
    out = []
    for word in words:
        out += overrides if word in ("key.sub=value", "key=value") else [word]
    return out


@pytest.fixture(scope="module")
def workspace(demo_data, tmp_path_factory) -> Path:
    """A folder with IMAGES/, a LLaVA-format JSON and a caption list, IN (train shards) and
    SHARDS (eval shards), and RECIPE: recipes/demo_viral.yaml at the tests' tiny size on the demo
    data (a VIRAL recipe, which `shards cache-teacher` needs); RUN_DIR and its aliases point at
    the run `mmscale train` makes."""
    ws = tmp_path_factory.mktemp("readme")
    recipe = load_recipe(REPO / "recipes" / "demo_viral.yaml", [
        *TINY_OVERRIDES, f"data.train={demo_data / 'train'}", f"data.val={demo_data / 'val'}",
        f"data.eval={demo_data / 'eval'}", f"data.tokenizer={demo_data / 'tokenizer'}", "run.dir=run",
        "train.warmup_steps=1", "train.checkpoint_every=1", "train.val_every=0"])
    (ws / "RECIPE").write_text(dump_recipe(recipe))
    (ws / "IMAGES").mkdir()
    records, captions = [], []
    for i in range(8):
        Image.new("RGB", (40, 30), (10 * i, 120, 200)).save(ws / "IMAGES" / f"{i}.jpg")
        records.append({"id": f"r{i}", "image": f"{i}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Blue."}]})
        captions.append(json.dumps({"image": f"{i}.jpg", "caption": f"square {i}"}))
    (ws / "llava_v1_5_mix665k.json").write_text(json.dumps(records))
    (ws / "captions.jsonl").write_text("\n".join(captions) + "\n")
    shutil.copytree(demo_data / "train", ws / "IN")
    shutil.copytree(demo_data / "tokenizer", ws / "TOKENIZER")  # eval --tokenizer: the run's, found elsewhere
    write_eval_shards(demo_data / "val", ws / "SHARDS")
    for alias in ("RUN_DIR", "RUN_OR_CHECKPOINT", "RUN_OR_FOLDER"):
        (ws / alias).symlink_to("run")
    return ws


def test_every_runnable_command_is_run():
    """What is not run here is parsed (tests/test_cli.py) and named above, with the reason."""
    assert len(RUNNABLE) >= 11 and len(SHOWN) - len(RUNNABLE) == 5
    assert {line.split()[1] for line in RUNNABLE} >= {"shards", "train", "plan", "jobs", "convert", "eval"}


@pytest.mark.slow
def test_the_readme_commands_run_as_written(workspace):
    overrides = ["train.steps=2"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="offline")
    for line in RUNNABLE:
        for shown, target in WRITES.items():
            if shown in line and (workspace / target).exists():
                shutil.rmtree(workspace / target)
        argv = _typed(line, overrides)
        proc = subprocess.run([sys.executable, "-m", "mmscale", *argv], cwd=workspace, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, f"{line}\n{' '.join(argv)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        if "--to hf" in line:  # the release the next synopsis imports
            (workspace / "OUT").rename(workspace / "FOLDER")
    assert (workspace / "run" / "checkpoints" / "step_0000002").is_dir()
    assert len(json.loads((workspace / "RESULT.json").read_text())["samples"]) == 1  # --max-samples 1
    assert (workspace / "FOLDER" / "config.json").is_file()  # the transformers release
    assert any((workspace / "OUT").iterdir())  # ... imported back as an mmscale folder
