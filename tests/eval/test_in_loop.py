"""train.eval_every: the model being trained answers data.eval's questions; the accuracy per type is logged."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from mmscale.data.shards import resolve_shards
from mmscale.eval.samples import read_eval_samples
from mmscale.training.distributed import free_port
from tests.helpers.processes import run_command
from tests.helpers.recipes import CROSS_ATTENTION_OVERRIDES, REPO, tiny_with

RECIPES = {"decoder": "demo.yaml", "cross_attention": "demo_cross_attention.yaml"}


def _eval_records(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "eval_overall" in r]


def _command(arch: str, tiny_overrides: list[str], demo_data: Path, ranks: int, *extra: str) -> list[str]:
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1",
                     "--master_port", str(free_port())]
    return [*launcher, "-m", "mmscale", "train", str(REPO / "recipes" / RECIPES[arch]), *tiny_with(
            tiny_overrides, CROSS_ATTENTION_OVERRIDES if arch == "cross_attention" else []), "train.eval_every=3",
            "train.eval_samples=10", "data.num_workers=0", *extra]


@pytest.mark.parametrize("arch", ["decoder", "cross_attention"])
def test_eval_every_logs_accuracy_per_question_type(arch, tiny_overrides, demo_data):
    run_dir = Path(tiny_overrides[-1].split("=", 1)[1])
    proc = run_command(_command(arch, tiny_overrides, demo_data, 1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _eval_records(run_dir)
    assert [r["step"] for r in records] == [3, 6]
    for r in records:
        assert r["eval_samples"] == 10 and set(r["eval_accuracy"]) <= {"count", "left_right", "above_below", "name"}
        assert all(0 <= a <= 1 for a in r["eval_accuracy"].values()) and 0 <= r["eval_overall"] <= 1
    assert "eval accuracy" in proc.stdout + proc.stderr
    # What the LLM gets from the 4 images of a step: 4 x 4 patches each (decoder); 2 x 2 tiles of 4
    # patches and a class token each (cross-attention, whose padding images and tiles do not count).
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    train = [r for r in map(json.loads, lines) if "loss" in r]
    assert {r["image_tokens_per_step"] for r in train} == {64 if arch == "decoder" else 80}
    assert all(r["text_only"] == 0 and r["connector_norm"] > 0 for r in train)


@pytest.mark.slow
def test_two_ranks_under_zero3_answer_in_lockstep_and_count_every_question_once(tiny_overrides, demo_data):
    """10 questions on 2 ranks under ZeRO-3: no hang (each rank runs as many forwards), 10 counted."""
    run_dir = Path(tiny_overrides[-1].split("=", 1)[1])
    proc = run_command(_command("decoder", tiny_overrides, demo_data, 2, "train.zero_stage=3", "train.eval_samples=9"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["eval_samples"] for r in _eval_records(run_dir)] == [9, 9]
    # The predictions table holds every rank's answers, in eval order, the same questions each time.
    table = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    samples = [s.id for s in read_eval_samples(resolve_shards(str(demo_data / "eval"), "data.eval"), 9)]
    assert [(r["step"], r["id"]) for r in table] == [(step, i) for step in (3, 6) for i in samples]
    # A log a person can read: no DeepSpeed deprecation noise (4 lines a step), progress as whole
    # lines (no terminal here), and what start-up is doing.
    log = proc.stdout + proc.stderr
    assert "FutureWarning" not in log and "\r" not in log
    assert "train 6/6 steps (100%) loss=" in log
    assert log.index("mmscale: joining the other ranks") < log.index("mmscale: building the model (ZeRO-3")


def test_eval_every_without_eval_data_is_a_recipe_error(tiny_overrides):
    proc = run_command([sys.executable, "-m", "mmscale", "train", str(REPO / "recipes" / "demo.yaml"), *tiny_overrides,
                 "data.eval=null", "train.eval_every=3"])
    assert proc.returncode == 2 and "train.eval_every needs data.eval" in proc.stderr
