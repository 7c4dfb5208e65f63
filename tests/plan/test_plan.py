"""`mmscale plan`: the real-size recipes fit their named clusters, a run that does not fit is said
so with the knobs that fix it, and the plan's memory matches a measured 2-rank DeepSpeed step."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from mmscale.config import load_recipe
from mmscale.data.tokenizer import load_tokenizer
from mmscale.errors import UserError
from mmscale.launch.ending import MIN_STOP_LEAD_S
from mmscale.plan import HEADROOM, Cluster, make_plan, report, stop_lead_s
from tests.helpers.recipes import REPO

# Each real-size recipe at the cluster its comments name.
RECIPES = {
    "llava15_7b_align": 1, "llava15_7b_finetune": 1, "llava15_7b_finetune_viral": 1, "molmo_7b_style": 1,
    "llama32_11b_vision_adapter": 8, "molmo2_style": 1,
}


def recipe(name: str, *overrides: str):
    return load_recipe(REPO / "recipes" / f"{name}.yaml", list(overrides))


@pytest.mark.parametrize("name", list(RECIPES))
def test_real_size_recipes_fit_their_clusters_with_headroom(name):
    # Another GPU count its comments allow (16; the 11B's 128 samples on 32): the global batch divides too.
    assert make_plan(recipe(name), Cluster({1: 2, 8: 4}[RECIPES[name]], 8)).fits
    plan = make_plan(recipe(name), Cluster(RECIPES[name], 8))
    text = report(plan)
    print(f"\n{text}")
    assert plan.fits and plan.memory.total <= (1 - HEADROOM) * 80e9
    assert "fits, with" in text
    # The recipe's fixed global batch holds on its cluster (grad_accum derived, not given).
    assert re.search(r"global batch: \d+ x \d+ accumulation x \d+ GPUs", text)
    assert "keeping 3" in text


def test_a_run_that_does_not_fit_says_so_and_which_knobs_fix_it():
    # The 11B adapter without checkpointing, at 8 samples per GPU: more than any 80 GB GPU holds.
    plan = make_plan(recipe("llama32_11b_vision_adapter", "model.tiled_vision.activation_checkpointing=false",
                            "model.llm.activation_checkpointing=false", "train.micro_batch_size=8",
                            "train.global_batch_size=512"), Cluster(8, 8))
    text = report(plan)
    assert not plan.fits and "DOES NOT FIT" in text
    knobs = dict(re.findall(r"^  (\S+=\S+)\s+[\d.]+ GiB  (fits|still too much)$", text, re.M))
    assert knobs["model.llm.activation_checkpointing=true"] in ("fits", "still too much")
    assert "model.tiled_vision.activation_checkpointing=true" in knobs and "train.micro_batch_size=4" in knobs


def test_plan_command_exits_3_when_it_does_not_fit():
    base = [sys.executable, "-m", "mmscale", "plan", str(REPO / "recipes" / "llava15_7b_finetune.yaml")]
    fits = subprocess.run([*base, "--nodes", "1"], capture_output=True, text=True, timeout=300)
    assert fits.returncode == 0, fits.stderr
    assert "fits, with" in fits.stdout
    small = subprocess.run([*base, "--nodes", "1", "--gpu-memory", "24"], capture_output=True, text=True, timeout=300)
    assert small.returncode == 3 and "DOES NOT FIT" in small.stdout


def test_global_batch_size_sets_grad_accum_from_the_world_size():
    train = recipe("llava15_7b_finetune").train  # 48 rows, 3 per GPU
    assert [train.for_world(n).grad_accum for n in (1, 2, 8, 16)] == [16, 8, 2, 1]
    with pytest.raises(UserError, match=r"global_batch_size=48 is not a multiple of .*3 x 24 ranks.*run on"):
        train.for_world(24)


def test_submit_refuses_a_job_the_plan_says_does_not_fit(tmp_path):
    command = [sys.executable, "-m", "mmscale", "submit", str(REPO / "recipes" / "llava15_7b_finetune.yaml"),
               f"run.dir={tmp_path / 'run'}", "--nodes", "1", "--gpus-per-node", "8", "--gpu-memory", "24"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "DOES NOT FIT" in done.stdout and "nothing was submitted" in done.stderr
    assert not (tmp_path / "run").exists()


def test_a_recipe_without_vocab_size_is_planned_with_its_tokenizer(demo_data):
    plan = make_plan(recipe("demo", f"data.tokenizer={demo_data / 'tokenizer'}", f"data.train={demo_data / 'train'}"),
                     Cluster(1, 2))
    tokens = len(load_tokenizer(demo_data / "tokenizer"))
    assert plan.fits and plan.vocab_size == -(-tokens // 64) * 64  # as the model is built: rounded up to 64s
    assert re.search(r"^shards: \d+ for 2 readers: every reader gets equal work$", report(plan), re.M)


def test_checkpoints_and_the_stop_lead_follow_what_the_run_saves():
    """Frozen weights that model.pretrained gives are not saved; the stop signal's lead covers a
    step and the save, at least 90 s, and grows when the file system is slower."""
    align = make_plan(recipe("llava15_7b_align"), Cluster(1, 8))  # only the connector trains
    assert align.memory.saved_frozen == 0 and "without the frozen weights" in report(align)
    assert stop_lead_s(align) == MIN_STOP_LEAD_S
    finetune = recipe("llava15_7b_finetune")
    fast, slow = (make_plan(finetune, Cluster(1, 8, write_gbps=gbps)) for gbps in (2.0, 0.5))
    assert MIN_STOP_LEAD_S < stop_lead_s(fast) < stop_lead_s(slow)
    assert f"stop: SIGUSR2 at least {stop_lead_s(fast)} s before the time limit" in report(fast)
    # The same recipe without its tower's folder saves the frozen tower in every checkpoint.
    unloaded = make_plan(recipe("llava15_7b_finetune", "model.pretrained.vlm=null"), Cluster(1, 8))
    assert unloaded.memory.saved_frozen > 0
